// safetensors: an 8-byte little-endian header length, a JSON header
// ({name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {str: str}}), then the data.
// The reader validates every offset against the data area and hands out lazy tensor views; the
// writer streams payloads into a temp file that is renamed (atomic).
import * as path from 'node:path';
import { type ByteSource, FileSource, pipeRange } from './bytes';
import { DType, dtypeName, dtypeSize } from './dtype';
import { FormatError, RepFuseError } from './errors';
import { checkpoint, writeAtomically } from './atomic';
import { countedStream } from './torch/save';
import { contiguousStrides, isContiguous, NewTensor, readTensorBytes, TorchStorage, TorchTensor } from './torch/tensor';

/** safetensors dtype names → element types (the ones RepFuse can represent). */
export const SAFETENSORS_DTYPES: Record<string, DType> = {
  F64: DType.float64, F32: DType.float32, F16: DType.float16, BF16: DType.bfloat16,
  I64: DType.int64, I32: DType.int32, I16: DType.int16, I8: DType.int8,
  U64: DType.uint64, U32: DType.uint32, U16: DType.uint16, U8: DType.uint8, BOOL: DType.bool,
};

/** The header may be at most this long (the reference implementation's limit). */
export const MAX_HEADER_BYTES = 100_000_000;

export interface SafetensorsFile {
  readonly path: string;
  /** Tensors in header order, as lazy contiguous views of the file. */
  readonly tensors: Map<string, TorchTensor>;
  readonly metadata?: Record<string, string>;
  /** Where the data area starts (8 + header length). */
  readonly dataOffset: number;
  readonly source: ByteSource;
  close(): void;
}

export function safetensorsDTypeName(t: DType): string {
  for (const [k, v] of Object.entries(SAFETENSORS_DTYPES)) if (v === t) return k;
  throw new RepFuseError(`safetensors cannot store ${dtypeName(t)} elements.`);
}

/** Whether the source starts like a safetensors file (a sane header length, then '{'). */
export function looksLikeSafetensors(src: ByteSource): boolean {
  if (src.size < 10) return false;
  const b = src.read(0, 9);
  const n = new DataView(b.buffer, b.byteOffset, 8).getBigUint64(0, true);
  return n >= 2n && n <= BigInt(Math.min(MAX_HEADER_BYTES, src.size - 8)) && b[8] === 0x7b;
}

export function readSafetensors(file: string | ByteSource): SafetensorsFile {
  const owned = typeof file === 'string';
  const src = owned ? new FileSource(file) : file;
  try {
    const r = parse(src);
    return { ...r, path: src.name, source: src, close: () => (owned ? src.close() : undefined) };
  } catch (err) {
    if (owned) src.close();
    throw err;
  }
}

function parse(src: ByteSource): Omit<SafetensorsFile, 'path' | 'source' | 'close'> {
  const file = src.name;
  if (src.size < 8) throw new FormatError('not a safetensors file: too short.', file);
  const lb = src.read(0, 8);
  const n64 = new DataView(lb.buffer, lb.byteOffset, 8).getBigUint64(0, true);
  if (n64 > BigInt(MAX_HEADER_BYTES)) throw new FormatError(`safetensors header length ${n64} is over the ${MAX_HEADER_BYTES}-byte limit (not a safetensors file?).`, file);
  const n = Number(n64);
  if (8 + n > src.size) throw new FormatError(`safetensors header length ${n} runs past the end of the file (${src.size} bytes; truncated?).`, file);
  const text = Buffer.from(src.read(8, n)).toString('utf8');
  let header: unknown;
  try {
    header = JSON.parse(text);
  } catch (err) {
    throw new FormatError(`the safetensors header is not valid JSON (${(err as Error).message}).`, file);
  }
  if (header === null || typeof header !== 'object' || Array.isArray(header)) throw new FormatError('the safetensors header is not a JSON object.', file);
  const dataOffset = 8 + n;
  const dataSize = src.size - dataOffset;
  let metadata: Record<string, string> | undefined;
  const tensors = new Map<string, TorchTensor>();
  const ranges: { name: string; begin: number; end: number }[] = [];
  for (const [name, raw] of Object.entries(header as Record<string, unknown>)) {
    if (name === '__metadata__') {
      if (raw === null || typeof raw !== 'object' || Array.isArray(raw)) throw new FormatError('safetensors __metadata__ is not an object.', file);
      const entries = Object.entries(raw as Record<string, unknown>);
      for (const [k, v] of entries) {
        if (typeof v !== 'string') throw new FormatError(`safetensors __metadata__ value for "${k}" is not a string.`, file);
      }
      metadata = Object.fromEntries(entries) as Record<string, string>; // own properties, even for "__proto__"
      continue;
    }
    const e = raw as { dtype?: unknown; shape?: unknown; data_offsets?: unknown };
    if (e === null || typeof e !== 'object') throw new FormatError(`safetensors entry "${name}" is not an object.`, file);
    const dtype = typeof e.dtype === 'string' && Object.prototype.hasOwnProperty.call(SAFETENSORS_DTYPES, e.dtype) ? SAFETENSORS_DTYPES[e.dtype] : undefined;
    if (dtype === undefined) throw new FormatError(`tensor "${name}" has unsupported dtype ${JSON.stringify(e.dtype)}.`, file);
    if (!Array.isArray(e.shape) || !e.shape.every((d) => Number.isSafeInteger(d) && d >= 0)) throw new FormatError(`tensor "${name}" has an invalid shape ${JSON.stringify(e.shape)}.`, file);
    const shape = e.shape as number[];
    const off = e.data_offsets;
    if (!Array.isArray(off) || off.length !== 2 || !off.every((x) => Number.isSafeInteger(x) && x >= 0)) {
      throw new FormatError(`tensor "${name}" has invalid data_offsets ${JSON.stringify(off)}.`, file);
    }
    const [begin, end] = off as number[];
    if (begin > end || end > dataSize) {
      throw new FormatError(`tensor "${name}" spans bytes [${begin}, ${end}) of a ${dataSize}-byte data area (truncated or corrupt file).`, file);
    }
    const numel = shape.reduce((a, b) => a * b, 1);
    const want = numel * (dtypeSize(dtype) ?? 1);
    if (!Number.isSafeInteger(want) || end - begin !== want) {
      throw new FormatError(`tensor "${name}" of shape [${shape.join(', ')}] ${e.dtype} needs ${want} bytes, but its data_offsets span ${end - begin}.`, file);
    }
    ranges.push({ name, begin, end });
    const st = new TorchStorage(name, dtype, numel, 'cpu', src, dataOffset + begin, want);
    tensors.set(name, new TorchTensor(st, 0, shape, contiguousStrides(shape)));
  }
  ranges.sort((a, b) => a.begin - b.begin || a.end - b.end);
  for (let i = 1; i < ranges.length; i++) {
    const a = ranges[i - 1];
    const b = ranges[i];
    if (b.begin < a.end) throw new FormatError(`tensors "${a.name}" and "${b.name}" overlap in the data area.`, file);
  }
  return { tensors, metadata, dataOffset };
}

/** What writeSafetensors accepts per name. */
export type SafetensorsInput = TorchTensor | NewTensor | { dtype: DType; shape: number[]; produce(): Uint8Array };

export interface SafetensorsWriteOptions {
  metadata?: Record<string, string>;
  signal?: AbortSignal;
}

interface Planned {
  name: string;
  dtype: DType;
  shape: number[];
  bytes: number;
  write: (emit: (c: Uint8Array) => void) => void;
  /** The file an existing tensor is read from. */
  sourceName?: string;
}

function planOne(name: string, t: SafetensorsInput): Planned {
  const shape = t.shape.slice();
  const dtype = t.dtype;
  const es = dtypeSize(dtype);
  if (!es) throw new RepFuseError(`tensor "${name}": safetensors cannot store ${dtypeName(dtype)} elements.`);
  const bytes = shape.reduce((a, b) => a * b, 1) * es;
  let write: Planned['write'];
  if (t instanceof TorchTensor) {
    if (isContiguous(t)) {
      const st = t.storage;
      const at = st.offset + t.storageOffset * es;
      write = (emit) => pipeRange(st.source, at, bytes, emit);
    } else write = (emit) => emit(readTensorBytes(t));
  } else if (t instanceof NewTensor) {
    const stream = t.storage.stream;
    write = stream && t.storage.numel === shape.reduce((a, b) => a * b, 1) ? (emit) => countedStream(stream, emit, bytes, dtype, t.storage.numel) : (emit) => emit(readTensorBytes(t));
  }
  else {
    write = (emit) => {
      const b = t.produce();
      if (b.length !== bytes) throw new RepFuseError(`tensor "${name}" produced ${b.length} bytes; ${bytes} expected.`);
      emit(b);
    };
  }
  return { name, dtype, shape, bytes, write, sourceName: t instanceof TorchTensor ? t.storage.source.name : undefined };
}

/** Builds the header (padded with spaces to a multiple of 8, like the reference writer) for tensors in order. */
function header(planned: Planned[], metadata?: Record<string, string>): Uint8Array {
  // Built by hand so that any name (even "__proto__") becomes a key.
  const fields: string[] = [];
  if (metadata && Object.keys(metadata).length) {
    fields.push(`"__metadata__":{${Object.entries(metadata).map(([k, v]) => `${JSON.stringify(k)}:${JSON.stringify(v)}`).join(',')}}`);
  }
  let off = 0;
  for (const p of planned) {
    fields.push(`${JSON.stringify(p.name)}:${JSON.stringify({ dtype: safetensorsDTypeName(p.dtype), shape: p.shape, data_offsets: [off, off + p.bytes] })}`);
    off += p.bytes;
  }
  let json = Buffer.from(`{${fields.join(',')}}`, 'utf8');
  const pad = (8 - ((8 + json.length) % 8)) % 8;
  if (pad) json = Buffer.concat([json, Buffer.alloc(pad, 0x20)]);
  const out = new Uint8Array(8 + json.length);
  new DataView(out.buffer).setBigUint64(0, BigInt(json.length), true);
  out.set(json, 8);
  return out;
}

function planAll(tensors: Map<string, SafetensorsInput> | Iterable<[string, SafetensorsInput]>, opts: SafetensorsWriteOptions): { head: Uint8Array; planned: Planned[] } {
  const list = [...tensors];
  const names = new Set<string>();
  for (const [name] of list) {
    if (name === '__metadata__') throw new RepFuseError('a tensor cannot be named __metadata__ in safetensors.');
    if (names.has(name)) throw new RepFuseError(`duplicate tensor name "${name}".`);
    names.add(name);
  }
  if (opts.metadata) for (const [k, v] of Object.entries(opts.metadata)) if (typeof v !== 'string') throw new RepFuseError(`safetensors metadata "${k}" must be a string.`);
  const planned = list.map(([n, t]) => planOne(n, t)).sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  return { head: header(planned, opts.metadata), planned };
}

async function emitAll(sink: (c: Uint8Array) => void, head: Uint8Array, planned: Planned[], signal?: AbortSignal): Promise<void> {
  sink(head);
  let since = 0;
  for (const p of planned) {
    let got = 0;
    p.write((c) => {
      got += c.length;
      if (got > p.bytes) throw new RepFuseError(`tensor "${p.name}" produced more than ${p.bytes} bytes.`);
      sink(c);
    });
    if (got !== p.bytes) throw new RepFuseError(`tensor "${p.name}" produced ${got} bytes; ${p.bytes} expected.`);
    since += p.bytes;
    if (since > 16 << 20) {
      since = 0;
      await checkpoint(signal);
    }
  }
}

/** Writes tensors (sorted by name) and optional metadata as a .safetensors file, atomically. */
export async function writeSafetensors(
  target: string,
  tensors: Map<string, SafetensorsInput> | Iterable<[string, SafetensorsInput]>,
  opts: SafetensorsWriteOptions = {},
): Promise<{ path: string; bytes: number }> {
  const abs = path.resolve(target);
  const { head, planned } = planAll(tensors, opts);
  for (const p of planned) {
    if (p.sourceName !== undefined && path.resolve(p.sourceName) === abs) throw new RepFuseError('refusing to overwrite the input file; choose another output path.', target);
  }
  const bytes = await writeAtomically(abs, (sink) => emitAll(sink, head, planned, opts.signal), opts.signal);
  return { path: abs, bytes };
}

/** The same file in memory. */
export async function encodeSafetensors(
  tensors: Map<string, SafetensorsInput> | Iterable<[string, SafetensorsInput]>,
  opts: SafetensorsWriteOptions = {},
): Promise<Uint8Array> {
  const { head, planned } = planAll(tensors, opts);
  const chunks: Uint8Array[] = [];
  await emitAll((c) => chunks.push(c.slice()), head, planned, opts.signal);
  return Buffer.concat(chunks);
}
