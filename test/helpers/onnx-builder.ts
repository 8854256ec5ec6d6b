// A small, seeded builder of ONNX models for tests: inputs/outputs with (symbolic) shapes,
// initializers in several dtypes and storages, Constant nodes, attributes, and helpers that add
// the branches of re-parameterization blocks (Conv, Conv→BN, BN, Mul by a factor).
import { onnx } from 'onnx-proto';
import { bfloat16ToFloat, floatToBfloat16, floatToHalf, halfToFloat } from '../../src/core/dtype';
import { Rng } from '../../src/core/random';

export type Dim = number | string;
export type FloatName = 'float32' | 'float16' | 'float64' | 'bfloat16';

/** ONNX TensorProto.DataType codes used by the tests. */
export const DT = {
  float32: 1,
  uint8: 2,
  int8: 3,
  int32: 6,
  int64: 7,
  bool: 9,
  float16: 10,
  float64: 11,
  bfloat16: 16,
} as const;

export type DTypeLike = number | keyof typeof DT;
export const dt = (t: DTypeLike): number => (typeof t === 'number' ? t : DT[t]);

/** How an initializer stores its data: raw_data bytes, or the typed repeated field. */
export type Storage = 'raw' | 'typed';

const AT = onnx.AttributeProto.AttributeType;

// ----- attributes --------------------------------------------------------------------------

export const attrInt = (name: string, i: number): onnx.IAttributeProto => ({ name, type: AT.INT, i });
export const attrInts = (name: string, ints: number[]): onnx.IAttributeProto => ({ name, type: AT.INTS, ints });
export const attrFloat = (name: string, f: number): onnx.IAttributeProto => ({ name, type: AT.FLOAT, f });
export const attrFloats = (name: string, floats: number[]): onnx.IAttributeProto => ({ name, type: AT.FLOATS, floats });
export const attrString = (name: string, s: string): onnx.IAttributeProto => ({ name, type: AT.STRING, s: Buffer.from(s, 'utf8') });
export const attrTensor = (name: string, t: onnx.ITensorProto): onnx.IAttributeProto => ({ name, type: AT.TENSOR, t });
export const attrGraph = (name: string, g: onnx.IGraphProto): onnx.IAttributeProto => ({ name, type: AT.GRAPH, g });

// ----- tensors -----------------------------------------------------------------------------

/** The value `v` has once stored as `dtype` (float16/bfloat16/float32 round; ints truncate). */
export function storedValue(v: number, dtype: DTypeLike): number {
  switch (dt(dtype)) {
    case DT.float32:
      return Math.fround(v);
    case DT.float16:
      return halfToFloat(floatToHalf(v));
    case DT.bfloat16:
      return bfloat16ToFloat(floatToBfloat16(v));
    case DT.float64:
      return v;
    default:
      return Math.trunc(v);
  }
}

/** Little-endian bytes of `values` as `dtype`. */
export function tensorBytes(values: ArrayLike<number>, dtype: DTypeLike): Uint8Array {
  const n = values.length;
  const t = dt(dtype);
  let arr: ArrayBufferView;
  switch (t) {
    case DT.float32:
      arr = Float32Array.from(values);
      break;
    case DT.float64:
      arr = Float64Array.from(values);
      break;
    case DT.float16: {
      const u = new Uint16Array(n);
      for (let i = 0; i < n; i++) u[i] = floatToHalf(values[i]);
      arr = u;
      break;
    }
    case DT.bfloat16: {
      const u = new Uint16Array(n);
      for (let i = 0; i < n; i++) u[i] = floatToBfloat16(values[i]);
      arr = u;
      break;
    }
    case DT.int32:
      arr = Int32Array.from(values);
      break;
    case DT.int8:
      arr = Int8Array.from(values);
      break;
    case DT.uint8:
    case DT.bool:
      arr = Uint8Array.from(values);
      break;
    case DT.int64: {
      const b = new BigInt64Array(n);
      for (let i = 0; i < n; i++) b[i] = BigInt(Math.trunc(values[i]));
      arr = b;
      break;
    }
    default:
      throw new Error(`tensorBytes: unsupported dtype ${t}`);
  }
  return new Uint8Array(arr.buffer, arr.byteOffset, arr.byteLength).slice();
}

/** A TensorProto holding `values` as `dtype`, in raw_data or in its typed field. */
export function makeTensor(name: string, dims: number[], values: ArrayLike<number>, dtype: DTypeLike = 'float32', storage: Storage = 'raw'): onnx.ITensorProto {
  const t = dt(dtype);
  const numel = dims.reduce((a, b) => a * b, 1);
  if (values.length !== numel) throw new Error(`makeTensor ${name}: ${values.length} values for shape ${dims.join('x')}`);
  const proto: onnx.ITensorProto = { name, dims, dataType: t };
  if (storage === 'raw') {
    proto.rawData = tensorBytes(values, t);
    return proto;
  }
  switch (t) {
    case DT.float32:
      proto.floatData = Array.from(values, (v) => Math.fround(v));
      break;
    case DT.float64:
      proto.doubleData = Array.from(values);
      break;
    case DT.float16:
      proto.int32Data = Array.from(values, (v) => floatToHalf(v));
      break;
    case DT.bfloat16:
      proto.int32Data = Array.from(values, (v) => floatToBfloat16(v));
      break;
    case DT.int64:
      proto.int64Data = Array.from(values, (v) => Math.trunc(v));
      break;
    default:
      proto.int32Data = Array.from(values, (v) => Math.trunc(v));
  }
  return proto;
}

export function valueInfo(name: string, elemType: DTypeLike, shape?: Dim[]): onnx.IValueInfoProto {
  const tensorType: onnx.TypeProto.ITensor = { elemType: dt(elemType) };
  if (shape) tensorType.shape = { dim: shape.map((d) => (typeof d === 'number' ? { dimValue: d } : { dimParam: d })) };
  return { name, type: { tensorType } };
}

// ----- the builder ---------------------------------------------------------------------------

export interface BnOpts {
  eps?: number;
  /** Node name (full, e.g. `/model.1/rbr_identity/BatchNormalization`). */
  name?: string;
  /** Range of the running variance (default [0.5, 2]). */
  variance?: [number, number];
  /** Sets training_mode=1 (needs opset ≥ 14 to be a valid model). */
  trainingMode?: boolean;
  /** Gives the node its two running-statistics outputs too (training-style BN). */
  statsOutputs?: boolean;
  dtype?: DTypeLike;
}

export interface ConvOpts {
  stride?: number | number[];
  pads?: number[];
  groups?: number;
  dilation?: number | number[];
  bias?: boolean;
  /** A BatchNormalization after the Conv (true: default settings). */
  bn?: BnOpts | boolean;
  weightDtype?: DTypeLike;
  /** Node name of the Conv. */
  name?: string;
  autoPad?: string;
  /** Write the kernel_shape attribute (default true); a number[] writes that value instead. */
  kernelShape?: boolean | number[];
  /** Use this tensor as the weight instead of making an initializer. */
  weight?: string;
  /** Route the weight through Identity nodes (1 or more), or make it a Constant node. */
  weightVia?: 'identity' | 'identity2' | 'constant';
  /** Scale of the random weights (default 1/sqrt(fan-in)). */
  scale?: number;
  storage?: Storage;
}

export interface ConvInfo {
  node: onnx.INodeProto;
  weight: string;
  /** The initializer (or Constant output) holding the weight data. */
  weightSource: string;
  bias?: string;
  convOut: string;
  bnNode?: onnx.INodeProto;
  out: string;
}

export interface BuilderOpts {
  seed?: number;
  /** Element type of activations and (by default) of every parameter. */
  dtype?: DTypeLike;
  storage?: Storage;
  opset?: number;
  irVersion?: number;
  /** Name nodes: 'plain' (`Conv_3`, no scope: default), 'none' (empty names). */
  names?: 'plain' | 'none';
  /**
   * Round every float parameter value to what this dtype can hold before storing it, so models
   * built with the same seed in different dtypes hold exactly the same numbers.
   */
  valuesAs?: DTypeLike;
}

const tuple = (v: number | number[] | undefined, r: number, dflt: number): number[] => (v === undefined ? new Array(r).fill(dflt) : typeof v === 'number' ? new Array(r).fill(v) : v);

export class ModelBuilder {
  readonly rng: Rng;
  readonly dtype: number;
  readonly storage: Storage;
  opset: number;
  irVersion: number;
  names: 'plain' | 'none';
  valuesAs?: number;
  nodes: onnx.INodeProto[] = [];
  initializers: onnx.ITensorProto[] = [];
  inputs: onnx.IValueInfoProto[] = [];
  outputs: onnx.IValueInfoProto[] = [];
  valueInfos: onnx.IValueInfoProto[] = [];
  extraOpsets: onnx.IOperatorSetIdProto[] = [];
  /** Details of the last conv() call. */
  last!: ConvInfo;
  private used = new Set<string>();
  private opCount = new Map<string, number>();

  constructor(opts: BuilderOpts = {}) {
    this.rng = new Rng(opts.seed ?? 1);
    this.dtype = dt(opts.dtype ?? 'float32');
    this.storage = opts.storage ?? 'raw';
    this.opset = opts.opset ?? 13;
    this.irVersion = opts.irVersion ?? 7;
    this.names = opts.names ?? 'plain';
    this.valuesAs = opts.valuesAs === undefined ? undefined : dt(opts.valuesAs);
  }

  private quantize(vals: ArrayLike<number>, dtype: number): ArrayLike<number> {
    const q = this.valuesAs;
    if (q === undefined || ![DT.float32, DT.float16, DT.float64, DT.bfloat16].includes(dtype as 1)) return vals;
    return Array.from(vals, (v) => storedValue(v, q));
  }

  /** A tensor name not used yet, derived from `base`. */
  fresh(base: string): string {
    let name = base;
    for (let i = 1; this.used.has(name); i++) name = `${base}_${i}`;
    this.used.add(name);
    return name;
  }

  private nodeName(op: string, given?: string): string {
    if (given !== undefined) return given;
    if (this.names === 'none') return '';
    const n = this.opCount.get(op) ?? 0;
    this.opCount.set(op, n + 1);
    return `${op}_${n}`;
  }

  input(name: string, shape: Dim[], dtype: DTypeLike = this.dtype): string {
    this.used.add(name);
    this.inputs.push(valueInfo(name, dtype, shape));
    return name;
  }

  output(name: string, shape?: Dim[], dtype: DTypeLike = this.dtype): string {
    this.outputs.push(valueInfo(name, dtype, shape));
    return name;
  }

  valueInfo(name: string, shape?: Dim[], dtype: DTypeLike = this.dtype): void {
    this.valueInfos.push(valueInfo(name, dtype, shape));
  }

  /** An initializer with the given values (or a function of the flat index). */
  init(name: string, dims: number[], values: ArrayLike<number> | ((i: number) => number), opts: { dtype?: DTypeLike; storage?: Storage; exact?: boolean } = {}): string {
    const n = dims.reduce((a, b) => a * b, 1);
    const dtype = dt(opts.dtype ?? this.dtype);
    const vals = this.quantize(typeof values === 'function' ? Array.from({ length: n }, (_, i) => values(i)) : values, dtype);
    const nm = opts.exact ? name : this.fresh(name);
    this.used.add(nm);
    this.initializers.push(makeTensor(nm, dims, vals, dtype, opts.storage ?? this.storage));
    return nm;
  }

  /** An initializer of seeded uniform values in [lo, hi). */
  randInit(name: string, dims: number[], lo = -1, hi = 1, opts: { dtype?: DTypeLike; storage?: Storage } = {}): string {
    return this.init(name, dims, () => this.rng.uniform(lo, hi), opts);
  }

  /** A Constant node producing `values`; returns its output. */
  constant(name: string, dims: number[], values: ArrayLike<number>, opts: { dtype?: DTypeLike; storage?: Storage; nodeName?: string } = {}): string {
    const out = this.fresh(name);
    const dtype = dt(opts.dtype ?? this.dtype);
    const t = makeTensor('', dims, this.quantize(values, dtype), dtype, opts.storage ?? 'raw');
    this.nodes.push({ name: this.nodeName('Constant', opts.nodeName), opType: 'Constant', input: [], output: [out], attribute: [attrTensor('value', t)] });
    return out;
  }

  /** Adds a node; returns its outputs. */
  node(opType: string, inputs: string[], opts: { outputs?: number | string[]; name?: string; attrs?: onnx.IAttributeProto[]; domain?: string } = {}): string[] {
    const outs = Array.isArray(opts.outputs) ? opts.outputs.map((o) => (o ? this.fresh(o) : o)) : Array.from({ length: opts.outputs ?? 1 }, () => this.fresh(`${opType.toLowerCase()}_out`));
    const n: onnx.INodeProto = { name: this.nodeName(opType, opts.name), opType, input: inputs, output: outs, attribute: opts.attrs ?? [] };
    if (opts.domain) n.domain = opts.domain;
    this.nodes.push(n);
    return outs;
  }

  op(opType: string, inputs: string[], opts: { name?: string; attrs?: onnx.IAttributeProto[]; out?: string } = {}): string {
    return this.node(opType, inputs, { name: opts.name, attrs: opts.attrs, outputs: opts.out ? [opts.out] : 1 })[0];
  }

  add(a: string, b: string, name?: string): string {
    return this.op('Add', [a, b], { name });
  }
  sum(xs: string[], name?: string): string {
    return this.op('Sum', xs, { name });
  }
  mul(a: string, b: string, name?: string): string {
    return this.op('Mul', [a, b], { name });
  }
  relu(x: string, name?: string): string {
    return this.op('Relu', [x], { name });
  }
  identity(x: string, name?: string): string {
    return this.op('Identity', [x], { name });
  }

  /** BatchNormalization of `x` (c channels) with non-trivial γ, β, mean and positive variance. */
  bn(x: string, c: number, opts: BnOpts = {}): string {
    const dtype = opts.dtype ?? this.dtype;
    const [vlo, vhi] = opts.variance ?? [0.5, 2];
    const base = (opts.name ?? 'bn').replace(/^\//, '').replace(/\//g, '.');
    const gamma = this.init(`${base}.weight`, [c], () => this.rng.uniform(0.5, 1.5) * (this.rng.next() < 0.5 ? -1 : 1), { dtype });
    const beta = this.init(`${base}.bias`, [c], () => this.rng.uniform(-0.5, 0.5), { dtype });
    const mean = this.init(`${base}.running_mean`, [c], () => this.rng.uniform(-0.5, 0.5), { dtype });
    const variance = this.init(`${base}.running_var`, [c], () => this.rng.uniform(vlo, vhi), { dtype });
    const attrs: onnx.IAttributeProto[] = [];
    if (opts.eps !== undefined) attrs.push(attrFloat('epsilon', opts.eps));
    if (opts.trainingMode) attrs.push(attrInt('training_mode', 1));
    const outputs = opts.statsOutputs ? [`${base}_out`, `${base}_rmean`, `${base}_rvar`] : [`${base}_out`];
    return this.node('BatchNormalization', [x, gamma, beta, mean, variance], { name: opts.name, attrs, outputs })[0];
  }

  /** A Conv of `x` (cin channels) to cout channels with a k[0]×k[1] kernel, optionally + BN. */
  conv(x: string, cout: number, cin: number, k: number[], opts: ConvOpts = {}): string {
    const r = k.length;
    const groups = opts.groups ?? 1;
    const stride = tuple(opts.stride, r, 1);
    const dil = tuple(opts.dilation, r, 1);
    const pads = opts.pads ?? [...k, ...k].map((kk) => Math.floor((kk - 1) / 2));
    const base = (opts.name ?? 'conv').replace(/^\//, '').replace(/\//g, '.');
    const wdt = opts.weightDtype ?? this.dtype;
    const dims = [cout, cin / groups, ...k];
    const fanIn = (cin / groups) * k.reduce((a, b) => a * b, 1);
    const scale = opts.scale ?? 1 / Math.sqrt(fanIn);
    let weight: string;
    let weightSource: string;
    if (opts.weight) {
      weight = weightSource = opts.weight;
    } else {
      const n = dims.reduce((a, b) => a * b, 1);
      const vals = Array.from({ length: n }, () => this.rng.uniform(-1, 1) * scale);
      if (opts.weightVia === 'constant') {
        weight = weightSource = this.constant(`${base}.weight`, dims, vals, { dtype: wdt });
      } else {
        weight = weightSource = this.init(`${base}.weight`, dims, vals, { dtype: wdt, storage: opts.storage });
        if (opts.weightVia === 'identity' || opts.weightVia === 'identity2') weight = this.identity(weight);
        if (opts.weightVia === 'identity2') weight = this.identity(weight);
      }
    }
    const inputs = [x, weight];
    let bias: string | undefined;
    if (opts.bias) {
      bias = this.init(`${base}.bias`, [cout], () => this.rng.uniform(-0.5, 0.5), { dtype: wdt, storage: opts.storage });
      inputs.push(bias);
    }
    const attrs: onnx.IAttributeProto[] = [];
    if (opts.autoPad) attrs.push(attrString('auto_pad', opts.autoPad));
    if (!opts.autoPad || opts.autoPad === 'NOTSET') attrs.push(attrInts('pads', pads));
    attrs.push(attrInts('strides', stride), attrInts('dilations', dil), attrInt('group', groups));
    if (opts.kernelShape !== false) attrs.push(attrInts('kernel_shape', Array.isArray(opts.kernelShape) ? opts.kernelShape : k));
    const convOut = this.node('Conv', inputs, { name: opts.name, attrs, outputs: [`${base}_out`] })[0];
    const node = this.nodes[this.nodes.length - 1];
    let out = convOut;
    let bnNode: onnx.INodeProto | undefined;
    if (opts.bn) {
      const bo: BnOpts = opts.bn === true ? {} : opts.bn;
      const bnName = bo.name ?? (opts.name ? opts.name.replace(/\/?[^/]*$/, '') + '/BatchNormalization' : undefined);
      out = this.bn(convOut, cout, { ...bo, name: bnName || undefined, dtype: bo.dtype ?? wdt });
      bnNode = this.nodes[this.nodes.length - 1];
    }
    this.last = { node, weight, weightSource, bias, convOut, bnNode, out };
    return out;
  }

  graph(): onnx.IGraphProto {
    return {
      name: 'test_graph',
      node: this.nodes,
      initializer: this.initializers,
      input: this.inputs,
      output: this.outputs,
      valueInfo: this.valueInfos,
    };
  }

  model(): onnx.IModelProto {
    return {
      irVersion: this.irVersion,
      opsetImport: [{ domain: '', version: this.opset }, ...this.extraOpsets],
      producerName: 'repfuse-test',
      producerVersion: '1',
      graph: this.graph(),
    };
  }

  encode(): Uint8Array {
    return encodeModel(this.model());
  }
}

export function encodeModel(m: onnx.IModelProto): Uint8Array {
  return onnx.ModelProto.encode(m).finish();
}

// ----- raw protobuf helpers (for unknown fields and hand-made layouts) -----------------------

export function varint(v: number): number[] {
  const out: number[] = [];
  while (v >= 128) {
    out.push((v % 128) | 0x80);
    v = Math.floor(v / 128);
  }
  out.push(v);
  return out;
}

/** One length-delimited field: tag(field, 2), length, payload. */
export function lenField(field: number, payload: Uint8Array): Uint8Array {
  return Uint8Array.from([...varint(field * 8 + 2), ...varint(payload.length), ...payload]);
}

export function concatBytes(...parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((a, p) => a + p.length, 0));
  let o = 0;
  for (const p of parts) {
    out.set(p, o);
    o += p.length;
  }
  return out;
}

export interface Extras {
  /** Appended to the ModelProto. */
  model?: Uint8Array;
  /** Appended to the GraphProto. */
  graph?: Uint8Array;
  /** Appended to the NodeProto with this index. */
  nodes?: Record<number, Uint8Array>;
  /** Appended to the initializer (TensorProto) with this name. */
  initializers?: Record<string, Uint8Array>;
}

/**
 * Encodes a model with extra raw bytes (e.g. unknown fields) appended inside the ModelProto, the
 * GraphProto, a NodeProto or an initializer. Node order is kept.
 */
export function encodeWithExtras(m: onnx.IModelProto, extras: Extras): Uint8Array {
  const g = m.graph!;
  const parts: Uint8Array[] = [];
  (g.node ?? []).forEach((n, i) => {
    const b = onnx.NodeProto.encode(n).finish();
    parts.push(lenField(1, concatBytes(b, extras.nodes?.[i] ?? new Uint8Array())));
  });
  for (const t of g.initializer ?? []) {
    const b = onnx.TensorProto.encode(t).finish();
    parts.push(lenField(5, concatBytes(b, extras.initializers?.[t.name ?? ''] ?? new Uint8Array())));
  }
  parts.push(onnx.GraphProto.encode({ ...g, node: [], initializer: [] }).finish());
  if (extras.graph) parts.push(extras.graph);
  const graphBytes = concatBytes(...parts);
  const rest = onnx.ModelProto.encode({ ...m, graph: null }).finish();
  return concatBytes(rest, lenField(7, graphBytes), extras.model ?? new Uint8Array());
}

/**
 * Moves the raw data of every initializer of at least `minBytes` bytes to an external file;
 * returns the changed model (a copy) and the file's bytes. `location` is written as given.
 */
export function externalize(m: onnx.IModelProto, location: string, minBytes = 0, align = 64): { model: onnx.IModelProto; data: Uint8Array } {
  const chunks: Uint8Array[] = [];
  let size = 0;
  const inits = (m.graph!.initializer ?? []).map((t) => {
    const raw = t.rawData;
    if (!raw || raw.length < minBytes) return t;
    const pad = (align - (size % align)) % align;
    if (pad) {
      chunks.push(new Uint8Array(pad));
      size += pad;
    }
    const offset = size;
    chunks.push(raw);
    size += raw.length;
    return {
      ...t,
      rawData: null,
      dataLocation: onnx.TensorProto.DataLocation.EXTERNAL,
      externalData: [
        { key: 'location', value: location },
        { key: 'offset', value: String(offset) },
        { key: 'length', value: String(raw.length) },
      ],
    };
  });
  return { model: { ...m, graph: { ...m.graph, initializer: inits } }, data: concatBytes(...chunks) };
}
