// Detection + fusion of every branch kind and geometry, checked by running onnxruntime on the
// original and the fused model (never by re-deriving the fusion formula here).
import * as assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import type { BranchKind } from '../src/core/model';
import { bfloat16ToFloat, DType, dtypeName, encodeFloats, floatToBfloat16 } from '../src/core/dtype';
import { fuseBlock, type FuseSpec, prepareFusion } from '../src/core/fusion';
import { streamFusedWeight } from '../src/core/fusestream';
import { defaultFuseOptions, fuse } from '../src/engine';
import { fuseAndValidate, type Fused, viewModel, writeModel } from './helpers/fuse';
import { type BuilderOpts, ModelBuilder, attrFloat } from './helpers/onnx-builder';
import { makeTmp, rmTmp } from './helpers/paths';
import { maxAbsDiff, ort, runOrt } from './helpers/ort';
import { Rng } from '../src/core/random';

let dir: string;
before(() => {
  dir = makeTmp();
});
after(() => rmTmp(dir));

const C = 4;
const H = 6;

function start(c = C, h = H, opts: BuilderOpts = {}): { b: ModelBuilder; x: string } {
  const b = new ModelBuilder({ seed: 7, ...opts });
  const x = b.input('x', [1, c, h, h]);
  return { b, x };
}

/** Relu after the block, as in real models, then the graph output. */
function finish(b: ModelBuilder, y: string): Uint8Array {
  b.output(b.relu(y, 'act'));
  return b.encode();
}

const kinds = (f: Fused, i = 0): BranchKind[] => f.report.inspect.blocks[i].branches.map((br) => br.kind);

describe('every leaf kind fuses exactly', () => {
  it('Conv with bias + Conv without bias', async () => {
    const { b, x } = start();
    const y = b.add(b.conv(x, C, C, [3, 3], { bias: true }), b.conv(x, C, C, [1, 1]));
    const f = await fuseAndValidate(finish(b, y), { dir, expectBlocks: 1, expectOps: { Conv: 1, Add: 0, Relu: 1 } });
    const blk = f.report.inspect.blocks[0];
    assert.deepEqual(kinds(f), ['conv', 'conv']);
    assert.deepEqual(blk.branches.map((br) => br.hasBias), [true, false]);
    assert.deepEqual(blk.kernel, [3, 3]);
    assert.equal(blk.paramsBefore, C * C * 9 + C + C * C);
    assert.equal(blk.paramsAfter, C * C * 9 + C);
    assert.equal(f.report.paramsAfter, C * C * 9 + C);
    assert.equal(f.report.nodesBefore, 4);
    assert.equal(f.report.nodesAfter, 2);
  });

  it('Conv→BN + Conv→BN + BN(x) (RepVGG)', async () => {
    const { b, x } = start();
    const y = b.add(b.add(b.conv(x, C, C, [3, 3], { bn: true }), b.conv(x, C, C, [1, 1], { bn: true })), b.bn(x, C));
    const f = await fuseAndValidate(finish(b, y), { dir, expectBlocks: 1, expectOps: { Conv: 1, BatchNormalization: 0, Add: 0 } });
    assert.deepEqual(kinds(f), ['conv_bn', 'conv_bn', 'bn_identity']);
    assert.equal(f.report.bnFolded, 0);
    assert.equal(f.out.initializers.size, 2, `left: ${[...f.out.initializers.keys()]}`);
  });

  it('bare x identity', async () => {
    const { b, x } = start();
    const y = b.add(b.add(b.conv(x, C, C, [3, 3], { bias: true }), b.conv(x, C, C, [1, 1], { bias: true })), x);
    const f = await fuseAndValidate(finish(b, y), { dir, expectBlocks: 1, expectOps: { Conv: 1, Add: 0 } });
    assert.deepEqual(kinds(f), ['conv', 'conv', 'identity']);
    assert.equal(f.report.inspect.blocks[0].inChannels, C);
  });

  for (const [label, dims, left] of [
    ['scalar factor [] on the right', [], false],
    ['scalar factor [1] on the left', [1], true],
    ['per-channel [1,C,1,1] factor on the right', [1, C, 1, 1], false],
    ['per-channel [1,C,1,1] factor on the left', [1, C, 1, 1], true],
    ['per-channel [C,1,1] factor', [C, 1, 1], false],
  ] as [string, number[], boolean][]) {
    it(`Conv leaf scaled by a constant Mul: ${label}`, async () => {
      const { b, x } = start();
      const alpha = b.init('alpha', dims, (i) => 0.3 + 0.5 * i);
      const c1 = b.conv(x, C, C, [1, 1], { bn: true });
      const scaled = left ? b.mul(alpha, c1) : b.mul(c1, alpha);
      const y = b.add(b.conv(x, C, C, [3, 3], { bn: true }), scaled);
      const f = await fuseAndValidate(finish(b, y), { dir, expectBlocks: 1, expectOps: { Conv: 1, Mul: 0, BatchNormalization: 0, Add: 0 } });
      assert.deepEqual(f.report.inspect.blocks[0].branches.map((br) => !!br.scaled), [false, true]);
      assert.ok(!f.out.initializers.has(alpha), 'the factor initializer is removed');
    });
  }

  it('Conv leaf scaled by a Constant node with value_float', async () => {
    const { b, x } = start();
    const alpha = b.node('Constant', [], { attrs: [attrFloat('value_float', 0.625)], outputs: ['alpha'] })[0];
    const y = b.add(b.conv(x, C, C, [3, 3], { bn: true }), b.mul(b.conv(x, C, C, [1, 1], { bn: true }), alpha));
    const f = await fuseAndValidate(finish(b, y), { dir, expectBlocks: 1, expectOps: { Conv: 1, Mul: 0, Constant: 0 } });
    assert.equal(f.report.inspect.blocks[0].branches[1].scaled, true);
  });

  it('Sum instead of Adds', async () => {
    const { b, x } = start();
    const y = b.sum([b.conv(x, C, C, [3, 3], { bn: true }), b.conv(x, C, C, [1, 1], { bn: true }), b.bn(x, C)]);
    const f = await fuseAndValidate(finish(b, y), { dir, expectBlocks: 1, expectOps: { Conv: 1, Sum: 0, BatchNormalization: 0 } });
    assert.deepEqual(kinds(f), ['conv_bn', 'conv_bn', 'bn_identity']);
  });

  it('Add tree (a+b)+c and a+(b+c)', async () => {
    const { b, x } = start();
    const left = b.add(b.add(b.conv(x, C, C, [3, 3], { bn: true }), b.conv(x, C, C, [1, 1], { bn: true })), b.bn(x, C));
    const z = b.relu(left);
    const right = b.add(b.conv(z, C, C, [3, 3], { bn: true }), b.add(b.conv(z, C, C, [1, 1], { bn: true }), z));
    const f = await fuseAndValidate(finish(b, right), { dir, expectBlocks: 2, expectOps: { Conv: 2, Add: 0, BatchNormalization: 0, Relu: 2 } });
    assert.equal(f.report.inspect.blocks[0].branches.length, 3);
    assert.equal(f.report.inspect.blocks[1].branches.length, 3);
    assert.deepEqual(kinds(f, 1).sort(), ['conv_bn', 'conv_bn', 'identity']);
  });

  it('MobileOne-style 0 + … with a Constant zero, and with a zero initializer', async () => {
    const { b, x } = start();
    const zero = b.constant('zero', [], [0]);
    let acc = b.add(zero, b.conv(x, C, C, [3, 3], { bn: true }));
    acc = b.add(acc, b.conv(x, C, C, [3, 3], { bn: true }));
    acc = b.add(acc, b.conv(x, C, C, [1, 1], { bn: true }));
    acc = b.add(acc, b.bn(x, C));
    const z = b.relu(acc);
    const zeroInit = b.init('zero_init', [1], [0]);
    const y = b.add(b.add(zeroInit, b.conv(z, C, C, [3, 3], { bias: true })), b.conv(z, C, C, [1, 1], { bias: true }));
    const f = await fuseAndValidate(finish(b, y), { dir, expectBlocks: 2, expectOps: { Conv: 2, Add: 0, Constant: 0, BatchNormalization: 0 } });
    assert.deepEqual(kinds(f, 0), ['conv_bn', 'conv_bn', 'conv_bn', 'bn_identity']);
    assert.deepEqual(kinds(f, 1), ['conv', 'conv']);
    assert.ok(!f.out.initializers.has(zeroInit), 'the zero initializer is removed');
  });
});

describe('post-add BatchNormalization', () => {
  it('QARepVGG: (Conv→BN + Conv + x) → BN', async () => {
    const { b, x } = start();
    const s = b.add(b.add(b.conv(x, C, C, [3, 3], { bn: true }), b.conv(x, C, C, [1, 1], { bias: true })), x);
    const y = b.bn(s, C, { eps: 1e-3 });
    const f = await fuseAndValidate(finish(b, y), { dir, expectBlocks: 1, expectOps: { Conv: 1, BatchNormalization: 0, Add: 0 } });
    const blk = f.report.inspect.blocks[0];
    assert.deepEqual(kinds(f), ['conv_bn', 'conv', 'identity']);
    assert.ok(blk.postBN, 'post BN is reported');
    assert.ok(Math.abs(blk.postBN.epsilon - 1e-3) < 1e-9);
    assert.equal(blk.output, y, 'the block output is the BN output');
  });

  it('RepViT: depthwise (Conv→BN 3×3 + Conv 1×1 + x) → BN', async () => {
    const c = 8;
    const { b, x } = start(c);
    const s = b.add(b.add(b.conv(x, c, c, [3, 3], { groups: c, bn: true }), b.conv(x, c, c, [1, 1], { groups: c, bias: true })), x);
    const f = await fuseAndValidate(finish(b, b.bn(s, c)), { dir, expectBlocks: 1, expectOps: { Conv: 1, BatchNormalization: 0 } });
    assert.equal(f.report.inspect.blocks[0].groups, c);
    assert.ok(f.report.inspect.blocks[0].postBN);
  });

  it('post-add BN over a tree with the bare identity in the middle', async () => {
    const { b, x } = start();
    const s = b.add(b.conv(x, C, C, [3, 3], { bias: true }), x);
    const s2 = b.add(s, b.conv(x, C, C, [1, 1]));
    const f = await fuseAndValidate(finish(b, b.bn(s2, C)), { dir, expectBlocks: 1, expectOps: { Conv: 1, BatchNormalization: 0, Add: 0 } });
    assert.deepEqual(kinds(f), ['conv', 'identity', 'conv']);
  });
});

describe('geometry', () => {
  for (const g of [2, 4]) {
    it(`groups = ${g}`, async () => {
      const c = 8;
      const { b, x } = start(c);
      const y = b.add(b.add(b.conv(x, c, c, [3, 3], { groups: g, bn: true }), b.conv(x, c, c, [1, 1], { groups: g, bn: true })), b.bn(x, c));
      const f = await fuseAndValidate(finish(b, y), { dir, expectBlocks: 1, expectOps: { Conv: 1, BatchNormalization: 0 } });
      const blk = f.report.inspect.blocks[0];
      assert.equal(blk.groups, g);
      const conv = f.out.nodes.find((n) => n.opType === 'Conv')!;
      assert.equal(Number(conv.attrs.get('group')?.i), g);
      assert.deepEqual(f.out.initializers.get(conv.inputs[1])!.dims, [c, c / g, 3, 3]);
    });
  }

  it('depthwise (groups = C) with identity', async () => {
    const c = 6;
    const { b, x } = start(c);
    const y = b.add(b.add(b.conv(x, c, c, [3, 3], { groups: c, bn: true }), b.conv(x, c, c, [1, 1], { groups: c, bn: true })), b.bn(x, c));
    const f = await fuseAndValidate(finish(b, y), { dir, expectBlocks: 1, expectOps: { Conv: 1 } });
    assert.equal(f.report.inspect.blocks[0].groups, c);
    assert.match(f.report.inspect.blocks[0].family, /depthwise/i);
  });

  it('stride 2, no identity, channels 4 → 8', async () => {
    const { b, x } = start(4, 7);
    const y = b.add(b.conv(x, 8, 4, [3, 3], { stride: 2, bn: true }), b.conv(x, 8, 4, [1, 1], { stride: 2, bn: true }));
    const f = await fuseAndValidate(finish(b, y), { dir, expectBlocks: 1, expectOps: { Conv: 1 } });
    const blk = f.report.inspect.blocks[0];
    assert.deepEqual(blk.stride, [2, 2]);
    assert.equal(blk.inChannels, 4);
    assert.equal(blk.outChannels, 8);
    const conv = f.out.nodes.find((n) => n.opType === 'Conv')!;
    assert.deepEqual(conv.attrs.get('strides')?.ints?.map(Number), [2, 2]);
  });

  it('ACNet: 3×3 + 1×3 (pads [0,1,0,1]) + 3×1 (pads [1,0,1,0])', async () => {
    const { b, x } = start();
    const sq = b.conv(x, C, C, [3, 3], { bn: true, name: '/stage1/square/Conv' });
    const hor = b.conv(x, C, C, [1, 3], { pads: [0, 1, 0, 1], bn: true, name: '/stage1/hor/Conv' });
    const ver = b.conv(x, C, C, [3, 1], { pads: [1, 0, 1, 0], bn: true, name: '/stage1/ver/Conv' });
    const y = b.add(b.add(sq, hor), ver);
    const f = await fuseAndValidate(finish(b, y), { dir, expectBlocks: 1, expectOps: { Conv: 1, BatchNormalization: 0 } });
    const blk = f.report.inspect.blocks[0];
    assert.deepEqual(blk.branches.map((br) => br.kernel), [[3, 3], [1, 3], [3, 1]]);
    assert.deepEqual(blk.kernel, [3, 3]);
    assert.equal(blk.family, 'ACNet');
  });

  it('7×7 + 3×3 depthwise (RepVGGDW)', async () => {
    const c = 8;
    const { b, x } = start(c, 9);
    const y = b.add(b.conv(x, c, c, [7, 7], { groups: c, bn: true }), b.conv(x, c, c, [3, 3], { groups: c, bn: true }));
    const f = await fuseAndValidate(finish(b, y), { dir, expectBlocks: 1, expectOps: { Conv: 1 } });
    assert.deepEqual(f.report.inspect.blocks[0].kernel, [7, 7]);
    const conv = f.out.nodes.find((n) => n.opType === 'Conv')!;
    assert.deepEqual(conv.attrs.get('pads')?.ints?.map(Number), [3, 3, 3, 3]);
  });

  it('5×5 + 1×1', async () => {
    const { b, x } = start(C, 8);
    const y = b.add(b.conv(x, C, C, [5, 5], { bias: true }), b.conv(x, C, C, [1, 1], { bias: true }));
    const f = await fuseAndValidate(finish(b, y), { dir, expectBlocks: 1, expectOps: { Conv: 1 } });
    assert.deepEqual(f.report.inspect.blocks[0].kernel, [5, 5]);
  });

  it('1×1 + identity (MobileOne pointwise) keeps a 1×1 kernel', async () => {
    const { b, x } = start();
    const y = b.add(b.add(b.conv(x, C, C, [1, 1], { bn: true }), b.conv(x, C, C, [1, 1], { bn: true })), b.bn(x, C));
    const f = await fuseAndValidate(finish(b, y), { dir, expectBlocks: 1 });
    assert.deepEqual(f.report.inspect.blocks[0].kernel, [1, 1]);
  });

  it('1-D convolutions (3 + 1 + identity)', async () => {
    const b = new ModelBuilder({ seed: 3 });
    const x = b.input('x', [1, C, 10]);
    const y = b.add(b.add(b.conv(x, C, C, [3], { bn: true }), b.conv(x, C, C, [1], { bn: true })), b.bn(x, C));
    const f = await fuseAndValidate(finish(b, y), { dir, expectBlocks: 1, expectOps: { Conv: 1 } });
    assert.deepEqual(f.report.inspect.blocks[0].kernel, [3]);
  });
});

describe('BatchNormalization epsilon', () => {
  it('branches with different epsilons (1e-3 vs 1e-5) and small variances', async () => {
    const { b, x } = start();
    const y = b.add(
      b.add(b.conv(x, C, C, [3, 3], { bn: { eps: 1e-3, variance: [1e-4, 1e-3] } }), b.conv(x, C, C, [1, 1], { bn: { eps: 1e-5, variance: [1e-4, 1e-3] } })),
      b.bn(x, C, { eps: 1e-3, variance: [1e-4, 1e-3] }),
    );
    const f = await fuseAndValidate(finish(b, y), { dir, expectBlocks: 1, maxDiff: 1e-4 });
    const eps = f.report.inspect.blocks[0].branches.map((br) => br.epsilon!);
    assert.ok(Math.abs(eps[0] - 1e-3) < 1e-9 && Math.abs(eps[1] - 1e-5) < 1e-12 && Math.abs(eps[2] - 1e-3) < 1e-9, String(eps));
    assert.deepEqual(f.report.inspect.blocks[0].branches.map((br) => br.epsilonSource), ['model', 'model', 'model']);
  });

  it('a large epsilon (0.1) on tiny variances is used: the wrong epsilon would fail validation', async () => {
    const build = (eps: number | undefined) => {
      const { b, x } = start(C, H, { seed: 11 });
      const bn = { eps, variance: [1e-4, 1e-3] as [number, number] };
      const y = b.add(b.add(b.conv(x, C, C, [3, 3], { bn }), b.conv(x, C, C, [1, 1], { bn })), b.bn(x, C, bn));
      return finish(b, y);
    };
    const f = await fuseAndValidate(build(0.1), { dir, expectBlocks: 1 });
    // The same weights with BN's default epsilon (1e-5) compute something very different, so a
    // fusion that ignored the model's epsilon could not have passed.
    const input = new ort.Tensor('float32', Float32Array.from({ length: C * H * H }, (_, i) => Math.sin(i)), [1, C, H, H]);
    const only = async (m: string | Uint8Array) => Object.values(await runOrt(m, { x: input }))[0];
    const fused = await only(f.output);
    const right = await only(f.input);
    const wrong = await only(build(undefined));
    assert.ok(maxAbsDiff(fused.data, right.data) <= 1e-5);
    assert.ok(maxAbsDiff(fused.data, wrong.data) > 0.5, `eps 1e-5 vs 0.1 differ by only ${maxAbsDiff(fused.data, wrong.data)}`);
  });
});

describe('weight element types', () => {
  it('an all-float16 model (weights and activations, raw and int32_data storage)', async () => {
    for (const storage of ['raw', 'typed'] as const) {
      const { b, x } = start(C, H, { dtype: 'float16', storage, seed: 5 });
      const y = b.add(b.add(b.conv(x, C, C, [3, 3], { bn: true }), b.conv(x, C, C, [1, 1], { bn: true })), b.bn(x, C));
      // Outputs reach |y| ≈ 3, where one float16 ulp is 2^-9 ≈ 2e-3: allow two ulps.
      const f = await fuseAndValidate(finish(b, y), { dir, expectBlocks: 1, atol: 2e-3, rtol: 2e-3, maxDiff: 4e-3, expectOps: { Conv: 1, BatchNormalization: 0 } });
      assert.ok(f.report.validation!.blocks[0].maxAbsRef > 1, 'outputs are large enough for the tolerance to mean something');
      const conv = f.out.nodes.find((n) => n.opType === 'Conv')!;
      assert.equal(f.out.initializers.get(conv.inputs[1])!.dtype, 10, 'fused weight stays float16');
      assert.equal(f.out.initializers.get(conv.inputs[2])!.dtype, 10, 'fused bias stays float16');
      assert.equal(f.report.inspect.blocks[0].branches[0].dtype, 'float16');
      assert.equal(f.report.validation!.inputs[0].dtype, 'float16');
    }
  });

  it('float32 weights in float_data (typed storage)', async () => {
    const { b, x } = start(C, H, { storage: 'typed' });
    const y = b.add(b.add(b.conv(x, C, C, [3, 3], { bn: true, bias: true }), b.conv(x, C, C, [1, 1], { bn: true })), b.bn(x, C));
    await fuseAndValidate(finish(b, y), { dir, expectBlocks: 1, expectOps: { Conv: 1 } });
  });

  // onnxruntime's CPU provider has no float64 or bfloat16 Conv, so these models cannot be run.
  // Instead: the same numbers in float32 are fused and validated by onnxruntime, and the float64 /
  // bfloat16 fusions must agree with it exactly (same float64 math, rounded once to the dtype).
  const buildTyped = (dtype: 'float32' | 'float64' | 'bfloat16', storage: 'raw' | 'typed' = 'raw') => {
    const { b, x } = start(C, H, { dtype, valuesAs: 'bfloat16', seed: 21, storage });
    const y = b.add(b.add(b.conv(x, C, C, [3, 3], { bn: true, bias: true }), b.conv(x, C, C, [1, 1], { bn: { eps: 1e-3 } })), b.bn(x, C));
    return finish(b, y);
  };
  const fusedWeights = (f: { out: Fused['out'] }) => {
    const conv = f.out.nodes.find((n) => n.opType === 'Conv')!;
    return { w: f.out.initializers.get(conv.inputs[1])!, b: f.out.initializers.get(conv.inputs[2])! };
  };

  it('float64 and bfloat16 weights fuse to the float32 result (validated by onnxruntime), rounded once', async () => {
    const f32 = fusedWeights(await fuseAndValidate(buildTyped('float32'), { dir, expectBlocks: 1 }));
    const run = async (bytes: Uint8Array) => {
      const r = await fuse(writeModel(dir, bytes), { ...defaultFuseOptions, validate: false });
      assert.equal(r.blocksFused, 1);
      assert.equal(r.validation, null);
      return fusedWeights({ out: viewModel(r.output!) });
    };
    const f64 = await run(buildTyped('float64'));
    const f64typed = await run(buildTyped('float64', 'typed'));
    const bf16 = await run(buildTyped('bfloat16'));
    const bf16typed = await run(buildTyped('bfloat16', 'typed'));
    assert.equal(f64.w.dtype, 11);
    assert.equal(bf16.w.dtype, 16);
    for (const k of ['w', 'b'] as const) {
      const n = f32[k].values.length;
      assert.ok(n > 0);
      let nonzero = 0;
      for (let i = 0; i < n; i++) {
        const d = f64[k].values[i];
        assert.equal(Math.fround(d), f32[k].values[i], `${k}[${i}]: float64 ${d} rounds to ${Math.fround(d)}, float32 fusion gave ${f32[k].values[i]}`);
        assert.equal(f64typed[k].values[i], d);
        assert.equal(bf16[k].values[i], bfloat16ToFloat(floatToBfloat16(d)), `${k}[${i}]: bfloat16 must be float64 ${d} rounded once`);
        assert.equal(bf16typed[k].values[i], bf16[k].values[i]);
        if (d !== 0) nonzero++;
      }
      assert.ok(nonzero > n / 2);
    }
  });
});

describe('constants routed through Identity and Constant nodes', () => {
  it('Identity-routed and Identity-chained weights: carriers removed with the convs', async () => {
    const { b, x } = start();
    const y = b.add(b.add(b.conv(x, C, C, [3, 3], { bn: true, weightVia: 'identity' }), b.conv(x, C, C, [1, 1], { bn: true, weightVia: 'identity2' })), b.bn(x, C));
    const f = await fuseAndValidate(finish(b, y), { dir, expectBlocks: 1, expectOps: { Identity: 0, Conv: 1, BatchNormalization: 0 } });
    assert.equal(f.original.opCounts.Identity, 3);
  });

  it('Constant-node weights: the Constant is removed', async () => {
    const { b, x } = start();
    const y = b.add(b.conv(x, C, C, [3, 3], { bn: true, weightVia: 'constant' }), b.conv(x, C, C, [1, 1], { bias: true, weightVia: 'constant' }));
    const f = await fuseAndValidate(finish(b, y), { dir, expectBlocks: 1, expectOps: { Constant: 0, Conv: 1 } });
    assert.equal(f.original.opCounts.Constant, 2);
  });

  it('carriers still used elsewhere are kept (Identity shared with a graph output, Constant read by another op)', async () => {
    const { b, x } = start();
    const c3 = b.conv(x, C, C, [3, 3], { bn: true, weightVia: 'identity2' });
    const sharedId = b.last.weight; // output of the second Identity
    const firstId = b.nodes.find((n) => n.opType === 'Identity')!.output![0];
    const c1 = b.conv(x, C, C, [1, 1], { bias: true, weightVia: 'constant' });
    const constOut = b.last.weight;
    const y = b.add(c3, c1);
    b.output(b.relu(y, 'act'));
    b.output(b.identity(sharedId, 'expose_w')); // the second Identity's output is read elsewhere
    b.output(b.op('Neg', [constOut], { name: 'neg_w' }));
    const f = await fuseAndValidate(b.encode(), { dir, expectBlocks: 1, expectOps: { Conv: 1, Constant: 1, Identity: 3, Neg: 1 } });
    const idNodes = f.out.nodes.filter((n) => n.opType === 'Identity').map((n) => n.outputs[0]);
    assert.ok(idNodes.includes(sharedId) && idNodes.includes(firstId), 'both carriers of the still-read weight are kept');
    assert.ok(f.out.initializers.has(b.initializers.find((t) => t.name!.startsWith('conv.weight'))!.name!), 'the weight initializer behind them is kept');
    assert.ok(f.out.nodes.some((n) => n.opType === 'Constant' && n.outputs[0] === constOut));
  });
});

describe('blocks in their surroundings', () => {
  it('the block output is itself the graph output', async () => {
    const { b, x } = start();
    const y = b.add(b.add(b.conv(x, C, C, [3, 3], { bn: true }), b.conv(x, C, C, [1, 1], { bn: true })), b.bn(x, C));
    b.output(y, [1, C, H, H]);
    const f = await fuseAndValidate(b.encode(), { dir, expectBlocks: 1, expectOps: { Conv: 1 } });
    assert.equal(f.out.nodes[0].outputs[0], y);
    assert.equal(f.report.validation!.outputs[0].name, y);
  });

  it('two blocks reading the same input are both fused', async () => {
    const { b, x } = start();
    const y1 = b.add(b.conv(x, C, C, [3, 3], { bn: true }), b.conv(x, C, C, [1, 1], { bn: true }));
    const y2 = b.add(b.add(b.conv(x, C, C, [3, 3], { bn: true }), b.conv(x, C, C, [1, 1], { bn: true })), b.bn(x, C));
    b.output(b.relu(b.mul(y1, y2)));
    const f = await fuseAndValidate(b.encode(), { dir, expectBlocks: 2, expectOps: { Conv: 2, Add: 0, BatchNormalization: 0, Mul: 1 } });
    assert.deepEqual(f.report.inspect.blocks.map((blk) => blk.output).sort(), [y1, y2].sort());
  });

  it('a weight shared with a Conv outside the block is kept; the outside Conv is untouched', async () => {
    const { b, x } = start();
    const y = b.add(b.conv(x, C, C, [3, 3], { bias: true }), b.conv(x, C, C, [1, 1], { bias: true }));
    const shared = b.initializers[0].name!; // the 3×3 weight
    const z = b.conv(b.relu(y), C, C, [3, 3], { weight: shared });
    b.output(z);
    const f = await fuseAndValidate(b.encode(), { dir, expectBlocks: 1, expectOps: { Conv: 2 } });
    assert.ok(f.out.initializers.has(shared));
    assert.equal(f.out.nodes.filter((n) => n.inputs[1] === shared).length, 1);
  });

  it('a zero initializer shared by two MobileOne-style sums is removed once both are fused', async () => {
    const { b, x } = start();
    const zero = b.init('zero', [], [0]);
    const y1 = b.add(b.add(zero, b.conv(x, C, C, [3, 3], { bn: true })), b.conv(x, C, C, [1, 1], { bn: true }));
    const z = b.relu(y1);
    const y2 = b.add(b.add(zero, b.conv(z, C, C, [3, 3], { bn: true })), b.bn(z, C));
    b.output(b.relu(y2));
    const f = await fuseAndValidate(b.encode(), { dir, expectBlocks: 2, expectOps: { Conv: 2, Add: 0 } });
    assert.ok(!f.out.initializers.has(zero));
  });

  it('a zero initializer shared with a sum that is not fused is kept', async () => {
    const { b, x } = start();
    const zero = b.init('zero', [], [0]);
    const y1 = b.add(b.add(zero, b.conv(x, C, C, [3, 3], { bn: true })), b.conv(x, C, C, [1, 1], { bn: true }));
    const other = b.add(zero, b.relu(y1));
    b.output(other);
    const f = await fuseAndValidate(b.encode(), { dir, expectBlocks: 1, expectOps: { Conv: 1, Add: 1 } });
    assert.ok(f.out.initializers.has(zero));
  });

  it('a Conv→BN pair whose weight is tied to another Conv: folded, the tied weight kept', async () => {
    const { b, x } = start();
    const y = b.conv(x, C, C, [3, 3], { bn: true });
    const w = b.last.weight;
    b.output(b.conv(b.relu(y), C, C, [3, 3], { weight: w, bias: true }));
    const f = await fuseAndValidate(b.encode(), { dir, expectBlocks: 0, expectOps: { Conv: 2, BatchNormalization: 0 } });
    assert.equal(f.report.bnFolded, 1);
    assert.ok(f.out.initializers.has(w));
  });

  it("nodes in the explicit 'ai.onnx' domain, weights behind Identity and Constant carriers", async () => {
    const { b, x } = start();
    const y = b.add(b.conv(x, C, C, [3, 3], { bias: true, weightVia: 'identity' }), b.conv(x, C, C, [1, 1], { bias: true, weightVia: 'constant' }));
    for (const n of b.nodes) n.domain = 'ai.onnx';
    b.output(b.relu(y));
    const f = await fuseAndValidate(b.encode(), { dir, expectBlocks: 1, expectOps: { Conv: 1, Identity: 0, Constant: 0 } });
    assert.deepEqual(f.report.inspect.rejected, []);
  });

  it('a Conv with an empty optional bias name ("")', async () => {
    const { b, x } = start();
    const c3 = b.conv(x, C, C, [3, 3]);
    b.last.node.input!.push('');
    const y = b.add(c3, b.conv(x, C, C, [1, 1], { bias: true }));
    const f = await fuseAndValidate(finish(b, y), { dir, expectBlocks: 1, expectOps: { Conv: 1 } });
    assert.equal(f.report.inspect.blocks[0].branches[0].hasBias, false);
  });
});

describe('random blocks (seeded): any mix of branches validates', () => {
  it('12 random RepVGG-like blocks in one model', async () => {
    const rng = new Rng(1234);
    const { b, x: x0 } = start(8, 7, { seed: 99 });
    let x = x0;
    let expected = 0;
    for (let i = 0; i < 12; i++) {
      const c = 8;
      const groups = [1, 2, 4, 8][Math.floor(rng.next() * 4)];
      const k = [3, 5][Math.floor(rng.next() * 2)];
      const leaves: string[] = [b.conv(x, c, c, [k, k], { groups, bn: rng.next() < 0.7, bias: rng.next() < 0.5 })];
      const extra = 1 + Math.floor(rng.next() * 3);
      for (let j = 0; j < extra; j++) {
        const kk = [1, 3][Math.floor(rng.next() * 2)];
        const r = rng.next();
        if (r < 0.2) leaves.push(x);
        else if (r < 0.4) leaves.push(b.bn(x, c, { eps: rng.next() < 0.5 ? 1e-3 : 1e-5 }));
        else leaves.push(b.conv(x, c, c, [kk, kk], { groups, bn: rng.next() < 0.5 ? { eps: 1e-3 } : false, bias: rng.next() < 0.5 }));
      }
      let s = rng.next() < 0.3 ? b.sum(leaves) : leaves.reduce((a, l) => b.add(a, l));
      if (rng.next() < 0.3) s = b.bn(s, c);
      x = b.relu(s);
      expected++;
    }
    b.output(x);
    const f = await fuseAndValidate(b.encode(), { dir, expectBlocks: expected, maxDiff: 5e-5, expectOps: { Conv: expected, Add: 0, Sum: 0, BatchNormalization: 0 } });
    assert.equal(f.report.inspect.rejected.length, 0);
  });
});

describe('streamed fused weights equal the float64 fusion rounded once', () => {
  // The writer takes a fast path (copy the big kernel's float32 values, sum only the positions
  // other branches touch) and a general one (sum every channel in float64); both must give the
  // bytes of the whole-array float64 fusion rounded once to the output type.
  const rng = new Rng(7);
  const rand = (n: number) => Float32Array.from({ length: n }, () => rng.uniform(-1, 1));
  const bn = (c: number) => ({
    gamma: Float64Array.from({ length: c }, () => rng.uniform(0.5, 1.5)),
    beta: Float64Array.from({ length: c }, () => rng.uniform(-0.5, 0.5)),
    mean: Float64Array.from({ length: c }, () => rng.uniform(-0.5, 0.5)),
    variance: Float64Array.from({ length: c }, () => rng.uniform(0.5, 2)),
    eps: 1e-3,
  });
  const C = 12;
  const cases: [string, FuseSpec][] = [
    ['3×3 + 1×1 + bare identity (copy-and-patch)', { name: 'a', outChannels: C, inPerGroup: C, groups: 1, kernel: [3, 3], terms: [
      { kind: 'conv', weight: rand(C * C * 9), kernel: [3, 3] }, { kind: 'conv', weight: rand(C * C), kernel: [1, 1], bias: rand(C) }, { kind: 'identity' }] }],
    ['ACNet 3×3 + 1×3 + 3×1, grouped, BN identity (copy-and-patch)', { name: 'b', outChannels: C, inPerGroup: C / 3, groups: 3, kernel: [3, 3], terms: [
      { kind: 'conv', weight: rand(C * 4 * 9), kernel: [3, 3] }, { kind: 'conv', weight: rand(C * 4 * 3), kernel: [1, 3], bn: bn(C) },
      { kind: 'conv', weight: rand(C * 4 * 3), kernel: [3, 1], bn: bn(C) }, { kind: 'identity', bn: bn(C) }] }],
    ['checkpoint-style 3×3 conv+BN + 1×1 conv+BN + BN identity (scaled copy-and-patch)', { name: 'd', outChannels: C, inPerGroup: C, groups: 1, kernel: [3, 3], terms: [
      { kind: 'conv', weight: rand(C * C * 9), kernel: [3, 3], bn: bn(C) }, { kind: 'conv', weight: rand(C * C), kernel: [1, 1], bn: bn(C) }, { kind: 'identity', bn: bn(C) }] }],
    ['conv+BN branches with a post-add BN (general path)', { name: 'c', outChannels: C, inPerGroup: C, groups: 1, kernel: [3, 3], postBN: bn(C), terms: [
      { kind: 'conv', weight: rand(C * C * 9), kernel: [3, 3], bn: bn(C) }, { kind: 'conv', weight: rand(C * C), kernel: [1, 1], bn: bn(C), scale: 0.7 }, { kind: 'identity' }] }],
  ];
  for (const [title, spec] of cases) {
    for (const dtype of [DType.float32, DType.float16, DType.bfloat16, DType.float64]) {
      it(`${title}, ${dtypeName(dtype)}`, () => {
        const chunks: Uint8Array[] = [];
        streamFusedWeight(prepareFusion(spec), dtype, (c) => chunks.push(c.slice()));
        const streamed = Buffer.concat(chunks);
        const whole = Buffer.from(encodeFloats(fuseBlock(spec).weight, dtype));
        assert.equal(streamed.length, whole.length);
        assert.ok(streamed.equals(whole), 'streamed bytes differ from the whole fusion rounded once');
      });
    }
  }
});
