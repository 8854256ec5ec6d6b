// OREPA (JUGGHM/OREPA_CVPR2022) against its official conversion (test/fixtures/official/orepa, made
// by make_orepa.py with the official blocks): the ONNX exports, whose kernels are computed at run
// time by Einsum subgraphs, fuse to the official deploy export's op counts and outputs; the
// checkpoint families (orepa, orepa_1x1, orepa_repvgg) recompute weight_gen() and equal
// deploy_sd.pt at the official deploy names; what RepFuse cannot read is rejected by name.
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { analyzeCheckpoint } from '../src/core/checkpoint';
import { detectCheckpoint } from '../src/core/checkpoint/detect';
import { ckptBlockSpec } from '../src/core/checkpoint/fuse';
import { type CkptTensor, type ModuleNode, treeFromStateDict, walk } from '../src/core/checkpoint/tree';
import { FAMILIES } from '../src/core/families';
import { fuseBlock } from '../src/core/fusion';
import { readNpy } from '../src/core/npy';
import { GraphIndex } from '../src/core/onnx/graph';
import { openOnnx, type OnnxNode } from '../src/core/onnx/reader';
import { ConstFolder, findRegions, fuseRegion } from '../src/core/onnx/region';
import { runNode } from '../src/core/onnx/region-eval';
import { defaultFuseOptions, fuse } from '../src/engine';
import { fuseAndValidate } from './helpers/fuse';
import { maxAbsDiff, ort, runOrt } from './helpers/ort';
import { readAllTensors } from './helpers/ckpt-fixtures';
import { makeTmp, repoRoot, rmTmp } from './helpers/paths';

const dir = path.join(repoRoot, 'test', 'fixtures', 'official', 'orepa');
const fx = (f: string) => path.join(dir, f);
const meta = JSON.parse(fs.readFileSync(fx('meta.json'), 'utf8'));
const OPS = ['Conv', 'BatchNormalization', 'Add', 'Sub', 'Mul', 'AveragePool', 'Pad', 'Gemm'];

let tmp: string;
before(() => (tmp = makeTmp()));
after(() => rmTmp(tmp));

const maxAbs = (v: ArrayLike<number>) => Array.from(v).reduce((a, x) => Math.max(a, Math.abs(x)), 0);

describe('OREPA ONNX exports: the run-time kernels fold, the model ends as the official deploy export', () => {
  test('the fixture: exported without constant folding, kernels computed by Einsum subgraphs', () => {
    assert.equal(meta.repo, 'JUGGHM/OREPA_CVPR2022');
    assert.match(meta.commit, /^3ed037b[0-9a-f]{33}$/);
    for (const f of ['train.onnx', 'train_bn.onnx']) assert.ok(meta.onnxOpCounts[f].Einsum >= 40, `${f}: ${JSON.stringify(meta.onnxOpCounts[f])}`);
    assert.equal(meta.onnxOpCounts['deploy.onnx'].Conv, 6);
  });

  for (const form of ['train.onnx', 'train_bn.onnx']) {
    test(`${form}: op counts = deploy.onnx's, outputs = the official conversion's`, async (t) => {
      const f = await fuseAndValidate(fx(form), { dir: tmp, output: path.join(tmp, `orepa_${form}`), maxDiff: 1e-4 });
      const want = meta.onnxOpCounts['deploy.onnx'] as Record<string, number>;
      assert.deepEqual(Object.fromEntries(OPS.map((o) => [o, f.out.opCounts[o] ?? 0])), Object.fromEntries(OPS.map((o) => [o, want[o] ?? 0])));
      // Nothing of the kernel computation is left.
      for (const op of ['Einsum', 'Gather', 'Squeeze', 'Unsqueeze', 'Reshape', 'Concat', 'Shape', 'Transpose']) assert.equal(f.out.opCounts[op] ?? 0, 0, `${op} left`);
      assert.equal(f.report.blocksFused, 6);
      assert.deepEqual(f.report.inspect.rejected, []);
      const x = readNpy(fx('input.npy'));
      const res = await runOrt(f.output!, { input: new ort.Tensor('float32', Float32Array.from(x.values()), x.shape) });
      const got = Object.values(res)[0].data;
      const deploy = readNpy(fx('deploy_out_0.npy')).values();
      const d = maxAbsDiff(got, deploy);
      t.diagnostic(`nodes ${f.report.nodesBefore} → ${f.report.nodesAfter}; max |Δ| vs deploy_out_0 ${d.toExponential(2)} (max |y| ${maxAbs(deploy).toFixed(2)})`);
      assert.ok(d < 1e-4, `vs deploy_out_0: ${d}`);
    });
  }

  test('train_torchfold.onnx (torch 1.13 mis-folded squeeze()): the RepVGG blocks are rejected naming the Einsum, the OREPA blocks fuse', () => {
    const m = openOnnx(fx('train_torchfold.onnx'));
    try {
      const index = new GraphIndex(m);
      const consts = new ConstFolder(m, index);
      const conv = m.graph.nodes.find((n) => n.name === '/4/rbr_dense/Conv')!;
      assert.ok(consts.has(conv.inputs[1]), 'the weight is a constant subgraph');
      assert.equal(consts.value(conv.inputs[1]), undefined, 'but it cannot be computed');
      assert.match(consts.why(conv.inputs[1]) ?? '', /^Einsum '\/4\/rbr_dense\/Einsum_5' operand 0 has rank 4, its term 'ti' 2\.$/);
      const regions = findRegions(m, index, consts, new Set());
      const rv = regions.filter((r) => r.data.some((n) => n.name === '/4/rbr_dense/Conv'));
      assert.equal(rv.length, 1);
      assert.throws(() => fuseRegion(rv[0], consts, index), /Conv '\/4\/rbr_dense\/Conv' reads '.*', which the region cannot compute: Einsum '\/4\/rbr_dense\/Einsum_5' operand 0 has rank 4/);
      // The OREPA and OREPA_1x1 blocks (one Conv + BN each, weight computed) are regions that fuse.
      for (const blk of ['0', '1', '2', '3']) {
        const r = regions.find((c) => c.data.some((n) => n.name === `/${blk}/Conv`));
        assert.ok(r, `block ${blk} is a region`);
        assert.deepEqual(r.data.map((n) => n.opType), ['Conv', 'BatchNormalization']);
        const fr = fuseRegion(r, consts, index);
        assert.equal(fr.shape.length, 4);
      }
    } finally {
      m.source.close();
    }
  });
});

describe('the Einsum evaluator (float64)', () => {
  const node = (eq: string): OnnxNode => ({ index: 0, name: 'e', opType: 'Einsum', domain: '', inputs: ['a', 'b'], outputs: ['y'], attrs: new Map([['equation', { s: Buffer.from(eq) }]]), outerRefs: [] });
  const T = (dims: number[], data: number[]) => ({ dims, data: Float64Array.from(data) });
  test('a per-output-channel scale, a contraction, a size-1 broadcast, the implicit output', () => {
    assert.deepEqual(Array.from(runNode(node('oi,o->oi'), [T([2, 2], [1, 2, 3, 4]), T([2], [10, -1])], 13)[0].data), [10, 20, -3, -4]);
    const mm = runNode(node('ti,ot->oi'), [T([2, 3], [1, 2, 3, 4, 5, 6]), T([1, 2], [1, 10])], 13)[0];
    assert.deepEqual(mm.dims, [1, 3]);
    assert.deepEqual(Array.from(mm.data), [41, 52, 63]);
    const bc = runNode(node('oihw,hw->oihw'), [T([1, 1, 1, 1], [2]), T([2, 2], [1, 2, 3, 4])], 13)[0];
    assert.deepEqual(bc.dims, [1, 1, 2, 2]);
    assert.deepEqual(Array.from(bc.data), [2, 4, 6, 8]);
    const imp = runNode(node('ij,jk'), [T([1, 2], [1, 2]), T([2, 1], [3, 4])], 13)[0];
    assert.deepEqual(imp.dims, [1, 1]);
    assert.deepEqual(Array.from(imp.data), [11]);
  });
  test('what it cannot evaluate is named', () => {
    assert.throws(() => runNode(node('...i,i->...i'), [T([2], [1, 2]), T([2], [1, 2])], 13), /Einsum 'e' has an ellipsis/);
    assert.throws(() => runNode(node('ij,j->i'), [T([2, 3], [1, 2, 3, 4, 5, 6]), T([2], [1, 2])], 13), /label 'j' has sizes 3 and 2/);
    assert.throws(() => runNode(node('i,i->ii'), [T([2], [1, 2]), T([2], [1, 2])], 13), /not a set of input labels/);
  });
});

describe('OREPA checkpoints: weight_gen() recomputed, = the official switch_to_deploy', () => {
  test('train_sd.pt: 6 blocks of the three OREPA families; every fused weight and bias equals deploy_sd.pt', (t) => {
    const a = analyzeCheckpoint(fx('train_sd.pt'));
    try {
      assert.deepEqual(a.report.rejected, []);
      const blocks = a.primary.detection.blocks;
      assert.deepEqual(blocks.map((b) => [b.node.path, b.family, b.branches.length, b.groups]), [
        ['0', 'orepa', 6, 1],
        ['1', 'orepa', 6, 2],
        ['2', 'orepa', 6, 8],
        ['3', 'orepa_1x1', 2, 1],
        ['4', 'orepa_repvgg', 3, 1],
        ['5', 'orepa_repvgg', 2, 1],
      ]);
      assert.deepEqual(a.report.blocks.map((b) => b.family), ['OREPA', 'OREPA', 'OREPA', 'OREPA 1×1', 'RepVGG OREPA', 'RepVGG OREPA']);
      // OREPA's branches: each scaled by its row of `vector`, BN after the sum.
      const b0 = a.report.blocks[0];
      assert.ok(b0.branches.every((br) => br.scaled));
      assert.ok(b0.postBN);
      assert.deepEqual(b0.branches[0].parts, ['0.origin']);
      assert.deepEqual(b0.branches.map((br) => br.kernel), [[3, 3], [3, 3], [3, 3], [3, 3], [1, 1], [3, 3]]);
      const official = readAllTensors(fx('deploy_sd.pt'));
      let worst = 0;
      for (const b of blocks) {
        const fused = fuseBlock(ckptBlockSpec(b));
        const base = `${b.node.path}.${FAMILIES[b.family].deploy.module}`;
        for (const [what, mine] of [['weight', fused.weight], ['bias', fused.bias]] as const) {
          const off = official.get(`${base}.${what}`);
          assert.ok(off, `${base}.${what} in deploy_sd.pt`);
          assert.equal(mine.length, off.values.length);
          const rel = maxAbsDiff(mine, off.values) / maxAbs(off.values);
          worst = Math.max(worst, rel);
        }
      }
      t.diagnostic(`max |Δ|/max|w| over 6 blocks: ${worst.toExponential(2)}`);
      assert.ok(worst < 2e-6, `within float32 rounding: ${worst}`);
    } finally {
      a.close();
    }
  });

  test('fused state_dict: exactly the keys and shapes of deploy_sd.pt, values within 1e-5·max|w|', async () => {
    const out = path.join(tmp, 'orepa.sd.pt');
    const r = await fuse(fx('train_sd.pt'), { ...defaultFuseOptions, validate: false, output: out });
    assert.equal(r.blocksFused, 6);
    const mine = readAllTensors(out);
    const official = readAllTensors(fx('deploy_sd.pt'));
    assert.deepEqual([...mine.keys()].sort(), [...official.keys()].sort());
    assert.ok([...official.keys()].includes('0.orepa_reparam.weight') && [...official.keys()].includes('3.or1x1_reparam.bias') && [...official.keys()].includes('5.rbr_reparam.weight'));
    for (const [k, o] of official) {
      const m = mine.get(k)!;
      assert.deepEqual(m.shape, o.shape, k);
      assert.ok(maxAbsDiff(m.values, o.values) <= 1e-5 * Math.max(maxAbs(o.values), 1e-30), `${k}: ${maxAbsDiff(m.values, o.values)}`);
    }
  });

  /** The fixture's state_dict as a module tree, edited by `edit` (tensors by full key). */
  function edited(edit: (t: Map<string, CkptTensor>) => void): ModuleNode {
    const a = analyzeCheckpoint(fx('train_sd.pt'));
    try {
      const ts = new Map<string, CkptTensor>();
      for (const n of walk(a.primary.tree)) for (const t of n.tensors.values()) ts.set(t.key, t);
      edit(ts);
      // Read everything now: the analysis (and its file) closes below.
      const entries = [...ts.values()].map((t) => {
        const v = t.read();
        return { ...t, read: () => v, rows: undefined };
      });
      return treeFromStateDict(entries);
    } finally {
      a.close();
    }
  }
  const fake = (key: string, shape: number[], like: CkptTensor): CkptTensor => ({ key, dtype: like.dtype, shape, read: () => new Float64Array(shape.reduce((x, y) => x * y, 1)) });

  test('anything weight_gen() does not explain rejects the block by name; the other blocks still fuse', () => {
    const cases: [string, (t: Map<string, CkptTensor>) => void, string, RegExp][] = [
      ['a missing branch tensor', (t) => t.delete('0.weight_orepa_prior'), '0', /^OREPA '0' has no 'weight_orepa_prior'; weight_gen\(\) needs it\.$/],
      ['a missing id_tensor buffer', (t) => t.delete('1.id_tensor'), '1', /OREPA '1' has no 'id_tensor'/],
      ['an extra tensor of the block', (t) => t.set('2.weight_orepa_extra', fake('2.weight_orepa_extra', [8, 1, 3, 3], t.get('2.weight_orepa_origin')!)), '2', /not understood: weight_orepa_extra \(a tensor of the block itself\)/],
      ['an extra child module', (t) => t.set('2.extra.weight', fake('2.extra.weight', [8, 8, 1, 1], t.get('2.weight_orepa_origin')!)), '2', /^OREPA: not understood: extra \(tensors weight\)/],
      ['a vector with a wrong number of rows', (t) => t.set('0.vector', fake('0.vector', [5, 8], t.get('0.vector')!)), '0', /'0\.vector' has shape 5×8; OREPA '0' scales its 6 branches by \[6, 8\]/],
      ['no bn (weight_only=True, OREPA_LargeConv\'s generators)', (t) => { for (const k of [...t.keys()]) if (k.startsWith('1.bn.')) t.delete(k); }, '1', /OREPA '1' has no 'bn' \(weight_only=True/],
      ['a tensor of OREPA_3x3_RepVGG weight_gen() does not read', (t) => t.set('4.rbr_dense.weight_rbr_1x1', fake('4.rbr_dense.weight_rbr_1x1', [16, 16, 1, 1], t.get('4.rbr_dense.weight_rbr_origin')!)), '4', /not understood: rbr_dense\.weight_rbr_1x1 \(tensors of OREPA_3x3_RepVGG/],
      ['an odd depthwise branch shape', (t) => t.set('5.rbr_dense.weight_rbr_gconv_dw', fake('5.rbr_dense.weight_rbr_gconv_dw', [128, 2, 3, 3], t.get('5.rbr_dense.weight_rbr_gconv_dw')!)), '5', /are not a depthwise 3×3 and a pointwise conv/],
      ['a broken l2i chain (OREPA_1x1)', (t) => t.set('3.weight_or1x1_l2i_conv2', fake('3.weight_or1x1_l2i_conv2', [16, 4, 1, 1], t.get('3.weight_or1x1_l2i_conv2')!)), '3', /^OREPA_1x1 '3': origin 16×8×1×1, l2i_conv1 8×8×1×1, l2i_conv2 16×4×1×1 do not chain as 1×1 convs 8 → 16\.$/],
    ];
    for (const [what, edit, block, re] of cases) {
      const det = detectCheckpoint(edited(edit));
      const rj = det.rejected.find((r) => r.name === block);
      assert.ok(rj, `${what}: block ${block} rejected (got ${JSON.stringify(det.rejected)})`);
      assert.match(rj.reason, re, what);
      assert.ok(!det.blocks.some((b) => b.node.path === block), `${what}: never fused`);
      assert.equal(det.blocks.length, 5, `${what}: the other blocks fuse`);
    }
  });
});
