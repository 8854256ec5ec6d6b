// The exact re-parameterization math, independent of any file format. Every term is accumulated
// in float64; the caller rounds once when it writes the result in the model's dtype.
import { FusionError } from './errors';

type Num = ArrayLike<number>;

/** Inference-form batch normalization: y = γ (x − μ) / √(σ² + ε) + β, per channel. */
export interface BNParams {
  gamma: Num;
  beta: Num;
  mean: Num;
  variance: Num;
  eps: number;
}

/** Lazy access to a big weight, one range of output channels at a time. */
export interface WeightRows {
  /** Values of output channels [o0, o1), row-major; may reuse its buffer between calls. */
  rows(o0: number, o1: number): ArrayLike<number>;
}

export interface ConvTerm {
  kind: 'conv';
  /** Weight [Cout, Cin/groups, ...kernel], row-major, whole or by rows. */
  weight: Num | WeightRows;
  kernel: number[];
  bias?: Num;
  bn?: BNParams;
  /** Scalar or per-output-channel factor applied after conv (and BN): PP-YOLOE's alpha. */
  scale?: number | Num;
}

export interface IdentityTerm {
  kind: 'identity';
  /** BN applied to the input (RepVGG's rbr_identity); absent for a bare `x`. */
  bn?: BNParams;
  /** Scalar or per-channel factor applied after the BN (a layer scale; negative when subtracted). */
  scale?: number | Num;
}

export interface FuseSpec {
  /** For error messages. */
  name: string;
  outChannels: number;
  /** Input channels per group (the weight's second dimension). */
  inPerGroup: number;
  groups: number;
  /** Spatial size of the fused kernel; every term must fit centred inside it. */
  kernel: number[];
  terms: (ConvTerm | IdentityTerm)[];
  /** BN applied to the sum (QARepVGG, RepViT). */
  postBN?: BNParams;
}

export interface FusedConv {
  weight: Float64Array;
  bias: Float64Array;
  shape: number[];
}

export interface PrepareOptions {
  /**
   * A BN channel whose variance + eps is not positive: 'refuse' (default: a FusionError), or 'nan'
   * (statistics only: the channel's scale and shift are NaN, so the statistics count it).
   */
  invalidBN?: 'refuse' | 'nan';
}

/** Per-channel (scale, shift) of a BN; refuses channels whose variance + eps is not positive. */
export function bnScaleShift(bn: BNParams, channels: number, where: string, invalid: PrepareOptions['invalidBN'] = 'refuse'): { scale: Float64Array; shift: Float64Array } {
  for (const [label, arr] of [['weight (γ)', bn.gamma], ['bias (β)', bn.beta], ['running mean', bn.mean], ['running variance', bn.variance]] as const) {
    if (arr.length !== channels) throw new FusionError(`${where}: BN ${label} has ${arr.length} values, expected ${channels}.`);
  }
  const scale = new Float64Array(channels);
  const shift = new Float64Array(channels);
  for (let c = 0; c < channels; c++) {
    const d = bn.variance[c] + bn.eps;
    if (!(d > 0)) {
      if (invalid === 'nan') {
        scale[c] = shift[c] = NaN;
        continue;
      }
      throw new FusionError(`${where}: BN channel ${c} has running variance ${bn.variance[c]} + eps ${bn.eps} ≤ 0 (or NaN); refusing to fuse.`);
    }
    scale[c] = bn.gamma[c] / Math.sqrt(d);
    shift[c] = bn.beta[c] - bn.mean[c] * scale[c];
  }
  return { scale, shift };
}

function checkKernel(spec: FuseSpec, k: number[]): number[] {
  if (k.length !== spec.kernel.length) throw new FusionError(`${spec.name}: a ${k.length}-D kernel cannot join a ${spec.kernel.length}-D block.`);
  return k.map((ki, i) => {
    const K = spec.kernel[i];
    if (ki > K || (K - ki) % 2 !== 0) throw new FusionError(`${spec.name}: kernel ${k.join('×')} cannot be centred in ${spec.kernel.join('×')}.`);
    return (K - ki) / 2;
  });
}

const factorOf = (sc: ConvTerm['scale'], o: number): number =>
  sc === undefined ? 1 : typeof sc === 'number' ? sc : sc.length === 1 ? sc[0] : sc[o];

export interface PreparedTerm {
  term: ConvTerm | IdentityTerm;
  /** Spatial size of the term's kernel (1 for identity). */
  ks: number;
  /** Position in the fused kernel of each position of the term's kernel. */
  posMap: Int32Array;
  /** Per-output-channel multiplier of the term's weights (BN scale × factor), or undefined for 1. */
  mult?: Float64Array;
  /** Per-output-channel contribution to the bias. */
  bias: Float64Array;
}

/** A block ready to be fused channel range by channel range (so big layers stream in slices). */
export interface PreparedFusion {
  spec: FuseSpec;
  spatial: number;
  /** Elements per output channel of the fused weight. */
  perChannel: number;
  terms: PreparedTerm[];
  /** Fused bias, complete (it needs no weights). */
  bias: Float64Array;
  postScale?: Float64Array;
}

/** Validates the spec and precomputes everything per channel; reads no weight. */
export function prepareFusion(spec: FuseSpec, opts: PrepareOptions = {}): PreparedFusion {
  const { outChannels: cout, inPerGroup: cpg, groups, kernel } = spec;
  const spatial = kernel.reduce((a, b) => a * b, 1);
  const kStrides = kernel.map((_, i) => kernel.slice(i + 1).reduce((a, b) => a * b, 1));
  const centre = kernel.reduce((acc, K, i) => acc + ((K - 1) / 2) * kStrides[i], 0);
  const bias = new Float64Array(cout);
  const terms: PreparedTerm[] = [];
  // Full-size, unscaled conv terms first, so the common case can take the copy fast path.
  const plain = (t: ConvTerm | IdentityTerm) => t.kind === 'conv' && !t.bn && t.scale === undefined && t.kernel.every((k, i) => k === kernel[i]);
  for (const term of [...spec.terms.filter(plain), ...spec.terms.filter((t) => !plain(t))]) {
    const tb = new Float64Array(cout);
    if (term.kind === 'identity') {
      if (cpg * groups !== cout) {
        throw new FusionError(`${spec.name}: an identity branch needs as many input as output channels (in ${cpg * groups}, out ${cout}).`);
      }
      let mult: Float64Array | undefined;
      if (term.bn) {
        const { scale, shift } = bnScaleShift(term.bn, cout, spec.name, opts.invalidBN);
        mult = scale;
        tb.set(shift);
      }
      const sc = term.scale;
      if (sc !== undefined) {
        if (typeof sc !== 'number' && sc.length !== 1 && sc.length !== cout) throw new FusionError(`${spec.name}: a factor has ${sc.length} values, expected 1 or ${cout}.`);
        mult ??= new Float64Array(cout).fill(1);
        for (let o = 0; o < cout; o++) {
          mult[o] *= factorOf(sc, o);
          tb[o] *= factorOf(sc, o);
        }
      }
      terms.push({ term, ks: 1, posMap: Int32Array.of(centre), mult, bias: tb });
    } else {
      const k = term.kernel;
      const off = checkKernel(spec, k);
      const ks = k.reduce((a, b) => a * b, 1);
      if (!isRows(term.weight) && term.weight.length !== cout * cpg * ks) {
        throw new FusionError(`${spec.name}: a ${k.join('×')} weight has ${term.weight.length} values, expected ${cout}×${cpg}×${k.join('×')}.`);
      }
      if (term.bias && term.bias.length !== cout) throw new FusionError(`${spec.name}: a bias has ${term.bias.length} values, expected ${cout}.`);
      const sc = term.scale;
      if (sc !== undefined && typeof sc !== 'number' && sc.length !== 1 && sc.length !== cout) {
        throw new FusionError(`${spec.name}: a factor has ${sc.length} values, expected 1 or ${cout}.`);
      }
      const bn = term.bn ? bnScaleShift(term.bn, cout, spec.name, opts.invalidBN) : undefined;
      let mult: Float64Array | undefined;
      if (bn || sc !== undefined) {
        mult = new Float64Array(cout);
        for (let o = 0; o < cout; o++) mult[o] = (bn ? bn.scale[o] : 1) * factorOf(sc, o);
      }
      // Bias of this branch after BN and factor: ((b − μ)·s + β)·α, computed as (b·s + shift)·α.
      for (let o = 0; o < cout; o++) {
        let b = term.bias ? term.bias[o] : 0;
        if (bn) b = b * bn.scale[o] + bn.shift[o];
        tb[o] = b * factorOf(sc, o);
      }
      const posMap = new Int32Array(ks);
      const kIdx = new Array<number>(k.length).fill(0);
      for (let p = 0; p < ks; p++) {
        let q = 0;
        for (let d = 0; d < k.length; d++) q += (kIdx[d] + off[d]) * kStrides[d];
        posMap[p] = q;
        for (let d = k.length - 1; d >= 0; d--) {
          if (++kIdx[d] < k[d]) break;
          kIdx[d] = 0;
        }
      }
      terms.push({ term, ks, posMap, mult, bias: tb });
    }
    for (let o = 0; o < cout; o++) bias[o] += tb[o];
  }
  let postScale: Float64Array | undefined;
  if (spec.postBN) {
    const { scale, shift } = bnScaleShift(spec.postBN, cout, spec.name, opts.invalidBN);
    postScale = scale;
    for (let o = 0; o < cout; o++) bias[o] = bias[o] * scale[o] + shift[o];
  }
  return { spec, spatial, perChannel: cpg * spatial, terms, bias, postScale };
}

/** The whole weight of a term as one array (reads every row of a lazy weight). */
export function wholeWeight(w: ConvTerm['weight'], outChannels: number): ArrayLike<number> {
  if (!isRows(w)) return w;
  const first = w.rows(0, outChannels);
  return Float64Array.from(first);
}

function isRows(w: ConvTerm['weight']): w is WeightRows {
  return typeof (w as WeightRows).rows === 'function';
}

/** Weight rows of output channels [o0, o1) as a flat array (the term's own kernel size). */
export function rowsOf(w: ConvTerm['weight'], o0: number, o1: number, per: number): ArrayLike<number> {
  if (isRows(w)) return w.rows(o0, o1);
  if (Array.isArray(w)) return w.slice(o0 * per, o1 * per);
  return (w as Float32Array).subarray(o0 * per, o1 * per);
}

/**
 * Writes the fused weights of output channels [o0, o1) into `out` (length (o1−o0)·perChannel),
 * accumulating in float64.
 */
export function fuseRange(p: PreparedFusion, o0: number, o1: number, out: Float64Array): void {
  const { spec, spatial } = p;
  const cpg = spec.inPerGroup;
  const n = (o1 - o0) * p.perChannel;
  if (out.length < n) throw new Error('internal error: fusion buffer too small');
  let touched = false;
  for (const t of p.terms) {
    if (t.term.kind === 'identity') {
      if (!touched) out.fill(0, 0, n);
      touched = true;
      const c0 = t.posMap[0];
      for (let o = o0; o < o1; o++) out[(o - o0) * p.perChannel + (o % cpg) * spatial + c0] += t.mult ? t.mult[o] : 1;
      continue;
    }
    const w = rowsOf(t.term.weight, o0, o1, cpg * t.ks);
    if (!touched && t.ks === spatial && !t.mult && (w instanceof Float32Array || w instanceof Float64Array)) {
      out.set(w); // native widening copy: the usual PyTorch export (BN already folded into the conv)
      touched = true;
      continue;
    }
    if (!touched && t.ks === spatial) {
      // First full-size term with a per-channel factor (conv+BN in checkpoints): a scaled copy,
      // no zero fill and no read-modify-write.
      const m = cpg * t.ks;
      for (let o = o0; o < o1; o++) {
        const f = t.mult ? t.mult[o] : 1;
        const base = (o - o0) * m;
        for (let i = 0; i < m; i++) out[base + i] = w[base + i] * f;
      }
      touched = true;
      continue;
    }
    if (!touched) out.fill(0, 0, n);
    touched = true;
    const { ks, posMap, mult } = t;
    for (let o = o0; o < o1; o++) {
      const f = mult ? mult[o] : 1;
      const sBase = (o - o0) * cpg * ks;
      const dBase = (o - o0) * p.perChannel;
      if (ks === spatial) {
        const m = cpg * ks;
        for (let i = 0; i < m; i++) out[dBase + i] += w[sBase + i] * f;
      } else if (ks === 1) {
        const c0 = posMap[0];
        for (let c = 0; c < cpg; c++) out[dBase + c * spatial + c0] += w[sBase + c] * f;
      } else {
        for (let c = 0; c < cpg; c++) {
          const s0 = sBase + c * ks;
          const d0 = dBase + c * spatial;
          for (let q = 0; q < ks; q++) out[d0 + posMap[q]] += w[s0 + q] * f;
        }
      }
    }
  }
  if (!touched) out.fill(0, 0, n);
  if (p.postScale) {
    for (let o = o0; o < o1; o++) {
      const s = p.postScale[o];
      for (let i = (o - o0) * p.perChannel, e = i + p.perChannel; i < e; i++) out[i] *= s;
    }
  }
}

/**
 * Fuses the terms of one block into a single convolution. Smaller kernels are zero-padded to the
 * centre; the identity becomes a kernel with scale[o] at [o, o mod (C/groups), centre].
 */
export function fuseBlock(spec: FuseSpec, opts: PrepareOptions = {}): FusedConv {
  const p = prepareFusion(spec, opts);
  const weight = new Float64Array(spec.outChannels * p.perChannel);
  fuseRange(p, 0, spec.outChannels, weight);
  return { weight, bias: p.bias, shape: [spec.outChannels, spec.inPerGroup, ...spec.kernel] };
}
