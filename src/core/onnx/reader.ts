// ONNX reader: walks ModelProto/GraphProto at the wire level over a ByteSource. Nodes and value
// infos are decoded (they are small); initializers are indexed, not read: their data stays a lazy
// view (offset + length) into the model file or its external-data file.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { onnx } from 'onnx-proto';
import { type ByteSource, FileSource } from '../bytes';
import { DType, decodeNumbers, dtypeName, dtypeSize, type NumArray } from '../dtype';
import { FormatError } from '../errors';
import { fieldString, walkFields, WT_I32, WT_I64, WT_LEN, WT_VARINT, type WireField, readVarint } from '../proto/wire';

/** Where a tensor's bytes are. */
export type TensorStorage =
  | { kind: 'raw'; offset: number; length: number }
  | { kind: 'external'; file: string; location: string; offset: number; length: number }
  | { kind: 'values'; values: NumArray }
  | { kind: 'bytes'; bytes: Uint8Array };

export interface OnnxTensor {
  name: string;
  dtype: number;
  dims: number[];
  storage: TensorStorage;
  /** Payload span of the TensorProto in the model file (initializers only). */
  span?: { start: number; end: number };
}

export interface OnnxNode {
  index: number;
  name: string;
  opType: string;
  domain: string;
  inputs: string[];
  outputs: string[];
  attrs: Map<string, onnx.IAttributeProto>;
  /** Names read from the enclosing scope by subgraphs (If/Loop/Scan bodies). */
  outerRefs: string[];
}

export interface OnnxValueInfo {
  name: string;
  elemType?: number;
  /** number = fixed, string = symbolic, undefined = unknown. */
  shape?: (number | string | undefined)[];
}

/** A field of GraphProto, in file order, classified. */
export type GraphField =
  | { kind: 'node'; index: number; wire: WireField }
  | { kind: 'initializer'; name: string; wire: WireField }
  | { kind: 'input' | 'output' | 'value_info'; name: string; wire: WireField }
  | { kind: 'other'; wire: WireField };

export interface OnnxGraph {
  name: string;
  fields: GraphField[];
  nodes: OnnxNode[];
  initializers: Map<string, OnnxTensor>;
  inputs: OnnxValueInfo[];
  outputs: OnnxValueInfo[];
  valueInfo: OnnxValueInfo[];
}

export interface OnnxModel {
  path: string;
  source: ByteSource;
  irVersion: number;
  producerName: string;
  producerVersion: string;
  opsets: { domain: string; version: number }[];
  /** Top-level ModelProto fields in file order; the graph field is among them. */
  topFields: WireField[];
  graphField: WireField;
  graph: OnnxGraph;
  usesExternalData: boolean;
  /** Opens (and caches) the files holding external data. */
  external: ExternalFiles;
  close(): void;
}

/** Resolves and opens external-data files, refusing locations outside the model's folder. */
export class ExternalFiles {
  private open = new Map<string, ByteSource>();
  constructor(
    readonly modelPath: string,
    readonly dir: string,
  ) {}

  resolve(location: string): string {
    if (location.includes('\0')) throw new FormatError(`external data location ${JSON.stringify(location)} contains a NUL byte.`, this.modelPath);
    if (path.isAbsolute(location) || path.win32.isAbsolute(location)) {
      throw new FormatError(`external data location ${JSON.stringify(location)} is an absolute path; only files inside the model's folder are read.`, this.modelPath);
    }
    const full = path.resolve(this.dir, location);
    if (!inside(this.dir, full)) throw new FormatError(`external data location ${JSON.stringify(location)} escapes the model's folder; refused.`, this.modelPath);
    this.checkLink(full);
    return full;
  }

  /** A link inside the folder must not lead outside it (checked when the file exists). */
  private checkLink(full: string): string | undefined {
    let real: string;
    try {
      real = fs.realpathSync(full);
    } catch {
      return undefined; // missing: reported when read
    }
    if (!inside(fs.realpathSync(this.dir), real)) throw new FormatError(`external data ${path.basename(full)} is a link to a file outside the model's folder; refused.`, this.modelPath);
    return real;
  }

  /** Opens an external file after resolving links: a symlink must not lead outside the folder. */
  source(file: string): ByteSource {
    let src = this.open.get(file);
    if (!src) {
      const real = this.checkLink(file);
      if (!real) throw new FormatError(`cannot open external data ${path.basename(file)}: no such file.`, this.modelPath);
      src = new FileSource(real); // refuses devices, FIFOs and folders: only regular files
      this.open.set(file, src);
    }
    return src;
  }

  close(): void {
    for (const s of this.open.values()) s.close();
    this.open.clear();
  }
}

/** Whether `p` lies strictly inside folder `dir` (both absolute). `..name` files are inside. */
export function inside(dir: string, p: string): boolean {
  const rel = path.relative(dir, p);
  return rel !== '' && rel !== '..' && !rel.startsWith('..' + path.sep) && !path.isAbsolute(rel);
}

function toNumber(v: unknown): number {
  if (typeof v === 'number') return v;
  if (v && typeof (v as { toNumber?: () => number }).toNumber === 'function') return (v as { toNumber: () => number }).toNumber();
  return Number(v);
}

export function attrInt(node: OnnxNode, name: string, dflt: number): number {
  const a = node.attrs.get(name);
  return a && a.i !== undefined && a.i !== null ? toNumber(a.i) : dflt;
}

export function attrInts(node: OnnxNode, name: string): number[] | undefined {
  const a = node.attrs.get(name);
  if (!a || !a.ints || (a.ints.length === 0 && a.type !== onnx.AttributeProto.AttributeType.INTS)) return undefined;
  return a.ints.map(toNumber);
}

export function attrFloat(node: OnnxNode, name: string, dflt: number): number {
  const a = node.attrs.get(name);
  return a && a.f !== undefined && a.f !== null ? a.f : dflt;
}

export function attrString(node: OnnxNode, name: string): string | undefined {
  const a = node.attrs.get(name);
  return a && a.s && a.s.length ? Buffer.from(a.s).toString('utf8') : undefined;
}

function decodeMessage<T>(src: ByteSource, f: WireField, what: string, decode: (b: Uint8Array) => T): T {
  try {
    return decode(src.read(f.valueStart, f.end - f.valueStart));
  } catch (err) {
    if (err instanceof FormatError) throw err;
    throw new FormatError(`cannot decode ${what} at offset ${f.start}: ${(err as Error).message}.`, src.name);
  }
}

function collectSubgraphRefs(g: onnx.IGraphProto, out: string[]): void {
  for (const n of g.node ?? []) {
    for (const i of n.input ?? []) if (i) out.push(i);
    for (const a of n.attribute ?? []) {
      if (a.g) collectSubgraphRefs(a.g, out);
      for (const sg of a.graphs ?? []) collectSubgraphRefs(sg, out);
    }
  }
}

function toNode(p: onnx.INodeProto, index: number): OnnxNode {
  const attrs = new Map<string, onnx.IAttributeProto>();
  const outerRefs: string[] = [];
  for (const a of p.attribute ?? []) {
    if (a.name) attrs.set(a.name, a);
    if (a.g) collectSubgraphRefs(a.g, outerRefs);
    for (const sg of a.graphs ?? []) collectSubgraphRefs(sg, outerRefs);
  }
  return {
    index,
    name: p.name ?? '',
    opType: p.opType ?? '',
    domain: p.domain ?? '',
    inputs: p.input ?? [],
    outputs: p.output ?? [],
    attrs,
    outerRefs,
  };
}

function toValueInfo(p: onnx.IValueInfoProto): OnnxValueInfo {
  const tt = p.type?.tensorType;
  const vi: OnnxValueInfo = { name: p.name ?? '' };
  if (tt) {
    if (tt.elemType) vi.elemType = tt.elemType;
    if (tt.shape) {
      vi.shape = (tt.shape.dim ?? []).map((d) => {
        const which = (d as { value?: string }).value;
        if (which === 'dimValue') return toNumber(d.dimValue);
        if (which === 'dimParam') return d.dimParam ?? undefined;
        return undefined;
      });
    }
  }
  return vi;
}

/** Parses a TensorProto in [f.valueStart, f.end) without reading its data. */
export function scanTensor(src: ByteSource, f: WireField, external: ExternalFiles | undefined): OnnxTensor {
  const dims: number[] = [];
  let dtype = 0;
  let name = '';
  let raw: { offset: number; length: number } | undefined;
  let location = 0;
  const ext: Record<string, string> = {};
  const typed: { field: number; parts: WireField[] } = { field: 0, parts: [] };
  for (const tf of walkFields(src, f.valueStart, f.end)) {
    switch (tf.field) {
      case 1: // dims (packed or not)
        if (tf.wireType === WT_VARINT) dims.push(tf.varint);
        else if (tf.wireType === WT_LEN) {
          const b = src.read(tf.valueStart, tf.end - tf.valueStart);
          for (let p = 0; p < b.length; ) {
            const [v, np] = readVarint(b, p, src.name);
            dims.push(v);
            p = np;
          }
        }
        break;
      case 2:
        dtype = tf.varint;
        break;
      case 8:
        name = fieldString(src, tf);
        break;
      case 9:
        raw = { offset: tf.valueStart, length: tf.end - tf.valueStart };
        break;
      case 4: // float_data
      case 5: // int32_data
      case 7: // int64_data
      case 10: // double_data
      case 11: // uint64_data
        if (typed.field && typed.field !== tf.field) throw new FormatError(`tensor '${name}' stores data in two different fields.`, src.name);
        typed.field = tf.field;
        typed.parts.push(tf);
        break;
      case 13: {
        let key = '';
        let value = '';
        for (const kv of walkFields(src, tf.valueStart, tf.end)) {
          if (kv.field === 1 && kv.wireType === WT_LEN) key = fieldString(src, kv);
          if (kv.field === 2 && kv.wireType === WT_LEN) value = fieldString(src, kv);
        }
        ext[key] = value;
        break;
      }
      case 14:
        location = tf.varint;
        break;
      default:
        break;
    }
  }
  for (const d of dims) {
    if (!Number.isSafeInteger(d) || d < 0) throw new FormatError(`tensor '${name}' has an invalid dimension ${d}.`, src.name);
  }
  if (dtype === 0) throw new FormatError(`tensor '${name}' has an undefined data type (0).`, src.name);
  const numel = dims.reduce((a, b) => a * b, 1);
  const esize = dtypeSize(dtype);
  const tensor: OnnxTensor = { name, dtype, dims, storage: { kind: 'values', values: [] }, span: { start: f.valueStart, end: f.end } };
  if (location === 1) {
    if (!external) throw new FormatError(`tensor '${name}' uses external data, which is not allowed here.`, src.name);
    if (!ext.location) throw new FormatError(`tensor '${name}' uses external data but names no location.`, src.name);
    const file = external.resolve(ext.location);
    const offset = ext.offset ? Number(ext.offset) : 0;
    const length = ext.length ? Number(ext.length) : esize ? numel * esize : NaN;
    if (!Number.isSafeInteger(offset) || offset < 0 || !Number.isSafeInteger(length) || length < 0) {
      throw new FormatError(`tensor '${name}' has an invalid external data offset/length (${ext.offset}, ${ext.length}).`, src.name);
    }
    if (esize && length !== numel * esize) {
      throw new FormatError(`tensor '${name}' declares ${length} bytes of external data but ${dims.join('×')} ${dtypeName(dtype)} needs ${numel * esize}.`, src.name);
    }
    tensor.storage = { kind: 'external', file, location: ext.location, offset, length };
  } else if (raw) {
    if (esize && raw.length !== numel * esize) {
      throw new FormatError(`tensor '${name}' has ${raw.length} bytes of raw data but ${dims.join('×') || 'scalar'} ${dtypeName(dtype)} needs ${numel * esize}.`, src.name);
    }
    tensor.storage = { kind: 'raw', ...raw };
  } else if (typed.field) {
    tensor.storage = { kind: 'values', values: decodeTyped(src, typed.field, typed.parts, dtype, name) };
    if (tensor.storage.values.length !== numel) {
      throw new FormatError(`tensor '${name}' holds ${tensor.storage.values.length} values but its shape ${dims.join('×')} needs ${numel}.`, src.name);
    }
  } else if (numel !== 0 && dtype !== DType.string) {
    throw new FormatError(`tensor '${name}' has shape ${dims.join('×')} but no data.`, src.name);
  }
  return tensor;
}

function decodeTyped(src: ByteSource, field: number, parts: WireField[], dtype: number, name: string): NumArray {
  const out: number[] = [];
  for (const p of parts) {
    if (p.wireType === WT_LEN) {
      const b = src.read(p.valueStart, p.end - p.valueStart);
      if (field === 4 || field === 10) {
        const w = field === 4 ? 4 : 8;
        if (b.length % w) throw new FormatError(`tensor '${name}': packed data length ${b.length} is not a multiple of ${w}.`, src.name);
        const dv = new DataView(b.buffer, b.byteOffset, b.length);
        for (let i = 0; i < b.length; i += w) out.push(w === 4 ? dv.getFloat32(i, true) : dv.getFloat64(i, true));
      } else {
        for (let q = 0; q < b.length; ) {
          const [v, nq] = readVarint(b, q, src.name);
          out.push(v);
          q = nq;
        }
      }
    } else if (p.wireType === WT_I32 && field === 4) {
      const b = src.read(p.valueStart, 4);
      out.push(new DataView(b.buffer, b.byteOffset, 4).getFloat32(0, true));
    } else if (p.wireType === WT_I64 && field === 10) {
      const b = src.read(p.valueStart, 8);
      out.push(new DataView(b.buffer, b.byteOffset, 8).getFloat64(0, true));
    } else if (p.wireType === WT_VARINT) {
      out.push(p.varint);
    } else {
      throw new FormatError(`tensor '${name}': unexpected wire type ${p.wireType} in field ${field}.`, src.name);
    }
  }
  // float16/bfloat16 keep their bit patterns in int32_data.
  if (field === 5 && (dtype === DType.float16 || dtype === DType.bfloat16)) {
    const u16 = new Uint16Array(out.length);
    for (let i = 0; i < out.length; i++) u16[i] = out[i] & 0xffff;
    return decodeNumbers(new Uint8Array(u16.buffer), dtype);
  }
  if (field === 4) return Float32Array.from(out);
  if (field === 10) return Float64Array.from(out);
  return out;
}

/** Converts a decoded TensorProto (a Constant node's value) into an OnnxTensor held in memory. */
export function tensorFromProto(t: onnx.ITensorProto, name: string, file: string): OnnxTensor {
  const dims = (t.dims ?? []).map(toNumber);
  const dtype = t.dataType ?? 0;
  let storage: TensorStorage;
  if (t.dataLocation === onnx.TensorProto.DataLocation.EXTERNAL) {
    throw new FormatError(`Constant '${name}' uses external data, which RepFuse does not follow inside nodes.`, file);
  }
  if (t.rawData && t.rawData.length) storage = { kind: 'bytes', bytes: t.rawData };
  else if (t.floatData && t.floatData.length) storage = { kind: 'values', values: Float32Array.from(t.floatData) };
  else if (t.doubleData && t.doubleData.length) storage = { kind: 'values', values: Float64Array.from(t.doubleData) };
  else if (t.int32Data && t.int32Data.length) {
    if (dtype === DType.float16 || dtype === DType.bfloat16) {
      storage = { kind: 'values', values: decodeNumbers(new Uint8Array(Uint16Array.from(t.int32Data).buffer), dtype) };
    } else storage = { kind: 'values', values: Int32Array.from(t.int32Data) };
  } else if (t.int64Data && t.int64Data.length) storage = { kind: 'values', values: t.int64Data.map(toNumber) };
  else storage = { kind: 'values', values: [] };
  return { name, dtype, dims, storage };
}

export function numelOf(dims: number[]): number {
  return dims.reduce((a, b) => a * b, 1);
}

/** Reads a tensor's values as numbers (float16/bfloat16 widened exactly). */
export function readTensorValues(model: OnnxModel, t: OnnxTensor): NumArray {
  const n = numelOf(t.dims);
  let values: NumArray;
  switch (t.storage.kind) {
    case 'values':
      values = t.storage.values;
      break;
    case 'bytes':
      values = decodeNumbers(t.storage.bytes, t.dtype, model.path);
      break;
    case 'raw':
      values = decodeNumbers(model.source.readOwned(t.storage.offset, t.storage.length), t.dtype, model.path);
      break;
    case 'external': {
      const src = model.external.source(t.storage.file);
      values = decodeNumbers(src.readOwned(t.storage.offset, t.storage.length), t.dtype, t.storage.file);
      break;
    }
  }
  if (values.length !== n) {
    throw new FormatError(`tensor '${t.name}' has ${values.length} values but shape ${t.dims.join('×')} needs ${n}.`, model.path);
  }
  return values;
}

/** Byte size of a tensor's data (for parameter-size reports). */
export function tensorByteLength(t: OnnxTensor): number {
  const s = t.storage;
  if (s.kind === 'raw' || s.kind === 'external') return s.length;
  if (s.kind === 'bytes') return s.bytes.length;
  return numelOf(t.dims) * (dtypeSize(t.dtype) ?? 0);
}

const MAX_NODES = 10_000_000;

/** Opens an ONNX model from a file (or any ByteSource). The caller must close() it. */
export function openOnnx(file: string | ByteSource): OnnxModel {
  const source = typeof file === 'string' ? new FileSource(file) : file;
  try {
    return parseOnnx(source);
  } catch (err) {
    source.close();
    throw err;
  }
}

function parseOnnx(source: ByteSource): OnnxModel {
  const modelPath = source.name;
  if (source.size === 0) throw new FormatError('the file is empty; expected an ONNX model.', modelPath);
  const external = new ExternalFiles(modelPath, path.dirname(path.resolve(modelPath)));
  const topFields: WireField[] = [];
  let graphField: WireField | undefined;
  let irVersion = 0;
  let producerName = '';
  let producerVersion = '';
  const opsets: { domain: string; version: number }[] = [];
  try {
    for (const f of walkFields(source, 0, source.size)) {
      topFields.push(f);
      if (f.field === 1 && f.wireType === WT_VARINT) irVersion = f.varint;
      else if (f.field === 2 && f.wireType === WT_LEN) producerName = fieldString(source, f);
      else if (f.field === 3 && f.wireType === WT_LEN) producerVersion = fieldString(source, f);
      else if (f.field === 7 && f.wireType === WT_LEN) {
        if (graphField) throw new FormatError('the model has two graph fields.', modelPath);
        graphField = f;
      } else if (f.field === 8 && f.wireType === WT_LEN) {
        let domain = '';
        let version = 0;
        for (const o of walkFields(source, f.valueStart, f.end)) {
          if (o.field === 1 && o.wireType === WT_LEN) domain = fieldString(source, o);
          if (o.field === 2 && o.wireType === WT_VARINT) version = o.varint;
        }
        opsets.push({ domain, version });
      }
    }
  } catch (err) {
    if (err instanceof FormatError) {
      throw new FormatError(`not a valid ONNX model (${err.message.replace(/\.$/, '')}).`, modelPath);
    }
    throw err;
  }
  if (!graphField) {
    throw new FormatError('not an ONNX model: no graph found (is this really an .onnx file?).', modelPath);
  }
  if (irVersion === 0 && opsets.length === 0) {
    throw new FormatError('not an ONNX model: no IR version and no opset imports.', modelPath);
  }
  const graph = parseGraph(source, graphField, external);
  const usesExternalData = [...graph.initializers.values()].some((t) => t.storage.kind === 'external');
  return {
    path: modelPath,
    source,
    irVersion,
    producerName,
    producerVersion,
    opsets,
    topFields,
    graphField,
    graph,
    usesExternalData,
    external,
    close() {
      external.close();
      source.close();
    },
  };
}

function parseGraph(src: ByteSource, gf: WireField, external: ExternalFiles): OnnxGraph {
  const g: OnnxGraph = { name: '', fields: [], nodes: [], initializers: new Map(), inputs: [], outputs: [], valueInfo: [] };
  for (const f of walkFields(src, gf.valueStart, gf.end)) {
    if (f.wireType !== WT_LEN) {
      g.fields.push({ kind: 'other', wire: f });
      continue;
    }
    switch (f.field) {
      case 1: {
        if (g.nodes.length >= MAX_NODES) throw new FormatError(`more than ${MAX_NODES} nodes.`, src.name);
        const p = decodeMessage(src, f, 'a node', (b) => onnx.NodeProto.decode(b));
        const node = toNode(p, g.nodes.length);
        g.fields.push({ kind: 'node', index: node.index, wire: f });
        g.nodes.push(node);
        break;
      }
      case 2:
        g.name = fieldString(src, f);
        g.fields.push({ kind: 'other', wire: f });
        break;
      case 5: {
        const t = scanTensor(src, f, external);
        if (g.initializers.has(t.name)) throw new FormatError(`two initializers are named '${t.name}'.`, src.name);
        g.initializers.set(t.name, t);
        g.fields.push({ kind: 'initializer', name: t.name, wire: f });
        break;
      }
      case 11:
      case 12:
      case 13: {
        const vi = toValueInfo(decodeMessage(src, f, 'a value info', (b) => onnx.ValueInfoProto.decode(b)));
        const kind = f.field === 11 ? 'input' : f.field === 12 ? 'output' : 'value_info';
        (kind === 'input' ? g.inputs : kind === 'output' ? g.outputs : g.valueInfo).push(vi);
        g.fields.push({ kind, name: vi.name, wire: f });
        break;
      }
      default:
        g.fields.push({ kind: 'other', wire: f });
    }
  }
  return g;
}
