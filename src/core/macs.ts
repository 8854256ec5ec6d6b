// Multiply-accumulates of an ONNX graph at batch 1: static shape inference over the graph (input
// shapes as declared or given, initializer dims, small integer constants followed through
// Shape/Gather/Concat chains), then Conv = N·Cout·H'·W'·(Cin/g)·kh·kw and Gemm/MatMul = M·K·N
// (times the broadcast batch of a MatMul). Nothing else counts as a MAC. A Conv/Gemm/MatMul whose
// shapes cannot be inferred is listed, never guessed.
import { GraphIndex } from './onnx/graph';
import { attrInt, attrInts, attrString, numelOf, type OnnxModel, type OnnxNode, readTensorValues } from './onnx/reader';
import { planEinsum } from './onnx/region-eval';
import type { Benefit } from './report';

export interface MacCount {
  /** Sum over the counted nodes. */
  total: number;
  /** MACs of each counted node, by node index. */
  byNode: Map<number, number>;
  /** Conv/Gemm/MatMul nodes (names) whose shapes could not be inferred: not in `total`. */
  uncounted: string[];
  /** Inferred static shapes, by tensor name. */
  shapes: Map<string, number[]>;
}

type Shape = number[];

const UNARY = new Set([
  'Relu', 'LeakyRelu', 'PRelu', 'Sigmoid', 'HardSigmoid', 'HardSwish', 'Tanh', 'Elu', 'Selu', 'Celu', 'Gelu', 'Mish', 'Softplus', 'Softsign',
  'Clip', 'Identity', 'Dropout', 'Cast', 'CastLike', 'Neg', 'Abs', 'Exp', 'Log', 'Sqrt', 'Reciprocal', 'Floor', 'Ceil', 'Round', 'Sign',
  'Erf', 'Sin', 'Cos', 'Not', 'IsNaN', 'IsInf', 'BatchNormalization', 'InstanceNormalization', 'LayerNormalization', 'GroupNormalization',
  'LpNormalization', 'Softmax', 'LogSoftmax', 'Hardmax', 'ThresholdedRelu', 'Shrink', 'QuantizeLinear', 'DequantizeLinear', 'LRN',
  'ScatterND', 'ScatterElements', 'Scatter', 'CumSum', 'Trilu',
]);
const BROADCAST = new Set(['Add', 'Sub', 'Mul', 'Div', 'Pow', 'Max', 'Min', 'Sum', 'Mean', 'Where', 'Equal', 'Less', 'LessOrEqual', 'Greater', 'GreaterOrEqual', 'And', 'Or', 'Xor', 'Mod', 'BitShift']);
const POOL = new Set(['MaxPool', 'AveragePool', 'LpPool']);
const GLOBAL_POOL = new Set(['GlobalAveragePool', 'GlobalMaxPool', 'GlobalLpPool']);
const REDUCE = new Set(['ReduceMean', 'ReduceSum', 'ReduceMax', 'ReduceMin', 'ReduceProd', 'ReduceL1', 'ReduceL2', 'ReduceLogSumExp', 'ReduceSumSquare', 'ReduceLogSum']);
/** The ops that count. */
export const MAC_OPS = new Set(['Conv', 'Gemm', 'MatMul']);

function broadcast(shapes: Shape[]): Shape | undefined {
  const rank = Math.max(...shapes.map((s) => s.length));
  const out: Shape = [];
  for (let i = 0; i < rank; i++) {
    let d = 1;
    for (const s of shapes) {
      const x = s[s.length - rank + i] ?? 1;
      if (x === 1) continue;
      if (d !== 1 && d !== x) return undefined;
      d = x;
    }
    out.push(d);
  }
  return out;
}

const normAxis = (a: number, rank: number) => (a < 0 ? a + rank : a);

/** Output size of a windowed op along one axis (Conv, pooling), with ONNX's auto_pad and ceil_mode. */
function windowed(inp: number, k: number, s: number, d: number, padBegin: number, padEnd: number, autoPad: string, ceil: boolean): number {
  if (autoPad === 'SAME_UPPER' || autoPad === 'SAME_LOWER') return Math.ceil(inp / s);
  const eff = (k - 1) * d + 1;
  if (autoPad === 'VALID') return Math.floor((inp - eff) / s) + 1;
  const span = inp + padBegin + padEnd - eff;
  return (ceil ? Math.ceil(span / s) : Math.floor(span / s)) + 1;
}

function spatialOut(node: OnnxNode, x: Shape, kernel: number[], ceil: boolean): Shape {
  const n = kernel.length;
  const strides = attrInts(node, 'strides') ?? new Array(n).fill(1);
  const dil = attrInts(node, 'dilations') ?? new Array(n).fill(1);
  const pads = attrInts(node, 'pads') ?? new Array(2 * n).fill(0);
  const autoPad = attrString(node, 'auto_pad') ?? 'NOTSET';
  return kernel.map((k, i) => windowed(x[2 + i], k, strides[i], dil[i], pads[i], pads[i + n], autoPad, ceil));
}

export function countMacs(model: OnnxModel, inputShapes: Record<string, number[]> = {}): MacCount {
  const g = model.graph;
  const index = new GraphIndex(model);
  const shapes = new Map<string, Shape>();
  /** Small integer tensors known at analysis time (shape arithmetic). */
  const values = new Map<string, number[]>();
  for (const t of g.initializers.values()) {
    shapes.set(t.name, t.dims);
    if (t.dims.length <= 1 && numelOf(t.dims) <= 64 && t.storage.kind !== 'external') {
      try {
        values.set(t.name, Array.from(readTensorValues(model, t), Number));
      } catch {
        /* not a number tensor */
      }
    }
  }
  for (const i of g.inputs) {
    if (g.initializers.has(i.name)) continue;
    const given = inputShapes[i.name];
    if (given) shapes.set(i.name, given);
    else if (i.shape && i.shape.every((d, k) => (typeof d === 'number' && d > 0) || k === 0)) shapes.set(i.name, i.shape.map((d) => (typeof d === 'number' && d > 0 ? d : 1)));
  }
  const declared = new Map<string, Shape>();
  for (const vi of [...g.valueInfo, ...g.outputs]) if (vi.shape?.every((d) => typeof d === 'number' && d > 0)) declared.set(vi.name, vi.shape as number[]);

  const byNode = new Map<number, number>();
  const uncounted: string[] = [];
  let total = 0;
  const constOf = (name: string): number[] | undefined => {
    if (!name) return undefined;
    const v = values.get(name);
    if (v) return v;
    const c = index.constant(name);
    if (!c || numelOf(c.tensor.dims) > 64 || c.tensor.storage.kind === 'external') return undefined;
    const r = Array.from(readTensorValues(model, c.tensor), Number);
    values.set(name, r);
    if (!shapes.has(name)) shapes.set(name, c.tensor.dims);
    return r;
  };

  for (const node of g.nodes) {
    const std = node.domain === '' || node.domain === 'ai.onnx';
    const ins = node.inputs.map((i) => (i ? shapes.get(i) : undefined));
    let outs: (Shape | undefined)[] = [];
    try {
      if (std && node.opType === 'Constant') {
        const c = index.constant(node.outputs[0]);
        outs = [c?.tensor.dims];
        constOf(node.outputs[0]);
      } else outs = std ? infer(node, ins, constOf, values) : [];
    } catch {
      outs = [];
    }
    node.outputs.forEach((o, k) => {
      if (!o) return;
      const s = outs[k] ?? declared.get(o);
      if (s && s.every((d) => Number.isInteger(d) && d >= 0)) shapes.set(o, s);
    });
    if (std && MAC_OPS.has(node.opType)) {
      const macs = nodeMacs(node, node.inputs.map((i) => (i ? shapes.get(i) : undefined)), shapes.get(node.outputs[0]));
      if (macs === undefined) uncounted.push(node.name || node.outputs[0]);
      else {
        byNode.set(node.index, macs);
        total += macs;
      }
    }
  }
  return { total, byNode, uncounted, shapes };
}

/** MACs of one Conv/Gemm/MatMul from its input and output shapes; undefined when unknown. */
export function nodeMacs(node: OnnxNode, ins: (Shape | undefined)[], out: Shape | undefined): number | undefined {
  const [a, b] = ins;
  if (!a || !b || !out) return undefined;
  if (node.opType === 'Conv') {
    // N·Cout·(spatial out)·(Cin/g)·(kernel) = numel(out) · numel(weight[0]).
    return numelOf(out) * numelOf(b.slice(1));
  }
  if (node.opType === 'Gemm') {
    const k = attrInt(node, 'transA', 0) ? a[0] : a[1];
    return out[0] * out[1] * k;
  }
  // MatMul: numel(out) · K, with K the shared dimension.
  const k = a.length === 1 ? a[0] : a[a.length - 1];
  return numelOf(out) * k;
}

function infer(node: OnnxNode, ins: (Shape | undefined)[], constOf: (n: string) => number[] | undefined, values: Map<string, number[]>): (Shape | undefined)[] {
  const op = node.opType;
  const x = ins[0];
  const setValue = (v: number[] | undefined) => {
    if (v && node.outputs[0]) values.set(node.outputs[0], v);
  };
  if (UNARY.has(op)) {
    if (op === 'Cast' || op === 'Identity') setValue(values.get(node.inputs[0]));
    return [x];
  }
  if (BROADCAST.has(op)) {
    if (ins.some((s) => !s)) return [];
    const vs = node.inputs.map((i) => constOf(i));
    const fns: Record<string, (...u: number[]) => number> = {
      Add: (u, w) => u + w,
      Sub: (u, w) => u - w,
      Mul: (u, w) => u * w,
      Div: (u, w) => Math.trunc(u / w),
      Equal: (u, w) => Number(u === w),
      Where: (c, u, w) => (c ? u : w),
    };
    const f = fns[op];
    // Elementwise on small 1-D (or scalar) integer tensors: shape arithmetic.
    if (f && vs.every((v) => v) && ins.every((t) => t!.length <= 1)) {
      const n = Math.max(...(vs as number[][]).map((v) => v.length));
      if ((vs as number[][]).every((v) => v.length === n || v.length === 1)) setValue(Array.from({ length: n }, (_, i) => f(...(vs as number[][]).map((v) => v[v.length === 1 ? 0 : i]))));
    }
    return [broadcast(ins as Shape[])];
  }
  switch (op) {
    case 'Conv': {
      const w = ins[1];
      if (!x || !w) return [];
      const kernel = attrInts(node, 'kernel_shape') ?? w.slice(2);
      return [[x[0], w[0], ...spatialOut(node, x, kernel, false)]];
    }
    case 'ConvTranspose': {
      const w = ins[1];
      if (!x || !w) return [];
      const n = w.length - 2;
      const kernel = attrInts(node, 'kernel_shape') ?? w.slice(2);
      const s = attrInts(node, 'strides') ?? new Array(n).fill(1);
      const d = attrInts(node, 'dilations') ?? new Array(n).fill(1);
      const p = attrInts(node, 'pads') ?? new Array(2 * n).fill(0);
      const op2 = attrInts(node, 'output_padding') ?? new Array(n).fill(0);
      const explicit = attrInts(node, 'output_shape');
      const sp = explicit ?? kernel.map((k, i) => s[i] * (x[2 + i] - 1) + op2[i] + ((k - 1) * d[i] + 1) - p[i] - p[i + n]);
      return [[x[0], w[1] * attrInt(node, 'group', 1), ...sp]];
    }
    case 'MaxPool':
    case 'AveragePool':
    case 'LpPool': {
      const k = attrInts(node, 'kernel_shape');
      if (!x || !k) return [];
      const s = [x[0], x[1], ...spatialOut(node, x, k, attrInt(node, 'ceil_mode', 0) === 1)];
      return [s, s];
    }
    case 'Gemm': {
      const b = ins[1];
      if (!x || !b) return [];
      const m = attrInt(node, 'transA', 0) ? x[1] : x[0];
      const n = attrInt(node, 'transB', 0) ? b[0] : b[1];
      return [[m, n]];
    }
    case 'MatMul': {
      const b = ins[1];
      if (!x || !b) return [];
      const a2 = x.length === 1 ? [1, x[0]] : x;
      const b2 = b.length === 1 ? [b[0], 1] : b;
      const batch = broadcast([a2.slice(0, -2), b2.slice(0, -2)]);
      if (!batch) return [];
      const out = [...batch, a2[a2.length - 2], b2[b2.length - 1]];
      if (x.length === 1) out.splice(out.length - 2, 1);
      if (b.length === 1) out.splice(out.length - 1, 1);
      return [out];
    }
    case 'Flatten': {
      if (!x) return [];
      const axis = normAxis(attrInt(node, 'axis', 1), x.length);
      return [[numelOf(x.slice(0, axis)), numelOf(x.slice(axis))]];
    }
    case 'Reshape': {
      const target = constOf(node.inputs[1]);
      if (!x || !target) return [];
      const allowZero = attrInt(node, 'allowzero', 0) === 1;
      const out = target.map((d, i) => (d === 0 && !allowZero ? x[i] : d));
      const known = out.filter((d) => d !== -1).reduce((p, q) => p * q, 1);
      const free = out.indexOf(-1);
      if (free >= 0) out[free] = known ? numelOf(x) / known : 0;
      setValue(values.get(node.inputs[0]));
      return [out];
    }
    case 'Einsum': {
      if (ins.some((t) => !t)) return [];
      const plan = planEinsum(attrString(node, 'equation') ?? '', ins as Shape[]);
      return typeof plan === 'string' ? [] : [plan.out.map((c) => plan.size.get(c)!)];
    }
    case 'Transpose': {
      if (!x) return [];
      const perm = attrInts(node, 'perm') ?? x.map((_, i) => x.length - 1 - i);
      const v = values.get(node.inputs[0]);
      if (v && v.length === numelOf(x)) setValue(transposeValues(v, x, perm));
      return [perm.map((p) => x[p])];
    }
    case 'Concat': {
      if (ins.some((s) => !s)) return [];
      const all = ins as Shape[];
      const axis = normAxis(attrInt(node, 'axis', 0), all[0].length);
      const out = [...all[0]];
      out[axis] = all.reduce((s, t) => s + t[axis], 0);
      const vs = node.inputs.map((i) => values.get(i));
      if (all[0].length === 1 && vs.every((v) => v)) setValue((vs as number[][]).flat());
      return [out];
    }
    case 'Split': {
      if (!x) return [];
      const axis = normAxis(attrInt(node, 'axis', 0), x.length);
      let sizes = attrInts(node, 'split') ?? (node.inputs[1] ? constOf(node.inputs[1]) : undefined);
      if (!sizes) {
        const n = attrInt(node, 'num_outputs', node.outputs.length);
        const each = Math.ceil(x[axis] / n);
        sizes = Array.from({ length: n }, (_, i) => Math.min(each, x[axis] - each * i));
      }
      return sizes.map((s) => x.map((d, i) => (i === axis ? s : d)));
    }
    case 'Slice': {
      if (!x) return [];
      let starts: number[] | undefined;
      let ends: number[] | undefined;
      let axes: number[] | undefined;
      let steps: number[] | undefined;
      if (node.inputs.length > 1) {
        starts = constOf(node.inputs[1]);
        ends = constOf(node.inputs[2]);
        axes = node.inputs[3] ? constOf(node.inputs[3]) : undefined;
        steps = node.inputs[4] ? constOf(node.inputs[4]) : undefined;
        if (!starts || !ends || (node.inputs[3] && !axes) || (node.inputs[4] && !steps)) return [];
      } else {
        starts = attrInts(node, 'starts');
        ends = attrInts(node, 'ends');
        axes = attrInts(node, 'axes');
      }
      if (!starts || !ends) return [];
      const out = [...x];
      const v = values.get(node.inputs[0]);
      const keep: number[][] = x.map((d) => Array.from({ length: d }, (_, i) => i));
      starts.forEach((st, j) => {
        const ax = normAxis(axes?.[j] ?? j, x.length);
        const step = steps?.[j] ?? 1;
        const dim = x[ax];
        const clamp = (t: number, lo: number, hi: number) => Math.min(Math.max(t, lo), hi);
        let s0 = st < 0 ? st + dim : st;
        let e0 = ends![j] < 0 ? ends![j] + dim : ends![j];
        if (step > 0) {
          s0 = clamp(s0, 0, dim);
          e0 = clamp(e0, 0, dim);
          out[ax] = Math.max(0, Math.ceil((e0 - s0) / step));
        } else {
          s0 = clamp(s0, 0, dim - 1);
          e0 = clamp(e0, -1, dim - 1);
          out[ax] = Math.max(0, Math.ceil((e0 - s0) / step));
        }
        keep[ax] = [];
        for (let t = s0; step > 0 ? t < e0 : t > e0; t += step) keep[ax].push(t);
      });
      if (v && v.length === numelOf(x)) setValue(gatherValues(v, x, keep));
      return [out];
    }
    case 'Squeeze':
    case 'Unsqueeze': {
      if (!x) return [];
      const axes = attrInts(node, 'axes') ?? (node.inputs[1] ? constOf(node.inputs[1]) : undefined);
      setValue(values.get(node.inputs[0]));
      if (op === 'Squeeze') {
        if (!axes) return [x.filter((d) => d !== 1)];
        const ax = axes.map((a) => normAxis(a, x.length));
        return [x.filter((_, i) => !ax.includes(i))];
      }
      if (!axes) return [];
      const rank = x.length + axes.length;
      const ax = axes.map((a) => normAxis(a, rank));
      const out: number[] = [];
      let k = 0;
      for (let i = 0; i < rank; i++) out.push(ax.includes(i) ? 1 : x[k++]);
      return [out];
    }
    case 'Shape': {
      if (!x) return [[0]];
      const start = normAxis(attrInt(node, 'start', 0), x.length);
      const endAttr = node.attrs.has('end') ? normAxis(attrInt(node, 'end', x.length), x.length) : x.length;
      const v = x.slice(start, endAttr);
      setValue(v);
      return [[v.length]];
    }
    case 'Size':
      if (x) setValue([numelOf(x)]);
      return [[]];
    case 'ConstantOfShape': {
      const s = constOf(node.inputs[0]);
      const t = node.attrs.get('value')?.t;
      const fill = t ? Number((t.int64Data?.[0] as number | undefined) ?? t.floatData?.[0] ?? t.int32Data?.[0] ?? (t.rawData?.length ? rawScalar(t.rawData, t.dataType ?? 1) : 0)) : 0;
      if (s && numelOf(s) <= 64) setValue(new Array(numelOf(s)).fill(fill));
      return [s];
    }
    case 'Gather': {
      const idx = ins[1];
      if (!x || !idx) return [];
      const axis = normAxis(attrInt(node, 'axis', 0), x.length);
      const v = values.get(node.inputs[0]);
      const iv = constOf(node.inputs[1]);
      if (v && iv && x.length === 1) setValue(iv.map((i) => v[i < 0 ? i + v.length : i]));
      return [[...x.slice(0, axis), ...idx, ...x.slice(axis + 1)]];
    }
    case 'TopK': {
      const k = constOf(node.inputs[1])?.[0];
      if (!x || k === undefined) return [];
      const axis = normAxis(attrInt(node, 'axis', -1), x.length);
      const s = x.map((d, i) => (i === axis ? k : d));
      return [s, s];
    }
    case 'GridSample': {
      const grid = ins[1];
      if (!x || !grid) return [];
      return [[x[0], x[1], ...grid.slice(1, -1)]];
    }
    case 'NonMaxSuppression':
    case 'NonZero':
      return [];
    case 'Range': {
      const [a, lim, d] = node.inputs.map((i) => constOf(i)?.[0]);
      if (a === undefined || lim === undefined || d === undefined || d === 0) return [];
      const n = Math.max(0, Math.ceil((lim - a) / d));
      if (n <= 64) setValue(Array.from({ length: n }, (_, i) => a + i * d));
      return [[n]];
    }
    case 'Expand': {
      const s = constOf(node.inputs[1]);
      if (!x || !s) return [];
      return [broadcast([x, s])];
    }
    case 'Tile': {
      const r = constOf(node.inputs[1]);
      if (!x || !r) return [];
      return [x.map((d, i) => d * r[i])];
    }
    case 'Pad': {
      const pads = attrInts(node, 'pads') ?? (node.inputs[1] ? constOf(node.inputs[1]) : undefined);
      if (!x || !pads) return [];
      const axes = node.inputs[3] ? constOf(node.inputs[3]) : undefined;
      const out = [...x];
      const ax = axes ? axes.map((a) => normAxis(a, x.length)) : x.map((_, i) => i);
      ax.forEach((a, j) => (out[a] = x[a] + pads[j] + pads[j + ax.length]));
      return [out];
    }
    case 'Resize':
    case 'Upsample': {
      if (!x) return [];
      const sizes = node.inputs[3] ? constOf(node.inputs[3]) : undefined;
      if (sizes && sizes.length === x.length) return [sizes];
      const scales = op === 'Upsample' ? (node.inputs[1] ? constOf(node.inputs[1]) : undefined) : node.inputs[2] ? constOf(node.inputs[2]) : undefined;
      if (!scales || scales.length !== x.length) return [];
      return [x.map((d, i) => Math.floor(d * scales[i]))];
    }
    case 'DepthToSpace':
    case 'SpaceToDepth': {
      if (!x) return [];
      const b = attrInt(node, 'blocksize', 1);
      return [op === 'DepthToSpace' ? [x[0], x[1] / (b * b), x[2] * b, x[3] * b] : [x[0], x[1] * b * b, x[2] / b, x[3] / b]];
    }
    case 'ArgMax':
    case 'ArgMin':
    case 'ReduceMean':
    case 'ReduceSum':
    case 'ReduceMax':
    case 'ReduceMin':
    case 'ReduceProd':
    case 'ReduceL1':
    case 'ReduceL2':
    case 'ReduceLogSumExp':
    case 'ReduceSumSquare':
    case 'ReduceLogSum': {
      if (!x) return [];
      const keep = attrInt(node, 'keepdims', 1) === 1;
      let axes = op.startsWith('Arg') ? [attrInt(node, 'axis', 0)] : (attrInts(node, 'axes') ?? (node.inputs[1] ? constOf(node.inputs[1]) : undefined));
      if (REDUCE.has(op) && !axes) axes = attrInt(node, 'noop_with_empty_axes', 0) ? [] : x.map((_, i) => i);
      const ax = axes!.map((a) => normAxis(a, x.length));
      return [keep ? x.map((d, i) => (ax.includes(i) ? 1 : d)) : x.filter((_, i) => !ax.includes(i))];
    }
    default:
      if (GLOBAL_POOL.has(op) && x) return [[x[0], x[1], ...x.slice(2).map(() => 1)]];
      if (POOL.has(op)) return [];
      return [];
  }
}

// ----- what fusion saves ---------------------------------------------------------------------

/** MACs of one block before (its branches' convs) and after fusion (the one fused conv). */
export interface BlockMacs {
  block: string;
  macsBefore: number;
  macsAfter: number;
}

/**
 * Per block of an ONNX model: the counted MACs of the Conv/Gemm/MatMul nodes the fused Conv
 * replaces, and N·Cout·H'·W'·(Cin/g)·kh·kw of the fused Conv at the block's output shape. A block
 * with a shape that could not be inferred is left out (and `missing` names it).
 */
export function onnxBlockMacs(count: MacCount, blocks: { info: { name: string }; output: string; nodes: OnnxNode[]; kernel: number[]; inPerGroup: number }[]): { blocks: BlockMacs[]; missing: string[] } {
  const out: BlockMacs[] = [];
  const missing: string[] = [];
  for (const b of blocks) {
    const y = count.shapes.get(b.output);
    const ops = b.nodes.filter((n) => (n.domain === '' || n.domain === 'ai.onnx') && MAC_OPS.has(n.opType));
    if (!y || ops.some((n) => !count.byNode.has(n.index))) {
      missing.push(b.info.name);
      continue;
    }
    out.push({ block: b.info.name, macsBefore: ops.reduce((s, n) => s + count.byNode.get(n.index)!, 0), macsAfter: numelOf(y) * b.inPerGroup * numelOf(b.kernel) });
  }
  return { blocks: out, missing };
}

/** Block kinds whose MACs per output position follow from the block geometry alone. */
const PER_POSITION: Record<string, 'conv' | 'free' | undefined> = { conv: 'conv', conv_bn: 'conv', dilated: 'conv', identity: 'free', bn_identity: 'free', avgpool: 'free' };

/**
 * Per block of a checkpoint (no graph, no spatial size): MACs per output position, Cout·(Cin/g)·kh·kw
 * for each conv branch before and for the fused conv after. Identity, BN and pooling branches cost
 * no MACs. A block with a branch of another kind (a sequential 1×1→k×k pair, whose inner width the
 * summary does not carry) is left out and named in `missing`.
 */
export function perPositionBlockMacs(blocks: { name: string; kernel: number[]; groups: number; inChannels: number; outChannels: number; branches: { kind: string; kernel?: number[]; dtype?: string }[] }[]): { blocks: BlockMacs[]; missing: string[] } {
  const out: BlockMacs[] = [];
  const missing: string[] = [];
  for (const b of blocks) {
    const perTap = b.outChannels * (b.inChannels / b.groups);
    let before = 0;
    let ok = true;
    for (const br of b.branches) {
      // An avg-pool branch with weights (DBB's 1×1 → avg-pool) has a conv of unknown inner width.
      const k = br.kind === 'avgpool' && br.dtype ? undefined : PER_POSITION[br.kind];
      if (k === 'conv' && br.kernel) before += perTap * numelOf(br.kernel);
      else if (k !== 'free') ok = false;
    }
    if (!ok) missing.push(b.name);
    else out.push({ block: b.name, macsBefore: before, macsAfter: perTap * numelOf(b.kernel) });
  }
  return { blocks: out, missing };
}

/** The MAC part of a report's benefit for an ONNX model: the original and the fused graph counted alike. */
export function onnxBenefit(before: MacCount, after: MacCount, blocks: Parameters<typeof onnxBlockMacs>[1]): Benefit {
  const per = onnxBlockMacs(before, blocks);
  const uncounted = [...new Set([...before.uncounted, ...after.uncounted.map((n) => `${n} (fused model)`), ...per.missing.map((n) => `block ${n}`)])];
  return { macsScope: 'model', macsBefore: before.total, macsAfter: after.total, ...(uncounted.length ? { uncounted } : {}), blocks: per.blocks };
}

/** The MAC part of a report's benefit for a checkpoint: the fused blocks, per output position. */
export function checkpointBenefit(blocks: Parameters<typeof perPositionBlockMacs>[0]): Benefit {
  const per = perPositionBlockMacs(blocks);
  const sum = (k: 'macsBefore' | 'macsAfter') => per.blocks.reduce((s, b) => s + b[k], 0);
  return { macsScope: 'blocks-per-position', macsBefore: sum('macsBefore'), macsAfter: sum('macsAfter'), ...(per.missing.length ? { uncounted: per.missing.map((n) => `block ${n}`) } : {}), blocks: per.blocks };
}

/** The elements of a row-major tensor at the kept indexes of each axis. */
function gatherValues(v: number[], shape: number[], keep: number[][]): number[] {
  const strides = shape.map((_, i) => numelOf(shape.slice(i + 1)));
  const out: number[] = [];
  const walk = (axis: number, base: number) => {
    if (axis === shape.length) {
      out.push(v[base]);
      return;
    }
    for (const i of keep[axis]) walk(axis + 1, base + i * strides[axis]);
  };
  walk(0, 0);
  return out;
}

function transposeValues(v: number[], shape: number[], perm: number[]): number[] {
  const strides = shape.map((_, i) => numelOf(shape.slice(i + 1)));
  const outShape = perm.map((p) => shape[p]);
  const out: number[] = [];
  const walk = (axis: number, base: number) => {
    if (axis === outShape.length) {
      out.push(v[base]);
      return;
    }
    for (let i = 0; i < outShape[axis]; i++) walk(axis + 1, base + i * strides[perm[axis]]);
  };
  walk(0, 0);
  return out;
}

/** The first element of a TensorProto's raw_data (ConstantOfShape's fill value). */
function rawScalar(raw: Uint8Array, dataType: number): number {
  const dv = new DataView(raw.buffer, raw.byteOffset, raw.byteLength);
  switch (dataType) {
    case 1:
      return dv.getFloat32(0, true);
    case 6:
      return dv.getInt32(0, true);
    case 7:
      return Number(dv.getBigInt64(0, true));
    case 11:
      return dv.getFloat64(0, true);
    default:
      return raw[0];
  }
}
