// Branch statistics of ONNX linear regions (src/core/onnx/regionstats.ts): each term of a region's
// last sum with its exact contribution to the fused kernel, on exports of the official models
// (DBB, FastViT RepMixer, YOLOv6 QARepVGGBlockV2, UniRepLKNet, RepLKNet, YOLOv7 IDetect), checked
// against the fused kernel itself and, independently, against the checkpoint path (the same
// block of the official state_dict through the checkpoint branch specs).
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { analyzeCheckpoint, checkpointBlockData } from '../src/core/checkpoint';
import type { BlockData, BranchData } from '../src/core/model';
import { type Analysis, analyzeOnnx, onnxBlockData, openOnnx } from '../src/core/onnx';
import { withOnlyTerm } from '../src/core/onnx/regionstats';
import { regionTerms } from '../src/core/onnx/regionterms';
import { blockStats, bnScale } from '../src/core/stats';
import { ModelWorkerClient } from '../src/extension/worker/client';
import type { InspectOptions } from '../src/extension/view/settings';
import { attrInt, attrInts, ModelBuilder } from './helpers/onnx-builder';
import { repoRoot } from './helpers/paths';

const official = (...p: string[]) => path.join(repoRoot, 'test', 'fixtures', 'official', ...p);

const maxAbs = (a: ArrayLike<number>) => Array.from(a).reduce((m, v) => Math.max(m, Math.abs(v)), 0);
/** max |a − b| / max |b|. */
function rel(a: ArrayLike<number>, b: ArrayLike<number>): number {
  assert.equal(a.length, b.length);
  let d = 0;
  for (let i = 0; i < a.length; i++) d = Math.max(d, Math.abs(a[i] - b[i]));
  return d / Math.max(1e-300, maxAbs(b));
}

/** Σ_b C_b (weight and bias), then the post-add BN if there is one: must give the fused conv. */
function reconstruct(d: BlockData): { weight: Float64Array; bias: Float64Array } {
  const n = d.fused.weight.length;
  const cout = d.fused.shape[0];
  const per = n / cout;
  const weight = new Float64Array(n);
  const bias = new Float64Array(cout);
  for (const br of d.branches) {
    for (let i = 0; i < n; i++) weight[i] += br.contribution.weight[i];
    for (let o = 0; o < cout; o++) bias[o] += br.contribution.bias[o];
  }
  if (d.postBN) {
    const s = bnScale(d.postBN);
    for (let i = 0; i < n; i++) weight[i] *= s[Math.floor(i / per)];
    for (let o = 0; o < cout; o++) bias[o] = s[o] * (bias[o] - d.postBN.mean[o]) + d.postBN.beta[o];
  }
  return { weight, bias };
}

/** Asserts that the branches add up to the fused kernel and bias, and the statistics agree. */
function assertExact(d: BlockData, what: string): number {
  const r = reconstruct(d);
  const wErr = rel(r.weight, d.fused.weight);
  const bErr = rel(r.bias, d.fused.bias);
  assert.ok(wErr <= 1e-9, `${what}: Σ contributions vs fused kernel, relative ${wErr}`);
  assert.ok(bErr <= 1e-9, `${what}: Σ contributions vs fused bias, relative ${bErr}`);
  const st = blockStats(d);
  assert.ok(st.reconstructionError <= 1e-12, `${what}: reconstructionError ${st.reconstructionError}`);
  assert.ok(Math.abs(st.branches.reduce((a, b) => a + b.energyShare, 0) - 1) < 1e-12);
  assert.ok(Math.abs(st.branches.reduce((a, b) => a + b.projectionShare, 0) - 1) < 1e-9);
  return Math.max(wErr, bErr);
}

function withOnnx<T>(file: string, f: (a: Analysis) => T): T {
  const m = openOnnx(file);
  try {
    return f(analyzeOnnx(m, { foldBN: true }));
  } finally {
    m.close();
  }
}

const labels = (d: BlockData) => d.branches.map((b) => b.label);
const kinds = (d: BlockData) => d.branches.map((b) => b.kind);

/** The checkpoint branch matching an ONNX one: same label (kind, kernel, factor, sign); labels are unique in these blocks. */
function matchByLabel(onnx: BranchData[], ckpt: BranchData[], label: (b: BranchData) => string = (b) => b.label): [BranchData, BranchData][] {
  assert.equal(onnx.length, ckpt.length);
  return onnx.map((o) => {
    const c = ckpt.filter((x) => label(x) === label(o));
    assert.equal(c.length, 1, `one checkpoint branch labelled ${label(o)} (have ${ckpt.map(label).join(', ')})`);
    return [o, c[0]];
  });
}

const ckptCache = new Map<string, ReturnType<typeof analyzeCheckpoint>>();
function ckpt(family: string) {
  let a = ckptCache.get(family);
  if (!a) ckptCache.set(family, (a = analyzeCheckpoint(official(family, 'train_sd.pt'))));
  return a;
}
after(() => {
  for (const a of ckptCache.values()) a.close();
});

describe('DBB (DingXiaoH/DiverseBranchBlock): 1×1→avg and 1×1→k×k branches', () => {
  const expected: Record<string, string[]> = {
    stem: ['3×3 conv+bn', '1×1 conv+bn', '3×3 avg', '3×3 seq'],
    down: ['3×3 conv+bn', '1×1 conv+bn', '3×3 avg', '3×3 seq'],
    dw: ['3×3 conv+bn', '3×3 avg', '3×3 seq'],
    dw_s2: ['3×3 conv+bn', '3×3 avg', '3×3 seq'],
    g2k5: ['5×5 conv+bn', '1×1 conv+bn', '5×5 avg', '5×5 seq'],
    g4: ['3×3 conv+bn', '1×1 conv+bn', '3×3 avg', '3×3 seq'],
  };

  test('train_bn.onnx: every block split into its branches, each equal to the checkpoint path (train_sd.pt) within 1e-6', (t) => {
    withOnnx(official('dbb', 'train_bn.onnx'), (a) => {
      const regions = a.detection.blocks.filter((b) => b.region).map((b) => b.info.name);
      assert.deepEqual(regions.sort(), Object.keys(expected).sort());
      let worstSum = 0;
      let worstCkpt = 0;
      let worstShare = 0;
      for (const name of regions) {
        const d = onnxBlockData(a, name);
        assert.deepEqual(labels(d), expected[name], name);
        assert.deepEqual(kinds(d), expected[name].map((l) => (/avg/.test(l) ? 'avgpool' : /seq/.test(l) ? 'sequential' : 'conv_bn')));
        worstSum = Math.max(worstSum, assertExact(d, name));
        // Independent: the checkpoint path lowers the same modules through the branch specs.
        const c = checkpointBlockData(ckpt('dbb'), name);
        assert.deepEqual([...labels(c)].sort(), [...expected[name]].sort(), `${name}: the checkpoint path labels the branches alike`);
        const so = blockStats(d);
        const sc = blockStats(c);
        for (const [o, k] of matchByLabel(d.branches, c.branches)) {
          worstCkpt = Math.max(worstCkpt, rel(o.contribution.weight, k.contribution.weight), rel(o.contribution.bias, k.contribution.bias));
          assert.equal(o.kind, k.kind, `${name} ${o.label}: same kind`);
          const bo = so.branches.find((x) => x.label === o.label)!;
          const bc = sc.branches.find((x) => x.label === k.label)!;
          worstShare = Math.max(worstShare, Math.abs(bo.energyShare - bc.energyShare), Math.abs(bo.projectionShare - bc.projectionShare));
        }
      }
      t.diagnostic(`Σ branches vs fused: ${worstSum.toExponential(2)}; ONNX vs checkpoint contributions: ${worstCkpt.toExponential(2)} relative; shares within ${worstShare.toExponential(2)}`);
      assert.ok(worstCkpt <= 1e-6, `ONNX vs checkpoint contributions: ${worstCkpt}`);
      assert.ok(worstShare <= 1e-6);
    });
  });

  test('train.onnx (BN folded by the exporter): the same branches as plain convs, equal to the checkpoint path within 1e-6', (t) => {
    withOnnx(official('dbb', 'train.onnx'), (a) => {
      let worst = 0;
      for (const name of ['stem', 'dw_s2', 'g2k5']) {
        const d = onnxBlockData(a, name);
        assert.deepEqual(labels(d), expected[name].map((l) => l.replace('conv+bn', 'conv')), name);
        assertExact(d, name);
        const c = checkpointBlockData(ckpt('dbb'), name);
        for (const [o, k] of matchByLabel(d.branches, c.branches, (b) => b.label.replace('conv+bn', 'conv'))) worst = Math.max(worst, rel(o.contribution.weight, k.contribution.weight), rel(o.contribution.bias, k.contribution.bias));
      }
      t.diagnostic(`ONNX (exporter-folded float32) vs checkpoint contributions: ${worst.toExponential(2)} relative`);
      assert.ok(worst <= 1e-6, `${worst}`);
    });
  });

  test('the avg-pool branch: raw weights none, its own folded kernel 3×3, a 1×1 conv branch keeps its stored weight and BN', () => {
    withOnnx(official('dbb', 'train_bn.onnx'), (a) => {
      const d = onnxBlockData(a, 'dw');
      const st = blockStats(d);
      const avg = st.branches.find((b) => b.kind === 'avgpool')!;
      assert.equal(avg.raw, null);
      assert.deepEqual(avg.foldedShape, [16, 1, 3, 3]);
      assert.match(avg.description, /average pooling/);
      const origin = st.branches[0];
      assert.deepEqual(origin.shape, [16, 1, 3, 3]);
      assert.ok(origin.bn && origin.bn.gamma.length === 16);
      // The folded 3×3 kernel of a conv+BN branch is its contribution (nothing else on its path).
      assert.ok(rel(Float64Array.from(d.branches[0].folded!.values), d.branches[0].contribution.weight) === 0);
    });
  });

  test('one term alone: the region with the others replaced by zero is that branch (the zeroed tensors are never read)', () => {
    withOnnx(official('dbb', 'train.onnx'), (a) => {
      const b = a.detection.blocks.find((x) => x.info.name === 'stem')!;
      const rt = regionTerms(b.region!.x, b.region!.y, b.region!.data, a.detection.index);
      assert.equal(rt.terms.length, 4);
      assert.equal(rt.join!.opType, 'Add');
      const only = withOnlyTerm(b.region!, rt.terms, 2);
      const zeros = only.nodes.filter((n) => n.name.includes('#repfuse-zero-'));
      assert.equal(zeros.length, 3);
      // The original region is left as it was.
      assert.ok(!b.region!.nodes.some((n) => n.name.includes('#repfuse-zero-')));
    });
  });
});

describe('FastViT RepMixer (apple/ml-fastvit): x + ls·(mixer(x) − norm(x)) as five terms', () => {
  test('train.onnx: identity, ls·mixer branches, −ls·norm; shares equal the checkpoint path', (t) => {
    withOnnx(official('fastvit', 'train.onnx'), (a) => {
      const name = 'network.0.0.token_mixer';
      const d = onnxBlockData(a, name);
      assert.deepEqual(labels(d), ['x', '1×1 conv·α', 'bn(x)·α', '3×3 conv·α', '−bn(x)·α']);
      assert.deepEqual(kinds(d), ['identity', 'conv', 'bn_identity', 'conv', 'bn_identity']);
      assertExact(d, name);
      const c = checkpointBlockData(ckpt('fastvit'), name);
      let worst = 0;
      for (const [o, k] of matchByLabel(d.branches, c.branches, (b) => b.label.replace('conv+bn', 'conv'))) worst = Math.max(worst, rel(o.contribution.weight, k.contribution.weight));
      t.diagnostic(`ONNX vs checkpoint contributions: ${worst.toExponential(2)} relative`);
      assert.ok(worst <= 1e-6, `${worst}`);
    });
  });
});

describe('YOLOv6 QARepVGGBlockV2 (meituan/YOLOv6): avg-pool branch and a post-add BN', () => {
  test('train.onnx: dense, 1×1, identity and avg-pool terms; the post-add BN kept apart, as checkpoints do', () => {
    withOnnx(official('yolov6_qarepvggv2', 'train.onnx'), (a) => {
      const names = a.detection.blocks.filter((b) => b.region).map((b) => b.info.name);
      assert.ok(names.length >= 10);
      for (const name of names.slice(0, 3)) {
        const d = onnxBlockData(a, name);
        assert.deepEqual(labels(d), ['3×3 conv', '1×1 conv', 'x', '3×3 avg'], name);
        assert.ok(d.postBN, `${name}: post-add BN`);
        assert.ok(d.block.postBN);
        assertExact(d, name);
        const st = blockStats(d);
        assert.ok(st.postBN);
        assert.ok(st.branches[3].energyShare > 0.01 && st.branches[3].energyShare < 0.5);
      }
    });
  });
});

describe('Large and dilated kernels', () => {
  test('UniRepLKNet DilatedReparamBlock: dilated branches at their spread-out size, equal to the checkpoint path', (t) => {
    withOnnx(official('unireplknet', 'train.onnx'), (a) => {
      const want: Record<string, string[]> = { '0': ['5×5 conv', '3×3 conv', '5×5 dil'], '1': ['7×7 conv', '5×5 conv', '5×5 dil', '7×7 dil'] };
      let worst = 0;
      for (const [name, l] of Object.entries(want)) {
        const d = onnxBlockData(a, name);
        assert.deepEqual(labels(d), l);
        assert.deepEqual(kinds(d), l.map((x) => (/dil/.test(x) ? 'dilated' : 'conv')));
        assertExact(d, name);
        const c = checkpointBlockData(ckpt('unireplknet'), name);
        for (const [o, k] of matchByLabel(d.branches, c.branches, (b) => b.label.replace('conv+bn', 'conv'))) worst = Math.max(worst, rel(o.contribution.weight, k.contribution.weight));
      }
      t.diagnostic(`ONNX vs checkpoint contributions: ${worst.toExponential(2)} relative`);
      assert.ok(worst <= 1e-6, `${worst}`);
    });
  });

  test('RepLKNet ReparamLargeKernelConv (plain block): 31×31 and 5×5 branches, shares equal the checkpoint path', () => {
    withOnnx(official('replknet', 'train_bn.onnx'), (a) => {
      const name = a.report.blocks[0].name;
      const d = onnxBlockData(a, name);
      assert.deepEqual(labels(d), ['31×31 conv+bn', '5×5 conv+bn']);
      assertExact(d, name);
      const c = checkpointBlockData(ckpt('replknet'), 'stages.0.blocks.0.large_kernel');
      const so = blockStats(d);
      const sc = blockStats(c);
      for (let i = 0; i < 2; i++) assert.ok(Math.abs(so.branches[i].energyShare - sc.branches[i].energyShare) < 1e-6);
    });
  });
});

describe('a region that is no sum of branches', () => {
  test('YOLOv7 IDetect (ImplicitA → 1×1 conv → ImplicitM): one branch, the whole region, said so', () => {
    withOnnx(official('yolov7', 'train.onnx'), (a) => {
      const b = a.detection.blocks.find((x) => x.region && x.info.family === 'YOLOv7 IDetect')!;
      const d = onnxBlockData(a, b.info.name);
      assert.equal(d.branches.length, 1);
      assert.equal(d.branches[0].label, '1×1 conv·α (whole region)');
      assert.ok((d.block.assumptions ?? []).some((x) => /branches not split: the region does not end in a sum of branches/.test(x)));
      assert.deepEqual([...d.branches[0].contribution.weight], [...d.fused.weight]);
      assertExact(d, b.info.name);
    });
  });
});

describe('what the host sends the statistics webview (the real model worker)', () => {
  const script = path.join(repoRoot, 'dist', 'model-worker.js');
  const opts: InspectOptions = { foldBN: true, checkpoint: { defaultEpsilon: 'auto', outputDtype: 'keep' } };
  let client: ModelWorkerClient;
  before(() => {
    client = new ModelWorkerClient(script);
  });
  after(async () => {
    await client?.dispose();
  });
  test('blockStats of a DBB region: one row per branch with its kind, label, description and shares', { skip: fs.existsSync(script) ? false : 'dist/model-worker.js not built (node scripts/build.mjs)' }, async () => {
    const s = await client.request('blockStats', { file: official('dbb', 'train_bn.onnx'), block: 'stem', options: opts });
    assert.deepEqual(
      s.branches.map((b) => [b.kind, b.label]),
      [
        ['conv_bn', '3×3 conv+bn'],
        ['conv_bn', '1×1 conv+bn'],
        ['avgpool', '3×3 avg'],
        ['sequential', '3×3 seq'],
      ],
    );
    assert.ok(s.branches.every((b) => b.description.length > 0));
    assert.match(s.branches[3].description, /two convolutions in series/);
    assert.ok(s.reconstructionError <= 1e-12);
    assert.ok(Math.abs(s.branches.reduce((x, b) => x + b.energyShare, 0) - 1) < 1e-12);
    assert.ok(s.branches.every((b) => b.energyShare > 0));
    const json = JSON.stringify(s);
    assert.doesNotMatch(json, /NaN|Infinity/);
    assert.ok(json.length < 64_000, `${json.length} bytes`);
  });
});

describe('synthetic regions', () => {
  /** x → (3×3 conv, 3×3 avg-pool) → Add → [Mul by a per-channel constant] → [Add a per-channel constant] → ReLU. */
  function model(tail: 'scale' | 'constant'): Uint8Array {
    const C = 4;
    const b = new ModelBuilder({ seed: 11 });
    const x = b.input('x', [1, C, 12, 12]);
    const conv = b.conv(x, C, C, [3, 3], { pads: [1, 1, 1, 1], bias: true });
    const avg = b.op('AveragePool', [x], { attrs: [attrInts('kernel_shape', [3, 3]), attrInts('pads', [1, 1, 1, 1]), attrInt('count_include_pad', 1)] });
    let y = b.add(conv, avg);
    y = tail === 'scale' ? b.mul(y, b.randInit('s', [1, C, 1, 1], 0.5, 2)) : b.add(y, b.randInit('c', [1, C, 1, 1], 0.5, 2));
    b.output(b.relu(y));
    return b.encode();
  }
  for (const tail of ['scale', 'constant'] as const) {
    test(`a sum followed by a per-channel ${tail === 'scale' ? 'factor: two branches, the factor in each' : 'constant: one branch, since the constant belongs to no branch'}`, () => {
      const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'repfuse-regionstats-'));
      try {
        const file = path.join(dir, `${tail}.onnx`);
        fs.writeFileSync(file, model(tail));
        withOnnx(file, (a) => {
          const b = a.detection.blocks.find((x) => x.region);
          assert.ok(b, JSON.stringify(a.report.rejected));
          const d = onnxBlockData(a, b.info.name);
          if (tail === 'scale') {
            assert.deepEqual(labels(d), ['3×3 conv', '3×3 avg']);
            assertExact(d, tail);
          } else {
            assert.equal(d.branches.length, 1);
            assert.match(d.branches[0].label, /\(whole region\)$/);
            assert.ok((d.block.assumptions ?? []).some((x) => /a constant .* that belongs to no branch/.test(x)), JSON.stringify(d.block.assumptions));
            assertExact(d, tail);
          }
        });
      } finally {
        fs.rmSync(dir, { recursive: true, force: true });
      }
    });
  }
});
