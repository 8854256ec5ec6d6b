// Block detection on an ONNX graph, in three steps (detect() lists them): Add trees whose leaves
// are parallel branches of one input, optionally followed by a BatchNormalization; linear regions
// those trees cannot express (region.ts) and BN → Gemm folds; standalone Conv → BN pairs.
import { familyByLabel, guessOnnxFamily } from '../families';
import { dtypeName, isFloatType } from '../dtype';
import type { BlockInfo, BranchInfo, FoldInfo, RejectedCandidate } from '../model';
import { type ConstRef, GraphIndex, commonScopeName } from './graph';
import { attrFloat, attrInt, attrInts, attrString, numelOf, type OnnxModel, type OnnxNode, readTensorValues } from './reader';
import { ConstFolder, findGemmFolds, findRegions, fuseRegion, nodeLabel, regionDtype, type RegionNodes, RegionReject } from './region';
import { regionBranches } from './regionterms';

export interface BNRef {
  node: OnnxNode;
  scale: ConstRef;
  bias: ConstRef;
  mean: ConstRef;
  variance: ConstRef;
  eps: number;
}

export interface ConvLeaf {
  kind: 'conv' | 'conv_bn';
  conv: OnnxNode;
  weight: ConstRef;
  bias?: ConstRef;
  bn?: BNRef;
  mul?: { node: OnnxNode; factor: ConstRef };
  kernel: number[];
  stride: number[];
  groups: number;
}

export interface IdentityLeaf {
  kind: 'identity' | 'bn_identity';
  bn?: BNRef;
}

export type Leaf = ConvLeaf | IdentityLeaf;

export const isConvLeaf = (l: Leaf): l is ConvLeaf => l.kind === 'conv' || l.kind === 'conv_bn';

export interface OnnxBlock {
  info: BlockInfo;
  /** The tensor every branch reads. */
  x: string;
  /** The tensor the block produces (root Add, or the post-add BN); the fused Conv keeps this name. */
  output: string;
  leaves: Leaf[];
  postBN?: BNRef;
  /** All nodes the fused Conv replaces. */
  nodes: OnnxNode[];
  dtype: number;
  kernel: number[];
  stride: number[];
  groups: number;
  inPerGroup: number;
  outChannels: number;
  /** A Conv of the block whose attributes (other than geometry) the fused Conv inherits. */
  template: OnnxNode;
  /** Constant zeros added in the tree (MobileOne's `out = 0 + …`): they vanish with the block. */
  zeros: ConstRef[];
  /**
   * A linear region or a BN → Gemm fold: its replacement was computed at detection (float64), and
   * the writer emits it as is; `leaves` is then empty.
   */
  fused?: FusedOp;
  /** A linear region: its nodes (data and shape), for the per-branch statistics (regionstats.ts). */
  region?: RegionNodes;
}

/** One node computed at detection that replaces a region: its weight, bias and attributes. */
export interface FusedOp {
  op: 'Conv' | 'Gemm';
  weight: Float64Array;
  weightDims: number[];
  bias: Float64Array;
  /** Conv: pads [begin…, end…]; Gemm: unused. */
  pads: number[];
  /** Gemm: transB and alpha of the original node. */
  transB?: number;
  alpha?: number;
  /** What the region was, for the node's doc string. */
  what: string;
}

export interface OnnxFold {
  info: FoldInfo;
  conv: OnnxNode;
  bn: BNRef;
  weight: ConstRef;
  bias?: ConstRef;
  kernel: number[];
  stride: number[];
  groups: number;
  output: string;
  dtype: number;
}

export interface Detection {
  index: GraphIndex;
  blocks: OnnxBlock[];
  rejected: RejectedCandidate[];
  folds: OnnxFold[];
  notFolded: RejectedCandidate[];
  /** Add trees that are residual connections (one branch plus a shortcut), left as they are. */
  residuals: number;
}

export interface DetectOptions {
  foldBN: boolean;
  /** Fuse linear regions the plain detector cannot express (default true). */
  regions?: boolean;
}

/** Thrown inside the analysis of one candidate; becomes a RejectedCandidate. */
class Reject extends Error {}

/**
 * Most terms (and Add nodes) a sum may have to be looked at as a block. Real blocks have a handful
 * of branches; a hostile chain of thousands of Adds or a Sum of thousands of convolutions would
 * otherwise recurse that deep and cost quadratic time.
 */
export const MAX_BLOCK_TERMS = 64;
class TooBig extends Error {}

declare const opBrand: unique symbol;
/** A node known to have a given op type (branded so a failed check does not narrow to never). */
type OpNode = OnnxNode & { readonly [opBrand]: true };
const isOp = (n: OnnxNode | undefined, op: string): n is OpNode => !!n && n.opType === op && (n.domain === '' || n.domain === 'ai.onnx');
const label = (n: OnnxNode) => `${n.opType} '${n.name || n.outputs[0]}'`;
const fmtK = (k: number[]) => k.join('×');

interface ConvGeometry {
  kernel: number[];
  stride: number[];
  groups: number;
  outChannels: number;
  inPerGroup: number;
}

/**
 * Block detection on an ONNX graph: the steps below, in order, over one shared state. Each step
 * claims the nodes it replaces, so a later step never takes them again.
 */
export function detect(model: OnnxModel, opts: DetectOptions): Detection {
  const cx = new DetectContext(model);
  addTreeBlocks(cx); // 1. RepVGG, MobileOne, ACNet, QARepVGG, … (exact fusion of the branch terms)
  if (opts.regions !== false) linearRegions(model, cx.index, cx.det, cx.claimed); // 2. linear regions, BN → Gemm (region.ts)
  sortBlocksByPosition(cx.det);
  if (opts.foldBN) convBNFolds(cx); // 3. what is left of Conv → BN
  return cx.det;
}

/** What the steps of detect() share: the graph, its index, the result so far and the nodes taken. */
class DetectContext {
  readonly index: GraphIndex;
  readonly det: Detection;
  /** Nodes that belong to a block or a fold already. */
  readonly claimed = new Set<OnnxNode>();
  readonly nodes: OnnxNode[];
  /** Every node name, once: model-wide family hints (YOLOv6's ERBlock_ names mark its stem too). */
  private allNames: string | undefined;

  constructor(readonly model: OnnxModel) {
    this.index = new GraphIndex(model);
    this.det = { index: this.index, blocks: [], rejected: [], folds: [], notFolded: [], residuals: 0 };
    this.nodes = model.graph.nodes;
  }

  modelNames(): string {
    return (this.allNames ??= this.nodes.map((n) => n.name).join(' '));
  }
}

const isAddLike = (n: OnnxNode | undefined): n is OpNode => isOp(n, 'Add') || isOp(n, 'Sum');

/** An Add whose only reader is another Add of the same tree. */
function isInner(cx: DetectContext, n: OnnxNode): boolean {
  const out = n.outputs[0];
  const c = cx.index.consumersOf(out);
  return c.length === 1 && isAddLike(c[0]) && cx.index.usedOnlyBy(out, c[0]);
}

// ----- step 1: Add trees of parallel branches -------------------------------------------------------

/** Every Add tree rooted at an Add/Sum that is not an inner node of a larger tree. */
function addTreeBlocks(cx: DetectContext): void {
  for (const r of cx.nodes.filter((n) => isAddLike(n) && !isInner(cx, n))) visitAddTree(cx, r);
}

/**
 * Makes a block of the Add tree at `root`, or else of the subtrees it contains; true when any was
 * made. `report`: list a rejection of this tree (off inside a tree that is itself rejected).
 */
function visitAddTree(cx: DetectContext, root: OnnxNode, report = true): boolean {
  const { index, det } = cx;
  let res: ReturnType<typeof analyzeAddTree>;
  try {
    res = analyzeAddTree(cx, root);
  } catch (err) {
    if (err instanceof TooBig) return false; // a sum of that many terms is no re-parameterization block, nor are its parts
    throw err;
  }
  if (res && typeof res === 'object' && 'info' in res) {
    for (const n of res.nodes) cx.claimed.add(n);
    det.blocks.push(res);
    return true;
  }
  const rejected = res && res !== 'residual' ? res : undefined;
  // A tree that mixes inputs may still contain a fusable subtree (e.g. rep(x) + shortcut(z)).
  let any = false;
  for (const i of root.inputs) {
    const p = index.producer.get(i);
    if (isAddLike(p) && index.usedOnlyBy(i, root)) any = visitAddTree(cx, p, report && !rejected) || any;
  }
  if (!any && res === 'residual') det.residuals++;
  else if (!any && rejected && report) det.rejected.push(rejected);
  return any;
}

/** The Add tree at `root`: its Add nodes and its leaves. Throws TooBig past MAX_BLOCK_TERMS. */
function collectAddTree(cx: DetectContext, root: OnnxNode): { adds: OnnxNode[]; leaves: string[] } {
  const adds: OnnxNode[] = [];
  const leaves: string[] = [];
  const walk = (n: OnnxNode) => {
    adds.push(n);
    if (adds.length > MAX_BLOCK_TERMS || n.inputs.length > MAX_BLOCK_TERMS) throw new TooBig();
    for (const i of n.inputs) {
      const p = cx.index.producer.get(i);
      if (isAddLike(p) && cx.index.usedOnlyBy(i, n)) walk(p);
      else leaves.push(i);
    }
    if (leaves.length > MAX_BLOCK_TERMS) throw new TooBig();
  };
  walk(root);
  return { adds, leaves };
}

/** Tries to make a block of the Add tree at `root`. Returns a block, a rejection, or nothing. */
function analyzeAddTree(cx: DetectContext, root: OnnxNode): OnnxBlock | RejectedCandidate | 'residual' | undefined {
  const { index } = cx;
  if (!root.outputs[0]) return undefined; // a corrupt node without an output: nothing to replace
  const { adds, leaves: all } = collectAddTree(cx, root);
  // `0 + …` (MobileOne starts its sum from a constant zero) contributes nothing.
  const zeros: ConstRef[] = [];
  const leaves = all.filter((t) => {
    const z = zeroConstant(cx, t);
    if (z) zeros.push(z);
    return !z;
  });
  const candidates = [...new Set(leaves.flatMap((t) => convInputs(cx, t)))];
  if (candidates.length === 0) return undefined; // no Conv among the leaves: not a re-param block
  const treeOut = root.outputs[0];
  let lastReject: string | undefined;
  for (const x of candidates) {
    try {
      const classified = leaves.map((t) => classifyBranch(cx, t, x));
      if (classified.some((c) => !c)) continue;
      return buildBlock(cx, adds, classified as Branch[], x, treeOut, zeros);
    } catch (err) {
      if (!(err instanceof Reject)) throw err;
      lastReject = err.message;
    }
  }
  const parts = [...adds];
  for (const t of leaves) {
    const p = index.producer.get(t);
    if (p) parts.push(p);
  }
  const name = nameFor(parts, treeOut);
  if (lastReject) return { name, reason: lastReject, parts: parts.map((n) => n.name || n.outputs[0]) };
  // One conv-like branch plus anything else is a residual connection (x + f(x)), not a
  // re-parameterization block: count it, do not list it as a near miss.
  const convLike = leaves.filter((t) => {
    const p = index.producer.get(t);
    return isOp(p, 'Conv') || isOp(p, 'BatchNormalization') || (isOp(p, 'Mul') && p.inputs.some((i) => index.constant(i)));
  });
  if (convLike.length < 2 || leaves.some((a) => leaves.some((b) => a !== b && feeds(cx, a, b)))) return 'residual';
  const reads = leaves.map((t) => {
    const ins = convInputs(cx, t);
    return ins.length ? `'${ins[0]}'` : `'${t}'`;
  });
  return {
    name,
    reason: `branches read different tensors (${[...new Set(reads)].join(', ')}), so they are not parallel branches of one input.`,
    parts: parts.map((n) => n.name || n.outputs[0]),
  };
}

/** A constant zero term of a sum (MobileOne's `0 + …`), or undefined. */
function zeroConstant(cx: DetectContext, t: string): ConstRef | undefined {
  const c = cx.index.constant(t);
  if (!c || !isFloatType(c.tensor.dtype) || numelOf(c.tensor.dims) > 4096) return undefined;
  const v = readTensorValues(cx.model, c.tensor);
  for (let i = 0; i < v.length; i++) if (v[i] !== 0) return undefined;
  return c;
}

/** Inputs a leaf would read if it were a conv branch (candidates for the block input x). */
function convInputs(cx: DetectContext, t: string, depth = 0): string[] {
  const { index } = cx;
  const p = index.producer.get(t);
  if (!p || depth > 1) return [];
  if (isOp(p, 'Conv')) return [p.inputs[0]];
  if (isOp(p, 'BatchNormalization')) {
    const q = index.producer.get(p.inputs[0]);
    return isOp(q, 'Conv') ? [q.inputs[0]] : [];
  }
  // Mul by a constant factor (PP-YOLOE's alpha); an activation such as SiLU's x·σ(x) is not one.
  if (isOp(p, 'Mul') && p.inputs.some((i) => index.constant(i))) return p.inputs.flatMap((i) => convInputs(cx, i, depth + 1));
  return [];
}

/** True when tensor `a` is computed before, and used to compute, tensor `b` (bounded search). */
function feeds(cx: DetectContext, a: string, b: string): boolean {
  const seen = new Set<string>();
  const stack = [b];
  while (stack.length && seen.size < 256) {
    const t = stack.pop()!;
    const p = cx.index.producer.get(t);
    if (!p) continue;
    for (const i of p.inputs) {
      if (i === a) return true;
      if (i && !seen.has(i)) {
        seen.add(i);
        stack.push(i);
      }
    }
  }
  return false;
}

// ----- branches (the leaves of a sum) ----------------------------------------------------------------

/** One term of a sum read as a branch of x: the leaf, its nodes, and the node that produces the term. */
interface Branch {
  leaf: Leaf;
  nodes: OnnxNode[];
  head: OnnxNode | undefined;
}

/** Interprets tensor `t` as a branch of `x`, or returns undefined. Throws Reject for fatal problems. */
function classifyBranch(cx: DetectContext, t: string, x: string, allowMul = true): Branch | undefined {
  const { index } = cx;
  if (t === x) return { leaf: { kind: 'identity' }, nodes: [], head: undefined };
  const p = index.producer.get(t);
  if (!p) return undefined;
  if (isOp(p, 'Conv') && p.inputs[0] === x) return { leaf: convLeaf(cx, p), nodes: [p], head: p };
  if (isOp(p, 'BatchNormalization')) {
    if (p.inputs[0] === x) return { leaf: { kind: 'bn_identity', bn: bnRef(cx, p) }, nodes: [p], head: p };
    const q = index.producer.get(p.inputs[0]);
    if (isOp(q, 'Conv') && q.inputs[0] === x) {
      if (!index.usedOnlyBy(q.outputs[0], p)) throw new Reject(`output of ${label(q)} is also used by ${index.otherUses(q.outputs[0], p)}.`);
      const leaf = convLeaf(cx, q);
      leaf.kind = 'conv_bn';
      leaf.bn = bnRef(cx, p);
      return { leaf, nodes: [q, p], head: p };
    }
  }
  if (allowMul && isOp(p, 'Mul') && p.inputs.length === 2) {
    for (const side of [0, 1]) {
      const factor = index.constant(p.inputs[1 - side]);
      if (!factor) continue;
      const inner = classifyBranch(cx, p.inputs[side], x, false);
      if (!inner || inner.leaf.kind === 'identity' || inner.leaf.kind === 'bn_identity') return undefined;
      const h = inner.head!;
      if (!index.usedOnlyBy(h.outputs[0], p)) throw new Reject(`output of ${label(h)} is also used by ${index.otherUses(h.outputs[0], p)}.`);
      (inner.leaf as ConvLeaf).mul = { node: p, factor };
      return { leaf: inner.leaf, nodes: [...inner.nodes, p], head: p };
    }
  }
  return undefined;
}

/** A BatchNormalization in inference mode with constant parameters. */
function bnRef(cx: DetectContext, n: OnnxNode): BNRef {
  const { index } = cx;
  if (n.inputs.length < 5) throw new Reject(`${label(n)} has ${n.inputs.length} inputs; expected 5.`);
  if (attrInt(n, 'training_mode', 0) !== 0) throw new Reject(`${label(n)} is in training mode (training_mode=1).`);
  for (const extra of n.outputs.slice(1)) {
    if (extra && (index.consumersOf(extra).length || index.graphOutputs.has(extra))) throw new Reject(`${label(n)} uses its running-statistics outputs (training mode).`);
  }
  const c = (i: number, what: string) => {
    const r = index.constant(n.inputs[i]);
    if (!r) throw new Reject(`${what} of ${label(n)} is computed at run time, not a constant.`);
    if (!isFloatType(r.tensor.dtype)) throw new Reject(`${what} of ${label(n)} is ${dtypeName(r.tensor.dtype)}, not a float.`);
    return r;
  };
  return { node: n, scale: c(1, 'scale'), bias: c(2, 'bias'), mean: c(3, 'running mean'), variance: c(4, 'running variance'), eps: attrFloat(n, 'epsilon', 1e-5) };
}

/**
 * A Conv whose weight (and bias) are constants. `forFold`: a standalone Conv → BN fold keeps the
 * Conv's own attributes, so the geometry limits of multi-branch fusion (centred pads, dilation 1,
 * odd kernels) do not apply.
 */
function convLeaf(cx: DetectContext, conv: OnnxNode, forFold = false): ConvLeaf {
  const weight = cx.index.constant(conv.inputs[1]);
  if (!weight) throw new Reject(`weight of ${label(conv)} is computed at run time, not a constant.`);
  let bias: ConstRef | undefined;
  if (conv.inputs[2]) {
    bias = cx.index.constant(conv.inputs[2]);
    if (!bias) throw new Reject(`bias of ${label(conv)} is computed at run time, not a constant.`);
  }
  if (!isFloatType(weight.tensor.dtype)) throw new Reject(`weight of ${label(conv)} is ${dtypeName(weight.tensor.dtype)}; only float weights can be fused.`);
  if (bias && !isFloatType(bias.tensor.dtype)) throw new Reject(`bias of ${label(conv)} is ${dtypeName(bias.tensor.dtype)}; only float biases can be fused.`);
  if (forFold) {
    const w = weight.tensor.dims;
    if (w.length < 3) throw new Reject(`weight of ${label(conv)} has shape ${fmtK(w)}; expected [out, in/groups, ...kernel].`);
    return { kind: 'conv', conv, weight, bias, kernel: w.slice(2), stride: attrInts(conv, 'strides') ?? w.slice(2).map(() => 1), groups: attrInt(conv, 'group', 1) };
  }
  const g = geometry(conv, weight);
  return { kind: 'conv', conv, weight, bias, kernel: g.kernel, stride: g.stride, groups: g.groups };
}

/** Kernel, stride, groups and channels of a Conv that can join a multi-branch fusion (centred, dilation 1, odd kernel). */
function geometry(conv: OnnxNode, weight: ConstRef): ConvGeometry {
  const w = weight.tensor.dims;
  if (w.length < 3) throw new Reject(`weight of ${label(conv)} has shape ${fmtK(w)}; expected [out, in/groups, ...kernel].`);
  const kernel = w.slice(2);
  const r = kernel.length;
  const ks = attrInts(conv, 'kernel_shape');
  if (ks && fmtK(ks) !== fmtK(kernel)) throw new Reject(`${label(conv)} declares kernel_shape ${fmtK(ks)} but its weight is ${fmtK(kernel)}.`);
  const stride = attrInts(conv, 'strides') ?? new Array(r).fill(1);
  const dil = attrInts(conv, 'dilations') ?? new Array(r).fill(1);
  if (dil.some((d) => d !== 1)) throw new Reject(`${label(conv)} has dilation ${fmtK(dil)}; only dilation 1 can be merged.`);
  if (kernel.some((k) => k % 2 === 0)) throw new Reject(`${label(conv)} has an even kernel ${fmtK(kernel)}, which has no centre.`);
  const autoPad = attrString(conv, 'auto_pad') ?? 'NOTSET';
  if (autoPad === 'VALID') {
    if (kernel.some((k) => k !== 1)) throw new Reject(`${label(conv)} uses auto_pad=VALID with a ${fmtK(kernel)} kernel, which is not centred.`);
  } else if (autoPad === 'SAME_UPPER' || autoPad === 'SAME_LOWER') {
    if (stride.some((s) => s !== 1)) throw new Reject(`${label(conv)} uses auto_pad=${autoPad} with stride ${fmtK(stride)}; its padding depends on the input size.`);
  } else if (autoPad === 'NOTSET') {
    const pads = attrInts(conv, 'pads') ?? new Array(2 * r).fill(0);
    const want = kernel.map((k) => (k - 1) / 2);
    if (pads.length !== 2 * r || want.some((p, i) => pads[i] !== p || pads[i + r] !== p)) {
      throw new Reject(`pads [${pads.join(', ')}] of ${label(conv)} do not centre its ${fmtK(kernel)} kernel (need [${[...want, ...want].join(', ')}]).`);
    }
  } else throw new Reject(`${label(conv)} has unknown auto_pad '${autoPad}'.`);
  const groups = attrInt(conv, 'group', 1);
  return { kernel, stride, groups, outChannels: w[0], inPerGroup: w[1] };
}

// ----- a block from classified branches --------------------------------------------------------------

/** The block of a sum whose terms are all branches of `x`; throws Reject when they cannot be one conv. */
function buildBlock(cx: DetectContext, adds: OnnxNode[], classified: Branch[], x: string, treeOut: string, zeros: ConstRef[]): OnnxBlock {
  const { index } = cx;
  // Every intermediate tensor must feed only the next node of its branch.
  for (const c of classified) {
    if (!c.head) continue;
    const out = c.head.outputs[0];
    const reader = adds.find((a) => a.inputs.includes(out))!;
    if (!index.usedOnlyBy(out, reader)) throw new Reject(`output of ${label(c.head)} is also used by ${index.otherUses(out, reader)}.`);
  }
  const convs = classified.map((c) => c.leaf).filter(isConvLeaf);
  if (convs.length === 0) throw new Reject('no convolution branch.');
  const first = convs[0];
  const g0 = commonGeometry(convs, zeros);
  const kernel = g0.kernel.map((_, i) => Math.max(...convs.map((l) => l.kernel[i])));
  const cout = g0.outChannels;
  const cin = g0.inPerGroup * g0.groups;
  const hasIdentity = classified.some((c) => c.leaf.kind === 'identity' || c.leaf.kind === 'bn_identity');
  if (hasIdentity) {
    if (g0.stride.some((s) => s !== 1)) throw new Reject(`an identity branch cannot join convolutions with stride ${fmtK(g0.stride)}.`);
    if (cin !== cout) throw new Reject(`an identity branch needs as many input as output channels (in ${cin}, out ${cout}).`);
  }
  for (const c of classified) {
    const bn = (c.leaf as ConvLeaf).bn;
    if (bn) checkBNChannels(bn, cout);
    const mul = (c.leaf as ConvLeaf).mul;
    if (mul) checkFactor(mul.node, mul.factor, cout, g0.kernel.length);
  }
  const { output, postBN } = postAddBN(cx, treeOut, cout);
  const nodes = [...adds, ...classified.flatMap((c) => c.nodes)];
  if (postBN) nodes.push(postBN.node);
  for (const n of nodes) {
    if (cx.claimed.has(n)) throw new Reject(`${label(n)} already belongs to another block.`);
  }
  const branches: BranchInfo[] = classified.map((c) => branchInfo(c.leaf, c.nodes, cout));
  const name = nameFor(nodes, output);
  const paramsBefore = branches.reduce((a, b) => a + b.params, 0) + (postBN ? 4 * cout : 0);
  const info: BlockInfo = {
    name,
    family: guessFamily(nodes, classified.map((c) => c.leaf), !!postBN, g0.groups, cin, cout, cx.modelNames()),
    kernel,
    stride: g0.stride,
    groups: g0.groups,
    inChannels: cin,
    outChannels: cout,
    branches,
    postBN: postBN ? { epsilon: postBN.eps, epsilonSource: 'model' } : undefined,
    activation: activationAfter(cx, output),
    output,
    paramsBefore,
    paramsAfter: cout * g0.inPerGroup * numelOf(kernel) + cout,
  };
  return {
    info,
    x,
    output,
    leaves: classified.map((c) => c.leaf),
    postBN,
    nodes,
    dtype: first.weight.tensor.dtype,
    kernel,
    stride: g0.stride,
    groups: g0.groups,
    inPerGroup: g0.inPerGroup,
    outChannels: cout,
    template: first.conv,
    zeros,
  };
}

/**
 * The geometry of the first conv branch, after checking that every other conv branch agrees with
 * it (stride, groups, rank, channels, weight type) and that the zeros of the sum are no-ops.
 */
function commonGeometry(convs: ConvLeaf[], zeros: ConstRef[]): ConvGeometry {
  const first = convs[0];
  const g0 = geometry(first.conv, first.weight);
  // A zero of higher rank than the output would broadcast it to a new shape: not a no-op.
  for (const z of zeros) {
    if (z.tensor.dims.length > 2 + g0.kernel.length || numelOf(z.tensor.dims) !== 1) {
      throw new Reject(`the constant zero added to the sum has shape ${fmtK(z.tensor.dims) || 'scalar'}, which would change the output shape.`);
    }
  }
  for (const l of convs.slice(1)) {
    const g = geometry(l.conv, l.weight);
    if (fmtK(g.stride) !== fmtK(g0.stride)) throw new Reject(`branches have different strides (${fmtK(g0.stride)} in ${label(first.conv)}, ${fmtK(g.stride)} in ${label(l.conv)}).`);
    if (g.groups !== g0.groups) throw new Reject(`branches have different groups (${g0.groups} in ${label(first.conv)}, ${g.groups} in ${label(l.conv)}).`);
    if (g.kernel.length !== g0.kernel.length) throw new Reject(`branches mix ${g0.kernel.length}-D and ${g.kernel.length}-D convolutions.`);
    if (g.outChannels !== g0.outChannels || g.inPerGroup !== g0.inPerGroup) {
      throw new Reject(`branches have different channel counts (${label(first.conv)} ${g0.inPerGroup * g0.groups}→${g0.outChannels}, ${label(l.conv)} ${g.inPerGroup * g.groups}→${g.outChannels}).`);
    }
    if (l.weight.tensor.dtype !== first.weight.tensor.dtype) {
      throw new Reject(`branches have different weight types (${dtypeName(first.weight.tensor.dtype)} and ${dtypeName(l.weight.tensor.dtype)}).`);
    }
  }
  return g0;
}

/** The optional BatchNormalization on the sum (QARepVGG's post-add BN): the block then ends at its output. */
function postAddBN(cx: DetectContext, treeOut: string, cout: number): { output: string; postBN?: BNRef } {
  const { index } = cx;
  const after = index.consumersOf(treeOut);
  if (after.length === 1 && isOp(after[0], 'BatchNormalization') && after[0].inputs[0] === treeOut && after[0].outputs[0] && index.usedOnlyBy(treeOut, after[0])) {
    const postBN = bnRef(cx, after[0]);
    checkBNChannels(postBN, cout);
    return { output: after[0].outputs[0], postBN };
  }
  return { output: treeOut };
}

function nameFor(parts: OnnxNode[], output: string): string {
  return commonScopeName(parts.map((n) => n.name)) ?? output;
}

function checkBNChannels(bn: BNRef, c: number): void {
  for (const r of [bn.scale, bn.bias, bn.mean, bn.variance]) {
    if (numelOf(r.tensor.dims) !== c) throw new Reject(`${label(bn.node)} has ${numelOf(r.tensor.dims)} channels, the branch has ${c}.`);
  }
}

function checkFactor(mul: OnnxNode, f: ConstRef, cout: number, spatialRank: number): void {
  const d = f.tensor.dims;
  const n = numelOf(d);
  if (!isFloatType(f.tensor.dtype)) throw new Reject(`factor of ${label(mul)} is ${dtypeName(f.tensor.dtype)}, not a float.`);
  // A factor of higher rank than the output would broadcast the output to a new shape.
  const outRank = 2 + spatialRank;
  if (d.length > outRank) throw new Reject(`factor of ${label(mul)} has rank ${d.length}, more than the branch output's ${outRank}: it would change the output shape.`);
  if (n === 1) return;
  // Per-channel: broadcast against [N, C, ...spatial] must touch only the channel axis.
  const ok = n === cout && d.length <= outRank && d.length >= outRank - 1 && d.every((v, i) => (outRank - d.length + i === 1 ? v === cout : v === 1));
  if (!ok) throw new Reject(`factor of ${label(mul)} has shape ${fmtK(d)}; only a scalar or a per-channel factor can be folded.`);
}

/** The activation that reads the block's output, when there is exactly one (SiLU as Sigmoid + Mul). */
function activationAfter(cx: DetectContext, out: string): string | undefined {
  const c = cx.index.consumersOf(out);
  if (c.length === 1) return c[0].opType;
  if (c.length === 2) {
    const sig = c.find((n) => isOp(n, 'Sigmoid'));
    const mul = c.find((n) => isOp(n, 'Mul'));
    if (sig && mul && mul.inputs.includes(sig.outputs[0])) return 'SiLU';
  }
  return undefined;
}

/** Blocks in the order of their last node in the graph (step 2 appends regions after step 1's blocks). */
function sortBlocksByPosition(det: Detection): void {
  det.blocks.sort((a, b) => Math.max(...a.nodes.map((n) => n.index)) - Math.max(...b.nodes.map((n) => n.index)));
}

// ----- step 3: standalone Conv → BN -----------------------------------------------------------------

/** Every Conv → BN pair no block took: a fold, or a named reason why not. */
function convBNFolds(cx: DetectContext): void {
  const { index, det, claimed } = cx;
  for (const n of cx.nodes) {
    if (!isOp(n, 'BatchNormalization') || claimed.has(n) || !n.outputs[0]) continue;
    const conv = index.producer.get(n.inputs[0]);
    if (!isOp(conv, 'Conv') || claimed.has(conv)) continue;
    const name = commonScopeName([conv.name, n.name]) ?? n.outputs[0];
    try {
      if (!index.usedOnlyBy(conv.outputs[0], n)) throw new Reject(`output of ${label(conv)} is also used by ${index.otherUses(conv.outputs[0], n)}.`);
      const leaf = convLeaf(cx, conv, true);
      const bn = bnRef(cx, n);
      checkBNChannels(bn, leaf.weight.tensor.dims[0]);
      det.folds.push({
        info: { name, conv: conv.name || conv.outputs[0], bn: n.name || n.outputs[0], epsilon: bn.eps },
        conv,
        bn,
        weight: leaf.weight,
        bias: leaf.bias,
        kernel: leaf.kernel,
        stride: leaf.stride,
        groups: leaf.groups,
        output: n.outputs[0],
        dtype: leaf.weight.tensor.dtype,
      });
      claimed.add(conv);
      claimed.add(n);
    } catch (err) {
      if (!(err instanceof Reject)) throw err;
      det.notFolded.push({ name, reason: err.message, parts: [conv.name, n.name] });
    }
  }
}

function paramsOf(r: ConstRef | undefined): number {
  return r ? numelOf(r.tensor.dims) : 0;
}

function branchInfo(leaf: Leaf, nodes: OnnxNode[], cout: number): BranchInfo {
  const parts = nodes.map((n) => n.name || n.outputs[0]);
  if (leaf.kind === 'identity') return { kind: 'identity', hasBias: false, hasBN: false, params: 0, parts };
  if (leaf.kind === 'bn_identity') {
    return { kind: 'bn_identity', hasBias: false, hasBN: true, epsilon: leaf.bn!.eps, epsilonSource: 'model', params: 4 * cout, parts };
  }
  if (!isConvLeaf(leaf)) throw new Error('unreachable');
  return {
    kind: leaf.kind,
    kernel: leaf.kernel,
    hasBias: !!leaf.bias,
    hasBN: !!leaf.bn,
    epsilon: leaf.bn?.eps,
    epsilonSource: leaf.bn ? 'model' : undefined,
    scaled: !!leaf.mul,
    params: paramsOf(leaf.weight) + paramsOf(leaf.bias) + (leaf.bn ? 4 * cout : 0) + paramsOf(leaf.mul?.factor),
    dtype: dtypeName(leaf.weight.tensor.dtype),
    parts,
  };
}

/** A best guess from the module names the exporter kept, then from the structure: the family registry decides (src/core/families). */
export function guessFamily(nodes: OnnxNode[], leaves: Leaf[], postBN: boolean, groups: number, cin: number, cout: number, modelNames?: string): string {
  const convs = leaves.filter(isConvLeaf);
  return guessOnnxFamily({
    names: nodes.map((n) => n.name).join(' '),
    modelNames,
    kinds: leaves.map((l) => l.kind),
    postBN,
    scaled: convs.some((l) => l.mul),
    asym: convs.some((l) => new Set(l.kernel).size > 1),
    depthwise: groups > 1 && groups === cin && cin === cout,
  });
}

// ----- step 2: linear regions and BN → Gemm folds -----------------------------------------------

/**
 * Regions between one tensor and another made only of linear ops (see region.ts) that the plain
 * detector could not express as one block: DBB's avg-pool and 1×1→k×k branches, RepMixer,
 * RepCPE, post-add BNs, YOLOv7's implicit add/multiply. A region that exactly covers plain blocks
 * keeps them (their exact fusion is faster); one that contains plain blocks replaces them.
 */
function linearRegions(model: OnnxModel, index: GraphIndex, det: Detection, claimed: Set<OnnxNode>): void {
  const consts = new ConstFolder(model, index);
  const owner = new Map<OnnxNode, OnnxBlock>();
  for (const b of det.blocks) for (const n of b.nodes) owner.set(n, b);
  const blocked = new Map<OnnxNode, { why: string; join: OnnxNode }>();
  for (const cand of findRegions(model, index, consts, new Set(), blocked)) {
    const data = new Set(cand.data);
    const inside = new Set<OnnxBlock>();
    for (const n of cand.data) {
      const b = owner.get(n);
      if (b) inside.add(b);
    }
    if ([...inside].some((b) => b.nodes.some((n) => !data.has(n)))) continue; // overlaps a block partly
    const covered = [...inside].reduce((a, b) => a + b.nodes.length, 0);
    if (covered === cand.data.length) continue; // exactly plain blocks
    if (cand.data.some((n) => claimed.has(n) && !owner.has(n))) continue;
    const names = cand.data.map((n) => n.name);
    const name = commonScopeName(names) ?? cand.y;
    const parts = cand.data.map((n) => n.name || n.outputs[0]);
    // The plain detector's reason for the same nodes is the more specific one: one entry per candidate.
    const reject = (reason: string) => {
      const ps = new Set(parts);
      // A region around plain blocks that stay fused (a residual x + block(x)) is no near miss; one
      // that also holds convolutions or BNs of its own (UniRepLKNet's dilated branches beside a
      // plain large-kernel pair) is: those stay unfused, and the report must say so.
      const own = cand.data.filter((n) => !owner.has(n) && (n.opType === 'Conv' || n.opType === 'BatchNormalization'));
      if (inside.size && !own.length) return;
      if (inside.size) reason += ` The plain block${inside.size === 1 ? '' : 's'} inside (${[...inside].map((b) => b.info.name).join(', ')}) stay${inside.size === 1 ? 's' : ''} fused; ${own.length} Conv/BatchNormalization node${own.length === 1 ? '' : 's'} of the region (${own.slice(0, 3).map(nodeLabel).join(', ')}${own.length > 3 ? ', …' : ''}) are left as they are.`;
      if (!det.rejected.some((rj) => rj.parts.some((p) => ps.has(p)))) det.rejected.push({ name, reason, parts });
    };
    let fused;
    try {
      fused = fuseRegion(cand, consts, index);
    } catch (e) {
      // RangeError: shapes too big to allocate (a corrupt or hostile file).
      if (!(e instanceof RegionReject) && !(e instanceof RangeError)) throw e;
      reject(`linear region from '${cand.x}' to '${cand.y}': ${e instanceof RangeError ? 'its shapes are too big to evaluate.' : (e as Error).message}`);
      continue;
    }
    const convWeights = cand.data.filter((n) => n.opType === 'Conv').reduce((a, n) => a + (consts.value(n.inputs[1])?.data.length ?? 0), 0);
    if (convWeights > 0 && fused.weight.length > convWeights) {
      reject(`linear region from '${cand.x}' to '${cand.y}' equals one ${fused.shape.slice(2).join('×')} convolution, but it would have ${fused.weight.length} weights where the region's convolutions have ${convWeights}; left as it is.`);
      continue;
    }
    for (const b of inside) det.blocks.splice(det.blocks.indexOf(b), 1);
    for (const n of cand.data) claimed.add(n);
    // Near misses of the plain detector inside the region are resolved by it.
    const partNames = new Set(parts);
    det.rejected = det.rejected.filter((rj) => !rj.parts.length || !rj.parts.every((p) => partNames.has(p)));
    const [cout, ipg, ...kernel] = fused.shape;
    const stride = fused.stride;
    const dtype = regionDtype(cand, model);
    const branches = regionBranches(cand.x, cand.y, cand.data, index);
    const postBN = index.producer.get(cand.y)?.opType === 'BatchNormalization' && branches.length > 1;
    const guess = guessOnnxFamily({
      names: names.join(' '),
      kinds: branches.map((b) => b.kind),
      postBN,
      scaled: branches.some((b) => b.scaled),
      asym: kernel.length > 1 && new Set(kernel).size > 1,
      depthwise: fused.groups > 1 && fused.groups === fused.inChannels && fused.inChannels === cout,
    });
    const info: BlockInfo = {
      name,
      family: familyByLabel(guess) ? guess : regionFamily(names.join(' ')),
      kernel,
      stride,
      groups: fused.groups,
      inChannels: fused.inChannels,
      outChannels: cout,
      branches,
      activation: activationOf(index, cand.y),
      output: cand.y,
      paramsBefore: fused.paramsBefore,
      paramsAfter: fused.weight.length + cout,
    };
    det.blocks.push({
      info,
      x: cand.x,
      output: cand.y,
      leaves: [],
      nodes: cand.data,
      dtype,
      kernel,
      stride,
      groups: fused.groups,
      inPerGroup: ipg,
      outChannels: cout,
      template: cand.data.find((n) => n.opType === 'Conv') ?? cand.data[0],
      zeros: [],
      fused: { op: 'Conv', weight: fused.weight, weightDims: fused.shape, bias: fused.bias, pads: fused.pads, what: `linear region (${cand.data.length} ops)` },
      region: cand,
    });
  }
  for (const [node, b] of blocked) {
    const parts = [node.name || node.outputs[0], b.join.name || b.join.outputs[0]];
    if (claimed.has(b.join) || det.rejected.some((rj) => rj.parts.some((p) => parts.includes(p)))) continue;
    det.rejected.push({ name: commonScopeName([node.name, b.join.name]) ?? b.join.outputs[0], reason: `${nodeLabel(node)} cannot join the linear region summed by ${nodeLabel(b.join)}: ${b.why}.`, parts });
  }
  for (const g of findGemmFolds(model, index, consts, claimed)) {
    const name = commonScopeName([g.bn.name, g.gemm.name]) ?? (g.gemm.outputs[0] || g.bn.outputs[0]);
    if ('reason' in g) {
      det.notFolded.push({ name, reason: g.reason, parts: [g.bn.name, g.gemm.name] });
      continue;
    }
    claimed.add(g.bn);
    claimed.add(g.gemm);
    for (const n of g.extra ?? []) claimed.add(n);
    const [K, N] = g.transB ? [g.weightDims[1], g.weightDims[0]] : g.weightDims;
    det.blocks.push({
      info: {
        name,
        family: 'BN + Linear',
        kernel: [],
        stride: [],
        groups: 1,
        inChannels: K,
        outChannels: N,
        branches: [{ kind: 'conv_bn', hasBias: !!g.gemm.inputs[2], hasBN: true, epsilon: attrFloat(g.bn, 'epsilon', 1e-5), epsilonSource: 'model', params: K * N + 5 * (g.where === 'before' ? K : N), parts: [g.bn.name || g.bn.outputs[0], g.gemm.name || g.gemm.outputs[0]] }],
        activation: activationOf(index, g.y),
        output: g.y,
        paramsBefore: K * N + (g.gemm.inputs[2] ? N : 0) + 4 * (g.where === 'before' ? K : N),
        paramsAfter: K * N + N,
      },
      x: g.x,
      output: g.y,
      leaves: [],
      nodes: [...(g.where === 'before' ? [g.bn, g.gemm] : [g.gemm, g.bn]), ...(g.extra ?? [])],
      dtype: g.dtype,
      kernel: [],
      stride: [],
      groups: 1,
      inPerGroup: K,
      outChannels: N,
      template: g.gemm,
      zeros: [],
      fused: {
        op: 'Gemm',
        weight: g.weight,
        weightDims: g.weightDims,
        bias: g.bias,
        pads: [],
        transB: g.transB,
        alpha: g.alpha,
        what: `BatchNormalization ${nodeLabel(g.bn)} folded into ${nodeLabel(g.gemm)}${g.extra ? ` and ${g.extra.length} nodes of a second head summed with it` : ''}`,
      },
    });
  }
}

function activationOf(index: GraphIndex, out: string): string | undefined {
  const c = index.consumersOf(out);
  return c.length === 1 ? c[0].opType : undefined;
}

/** Family of a region, from the module names the exporter kept. */
function regionFamily(names: string): string {
  if (/dbb_|\/dbb\b/i.test(names)) return 'DBB';
  if (/token_mixer|\/mixer\b|layer_scale/.test(names)) return 'FastViT RepMixer';
  if (/\/pe\b|RepCPE|\/cpe\b/i.test(names)) return 'FastViT RepCPE';
  if (/\bia\b|\bim\b|\/ia\.|\/im\./.test(names)) return 'YOLOv7 IDetect';
  if (/rbr_avg|rbr_dense/.test(names)) return 'QARepVGGv2';
  return 'linear region';
}
