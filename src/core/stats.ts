// Statistics of one block's branches, computed from BlockData for the branch statistics view.
// Pure and JSON-safe: every number that can be undefined is null (never NaN or ±Infinity), so the
// summary crosses postMessage intact. Only summaries leave this module, never whole tensors.
import { branchLong } from './branches';
import type { BlockData, BlockInfo, BranchData, BranchKind } from './model';

type Num = ArrayLike<number>;

/** A weight counts as near zero when |w| < NEAR_ZERO_REL · max|w| of its own tensor. */
export const NEAR_ZERO_REL = 1e-3;
/** Histogram bins per tensor. */
export const HISTOGRAM_BINS = 48;

export interface TensorStats {
  /** Number of values, finite or not. */
  count: number;
  /** Over finite values only; null when there is none. */
  min: number | null;
  max: number | null;
  mean: number | null;
  /** Population standard deviation. */
  std: number | null;
  meanAbs: number | null;
  /** √Σw² over finite values. */
  l2: number;
  /** Share (0…1) of finite values with |w| < NEAR_ZERO_REL · max|w|. */
  nearZeroShare: number;
  /** The |w| threshold used for nearZeroShare. */
  nearZeroThreshold: number;
  nan: number;
  inf: number;
}

export interface Histogram {
  /** Range covered by the bins: bin i spans lo + i·(hi−lo)/bins … */
  lo: number;
  hi: number;
  counts: number[];
}

/** Σ|w| over output and input channels at each spatial position of a kernel, row-major. */
export interface Heatmap {
  rows: number;
  cols: number;
  values: number[];
}

export interface BNStats {
  gamma: number[];
  beta: number[];
  mean: number[];
  variance: number[];
  eps: number;
  /** γ / √(σ² + ε): the per-channel factor the BN folds into the conv. */
  scale: number[];
}

export interface BranchStats {
  label: string;
  kind: BranchKind;
  /** The kind in words (`average pooling (a 1/k² channel-diagonal kernel)`), for tooltips. */
  description: string;
  /** Shape of the raw weight as stored; null for identity branches. */
  shape: number[] | null;
  /** Parameters of the branch (weights, bias, BN, factor), as the reader counted them. */
  params: number;
  epsilon: number | null;
  hasBias: boolean;
  scaled: boolean;
  /** Raw stored weights; null for identity branches. */
  raw: TensorStats | null;
  rawHistogram: Histogram | null;
  rawChannelL2: number[] | null;
  /**
   * BN-folded weights at the branch's own kernel size (raw · γ/√(σ²+ε) · α); for identity
   * branches the diagonal of the identity kernel (the BN scale, or 1).
   */
  folded: TensorStats;
  foldedHistogram: Histogram;
  /** Shape of the folded weights; null for identity branches (their diagonal). */
  foldedShape: number[] | null;
  /** Per-output-channel L2 norm of the branch's contribution to the fused kernel. */
  foldedChannelL2: number[];
  /** Contribution of this branch to the fused bias. */
  foldedBias: TensorStats;
  bn: BNStats | null;
  /** Σ|W| of the contribution (padded to the fused kernel) at each spatial position. */
  heatmap: Heatmap;
  /** ‖C_b‖² of the branch's contribution C_b to the fused kernel. */
  energy: number;
  /** ‖C_b‖² / Σ_b ‖C_b‖²: the branch's share of the fused kernel's energy. */
  energyShare: number;
  /** ⟨C_b, S⟩ / ‖S‖² with S = Σ_b C_b: an exact decomposition (shares sum to 1, may be negative). */
  projectionShare: number;
}

export interface BlockStats {
  block: BlockInfo;
  branches: BranchStats[];
  postBN: BNStats | null;
  fused: {
    shape: number[];
    weight: TensorStats;
    bias: TensorStats;
    histogram: Histogram;
    channelL2: number[];
    heatmap: Heatmap;
    energy: number;
  };
  /** max |fused − postBN(Σ_b C_b)| over kernel entries: how exactly the branches add up (≈ 1e-16). */
  reconstructionError: number;
  nearZeroRel: number;
  histogramBins: number;
}

const finiteOrNull = (x: number): number | null => (Number.isFinite(x) ? x : null);

/** Summary statistics of a tensor (finite values; NaN and ±Inf are counted apart). */
export function tensorStats(values: Num, nearZeroRel = NEAR_ZERO_REL): TensorStats {
  const n = values.length;
  let finite = 0;
  let nan = 0;
  let inf = 0;
  let min = Infinity;
  let max = -Infinity;
  let mean = 0;
  let m2 = 0; // Welford: numerically stable variance.
  let sumAbs = 0;
  let sumSq = 0;
  let maxAbs = 0;
  for (let i = 0; i < n; i++) {
    const v = values[i];
    if (Number.isNaN(v)) {
      nan++;
      continue;
    }
    if (!Number.isFinite(v)) {
      inf++;
      continue;
    }
    finite++;
    if (v < min) min = v;
    if (v > max) max = v;
    const d = v - mean;
    mean += d / finite;
    m2 += d * (v - mean);
    const a = Math.abs(v);
    sumAbs += a;
    sumSq += v * v;
    if (a > maxAbs) maxAbs = a;
  }
  const threshold = nearZeroRel * maxAbs;
  let near = 0;
  if (finite) {
    for (let i = 0; i < n; i++) {
      const v = values[i];
      if (Number.isFinite(v) && Math.abs(v) < threshold) near++;
    }
  }
  return {
    count: n,
    min: finite ? min : null,
    max: finite ? max : null,
    mean: finite ? finiteOrNull(mean) : null,
    std: finite ? finiteOrNull(Math.sqrt(m2 / finite)) : null,
    meanAbs: finite ? finiteOrNull(sumAbs / finite) : null,
    l2: finiteOrNull(Math.sqrt(sumSq)) ?? 0,
    nearZeroShare: finite ? near / finite : 0,
    nearZeroThreshold: threshold,
    nan,
    inf,
  };
}

/** Histogram of the finite values over [min, max] (or `range`); a constant tensor gets a unit-wide range. */
export function histogram(values: Num, bins = HISTOGRAM_BINS, range?: [number, number]): Histogram {
  let lo = Infinity;
  let hi = -Infinity;
  if (range) [lo, hi] = range;
  else {
    for (let i = 0; i < values.length; i++) {
      const v = values[i];
      if (!Number.isFinite(v)) continue;
      if (v < lo) lo = v;
      if (v > hi) hi = v;
    }
  }
  if (!(lo <= hi)) return { lo: 0, hi: 0, counts: new Array<number>(bins).fill(0) };
  if (lo === hi) {
    const half = lo === 0 ? 0.5 : Math.abs(lo) * 0.5;
    lo -= half;
    hi += half;
  }
  const counts = new Array<number>(bins).fill(0);
  const width = (hi - lo) / bins;
  for (let i = 0; i < values.length; i++) {
    const v = values[i];
    if (!Number.isFinite(v) || v < lo || v > hi) continue;
    // The top edge belongs to the last bin.
    counts[Math.min(bins - 1, Math.floor((v - lo) / width))]++;
  }
  return { lo, hi, counts };
}

/** L2 norm of each output channel of a row-major [Cout, …] tensor. */
export function channelL2(values: Num, outChannels: number): number[] {
  if (outChannels <= 0) return [];
  const per = Math.floor(values.length / outChannels);
  const out = new Array<number>(outChannels);
  for (let o = 0; o < outChannels; o++) {
    let s = 0;
    for (let i = o * per, e = i + per; i < e; i++) {
      const v = values[i];
      if (Number.isFinite(v)) s += v * v;
    }
    out[o] = Math.sqrt(s);
  }
  return out;
}

/**
 * Σ|W| over output and input channels at each spatial position of a [Cout, Cin/g, ...k] kernel.
 * 2-D kernels give k[0] rows × k[1] columns; 1-D a single row; higher ranks fold the leading
 * spatial dimensions into rows.
 */
export function spatialEnergy(values: Num, shape: number[]): Heatmap {
  const k = shape.slice(2);
  const spatial = k.reduce((a, b) => a * b, 1);
  const cols = k.length ? k[k.length - 1] : 1;
  const rows = spatial / cols;
  const acc = new Array<number>(spatial).fill(0);
  const planes = Math.floor(values.length / spatial);
  for (let p = 0; p < planes; p++) {
    const base = p * spatial;
    for (let s = 0; s < spatial; s++) {
      const v = values[base + s];
      if (Number.isFinite(v)) acc[s] += Math.abs(v);
    }
  }
  return { rows, cols, values: acc };
}

function sumSquares(values: Num): number {
  let s = 0;
  for (let i = 0; i < values.length; i++) {
    const v = values[i];
    if (Number.isFinite(v)) s += v * v;
  }
  return s;
}

/** γ / √(σ² + ε) per channel; non-positive σ² + ε gives NaN (reported by the fusion, not here). */
export function bnScale(bn: { gamma: Num; variance: Num; eps: number }): Float64Array {
  const out = new Float64Array(bn.gamma.length);
  for (let c = 0; c < out.length; c++) {
    const d = bn.variance[c] + bn.eps;
    out[c] = d > 0 ? bn.gamma[c] / Math.sqrt(d) : NaN;
  }
  return out;
}

function bnStats(bn: NonNullable<BranchData['bn']>): BNStats {
  const arr = (a: Num) => Array.from(a, (v) => finiteOrNull(v) ?? 0);
  return { gamma: arr(bn.gamma), beta: arr(bn.beta), mean: arr(bn.mean), variance: arr(bn.variance), eps: bn.eps, scale: arr(bnScale(bn)) };
}

/**
 * The branch's weights with its BN and factor folded in, at its own kernel size; for identity
 * branches, the diagonal entries of its identity kernel (read from the contribution).
 */
export function foldedWeights(br: BranchData, inPerGroup: number): Float64Array {
  if (br.folded) return Float64Array.from(br.folded.values);
  const cout = br.contribution.shape[0];
  if (br.weight) {
    const w = br.weight.values;
    const per = Math.floor(w.length / cout);
    const s = br.bn ? bnScale(br.bn) : undefined;
    const alpha = br.scale;
    const out = new Float64Array(w.length);
    for (let o = 0; o < cout; o++) {
      const f = (s ? s[o] : 1) * (alpha === undefined ? 1 : alpha.length === 1 ? alpha[0] : alpha[o]);
      for (let i = o * per, e = i + per; i < e; i++) out[i] = w[i] * f;
    }
    return out;
  }
  // Identity: weight[(o·cpg + o mod cpg)·spatial + centre].
  const spatial = br.contribution.shape.slice(2).reduce((a, b) => a * b, 1);
  const k = br.contribution.shape.slice(2);
  const kStrides = k.map((_, i) => k.slice(i + 1).reduce((a, b) => a * b, 1));
  const centre = k.reduce((acc, K, i) => acc + ((K - 1) / 2) * kStrides[i], 0);
  const out = new Float64Array(cout);
  for (let o = 0; o < cout; o++) out[o] = br.contribution.weight[(o * inPerGroup + (o % inPerGroup)) * spatial + centre];
  return out;
}

/** Everything the statistics view shows for one block. */
export function blockStats(data: BlockData, opts: { bins?: number; nearZeroRel?: number } = {}): BlockStats {
  const bins = opts.bins ?? HISTOGRAM_BINS;
  const rel = opts.nearZeroRel ?? NEAR_ZERO_REL;
  const { block, fused } = data;
  const cout = fused.shape[0];
  const inPerGroup = fused.shape[1];
  const n = fused.weight.length;

  // S = Σ_b C_b, the fused kernel before any post-add BN.
  const sum = new Float64Array(n);
  for (const br of data.branches) {
    const c = br.contribution.weight;
    for (let i = 0; i < n; i++) sum[i] += c[i];
  }
  const sumEnergy = sumSquares(sum);
  const energies = data.branches.map((br) => sumSquares(br.contribution.weight));
  const totalEnergy = energies.reduce((a, b) => a + b, 0);

  const branches: BranchStats[] = data.branches.map((br, bi) => {
    const info = block.branches[bi];
    const folded = foldedWeights(br, inPerGroup);
    let dot = 0;
    const c = br.contribution.weight;
    for (let i = 0; i < n; i++) if (Number.isFinite(c[i]) && Number.isFinite(sum[i])) dot += c[i] * sum[i];
    return {
      label: br.label,
      kind: br.kind,
      description: branchLong(info ?? { kind: br.kind }),
      shape: br.weight ? [...br.weight.shape] : null,
      params: info?.params ?? 0,
      epsilon: br.bn ? br.bn.eps : (info?.epsilon ?? null),
      hasBias: !!br.bias,
      scaled: br.scale !== undefined,
      raw: br.weight ? tensorStats(br.weight.values, rel) : null,
      rawHistogram: br.weight ? histogram(br.weight.values, bins) : null,
      rawChannelL2: br.weight ? channelL2(br.weight.values, cout) : null,
      folded: tensorStats(folded, rel),
      foldedHistogram: histogram(folded, bins),
      foldedShape: br.folded ? [...br.folded.shape] : br.weight ? [...br.weight.shape] : null,
      foldedChannelL2: channelL2(c, cout),
      foldedBias: tensorStats(br.contribution.bias, rel),
      bn: br.bn ? bnStats(br.bn) : null,
      heatmap: spatialEnergy(c, br.contribution.shape),
      energy: energies[bi],
      energyShare: totalEnergy > 0 ? energies[bi] / totalEnergy : 0,
      projectionShare: sumEnergy > 0 ? dot / sumEnergy : 0,
    };
  });

  // Check the decomposition: fused = postBN scale · S (per output channel).
  const post = data.postBN ? bnScale(data.postBN) : undefined;
  const per = n / Math.max(1, cout);
  let recon = 0;
  for (let i = 0; i < n; i++) {
    const expect = post ? sum[i] * post[Math.floor(i / per)] : sum[i];
    const d = Math.abs(fused.weight[i] - expect);
    if (d > recon || Number.isNaN(d)) recon = Number.isNaN(d) ? Infinity : d;
  }

  return {
    block,
    branches,
    postBN: data.postBN ? bnStats(data.postBN) : null,
    fused: {
      shape: [...fused.shape],
      weight: tensorStats(fused.weight, rel),
      bias: tensorStats(fused.bias, rel),
      histogram: histogram(fused.weight, bins),
      channelL2: channelL2(fused.weight, cout),
      heatmap: spatialEnergy(fused.weight, fused.shape),
      energy: sumSquares(fused.weight),
    },
    reconstructionError: Number.isFinite(recon) ? recon : Number.MAX_VALUE,
    nearZeroRel: rel,
    histogramBins: bins,
  };
}
