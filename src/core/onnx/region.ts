// Linear-region fusion: the parts of a graph between one input tensor x and one output tensor y
// made only of linear operations with constant parameters (Conv, BatchNormalization, Add/Sub of
// branches, Mul/Div by constants, AveragePool, Pad, Slice/Concat/ScatterND/Expand, Identity, and
// the shape arithmetic exporters put around them). Each region is run on small probe tensors with
// a float64 interpreter: the bias is its response to zero, the kernel its impulse responses; then
// random probes check every position, borders included, against the candidate Conv. A region that
// is not exactly one Conv is rejected, naming the operation that broke it.
import { dtypeName, isFloatType } from '../dtype';
import { Rng } from '../random';
import type { GraphIndex } from './graph';
import { attrInt, attrInts, attrString, numelOf, type OnnxModel, type OnnxNode, readTensorValues } from './reader';
import { conv, dryRun, EVAL_OPS, EvalError, isIntType, runNode, setEvalLimit, type Tensor } from './region-eval';

const isOp = (n: OnnxNode | undefined, op: string): boolean => !!n && n.opType === op && (n.domain === '' || n.domain === 'ai.onnx');
export const nodeLabel = (n: OnnxNode) => `${n.opType} '${n.name || n.outputs[0]}'`;

/** Largest constant the folder materializes (elements). */
const MAX_CONST = 1 << 24;
/** Most nodes one region may have (DBB's export spends ~600 on shape arithmetic per block). */
const MAX_REGION_NODES = 4096;

/**
 * Most values one tensor of the evaluator may hold for this model: four times the file's size in
 * float64 values' worth of bytes, at least 2^16, at most 2^24 (a hostile dim of 2^32 is refused,
 * not allocated).
 */
const evalLimitFor = (model: OnnxModel): number => Math.max(1 << 16, Math.min(1 << 24, Math.floor(model.source.size / 2)));

/** Constants of a graph: initializers, Constant nodes, and whatever the interpreter can fold from them. */
export class ConstFolder {
  private readonly isConst = new Set<string>();
  private readonly values = new Map<string, Tensor | null>();
  /** Why a constant could not be computed: the first node of its subgraph that failed. */
  private readonly reasons = new Map<string, string>();
  readonly opset: number;

  constructor(
    readonly model: OnnxModel,
    readonly index: GraphIndex,
  ) {
    this.opset = model.opsets.find((o) => o.domain === '' || o.domain === 'ai.onnx')?.version ?? 13;
    setEvalLimit(evalLimitFor(model));
    for (const k of model.graph.initializers.keys()) this.isConst.add(k);
    for (const n of model.graph.nodes) {
      if (n.domain !== '' && n.domain !== 'ai.onnx') continue;
      const ok = n.opType === 'Constant' || (EVAL_OPS.has(n.opType) && n.inputs.some(Boolean) && n.inputs.every((i) => !i || this.isConst.has(i)));
      if (ok && n.outerRefs.length === 0) for (const o of n.outputs) if (o) this.isConst.add(o);
    }
  }

  has(name: string): boolean {
    return this.isConst.has(name);
  }

  /** Shape of a constant without reading its data when it is stored (folded ones are computed). */
  dims(name: string): number[] | undefined {
    const t = this.model.graph.initializers.get(name) ?? this.index.constant(name)?.tensor;
    return t ? t.dims : this.value(name)?.dims;
  }

  /** The constant's value (float64), folding its subgraph; undefined when it cannot be computed. */
  value(name: string): Tensor | undefined {
    const c = this.values.get(name);
    if (c !== undefined) return c ?? undefined;
    this.values.set(name, null);
    const v = this.compute(name);
    this.values.set(name, v ?? null);
    return v;
  }

  private compute(name: string): Tensor | undefined {
    const init = this.model.graph.initializers.get(name);
    const p = this.index.producer.get(name);
    if (init && !p) {
      if (numelOf(init.dims) > MAX_CONST) return undefined;
      return { dims: init.dims, data: Float64Array.from(readTensorValues(this.model, init)), int: isIntType(init.dtype) };
    }
    if (!p || !this.isConst.has(name)) return undefined;
    if (p.opType === 'Constant') {
      const r = this.index.constant(name);
      if (!r || numelOf(r.tensor.dims) > MAX_CONST) return undefined;
      return { dims: r.tensor.dims, data: Float64Array.from(readTensorValues(this.model, r.tensor)), int: isIntType(r.tensor.dtype) };
    }
    // Iterative post-order over the constant subgraph (no deep recursion on long chains), bounded:
    // real constant subgraphs (OREPA's kernels) have a handful of nodes.
    const stack: OnnxNode[] = [p];
    let steps = 0;
    let reason: string | undefined;
    while (stack.length) {
      if (++steps > 4096) {
        this.reasons.set(name, `its constant subgraph has more than 4096 nodes.`);
        return undefined;
      }
      const n = stack[stack.length - 1];
      const missing = n.inputs.filter((i) => i && !this.values.has(i) && this.index.producer.get(i) && this.index.producer.get(i)!.opType !== 'Constant');
      if (missing.length) {
        for (const m of missing) {
          this.values.set(m, null); // placeholder: computed when its node is popped
          stack.push(this.index.producer.get(m)!);
        }
        continue;
      }
      stack.pop();
      const ins = n.inputs.map((i) => (i ? this.leaf(i) : undefined));
      let outs: Tensor[] | undefined;
      if (!ins.some((t, k) => n.inputs[k] && !t)) {
        try {
          outs = runNode(n, ins, this.opset);
        } catch (e) {
          // An op it cannot run, or shapes too big to allocate (a hostile file): not a constant.
          if (!(e instanceof EvalError) && !(e instanceof RangeError)) throw e;
          reason ??= e instanceof EvalError ? e.message : `${nodeLabel(n)} needs tensors too big to evaluate.`;
        }
      }
      // A computed constant may not be much bigger than the file (ConstantOfShape of a huge shape).
      const cap = Math.max(1 << 16, Math.min(MAX_CONST, Math.floor(this.model.source.size / 8)));
      if (outs?.some((t) => t.data.length > cap)) reason ??= `${nodeLabel(n)} computes a constant bigger than ${cap} values.`;
      n.outputs.forEach((o, k) => o && this.values.set(o, outs?.[k] && outs[k].data.length <= cap ? outs[k] : null));
    }
    const v = this.values.get(name) ?? undefined;
    if (!v && reason) this.reasons.set(name, reason);
    return v;
  }

  /** Why the constant `name` could not be computed (after value() said undefined), if known. */
  why(name: string): string | undefined {
    return this.reasons.get(name);
  }

  private leaf(name: string): Tensor | undefined {
    const v = this.values.get(name);
    if (v) return v;
    const p = this.index.producer.get(name);
    if (!p || p.opType === 'Constant') {
      this.values.delete(name);
      return this.value(name);
    }
    return undefined;
  }
}

type Cls = 'D' | 'S' | 'C';

/** Ops that carry data linearly, and how they may read it. */
const DATA_OPS = new Set(['Conv', 'BatchNormalization', 'Add', 'Sum', 'Sub', 'Mul', 'Div', 'Neg', 'Identity', 'Dropout', 'AveragePool', 'Pad', 'Slice', 'Concat', 'ScatterND', 'Expand']);
/** Data ops that change positions (their padding or cropping can break the one-conv form). */
const SPATIAL_OPS = new Set(['Conv', 'AveragePool', 'Pad', 'Slice', 'Concat', 'ScatterND', 'Expand']);

export interface RegionNodes {
  x: string;
  y: string;
  /** Producer of a tensor (the graph index's). */
  producerOf(t: string): OnnxNode | undefined;
  /** Data nodes (linear in x) and shape/side nodes, in graph order. */
  nodes: OnnxNode[];
  data: OnnxNode[];
}

/**
 * Why a data-carrying op cannot be part of a linear region; undefined when it can. `cls` gives
 * each input's class (undefined: computed outside the region).
 */
function dataOpProblem(n: OnnxNode, cls: (Cls | undefined)[], index: GraphIndex, consts?: ConstFolder): string | undefined {
  // Parameters must be float constants (an integer weight or factor is not a float linear map here).
  if (consts) {
    for (const [k, i] of n.inputs.entries()) {
      if (!i || cls[k] !== 'C' || (n.opType === 'Pad' && k === 1) || ((n.opType === 'Slice' || n.opType === 'Expand' || n.opType === 'ScatterND') && k > 0)) continue;
      const t = index.model.graph.initializers.get(i) ?? index.constant(i)?.tensor;
      if (t ? !isFloatType(t.dtype) : consts.value(i)?.int) return `has a parameter '${i}' of integer type`;
    }
    if (n.opType === 'Conv') {
      const ks = attrInts(n, 'kernel_shape');
      const w = ks ? consts.dims(n.inputs[1]) : undefined;
      if (ks && w && ks.join() !== w.slice(2).join()) return `declares kernel_shape ${ks.join('×')} but its weight is ${w.slice(2).join('×')}`;
    }
  }
  const isP = (k: number) => !n.inputs[k] || cls[k] === 'C' || cls[k] === 'S';
  const d = cls.filter((c) => c === 'D').length;
  switch (n.opType) {
    case 'Conv':
      if (cls[0] !== 'D' || d !== 1) return 'reads the region through its weight';
      if (cls[1] !== 'C') return `its weight is computed at run time, not a constant`;
      if (n.inputs[2] && cls[2] !== 'C') return 'its bias is computed at run time, not a constant';
      return undefined;
    case 'BatchNormalization':
      if (cls[0] !== 'D' || d !== 1 || ![1, 2, 3, 4].every((k) => cls[k] === 'C')) return 'has parameters computed at run time';
      if (attrInt(n, 'training_mode', 0) !== 0) return 'is in training mode';
      if (n.outputs.slice(1).some((o) => o && (index.consumersOf(o).length || index.graphOutputs.has(o)))) return 'uses its running-statistics outputs';
      return undefined;
    case 'Add':
    case 'Sum':
    case 'Concat':
      if (n.inputs.length > 64) return 'has too many terms to be a block';
      return n.inputs.every((_, k) => cls[k] === 'D' || isP(k)) ? undefined : 'has an input computed outside the region';
    case 'Sub':
      return (cls[0] === 'D' || isP(0)) && (cls[1] === 'D' || isP(1)) ? undefined : 'has an input computed outside the region';
    case 'Mul':
      return d === 1 && n.inputs.every((_, k) => cls[k] === 'D' || isP(k)) ? undefined : 'multiplies by something that is not a constant';
    case 'Div':
      return cls[0] === 'D' && isP(1) ? undefined : 'divides by something that is not a constant';
    case 'ScatterND':
      return isP(1) && (cls[0] === 'D' || isP(0)) && (cls[2] === 'D' || isP(2)) ? undefined : 'scatters at indices computed at run time';
    case 'Pad':
      if ((attrString(n, 'mode') ?? 'constant') !== 'constant') return `pads in mode '${attrString(n, 'mode')}'`;
      return cls[0] === 'D' && n.inputs.slice(1).every((_, k) => isP(k + 1)) ? undefined : 'has pads computed at run time';
    case 'AveragePool':
    case 'Neg':
    case 'Identity':
    case 'Dropout':
      return cls[0] === 'D' && d === 1 ? undefined : 'has an input computed outside the region';
    case 'Slice':
    case 'Expand':
      return cls[0] === 'D' && n.inputs.slice(1).every((_, k) => isP(k + 1)) ? undefined : 'has arguments computed at run time';
    default:
      return 'is not linear';
  }
}

/** Min-heap of nodes by graph index, so the closure is built in topological order. */
class NodeHeap {
  private a: OnnxNode[] = [];
  private seen = new Set<OnnxNode>();
  push(n: OnnxNode): void {
    if (this.seen.has(n)) return;
    this.seen.add(n);
    const a = this.a;
    a.push(n);
    let i = a.length - 1;
    while (i > 0) {
      const p = (i - 1) >> 1;
      if (a[p].index <= a[i].index) break;
      [a[p], a[i]] = [a[i], a[p]];
      i = p;
    }
  }
  pop(): OnnxNode | undefined {
    const a = this.a;
    if (!a.length) return undefined;
    const top = a[0];
    const last = a.pop()!;
    if (a.length) {
      a[0] = last;
      let i = 0;
      for (;;) {
        const l = 2 * i + 1;
        const r = l + 1;
        let m = i;
        if (l < a.length && a[l].index < a[m].index) m = l;
        if (r < a.length && a[r].index < a[m].index) m = r;
        if (m === i) break;
        [a[m], a[i]] = [a[i], a[m]];
        i = m;
      }
    }
    return top;
  }
  get size(): number {
    return this.seen.size;
  }
}

interface Closure {
  cls: Map<string, Cls>;
  nodes: OnnxNode[];
  /** Data-carrying ops with a region input that were left out, with why (for rejection reasons). */
  blockers: { node: OnnxNode; why: string }[];
  /** Set when the closure grew past MAX_REGION_NODES: the nodes it had reached. */
  truncated?: OnnxNode[];
}

/** Everything computed linearly from `x` (not past the tensors in `stop`), in graph order. */
function closure(x: string, stop: Set<string>, index: GraphIndex, consts: ConstFolder, taken: Set<OnnxNode>): Closure {
  const cls = new Map<string, Cls>([[x, 'D']]);
  const nodes: OnnxNode[] = [];
  const blockers: Closure['blockers'] = [];
  const heap = new NodeHeap();
  const follow = (t: string) => {
    if (t !== x && stop.has(t)) return;
    for (const c of index.consumersOf(t)) if (!taken.has(c) && c.inputs.length <= 64 && heap.size <= MAX_REGION_NODES) heap.push(c);
  };
  follow(x);
  for (let n = heap.pop(); n; n = heap.pop()) {
    if (heap.size > MAX_REGION_NODES) break;
    if ((n.domain !== '' && n.domain !== 'ai.onnx') || n.outerRefs.length) continue;
    const ic = n.inputs.map((i) => (!i ? undefined : (cls.get(i) ?? (consts.has(i) ? 'C' : undefined))));
    if (n.inputs.some((i, k) => i && (!ic[k] || (i !== x && stop.has(i) && ic[k] === 'D')))) {
      // Reads something from outside: not part of the region.
      if (ic.includes('D') && DATA_OPS.has(n.opType)) {
        const why = dataOpProblem(n, ic.map((c, k) => (n.inputs[k] && stop.has(n.inputs[k]) && n.inputs[k] !== x ? undefined : c)), index);
        if (why && !why.startsWith('has an input computed outside')) blockers.push({ node: n, why });
      }
      continue;
    }
    let out: Cls | undefined;
    if (n.opType === 'Shape' || n.opType === 'Size') out = 'S';
    else if (!ic.includes('D')) out = EVAL_OPS.has(n.opType) ? 'S' : undefined;
    else if (DATA_OPS.has(n.opType)) {
      const why = dataOpProblem(n, ic, index, consts);
      if (why) {
        if (!why.startsWith('has an input computed outside') && n.opType !== 'Mul' && n.opType !== 'Div') blockers.push({ node: n, why });
        out = undefined;
      } else out = 'D';
    }
    if (!out) continue;
    nodes.push(n);
    for (const o of n.outputs) if (o) {
      cls.set(o, out);
      follow(o);
    }
  }
  // Past the bound the closure is incomplete: no region from it, and its nodes are not seeds again.
  if (heap.size > MAX_REGION_NODES) return { cls: new Map([[x, 'D']]), nodes: [], blockers: [], truncated: nodes };
  return { cls, nodes, blockers };
}

/** A data tensor is used outside the region (or is a graph output). */
function usedOutside(t: string, inRegion: Set<OnnxNode>, index: GraphIndex): boolean {
  return index.graphOutputs.has(t) || index.outerRefs.has(t) || index.consumersOf(t).some((c) => !inRegion.has(c));
}

/** Ancestors of `y` inside a closure. */
function ancestors(y: string, nodesSet: Set<OnnxNode>, index: GraphIndex, x: string): Set<OnnxNode> {
  const out = new Set<OnnxNode>();
  const stack = [y];
  while (stack.length) {
    const t = stack.pop()!;
    if (t === x) continue;
    const p = index.producer.get(t);
    if (!p || !nodesSet.has(p) || out.has(p)) continue;
    out.add(p);
    for (const i of p.inputs) if (i) stack.push(i);
  }
  return out;
}

/** A region found by op kinds, before its numbers are checked. */
export type RegionCandidate = RegionNodes;

/**
 * Splits a single-exit region at the tensors every path passes through (articulation tensors), so
 * that blocks in series stay separate convolutions. Returns [x, y, data nodes] per stage.
 */
function stages(x: string, y: string, data: OnnxNode[], index: GraphIndex): { x: string; y: string; data: OnnxNode[] }[] {
  const set = new Set(data);
  const remaining = new Map<string, number>();
  const need = (t: string) => index.consumersOf(t).filter((c) => set.has(c)).length;
  remaining.set(x, need(x));
  const live = new Set<string>([x]);
  const out: { x: string; y: string; data: OnnxNode[] }[] = [];
  let cur: OnnxNode[] = [];
  let start = x;
  for (const n of data) {
    cur.push(n);
    for (const i of n.inputs) {
      if (!live.has(i)) continue;
      const r = (remaining.get(i) ?? 0) - 1;
      remaining.set(i, r);
      if (r <= 0) live.delete(i);
    }
    const o = n.outputs[0];
    const r = need(o);
    if (r > 0) {
      remaining.set(o, r);
      live.add(o);
    }
    if (o === y || (live.size === 1 && live.has(o))) {
      out.push({ x: start, y: o, data: cur });
      cur = [];
      start = o;
      if (o === y) break;
    }
  }
  return out;
}

const isParallelJoin = (n: OnnxNode, cls: Map<string, Cls>) =>
  (n.opType === 'Add' || n.opType === 'Sum' || n.opType === 'Sub') && n.inputs.filter((i) => cls.get(i) === 'D').length >= 2;
const isConstArith = (n: OnnxNode, cls: Map<string, Cls>) =>
  ['Add', 'Sub', 'Mul', 'Div', 'Sum'].includes(n.opType) && n.inputs.some((i) => i && cls.get(i) !== 'D');

/**
 * Region candidates of the graph: single-exit linear regions, split into stages and regrouped so
 * that each group holds one "core" (a stage with a convolution, pooling, padding or a parallel
 * sum) plus the pointwise stages (BN, constant add/mul) around it. Trivial groups (Conv and BN
 * only: the plain Conv → BN fold) are not returned.
 */
export function findRegions(model: OnnxModel, index: GraphIndex, consts: ConstFolder, taken: Set<OnnxNode>, blocked?: Map<OnnxNode, { why: string; join: OnnxNode }>): RegionCandidate[] {
  const out: RegionCandidate[] = [];
  // Seeds in graph order, so a region is entered from its most upstream tensor: graph inputs and
  // every computed tensor that no earlier closure covered, plus the tensors where a closure was cut.
  const seeds: string[] = [];
  const seen = new Set<string>();
  const cuts = new Set<string>();
  for (const i of model.graph.inputs) if (!consts.has(i.name)) seeds.push(i.name);
  for (const n of model.graph.nodes) for (const o of n.outputs) if (o && !consts.has(o)) seeds.push(o);
  const inAnyRegion = new Set<OnnxNode>();
  const covered = new Set<OnnxNode>();
  for (let si = 0; si < seeds.length; si++) {
    const x = seeds[si];
    if (seen.has(x)) continue;
    seen.add(x);
    const prod = index.producer.get(x);
    if (prod && covered.has(prod) && !cuts.has(x)) continue;
    if (!index.consumersOf(x).some((c) => DATA_OPS.has(c.opType) && c.inputs.length <= 64 && !taken.has(c) && !inAnyRegion.has(c))) continue;
    const stop = new Set<string>();
    let cl = closure(x, stop, index, consts, taken);
    // A data tensor read both inside and outside the region must stay: it ends this region and
    // starts another one.
    for (let round = 0; round < 64; round++) {
      const set = new Set(cl.nodes);
      const cut = cl.nodes
        .filter((n) => cl.cls.get(n.outputs[0]) === 'D')
        .flatMap((n) => n.outputs.filter(Boolean))
        .filter((t) => !stop.has(t) && usedOutside(t, set, index) && index.consumersOf(t).some((c) => set.has(c)));
      if (!cut.length) break;
      for (const t of cut) {
        stop.add(t);
        cuts.add(t);
        seeds.push(t);
      }
      cl = closure(x, stop, index, consts, taken);
    }
    if (cl.truncated) {
      for (const n of cl.truncated) covered.add(n);
      continue;
    }
    const set = new Set(cl.nodes);
    for (const n of cl.nodes) covered.add(n);
    // A branch the region cannot take (a weight computed at run time) joined to one it can: a near miss.
    for (const b of cl.blockers) {
      for (const c of index.consumersOf(b.node.outputs[0])) {
        if (['Add', 'Sub', 'Sum'].includes(c.opType) && c.inputs.some((i) => i !== b.node.outputs[0] && cl.cls.get(i) === 'D')) blocked?.set(b.node, { why: b.why, join: c });
      }
    }
    // Side (shape) values used outside would lose their source: leave such regions alone.
    if (cl.nodes.some((n) => cl.cls.get(n.outputs[0]) === 'S' && n.outputs.some((o) => o && usedOutside(o, set, index)))) continue;
    const exits = cl.nodes.filter((n) => cl.cls.get(n.outputs[0]) === 'D').flatMap((n) => n.outputs.filter((o) => o && usedOutside(o, set, index)));
    const anc = exits.map((y) => ancestors(y, set, index, x));
    exits.forEach((y, k) => {
      const mine = anc[k];
      if (anc.some((a, j) => j !== k && [...mine].some((n) => a.has(n)))) return; // shared parts: ambiguous
      // Side nodes the exit's data nodes need (transitively).
      const need = new Set<OnnxNode>(mine);
      const stack = [...mine];
      while (stack.length) {
        const n = stack.pop()!;
        for (const i of n.inputs) {
          const p = i ? index.producer.get(i) : undefined;
          if (p && set.has(p) && !need.has(p)) {
            need.add(p);
            stack.push(p);
          }
        }
      }
      const data = [...mine].filter((n) => cl.cls.get(n.outputs[0]) === 'D').sort((a, b) => a.index - b.index);
      for (const g of groupStages(x, y, data, cl.cls, index)) {
        const nodes = [...g.data, ...sideAncestors(g.data, need, cl.cls, index)].sort((a, b) => a.index - b.index);
        for (const n of nodes) inAnyRegion.add(n);
        out.push({ x: g.x, y: g.y, nodes, data: g.data, producerOf: (t) => index.producer.get(t) });
      }
    });
  }
  return out;
}

/** The side (shape) nodes that the data nodes of `group` read, transitively, from `pool`. */
function sideAncestors(group: OnnxNode[], pool: Set<OnnxNode>, cls: Map<string, Cls>, index: GraphIndex): OnnxNode[] {
  const out = new Set<OnnxNode>();
  const stack = [...group];
  while (stack.length) {
    const n = stack.pop()!;
    for (const i of n.inputs) {
      const p = i ? index.producer.get(i) : undefined;
      if (p && pool.has(p) && cls.get(p.outputs[0]) === 'S' && !out.has(p)) {
        out.add(p);
        stack.push(p);
      }
    }
  }
  return [...out];
}

function groupStages(x: string, y: string, data: OnnxNode[], cls: Map<string, Cls>, index: GraphIndex): { x: string; y: string; data: OnnxNode[] }[] {
  type Stage = { x: string; y: string; data: OnnxNode[] };
  const st = stages(x, y, data, index);
  const isCore = (s: Stage) => s.data.some((n) => SPATIAL_OPS.has(n.opType) || isParallelJoin(n, cls));
  // A constant added before a convolution (YOLOv7's ImplicitA) folds into its bias; other pointwise
  // ops before it (an activation's trailing scale) stay where they are.
  const isShift = (s: Stage) => s.data.every((n) => (n.opType === 'Add' || n.opType === 'Sub') && isConstArith(n, cls));
  const groups: (Stage & { lead: boolean })[] = [];
  let pending: Stage[] = [];
  const flush = () => {
    if (!groups.length || !pending.length) return;
    const g = groups[groups.length - 1];
    for (const p of pending) g.data.push(...p.data);
    g.y = pending[pending.length - 1].y;
  };
  for (const s of st) {
    if (isCore(s)) {
      // Pointwise stages between two cores follow the earlier one (like a BN after its conv).
      const lead: Stage[] = [];
      if (groups.length) flush();
      else while (pending.length && isShift(pending[pending.length - 1])) lead.unshift(pending.pop()!);
      groups.push({ x: lead.length ? lead[0].x : s.x, y: s.y, data: [...lead.flatMap((p) => p.data), ...s.data], lead: lead.length > 0 });
      pending = [];
    } else pending.push(s);
  }
  flush();
  // Keep groups that the plain Conv → BN fold cannot express: a sum of branches, pooling or
  // padding, a constant shift before a conv, or a conv whose weight a constant subgraph computes
  // (OREPA's run-time kernel: the plain fold reads stored weights only). A conv with only a BN or
  // a layer scale after it stays as it is (the official conversions keep those scales).
  return groups.filter((g) => {
    const join = g.data.some((n) => isParallelJoin(n, cls));
    const convs = g.data.filter((n) => n.opType === 'Conv');
    if (convs.some((n) => computedParam(n.inputs[1], index))) return true;
    return join || (convs.length > 0 && (g.lead || g.data.some((n) => ['AveragePool', 'Pad', 'Slice', 'Concat', 'ScatterND', 'Expand'].includes(n.opType))));
  });
}

/** A constant that a subgraph computes (not an initializer or Constant, possibly behind Identity nodes). */
function computedParam(t: string, index: GraphIndex): boolean {
  for (let k = 0; k < 64; k++) {
    const p = index.producer.get(t);
    if (!p || p.opType === 'Constant') return false;
    if (p.opType !== 'Identity') return true;
    t = p.inputs[0];
  }
  return true;
}

// ----- numeric fusion ---------------------------------------------------------------------------

export interface RegionConv {
  weight: Float64Array;
  bias: Float64Array;
  /** [Cout, Cin/groups, ...kernel] */
  shape: number[];
  stride: number[];
  pads: number[];
  groups: number;
  inChannels: number;
  /** Sum of the region's constant parameters (weights, BN statistics, factors). */
  paramsBefore: number;
}

export class RegionReject extends Error {
  constructor(
    message: string,
    readonly node?: OnnxNode,
  ) {
    super(message);
  }
}

/** Runs the region's nodes on an input `xv` for x; returns every tensor it computed. */
function evaluate(r: RegionNodes, xv: Tensor, consts: ConstFolder, linear = false, keepAll = false): Map<string, Tensor> {
  let step = 0;
  const env = new Map<string, Tensor>([[r.x, xv]]);
  // Each tensor is dropped after its last reader in the region (memory: a few tensors, not all).
  const last = new Map<string, number>();
  r.nodes.forEach((n, k) => n.inputs.forEach((i) => i && last.set(i, k)));
  const data = linear ? new Set(r.data) : undefined;
  const isData = (t: string) => t === r.x || (!!data && data.has(r.producerOf(t)!));
  for (const n of r.nodes) {
    let ins = n.inputs.map((i) => {
      if (!i) return undefined;
      const v = env.get(i) ?? consts.value(i);
      if (!v) {
        const why = consts.why(i);
        throw new RegionReject(`${nodeLabel(n)} reads '${i}', which the region cannot compute${why ? `: ${why}` : '.'}`, n);
      }
      return v;
    });
    let node = n;
    if (data?.has(n)) [node, ins] = linearPart(n, ins, isData);
    let outs: Tensor[];
    try {
      outs = runNode(node, ins, consts.opset);
    } catch (e) {
      if (e instanceof EvalError) throw new RegionReject(`${e.message}`, e.node);
      if (e instanceof RangeError) throw new RegionReject(`${nodeLabel(n)} would need tensors too big to evaluate.`, n);
      throw e;
    }
    n.outputs.forEach((o, k) => o && outs[k] && env.set(o, outs[k]));
    if (!keepAll) for (const i of n.inputs) if (i && i !== r.y && last.get(i) === step) env.delete(i);
    step++;
  }
  return env;
}

const zerosLike = (t: Tensor | undefined): Tensor | undefined => t && { dims: t.dims, data: new Float64Array(t.data.length), int: t.int };

/**
 * A data node's linear part: the same op with its additive constants (conv bias, BN shift, added
 * constants, padding values, constant pieces written into the data) set to zero. The region's
 * response to an impulse is then sparse, and equals f(e) − f(0) exactly.
 */
function linearPart(n: OnnxNode, ins: (Tensor | undefined)[], isData: (t: string) => boolean): [OnnxNode, (Tensor | undefined)[]] {
  const out = [...ins];
  switch (n.opType) {
    case 'Conv':
      out.length = 2;
      return [n, out];
    case 'BatchNormalization':
      out[2] = zerosLike(ins[2]);
      out[3] = zerosLike(ins[3]);
      return [n, out];
    case 'Add':
    case 'Sum':
    case 'Sub':
    case 'Concat':
    case 'ScatterND':
      n.inputs.forEach((i, k) => {
        if (i && !isData(i) && !(n.opType === 'ScatterND' && k === 1)) out[k] = zerosLike(ins[k]);
      });
      return [n, out];
    case 'Pad': {
      if (out[2]) out[2] = zerosLike(out[2]);
      if (!n.attrs.has('value')) return [n, out];
      const attrs = new Map(n.attrs);
      attrs.set('value', { name: 'value', f: 0 });
      return [{ ...n, attrs }, out];
    }
    default:
      return [n, out];
  }
}

/** Channels of x, from the first region node that fixes them. */
function inputChannels(r: RegionNodes, consts: ConstFolder, index: GraphIndex): number | undefined {
  const vi = [...index.model.graph.inputs, ...index.model.graph.valueInfo].find((v) => v.name === r.x);
  if (typeof vi?.shape?.[1] === 'number') return vi.shape[1];
  const pass = new Set([r.x]);
  for (const n of r.data) {
    const k = n.inputs.findIndex((i) => pass.has(i));
    if (k < 0) continue;
    if (n.opType === 'Conv') {
      const w = consts.value(n.inputs[1]);
      if (w) return w.dims[1] * attrInt(n, 'group', 1);
    } else if (n.opType === 'BatchNormalization') {
      const s = consts.value(n.inputs[1]);
      if (s) return s.data.length;
    } else if (['Mul', 'Add', 'Sub', 'Div'].includes(n.opType)) {
      const other = n.inputs.find((i, j) => j !== k && consts.has(i));
      const v = other ? consts.value(other) : undefined;
      if (v && v.dims.length >= 3 && v.dims[v.dims.length - 3] > 1) return v.dims[v.dims.length - 3];
    }
    if (['AveragePool', 'Pad', 'Identity', 'Dropout', 'Add', 'Sub', 'Mul', 'Div', 'Neg', 'Sum', 'BatchNormalization'].includes(n.opType)) pass.add(n.outputs[0]);
  }
  return undefined;
}

function spatialRank(r: RegionNodes, consts: ConstFolder): number {
  for (const n of r.data) {
    if (n.opType === 'Conv') {
      const w = consts.value(n.inputs[1]);
      if (w) return w.dims.length - 2;
    }
    if (n.opType === 'AveragePool') return attrInts(n, 'kernel_shape')?.length ?? 2;
  }
  return 2;
}

/** Upper bounds of the receptive field and the stride, from the ops' attributes. */
function reach(r: RegionNodes, consts: ConstFolder): { field: number; stride: number } {
  // Along each path from x the extents add up; parallel branches take the widest one (a sum over
  // every node would make a region of many branches look far wider than it is, and its probes too
  // big to afford). Pads are counted in full: an upper bound is all the spacing needs.
  const at = new Map<string, { field: number; stride: number }>([[r.x, { field: 0, stride: 1 }]]);
  let field = 0;
  let stride = 1;
  for (const n of r.data) {
    let inField = 0;
    let inStride = 1;
    for (const i of n.inputs) {
      const a = i ? at.get(i) : undefined;
      if (!a) continue;
      inField = Math.max(inField, a.field);
      inStride = Math.max(inStride, a.stride);
    }
    let k: number[] = [];
    if (n.opType === 'Conv') k = consts.value(n.inputs[1])?.dims.slice(2) ?? [];
    if (n.opType === 'AveragePool') k = attrInts(n, 'kernel_shape') ?? [];
    const dil = attrInts(n, 'dilations') ?? [];
    const s = attrInts(n, 'strides') ?? [];
    const pads = attrInts(n, 'pads') ?? [];
    let f = inField + Math.max(0, ...k.map((v, i) => (v - 1) * (dil[i] ?? 1))) * inStride + Math.max(0, ...pads) * inStride;
    if (n.opType === 'Pad') {
      const p = n.inputs[1] ? consts.value(n.inputs[1]) : undefined;
      f += Math.max(0, ...(p ? Array.from(p.data).map(Math.abs) : attrInts(n, 'pads') ?? [2])) * inStride;
    }
    const st = inStride * Math.max(1, ...s);
    for (const o of n.outputs) if (o) at.set(o, { field: f, stride: st });
    field = Math.max(field, f);
    stride = Math.max(stride, st);
  }
  return { field: field + 1, stride };
}

const maxAbs = (a: Float64Array) => a.reduce((m, v) => Math.max(m, Math.abs(v)), 0);

/** The node most likely to make the region differ from one conv at the borders. */
function borderCulprit(r: RegionNodes): OnnxNode | undefined {
  const spatialBefore = new Set<string>();
  const spreads = (n: OnnxNode) => (n.opType === 'Conv' || n.opType === 'AveragePool' || n.opType === 'Pad' || n.opType === 'Slice') && n.inputs[0] !== r.x;
  for (const n of r.data) {
    const pads = attrInts(n, 'pads') ?? [];
    if (n.opType === 'AveragePool' && attrInt(n, 'count_include_pad', 0) === 0 && pads.some((p) => p !== 0)) return n;
    if (['Slice', 'ScatterND', 'Concat', 'Expand'].includes(n.opType) && n.inputs.some((i) => spatialBefore.has(i) || i === r.x)) return n;
    if ((n.opType === 'Conv' || n.opType === 'AveragePool') && pads.some((p) => p !== 0) && n.inputs.some((i) => spatialBefore.has(i))) return n;
    if (n.opType === 'Conv' && (attrInts(n, 'dilations') ?? []).some((d) => d !== 1)) return n;
    if (spreads(n) || n.inputs.some((i) => spatialBefore.has(i))) spatialBefore.add(n.outputs[0]);
  }
  return undefined;
}

/** The first node whose response to a zero input stops being the same at every position. */
function biasCulprit(r: RegionNodes, env: Map<string, Tensor>): OnnxNode | undefined {
  const uniform = (t: Tensor | undefined) => {
    if (!t || t.dims.length < 3) return true;
    const plane = numelOf(t.dims.slice(2));
    for (let i = 0; i < t.data.length; i += plane) {
      const v = t.data[i];
      for (let j = 1; j < plane; j++) if (Math.abs(t.data[i + j] - v) > 1e-12 * (1 + Math.abs(v))) return false;
    }
    return true;
  };
  for (const n of r.data) if (n.inputs.every((i) => !i || uniform(env.get(i))) && !uniform(env.get(n.outputs[0]))) return n;
  return undefined;
}

/** Product of strides from x to y (all paths must agree, else the evaluation already failed). */
function structuralStride(r: RegionNodes, rank: number): number[] {
  const st = new Map<string, number[]>([[r.x, new Array(rank).fill(1)]]);
  for (const n of r.data) {
    const ins = n.inputs.map((i) => st.get(i)).filter((v): v is number[] => !!v);
    if (!ins.length) continue;
    const s = attrInts(n, 'strides') ?? [];
    const own = n.opType === 'Conv' || n.opType === 'AveragePool' ? ins[0].map((v, i) => v * (s[i] ?? 1)) : ins[0];
    st.set(n.outputs[0], own);
  }
  return st.get(r.y) ?? new Array(rank).fill(1);
}

/** A spatial size at which the region runs, guessed from the integers its shape arithmetic holds. */
function exportedSize(r: RegionNodes, consts: ConstFolder, rank: number, cin: number, runs: (s: number[]) => boolean): number[] | undefined {
  const values = new Set<number>();
  for (const n of r.nodes) {
    for (const i of n.inputs) {
      if (!i || !consts.has(i)) continue;
      const v = consts.value(i);
      if (!v) continue;
      for (const d of v.dims) values.add(d);
      if (v.int && v.data.length <= 64) for (const x of v.data) if (x > 0 && x < 65536) values.add(x);
    }
  }
  const cands = new Set<number>();
  for (let d = 0; d <= 8; d++) for (const v of values) for (const c of [v - d, v + d]) if (c >= 1) cands.add(c);
  // Bounded: sizes a probe can afford, and a bounded number of tries.
  const list = [...cands].filter((c) => c <= 2048 && cin * c ** rank <= probeBudget).slice(0, 64);
  for (const h of list) if (runs(new Array(rank).fill(h))) return new Array(rank).fill(h);
  if (rank === 2 && list.length <= 16) {
    for (const h of list) for (const w of list) if (h !== w && cin * h * w <= probeBudget && runs([h, w])) return [h, w];
  }
  return undefined;
}

/** Most elements of one probe tensor (a hostile or huge model is rejected rather than probed). */
const MAX_PROBE = 1 << 24;

/** Elements one evaluation may hold per tensor: bounded by the model's own size (no tiny file makes us allocate gigabytes). */
let probeBudget = MAX_PROBE;

function probeInput(c: number, sp: number[]): Tensor {
  const n = c * numelOf(sp);
  if (!(n <= probeBudget)) throw new RegionReject(`probing it would need ${c}×${sp.join('×')} values; too big to check.`);
  return { dims: [1, c, ...sp], data: new Float64Array(n) };
}

/**
 * Computes the one Conv a region equals, or throws RegionReject naming the op that prevents it.
 */
export function fuseRegion(r: RegionNodes, consts: ConstFolder, index: GraphIndex, seed = 7): RegionConv {
  probeBudget = Math.max(1 << 15, Math.min(MAX_PROBE, Math.floor(index.model.source.size / 64)));
  setEvalLimit(evalLimitFor(index.model));
  // Constants stored in float32 (DBB's border values, computed by the exporter from the BN) agree
  // with the float64 composite only to float32 precision.
  const dt = regionDtype(r, index.model);
  const types = new Set<number>();
  for (const n of r.data) for (const i of n.inputs.slice(1)) {
    const t = i ? (index.model.graph.initializers.get(i) ?? index.constant(i)?.tensor) : undefined;
    if (t && isFloatType(t.dtype) && !(n.opType === 'Pad' || n.opType === 'Slice' || n.opType === 'Expand')) types.add(t.dtype);
  }
  if (types.size > 1) throw new RegionReject(`its parameters mix element types (${[...types].map(dtypeName).join(' and ')}).`);
  const rel = dt === 11 ? 1e-9 : dt === 10 ? 2e-3 : dt === 16 ? 1.6e-2 : 2e-6;
  const cin = inputChannels(r, consts, index);
  if (!cin) throw new RegionReject(`cannot tell how many channels '${r.x}' has.`);
  const rank = spatialRank(r, consts);
  const { field, stride: sMax } = reach(r, consts);
  const margin = field + 2 * sMax;
  const h0 = 2 * margin + 2 * sMax + 1;
  let sizeA = new Array(rank).fill(h0);
  let sizeB: number[] | undefined = new Array(rank).fill(h0 + sMax);
  // Exports often bake the input size into shape constants (DBB's border writes): when the region
  // does not run at generic probe sizes, find the size it was exported for.
  const runs = (size: number[]) => {
    try {
      dryRun(() => evaluate(r, probeInput(cin, size), consts));
      return true;
    } catch (e) {
      if (e instanceof RegionReject) return false;
      throw e;
    }
  };
  if (!runs(sizeA) || !runs(sizeB)) {
    const found = exportedSize(r, consts, rank, cin, runs);
    if (!found) evaluate(r, probeInput(cin, sizeA), consts); // throws the reason at a generic size
    sizeA = found!;
    sizeB = undefined;
  }
  // 1. Zero input: the bias, the output size, and the stride.
  const envA = evaluate(r, probeInput(cin, sizeA), consts, false, true);
  const zA = envA.get(r.y)!;
  if (zA.dims.length !== rank + 2 || zA.dims[0] !== 1) throw new RegionReject(`the region's output has shape [${zA.dims.join(', ')}], not [1, C, …] like its input.`, index.producer.get(r.y));
  const cout = zA.dims[1];
  const oA = zA.dims.slice(2);
  const zB = sizeB ? evaluate(r, probeInput(cin, sizeB), consts).get(r.y)! : undefined;
  const oB = zB?.dims.slice(2);
  const stride = oB
    ? oA.map((o, i) => {
        const d = oB[i] - o;
        if (d <= 0 || sMax % d !== 0) throw new RegionReject(`the region's output size does not follow its input size like a convolution's.`, index.producer.get(r.y));
        return sMax / d;
      })
    : structuralStride(r, rank);
  // One impulse per stride phase: a stride beyond any real network's (a hostile attribute) is refused
  // before it multiplies the work.
  if (stride.some((v) => !(Number.isInteger(v) && v >= 1 && v <= 64))) throw new RegionReject(`its stride ${stride.join('×')} is not one RepFuse evaluates (1 to 64 per axis).`, index.producer.get(r.y));
  const plane = numelOf(oA);
  const bias = new Float64Array(cout);
  for (let o = 0; o < cout; o++) {
    const v = zA.data[o * plane + Math.floor(plane / 2)];
    bias[o] = v;
    for (let j = 0; j < plane; j++) {
      if (Math.abs(zA.data[o * plane + j] - v) > rel * (1 + Math.abs(v))) {
        const n = biasCulprit(r, envA);
        throw new RegionReject(
          `its constant part differs at the borders (${n ? `${nodeLabel(n)} pads a non-zero value with zeros` : 'a constant enters before padding'}), so it is not one convolution.`,
          n,
        );
      }
    }
  }
  // 2. Impulses: one input channel and one stride phase at a time, far from every border.
  const centre = sizeA.map((h, i) => {
    const m = Math.min(margin, Math.floor((h - stride[i]) / 2));
    return Math.max(0, m - (m % stride[i]));
  });
  const phases: number[][] = [[]];
  for (let i = 0; i < rank; i++) {
    const next: number[][] = [];
    for (const p of phases) for (let f = 0; f < stride[i]; f++) next.push([...p, f]);
    phases.splice(0, phases.length, ...next);
  }
  const inS = sizeA.map((_, i) => sizeA.slice(i + 1).reduce((a, b) => a * b, 1));
  const outS = oA.map((_, i) => oA.slice(i + 1).reduce((a, b) => a * b, 1));
  const hits: { o: number; c: number; tap: number[]; v: number }[] = [];
  const lo = new Array(rank).fill(Infinity);
  const hi = new Array(rank).fill(-Infinity);
  const jobs: { c: number; pos: number[] }[] = [];
  for (let c = 0; c < cin; c++) for (const ph of phases) jobs.push({ c, pos: centre.map((p, i) => p + ph[i]) });
  const per = cin * numelOf(sizeA);
  const record = (job: { c: number; pos: number[] }, y: Float64Array, at: number) => {
    for (let o = 0; o < cout; o++) {
      for (let j = 0; j < plane; j++) {
        const v = y[at + o * plane + j];
        if (v === 0) continue;
        const q = oA.map((_, i) => Math.floor(j / outS[i]) % oA[i]);
        const rel = job.pos.map((p, i) => p - q[i] * stride[i]); // = tap − padBegin
        rel.forEach((t, i) => {
          lo[i] = Math.min(lo[i], t);
          hi[i] = Math.max(hi[i], t);
        });
        hits.push({ o, c: job.c, tap: rel, v });
      }
    }
  };
  // Many impulses per evaluation, one per batch sample (the ops treat samples independently); a
  // region whose shape constants fix the batch size falls back to one evaluation per impulse.
  const batch = Math.max(1, Math.floor(probeBudget / per));
  for (let j0 = 0; j0 < jobs.length; j0 += batch) {
    const part = jobs.slice(j0, j0 + batch);
    const x: Tensor = { dims: [part.length, cin, ...sizeA], data: new Float64Array(part.length * per) };
    part.forEach((job, k) => (x.data[k * per + job.c * numelOf(sizeA) + job.pos.reduce((a, p, i) => a + p * inS[i], 0)] = 1));
    let y: Tensor | undefined;
    if (part.length > 1) {
      try {
        y = evaluate(r, x, consts, true).get(r.y);
      } catch (e) {
        if (!(e instanceof RegionReject)) throw e;
      }
    }
    if (y && y.dims[0] === part.length && y.data.length === part.length * cout * plane) {
      part.forEach((job, k) => record(job, y!.data, k * cout * plane));
      continue;
    }
    for (const job of part) {
      const x1 = probeInput(cin, sizeA);
      x1.data[job.c * numelOf(sizeA) + job.pos.reduce((a, p, i) => a + p * inS[i], 0)] = 1;
      record(job, evaluate(r, x1, consts, true).get(r.y)!.data, 0);
    }
  }
  if (!hits.length) throw new RegionReject('its output does not depend on its input.');
  const padBegin = lo.map((l) => -l);
  const kernel = lo.map((l, i) => hi[i] - l + 1);
  if (padBegin.some((p) => p < 0)) throw new RegionReject('its output is shifted against its input by more than a convolution padding allows.', index.producer.get(r.y));
  // Padding at the end: the one that gives the observed output size at both probe sizes.
  const padEnd = kernel.map((k, i) => {
    const sizes = sizeB && oB ? [[sizeA[i], oA[i]], [sizeB[i], oB[i]]] : [[sizeA[i], oA[i]]];
    const fits = (pe: number) => sizes.every(([h, o]) => Math.floor((h + padBegin[i] + pe - k) / stride[i]) + 1 === o);
    if (fits(padBegin[i])) return padBegin[i];
    for (let pe = 0; pe <= k + stride[i]; pe++) if (fits(pe)) return pe;
    throw new RegionReject(`its output size matches no padding of a ${kernel.join('×')} convolution with stride ${stride.join('×')}.`, index.producer.get(r.y));
  });
  const ksz = numelOf(kernel);
  const full = new Float64Array(cout * cin * ksz);
  const kS = kernel.map((_, i) => kernel.slice(i + 1).reduce((a, b) => a * b, 1));
  for (const h of hits) full[(h.o * cin + h.c) * ksz + h.tap.reduce((a, t, i) => a + (t + padBegin[i]) * kS[i], 0)] = h.v;
  // 3. Groups: the most that leave every off-group weight zero.
  let groups = 1;
  for (let g = Math.min(cin, cout); g > 1; g--) {
    if (cin % g || cout % g) continue;
    const ipg = cin / g;
    const opg = cout / g;
    let ok = true;
    for (let o = 0; o < cout && ok; o++) {
      const go = Math.floor(o / opg);
      for (let c = 0; c < cin && ok; c++) {
        if (Math.floor(c / ipg) === go) continue;
        for (let t = 0; t < ksz; t++) if (full[(o * cin + c) * ksz + t] !== 0) ok = false;
      }
    }
    if (ok) {
      groups = g;
      break;
    }
  }
  const ipg = cin / groups;
  const opg = cout / groups;
  const weight = new Float64Array(cout * ipg * ksz);
  for (let o = 0; o < cout; o++) {
    const g = Math.floor(o / opg);
    for (let c = 0; c < ipg; c++) weight.set(full.subarray((o * cin + g * ipg + c) * ksz, (o * cin + g * ipg + c + 1) * ksz), (o * ipg + c) * ksz);
  }
  // 4. Random probes at two sizes: every position, borders included, must match the conv.
  const fake: OnnxNode = {
    index: -1,
    name: 'candidate',
    opType: 'Conv',
    domain: '',
    inputs: [],
    outputs: ['y'],
    outerRefs: [],
    attrs: new Map<string, import('onnx-proto').onnx.IAttributeProto>([
      ['strides', { name: 'strides', ints: stride }],
      ['pads', { name: 'pads', ints: [...padBegin, ...padEnd] }],
      ['group', { name: 'group', i: groups }],
    ]),
  };
  const rng = new Rng(seed);
  for (const size of sizeB ? [sizeA, sizeB.map((s) => s + 1)] : [sizeA, sizeA]) {
    const x = probeInput(cin, size);
    for (let i = 0; i < x.data.length; i++) x.data[i] = rng.uniform(-1, 1);
    const want = evaluate(r, x, consts).get(r.y)!;
    const got = conv(fake, x, { dims: [cout, ipg, ...kernel], data: weight }, { dims: [cout], data: bias });
    if (want.dims.join() !== got.dims.join()) throw new RegionReject(`its output has shape [${want.dims.join(', ')}] where a convolution gives [${got.dims.join(', ')}].`, index.producer.get(r.y));
    const tol = rel * (1 + maxAbs(want.data));
    let worst = 0;
    for (let i = 0; i < want.data.length; i++) worst = Math.max(worst, Math.abs(want.data[i] - got.data[i]));
    if (!(worst <= tol)) {
      const n = borderCulprit(r);
      throw new RegionReject(
        `it is not one convolution: at the borders it differs from the ${kernel.join('×')} candidate by up to ${worst.toPrecision(3)}${n ? ` (${nodeLabel(n)} pads or crops inside the region)` : ''}.`,
        n,
      );
    }
  }
  let paramsBefore = 0;
  for (const n of r.data) for (const i of n.inputs.slice(1)) if (i && consts.has(i)) paramsBefore += consts.value(i)?.data.length ?? 0;
  for (const n of r.data) if (n.opType === 'Add' || n.opType === 'Mul' || n.opType === 'Sub' || n.opType === 'Div') if (n.inputs[0] && consts.has(n.inputs[0])) paramsBefore += consts.value(n.inputs[0])?.data.length ?? 0;
  return { weight, bias, shape: [cout, ipg, ...kernel], stride, pads: [...padBegin, ...padEnd], groups, inChannels: cin, paramsBefore };
}

/** Float element type of the region (its first float constant's), for the fused weights. */
export function regionDtype(r: RegionNodes, model: OnnxModel): number {
  for (const n of r.data) {
    for (const i of n.inputs.slice(1)) {
      const t = i ? model.graph.initializers.get(i) : undefined;
      if (t && isFloatType(t.dtype)) return t.dtype;
    }
  }
  const vi = [...model.graph.inputs, ...model.graph.valueInfo].find((v) => v.name === r.x);
  return vi?.elemType && isFloatType(vi.elemType) ? vi.elemType : 1;
}

// ----- BatchNormalization next to a Gemm (RepViT's BN_Linear) ------------------------------------

export interface GemmFold {
  bn: OnnxNode;
  gemm: OnnxNode;
  /** Further nodes the fold replaces (a second head summed with this one, and the scale after). */
  extra?: OnnxNode[];
  /** The BN comes before the Gemm (on A) or after it. */
  where: 'before' | 'after';
  x: string;
  y: string;
  weight: Float64Array;
  weightDims: number[];
  bias: Float64Array;
  transB: number;
  alpha: number;
  dtype: number;
}

function bnAffine(bn: OnnxNode, consts: ConstFolder): { s: Float64Array; t: Float64Array } | undefined {
  const v = [1, 2, 3, 4].map((k) => (bn.inputs[k] ? consts.value(bn.inputs[k]) : undefined));
  if (v.some((t) => !t) || attrInt(bn, 'training_mode', 0) !== 0) return undefined;
  const [g, b, m, va] = v as Tensor[];
  const c = g.data.length;
  if ([b, m, va].some((t) => t.data.length !== c)) return undefined;
  const eps = bn.attrs.get('epsilon')?.f ?? 1e-5;
  const s = new Float64Array(c);
  const t = new Float64Array(c);
  for (let i = 0; i < c; i++) {
    const d = va.data[i] + eps;
    if (!(d > 0)) return undefined;
    s[i] = g.data[i] / Math.sqrt(d);
    t[i] = b.data[i] - m.data[i] * s[i];
  }
  return { s, t };
}

/**
 * BN → Gemm and Gemm → BN pairs whose parameters are constants: the BN folds into the Gemm's
 * weight and bias (exactly, in float64). Returns the folds, or a reason per pair that cannot fold.
 */
export function findGemmFolds(model: OnnxModel, index: GraphIndex, consts: ConstFolder, taken: Set<OnnxNode>): (GemmFold | { bn: OnnxNode; gemm: OnnxNode; reason: string })[] {
  const out: (GemmFold | { bn: OnnxNode; gemm: OnnxNode; reason: string })[] = [];
  const used = new Set<OnnxNode>();
  for (const bn of model.graph.nodes) {
    if (!isOp(bn, 'BatchNormalization') || taken.has(bn) || used.has(bn) || !bn.outputs[0]) continue;
    const next = index.consumersOf(bn.outputs[0]);
    const prev = index.producer.get(bn.inputs[0]);
    let gemm: OnnxNode | undefined;
    let where: 'before' | 'after' = 'before';
    if (next.length === 1 && isOp(next[0], 'Gemm') && next[0].inputs[0] === bn.outputs[0] && index.usedOnlyBy(bn.outputs[0], next[0])) gemm = next[0];
    else if (isOp(prev, 'Gemm') && index.usedOnlyBy(prev!.outputs[0], bn)) {
      gemm = prev;
      where = 'after';
    }
    if (!gemm || taken.has(gemm) || used.has(gemm)) continue;
    const fail = (reason: string) => out.push({ bn, gemm: gemm!, reason });
    if (attrInt(gemm, 'transA', 0) !== 0) {
      fail(`${nodeLabel(gemm)} transposes its input (transA=1).`);
      continue;
    }
    const B = consts.value(gemm.inputs[1]);
    const C = gemm.inputs[2] ? consts.value(gemm.inputs[2]) : undefined;
    if (!B || B.dims.length !== 2 || (gemm.inputs[2] && !C)) {
      fail(`the weight or bias of ${nodeLabel(gemm)} is computed at run time, not a constant.`);
      continue;
    }
    const aff = bnAffine(bn, consts);
    if (!aff) {
      fail(`${nodeLabel(bn)} has parameters that are not usable constants.`);
      continue;
    }
    const transB = attrInt(gemm, 'transB', 0);
    const alpha = gemm.attrs.get('alpha')?.f ?? 1;
    const beta = gemm.attrs.get('beta')?.f ?? 1;
    const [K, N] = transB ? [B.dims[1], B.dims[0]] : B.dims;
    const bAt = (k: number, n: number) => (transB ? B.data[n * K + k] : B.data[k * N + n]);
    const cAt = (n: number) => (!C ? 0 : C.data.length === 1 ? C.data[0] : C.data.length === N ? C.data[n] : NaN);
    if (C && C.data.length !== 1 && C.data.length !== N) {
      fail(`the bias of ${nodeLabel(gemm)} has ${C.data.length} values; expected 1 or ${N}.`);
      continue;
    }
    const ch = aff.s.length;
    if (ch !== (where === 'before' ? K : N)) {
      fail(`${nodeLabel(bn)} has ${ch} channels; ${nodeLabel(gemm)} has ${where === 'before' ? K : N} ${where === 'before' ? 'inputs' : 'outputs'}.`);
      continue;
    }
    const weight = new Float64Array(B.data.length);
    const bias = new Float64Array(N);
    for (let n = 0; n < N; n++) {
      let acc = beta * cAt(n);
      for (let k = 0; k < K; k++) {
        const w = bAt(k, n);
        const nw = where === 'before' ? aff.s[k] * w : aff.s[n] * w;
        if (where === 'before') acc += alpha * aff.t[k] * w;
        weight[transB ? n * K + k : k * N + n] = nw;
      }
      bias[n] = where === 'before' ? acc : aff.s[n] * beta * cAt(n) + aff.t[n];
    }
    const wInit = model.graph.initializers.get(gemm.inputs[1]);
    used.add(bn);
    used.add(gemm);
    out.push({
      bn,
      gemm,
      where,
      x: where === 'before' ? bn.inputs[0] : gemm.inputs[0],
      y: where === 'before' ? gemm.outputs[0] : bn.outputs[0],
      weight,
      weightDims: B.dims,
      bias,
      transB,
      alpha,
      dtype: wInit && isFloatType(wInit.dtype) ? wInit.dtype : 1,
    });
  }
  return mergeHeads(out, index, consts);
}

/**
 * Two folded heads of one input summed (and optionally scaled by a constant), as RepViT's
 * classifier with distillation computes (head(x) + head_dist(x)) / 2: one Gemm, as its fuse() makes.
 */
function mergeHeads(folds: (GemmFold | { bn: OnnxNode; gemm: OnnxNode; reason: string })[], index: GraphIndex, consts: ConstFolder): typeof folds {
  const ok = folds.filter((f): f is GemmFold => !('reason' in f));
  const byY = new Map(ok.map((f) => [f.y, f]));
  const gone = new Set<GemmFold>();
  const merged: GemmFold[] = [];
  for (const add of index.model.graph.nodes) {
    if (!isOp(add, 'Add') || add.inputs.length !== 2) continue;
    const [a, b] = add.inputs.map((i) => byY.get(i));
    if (!a || !b || a === b || gone.has(a) || gone.has(b) || a.x !== b.x) continue;
    if (!index.usedOnlyBy(a.y, add) || !index.usedOnlyBy(b.y, add) || a.weight.length !== b.weight.length || a.alpha !== 1 || b.alpha !== 1) continue;
    const [K, N] = a.transB ? [a.weightDims[1], a.weightDims[0]] : a.weightDims;
    const at = (f: GemmFold, k: number, n: number) => (f.transB ? f.weight[n * K + k] : f.weight[k * N + n]);
    // An optional scalar Div/Mul after the sum.
    let scale = 1;
    let y = add.outputs[0];
    const extra: OnnxNode[] = [b.bn, b.gemm, add];
    const next = index.consumersOf(y);
    if (next.length === 1 && (isOp(next[0], 'Div') || isOp(next[0], 'Mul')) && next[0].inputs[0] === y && index.usedOnlyBy(y, next[0])) {
      const c = consts.value(next[0].inputs[1]);
      if (c && c.data.length === 1 && !c.int) {
        scale = next[0].opType === 'Div' ? 1 / c.data[0] : c.data[0];
        y = next[0].outputs[0];
        extra.push(next[0]);
      }
    }
    const weight = new Float64Array(a.weight.length);
    for (let k = 0; k < K; k++) for (let n = 0; n < N; n++) weight[a.transB ? n * K + k : k * N + n] = (at(a, k, n) + at(b, k, n)) * scale;
    const bias = a.bias.map((v, n) => (v + b.bias[n]) * scale);
    gone.add(a);
    gone.add(b);
    merged.push({ ...a, y, weight, bias, extra });
  }
  return [...folds.filter((f) => 'reason' in f || !gone.has(f)), ...merged];
}
