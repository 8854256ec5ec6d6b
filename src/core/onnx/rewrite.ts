// Turns a Detection into a writer Plan: one fused Conv per block (and per folded Conv → BN), new
// initializers computed lazily at write time, and everything the fusion made dead removed.
import { onnx } from 'onnx-proto';
import { readInto } from '../bytes';
import { decodeNumbers, dtypeSize, encodeFloats, isFloatType, type NumArray } from '../dtype';
import { checkFinite, streamFusedWeight } from '../fusestream';
import { type BNParams, type ConvTerm, type FuseSpec, type IdentityTerm, type PreparedFusion, prepareFusion, type WeightRows } from '../fusion';
import type { ConstRef } from './graph';
import { type BNRef, type Detection, type FusedOp, isConvLeaf, type OnnxBlock, type OnnxFold } from './detect';
import { numelOf, type OnnxModel, type OnnxNode, readTensorValues } from './reader';
import { emptyPlan, type NewTensor, type Plan } from './writer';

export interface RewriteSummary {
  nodesBefore: number;
  nodesAfter: number;
  paramsBefore: number;
  paramsAfter: number;
  opCountsBefore: Record<string, number>;
  opCountsAfter: Record<string, number>;
}

export function countOps(nodes: OnnxNode[]): Record<string, number> {
  const out: Record<string, number> = {};
  for (const n of nodes) {
    const k = n.domain && n.domain !== 'ai.onnx' ? `${n.domain}.${n.opType}` : n.opType;
    out[k] = (out[k] ?? 0) + 1;
  }
  return out;
}

function values(model: OnnxModel, r: ConstRef): NumArray {
  return readTensorValues(model, r.tensor);
}

/**
 * A big float weight as lazy rows (read slice by slice into one reused buffer); small or
 * unusually stored weights are read whole.
 */
function weightRows(model: OnnxModel, r: ConstRef, dims: number[]): NumArray | WeightRows {
  const t = r.tensor;
  const s = t.storage;
  const esize = dtypeSize(t.dtype);
  if ((s.kind !== 'raw' && s.kind !== 'external') || !esize || !isFloatType(t.dtype) || dims.length < 2) return values(model, r);
  const per = numelOf(dims.slice(1));
  const src = s.kind === 'raw' ? model.source : model.external.source(s.file);
  let buf: Uint8Array | undefined;
  return {
    rows(o0: number, o1: number) {
      const len = (o1 - o0) * per * esize;
      if (!buf || buf.length < len) buf = new Uint8Array(len);
      const b = buf.subarray(0, len);
      readInto(src, b, s.offset + o0 * per * esize);
      return decodeNumbers(b, t.dtype, src.name);
    },
  };
}

function bnParams(model: OnnxModel, bn: BNRef): BNParams {
  return {
    gamma: values(model, bn.scale),
    beta: values(model, bn.bias),
    mean: values(model, bn.mean),
    variance: values(model, bn.variance),
    eps: bn.eps,
  };
}

/** The fusion terms of a block, read from the model (float16/bfloat16 widened exactly). */
export function blockTerms(model: OnnxModel, block: OnnxBlock): (ConvTerm | IdentityTerm)[] {
  const f = block.fused;
  if (f) {
    // Statistics of a region show the one conv it equals ([out, in] for a Gemm).
    let weight = f.weight;
    if (f.op === 'Gemm' && !f.transB) {
      const [k, n] = f.weightDims;
      weight = new Float64Array(k * n);
      for (let i = 0; i < k; i++) for (let j = 0; j < n; j++) weight[j * k + i] = f.weight[i * n + j];
    }
    return [{ kind: 'conv', weight, kernel: block.kernel, bias: f.bias }];
  }
  return block.leaves.map((leaf) => {
    if (!isConvLeaf(leaf)) return { kind: 'identity', bn: leaf.bn ? bnParams(model, leaf.bn) : undefined };
    return {
      kind: 'conv',
      weight: weightRows(model, leaf.weight, leaf.weight.tensor.dims),
      kernel: leaf.kernel,
      bias: leaf.bias ? values(model, leaf.bias) : undefined,
      bn: leaf.bn ? bnParams(model, leaf.bn) : undefined,
      scale: leaf.mul ? values(model, leaf.mul.factor) : undefined,
    };
  });
}

export function blockSpec(model: OnnxModel, block: OnnxBlock, terms = blockTerms(model, block)): FuseSpec {
  return {
    name: `block '${block.info.name}'`,
    outChannels: block.outChannels,
    inPerGroup: block.inPerGroup,
    groups: block.groups,
    kernel: block.kernel,
    terms,
    postBN: block.postBN ? bnParams(model, block.postBN) : undefined,
  };
}

function foldSpec(model: OnnxModel, fold: OnnxFold): FuseSpec {
  const w = fold.weight.tensor.dims;
  return {
    name: `Conv '${fold.info.conv}'`,
    outChannels: w[0],
    inPerGroup: w[1],
    groups: fold.groups,
    kernel: fold.kernel,
    terms: [{ kind: 'conv', weight: weightRows(model, fold.weight, w), kernel: fold.kernel, bias: fold.bias ? values(model, fold.bias) : undefined, bn: bnParams(model, fold.bn) }],
  };
}

/** Makes the weight/bias pair of one fused conv; the block's constants are read once, when written. */
function lazyPair(names: [string, string], dtype: number, shape: number[], spec: () => FuseSpec): [NewTensor, NewTensor] {
  let prep: PreparedFusion | undefined;
  const prepared = () => (prep ??= prepareFusion(spec()));
  const weight: NewTensor = { name: names[0], dtype, dims: shape, write: (sink) => streamFusedWeight(prepared(), dtype, sink) };
  const bias: NewTensor = {
    name: names[1],
    dtype,
    dims: [shape[0]],
    write: (sink) => {
      const p = prepared();
      checkFinite(p.bias, `${p.spec.name}: the fused bias`);
      sink(encodeFloats(p.bias, dtype));
      prep = undefined; // the pair is written weight first, bias second: release the block's data
    },
  };
  return [weight, bias];
}

const INTS = onnx.AttributeProto.AttributeType.INTS;
const INT = onnx.AttributeProto.AttributeType.INT;
const FLOAT = onnx.AttributeProto.AttributeType.FLOAT;

function checked(v: Float64Array, what: string): Float64Array {
  checkFinite(v, what);
  return v;
}

export interface RewriteResult {
  plan: Plan;
  summary: RewriteSummary;
}

/** Builds the plan that replaces every detected block and fold with one Conv. */
export function planRewrite(model: OnnxModel, det: Detection): RewriteResult {
  const plan = emptyPlan();
  const graph = model.graph;
  const index = det.index;
  const taken = new Set<string>([...graph.initializers.keys(), ...graph.inputs.map((i) => i.name)]);
  for (const n of graph.nodes) for (const o of n.outputs) taken.add(o);
  const unique = (base: string): string => {
    let name = base;
    for (let i = 1; taken.has(name); i++) name = `${base}_${i}`;
    taken.add(name);
    return name;
  };

  const constRefs: ConstRef[] = [];
  const newNodes: OnnxNode[] = [];
  const produced = new Set<string>();
  let paramsAdded = 0;

  const place = (removed: OnnxNode[], node: onnx.INodeProto, tensors: NewTensor[], refs: ConstRef[]) => {
    for (const n of removed) plan.removeNodes.add(n.index);
    const last = Math.max(...removed.map((n) => n.index));
    const enc = onnx.NodeProto.encode(node).finish();
    const list = plan.insertNodes.get(last) ?? [];
    list.push(enc);
    plan.insertNodes.set(last, list);
    // New initializers go where the first initializer they replace stood, else at the end.
    const anchor = refs.map((r) => r.initializer).find((n): n is string => !!n);
    if (anchor) {
      const l = plan.insertInitializers.get(anchor) ?? [];
      l.push(...tensors);
      plan.insertInitializers.set(anchor, l);
    } else plan.appendInitializers.push(...tensors);
    constRefs.push(...refs);
    for (const t of tensors) paramsAdded += numelOf(t.dims);
    newNodes.push({ index: -1, name: node.name ?? '', opType: node.opType ?? 'Conv', domain: '', inputs: node.input ?? [], outputs: node.output ?? [], attrs: new Map(), outerRefs: [] });
    for (const o of node.output ?? []) produced.add(o);
  };

  const bnRefs = (bn: BNRef | undefined): ConstRef[] => (bn ? [bn.scale, bn.bias, bn.mean, bn.variance] : []);

  /** A region (or BN → Gemm fold) whose replacement was computed at detection: one node, rounded once. */
  const placeFused = (b: OnnxBlock, f: FusedOp) => {
    const base = b.info.name;
    const names: [string, string] = [unique(`${base}.fused.weight`), unique(`${base}.fused.bias`)];
    const tensors: NewTensor[] = [
      { name: names[0], dtype: b.dtype, dims: f.weightDims, write: (sink) => sink(encodeFloats(checked(f.weight, `${base}: the fused weight`), b.dtype)) },
      { name: names[1], dtype: b.dtype, dims: [f.bias.length], write: (sink) => sink(encodeFloats(checked(f.bias, `${base}: the fused bias`), b.dtype)) },
    ];
    const k = f.weightDims.slice(2);
    const attribute: onnx.IAttributeProto[] =
      f.op === 'Conv'
        ? [
            { name: 'dilations', type: INTS, ints: k.map(() => 1) },
            { name: 'group', type: INT, i: b.groups },
            { name: 'kernel_shape', type: INTS, ints: k },
            { name: 'pads', type: INTS, ints: f.pads },
            { name: 'strides', type: INTS, ints: b.stride },
          ]
        : [
            { name: 'alpha', type: FLOAT, f: f.alpha ?? 1 },
            { name: 'beta', type: FLOAT, f: 1 },
            { name: 'transB', type: INT, i: f.transB ?? 0 },
          ];
    // Constants the removed nodes read (initializers, Constant/Identity carriers) go if nothing else reads them.
    const refs: ConstRef[] = [];
    for (const n of b.nodes) for (const i of n.inputs.slice(1)) {
      const r = i ? index.constant(i) : undefined;
      if (r) refs.push(r);
    }
    place(b.nodes, { name: unique(`${base}/fused/${f.op}`), opType: f.op, input: [b.x, names[0], names[1]], output: [b.output], attribute, docString: `RepFuse: ${f.what} of '${base}' fused into one ${f.op}.` }, tensors, refs);
    regionRemoved.push(...b.nodes);
  };
  const regionRemoved: OnnxNode[] = [];

  for (const b of det.blocks) {
    if (b.fused) {
      placeFused(b, b.fused);
      continue;
    }
    const base = b.info.name;
    const shape = [b.outChannels, b.inPerGroup, ...b.kernel];
    const names: [string, string] = [unique(`${base}.fused.weight`), unique(`${base}.fused.bias`)];
    const tensors = lazyPair(names, b.dtype, shape, () => blockSpec(model, b));
    const refs: ConstRef[] = [];
    for (const l of b.leaves) {
      if (isConvLeaf(l)) {
        refs.push(l.weight);
        if (l.bias) refs.push(l.bias);
        if (l.mul) refs.push(l.mul.factor);
      }
      refs.push(...bnRefs(l.bn));
    }
    refs.push(...bnRefs(b.postBN), ...b.zeros);
    const r = b.kernel.length;
    place(
      b.nodes,
      {
        name: unique(`${base}/fused/Conv`),
        opType: 'Conv',
        input: [b.x, names[0], names[1]],
        output: [b.output],
        attribute: [
          { name: 'dilations', type: INTS, ints: new Array(r).fill(1) },
          { name: 'group', type: INT, i: b.groups },
          { name: 'kernel_shape', type: INTS, ints: b.kernel },
          { name: 'pads', type: INTS, ints: [...b.kernel, ...b.kernel].map((k) => (k - 1) / 2) },
          { name: 'strides', type: INTS, ints: b.stride },
        ],
        docString: `RepFuse: ${b.leaves.length} branches of ${b.info.family} block '${base}' fused into one convolution.`,
      },
      tensors,
      refs,
    );
  }

  for (const f of det.folds) {
    const w = f.weight.tensor.dims;
    const names: [string, string] = [unique(`${f.info.name}.folded.weight`), unique(`${f.info.name}.folded.bias`)];
    const tensors = lazyPair(names, f.dtype, w, () => foldSpec(model, f));
    const attrs = [...f.conv.attrs.values()];
    place(
      [f.conv, f.bn.node],
      { name: f.conv.name, opType: 'Conv', input: [f.conv.inputs[0], names[0], names[1]], output: [f.output], attribute: attrs, docString: `RepFuse: BatchNormalization '${f.info.bn}' folded into this convolution.` },
      tensors,
      [f.weight, ...(f.bias ? [f.bias] : []), ...bnRefs(f.bn)],
    );
  }

  // Remove what nothing reads any more: Identity/Constant carriers, then initializers.
  const removed = (n: OnnxNode) => plan.removeNodes.has(n.index);
  const stillRead = (name: string): boolean =>
    index.graphOutputs.has(name) ||
    index.outerRefs.has(name) ||
    index.consumersOf(name).some((c) => !removed(c)) ||
    newNodes.some((n) => n.inputs.includes(name));
  let changed = true;
  while (changed) {
    changed = false;
    for (const r of constRefs) {
      for (const v of r.via) {
        if (removed(v)) continue;
        if (v.outputs.every((o) => !stillRead(o))) {
          plan.removeNodes.add(v.index);
          changed = true;
        }
      }
    }
  }
  // Regions also leave shape arithmetic and constant subgraphs (DBB's padding, OREPA's kernels)
  // that only they read: remove every node that fed a removed node and is no longer read.
  const frontier: OnnxNode[] = [...regionRemoved];
  const deadInits = new Set<string>();
  while (frontier.length) {
    const n = frontier.pop()!;
    for (const i of n.inputs) {
      if (!i) continue;
      if (graph.initializers.has(i) && !index.producer.has(i)) deadInits.add(i);
      const p = index.producer.get(i);
      if (!p || removed(p) || p.outerRefs.length) continue;
      if (p.outputs.every((o) => !o || !stillRead(o))) {
        plan.removeNodes.add(p.index);
        frontier.push(p);
      }
    }
  }
  for (const r of constRefs) if (r.initializer) deadInits.add(r.initializer);
  for (const name of deadInits) {
    if (!plan.removeInitializers.has(name) && !stillRead(name)) plan.removeInitializers.add(name);
  }
  // Tensors that no longer exist (their value_info and graph-input entries go too).
  for (const i of plan.removeNodes) for (const o of graph.nodes[i].outputs) if (o && !produced.has(o)) plan.removedTensors.add(o);
  for (const n of plan.removeInitializers) plan.removedTensors.add(n);
  // Initializers whose anchor is removed still emit there (the writer handles anchors before removal).

  const keptNodes = graph.nodes.filter((n) => !removed(n));
  let paramsBefore = 0;
  for (const t of graph.initializers.values()) paramsBefore += numelOf(t.dims);
  let paramsRemoved = 0;
  for (const n of plan.removeInitializers) paramsRemoved += numelOf(graph.initializers.get(n)!.dims);
  const opCountsAfter = countOps([...keptNodes, ...newNodes]);
  return {
    plan,
    summary: {
      nodesBefore: graph.nodes.length,
      nodesAfter: keptNodes.length + newNodes.length,
      paramsBefore,
      paramsAfter: paramsBefore - paramsRemoved + paramsAdded,
      opCountsBefore: countOps(graph.nodes),
      opCountsAfter,
    },
  };
}
