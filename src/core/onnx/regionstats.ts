// Per-branch statistics of a linear region (region.ts): the exact contribution of each term of the
// region's last sum to the fused kernel, computed in float64 with the region evaluator itself.
//
// A region is linear, so y = P(Σ_b t_b) + c, where t_b are the terms of its last sum (regionterms.ts)
// and P the ops from that sum to y. The region evaluated with every term but t_b replaced by zero
// (Sub(t, t) in front of the sum) is again one convolution, which fuseRegion reads off by impulses:
// its kernel is P's linear part applied to x → t_b, exactly the branch's share of the fused kernel,
// and the kernels of all terms add up to the fused one. A post-add BatchNormalization (P = one BN,
// QARepVGGBlockV2) is kept apart as the block's post-BN, as the checkpoint path does: the terms are
// then evaluated up to the sum.
import { branchLabel } from '../branches';
import type { BlockData, BranchData, BranchInfo } from '../model';
import type { OnnxBlock } from './detect';
import type { GraphIndex } from './graph';
import { attrFloat, numelOf, type OnnxModel, type OnnxNode } from './reader';
import { ConstFolder, fuseRegion, type RegionConv, type RegionNodes, RegionReject } from './region';
import { type RegionTerm, regionTerms, termPath } from './regionterms';

/** Largest |Σ_b C_b − fused| allowed, relative to max |fused| (float64 evaluations of one linear map). */
export const REGION_SPLIT_TOLERANCE = 1e-9;

const maxAbs = (a: ArrayLike<number>) => {
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i]));
  return m;
};

/** Why a region's branches could not be split: it is then shown as one branch. */
class NoSplit extends Error {}

/** The region ending at the sum instead of y (the ops after it dropped). */
function upToSum(r: RegionNodes, sum: string, drop: Set<OnnxNode>): RegionNodes {
  return { x: r.x, y: sum, producerOf: r.producerOf, nodes: r.nodes.filter((n) => !drop.has(n)), data: r.data.filter((n) => !drop.has(n)) };
}

/** The region with every term but `keep` replaced by zero where the sum reads it. */
export function withOnlyTerm(r: RegionNodes, terms: RegionTerm[], keep: number): RegionNodes {
  const copies = new Map<OnnxNode, OnnxNode>();
  const zeros = new Map<OnnxNode, OnnxNode[]>();
  terms.forEach((t, i) => {
    if (i === keep) return;
    const c = copies.get(t.consumer) ?? { ...t.consumer, inputs: [...t.consumer.inputs] };
    copies.set(t.consumer, c);
    const z = `${t.tensor}#repfuse-zero-${i}`;
    c.inputs[t.slot] = z;
    const zn: OnnxNode = { index: -1, name: z, opType: 'Sub', domain: '', inputs: [t.tensor, t.tensor], outputs: [z], attrs: new Map(), outerRefs: [] };
    zeros.set(t.consumer, [...(zeros.get(t.consumer) ?? []), zn]);
  });
  const rewire = (list: OnnxNode[]) => list.flatMap((n) => (copies.has(n) ? [...zeros.get(n)!, copies.get(n)!] : [n]));
  const nodes = rewire(r.nodes);
  const producer = new Map<string, OnnxNode>();
  for (const n of nodes) for (const o of n.outputs) if (o) producer.set(o, n);
  return { x: r.x, y: r.y, nodes, data: rewire(r.data), producerOf: (t) => producer.get(t) ?? r.producerOf(t) };
}

/**
 * Places a term's convolution into the fused kernel's layout [cout, cin/groups, ...k] (pads
 * `padBegin`); also returns the term's own kernel, cropped at its own size in the same layout.
 */
function embed(c: RegionConv, shape: number[], padBegin: number[], groups: number, stride: number[]): { weight: Float64Array; own: { shape: number[]; values: Float64Array } } {
  const [cout, ipg, ...k] = shape;
  const [cb, ipgB, ...kb] = c.shape;
  const rank = k.length;
  if (cb !== cout || c.inChannels !== ipg * groups || c.stride.join() !== stride.join() || kb.length !== rank) {
    throw new NoSplit(`a branch alone is a ${cb}×${c.inChannels} convolution with stride ${c.stride.join('×')}, not ${cout}×${ipg * groups} with stride ${stride.join('×')}`);
  }
  const off = padBegin.map((p, i) => p - c.pads[i]);
  if (off.some((o, i) => o < 0 || o + kb[i] > k[i])) throw new NoSplit(`a branch's ${kb.join('×')} kernel does not lie inside the fused ${k.join('×')} kernel`);
  const ks = numelOf(k);
  const kbs = numelOf(kb);
  const kS = k.map((_, i) => numelOf(k.slice(i + 1)));
  const kbS = kb.map((_, i) => numelOf(kb.slice(i + 1)));
  const tapOf = new Int32Array(kbs);
  for (let t = 0; t < kbs; t++) tapOf[t] = kb.reduce((a, _, i) => a + (Math.floor(t / kbS[i]) % kb[i] + off[i]) * kS[i], 0);
  const weight = new Float64Array(cout * ipg * ks);
  const own = new Float64Array(cout * ipg * kbs);
  const opgB = cout / c.groups;
  const opg = cout / groups;
  for (let o = 0; o < cout; o++) {
    const gB = Math.floor(o / opgB);
    const g = Math.floor(o / opg);
    for (let ci = 0; ci < ipgB; ci++) {
      const cf = gB * ipgB + ci - g * ipg; // input channel within the fused conv's group
      const src = (o * ipgB + ci) * kbs;
      if (cf < 0 || cf >= ipg) {
        for (let t = 0; t < kbs; t++) if (c.weight[src + t] !== 0) throw new NoSplit(`a branch reads input channels outside the fused convolution's groups`);
        continue;
      }
      for (let t = 0; t < kbs; t++) {
        const v = c.weight[src + t];
        weight[(o * ipg + cf) * ks + tapOf[t]] = v;
        own[(o * ipg + cf) * kbs + t] = v;
      }
    }
  }
  return { weight, own: { shape: [cout, ipg, ...kb], values: own } };
}

/** Constants of a node (weights, BN statistics, factors), counted for the branch's parameter count. */
function paramsOf(path: OnnxNode[], consts: ConstFolder): number {
  let n = 0;
  for (const node of path) {
    if (!['Conv', 'BatchNormalization', 'Mul', 'Div', 'Add', 'Sub'].includes(node.opType)) continue;
    node.inputs.forEach((i, k) => {
      if (i && (k > 0 || node.opType === 'Mul' || node.opType === 'Add') && consts.has(i)) n += consts.dims(i)?.reduce((a, b) => a * b, 1) ?? 0;
    });
  }
  return n;
}

function bnOf(bn: OnnxNode, consts: ConstFolder): NonNullable<BranchData['bn']> | undefined {
  const v = bn.inputs.slice(1, 5).map((i) => (i ? consts.value(i)?.data : undefined));
  if (v.some((x) => !x)) return undefined;
  return { gamma: v[0]!, beta: v[1]!, mean: v[2]!, variance: v[3]!, eps: attrFloat(bn, 'epsilon', 1e-5) };
}

/** The stored tensors of a branch that is one conv (+ its BN): shown as its raw weights. */
function rawOf(path: OnnxNode[], consts: ConstFolder, cout: number): Pick<BranchData, 'weight' | 'bias' | 'bn'> {
  const ops = path.filter((n) => n.opType !== 'Identity' && n.opType !== 'Dropout');
  const bns = ops.filter((n) => n.opType === 'BatchNormalization');
  const out: Pick<BranchData, 'weight' | 'bias' | 'bn'> = {};
  if (bns.length === 1) out.bn = bnOf(bns[0], consts);
  const conv = ops[0];
  if (conv?.opType !== 'Conv' || ops.length !== 1 + bns.length || bns.length > 1) return out;
  const w = consts.value(conv.inputs[1]);
  if (!w || w.dims[0] !== cout) return out;
  out.weight = { shape: w.dims, values: w.data };
  const b = conv.inputs[2] ? consts.value(conv.inputs[2]) : undefined;
  if (b) out.bias = b.data;
  return out;
}

/** A region shown as one branch: the whole fused convolution, with why it is not split. */
function whole(b: OnnxBlock, why: string): BlockData {
  const f = b.fused!;
  const single = b.info.branches.length === 1 ? b.info.branches[0] : undefined;
  const info: BranchInfo = single ?? { kind: 'conv', kernel: b.kernel, hasBias: true, hasBN: false, params: b.info.paramsBefore, parts: b.info.branches.flatMap((br) => br.parts) };
  const label = single ? `${branchLabel({ ...single, kernel: single.kernel ?? b.kernel })} (whole region)` : `${b.kernel.join('×')} conv (whole region)`;
  const block = { ...b.info, branches: [{ ...info, params: b.info.paramsBefore }], assumptions: [...(b.info.assumptions ?? []), `branches not split: ${why}`] };
  const fused = { shape: [...f.weightDims], weight: f.weight, bias: f.bias };
  return { block, branches: [{ label, kind: info.kind, contribution: { shape: [...f.weightDims], weight: Float64Array.from(f.weight), bias: Float64Array.from(f.bias) } }], fused };
}

/**
 * BlockData of a linear region: one branch per term of its last sum, each with its exact
 * contribution to the fused kernel and bias (float64). A region whose last sum cannot be split
 * (none, or a term that is not a convolution on its own) is one branch, `… (whole region)`.
 */
export function regionBlockData(model: OnnxModel, index: GraphIndex, b: OnnxBlock): BlockData {
  const r = b.region;
  const f = b.fused;
  if (!r || !f || f.op !== 'Conv') throw new Error(`block '${b.info.name}' is not a linear region.`);
  const rt = regionTerms(r.x, r.y, r.data, index);
  if (!rt.join || rt.terms.length < 2) return whole(b, 'the region does not end in a sum of branches');
  if (rt.terms.length !== b.info.branches.length) return whole(b, `its sum has ${rt.terms.length} terms where detection listed ${b.info.branches.length}`);
  const consts = new ConstFolder(model, index);
  const after = rt.after.filter((n) => n.opType !== 'Identity' && n.opType !== 'Dropout');
  const postNode = after.length === 1 && after[0].opType === 'BatchNormalization' ? after[0] : undefined;
  const postBN = postNode ? bnOf(postNode, consts) : undefined;
  const level = postBN ? upToSum(r, rt.join.outputs[0], new Set(rt.after)) : r;
  const shape = f.weightDims;
  const rank = shape.length - 2;
  const padBegin = f.pads.slice(0, rank);
  try {
    // The reference: the fused conv itself, or (post-BN) the conv the sum equals.
    const ref = postBN ? fuseRegion(level, consts, index) : undefined;
    const refW = ref ? embed(ref, shape, padBegin, b.groups, b.stride).weight : f.weight;
    const refB = ref ? ref.bias : f.bias;
    const parts = rt.terms.map((_, i) => {
      const c = fuseRegion(withOnlyTerm(level, rt.terms, i), consts, index);
      return { c, ...embed(c, shape, padBegin, b.groups, b.stride) };
    });
    const n = refW.length;
    const sum = new Float64Array(n);
    for (const p of parts) for (let i = 0; i < n; i++) sum[i] += p.weight[i];
    let worst = 0;
    for (let i = 0; i < n; i++) worst = Math.max(worst, Math.abs(sum[i] - refW[i]));
    if (!(worst <= REGION_SPLIT_TOLERANCE * Math.max(1e-30, maxAbs(refW)))) throw new NoSplit(`its branches add up to the fused kernel only within ${worst.toPrecision(3)}`);
    // Each evaluation also carries the constant the ops after the sum add (c): it must be none.
    const cout = shape[0];
    const c0 = new Float64Array(cout);
    for (let o = 0; o < cout; o++) c0[o] = (parts.reduce((a, p) => a + p.c.bias[o], 0) - refB[o]) / (parts.length - 1);
    if (!(maxAbs(c0) <= REGION_SPLIT_TOLERANCE * (1 + maxAbs(refB)))) throw new NoSplit(`the ops after its last sum add a constant (up to ${maxAbs(c0).toPrecision(3)}) that belongs to no branch`);
    // A kernel the graph does not state (a weight computed at run time) is the one the evaluation found.
    const infos = b.info.branches.map((br, i) => ({ ...br, kernel: br.kernel ?? (br.kind === 'identity' || br.kind === 'bn_identity' ? undefined : parts[i].own.shape.slice(2)), params: paramsOf(termPath(r.x, rt.terms[i].tensor, r.data, index), consts) }));
    const branches: BranchData[] = parts.map((p, i) => {
      const info = infos[i];
      const path = termPath(r.x, rt.terms[i].tensor, r.data, index);
      const d: BranchData = { label: branchLabel(info), kind: info.kind, contribution: { shape: [...shape], weight: p.weight, bias: Float64Array.from(p.c.bias) }, ...rawOf(path, consts, cout) };
      if (info.kind !== 'identity' && info.kind !== 'bn_identity') d.folded = p.own;
      return d;
    });
    const block = { ...b.info, branches: infos, postBN: postNode && postBN ? { epsilon: postBN.eps, epsilonSource: 'model' as const } : b.info.postBN };
    return { block, branches, postBN, fused: { shape: [...shape], weight: f.weight, bias: f.bias } };
  } catch (e) {
    if (e instanceof NoSplit) return whole(b, e.message);
    if (e instanceof RegionReject || e instanceof RangeError) return whole(b, `a branch alone is not one convolution (${e.message})`);
    throw e;
  }
}
