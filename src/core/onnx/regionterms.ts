// The branches of a linear region (region.ts): the terms of its last sum, each with its kind
// (src/core/branches.ts), sign, factor and own kernel size. Detection labels a region's branches
// with this; the statistics (regionstats.ts) compute each term's exact share of the fused kernel.
import type { BranchInfo, BranchKind } from '../model';
import type { GraphIndex } from './graph';
import { attrFloat, attrInts, type OnnxNode } from './reader';

const SUMS = ['Add', 'Sum', 'Sub'];

/** One term of a region's last sum. */
export interface RegionTerm {
  /** The tensor that is summed. */
  tensor: string;
  /** The Add/Sum/Sub that reads it, and at which input. */
  consumer: OnnxNode;
  slot: number;
  /** Subtracted from the sum (Sub's second input, an odd number of times). */
  subtracted: boolean;
  /** A constant factor (Mul/Div) applies to the term: it multiplies an inner sum the term is part of. */
  scaled: boolean;
}

export interface RegionTerms {
  /** The region's last sum of two or more region tensors; undefined when it has none. */
  join?: OnnxNode;
  /** Terms of the sum (with no join: the region's output itself, as one term). */
  terms: RegionTerm[];
  /** The single-input ops from the join's output to the region's output, in graph order. */
  after: OnnxNode[];
}

/**
 * Finds the last sum of a region from `x` to `y` (nodes `data`) and its terms. Nested sums read
 * only by the sum are expanded, also through a constant factor (`ls · (a − b)` gives the terms
 * `ls·a` and `−ls·b`, as FastViT's RepMixer is written in checkpoints).
 */
export function regionTerms(x: string, y: string, data: OnnxNode[], index: GraphIndex): RegionTerms {
  const set = new Set(data);
  const inRegion = (i: string) => i === x || (!!i && set.has(index.producer.get(i)!));
  const regionInputs = (n: OnnxNode) => n.inputs.filter(inRegion);
  // Walk back from y through single-input ops to the last sum of two or more region tensors.
  let t = y;
  let join: OnnxNode | undefined;
  const after: OnnxNode[] = [];
  for (let guard = 0; guard < data.length + 1; guard++) {
    const p = index.producer.get(t);
    if (!p || !set.has(p)) break;
    const ins = regionInputs(p);
    if (ins.length >= 2 && SUMS.includes(p.opType)) {
      join = p;
      break;
    }
    if (ins.length !== 1) break;
    after.unshift(p);
    t = ins[0];
  }
  if (!join) {
    const p = index.producer.get(y);
    return { terms: [{ tensor: y, consumer: p!, slot: 0, subtracted: false, scaled: false }], after: [] };
  }
  const terms: RegionTerm[] = [];
  const innerSum = (i: string): OnnxNode | undefined => {
    const p = index.producer.get(i);
    return p && set.has(p) && SUMS.includes(p.opType) && index.consumersOf(i).length === 1 && regionInputs(p).length >= 2 ? p : undefined;
  };
  const collect = (n: OnnxNode, neg: boolean, scaled: boolean, depth: number) => {
    n.inputs.forEach((i, k) => {
      if (!i) return;
      const p = index.producer.get(i);
      const minus = neg !== (n.opType === 'Sub' && k === 1);
      const inner = depth < data.length ? innerSum(i) : undefined;
      if (inner) return collect(inner, minus, scaled, depth + 1);
      // A constant factor on an inner sum: distributed over its terms.
      if (p && set.has(p) && depth < data.length && (p.opType === 'Mul' || p.opType === 'Div' || p.opType === 'Neg') && index.consumersOf(i).length === 1) {
        const ins = p.inputs.map((j, at) => (inRegion(j) ? at : -1)).filter((at) => at >= 0);
        const at = ins[0];
        const sum = ins.length === 1 && (p.opType !== 'Div' || at === 0) ? innerSum(p.inputs[at]) : undefined;
        if (sum) return collect(sum, p.opType === 'Neg' ? !minus : minus, scaled || p.opType !== 'Neg', depth + 1);
      }
      if (inRegion(i)) terms.push({ tensor: i, consumer: n, slot: k, subtracted: minus, scaled });
    });
  };
  collect(join, false, false, 0);
  return { join, terms, after };
}

/** Nodes from `x` to `term` inside the region (the term's own path), in graph order. */
export function termPath(x: string, term: string, data: OnnxNode[], index: GraphIndex): OnnxNode[] {
  const set = new Set(data);
  const path = new Set<OnnxNode>();
  const stack = [term];
  const seen = new Set<string>();
  while (stack.length) {
    const u = stack.pop()!;
    if (u === x || seen.has(u)) continue;
    seen.add(u);
    const p = index.producer.get(u);
    if (!p || !set.has(p)) continue;
    path.add(p);
    for (const i of p.inputs) if (i) stack.push(i);
  }
  return data.filter((n) => path.has(n));
}

/** Spatial window of a conv or pooling node (kernel spread out by its dilation), or undefined. */
function window(n: OnnxNode, index: GraphIndex): number[] | undefined {
  if (n.opType === 'AveragePool') return attrInts(n, 'kernel_shape');
  if (n.opType !== 'Conv') return undefined;
  const k = attrInts(n, 'kernel_shape') ?? index.model.graph.initializers.get(n.inputs[1])?.dims.slice(2).map(Number) ?? index.constant(n.inputs[1])?.tensor.dims.slice(2).map(Number);
  if (!k) return undefined;
  const d = attrInts(n, 'dilations') ?? [];
  return k.map((v, i) => (v - 1) * (d[i] ?? 1) + 1);
}

/**
 * The kernel a term's path spans on its own: windows in series add up (k1 + k2 − 1), in parallel
 * the widest counts; undefined when the path has no conv or pooling (an identity, a BN of x).
 */
export function pathKernel(x: string, path: OnnxNode[], index: GraphIndex): number[] | undefined {
  const ext = new Map<string, number[] | undefined>([[x, undefined]]);
  const inPath = new Set(path);
  let rank = 0;
  for (const n of path) {
    let acc: number[] | undefined;
    for (const i of n.inputs) {
      const e = i && (i === x || inPath.has(index.producer.get(i)!)) ? ext.get(i) : undefined;
      if (e) acc = acc ? acc.map((v, j) => Math.max(v, e[j] ?? 1)) : [...e];
    }
    const w = window(n, index);
    if (w) {
      rank = Math.max(rank, w.length);
      acc = acc ? w.map((v, j) => v + (acc![j] ?? 1) - 1) : [...w];
    }
    for (const o of n.outputs) if (o) ext.set(o, acc);
  }
  const last = path[path.length - 1];
  return last ? ext.get(last.outputs[0]) : undefined;
}

/** The branches of a region: the terms of its last sum, each described by the ops on its path. */
export function regionBranches(x: string, y: string, data: OnnxNode[], index: GraphIndex): BranchInfo[] {
  const { terms } = regionTerms(x, y, data, index);
  return terms.map((term) => {
    const path = termPath(x, term.tensor, data, index);
    const convs = path.filter((n) => n.opType === 'Conv');
    const bns = path.filter((n) => n.opType === 'BatchNormalization');
    const parts = path.filter((n) => n.opType !== 'Shape' && n.opType !== 'Constant').map((n) => n.name || n.outputs[0]);
    const subtracted = term.subtracted || undefined;
    const scaled = term.scaled || path.some((n) => n.opType === 'Mul' || n.opType === 'Div') || undefined;
    if (term.tensor === x) return { kind: 'identity', hasBias: false, hasBN: false, params: 0, parts: [], subtracted, scaled };
    if (!convs.length && bns.length === 1 && path.filter((n) => n.opType !== 'Identity').length === 1) {
      return { kind: 'bn_identity', hasBias: false, hasBN: true, epsilon: attrFloat(bns[0], 'epsilon', 1e-5), epsilonSource: 'model', params: 0, parts, subtracted, scaled };
    }
    const dilated = convs.some((n) => (attrInts(n, 'dilations') ?? []).some((d) => d !== 1));
    // Convolutions in series (one reads what another computed), not side by side.
    const inPath = new Set(path);
    const series = convs.some((c) => {
      const stack = [c.inputs[0]];
      const seen = new Set<string>();
      while (stack.length) {
        const p = index.producer.get(stack.pop()!);
        if (!p || !inPath.has(p) || seen.has(p.outputs[0])) continue;
        seen.add(p.outputs[0]);
        if (p.opType === 'Conv') return true;
        for (const i of p.inputs) if (i) stack.push(i);
      }
      return false;
    });
    const kind: BranchKind = path.some((n) => n.opType === 'AveragePool') ? 'avgpool' : series ? 'sequential' : dilated ? 'dilated' : bns.length ? 'conv_bn' : 'conv';
    return {
      kind,
      subtracted,
      kernel: pathKernel(x, path, index),
      hasBias: convs.some((n) => !!n.inputs[2]),
      hasBN: bns.length > 0,
      epsilon: bns[0] ? attrFloat(bns[0], 'epsilon', 1e-5) : undefined,
      epsilonSource: bns.length ? 'model' : undefined,
      scaled,
      params: 0,
      parts,
    } satisfies BranchInfo;
  });
}
