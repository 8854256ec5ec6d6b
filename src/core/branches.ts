// The one table of branch kinds: what a parallel branch of a block can be, how it is labelled, and
// how it is *lowered* into the plain terms of src/core/fusion.ts (a conv term or an identity term).
// Fusion, the streaming writer (via the lowered terms), the statistics, the report, the tree and the
// webview all read this table; `Record<BranchKind, …>` makes the compiler flag a kind one of them
// forgot. Every lowering is exact and computed in float64.
import { type BNParams, bnScaleShift, type ConvTerm, type IdentityTerm, wholeWeight } from './fusion';
import { FusionError } from './errors';

/** How one parallel branch of a block contributes to the sum. */
export type BranchKind =
  /** k×k convolution (bias optional; PyTorch's exporter folds its BN into it). */
  | 'conv'
  /** convolution followed by its own BatchNormalization (large kernels included). */
  | 'conv_bn'
  /** BatchNormalization of the block input: the identity branch. */
  | 'bn_identity'
  /** the block input itself. */
  | 'identity'
  /** average pooling of the input (count_include_pad), optionally followed by a BN: a 1/k² channel-diagonal kernel. */
  | 'avgpool'
  /** two convolutions in series (1×1 → k×k or k×k → 1×1, each with an optional BN): one kernel. */
  | 'sequential'
  /** a dilated convolution (+BN): its kernel spread out to (k−1)·d+1 with zeros in between. */
  | 'dilated';

/** A factor on a branch: `scaled` (a constant per channel, PP-YOLOE α, a layer scale) or `subtracted` (−1·, RepMixer's norm). */
export type BranchModifier = 'scaled' | 'subtracted';

/** Shape of a block, needed to lower parameterless branches (identity, avg-pool). */
export interface LowerContext {
  /** For error messages. */
  name: string;
  outChannels: number;
  inPerGroup: number;
  groups: number;
}

type Num = ArrayLike<number>;

/** One convolution (+ its optional BN) as stored. */
export interface ConvPart {
  weight: ConvTerm['weight'];
  /** Spatial kernel, e.g. [1, 1] or [3, 3]. */
  kernel: number[];
  bias?: Num;
  bn?: BNParams;
  /** Output channels of this conv and its groups (for the inner conv of a sequential branch). */
  outChannels?: number;
  groups?: number;
}

/** A branch with its numbers: the input of the lowering. */
export type BranchSpec =
  | ({ kind: 'conv' } & ConvPart & Factor)
  | ({ kind: 'conv_bn' } & ConvPart & { bn: BNParams } & Factor)
  | ({ kind: 'bn_identity'; bn: BNParams } & Factor)
  | ({ kind: 'identity' } & Factor)
  | ({ kind: 'avgpool'; pool: number[]; bn?: BNParams } & Factor)
  | ({ kind: 'sequential'; first: ConvPart; second: ConvPart } & Factor)
  | ({ kind: 'dilated'; dilation: number[] } & ConvPart & Factor);

interface Factor {
  /** Scalar or per-output-channel factor applied after the branch (negative for a subtracted branch). */
  scale?: number | Num;
}

export interface BranchKindDef<K extends BranchKind> {
  /** Short label, as in `3×3 conv+bn`, `bn(x)`, `3×3 avg`. */
  label: string;
  /** Long label for tooltips. */
  long: string;
  /** Codicon id for the tree. */
  icon: string;
  /** Whether the branch carries a conv kernel (its size is shown in the label). */
  hasKernel: boolean;
  /** Turns the branch into one plain term of the fusion, exactly (float64). */
  lower(b: Extract<BranchSpec, { kind: K }>, ctx: LowerContext): ConvTerm | IdentityTerm;
}

const prod = (xs: number[]) => xs.reduce((a, b) => a * b, 1);

/** A channel-diagonal kernel (value v at [o, o mod cpg, all positions]): identity and avg-pool. */
function diagonalKernel(ctx: LowerContext, kernel: number[], v: number): Float64Array {
  const ks = prod(kernel);
  const w = new Float64Array(ctx.outChannels * ctx.inPerGroup * ks);
  for (let o = 0; o < ctx.outChannels; o++) {
    const base = (o * ctx.inPerGroup + (o % ctx.inPerGroup)) * ks;
    w.fill(v, base, base + ks);
  }
  return w;
}

/** Folds a BN into a conv part: W·s, b·s + shift (float64). */
function foldPart(p: ConvPart, cout: number, where: string): { weight: Float64Array; bias: Float64Array } {
  const w = Float64Array.from(wholeWeight(p.weight, cout));
  const bias = new Float64Array(cout);
  const per = w.length / cout;
  const bn = p.bn ? bnScaleShift(p.bn, cout, where) : undefined;
  for (let o = 0; o < cout; o++) {
    const s = bn ? bn.scale[o] : 1;
    for (let i = o * per; i < (o + 1) * per; i++) w[i] *= s;
    bias[o] = (p.bias ? p.bias[o] : 0) * s + (bn ? bn.shift[o] : 0);
  }
  return { weight: w, bias };
}

/**
 * Two convolutions in series as one: y = W2 ∗ (W1 ∗ x + b1) + b2, with W1 a 1×1 or W2 a 1×1
 * (DBB's 1×1→k×k with its BN-valued padding, OREPA's k×k→1×1). Exact when the padding of the
 * intermediate holds the first conv's output for a zero input (BNAndPadLayer pads with it; a bare
 * 1×1 without bias and BN gives 0): then the composite pads x with zeros. Groups: the first conv's
 * groups must equal the second's (DBB's `transIII_1x1_kxk` slices both by group).
 */
export function composeSequential(first: ConvPart, second: ConvPart, ctx: LowerContext): { weight: Float64Array; bias: Float64Array; kernel: number[] } {
  const g = ctx.groups;
  const mid = first.outChannels ?? second.outChannels;
  if (!mid) throw new FusionError(`${ctx.name}: the inner width of a sequential branch is unknown.`);
  if (first.kernel.some((k) => k !== 1) && second.kernel.some((k) => k !== 1)) {
    throw new FusionError(`${ctx.name}: a sequential branch of ${first.kernel.join('×')} then ${second.kernel.join('×')} is not one kernel of the block's size; only 1×1→k×k or k×k→1×1 can be merged.`);
  }
  const A = foldPart(first, mid, ctx.name); // [mid, cin/g, ...k1]
  const B = foldPart(second, ctx.outChannels, ctx.name); // [cout, mid/g, ...k2]
  const k1 = prod(first.kernel);
  const k2 = prod(second.kernel);
  const kernel = first.kernel.map((k, i) => k + second.kernel[i] - 1);
  const ks = prod(kernel);
  const cinG = ctx.inPerGroup;
  const midG = mid / g;
  const coutG = ctx.outChannels / g;
  if (!Number.isInteger(midG) || !Number.isInteger(coutG)) throw new FusionError(`${ctx.name}: a sequential branch's widths (${mid}, ${ctx.outChannels}) do not split into ${g} groups.`);
  if (A.weight.length !== mid * cinG * k1 || B.weight.length !== ctx.outChannels * midG * k2) {
    throw new FusionError(`${ctx.name}: a sequential branch's weights do not chain (${mid}×${cinG}×${first.kernel.join('×')} then ${ctx.outChannels}×${midG}×${second.kernel.join('×')}).`);
  }
  const W = new Float64Array(ctx.outChannels * cinG * ks);
  const bias = new Float64Array(ctx.outChannels);
  // 1×1 on either side: a matrix product per position.
  for (let o = 0; o < ctx.outChannels; o++) {
    const grp = Math.floor(o / coutG);
    let b = B.bias[o];
    for (let mi = 0; mi < midG; mi++) {
      const m = grp * midG + mi;
      const bw = o * midG * k2 + mi * k2;
      let sumB = 0;
      for (let q = 0; q < k2; q++) sumB += B.weight[bw + q];
      b += sumB * A.bias[m];
      for (let c = 0; c < cinG; c++) {
        const aw = (m * cinG + c) * k1;
        const dst = (o * cinG + c) * ks;
        if (k1 === 1) {
          const a = A.weight[aw];
          for (let q = 0; q < k2; q++) W[dst + q] += B.weight[bw + q] * a;
        } else {
          const bv = B.weight[bw];
          for (let q = 0; q < k1; q++) W[dst + q] += A.weight[aw + q] * bv;
        }
      }
    }
    bias[o] = b;
  }
  return { weight: W, bias, kernel };
}

/** A dilated kernel spread out: k → (k−1)·d+1, zeros between the taps. */
export function dilateKernel(weight: Num, rows: number, kernel: number[], dilation: number[]): { weight: Float64Array; kernel: number[] } {
  if (kernel.length !== 2) throw new FusionError(`only 2-D dilated kernels can be merged (got ${kernel.length}-D).`);
  const out = kernel.map((k, i) => (k - 1) * dilation[i] + 1);
  const w = new Float64Array(rows * out[0] * out[1]);
  for (let r = 0; r < rows; r++) {
    for (let y = 0; y < kernel[0]; y++) {
      for (let x = 0; x < kernel[1]; x++) w[r * out[0] * out[1] + y * dilation[0] * out[1] + x * dilation[1]] = weight[(r * kernel[0] + y) * kernel[1] + x];
    }
  }
  return { weight: w, kernel: out };
}

export const BRANCH_KINDS: { [K in BranchKind]: BranchKindDef<K> } = {
  conv: {
    label: 'conv',
    long: 'convolution',
    icon: 'symbol-array',
    hasKernel: true,
    lower: (b) => ({ kind: 'conv', weight: b.weight, kernel: b.kernel, bias: b.bias, bn: b.bn, scale: b.scale }),
  },
  conv_bn: {
    label: 'conv+bn',
    long: 'convolution + BatchNorm',
    icon: 'symbol-operator',
    hasKernel: true,
    lower: (b) => ({ kind: 'conv', weight: b.weight, kernel: b.kernel, bias: b.bias, bn: b.bn, scale: b.scale }),
  },
  bn_identity: {
    label: 'bn(x)',
    long: 'identity BatchNorm',
    icon: 'symbol-constant',
    hasKernel: false,
    lower: (b) => ({ kind: 'identity', bn: b.bn, scale: b.scale }),
  },
  identity: {
    label: 'x',
    long: 'identity',
    icon: 'arrow-right',
    hasKernel: false,
    lower: (b) => ({ kind: 'identity', scale: b.scale }),
  },
  avgpool: {
    label: 'avg',
    long: 'average pooling (a 1/k² channel-diagonal kernel)',
    icon: 'symbol-number',
    hasKernel: true,
    lower: (b, ctx) => ({ kind: 'conv', weight: diagonalKernel(ctx, b.pool, 1 / prod(b.pool)), kernel: b.pool, bn: b.bn, scale: b.scale }),
  },
  sequential: {
    label: 'seq',
    long: 'two convolutions in series (one kernel)',
    icon: 'list-flat',
    hasKernel: true,
    lower: (b, ctx) => {
      const c = composeSequential(b.first, b.second, ctx);
      return { kind: 'conv', weight: c.weight, kernel: c.kernel, bias: c.bias, scale: b.scale };
    },
  },
  dilated: {
    label: 'dil',
    long: 'dilated convolution (kernel spread out)',
    icon: 'symbol-ruler',
    hasKernel: true,
    lower: (b, ctx) => {
      const d = dilateKernel(wholeWeight(b.weight, ctx.outChannels), ctx.outChannels * ctx.inPerGroup, b.kernel, b.dilation);
      return { kind: 'conv', weight: d.weight, kernel: d.kernel, bias: b.bias, bn: b.bn, scale: b.scale };
    },
  },
};

export const BRANCH_MODIFIERS: Record<BranchModifier, { label: string; long: string }> = {
  scaled: { label: '·α', long: 'scaled by a constant α' },
  subtracted: { label: '·(−1)', long: 'subtracted' },
};

/** Lowers one branch to a plain fusion term. */
export function lowerBranch(b: BranchSpec, ctx: LowerContext): ConvTerm | IdentityTerm {
  const def = BRANCH_KINDS[b.kind] as BranchKindDef<BranchKind>;
  return def.lower(b as never, ctx);
}

/** What a branch label needs (BranchInfo satisfies it). */
export interface BranchLabelInput {
  kind: BranchKind;
  kernel?: number[];
  scaled?: boolean;
  subtracted?: boolean;
}

/** One branch in RepFuse's notation: `3×3 conv+bn`, `bn(x)`, `1×1 conv·α`, `3×3 avg`. */
export function branchLabel(br: BranchLabelInput): string {
  const k = br.kernel && BRANCH_KINDS[br.kind].hasKernel ? `${br.kernel.join('×')} ` : '';
  return `${br.subtracted ? '−' : ''}${k}${BRANCH_KINDS[br.kind].label}${br.scaled ? BRANCH_MODIFIERS.scaled.label : ''}`;
}

/** Long description: `convolution + BatchNorm, scaled by a constant α`. */
export function branchLong(br: BranchLabelInput): string {
  return [BRANCH_KINDS[br.kind].long, br.scaled ? BRANCH_MODIFIERS.scaled.long : '', br.subtracted ? BRANCH_MODIFIERS.subtracted.long : ''].filter(Boolean).join(', ');
}
