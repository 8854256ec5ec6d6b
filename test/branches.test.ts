// The branch-kind lowerings (src/core/branches.ts) against a direct float64 evaluation of what each
// branch computes on a random input, borders included: avg-pool with count_include_pad, 1×1→k×k
// with the BN-valued padding DBB uses, k×k→1×1, dilated kernels, identity factors, grouped convs.
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { BRANCH_KINDS, type BranchKind, branchLabel, type BranchSpec, lowerBranch, type LowerContext } from '../src/core/branches';
import { type BNParams, bnScaleShift, fuseBlock } from '../src/core/fusion';
import { Rng } from '../src/core/random';

type Img = { c: number; h: number; w: number; v: Float64Array };

const gen = new Rng(1234);
const rng = () => gen.next();
const rand = (n: number, s = 1) => Float64Array.from({ length: n }, () => (rng() * 2 - 1) * s);
const bn = (c: number): BNParams => ({ gamma: rand(c).map((x) => 1 + 0.5 * x), beta: rand(c, 0.1), mean: rand(c, 0.1), variance: rand(c).map((x) => 1.25 + 0.75 * x), eps: 1e-5 });

/** Direct 2-D convolution: weight [cout, cin/g, kh, kw], zero padding `pad` unless `padValue` per input channel. */
function conv(x: Img, weight: ArrayLike<number>, cout: number, groups: number, k: [number, number], pad: number, stride = 1, dil = 1, bias?: ArrayLike<number>, padValue?: ArrayLike<number>): Img {
  const cpg = x.c / groups;
  const coutG = cout / groups;
  const ekh = (k[0] - 1) * dil + 1;
  const ekw = (k[1] - 1) * dil + 1;
  const h = Math.floor((x.h + 2 * pad - ekh) / stride) + 1;
  const w = Math.floor((x.w + 2 * pad - ekw) / stride) + 1;
  const out = new Float64Array(cout * h * w);
  for (let o = 0; o < cout; o++) {
    const g = Math.floor(o / coutG);
    for (let i = 0; i < h; i++) {
      for (let j = 0; j < w; j++) {
        let s = bias ? bias[o] : 0;
        for (let c = 0; c < cpg; c++) {
          const ci = g * cpg + c;
          for (let a = 0; a < k[0]; a++) {
            for (let b = 0; b < k[1]; b++) {
              const y = i * stride + a * dil - pad;
              const xx = j * stride + b * dil - pad;
              const inside = y >= 0 && y < x.h && xx >= 0 && xx < x.w;
              const v = inside ? x.v[(ci * x.h + y) * x.w + xx] : padValue ? padValue[ci] : 0;
              s += weight[((o * cpg + c) * k[0] + a) * k[1] + b] * v;
            }
          }
        }
        out[(o * h + i) * w + j] = s;
      }
    }
  }
  return { c: cout, h, w, v: out };
}

function applyBN(x: Img, p: BNParams): Img {
  const { scale, shift } = bnScaleShift(p, x.c, 'test');
  const v = x.v.map((val, i) => val * scale[Math.floor(i / (x.h * x.w))] + shift[Math.floor(i / (x.h * x.w))]);
  return { ...x, v };
}

/** Average pooling with count_include_pad=True (zeros in the padding count). */
function avgPool(x: Img, k: number, pad: number, stride = 1): Img {
  const w = new Float64Array(x.c * k * k).fill(1 / (k * k));
  return conv(x, w, x.c, x.c, [k, k], pad, stride);
}

/** The lowered (one-conv) form of a block of one branch, evaluated with centred zero padding. */
function viaLowering(x: Img, spec: BranchSpec, ctx: LowerContext, K: number, stride = 1): Img {
  const f = fuseBlock({ name: 'test', outChannels: ctx.outChannels, inPerGroup: ctx.inPerGroup, groups: ctx.groups, kernel: [K, K], terms: [lowerBranch(spec, ctx)] });
  return conv(x, f.weight, ctx.outChannels, ctx.groups, [K, K], (K - 1) / 2, stride, 1, f.bias);
}

function maxDiff(a: Img, b: Img): number {
  assert.deepEqual([a.c, a.h, a.w], [b.c, b.h, b.w]);
  let m = 0;
  for (let i = 0; i < a.v.length; i++) m = Math.max(m, Math.abs(a.v[i] - b.v[i]));
  return m;
}

const img = (c: number, h: number, w: number): Img => ({ c, h, w, v: rand(c * h * w) });

describe('branch lowerings equal the branch they stand for (float64, borders included)', () => {
  test('avg-pool 3×3 (count_include_pad) + BN → a 1/9 channel-diagonal kernel; grouped and strided', () => {
    for (const [c, groups, stride] of [[4, 1, 1], [6, 3, 1], [4, 4, 2]] as const) {
      const x = img(c, 7, 6);
      const p = bn(c);
      const ctx: LowerContext = { name: 't', outChannels: c, inPerGroup: c / groups, groups };
      const want = applyBN(avgPool(x, 3, 1, stride), p);
      const got = viaLowering(x, { kind: 'avgpool', pool: [3, 3], bn: p }, ctx, 3, stride);
      assert.ok(maxDiff(want, got) < 1e-12, `c ${c} g ${groups} s ${stride}: ${maxDiff(want, got)}`);
    }
  });

  test('sequential 1×1 → BN-pad → 3×3 → BN (DBB 1x1_kxk, BN-valued border) = one 3×3 conv; groups and wider inner width', () => {
    for (const [cin, mid, cout, groups] of [[4, 4, 6, 1], [4, 8, 4, 4], [8, 8, 8, 2]] as const) {
      const x = img(cin, 6, 7);
      const w1 = rand(mid * (cin / groups));
      const b1 = bn(mid);
      const w2 = rand(cout * (mid / groups) * 9);
      const b2 = bn(cout);
      // The reference: conv1 (no padding), BN, pad with BN(0) per channel, conv2 (no padding), BN.
      const y1 = applyBN(conv(x, w1, mid, groups, [1, 1], 0), b1);
      const padVal = bnScaleShift(b1, mid, 't').shift;
      const want = applyBN(conv(y1, w2, cout, groups, [3, 3], 1, 1, 1, undefined, padVal), b2);
      const ctx: LowerContext = { name: 't', outChannels: cout, inPerGroup: cin / groups, groups };
      const spec: BranchSpec = { kind: 'sequential', first: { weight: w1, kernel: [1, 1], bn: b1, outChannels: mid, groups }, second: { weight: w2, kernel: [3, 3], bn: b2, outChannels: cout, groups } };
      const got = viaLowering(x, spec, ctx, 3);
      assert.ok(maxDiff(want, got) < 1e-12, `${cin}→${mid}→${cout} g${groups}: ${maxDiff(want, got)}`);
    }
  });

  test('sequential 3×3 → 1×1 (with biases) = one 3×3 conv', () => {
    const x = img(3, 5, 5);
    const w1 = rand(5 * 3 * 9);
    const bias1 = rand(5);
    const w2 = rand(4 * 5);
    const bias2 = rand(4);
    const want = conv(conv(x, w1, 5, 1, [3, 3], 1, 1, 1, bias1), w2, 4, 1, [1, 1], 0, 1, 1, bias2);
    const spec: BranchSpec = { kind: 'sequential', first: { weight: w1, kernel: [3, 3], bias: bias1, outChannels: 5 }, second: { weight: w2, kernel: [1, 1], bias: bias2, outChannels: 4 } };
    const got = viaLowering(x, spec, { name: 't', outChannels: 4, inPerGroup: 3, groups: 1 }, 3);
    assert.ok(maxDiff(want, got) < 1e-12, String(maxDiff(want, got)));
  });

  test('two k×k convs in series are refused: not one kernel of the block size', () => {
    const spec: BranchSpec = { kind: 'sequential', first: { weight: rand(9), kernel: [3, 3], outChannels: 1 }, second: { weight: rand(9), kernel: [3, 3], outChannels: 1 } };
    assert.throws(() => lowerBranch(spec, { name: "block 'b'", outChannels: 1, inPerGroup: 1, groups: 1 }), /block 'b': a sequential branch of 3×3 then 3×3 is not one kernel/);
  });

  test('dilated 3×3, dilation 2 (+BN) = a 5×5 kernel with zeros between the taps', () => {
    const x = img(4, 8, 8);
    const w = rand(4 * 9);
    const p = bn(4);
    const want = applyBN(conv(x, w, 4, 4, [3, 3], 2, 1, 2), p);
    const got = viaLowering(x, { kind: 'dilated', weight: w, kernel: [3, 3], dilation: [2, 2], bn: p }, { name: 't', outChannels: 4, inPerGroup: 1, groups: 4 }, 5);
    assert.ok(maxDiff(want, got) < 1e-12, String(maxDiff(want, got)));
  });

  test('identity and bn(x) with a per-channel factor, subtracted (RepMixer: x + ls·(mixer − norm))', () => {
    const x = img(4, 5, 5);
    const ls = rand(4);
    const p = bn(4);
    const ctx: LowerContext = { name: 't', outChannels: 4, inPerGroup: 1, groups: 4 };
    const neg = Float64Array.from(ls, (v) => -v);
    const want = applyBN(x, p);
    want.v = want.v.map((v, i) => x.v[i] + neg[Math.floor(i / 25)] * v);
    const f = fuseBlock({ name: 't', outChannels: 4, inPerGroup: 1, groups: 4, kernel: [1, 1], terms: [lowerBranch({ kind: 'identity' }, ctx), lowerBranch({ kind: 'bn_identity', bn: p, scale: neg }, ctx)] });
    const got = conv(x, f.weight, 4, 4, [1, 1], 0, 1, 1, f.bias);
    assert.ok(maxDiff(want, got) < 1e-12, String(maxDiff(want, got)));
  });
});

test('every branch kind has a label, a long label and an icon; labels as the report shows them', () => {
  for (const k of Object.keys(BRANCH_KINDS) as BranchKind[]) {
    const d = BRANCH_KINDS[k];
    assert.ok(d.label && d.long && d.icon, k);
  }
  assert.equal(branchLabel({ kind: 'conv_bn', kernel: [3, 3] }), '3×3 conv+bn');
  assert.equal(branchLabel({ kind: 'bn_identity', kernel: [1, 1] }), 'bn(x)');
  assert.equal(branchLabel({ kind: 'avgpool', kernel: [3, 3] }), '3×3 avg');
  assert.equal(branchLabel({ kind: 'conv', kernel: [1, 1], scaled: true }), '1×1 conv·α');
  assert.equal(branchLabel({ kind: 'bn_identity', scaled: true, subtracted: true }), '−bn(x)·α');
});
