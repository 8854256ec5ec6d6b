// ONNX writer: re-emits a model from the original bytes plus a Plan of changes. Untouched fields
// (nodes, initializers, metadata, fields this schema does not know) are copied byte for byte;
// big tensor data is streamed, never re-encoded. Output goes to a temp file that is renamed.
import * as path from 'node:path';
import { commitTemp, discardTemp, writeTemp } from '../atomic';
import { type ByteSource, pipeRange } from '../bytes';
import { dtypeSize } from '../dtype';
import { RepFuseError } from '../errors';
import { ByteBuilder, WT_LEN, walkFields } from '../proto/wire';
import { onnx } from 'onnx-proto';
import { numelOf, type OnnxModel, type OnnxTensor } from './reader';

/** A tensor the writer creates; its bytes are produced only when written, possibly in slices. */
export interface NewTensor {
  name: string;
  dtype: number;
  dims: number[];
  /** Writes exactly numel × size bytes to `sink`; chunks may be reused after the call returns. */
  write(sink: (chunk: Uint8Array) => void): void;
}

/** What to change in the graph. Node indexes refer to model.graph.nodes. */
export interface Plan {
  removeNodes: Set<number>;
  /** Encoded NodeProtos emitted where the node with this index stood (it is usually removed). */
  insertNodes: Map<number, Uint8Array[]>;
  removeInitializers: Set<string>;
  /** New tensors emitted where the named initializer stood. */
  insertInitializers: Map<string, NewTensor[]>;
  /** New tensors with no anchor: appended after the last initializer. */
  appendInitializers: NewTensor[];
  /** Tensor names that no longer exist: their value_info, graph input and graph output entries are dropped. */
  removedTensors: Set<string>;
}

export function emptyPlan(): Plan {
  return {
    removeNodes: new Set(),
    insertNodes: new Map(),
    removeInitializers: new Set(),
    insertInitializers: new Map(),
    appendInitializers: [],
    removedTensors: new Set(),
  };
}

export interface WriteOptions {
  /** 'auto' (default): external data when the input uses it or the model would exceed 2 GB. */
  externalData?: boolean | 'auto';
  /** Extra graph outputs (validation exposes block outputs this way). */
  extraOutputs?: { name: string; elemType: number }[];
  /**
   * Extra graph inputs. Naming an initializer makes it overridable at run time (quantization
   * analysis feeds one block's quantized weight this way); the initializer stays the default.
   */
  extraInputs?: { name: string; elemType: number; dims: number[] }[];
  /** Tensors at least this big go to the external-data file (default 1 KiB). */
  externalThreshold?: number;
  /**
   * Copy external-data references verbatim instead of writing a new data file. Only valid when the
   * output lies in the same folder as the input (validation uses it for temporary variants).
   */
  keepExternalReferences?: boolean;
  signal?: AbortSignal;
}

type Piece =
  | { kind: 'bytes'; bytes: Uint8Array }
  | { kind: 'copy'; src: ByteSource; offset: number; length: number }
  | { kind: 'lazy'; length: number; write: (sink: (chunk: Uint8Array) => void) => void };

const PROTO_LIMIT = 2 ** 31 - 1;
const ALIGN = 4096;

class Layout {
  pieces: Piece[] = [];
  length = 0;
  push(p: Piece): void {
    this.pieces.push(p);
    this.length += p.kind === 'bytes' ? p.bytes.length : p.length;
  }
  bytes(b: Uint8Array): void {
    if (b.length) this.push({ kind: 'bytes', bytes: b });
  }
  copy(src: ByteSource, offset: number, length: number): void {
    if (length) this.push({ kind: 'copy', src, offset, length });
  }
}

function tensorHeader(t: { name: string; dtype: number; dims: number[] }): ByteBuilder {
  const b = new ByteBuilder();
  for (const d of t.dims) b.varintField(1, d);
  b.varintField(2, t.dtype);
  b.stringField(8, t.name);
  return b;
}

function externalFields(b: ByteBuilder, location: string, offset: number, length: number): void {
  const kv = (k: string, v: string) => b.lenField(13, new ByteBuilder().stringField(1, k).stringField(2, v).finish());
  kv('location', location);
  kv('offset', String(offset));
  kv('length', String(length));
  b.varintField(14, 1);
}

function lenPrefix(field: number, length: number): Uint8Array {
  return new ByteBuilder().tag(field, WT_LEN).varint(length).finish();
}

/** Lays out the whole model; data pieces for the external file go to `data` when given. */
function layoutModel(model: OnnxModel, plan: Plan, opts: WriteOptions, data: { layout: Layout; location: string } | undefined): Layout {
  const src = model.source;
  const g = new Layout();
  const threshold = opts.externalThreshold ?? 1024;
  /** Next offset in the data file, aligned so runtimes can map tensors directly. */
  const dataOffset = (): number => {
    const d = data!.layout;
    const pad = (ALIGN - (d.length % ALIGN)) % ALIGN;
    if (pad) d.bytes(new Uint8Array(pad));
    return d.length;
  };

  const emitNew = (t: NewTensor) => {
    const len = numelOf(t.dims) * (dtypeSize(t.dtype) ?? 0);
    const h = tensorHeader(t);
    if (data && len >= threshold) {
      const off = dataOffset();
      data.layout.push({ kind: 'lazy', length: len, write: (sink) => t.write(sink) });
      externalFields(h, data.location, off, len);
      const payload = h.finish();
      g.bytes(lenPrefix(5, payload.length));
      g.bytes(payload);
    } else {
      h.tag(9, WT_LEN).varint(len);
      const head = h.finish();
      g.bytes(lenPrefix(5, head.length + len));
      g.bytes(head);
      g.push({ kind: 'lazy', length: len, write: (sink) => t.write(sink) });
    }
  };

  const emitKept = (t: OnnxTensor, start: number, end: number) => {
    const s = t.storage;
    const big = (s.kind === 'raw' || s.kind === 'external') && s.length >= threshold;
    if (!data || (!big && s.kind !== 'external')) {
      if (s.kind === 'external' && !opts.keepExternalReferences) throw new RepFuseError(`tensor '${t.name}' uses external data; the output must use external data too.`, model.path);
      g.copy(src, start, end - start);
      return;
    }
    // Rebuild the TensorProto: every field but the data ones, then an external reference.
    const parts = new Layout();
    for (const f of walkFields(src, t.span!.start, t.span!.end)) {
      if ([4, 5, 7, 9, 10, 11, 13, 14].includes(f.field)) continue;
      parts.copy(src, f.start, f.end - f.start);
    }
    const len = s.kind === 'raw' || s.kind === 'external' ? s.length : 0;
    const off = dataOffset();
    if (s.kind === 'raw') data.layout.copy(src, s.offset, s.length);
    else if (s.kind === 'external') data.layout.copy(model.external.source(s.file), s.offset, s.length);
    const ext = new ByteBuilder();
    externalFields(ext, data.location, off, len);
    parts.bytes(ext.finish());
    g.bytes(lenPrefix(5, parts.length));
    for (const p of parts.pieces) g.push(p);
  };

  let lastInitializer = -1;
  let lastOutput = -1;
  let lastInput = -1;
  model.graph.fields.forEach((f, i) => {
    if (f.kind === 'initializer') lastInitializer = i;
    if (f.kind === 'output') lastOutput = i;
    if (f.kind === 'input') lastInput = i;
  });
  const extraInputs = (opts.extraInputs ?? []).filter((o) => !model.graph.inputs.some((x) => x.name === o.name));
  const emitExtraInputs = () => {
    for (const o of extraInputs) {
      const vi = onnx.ValueInfoProto.encode({ name: o.name, type: { tensorType: { elemType: o.elemType, shape: { dim: o.dims.map((d) => ({ dimValue: d })) } } } }).finish();
      g.bytes(lenPrefix(11, vi.length));
      g.bytes(vi);
    }
  };
  const extraOutputs = (opts.extraOutputs ?? []).filter((o) => !model.graph.outputs.some((x) => x.name === o.name));
  const emitExtraOutputs = () => {
    for (const o of extraOutputs) {
      const vi = onnx.ValueInfoProto.encode({ name: o.name, type: { tensorType: { elemType: o.elemType } } }).finish();
      g.bytes(lenPrefix(12, vi.length));
      g.bytes(vi);
    }
  };

  model.graph.fields.forEach((f, i) => {
    const w = f.wire;
    switch (f.kind) {
      case 'node': {
        for (const n of plan.insertNodes.get(f.index) ?? []) {
          g.bytes(lenPrefix(1, n.length));
          g.bytes(n);
        }
        if (!plan.removeNodes.has(f.index)) g.copy(src, w.start, w.end - w.start);
        break;
      }
      case 'initializer': {
        for (const t of plan.insertInitializers.get(f.name) ?? []) emitNew(t);
        if (!plan.removeInitializers.has(f.name)) emitKept(model.graph.initializers.get(f.name)!, w.start, w.end);
        if (i === lastInitializer) for (const t of plan.appendInitializers) emitNew(t);
        break;
      }
      case 'input':
      case 'value_info':
        if (!plan.removedTensors.has(f.name)) g.copy(src, w.start, w.end - w.start);
        if (f.kind === 'input' && i === lastInput) emitExtraInputs();
        break;
      case 'output':
        // A graph output is removed only on purpose (--drop-aux); fused blocks never remove one.
        if (!plan.removedTensors.has(f.name)) g.copy(src, w.start, w.end - w.start);
        if (i === lastOutput) emitExtraOutputs();
        break;
      default:
        g.copy(src, w.start, w.end - w.start);
    }
  });
  if (lastInitializer < 0) for (const t of plan.appendInitializers) emitNew(t);
  if (lastOutput < 0) emitExtraOutputs();
  if (lastInput < 0) emitExtraInputs();

  const m = new Layout();
  for (const f of model.topFields) {
    if (f === model.graphField) {
      m.bytes(lenPrefix(7, g.length));
      for (const p of g.pieces) m.push(p);
    } else m.copy(src, f.start, f.end - f.start);
  }
  return m;
}

async function emit(layout: Layout, sink: (chunk: Uint8Array) => void, signal?: AbortSignal): Promise<void> {
  let sinceYield = 0;
  for (const p of layout.pieces) {
    if (signal?.aborted) throw signal.reason ?? new RepFuseError('cancelled.');
    if (p.kind === 'bytes') sink(p.bytes);
    else if (p.kind === 'copy') pipeRange(p.src, p.offset, p.length, sink);
    else {
      let n = 0;
      p.write((c) => {
        n += c.length;
        sink(c);
      });
      if (n !== p.length) throw new Error(`internal error: produced ${n} bytes, planned ${p.length}.`);
    }
    sinceYield += p.kind === 'bytes' ? p.bytes.length : p.length;
    if (sinceYield > 16 << 20) {
      sinceYield = 0;
      await new Promise((r) => setImmediate(r)); // lets SIGINT / Cancel be noticed
    }
  }
}

function wantsExternal(model: OnnxModel, plan: Plan, opts: WriteOptions): boolean {
  if (opts.externalData === true) return true;
  if (opts.externalData === false || opts.keepExternalReferences) return false;
  if (model.usesExternalData) return true;
  return layoutModel(model, plan, opts, undefined).length > PROTO_LIMIT - (64 << 20);
}

export interface WriteResult {
  path: string;
  bytes: number;
  externalDataPath?: string;
  externalDataBytes?: number;
}

/**
 * Writes the planned model to `outPath` atomically (temp file + rename). Never writes to the
 * input's own path or its external-data files.
 */
export async function writeOnnx(model: OnnxModel, plan: Plan, outPath: string, opts: WriteOptions = {}): Promise<WriteResult> {
  const target = path.resolve(outPath);
  if (target === path.resolve(model.path)) throw new RepFuseError('refusing to overwrite the input model.', outPath);
  for (const t of model.graph.initializers.values()) {
    if (t.storage.kind === 'external' && path.resolve(t.storage.file) === target) {
      throw new RepFuseError(`refusing to overwrite ${path.basename(target)}: it holds the input model's external data.`, outPath);
    }
  }
  const external = wantsExternal(model, plan, opts);
  let data: { layout: Layout; location: string; path: string } | undefined;
  if (external) {
    const location = `${path.basename(target)}.data`;
    const dataPath = path.join(path.dirname(target), location);
    for (const t of model.graph.initializers.values()) {
      if (t.storage.kind === 'external' && path.resolve(t.storage.file) === dataPath) {
        throw new RepFuseError(`the output's external data file ${location} is the input's own data file; choose another output name.`, outPath);
      }
    }
    data = { layout: new Layout(), location, path: dataPath };
  }
  const layout = layoutModel(model, plan, opts, data);
  if (layout.length > PROTO_LIMIT) {
    throw new RepFuseError(`the fused model would be ${layout.length} bytes, over protobuf's 2 GB limit; write it with external data.`, outPath);
  }
  // Both files are complete on disk before either is renamed into place.
  let dataTmp: string | undefined;
  let modelTmp: string | undefined;
  try {
    if (data) dataTmp = (await writeTemp(data.path, (sink) => emit(data.layout, sink, opts.signal))).tmp;
    modelTmp = (await writeTemp(target, (sink) => emit(layout, sink, opts.signal))).tmp;
    if (opts.signal?.aborted) throw opts.signal.reason ?? new RepFuseError('cancelled.');
    if (dataTmp && data) commitTemp(dataTmp, data.path);
    commitTemp(modelTmp, target);
  } finally {
    for (const t of [dataTmp, modelTmp]) if (t) discardTemp(t);
  }
  return { path: target, bytes: layout.length, externalDataPath: data?.path, externalDataBytes: data?.layout.length };
}

/** Serializes the planned model into memory (no external data). */
export async function encodeOnnx(model: OnnxModel, plan: Plan, opts: WriteOptions = {}): Promise<Uint8Array> {
  if (model.usesExternalData) throw new RepFuseError('a model with external data cannot be encoded in memory.', model.path);
  const layout = layoutModel(model, plan, opts, undefined);
  if (layout.length > PROTO_LIMIT) throw new RepFuseError(`the model would be ${layout.length} bytes, over protobuf's 2 GB limit.`, model.path);
  const out = new Uint8Array(layout.length);
  let pos = 0;
  await emit(layout, (c) => {
    out.set(c, pos);
    pos += c.length;
  }, opts.signal);
  return out;
}

