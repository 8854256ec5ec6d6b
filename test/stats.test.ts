// src/core/stats.ts: the numbers the branch statistics view shows, on hand-checked tensors, on
// synthetic blocks built through the real fusion math, and on a real exported model.
import assert from 'node:assert/strict';
import * as path from 'node:path';
import { test } from 'node:test';
import { blockDataFromSpec } from '../src/core/blockdata';
import type { FuseSpec } from '../src/core/fusion';
import type { BlockInfo } from '../src/core/model';
import { analyzeOnnx, onnxBlockData, openOnnx } from '../src/core/onnx';
import { bnScale, blockStats, channelL2, foldedWeights, histogram, NEAR_ZERO_REL, spatialEnergy, tensorStats } from '../src/core/stats';
import { repoRoot } from './helpers/paths';

const close = (a: number | null, b: number, tol = 1e-12) => assert.ok(a !== null && Math.abs(a - b) <= tol * Math.max(1, Math.abs(b)), `${a} ≉ ${b}`);

test('tensorStats: min, max, mean, population std, mean |w|, L2', () => {
  const s = tensorStats([1, -2, 3, -4]);
  assert.equal(s.count, 4);
  assert.equal(s.min, -4);
  assert.equal(s.max, 3);
  close(s.mean, -0.5);
  close(s.std, Math.sqrt(((1.5 ** 2) + (1.5 ** 2) + (3.5 ** 2) + (3.5 ** 2)) / 4));
  close(s.meanAbs, 2.5);
  close(s.l2, Math.sqrt(30));
  assert.equal(s.nan + s.inf, 0);
});

test('tensorStats: near-zero share uses |w| < 1e-3 · max|w| of the same tensor', () => {
  const s = tensorStats([1000, 0.5, 0.9999, 1.0001, 0, -0.5]);
  assert.equal(s.nearZeroThreshold, NEAR_ZERO_REL * 1000);
  // 0.5, 0.9999, 0, -0.5 are below 1; 1.0001 is not.
  close(s.nearZeroShare, 4 / 6);
});

test('tensorStats: NaN and ±Inf are counted apart and never leak into the summary', () => {
  const s = tensorStats([NaN, Infinity, -Infinity, 2, 4]);
  assert.equal(s.nan, 1);
  assert.equal(s.inf, 2);
  assert.equal(s.min, 2);
  assert.equal(s.max, 4);
  close(s.mean, 3);
  const empty = tensorStats([NaN]);
  assert.equal(empty.min, null);
  assert.equal(empty.mean, null);
  assert.equal(empty.l2, 0);
  // JSON-safe: postMessage would turn NaN into null silently.
  assert.doesNotMatch(JSON.stringify(empty), /NaN|Infinity/);
});

test('histogram: bins cover [min, max], the maximum lands in the last bin, non-finite is skipped', () => {
  const h = histogram([0, 1, 2, 3, 4, NaN, Infinity], 4);
  assert.equal(h.lo, 0);
  assert.equal(h.hi, 4);
  assert.deepEqual(h.counts, [1, 1, 1, 2]);
  const c = histogram([5, 5, 5], 3);
  assert.ok(c.lo < 5 && c.hi > 5);
  assert.equal(c.counts.reduce((a, b) => a + b, 0), 3);
  const z = histogram([0, 0], 2);
  assert.deepEqual([z.lo, z.hi], [-0.5, 0.5]);
  assert.deepEqual(histogram([], 3).counts, [0, 0, 0]);
});

test('channelL2 and spatialEnergy on a [2, 1, 2, 2] kernel', () => {
  const w = [1, -1, 1, -1, 2, 0, 0, -2];
  assert.deepEqual(channelL2(w, 2), [2, Math.sqrt(8)]);
  const heat = spatialEnergy(w, [2, 1, 2, 2]);
  assert.deepEqual([heat.rows, heat.cols], [2, 2]);
  assert.deepEqual(heat.values, [3, 1, 1, 3]);
  // 1-D kernels are one row.
  const line = spatialEnergy([1, 2, 3], [1, 1, 3]);
  assert.deepEqual([line.rows, line.cols, line.values], [1, 3, [1, 2, 3]]);
});

test('bnScale is γ/√(σ²+ε), NaN where σ²+ε ≤ 0', () => {
  const s = bnScale({ gamma: [2, 1], variance: [3, -1], eps: 1 });
  close(s[0], 1);
  assert.ok(Number.isNaN(s[1]));
});

// A RepVGG-like block: 3×3 conv+BN, 1×1 conv+BN, identity BN; 2 channels, groups 1.
function repvggSpec(postBN = false): { info: BlockInfo; spec: FuseSpec } {
  const C = 2;
  const w3 = Array.from({ length: C * C * 9 }, (_, i) => Math.sin(i + 1) * 0.3);
  const w1 = [0.5, -0.25, 0.125, 1];
  const bn = (k: number) => ({ gamma: [1 + k, 0.5], beta: [0.1 * k, -0.2], mean: [0.05, -0.1 * k], variance: [0.9, 1.5 + k], eps: 1e-5 });
  const spec: FuseSpec = {
    name: 'test',
    outChannels: C,
    inPerGroup: C,
    groups: 1,
    kernel: [3, 3],
    terms: [
      { kind: 'conv', weight: w3, kernel: [3, 3], bn: bn(1) },
      { kind: 'conv', weight: w1, kernel: [1, 1], bn: bn(2) },
      { kind: 'identity', bn: bn(3) },
    ],
    postBN: postBN ? { gamma: [2, 0.5], beta: [0, 1], mean: [0.3, 0], variance: [4, 1], eps: 0 } : undefined,
  };
  const branch = (kind: 'conv_bn' | 'bn_identity', kernel?: number[]) => ({ kind, kernel, hasBias: false, hasBN: true, epsilon: 1e-5, params: 10, parts: [] });
  const info: BlockInfo = {
    name: 'stage1.0',
    family: 'RepVGG',
    kernel: [3, 3],
    stride: [1, 1],
    groups: 1,
    inChannels: C,
    outChannels: C,
    branches: [branch('conv_bn', [3, 3]), branch('conv_bn', [1, 1]), branch('bn_identity')],
    postBN: postBN ? { epsilon: 0 } : undefined,
    output: 'y',
    paramsBefore: 100,
    paramsAfter: 38,
  };
  return { info, spec };
}

test('blockStats: shares add up, the branches reproduce the fused kernel, identity sits at the centre', () => {
  const { info, spec } = repvggSpec();
  const st = blockStats(blockDataFromSpec(info, spec));
  assert.equal(st.branches.length, 3);
  close(st.branches.reduce((a, b) => a + b.energyShare, 0), 1, 1e-12);
  close(st.branches.reduce((a, b) => a + b.projectionShare, 0), 1, 1e-12);
  assert.ok(st.reconstructionError < 1e-12, `reconstruction ${st.reconstructionError}`);
  // The 1×1 and identity branches only touch the centre of the 3×3 kernel.
  for (const b of st.branches.slice(1)) b.heatmap.values.forEach((v, i) => (i === 4 ? assert.ok(v > 0) : assert.equal(v, 0)));
  // Identity: no raw weights; folded values are the BN scale per channel.
  const id = st.branches[2];
  assert.equal(id.raw, null);
  assert.equal(id.shape, null);
  assert.equal(id.folded.count, 2);
  const s = bnScale(spec.terms[2].bn!);
  close(id.folded.min, Math.min(s[0], s[1]));
  close(id.folded.max, Math.max(s[0], s[1]));
  // 1×1 branch: folded = raw · γ/√(σ²+ε) per output channel.
  const one = st.branches[1];
  assert.deepEqual(one.shape, [2, 2, 1, 1]);
  const s1 = bnScale(spec.terms[1].bn!);
  close(one.folded.max, Math.max(0.5 * s1[0], -0.25 * s1[0], 0.125 * s1[1], 1 * s1[1]));
  assert.ok(one.bn && one.bn.scale.length === 2);
  close(one.bn!.scale[0], s1[0]);
  // Per-channel L2 of the contributions: identity's is |scale|.
  close(id.foldedChannelL2[0], Math.abs(s[0]));
  // The fused heatmap's centre is the largest (all branches add there).
  assert.equal(st.fused.heatmap.values.indexOf(Math.max(...st.fused.heatmap.values)), 4);
  assert.doesNotMatch(JSON.stringify(st), /NaN|Infinity/);
});

test('blockStats: with a post-add BN, the decomposition still checks out', () => {
  const { info, spec } = repvggSpec(true);
  const st = blockStats(blockDataFromSpec(info, spec));
  assert.ok(st.postBN);
  close(st.postBN!.scale[0], 1);
  assert.ok(st.reconstructionError < 1e-12, `reconstruction ${st.reconstructionError}`);
  close(st.branches.reduce((a, b) => a + b.projectionShare, 0), 1, 1e-12);
});

test('foldedWeights applies a per-channel α (PP-YOLOE)', () => {
  const { info, spec } = repvggSpec();
  const data = blockDataFromSpec(info, { ...spec, terms: [{ kind: 'conv', weight: [1, 1, 1, 1], kernel: [1, 1], scale: [2, 3] }] });
  assert.deepEqual([...foldedWeights(data.branches[0], 2)], [2, 2, 3, 3]);
});

test('blockStats on a real export: examples/yolov7_repconv_tiny.onnx, block model.2', () => {
  const model = openOnnx(path.join(repoRoot, 'examples', 'yolov7_repconv_tiny.onnx'));
  try {
    const a = analyzeOnnx(model, { foldBN: true });
    const st = blockStats(onnxBlockData(a, 'model.2'));
    assert.deepEqual(
      st.branches.map((b) => b.label),
      ['3×3 conv', '1×1 conv', 'bn(x)'],
    );
    assert.deepEqual(st.fused.shape, [32, 32, 3, 3]);
    assert.ok(st.reconstructionError < 1e-12);
    close(st.branches.reduce((x, b) => x + b.energyShare, 0), 1, 1e-9);
    assert.equal(st.branches[0].raw!.count, 32 * 32 * 9);
    assert.equal(st.branches[0].raw!.nan, 0);
    close(st.branches[2].bn!.eps, 1e-3, 1e-6); // stored as float32
    // What is posted to the webview for one block stays small.
    assert.ok(JSON.stringify(st).length < 64_000);
  } finally {
    model.close();
  }
});
