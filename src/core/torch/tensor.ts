// PyTorch storages and tensors as lazy views: a tensor knows where its bytes are; reading them is
// a separate, explicit step that touches only the bytes the view covers.
import type { ByteSource } from '../bytes';
import { DType, decodeNumbers, dtypeName, dtypeSize, type NumArray } from '../dtype';
import { FormatError } from '../errors';
import type { PyValue } from './values';

/** torch storage class name (as in `torch.FloatStorage`) → element type. */
export const STORAGE_DTYPES: Record<string, DType> = {
  HalfStorage: DType.float16,
  FloatStorage: DType.float32,
  DoubleStorage: DType.float64,
  BFloat16Storage: DType.bfloat16,
  LongStorage: DType.int64,
  IntStorage: DType.int32,
  ShortStorage: DType.int16,
  CharStorage: DType.int8,
  ByteStorage: DType.uint8,
  BoolStorage: DType.bool,
  ComplexFloatStorage: DType.complex64,
  ComplexDoubleStorage: DType.complex128,
  UntypedStorage: DType.uint8,
  _UntypedStorage: DType.uint8,
};

const STORAGE_MODULES = new Set(['torch', 'torch.cuda', 'torch.storage']);

/** The element type of a storage class given by module and name (`torch`, `HalfStorage`), else undefined. */
export function storageDType(module: string, name: string): DType | undefined {
  if (!STORAGE_MODULES.has(module)) return undefined;
  return Object.prototype.hasOwnProperty.call(STORAGE_DTYPES, name) ? STORAGE_DTYPES[name] : undefined;
}

/** The `torch.<Name>Storage` class name torch uses when pickling a storage of this element type. */
export function storageClassName(dtype: DType): string {
  for (const [name, t] of Object.entries(STORAGE_DTYPES)) if (t === dtype && !name.includes('Untyped')) return name;
  throw new FormatError(`PyTorch has no storage type for ${dtypeName(dtype)} elements.`);
}

/** One storage: `numel` elements of `dtype` at [offset, offset + byteLength) of `source`. */
export class TorchStorage {
  constructor(
    /** The key in the file: zip record `data/<key>`, or the legacy format's storage key. */
    readonly key: string,
    readonly dtype: DType,
    readonly numel: number,
    /** Device it was saved from, e.g. `cpu` or `cuda:0`. */
    readonly location: string,
    public source: ByteSource,
    /** Byte offset in `source`; the legacy reader fills it in after the pickle has been read. */
    public offset: number,
    readonly byteLength: number,
  ) {}

  get elementSize(): number {
    return dtypeSize(this.dtype) ?? 1;
  }
}

/** A tensor: a strided view of a storage. Nothing is read until readTensor(). */
export class TorchTensor {
  /** BUILD state, `_rebuild_from_type_v2` state, or `_rebuild_parameter_with_state` state, if any. */
  state?: PyValue;
  /** The 7th argument of `_rebuild_tensor_v2` (torch ≥ 2), written back when present. */
  metadata?: PyValue;
  constructor(
    readonly storage: TorchStorage,
    /** In elements. */
    readonly storageOffset: number,
    readonly shape: number[],
    /** In elements. */
    readonly stride: number[],
    readonly requiresGrad = false,
    readonly isParameter = false,
  ) {}

  get dtype(): DType {
    return this.storage.dtype;
  }

  get numel(): number {
    return this.shape.reduce((a, b) => a * b, 1);
  }

  /** The same view marked as an nn.Parameter. */
  asParameter(requiresGrad: boolean): TorchTensor {
    const t = new TorchTensor(this.storage, this.storageOffset, this.shape, this.stride, requiresGrad, true);
    t.metadata = this.metadata;
    return t;
  }
}

/** Bytes for a storage the caller creates; produced only when written. */
export class NewStorage {
  /**
   * Optional streaming form of `produce`: emits the same bytes in slices (chunks may be reused
   * after emit returns), so writers need not hold a big fused weight whole.
   */
  stream?: (emit: (chunk: Uint8Array) => void) => void;
  constructor(
    readonly dtype: DType,
    readonly numel: number,
    readonly produce: () => Uint8Array,
    readonly location = 'cpu',
  ) {}
}

/** A contiguous tensor whose bytes are produced on demand (fused weights, for instance). */
export class NewTensor {
  readonly storage: NewStorage;
  constructor(
    readonly dtype: DType,
    readonly shape: number[],
    /** The bytes (C order, little-endian), or an existing NewStorage to share. */
    produce: (() => Uint8Array) | NewStorage,
    readonly requiresGrad = false,
    readonly isParameter = false,
  ) {
    const numel = shape.reduce((a, b) => a * b, 1);
    if (produce instanceof NewStorage) {
      if (produce.dtype !== dtype || produce.numel < numel) throw new FormatError(`a new tensor of shape [${shape.join(', ')}] does not fit its storage.`);
      this.storage = produce;
    } else this.storage = new NewStorage(dtype, numel, produce);
  }
  get numel(): number {
    return this.storage.numel;
  }
  get stride(): number[] {
    return contiguousStrides(this.shape);
  }
}

/** Shorthand for `new NewTensor(...)`. */
export function newTensor(t: { dtype: DType; shape: number[]; produce(): Uint8Array; requiresGrad?: boolean; isParameter?: boolean }): NewTensor {
  return new NewTensor(t.dtype, t.shape, () => t.produce(), t.requiresGrad ?? false, t.isParameter ?? false);
}

export function contiguousStrides(shape: number[]): number[] {
  const st = new Array<number>(shape.length);
  let acc = 1;
  for (let i = shape.length - 1; i >= 0; i--) {
    st[i] = acc;
    acc *= shape[i];
  }
  return st;
}

/** Whether the view is C-contiguous (dimensions of size 1 may have any stride). */
export function isContiguous(t: { shape: number[]; stride: number[] }): boolean {
  let acc = 1;
  for (let i = t.shape.length - 1; i >= 0; i--) {
    if (t.shape[i] !== 1 && t.stride[i] !== acc) return t.shape.some((d) => d === 0);
    acc *= t.shape[i];
  }
  return true;
}

/**
 * Checks that a view fits its storage: shape/stride are non-negative safe integers and the last
 * element it can address lies inside the storage's `numel` elements. Throws a FormatError.
 */
export function checkView(storage: { numel: number; key: string; source?: ByteSource }, offset: number, shape: number[], stride: number[]): void {
  const file = storage.source?.name;
  if (shape.length !== stride.length) throw new FormatError(`tensor on storage ${storage.key} has ${shape.length} sizes but ${stride.length} strides.`, file);
  if (!Number.isSafeInteger(offset) || offset < 0) throw new FormatError(`tensor on storage ${storage.key} has an invalid storage offset ${offset}.`, file);
  let numel = 1;
  let last = offset;
  for (let i = 0; i < shape.length; i++) {
    const d = shape[i];
    const s = stride[i];
    if (!Number.isSafeInteger(d) || d < 0 || !Number.isSafeInteger(s) || s < 0) {
      throw new FormatError(`tensor on storage ${storage.key} has an invalid size/stride (${shape.join(', ')}) / (${stride.join(', ')}).`, file);
    }
    numel *= d;
    if (!Number.isSafeInteger(numel)) throw new FormatError(`tensor on storage ${storage.key} has too many elements.`, file);
  }
  if (numel === 0) return;
  for (let i = 0; i < shape.length; i++) last += (shape[i] - 1) * stride[i];
  if (!Number.isSafeInteger(last) || last >= storage.numel) {
    throw new FormatError(
      `tensor of shape [${shape.join(', ')}] at offset ${offset} on storage ${storage.key} needs element ${last}, but the storage has ${storage.numel} elements.`,
      file,
    );
  }
}

/** Largest broadcast (stride-0) view readTensorBytes expands in memory: 64 MiB. */
export const MAX_EXPANDED_BYTES = 64 << 20;

/** The tensor's elements as C-ordered little-endian bytes the caller owns. Reads only the bytes the view spans. */
export function readTensorBytes(t: TorchTensor | NewTensor): Uint8Array {
  if (t instanceof NewTensor) {
    const b = t.storage.produce();
    const want = t.numel * (dtypeSize(t.dtype) ?? 1);
    if (b.length !== want) throw new FormatError(`a new tensor of shape [${t.shape.join(', ')}] produced ${b.length} bytes; ${want} expected.`);
    return b;
  }
  const st = t.storage;
  const es = st.elementSize;
  const numel = t.numel;
  if (numel === 0) return new Uint8Array(0);
  checkView(st, t.storageOffset, t.shape, t.stride);
  if (st.offset < 0) throw new FormatError(`storage ${st.key} has no data location.`, st.source.name);
  if (isContiguous(t)) return st.source.readOwned(st.offset + t.storageOffset * es, numel * es);
  // Gather: read the span the view covers (bounded by the storage), then copy element by element,
  // or run by run when the innermost dimension is contiguous.
  let lastIndex = t.storageOffset;
  for (let i = 0; i < t.shape.length; i++) lastIndex += (t.shape[i] - 1) * t.stride[i];
  const spanElements = lastIndex - t.storageOffset + 1;
  // A broadcast view (stride 0) names more elements than the file stores: expanding a few bytes
  // into gigabytes is what a hostile file would ask for.
  if (numel > spanElements && numel * es > MAX_EXPANDED_BYTES) {
    throw new FormatError(
      `tensor of shape [${t.shape.join(', ')}] on storage ${st.key} is a broadcast view of ${numel} elements over ${spanElements} stored ones; refusing to expand it to ${numel * es} bytes.`,
      st.source.name,
    );
  }
  const span = st.source.readOwned(st.offset + t.storageOffset * es, spanElements * es);
  const out = new Uint8Array(numel * es);
  const nd = t.shape.length;
  const inner = nd > 0 && t.stride[nd - 1] === 1 ? t.shape[nd - 1] : 1;
  const outerDims = inner > 1 ? nd - 1 : nd;
  const idx = new Array<number>(outerDims).fill(0);
  let src = 0;
  const runBytes = inner * es;
  for (let o = 0; o < numel; o += inner) {
    out.set(span.subarray(src * es, src * es + runBytes), o * es);
    for (let d = outerDims - 1; d >= 0; d--) {
      idx[d]++;
      src += t.stride[d];
      if (idx[d] < t.shape[d]) break;
      src -= t.stride[d] * t.shape[d];
      idx[d] = 0;
    }
  }
  return out;
}

/** The tensor's elements widened exactly to JS numbers (float16/bfloat16 → float32, int64 → number). */
export function readTensor(t: TorchTensor | NewTensor): NumArray {
  const name = t instanceof TorchTensor ? t.storage.source.name : undefined;
  try {
    return decodeNumbers(readTensorBytes(t), t.dtype, name);
  } catch (err) {
    if (err instanceof FormatError) throw err;
    const msg = (err as Error).message;
    throw new FormatError(name && msg.startsWith(`${name}: `) ? msg.slice(name.length + 2) : msg, name);
  }
}
