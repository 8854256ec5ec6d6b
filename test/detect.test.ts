// Candidates that must not be fused (each rejection reason), residual Adds, standalone Conv→BN
// folding, and block naming from exporter scopes.
import * as assert from 'node:assert/strict';
import * as fs from 'node:fs';
import { after, before, describe, it } from 'node:test';
import { FusionError, RepFuseError } from '../src/core/errors';
import type { InspectReport } from '../src/core/model';
import { defaultFuseOptions, fuse } from '../src/engine';
import { fuseAndValidate, inspectBytes, writeModel } from './helpers/fuse';
import { type BuilderOpts, ModelBuilder } from './helpers/onnx-builder';
import { makeTmp, rmTmp } from './helpers/paths';

let dir: string;
before(() => {
  dir = makeTmp();
});
after(() => rmTmp(dir));

const C = 4;
const H = 6;

function start(opts: BuilderOpts & { c?: number; h?: number; w?: number } = {}): { b: ModelBuilder; x: string } {
  const b = new ModelBuilder({ seed: 17, ...opts });
  const x = b.input('x', [1, opts.c ?? C, opts.h ?? H, opts.w ?? opts.h ?? H]);
  return { b, x };
}

/** A genuine RepVGG block on `x` (c channels), so the model has something to fuse besides the bad candidate. */
function goodBlock(b: ModelBuilder, x: string, c = C): string {
  const dense = b.conv(x, c, c, [3, 3], { bn: true, name: '/good/rbr_dense/Conv' });
  const one = b.conv(x, c, c, [1, 1], { bn: true, name: '/good/rbr_1x1/Conv' });
  const id = b.bn(x, c, { name: '/good/rbr_identity/BatchNormalization' });
  const y = b.op('Add', [b.op('Add', [dense, one], { name: '/good/Add' }), id], { name: '/good/Add_1' });
  return b.relu(y, '/good/act/Relu');
}

interface RejectCase {
  reason: RegExp;
  /** The model can run in onnxruntime: fuse the good block and validate. */
  runnable: boolean;
  /**
   * The plain detector rejects it, but the candidate is exactly one convolution, so the
   * linear-region path (src/core/onnx/region.ts) fuses it; validation in onnxruntime proves it.
   */
  regionFuses?: boolean;
  /** Builds the model; badNodes are the producers of the candidate's leaves (listed in its parts). */
  build(): { bytes: Uint8Array; badNodes: string[] };
}

/** Builds bad(x) → relu → good block → output. */
function withGood(b: ModelBuilder, bad: string, c = C): Uint8Array {
  b.output(goodBlock(b, b.relu(bad), c));
  return b.encode();
}

const cases: Record<string, RejectCase> = {
  'branches reading different inputs (conv(x) + conv(z))': {
    reason: /branches read different tensors \('x', 'z'\)/,
    runnable: true,
    build() {
      const { b, x } = start();
      const z = b.input('z', [1, C, H, H]);
      const bad = b.add(b.conv(x, C, C, [3, 3], { bn: true }), b.conv(z, C, C, [1, 1], { bn: true }));
      return { bytes: withGood(b, bad), badNodes: ['BatchNormalization_0', 'BatchNormalization_1'] };
    },
  },
  'dilation 2': {
    reason: /has dilation 2×2; only dilation 1 can be merged/,
    runnable: true,
    build() {
      const { b, x } = start();
      const bad = b.add(b.conv(x, C, C, [3, 3], { dilation: 2, pads: [2, 2, 2, 2], bias: true }), b.conv(x, C, C, [1, 1], { bias: true }));
      return { bytes: withGood(b, bad), badNodes: ['Conv_0'] };
    },
  },
  'off-centre pads': {
    regionFuses: true,
    reason: /pads \[0, 0, 2, 2\] of Conv 'Conv_0' do not centre its 3×3 kernel \(need \[1, 1, 1, 1\]\)/,
    runnable: true,
    build() {
      const { b, x } = start();
      const bad = b.add(b.conv(x, C, C, [3, 3], { pads: [0, 0, 2, 2], bias: true }), b.conv(x, C, C, [1, 1], { bias: true }));
      return { bytes: withGood(b, bad), badNodes: ['Conv_0'] };
    },
  },
  'even kernel': {
    regionFuses: true,
    reason: /has an even kernel 2×2, which has no centre/,
    runnable: true,
    build() {
      const { b, x } = start();
      const bad = b.add(b.conv(x, C, C, [2, 2], { pads: [0, 0, 1, 1], bias: true }), b.conv(x, C, C, [1, 1], { bias: true }));
      return { bytes: withGood(b, bad), badNodes: ['Conv_0'] };
    },
  },
  'auto_pad SAME_UPPER with stride 2': {
    reason: /uses auto_pad=SAME_UPPER with stride 2×2; its padding depends on the input size/,
    runnable: true,
    build() {
      const { b, x } = start();
      const bad = b.add(b.conv(x, C, C, [3, 3], { autoPad: 'SAME_UPPER', stride: 2, bias: true }), b.conv(x, C, C, [1, 1], { stride: 2, bias: true }));
      return { bytes: withGood(b, bad), badNodes: ['Conv_0'] };
    },
  },
  'auto_pad VALID with a 3×3 kernel': {
    reason: /uses auto_pad=VALID with a 3×3 kernel, which is not centred/,
    runnable: false, // the two branches have different spatial sizes
    build() {
      const { b, x } = start();
      const bad = b.add(b.conv(x, C, C, [3, 3], { autoPad: 'VALID', bias: true }), b.conv(x, C, C, [1, 1], { bias: true }));
      return { bytes: withGood(b, bad), badNodes: ['Conv_0'] };
    },
  },
  'weight is a graph input': {
    reason: /weight of Conv 'Conv_0' is computed at run time, not a constant/,
    runnable: true,
    build() {
      const { b, x } = start();
      const w = b.input('w', [C, C, 3, 3]);
      const bad = b.add(b.conv(x, C, C, [3, 3], { weight: w, bias: true }), b.conv(x, C, C, [1, 1], { bias: true }));
      return { bytes: withGood(b, bad), badNodes: ['Conv_0'] };
    },
  },
  'weight is the output of another op': {
    regionFuses: true,
    reason: /weight of Conv 'Conv_0' is computed at run time, not a constant/,
    runnable: true,
    build() {
      const { b, x } = start();
      const w = b.op('Neg', [b.randInit('w', [C, C, 3, 3], -0.3, 0.3)]);
      const bad = b.add(b.conv(x, C, C, [3, 3], { weight: w, bias: true }), b.conv(x, C, C, [1, 1], { bias: true }));
      return { bytes: withGood(b, bad), badNodes: ['Conv_0'] };
    },
  },
  'BN parameters computed at run time': {
    reason: /running variance of BatchNormalization 'BatchNormalization_0' is computed at run time/,
    runnable: true,
    build() {
      const { b, x } = start();
      const c3 = b.conv(x, C, C, [3, 3], { bn: true });
      const bnNode = b.nodes[b.nodes.length - 1];
      bnNode.input![4] = b.op('Abs', [bnNode.input![4]]);
      // keep topological order: move the Abs before the BN
      b.nodes.splice(b.nodes.length - 2, 0, b.nodes.pop()!);
      const bad = b.add(c3, b.conv(x, C, C, [1, 1], { bias: true }));
      return { bytes: withGood(b, bad), badNodes: ['BatchNormalization_0'] };
    },
  },
  'conv output is also a graph output': {
    reason: /output of Conv 'Conv_1' is also used by a graph output/,
    runnable: true,
    build() {
      const { b, x } = start();
      const c3 = b.conv(x, C, C, [3, 3], { bias: true });
      const c1 = b.conv(x, C, C, [1, 1], { bias: true });
      b.output(c1);
      const bad = b.add(c3, c1);
      return { bytes: withGood(b, bad), badNodes: ['Conv_0', 'Conv_1'] };
    },
  },
  'conv output also read by another node (before its BN)': {
    reason: /output of Conv 'Conv_0' is also used by Sigmoid 'Sigmoid_0'/,
    runnable: true,
    build() {
      const { b, x } = start();
      const c3 = b.conv(x, C, C, [3, 3], { bn: true });
      b.output(b.op('Sigmoid', [b.last.convOut]));
      const bad = b.add(c3, b.conv(x, C, C, [1, 1], { bn: true }));
      return { bytes: withGood(b, bad), badNodes: ['BatchNormalization_0'] };
    },
  },
  'BN of a branch in training mode': {
    reason: /BatchNormalization 'BatchNormalization_0' is in training mode \(training_mode=1\)/,
    runnable: false,
    build() {
      const { b, x } = start({ opset: 15 });
      const bad = b.add(b.conv(x, C, C, [3, 3], { bn: { trainingMode: true } }), b.conv(x, C, C, [1, 1], { bn: true }));
      return { bytes: withGood(b, bad), badNodes: ['BatchNormalization_0'] };
    },
  },
  'BN that uses its running-statistics outputs': {
    reason: /BatchNormalization 'BatchNormalization_0' uses its running-statistics outputs/,
    runnable: false,
    build() {
      const { b, x } = start({ opset: 15 });
      const bad = b.add(b.conv(x, C, C, [3, 3], { bn: { statsOutputs: true } }), b.conv(x, C, C, [1, 1], { bn: true }));
      b.output(b.nodes.find((n) => n.opType === 'BatchNormalization')!.output![1]);
      return { bytes: withGood(b, bad), badNodes: ['BatchNormalization_0'] };
    },
  },
  'identity with stride 2 (1×1 spatial input, so the model is valid)': {
    reason: /an identity branch cannot join convolutions with stride 2×2/,
    runnable: true,
    build() {
      // One Sum node: an Add tree would let the two-conv subtree fuse on its own.
      const { b, x } = start({ h: 1 });
      const bad = b.op('Sum', [b.conv(x, C, C, [3, 3], { stride: 2, bn: true }), b.conv(x, C, C, [1, 1], { stride: 2, bn: true }), x], { name: 'Add_0' });
      return { bytes: withGood(b, bad), badNodes: ['BatchNormalization_0', 'BatchNormalization_1'] };
    },
  },
  'identity with in ≠ out channels (1-channel x broadcast over 4)': {
    regionFuses: true,
    reason: /an identity branch needs as many input as output channels \(in 1, out 4\)/,
    runnable: true,
    build() {
      const { b, x } = start({ c: 1 });
      const bad = b.op('Sum', [b.conv(x, C, 1, [3, 3], { bn: true }), b.conv(x, C, 1, [1, 1], { bn: true }), x], { name: 'Add_0' });
      return { bytes: withGood(b, bad), badNodes: ['BatchNormalization_0'] };
    },
  },
  'groups differ': {
    reason: /branches have different groups \(2 in Conv 'Conv_0', 1 in Conv 'Conv_1'\)/,
    runnable: true,
    build() {
      const { b, x } = start();
      const bad = b.add(b.conv(x, C, C, [3, 3], { groups: 2, bn: true }), b.conv(x, C, C, [1, 1], { bn: true }));
      return { bytes: withGood(b, bad), badNodes: ['BatchNormalization_0'] };
    },
  },
  'strides differ (1×1 spatial input)': {
    reason: /branches have different strides \(2×2 in Conv 'Conv_0', 1×1 in Conv 'Conv_1'\)/,
    runnable: true,
    build() {
      const { b, x } = start({ h: 1 });
      const bad = b.add(b.conv(x, C, C, [3, 3], { stride: 2, bn: true }), b.conv(x, C, C, [1, 1], { bn: true }));
      return { bytes: withGood(b, bad), badNodes: ['BatchNormalization_0'] };
    },
  },
  'channel counts differ (4 and a broadcast 1)': {
    regionFuses: true,
    reason: /branches have different channel counts/,
    runnable: true,
    build() {
      const { b, x } = start();
      const bad = b.add(b.conv(x, C, C, [3, 3], { bn: true }), b.conv(x, 1, C, [1, 1], { bias: true }));
      return { bytes: withGood(b, bad), badNodes: ['BatchNormalization_0', 'Conv_1'] };
    },
  },
  'non-float (int8) weights': {
    reason: /weight of Conv 'Conv_0' is int8; only float weights can be fused/,
    runnable: false,
    build() {
      const { b, x } = start();
      const bad = b.add(b.conv(x, C, C, [3, 3], { weightDtype: 'int8', scale: 50 }), b.conv(x, C, C, [1, 1], { bias: true }));
      return { bytes: withGood(b, bad), badNodes: ['Conv_0'] };
    },
  },
  'weight types differ (float16 and float32)': {
    reason: /branches have different weight types \(float16 and float32\)/,
    runnable: false,
    build() {
      const { b, x } = start();
      const bad = b.add(b.conv(x, C, C, [3, 3], { weightDtype: 'float16', bias: true }), b.conv(x, C, C, [1, 1], { bias: true }));
      return { bytes: withGood(b, bad), badNodes: ['Conv_0'] };
    },
  },
  'kernel_shape disagrees with the weight': {
    reason: /declares kernel_shape 1×1 but its weight is 3×3/,
    runnable: false,
    build() {
      const { b, x } = start();
      const bad = b.add(b.conv(x, C, C, [3, 3], { kernelShape: [1, 1], bias: true }), b.conv(x, C, C, [1, 1], { bias: true }));
      return { bytes: withGood(b, bad), badNodes: ['Conv_0'] };
    },
  },
  'bias computed at run time': {
    regionFuses: true,
    reason: /bias of Conv 'Conv_0' is computed at run time, not a constant/,
    runnable: true,
    build() {
      const { b, x } = start();
      const bias = b.op('Neg', [b.randInit('bias', [C])]);
      const c3 = b.conv(x, C, C, [3, 3]);
      b.last.node.input!.push(bias);
      const bad = b.add(c3, b.conv(x, C, C, [1, 1], { bias: true }));
      return { bytes: withGood(b, bad), badNodes: ['Conv_0'] };
    },
  },
  'a scaled branch whose BN output is also a graph output': {
    reason: /output of BatchNormalization 'BatchNormalization_1' is also used by a graph output/,
    runnable: true,
    build() {
      const { b, x } = start();
      const c3 = b.conv(x, C, C, [3, 3], { bn: true });
      const c1 = b.conv(x, C, C, [1, 1], { bn: true });
      b.output(c1);
      const bad = b.add(c3, b.mul(c1, b.init('alpha', [], [0.5])));
      return { bytes: withGood(b, bad), badNodes: ['BatchNormalization_0', 'Mul_0'] };
    },
  },
  'weight of rank 2': {
    reason: /weight of Conv 'Conv_0' has shape 4×4; expected \[out, in\/groups, \.\.\.kernel\]/,
    runnable: false,
    build() {
      const { b, x } = start();
      const bad = b.add(b.conv(x, C, C, [3, 3], { weight: b.randInit('w2d', [C, C]), kernelShape: false, bias: true }), b.conv(x, C, C, [1, 1], { bias: true }));
      return { bytes: withGood(b, bad), badNodes: ['Conv_0'] };
    },
  },
  'unknown auto_pad': {
    reason: /Conv 'Conv_0' has unknown auto_pad 'FOO'/,
    runnable: false,
    build() {
      const { b, x } = start();
      const bad = b.add(b.conv(x, C, C, [3, 3], { autoPad: 'FOO', bias: true }), b.conv(x, C, C, [1, 1], { bias: true }));
      return { bytes: withGood(b, bad), badNodes: ['Conv_0'] };
    },
  },
  'BN with 4 inputs': {
    reason: /BatchNormalization 'BatchNormalization_0' has 4 inputs; expected 5/,
    runnable: false,
    build() {
      const { b, x } = start();
      const c3 = b.conv(x, C, C, [3, 3], { bn: true });
      b.nodes[b.nodes.length - 1].input!.pop();
      const bad = b.add(c3, b.conv(x, C, C, [1, 1], { bias: true }));
      return { bytes: withGood(b, bad), badNodes: ['BatchNormalization_0'] };
    },
  },
  'BN with more channels than its conv': {
    reason: /BatchNormalization 'BatchNormalization_0' has 5 channels, the branch has 4/,
    runnable: false,
    build() {
      const { b, x } = start();
      const c3 = b.bn(b.conv(x, C, C, [3, 3]), C + 1);
      const bad = b.add(c3, b.conv(x, C, C, [1, 1], { bias: true }));
      return { bytes: withGood(b, bad), badNodes: ['BatchNormalization_0'] };
    },
  },
  'integer Mul factor': {
    reason: /factor of Mul 'Mul_0' is int64, not a float/,
    runnable: false,
    build() {
      const { b, x } = start();
      const bad = b.add(b.conv(x, C, C, [3, 3], { bias: true }), b.mul(b.conv(x, C, C, [1, 1], { bias: true }), b.init('k', [], [2], { dtype: 'int64' })));
      return { bytes: withGood(b, bad), badNodes: ['Mul_0'] };
    },
  },
  'per-channel Mul factor of the wrong shape ([1,1,1,4] scales W, not C)': {
    reason: /factor of Mul 'Mul_0' has shape 1×1×1×4; only a scalar or a per-channel factor can be folded/,
    runnable: true,
    build() {
      const { b, x } = start({ h: 6, w: C });
      const alpha = b.init('alpha', [1, 1, 1, C], (i) => 0.5 + i);
      const bad = b.add(b.conv(x, C, C, [3, 3], { bn: true }), b.mul(b.conv(x, C, C, [1, 1], { bn: true }), alpha));
      return { bytes: withGood(b, bad), badNodes: ['Mul_0'] };
    },
  },
  'Mul factor of a 1-D [C] shape (broadcasts over W)': {
    reason: /factor of Mul 'Mul_0' has shape 4; only a scalar or a per-channel factor can be folded/,
    runnable: true,
    build() {
      const { b, x } = start({ h: 6, w: C });
      const alpha = b.init('alpha', [C], (i) => 0.5 + i);
      const bad = b.add(b.conv(x, C, C, [3, 3], { bn: true }), b.mul(alpha, b.conv(x, C, C, [1, 1], { bn: true })));
      return { bytes: withGood(b, bad), badNodes: ['Mul_0'] };
    },
  },
};

describe('rejected candidates are reported and left alone', () => {
  for (const [label, c] of Object.entries(cases)) {
    it(label, async () => {
      const { bytes, badNodes } = c.build();
      const r = inspectBytes(dir, bytes);
      if (c.regionFuses) {
        // Exactly one convolution after all: fused as a linear region, proven in onnxruntime.
        assert.equal(r.rejected.length, 0, JSON.stringify(r.rejected));
        assert.equal(r.blocks.length, 2);
        assert.ok(r.blocks.some((b) => b.name === 'good'));
        await fuseAndValidate(bytes, { dir, expectBlocks: 2 });
        return;
      }
      assert.equal(r.blocks.length, 1, `only the good block is found: ${r.blocks.map((b) => b.name)}`);
      assert.equal(r.blocks[0].name, 'good');
      assert.equal(r.rejected.length, 1, JSON.stringify(r.rejected));
      const rej = r.rejected[0];
      assert.match(rej.reason, c.reason);
      for (const n of ['Add_0', ...badNodes]) assert.ok(rej.parts.includes(n), `parts ${JSON.stringify(rej.parts)} include ${n}`);
      assert.ok(rej.name.length > 0);
      if (!c.runnable) return;
      const f = await fuseAndValidate(bytes, { dir, expectBlocks: 1 });
      // The rejected candidate's Add is still there (its Conv→BN pairs may have been folded).
      assert.ok(f.out.nodes.some((m) => m.name === 'Add_0' && /^(Add|Sum)$/.test(m.opType)), 'Add_0 is kept');
      assert.equal((f.out.opCounts.Add ?? 0) + (f.out.opCounts.Sum ?? 0), (f.original.opCounts.Add ?? 0) + (f.original.opCounts.Sum ?? 0) - 2, 'only the good block’s Adds are gone');
    });
  }
});

describe('accepted geometry variants', () => {
  const variants: [string, (b: ModelBuilder, x: string) => string][] = [
    ['auto_pad SAME_UPPER with stride 1', (b, x) => b.conv(x, C, C, [3, 3], { autoPad: 'SAME_UPPER', bias: true })],
    ['auto_pad SAME_LOWER with stride 1', (b, x) => b.conv(x, C, C, [3, 3], { autoPad: 'SAME_LOWER', bias: true })],
    ['no kernel_shape attribute', (b, x) => b.conv(x, C, C, [3, 3], { kernelShape: false, bias: true })],
  ];
  for (const [label, make] of variants) {
    it(label, async () => {
      const { b, x } = start();
      const y = b.add(b.add(make(b, x), b.conv(x, C, C, [1, 1], { autoPad: 'VALID', bias: true })), x);
      b.output(b.relu(y));
      const f = await fuseAndValidate(b.encode(), { dir, expectBlocks: 1, expectOps: { Conv: 1, Add: 0 } });
      assert.equal(f.report.inspect.rejected.length, 0);
    });
  }
});

describe('one rejected candidate, one entry', () => {
  it('a 3-branch RepVGG tree whose dense conv is dilated is reported once, not once per Add', () => {
    const { b, x } = start();
    const y = b.add(b.add(b.conv(x, C, C, [3, 3], { dilation: 2, pads: [2, 2, 2, 2], bn: true }), b.conv(x, C, C, [1, 1], { bn: true })), b.bn(x, C));
    b.output(b.relu(y));
    const r = inspectBytes(dir, b.encode());
    assert.equal(r.blocks.length, 0);
    assert.ok(r.rejected.length >= 1);
    assert.match(r.rejected[0].reason, /dilation 2×2/);
    assert.equal(r.rejected.length, 1, `the same candidate is listed ${r.rejected.length} times: ${JSON.stringify(r.rejected.map((x) => [x.name, x.parts]))}`);
  });
});

describe('constant leaves and factors that broadcast the sum to a higher rank', () => {
  // A [1,1,1,1,1] factor or zero is numerically a scalar but makes the block's output rank 5.
  // Dropping it changes the model's output shape, so it must not be folded away.
  for (const which of ['scalar Mul factor of shape [1,1,1,1,1]', 'zero leaf of shape [1,1,1,1,1]']) {
    it(`${which}: not fused, or fused with the same output shape`, async () => {
      const { b, x } = start();
      const c3 = b.conv(x, C, C, [3, 3], { bn: true });
      const c1 = b.conv(x, C, C, [1, 1], { bn: true });
      const y = which.startsWith('scalar')
        ? b.add(c3, b.mul(c1, b.init('alpha', [1, 1, 1, 1, 1], [0.5])))
        : b.add(b.add(b.init('zero', [1, 1, 1, 1, 1], [0]), c3), c1);
      b.output(b.relu(y));
      const bytes = b.encode();
      const r = inspectBytes(dir, bytes);
      if (r.blocks.length === 0) return;
      const report = await fuse(writeModel(dir, bytes), { ...defaultFuseOptions }).catch((err: Error) => assert.fail(`fused block ${r.blocks[0].name}, then: ${err.message}`));
      assert.equal(report.validation?.passed, true);
    });
  }
});

describe('partial fusion of an Add tree', () => {
  it('(conv3×3 s2 + conv1×1 s2) + x: the identity cannot join, the two-conv subtree still fuses', async () => {
    const { b, x } = start({ h: 1 });
    const y = b.add(b.add(b.conv(x, C, C, [3, 3], { stride: 2, bn: true }), b.conv(x, C, C, [1, 1], { stride: 2, bn: true })), x);
    b.output(b.relu(y));
    const f = await fuseAndValidate(b.encode(), { dir, expectBlocks: 1, expectOps: { Conv: 1, Add: 1, BatchNormalization: 0 } });
    assert.deepEqual(f.report.inspect.rejected, []);
    assert.deepEqual(f.report.inspect.blocks[0].branches.map((br) => br.kind), ['conv_bn', 'conv_bn']);
  });

  it('rep(x) + conv(z): the block of x fuses inside a tree that mixes inputs', async () => {
    const { b, x } = start();
    const z = b.input('z', [1, C, H, H]);
    const rep = b.add(b.conv(x, C, C, [3, 3], { bn: true }), b.conv(x, C, C, [1, 1], { bn: true }));
    const y = b.add(rep, b.conv(z, C, C, [1, 1], { bias: true }));
    b.output(b.relu(y));
    const f = await fuseAndValidate(b.encode(), { dir, expectBlocks: 1, expectOps: { Conv: 2, Add: 1 } });
    assert.deepEqual(f.report.inspect.rejected, []);
  });
});

describe('residual connections', () => {
  it('x + conv(relu(conv(x))) is not a candidate: not rejected, counted in the notes', async () => {
    const { b, x } = start();
    const inner = b.conv(b.relu(b.conv(x, C, C, [3, 3], { bn: true })), C, C, [3, 3], { bn: true });
    const y = b.add(x, inner);
    b.output(b.relu(y));
    const r = inspectBytes(dir, b.encode());
    assert.equal(r.blocks.length, 0);
    assert.deepEqual(r.rejected, []);
    assert.ok(r.model.notes.some((n) => /^1 residual Add \(one branch plus a shortcut\)/.test(n)), JSON.stringify(r.model.notes));
    assert.equal(r.folds.length, 2, 'the two Conv→BN pairs are still folded');
  });

  it('a + conv(relu(conv(relu(a)))) with a = conv(x): two conv-like leaves in sequence, still a residual', () => {
    const { b, x } = start();
    const a = b.conv(x, C, C, [3, 3], { bias: true });
    const c = b.conv(b.relu(b.conv(b.relu(a), C, C, [3, 3], { bias: true })), C, C, [3, 3], { bias: true });
    b.output(b.relu(b.add(a, c)));
    const r = inspectBytes(dir, b.encode());
    assert.equal(r.blocks.length, 0);
    assert.deepEqual(r.rejected, []);
    assert.ok(r.model.notes.some((n) => /^1 residual Add /.test(n)), JSON.stringify(r.model.notes));
  });

  it('two residuals are counted as 2', () => {
    const { b, x } = start();
    const r1 = b.add(x, b.conv(b.relu(b.conv(x, C, C, [3, 3], { bias: true })), C, C, [3, 3], { bias: true }));
    const r2 = b.add(r1, b.conv(b.relu(b.conv(r1, C, C, [3, 3], { bias: true })), C, C, [3, 3], { bias: true }));
    b.output(r2);
    const r = inspectBytes(dir, b.encode());
    assert.ok(r.model.notes.some((n) => /^2 residual Adds /.test(n)), JSON.stringify(r.model.notes));
  });

  it('a block whose output feeds a residual Add is fused and the residual kept', async () => {
    const { b, x } = start();
    const blk = b.add(b.add(b.conv(x, C, C, [3, 3], { bn: true }), b.conv(x, C, C, [1, 1], { bn: true })), b.bn(x, C));
    const y = b.add(b.conv(b.relu(blk), C, C, [3, 3], { bias: true }), blk);
    b.output(y);
    const f = await fuseAndValidate(b.encode(), { dir, expectBlocks: 1, expectOps: { Add: 1, Conv: 2 } });
    assert.ok(f.report.inspect.model.notes.some((n) => /^1 residual Add /.test(n)));
  });
});

describe('standalone Conv→BatchNormalization folding', () => {
  const convBn = (opts: { dilation?: number; pads?: number[]; k?: number; alsoOutput?: boolean } = {}) => {
    const { b, x } = start();
    const k = opts.k ?? 3;
    const y = b.conv(x, 8, C, [k, k], { bn: { eps: 1e-3 }, dilation: opts.dilation, pads: opts.pads, name: '/stem/conv/Conv' });
    if (opts.alsoOutput) b.output(b.last.convOut);
    b.output(b.relu(y, '/stem/act/Relu'));
    return b.encode();
  };

  it('is folded by default', async () => {
    const f = await fuseAndValidate(convBn(), { dir, expectBlocks: 0, expectOps: { Conv: 1, BatchNormalization: 0, Relu: 1 } });
    assert.equal(f.report.bnFolded, 1);
    const fold = f.report.inspect.folds[0];
    assert.equal(fold.name, 'stem.conv');
    assert.equal(fold.conv, '/stem/conv/Conv');
    assert.ok(Math.abs(fold.epsilon - 1e-3) < 1e-9);
    const conv = f.out.nodes.find((n) => n.opType === 'Conv')!;
    assert.equal(conv.name, '/stem/conv/Conv', 'the folded Conv keeps its name');
    assert.equal(conv.outputs[0], f.original.nodes.find((n) => n.opType === 'BatchNormalization')!.outputs[0], 'and produces the BN output');
    assert.equal(f.out.initializers.get(conv.inputs[2])!.dims[0], 8, 'with a bias');
  });

  it('is not folded with foldBN: false (nothing to fuse, nothing written)', async () => {
    const file = writeModel(dir, convBn());
    const r = await fuse(file, { ...defaultFuseOptions, foldBN: false });
    assert.equal(r.output, null);
    assert.equal(r.bnFolded, 0);
    assert.equal(r.validationSkipped, 'nothing to fuse');
    assert.equal(r.inspect.folds.length, 0);
    assert.equal(r.inspect.notFolded.length, 0);
    assert.ok(!fs.existsSync(file.replace(/\.onnx$/, '.fused.onnx')));
  });

  it('a Conv whose output is also used elsewhere is listed in notFolded', () => {
    const r = inspectBytes(dir, convBn({ alsoOutput: true }));
    assert.equal(r.folds.length, 0);
    assert.equal(r.notFolded.length, 1);
    assert.equal(r.notFolded[0].name, 'stem.conv');
    assert.match(r.notFolded[0].reason, /output of Conv '\/stem\/conv\/Conv' is also used by a graph output/);
  });

  // Folding scales each output channel of the weight; the Conv keeps its own attributes, so its
  // geometry (dilation, pads, even kernels) does not matter. detect.ts says so in a comment
  // ("Geometry limits (pads, dilation) do not matter for a single conv") but runs the block
  // geometry checks on folds too.
  const geometries: [string, { dilation?: number; pads?: number[]; k?: number }][] = [
    ['dilation 2', { dilation: 2, pads: [2, 2, 2, 2] }],
    ['asymmetric pads', { pads: [0, 0, 2, 2] }],
    ['an even 2×2 kernel', { k: 2, pads: [0, 0, 1, 1] }],
  ];
  it('a Conv with dilation 2, asymmetric pads or an even kernel is still folded (exact for any geometry)', async () => {
    const missed: string[] = [];
    for (const [label, o] of geometries) {
      const bytes = convBn(o);
      const r = inspectBytes(dir, bytes);
      if (r.folds.length !== 1) {
        missed.push(`${label}: ${r.notFolded.map((n) => n.reason).join('; ')}`);
        continue;
      }
      await fuseAndValidate(bytes, { dir, expectOps: { BatchNormalization: 0, Conv: 1 } });
    }
    assert.deepEqual(missed, []);
  });

  it('a bias computed at run time keeps a Conv→BN pair apart', () => {
    const { b, x } = start();
    const bias = b.op('Neg', [b.randInit('bias', [8])]);
    const y = b.bn(b.op('Conv', [x, b.randInit('w', [8, C, 3, 3], -0.3, 0.3), bias], { attrs: [] }), 8);
    b.output(y);
    const r = inspectBytes(dir, b.encode());
    assert.equal(r.folds.length, 0);
    assert.match(r.notFolded[0].reason, /bias of Conv 'Conv_0' is computed at run time/);
  });
});

describe('block names', () => {
  const named = (names: { dense: string; bnD: string; one: string; bnO: string; id: string; add1: string; add2: string } | 'none' | 'plain') => {
    const b = new ModelBuilder({ seed: 5, names: names === 'none' ? 'none' : 'plain' });
    const x = b.input('x', [1, C, H, H]);
    const n = typeof names === 'object' ? names : undefined;
    const d = b.conv(x, C, C, [3, 3], { bn: { name: n?.bnD }, name: n?.dense });
    const o = b.conv(x, C, C, [1, 1], { bn: { name: n?.bnO }, name: n?.one });
    const y = b.op('Add', [b.op('Add', [d, o], { name: n?.add1 }), b.bn(x, C, { name: n?.id })], { name: n?.add2, out: 'block_out' });
    b.output(b.relu(y));
    return b.encode();
  };

  it('YOLOv7 flat scopes: /model.102/rbr_dense/Conv → model.102', async () => {
    const bytes = named({
      dense: '/model.102/rbr_dense/Conv', bnD: '/model.102/rbr_dense/BatchNormalization',
      one: '/model.102/rbr_1x1/Conv', bnO: '/model.102/rbr_1x1/BatchNormalization',
      id: '/model.102/rbr_identity/BatchNormalization', add1: '/model.102/Add', add2: '/model.102/Add_1',
    });
    const f = await fuseAndValidate(bytes, { dir, expectBlocks: 1 });
    const blk = f.report.inspect.blocks[0];
    assert.equal(blk.name, 'model.102');
    assert.equal(blk.family, 'RepVGG');
    assert.equal(f.report.validation!.blocks[0].block, 'model.102');
    const conv = f.out.nodes.find((n) => n.opType === 'Conv')!;
    assert.equal(conv.name, 'model.102/fused/Conv');
    assert.deepEqual(conv.inputs.slice(1), ['model.102.fused.weight', 'model.102.fused.bias']);
  });

  it('nested torch scopes: /model/model.1/rbr_dense/rbr_dense.0/Conv → model.1', () => {
    const r = inspectBytes(dir, named({
      dense: '/model/model.1/rbr_dense/rbr_dense.0/Conv', bnD: '/model/model.1/rbr_dense/rbr_dense.1/BatchNormalization',
      one: '/model/model.1/rbr_1x1/rbr_1x1.0/Conv', bnO: '/model/model.1/rbr_1x1/rbr_1x1.1/BatchNormalization',
      id: '/model/model.1/rbr_identity/BatchNormalization', add1: '/model/model.1/Add', add2: '/model/model.1/Add_1',
    }));
    assert.equal(r.blocks[0].name, 'model.1');
    assert.equal(r.blocks[0].family, 'YOLOv7 RepConv');
  });

  it('deeper nesting: /features/features.0/features.0.2/… → features.0.2', () => {
    const s = '/features/features.0/features.0.2';
    const r = inspectBytes(dir, named({
      dense: `${s}/conv/Conv`, bnD: `${s}/conv/BatchNormalization`, one: `${s}/conv1/Conv`, bnO: `${s}/conv1/BatchNormalization`,
      id: `${s}/bn/BatchNormalization`, add1: `${s}/Add`, add2: `${s}/Add_1`,
    }));
    assert.equal(r.blocks[0].name, 'features.0.2');
  });

  it('no scopes (empty node names): the output tensor name', async () => {
    const f = await fuseAndValidate(named('none'), { dir, expectBlocks: 1 });
    assert.equal(f.report.inspect.blocks[0].name, 'block_out');
    const conv = f.out.nodes.find((n) => n.opType === 'Conv')!;
    assert.equal(conv.outputs[0], 'block_out');
    assert.equal(conv.inputs[1], 'block_out.fused.weight');
  });

  it('plain names without "/" scopes: the output tensor name', () => {
    const r: InspectReport = inspectBytes(dir, named('plain'));
    assert.equal(r.blocks[0].name, 'block_out');
  });

  it('fused tensor names never collide with existing ones', async () => {
    const b = new ModelBuilder({ seed: 5, names: 'none' });
    const x = b.input('x', [1, C, H, H]);
    const y = b.op('Add', [b.conv(x, C, C, [3, 3], { bias: true }), b.conv(x, C, C, [1, 1], { bias: true })], { out: 'blk' });
    // An unrelated initializer already uses the name the fused weight would get.
    const taken = b.init('blk.fused.weight', [1], [2], { exact: true });
    b.output(b.mul(b.relu(y), taken));
    const f = await fuseAndValidate(b.encode(), { dir, expectBlocks: 1 });
    const conv = f.out.nodes.find((n) => n.opType === 'Conv')!;
    assert.notEqual(conv.inputs[1], 'blk.fused.weight');
    assert.deepEqual(f.out.initializers.get('blk.fused.weight')!.dims, [1]);
  });
});

describe('parameters that make exact fusion impossible', () => {
  const build = (variance: number) => {
    const b = new ModelBuilder({ seed: 2 });
    const x = b.input('x', [1, C, H, H]);
    const y = b.add(b.conv(x, C, C, [3, 3], { bn: true }), b.conv(x, C, C, [1, 1], { bn: { eps: 1e-5 } }));
    const varName = b.initializers[b.initializers.length - 1].name!;
    const t = b.initializers.find((i) => i.name === varName)!;
    const v = new Float32Array(t.rawData!.buffer.slice(t.rawData!.byteOffset, t.rawData!.byteOffset + t.rawData!.length));
    v[2] = variance;
    t.rawData = new Uint8Array(v.buffer);
    b.output(b.relu(y));
    return b.encode();
  };

  for (const [label, variance, re] of [
    ['negative running variance', -1, /BN channel 2 has running variance -1 \+ eps .* ≤ 0/],
    ['NaN running variance', NaN, /BN channel 2 has running variance NaN/],
  ] as const) {
    it(`${label}: FusionError, no output and no temp file left`, async () => {
      const file = writeModel(dir, build(variance), 'badvar');
      const r = inspectBytes(dir, build(variance));
      assert.equal(r.blocks.length, 1, 'detection does not read the statistics');
      const before = new Set(fs.readdirSync(dir));
      await assert.rejects(fuse(file, { ...defaultFuseOptions }), (err: unknown) => {
        assert.ok(err instanceof FusionError, String(err));
        assert.ok(err instanceof RepFuseError);
        assert.match(err.message, re);
        return true;
      });
      const left = fs.readdirSync(dir).filter((f) => !before.has(f));
      assert.deepEqual(left, [], 'no output, no .tmp file');
    });
  }
});
