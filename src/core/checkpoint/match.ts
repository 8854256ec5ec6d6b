// Building blocks for the family matchers (src/core/families/*): read a conv, a BN, an avg-pool or a
// conv+BN pair out of a checkpoint's module tree, with the module's own attributes when it was
// pickled. Anything that cannot be read exactly throws Reject with a sentence naming the module.
import type { BranchKind } from '../branches';
import { type CkptTensor, type ModuleNode } from './tree';

/** A block that looks like a family's but cannot be fused exactly: the message says why. */
export class Reject extends Error {}

export interface ConvRef {
  node: ModuleNode;
  weight: CkptTensor;
  bias?: CkptTensor;
  kernel: number[];
  /** From the pickled module, else undefined. */
  stride?: number[];
  padding?: number[];
  groups?: number;
  dilation?: number[];
}

export interface BNRef {
  node: ModuleNode;
  gamma?: CkptTensor;
  beta?: CkptTensor;
  mean: CkptTensor;
  variance: CkptTensor;
  eps: number;
  epsSource: 'model' | 'assumed' | 'override';
}

/** An average pooling of the block input (pickled attributes, or assumed for a state_dict). */
export interface PoolRef {
  /** Undefined when a state_dict cannot show the module (it has no tensors). */
  node?: ModuleNode;
  kernel: number[];
  stride?: number[];
  padding?: number[];
}

export interface CkptBranch {
  kind: BranchKind;
  /** The conv (for `sequential`: the second one, whose output is the branch's). */
  conv?: ConvRef;
  bn?: BNRef;
  /**
   * `sequential`: the first conv and its optional BN; `addIdentity` when the stored weight is a
   * residual on the identity (DBB's IdentityBasedConv1x1: kernel = weight + I).
   */
  first?: { conv: ConvRef; bn?: BNRef; addIdentity?: boolean };
  /** `sequential`: padding applied between the two convs (DBB's BNAndPadLayer pads with BN(0)). */
  seqPadding?: number[];
  /** `avgpool`, or the second step of a `sequential` branch (DBB's 1×1 → BN-pad → avg-pool). */
  pool?: PoolRef;
  /** A constant factor (PP-YOLOE's alpha, FastViT's layer scale), scalar or per channel. */
  scale?: CkptTensor;
  /** The branch is subtracted (times −1, after the factor). */
  negate?: boolean;
}

export type EpsOf = (n: ModuleNode) => Pick<BNRef, 'eps' | 'epsSource'>;

/** What a family matcher gets besides the node. */
export interface MatchContext {
  /** Epsilon of a BN module: from the module, the --eps override, or the family default. */
  eps(familyId: string): EpsOf;
  /** Every module path of the file, space-separated (family hints such as YOLOv6's ERBlock_). */
  allPaths: string;
  /** Output channels of the nearest module before `n` in state_dict order, when that order is known. */
  previousOutChannels(n: ModuleNode): number | undefined;
  /** `--family`: the family the user chose where a state_dict cannot tell variants apart. */
  forced?: string;
}

export interface MatchResult {
  /** The family actually matched (a shared matcher may decide between variants). */
  family: string;
  branches: CkptBranch[];
  /** BN on the sum (folded unless the family keeps it). */
  postBN?: BNRef;
  /** Own tensors of the block the fusion consumes (alpha, layer_scale). */
  ownTensors?: string[];
  /** What was inferred rather than read, in words. */
  assumptions?: string[];
  /** A stride the matcher inferred (from the family's layout) where the modules do not store one; stated in `assumptions`. */
  stride?: number[];
}

export const pyTuple = (v: unknown): number[] | undefined => {
  if (typeof v === 'number') return [v];
  if (Array.isArray(v) && v.every((x) => typeof x === 'number')) return v as number[];
  return undefined;
};

export const fmt = (k: number[]): string => k.join('×');

/** A conv module (a weight of rank ≥ 3 and no BN statistics), with its pickled attributes. */
export function asConv(n: ModuleNode | undefined): ConvRef | undefined {
  if (!n) return undefined;
  const w = n.tensors.get('weight');
  if (!w || w.shape.length < 3 || n.tensors.has('running_mean')) return undefined;
  const ref: ConvRef = { node: n, weight: w, bias: n.tensors.get('bias'), kernel: w.shape.slice(2) };
  if (n.className || n.attrs.size) {
    ref.stride = pyTuple(n.attrs.get('stride'));
    const pad = n.attrs.get('padding');
    const dil = pyTuple(n.attrs.get('dilation'));
    if (dil && dil.some((d) => d !== 1)) ref.dilation = dil.length === 1 ? ref.kernel.map(() => dil[0]) : dil;
    if (typeof pad === 'string') {
      const d = ref.dilation ?? ref.kernel.map(() => 1);
      if (pad === 'same') ref.padding = ref.kernel.map((k, i) => ((k - 1) * d[i]) / 2);
      else if (pad === 'valid') ref.padding = ref.kernel.map(() => 0);
    } else {
      const p = pyTuple(pad);
      ref.padding = p && p.length === 1 ? ref.kernel.map(() => p[0]) : p;
    }
    const g = n.attrs.get('groups');
    if (typeof g === 'number') ref.groups = g;
    const mode = n.attrs.get('padding_mode');
    if (typeof mode === 'string' && mode !== 'zeros') throw new Reject(`'${n.path}' pads with '${mode}', not zeros; padding would not commute with the sum.`);
  }
  return ref;
}

export function asBN(n: ModuleNode | undefined, eps: EpsOf): BNRef | undefined {
  if (!n) return undefined;
  const mean = n.tensors.get('running_mean');
  const variance = n.tensors.get('running_var');
  if (!mean || !variance) return undefined;
  if (n.attrs.get('track_running_stats') === false) throw new Reject(`'${n.path}' does not track running statistics.`);
  return { node: n, gamma: n.tensors.get('weight'), beta: n.tensors.get('bias'), mean, variance, ...eps(n) };
}

/** A conv followed by its BN, in any of the child namings the families use. */
export function asConvBN(n: ModuleNode | undefined, eps: EpsOf): { conv: ConvRef; bn: BNRef } | undefined {
  if (!n) return undefined;
  for (const [c, b] of [['conv', 'bn'], ['0', '1'], ['c', 'bn']]) {
    const conv = asConv(n.children.get(c));
    const bn = asBN(n.children.get(b), eps);
    if (conv && bn) return { conv, bn };
  }
  return undefined;
}

const isAvgPoolClass = (c: string | undefined) => !!c && /(^|\.)AvgPool[123]d$/.test(c);

/**
 * An nn.AvgPool2d module, checked to be exactly a 1/k² kernel of the block's size: centred
 * padding (or `expectPadding`), count_include_pad=True (zeros in the padding count, as in a conv), no ceil_mode, no
 * divisor_override. `stride` is checked by the block against its convs.
 */
export function asAvgPool(n: ModuleNode | undefined, expectPadding?: number[]): PoolRef | undefined {
  if (!n || !isAvgPoolClass(n.className)) return undefined;
  const ks = pyTuple(n.attrs.get('kernel_size'));
  if (!ks) throw new Reject(`'${n.path}' (${n.className}) has no readable kernel_size.`);
  const dims = n.className!.endsWith('1d') ? 1 : n.className!.endsWith('3d') ? 3 : 2;
  const kernel = ks.length === 1 ? new Array<number>(dims).fill(ks[0]) : ks;
  const st = pyTuple(n.attrs.get('stride'));
  const stride = !st || st.length === 0 ? kernel : st.length === 1 ? kernel.map(() => st[0]) : st;
  const pd = pyTuple(n.attrs.get('padding')) ?? [0];
  const padding = pd.length === 1 ? kernel.map(() => pd[0]) : pd;
  const what = `'${n.path}' (${n.className})`;
  if (n.attrs.get('count_include_pad') === false && padding.some((p) => p > 0)) throw new Reject(`${what} has count_include_pad=False: its border values are not a fixed kernel.`);
  if (n.attrs.get('ceil_mode') === true) throw new Reject(`${what} has ceil_mode=True: its output size is not a conv's.`);
  const div = n.attrs.get('divisor_override');
  if (div !== undefined && div !== null) throw new Reject(`${what} has divisor_override=${String(div)}; only the default 1/k² pooling can be merged.`);
  if (kernel.some((k) => k % 2 === 0)) throw new Reject(`${what} has an even kernel ${fmt(kernel)}, which has no centre.`);
  const want = expectPadding ?? kernel.map((k) => (k - 1) / 2);
  if (fmt(padding) !== fmt(want)) throw new Reject(`${what} pads ${fmt(padding)} for a ${fmt(kernel)} window; only ${expectPadding ? `padding ${fmt(want)}` : `centred pooling (padding ${fmt(want)})`} can be merged here.`);
  return { node: n, kernel, stride, padding };
}

/** Classes that do nothing to a tensor in eval mode (anywhere in a block). */
const INERT_CLASSES = /(^|\.)(Identity|Dropout\d?d?|AlphaDropout)$/;

export const isInertClass = (c: string | undefined): boolean => !!c && INERT_CLASSES.test(c);
