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

export interface ConvTerm {
  kind: 'conv';
  /** Weight [Cout, Cin/groups, ...kernel], row-major. */
  weight: Num;
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

/** Per-channel (scale, shift) of a BN; refuses channels whose variance + eps is not positive. */
export function bnScaleShift(bn: BNParams, channels: number, where: string): { scale: Float64Array; shift: Float64Array } {
  for (const [label, arr] of [['weight (γ)', bn.gamma], ['bias (β)', bn.beta], ['running mean', bn.mean], ['running variance', bn.variance]] as const) {
    if (arr.length !== channels) throw new FusionError(`${where}: BN ${label} has ${arr.length} values, expected ${channels}.`);
  }
  const scale = new Float64Array(channels);
  const shift = new Float64Array(channels);
  for (let c = 0; c < channels; c++) {
    const d = bn.variance[c] + bn.eps;
    if (!(d > 0)) {
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

/**
 * Fuses the terms of one block into a single convolution. Smaller kernels are zero-padded to the
 * centre; the identity becomes a kernel with scale[o] at [o, o mod (C/groups), centre].
 */
export function fuseBlock(spec: FuseSpec): FusedConv {
  const { outChannels: cout, inPerGroup: cpg, groups, kernel } = spec;
  const spatial = kernel.reduce((a, b) => a * b, 1);
  const shape = [cout, cpg, ...kernel];
  const weight = new Float64Array(cout * cpg * spatial);
  const bias = new Float64Array(cout);
  // Row-major strides of the fused spatial kernel.
  const kStrides = kernel.map((_, i) => kernel.slice(i + 1).reduce((a, b) => a * b, 1));
  // Only a term applied while the weight is still all zeros may be copied instead of added.
  let touched = false;

  // Full-size, unscaled conv terms first, so the common case can take the copy fast path.
  const plain = (t: ConvTerm | IdentityTerm) => t.kind === 'conv' && !t.bn && t.scale === undefined && t.kernel.every((k, i) => k === kernel[i]);
  const terms = [...spec.terms.filter(plain), ...spec.terms.filter((t) => !plain(t))];
  for (const term of terms) {
    const wasTouched = touched;
    touched = true;
    if (term.kind === 'identity') {
      if (cout % groups !== 0 || cpg * groups !== cout) {
        throw new FusionError(`${spec.name}: an identity branch needs as many input as output channels (in ${cpg * groups}, out ${cout}).`);
      }
      const centre = kernel.reduce((acc, K, i) => acc + ((K - 1) / 2) * kStrides[i], 0);
      let scale: ArrayLike<number> | undefined;
      let shift: ArrayLike<number> | undefined;
      if (term.bn) ({ scale, shift } = bnScaleShift(term.bn, cout, spec.name));
      for (let o = 0; o < cout; o++) {
        weight[(o * cpg + (o % cpg)) * spatial + centre] += scale ? scale[o] : 1;
        if (shift) bias[o] += shift[o];
      }
      continue;
    }
    const k = term.kernel;
    const off = checkKernel(spec, k);
    const ks = k.reduce((a, b) => a * b, 1);
    if (term.weight.length !== cout * cpg * ks) {
      throw new FusionError(`${spec.name}: a ${k.join('×')} weight has ${term.weight.length} values, expected ${cout}×${cpg}×${k.join('×')}.`);
    }
    const bn = term.bn ? bnScaleShift(term.bn, cout, spec.name) : undefined;
    const sc = term.scale;
    // Map each position of the small kernel to its place in the fused kernel.
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
    const w = term.weight;
    const alphaOf = (o: number) => (sc === undefined ? 1 : typeof sc === 'number' ? sc : sc.length === 1 ? sc[0] : sc[o]);
    let fastCopy = false;
    if (!bn && sc === undefined && ks === spatial && !wasTouched && (w instanceof Float32Array || w instanceof Float64Array)) {
      // First full-size unscaled term (the usual PyTorch export: BN already folded into the conv):
      // a native widening copy instead of an element loop. Later terms add to it.
      weight.set(w);
      fastCopy = true;
    }
    for (let o = 0; o < cout; o++) {
      const f = (bn ? bn.scale[o] : 1) * alphaOf(o);
      const srcBase = o * cpg * ks;
      const dstBase = o * cpg * spatial;
      for (let c = 0; c < cpg && !fastCopy; c++) {
        const s0 = srcBase + c * ks;
        const d0 = dstBase + c * spatial;
        if (ks === spatial) {
          for (let p = 0; p < ks; p++) weight[d0 + p] += w[s0 + p] * f;
        } else {
          for (let p = 0; p < ks; p++) weight[d0 + posMap[p]] += w[s0 + p] * f;
        }
      }
      // Bias of this branch after BN and scale: ((b − μ)·s + β)·α, computed as (b·s + shift)·α.
      let b = term.bias ? term.bias[o] : 0;
      if (bn) b = b * bn.scale[o] + bn.shift[o];
      bias[o] += b * alphaOf(o);
    }
  }

  if (spec.postBN) {
    const { scale, shift } = bnScaleShift(spec.postBN, cout, spec.name);
    const per = cpg * spatial;
    for (let o = 0; o < cout; o++) {
      const s = scale[o];
      for (let i = o * per, e = i + per; i < e; i++) weight[i] *= s;
      bias[o] = bias[o] * s + shift[o];
    }
  }
  return { weight, bias, shape };
}
