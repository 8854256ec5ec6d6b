// Linear-region fusion (src/core/onnx/region.ts): official exports fused to the official deploy
// model's op counts and outputs, small synthetic regions (YOLOv7 implicit add/multiply, BN → Gemm),
// and the regions that are not one convolution, rejected with the op that broke them.
import * as assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { onnx } from 'onnx-proto';
import { readNpy } from '../src/core/npy';
import type { OnnxNode } from '../src/core/onnx/reader';
import { defaultFuseOptions, fuse } from '../src/engine';
import { fuseAndValidate, inspectBytes, type ModelView, viewModel, writeModel } from './helpers/fuse';
import { attrInt, attrInts, ModelBuilder } from './helpers/onnx-builder';
import { maxAbsDiff, ort, runOrt } from './helpers/ort';
import { makeTmp, repoRoot, rmTmp } from './helpers/paths';

const OPS = ['Conv', 'BatchNormalization', 'Add', 'Sub', 'Mul', 'AveragePool', 'Pad', 'Gemm'];
const official = path.join(repoRoot, 'test', 'fixtures', 'official');
/** Families whose official exports the region path brings to the deploy model's op counts. */
const FAMILIES = [
  'dbb', 'fastvit', 'repvit', 'yolov6_qarepvggv2', 'mobileone', 'repvgg', 'replknet', 'repghost', 'unireplknet',
  'yolov6_repvgg', 'yolov6_qarepvgg', 'yolov7', 'yolov9_gelan', 'ultralytics_rtdetr', 'ultralytics_v10',
];
/**
 * Heads whose official conversion also changes the code after the fused convolutions (YOLOv7's
 * IDetect.fuseforward decodes boxes with other arithmetic in ONNX export than IDetect.forward):
 * the family of the fused head blocks, whose outputs start the decode, and the official deploy
 * export's head convolutions. meta.json → onnxReference names the export whose counts fusing must give.
 */
const DECODE: Record<string, { headFamily: string; deployHead: RegExp }> = {
  yolov7: { headFamily: 'YOLOv7 IDetect', deployHead: /^\/model\.105\/m\.\d+\/Conv$/ },
};

const counts = (ns: Iterable<OnnxNode>) => {
  const c: Record<string, number> = Object.fromEntries(OPS.map((o) => [o, 0]));
  for (const n of ns) if (n.opType in c) c[n.opType]++;
  return c;
};
/** The nodes needed to compute `tensors` (backward closure over the graph), and the others. */
function split(v: ModelView, tensors: Iterable<string>): { front: OnnxNode[]; rest: OnnxNode[] } {
  const producer = new Map<string, OnnxNode>();
  for (const n of v.nodes) for (const o of n.outputs) producer.set(o, n);
  const seen = new Set<OnnxNode>();
  const stack = [...tensors];
  while (stack.length) {
    const n = producer.get(stack.pop()!);
    if (!n || seen.has(n)) continue;
    seen.add(n);
    stack.push(...n.inputs);
  }
  return { front: v.nodes.filter((n) => seen.has(n)), rest: v.nodes.filter((n) => !seen.has(n)) };
}
/** One node's NodeProto as JSON (name, op, inputs, outputs, attributes incl. Constant values). */
const nodeJson = (v: ModelView, n: OnnxNode) => JSON.stringify(onnx.NodeProto.toObject(v.proto.graph!.node![n.index] as onnx.NodeProto, { bytes: String, longs: String }));

let dir: string;
before(() => (dir = makeTmp()));
after(() => rmTmp(dir));

describe('official exports fuse to the officially converted model', () => {
  for (const fam of FAMILIES) {
    const fdir = path.join(official, fam);
    if (!fs.existsSync(path.join(fdir, 'meta.json'))) continue;
    const meta = JSON.parse(fs.readFileSync(path.join(fdir, 'meta.json'), 'utf8'));
    const reference: string = meta.onnxReference?.file ?? 'deploy.onnx';
    const want = meta.onnxOpCounts[reference] as Record<string, number>;
    // Outputs within 1e-4, or 1e-6 of the largest output (YOLO detections reach a few hundred).
    const tol = Math.max(1e-4, 1e-6 * (meta.maxAbsOutput ?? 0));
    for (const form of ['train.onnx', 'train_bn.onnx']) {
      it(`${fam} ${form}: same op counts as ${reference}, outputs as the official conversion's`, async () => {
        const f = await fuseAndValidate(path.join(fdir, form), { dir, output: path.join(dir, `${fam}_${form}`), maxDiff: 1e-4 });
        assert.deepEqual(
          Object.fromEntries(OPS.map((o) => [o, f.out.opCounts[o] ?? 0])),
          Object.fromEntries(OPS.map((o) => [o, want[o] ?? 0])),
        );
        const decode = DECODE[fam];
        if (decode) {
          // Everything but what computes the head (the decode) is the input model's, node for node:
          // the same NodeProtos (names, inputs, outputs, attributes, Constant values), same initializers.
          const heads = f.report.inspect.blocks.filter((b) => b.family === decode.headFamily).map((b) => b.output);
          assert.ok(heads.length > 0, `no ${decode.headFamily} block fused`);
          const src = f.original;
          const fusedParts = split(f.out, heads);
          const trainDecode = split(src, heads).rest;
          assert.ok(trainDecode.some((n) => n.opType === 'Mul'));
          assert.deepEqual(fusedParts.rest.map((n) => nodeJson(f.out, n)), trainDecode.map((n) => nodeJson(src, n)));
          for (const i of new Set(trainDecode.flatMap((n) => n.inputs))) {
            const a = src.initializers.get(i);
            if (a) assert.deepEqual(f.out.initializers.get(i), a, `initializer '${i}' of the decode`);
          }
          // What computes the head (the fused region) has the op counts of the official deploy export's.
          const deploy = viewModel(path.join(fdir, 'deploy.onnx'));
          const deployHeads = deploy.nodes.filter((n) => decode.deployHead.test(n.name)).flatMap((n) => n.outputs);
          assert.equal(deployHeads.length, heads.length);
          assert.deepEqual(counts(fusedParts.front), counts(split(deploy, deployHeads).front));
        }
        const x = readNpy(path.join(fdir, 'input.npy'));
        const inName = f.out.inputs.find((i) => !f.out.initializers.has(i.name))!.name;
        const res = await runOrt(f.output, { [inName]: new ort.Tensor('float32', Float32Array.from(x.values()), x.shape) });
        const got = Object.values(res)[0].data;
        const deploy = readNpy(path.join(fdir, 'deploy_out_0.npy')).values();
        const train = readNpy(path.join(fdir, 'train_out_0.npy')).values();
        assert.ok(maxAbsDiff(got, deploy) < tol, `vs deploy_out_0: ${maxAbsDiff(got, deploy)}`);
        assert.ok(maxAbsDiff(got, train) < tol, `vs train_out_0: ${maxAbsDiff(got, train)}`);
        if (reference !== 'deploy.onnx') {
          // The reference export computes what the official conversion computes.
          const ref = await runOrt(path.join(fdir, reference), { [inName]: new ort.Tensor('float32', Float32Array.from(x.values()), x.shape) });
          assert.ok(maxAbsDiff(Object.values(ref)[0].data, deploy) < tol, `${reference} vs deploy_out_0`);
        }
        assert.equal(f.report.inspect.rejected.length, 0, JSON.stringify(f.report.inspect.rejected));
      });
    }
  }
});

const C = 4;
const H = 8;
function start(): { b: ModelBuilder; x: string } {
  const b = new ModelBuilder({ seed: 23 });
  return { b, x: b.input('x', [1, C, H, H]) };
}
const perChannel = (b: ModelBuilder, name: string, lo: number, hi: number) => b.randInit(name, [1, C, 1, 1], lo, hi);
const avgPool = (b: ModelBuilder, x: string, pads: number[], name?: string) =>
  b.op('AveragePool', [x], { name, attrs: [attrInts('kernel_shape', [3, 3]), attrInts('pads', pads), attrInt('count_include_pad', 1)] });

describe('synthetic regions', () => {
  it('YOLOv7 IDetect: implicit add before a 1×1 conv and implicit multiply after it fold into one Conv', async () => {
    const { b, x } = start();
    const a = b.op('Add', [x, perChannel(b, 'ia', -0.5, 0.5)], { name: '/m.0/ia/Add' });
    const y = b.op('Mul', [b.conv(a, C, C, [1, 1], { bias: true, name: '/m.0/Conv' }), perChannel(b, 'im', 0.5, 1.5)], { name: '/m.0/im/Mul' });
    b.output(b.relu(y));
    const f = await fuseAndValidate(b.encode(), { dir, name: 'idetect', expectBlocks: 1, expectOps: { Conv: 1, Add: 0, Mul: 0 } });
    assert.equal(f.report.inspect.blocks[0].kernel.join('×'), '1×1');
  });

  it('DBB-style block: 3×3 conv + avg-pool branch + identity, with a per-channel layer scale', async () => {
    const { b, x } = start();
    const sum = b.add(b.add(b.conv(x, C, C, [3, 3], { bn: true }), b.bn(avgPool(b, x, [1, 1, 1, 1]), C)), x);
    b.output(b.relu(b.op('Mul', [sum, perChannel(b, 'ls', 0.5, 1.5)])));
    const f = await fuseAndValidate(b.encode(), { dir, name: 'dbbish', expectBlocks: 1, expectOps: { Conv: 1, Add: 0, Mul: 0, AveragePool: 0, BatchNormalization: 0 } });
    assert.equal(f.report.inspect.blocks[0].kernel.join('×'), '3×3');
  });

  it('OREPA-style weight built at run time from constants (Mul, Reshape) is folded first, and its subgraph removed', async () => {
    const { b, x } = start();
    const raw = b.randInit('w_raw', [C * C * 9], -0.3, 0.3);
    const w = b.op('Reshape', [b.op('Mul', [raw, b.init('w_scale', [1], [0.7])]), b.init('w_shape', [4], [C, C, 3, 3], { dtype: 'int64' })]);
    const y = b.add(b.conv(x, C, C, [3, 3], { weight: w, bias: true }), avgPool(b, x, [1, 1, 1, 1]));
    b.output(b.relu(y));
    await fuseAndValidate(b.encode(), { dir, name: 'orepa', expectBlocks: 1, expectOps: { Conv: 1, Add: 0, Mul: 0, Reshape: 0, AveragePool: 0 } });
  });

  it('RepViT BN_Linear: BatchNormalization before a Gemm folds into it', async () => {
    const { b, x } = start();
    const flat = b.op('Flatten', [b.op('GlobalAveragePool', [x])]);
    const bn = b.bn(flat, C);
    const y = b.op('Gemm', [bn, b.randInit('l.weight', [3, C]), b.randInit('l.bias', [3])], { attrs: [attrInt('transB', 1)] });
    b.output(y);
    const input = writeModel(dir, b.encode(), 'bnlinear');
    const report = await fuse(input, { ...defaultFuseOptions, output: path.join(dir, 'bnlinear.fused.onnx') });
    assert.equal(report.blocksFused, 1);
    assert.equal(report.validation?.passed, true, JSON.stringify(report.validation));
    const out = viewModel(report.output!);
    assert.equal(out.opCounts.Gemm, 1);
    assert.equal(out.opCounts.BatchNormalization ?? 0, 0);
  });
});

describe('regions that are not one convolution are rejected, naming the op', () => {
  it('border mismatch: a constant added before a padded 3×3 conv', () => {
    const { b, x } = start();
    const shifted = b.op('Add', [x, perChannel(b, 'a', 0.5, 1)]);
    const y = b.add(b.conv(shifted, C, C, [3, 3], { bias: true, name: 'Conv_pad' }), avgPool(b, x, [1, 1, 1, 1], 'Pool'));
    b.output(b.relu(y));
    const r = inspectBytes(dir, b.encode(), { name: 'border' });
    assert.equal(r.blocks.length, 0);
    assert.equal(r.rejected.length, 1, JSON.stringify(r.rejected));
    assert.match(r.rejected[0].reason, /constant part differs at the borders \(Conv 'Conv_pad' pads a non-zero value with zeros\)/);
  });

  it('dilation mismatch: a dilated conv followed by a padded conv, beside an avg-pool branch', () => {
    const { b, x } = start();
    const d = b.conv(x, C, C, [3, 3], { dilation: 2, pads: [2, 2, 2, 2], name: 'Conv_dil' });
    const y = b.add(b.conv(d, C, C, [3, 3], { pads: [1, 1, 1, 1], name: 'Conv_after' }), avgPool(b, x, [1, 1, 1, 1]));
    b.output(b.relu(y));
    const r = inspectBytes(dir, b.encode(), { name: 'dilation' });
    assert.equal(r.blocks.length, 0);
    assert.equal(r.rejected.length, 1, JSON.stringify(r.rejected));
    assert.match(r.rejected[0].reason, /not one convolution: at the borders .* \(Conv 'Conv_dil' pads or crops inside the region\)/);
  });

  it('a region around a plain block that stays fused still names the convolutions it leaves unfused', () => {
    const { b, x } = start();
    const plain = b.add(b.conv(x, C, C, [3, 3], { pads: [1, 1, 1, 1], name: 'Conv_k3' }), b.conv(x, C, C, [1, 1], { name: 'Conv_k1' }));
    const d = b.conv(x, C, C, [3, 3], { dilation: 2, pads: [2, 2, 2, 2], name: 'Conv_dil' });
    const y = b.add(b.conv(d, C, C, [3, 3], { pads: [1, 1, 1, 1], name: 'Conv_after' }), b.add(plain, x));
    b.output(b.relu(y));
    const r = inspectBytes(dir, b.encode(), { name: 'partial' });
    assert.equal(r.blocks.length, 1, 'the plain 3×3 + 1×1 + x block is fused');
    assert.deepEqual(r.blocks[0].branches.map((br) => br.kind).sort(), ['conv', 'conv', 'identity']);
    assert.equal(r.rejected.length, 1, JSON.stringify(r.rejected));
    assert.match(r.rejected[0].reason, /not one convolution: at the borders .*Conv 'Conv_dil' pads or crops inside the region.*stays fused; 2 Conv\/BatchNormalization nodes of the region \(Conv 'Conv_dil', Conv 'Conv_after'\) are left as they are/);
  });

  it('non-constant weight: a conv whose weight is a graph input, summed with an avg-pool branch', () => {
    const { b, x } = start();
    const w = b.input('w', [C, C, 3, 3]);
    const y = b.add(b.conv(x, C, C, [3, 3], { weight: w, name: 'Conv_dyn' }), avgPool(b, x, [1, 1, 1, 1]));
    b.output(b.relu(y));
    const r = inspectBytes(dir, b.encode(), { name: 'dynamic' });
    assert.equal(r.blocks.length, 0);
    assert.equal(r.rejected.length, 1, JSON.stringify(r.rejected));
    assert.match(r.rejected[0].reason, /weight of Conv 'Conv_dyn' is computed at run time, not a constant/);
  });
});
