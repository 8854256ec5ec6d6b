// Quantization readiness of weights: INT8 symmetric fake quantization (per tensor and per output
// channel), SQNR, channel range imbalance, FP16 overflow/subnormal counts, and the BN gains of each
// branch of an unfused block (the QARepVGG finding). Pure numbers; the CLI, the extension and the
// onnxruntime child (which measures output SQNR) all use these same definitions.
import type { BlockData, BranchKind } from './model';
import { fmtNum, table } from './report';

type Num = ArrayLike<number>;

/** Largest finite float16 magnitude. */
export const FP16_MAX = 65504;
/** Smallest normal float16 magnitude (2⁻¹⁴); non-zero magnitudes below it are subnormal in FP16. */
export const FP16_MIN_NORMAL = 2 ** -14;
/** INT8 symmetric range: [−127, 127] (−128 unused, so the grid is symmetric). */
export const INT8_MAX = 127;
/** Default `--threshold-db`: blocks whose per-tensor output SQNR is below it are fallback candidates. */
export const DEFAULT_THRESHOLD_DB = 30;
/**
 * A branch's BN gain "dwarfs" the k×k branch's when its median or its max |γ/√(σ²+ε)| is at least
 * this many times the k×k branch's (10× ≈ 20 dB: the smaller branch alone then sets the range of
 * the fused kernel, which is what breaks per-tensor INT8 in RepVGG, per QARepVGG).
 */
export const GAIN_FLAG_RATIO = 10;

/** Round half to even (banker's rounding), as numpy's np.round and IEEE roundTiesToEven. */
export function roundHalfEven(x: number): number {
  const f = Math.floor(x);
  const d = x - f;
  if (d < 0.5) return f;
  if (d > 0.5) return f + 1;
  return f % 2 === 0 ? f : f + 1;
}

/** How a flat row-major index maps to an output channel: channel = ⌊i / inner⌋ mod channels. */
export interface ChannelLayout {
  axis: number;
  channels: number;
  inner: number;
}

export function channelLayout(shape: number[], axis: number): ChannelLayout {
  if (axis < 0 || axis >= shape.length) throw new RangeError(`channel axis ${axis} is outside a ${shape.length}-D shape`);
  return { axis, channels: shape[axis], inner: shape.slice(axis + 1).reduce((a, b) => a * b, 1) };
}

/** r_c = max |W[c]| per output channel. */
export function channelRanges(values: Num, layout: ChannelLayout): Float64Array {
  const r = new Float64Array(layout.channels);
  const { inner, channels } = layout;
  for (let i = 0; i < values.length; i++) {
    const c = Math.floor(i / inner) % channels;
    const a = Math.abs(values[i]);
    if (a > r[c]) r[c] = a;
  }
  return r;
}

function maxAbs(values: Num): number {
  let m = 0;
  for (let i = 0; i < values.length; i++) {
    const a = Math.abs(values[i]);
    if (a > m) m = a;
  }
  return m;
}

/** Δ = r/127, or 1 for an all-zero tensor or channel. */
export const int8Step = (range: number): number => (range > 0 ? range / INT8_MAX : 1);

const q8 = (w: number, step: number): number => Math.min(INT8_MAX, Math.max(-INT8_MAX, roundHalfEven(w / step))) * step;

/**
 * INT8 symmetric fake quantization Q(W) = clamp(round_half_even(W/Δ), −127, 127)·Δ, with one Δ for
 * the tensor (`layout` undefined) or one per output channel.
 */
export function fakeQuantInt8(values: Num, layout?: ChannelLayout): Float64Array {
  const out = new Float64Array(values.length);
  if (!layout) {
    const step = int8Step(maxAbs(values));
    for (let i = 0; i < values.length; i++) out[i] = q8(values[i], step);
    return out;
  }
  const steps = Array.from(channelRanges(values, layout), int8Step);
  for (let i = 0; i < values.length; i++) out[i] = q8(values[i], steps[Math.floor(i / layout.inner) % layout.channels]);
  return out;
}

/** 10·log10(Σ ref² / Σ err²) in dB; null when the error is zero (or either sum is not finite). */
export function sqnrDb(signalEnergy: number, errorEnergy: number): number | null {
  if (!(errorEnergy > 0) || !Number.isFinite(errorEnergy) || !Number.isFinite(signalEnergy)) return null;
  return 10 * Math.log10(signalEnergy / errorEnergy);
}

/** SQNR of `approx` against `ref`, over all elements. */
export function sqnrOf(ref: Num, approx: Num): number | null {
  let s = 0;
  let e = 0;
  for (let i = 0; i < ref.length; i++) {
    s += ref[i] * ref[i];
    const d = ref[i] - approx[i];
    e += d * d;
  }
  return sqnrDb(s, e);
}

/** SQNR of INT8 fake quantization (per tensor, or per channel with `layout`). */
export function int8SqnrDb(values: Num, layout?: ChannelLayout): number | null {
  return sqnrOf(values, fakeQuantInt8(values, layout));
}

/** Median as numpy computes it (mean of the two middle values for an even count). */
export function median(values: Num): number {
  const s = Float64Array.from(values).sort();
  const n = s.length;
  if (!n) return NaN;
  return n % 2 ? s[(n - 1) / 2] : (s[n / 2 - 1] + s[n / 2]) / 2;
}

/** max_c r_c / median_c r_c; null when the median range is zero (or there are no channels). */
export function rangeImbalance(ranges: Num): number | null {
  if (!ranges.length) return null;
  const m = median(ranges);
  if (!(m > 0)) return null;
  return maxAbs(ranges) / m;
}

export interface Fp16Hazards {
  /** Count of |w| > 65504: these become ±inf in FP16. */
  overflow: number;
  /** Count of 0 < |w| < 2⁻¹⁴: subnormal in FP16 (precision lost, flushed to zero on some hardware). */
  subnormal: number;
}

export function fp16Hazards(values: Num): Fp16Hazards {
  let overflow = 0;
  let subnormal = 0;
  for (let i = 0; i < values.length; i++) {
    const a = Math.abs(values[i]);
    if (a > FP16_MAX) overflow++;
    else if (a > 0 && a < FP16_MIN_NORMAL) subnormal++;
  }
  return { overflow, subnormal };
}

/** One Conv/Gemm/MatMul weight as the fused model holds it. */
export interface TensorQuant {
  /** Initializer (ONNX) or state_dict key (checkpoint) in the fused output. */
  name: string;
  /** Conv, Gemm, MatMul (ONNX); Conv or Linear (checkpoint, by rank). */
  op: string;
  /** Block whose fused weight this is, or null. */
  block: string | null;
  shape: number[];
  /** Output-channel axis used for per-channel quantization and ranges. */
  axis: number;
  int8: { perTensorSqnrDb: number | null; perChannelSqnrDb: number | null };
  rangeImbalance: number | null;
  fp16: Fp16Hazards;
}

/** Output-channel axis of a weight: 0 for Conv (and PyTorch Linear), Gemm 1−transB, MatMul the last. */
export function outputAxis(op: string, rank: number, transB = 0): number {
  if (op === 'Gemm') return transB ? 0 : 1;
  if (op === 'MatMul') return rank - 1;
  return 0;
}

export function analyzeTensor(name: string, op: string, block: string | null, shape: number[], values: Num, axis: number): TensorQuant {
  const layout = shape.length ? channelLayout(shape, axis) : undefined;
  return {
    name,
    op,
    block,
    shape,
    axis,
    int8: { perTensorSqnrDb: int8SqnrDb(values), perChannelSqnrDb: layout ? int8SqnrDb(values, layout) : int8SqnrDb(values) },
    rangeImbalance: layout ? rangeImbalance(channelRanges(values, layout)) : null,
    fp16: fp16Hazards(values),
  };
}

/** BN gain γ/√(σ²+ε) of one branch, as magnitudes over its channels. */
export interface BranchGain {
  /** Branch label as the statistics view shows it ("3×3 conv+bn", "bn(x)", "x"). */
  branch: string;
  kind: BranchKind;
  kernel: number[] | null;
  /** True when the branch has its own BN; a bare identity `x` has gain 1; a conv without BN has none (null). */
  bn: boolean;
  median: number | null;
  max: number | null;
}

export interface BlockGains {
  branches: BranchGain[];
  /** The post-add BN's gain (QARepVGG, RepViT), when there is one. */
  postBN: { median: number; max: number } | null;
  /** Why the block is flagged (a smaller branch's BN gain dwarfs the k×k branch's), else null. */
  flag: string | null;
}

function gainsOf(bn: { gamma: Num; variance: Num; eps: number }): Float64Array {
  const g = new Float64Array(bn.gamma.length);
  for (let c = 0; c < g.length; c++) g[c] = Math.abs(bn.gamma[c] / Math.sqrt(bn.variance[c] + bn.eps));
  return g;
}

const kernelSize = (k: number[] | null): number => (k ? k.reduce((a, b) => a * b, 1) : 1);

/**
 * Each branch's |γ/√(σ²+ε)| (median and max over channels) and the QARepVGG flag: a branch with a
 * smaller kernel (identity, 1×1, 1×k) whose own BN gain is ≥ GAIN_FLAG_RATIO × the k×k branch's
 * (median against median, or max against max). Branches without a BN cannot carry such a learned
 * gain (that is QARepVGG's design), so only BN-carrying branches are compared.
 */
export function branchGains(data: BlockData, ratio = GAIN_FLAG_RATIO): BlockGains {
  const branches: BranchGain[] = data.branches.map((b) => {
    const kernel = b.weight ? b.weight.shape.slice(2) : null;
    if (b.bn) {
      const g = gainsOf(b.bn);
      return { branch: b.label, kind: b.kind, kernel, bn: true, median: median(g), max: maxAbs(g) };
    }
    const unit = b.kind === 'identity';
    return { branch: b.label, kind: b.kind, kernel, bn: false, median: unit ? 1 : null, max: unit ? 1 : null };
  });
  const big = Math.max(...branches.map((b) => kernelSize(b.kernel)));
  const dense = branches.filter((b) => b.bn && kernelSize(b.kernel) === big);
  const reasons: string[] = [];
  if (dense.length) {
    // Several k×k branches (MobileOne): compare against the strongest, so the flag stays conservative.
    const dMed = Math.max(...dense.map((b) => b.median!));
    const dMax = Math.max(...dense.map((b) => b.max!));
    const kxk = dense[0].kernel ? dense[0].kernel.join('×') : 'k×k';
    for (const b of branches) {
      if (!b.bn || kernelSize(b.kernel) === big) continue;
      const rMed = b.median! / dMed;
      const rMax = b.max! / dMax;
      if (rMed >= ratio || rMax >= ratio) {
        const which = rMed >= rMax ? `median ${fmtNum(b.median!)} vs ${fmtNum(dMed)}` : `max ${fmtNum(b.max!)} vs ${fmtNum(dMax)}`;
        reasons.push(`${b.branch} BN gain is ${fmtNum(Math.max(rMed, rMax))}× the ${kxk} branch's (${which})`);
      }
    }
  }
  let postBN: BlockGains['postBN'] = null;
  if (data.postBN) {
    const g = gainsOf(data.postBN);
    postBN = { median: median(g), max: maxAbs(g) };
  }
  return { branches, postBN, flag: reasons.length ? reasons.join('; ') : null };
}

/** Where the per-block output SQNR was measured. */
export type QuantScope = 'model' | 'block';

export interface BlockQuant {
  name: string;
  family: string;
  /** The fused weight's name in the fused output. */
  weight: string;
  /**
   * SQNR of the outputs when only this block's fused weight is INT8-quantized, against the float
   * fused model. scope 'model': all model outputs (flattened, concatenated in output order) of the
   * whole fused ONNX model; 'block': the block's own output in a one-block model (checkpoints).
   * null values: the quantization changed no output (error zero) — or `error` says why not measured.
   */
  outputSqnrDb: { perTensor: number | null; perChannel: number | null; scope: QuantScope; error?: string };
  branchGains: BlockGains | null;
  /** One line: what to do with this block. */
  verdict: string;
}

export interface QuantMeasured {
  scope: QuantScope;
  runtime: string;
  seed: number;
  inputs: { name: string; shape: number[]; dtype: string; source: string }[];
  durationMs: number;
}

export interface QuantReport {
  input: string;
  format: string;
  /** True when the input had blocks (or BN folds) and was fused in memory first. */
  fusedInMemory: boolean;
  thresholdDb: number;
  measured: QuantMeasured | null;
  tensors: TensorQuant[];
  blocks: BlockQuant[];
  /** Blocks whose outputSqnrDb.perTensor is below thresholdDb, worst first: keep these in higher precision. */
  fallback: string[];
  fp16: { overflow: number; subnormal: number; tensors: string[] };
  notes: string[];
}

const worstKey = (v: number | null): number => (v === null ? Infinity : v);

/** Sorts blocks worst first (lowest per-tensor output SQNR; unmeasured by weight SQNR after). */
export function sortWorstFirst(blocks: BlockQuant[]): BlockQuant[] {
  return [...blocks].sort((a, b) => worstKey(a.outputSqnrDb.perTensor) - worstKey(b.outputSqnrDb.perTensor) || a.name.localeCompare(b.name));
}

export function fallbackList(blocks: BlockQuant[], thresholdDb: number): string[] {
  return sortWorstFirst(blocks)
    .filter((b) => b.outputSqnrDb.perTensor !== null && b.outputSqnrDb.perTensor < thresholdDb)
    .map((b) => b.name);
}

const db = (v: number | null | undefined): string => (v === null || v === undefined ? '—' : `${v.toFixed(1)} dB`);

/** One line on a block: INT8 per tensor fine, per channel needed, or keep in higher precision. */
export function blockVerdict(b: Omit<BlockQuant, 'verdict'>, tensor: TensorQuant | undefined, thresholdDb: number): string {
  const o = b.outputSqnrDb;
  const parts: string[] = [];
  if (o.error) parts.push(`output SQNR not measured (${o.error})`);
  else if (o.perTensor === null) parts.push('INT8 changes no output: safe');
  else if (o.perTensor >= thresholdDb) parts.push(`INT8 per-tensor OK (${db(o.perTensor)} ≥ ${thresholdDb} dB)`);
  else if (o.perChannel === null || o.perChannel >= thresholdDb) parts.push(`needs per-channel INT8 (per-tensor ${db(o.perTensor)}, per-channel ${db(o.perChannel)})`);
  else parts.push(`keep in FP16/FP32 (per-channel INT8 still ${db(o.perChannel)} < ${thresholdDb} dB)`);
  if (tensor?.rangeImbalance && tensor.rangeImbalance >= 10) parts.push(`channel ranges ${fmtNum(tensor.rangeImbalance)}× apart`);
  if (b.branchGains?.flag) parts.push('branch BN gains unbalanced (QARepVGG)');
  if (tensor && (tensor.fp16.overflow || tensor.fp16.subnormal)) parts.push(`FP16: ${tensor.fp16.overflow} overflow, ${tensor.fp16.subnormal} subnormal`);
  return parts.join('; ');
}

export function renderQuant(r: QuantReport): string {
  const lines: string[] = [];
  const scope = r.measured?.scope === 'block' ? 'block output, one-block model (checkpoint: no graph)' : 'all model outputs';
  lines.push(`${r.input}: ${r.tensors.length} weight tensors, ${r.blocks.length} blocks${r.fusedInMemory ? ' (analysed as fused, in memory)' : ''}`);
  if (r.measured) {
    const ins = r.measured.scope === 'block'
      ? `one random input per block (uniform [-1, 1), seed ${r.measured.seed}, ${r.measured.inputs[0]?.shape.slice(2).join('×') ?? '?'} spatial)`
      : `inputs ${r.measured.inputs.map((i) => `${i.name} ${i.shape.join('×')} (${i.source})`).join(', ') || 'none'}`;
    lines.push(`output SQNR measured on ${scope}, ${r.measured.runtime}; ${ins}`);
  }
  if (r.blocks.length) {
    const byName = new Map(r.tensors.map((t) => [t.name, t]));
    const rows = sortWorstFirst(r.blocks).map((b) => {
      const t = byName.get(b.weight);
      return [b.name, db(b.outputSqnrDb.perTensor), db(b.outputSqnrDb.perChannel), db(t?.int8.perTensorSqnrDb), t?.rangeImbalance ? fmtNum(t.rangeImbalance) : '—', b.verdict];
    });
    lines.push('', table(['block (worst first)', 'out SQNR/tensor', 'out SQNR/channel', 'weight SQNR', 'range max/med', 'verdict'], rows));
  }
  const others = r.tensors.filter((t) => !t.block);
  if (others.length) {
    const worst = [...others].sort((a, b) => worstKey(a.int8.perTensorSqnrDb) - worstKey(b.int8.perTensorSqnrDb)).slice(0, 10);
    lines.push('', `other weights (${others.length}; worst ${worst.length} by per-tensor weight SQNR):`);
    lines.push(table(['tensor', 'op', 'weight SQNR/tensor', 'weight SQNR/channel', 'range max/med', 'fp16 over/sub'], worst.map((t) => [t.name, t.op, db(t.int8.perTensorSqnrDb), db(t.int8.perChannelSqnrDb), t.rangeImbalance ? fmtNum(t.rangeImbalance) : '—', `${t.fp16.overflow}/${t.fp16.subnormal}`])));
  }
  lines.push('');
  lines.push(r.fp16.tensors.length ? `FP16 hazards: ${r.fp16.overflow} values overflow (|w| > 65504), ${r.fp16.subnormal} subnormal (0 < |w| < 2^-14), in ${r.fp16.tensors.join(', ')}` : 'FP16: no overflow or subnormal weights.');
  const flagged = r.blocks.filter((b) => b.branchGains?.flag);
  for (const b of flagged) lines.push(`branch gains: ${b.name}: ${b.branchGains!.flag}`);
  lines.push(r.fallback.length ? `Fallback (per-tensor output SQNR < ${r.thresholdDb} dB, worst first): ${r.fallback.join(', ')}` : `Fallback: none (every block ≥ ${r.thresholdDb} dB per tensor).`);
  for (const n of r.notes) lines.push(`note: ${n}`);
  return lines.join('\n');
}

/** One block's quantization detail for the branch statistics view (from its BlockData; no runtime). */
export interface BlockQuantDetail {
  block: string;
  /** max |contribution[c]| per output channel of each branch (BN folded, zero-padded: before fusion). */
  branches: { label: string; ranges: number[] }[];
  /** The fused kernel (post-add BN included): ranges per channel, INT8 SQNR, imbalance, FP16 counts. */
  fused: { ranges: number[]; perTensorSqnrDb: number | null; perChannelSqnrDb: number | null; rangeImbalance: number | null; fp16: Fp16Hazards };
  gains: BlockGains;
  /** The ratio above which a branch gain is flagged. */
  gainFlagRatio: number;
  /** True when a post-add BN scales the fused kernel after the branch sum (the branch ranges are before it). */
  postBN: boolean;
}

export function blockQuantDetail(data: BlockData): BlockQuantDetail {
  const f = data.fused;
  const layout = channelLayout(f.shape, 0);
  return {
    block: data.block.name,
    branches: data.branches.map((b) => ({ label: b.label, ranges: Array.from(channelRanges(b.contribution.weight, channelLayout(b.contribution.shape, 0))) })),
    fused: {
      ranges: Array.from(channelRanges(f.weight, layout)),
      perTensorSqnrDb: int8SqnrDb(f.weight),
      perChannelSqnrDb: int8SqnrDb(f.weight, layout),
      rangeImbalance: rangeImbalance(channelRanges(f.weight, layout)),
      fp16: fp16Hazards(f.weight),
    },
    gains: branchGains(data),
    gainFlagRatio: GAIN_FLAG_RATIO,
    postBN: !!data.postBN,
  };
}
