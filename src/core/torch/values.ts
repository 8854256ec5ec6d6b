// The values an unpickled PyTorch file is made of. Nothing here is executable: a Python object the
// reader does not map to plain data stays an inert PyObject that only remembers how it was built.
import { DType, dtypeSize } from '../dtype';
import type { NewStorage, NewTensor, TorchStorage, TorchTensor } from './tensor';

/**
 * One unpickled value. Python ints are JS numbers (BigInt beyond ±2^53), floats are numbers except
 * integral floats (2.0), which are PyFloat so they are written back as floats; str is string,
 * bytes/bytearray are Uint8Array, list is an array.
 */
export type PyValue =
  | null
  | boolean
  | number
  | bigint
  | string
  | Uint8Array
  | PyValue[]
  | PyTuple
  | PyDict
  | PySet
  | PyObject
  | PyGlobal
  | PyBoundMethod
  | PyFloat
  | PySlice
  | PyComplex
  | NdArray
  | NumpyDType
  | NumpyScalar
  | TorchTensor
  | TorchStorage
  | NewTensor
  | NewStorage;

/** A Python float whose value is integral (2.0, -0.0): kept apart from ints so it is written back as a float. */
export class PyFloat {
  constructor(readonly value: number) {}
}

export class PyTuple {
  /** `torch.Size` when the tuple was built by torch.Size(...); written back the same way. */
  tag?: 'torch.Size';
  constructor(readonly items: PyValue[]) {}
  get length(): number {
    return this.items.length;
  }
}

/** A reference to a module-level name (class, function, dtype) that was NOT called. */
export class PyGlobal {
  constructor(
    readonly module: string,
    readonly name: string,
  ) {}
  get qualname(): string {
    return `${this.module}.${this.name}`;
  }
}

/**
 * A bound method stored as an instance attribute: `module.forward = module.forward_fuse`, which the
 * official fuse() of YOLO repos does. Python pickles it as `getattr(module, 'forward_fuse')`
 * (GLOBAL builtins.getattr, the module itself from the memo, REDUCE); the reader accepts that one
 * shape only (see pickle.ts) and keeps it inert, and the writer emits it the same way.
 */
export class PyBoundMethod {
  constructor(
    readonly self: PyObject,
    readonly name: string,
  ) {}
}

/** Method names a PyBoundMethod may carry: a plain identifier, never a dunder or private name. */
export const BOUND_METHOD_NAME = /^[A-Za-z][A-Za-z0-9_]{0,63}$/;

export type PyObjectHow = 'reduce' | 'newobj' | 'newobj_ex' | 'inst' | 'obj';

/**
 * An object the pickle asked to construct and that RepFuse did not construct: the callable's
 * qualified name, its arguments and whatever BUILD / APPENDS / SETITEMS gave it.
 */
export class PyObject {
  state?: PyValue;
  listItems?: PyValue[];
  dictItems?: [PyValue, PyValue][];
  /** For REDUCE of something that is not a global (e.g. the result of another call): that value. */
  callee?: PyValue;
  constructor(
    public module: string,
    public name: string,
    public how: PyObjectHow,
    public args: PyValue[],
    public kwargs?: PyValue,
  ) {}
  get qualname(): string {
    return this.module ? `${this.module}.${this.name}` : this.name;
  }
  /** The class the object is an instance of, as far as the pickle says (copyreg._reconstructor's first argument). */
  get className(): string {
    if (this.module === 'copyreg' && this.name === '_reconstructor' && this.args[0] instanceof PyGlobal) return this.args[0].qualname;
    return this.qualname;
  }
}

export class PySlice {
  constructor(
    readonly start: PyValue,
    readonly stop: PyValue,
    readonly step: PyValue,
  ) {}
}

export class PyComplex {
  constructor(
    readonly re: number,
    readonly im: number,
  ) {}
}

/**
 * A key for hashing dict keys / set items the way Python compares them (1 == 1.0 == True);
 * undefined = compare by identity. Tuples are keyed by their items, within a size budget so that
 * hostile nested tuples cannot blow up.
 */
export function hashKey(k: PyValue): string | undefined {
  const budget = { left: 4096 };
  return keyOf(k, budget);
}

function keyOf(k: PyValue, budget: { left: number }): string | undefined {
  if (--budget.left < 0) return undefined;
  if (k === null) return 'N';
  let out: string | undefined;
  switch (typeof k) {
    case 'boolean':
      return k ? 'n:1' : 'n:0';
    case 'number':
      return `n:${k}`;
    case 'bigint':
      return `n:${Number.isSafeInteger(Number(k)) ? Number(k) : k.toString()}`;
    case 'string':
      out = `s:${k}`;
      break;
    default:
      if (k instanceof PyFloat) return `n:${k.value}`;
      if (k instanceof Uint8Array) out = `b:${Buffer.from(k.buffer, k.byteOffset, k.length).toString('latin1')}`;
      else if (k instanceof PyTuple) {
        let s = 't(';
        for (const it of k.items) {
          const h = keyOf(it, budget);
          if (h === undefined) return undefined;
          s += `${h.length}:${h}`;
          budget.left -= h.length;
          if (budget.left < 0) return undefined;
        }
        return `${s})`;
      }
  }
  return out;
}

/** The index key of a dict key / set item: its hash string, or the object itself (identity). */
function indexKey(k: PyValue): unknown {
  return hashKey(k) ?? k;
}

/** A Python dict or collections.OrderedDict: insertion-ordered, any hashable key. */
export class PyDict {
  /** Instance state set by BUILD (OrderedDict's `_metadata` in state_dicts). */
  state?: PyValue;
  private readonly ks: PyValue[] = [];
  private readonly vs: PyValue[] = [];
  private readonly index = new Map<unknown, number>();
  constructor(public ordered = false) {}

  static from(entries: Iterable<[PyValue, PyValue]>, ordered = false): PyDict {
    const d = new PyDict(ordered);
    for (const [k, v] of entries) d.set(k, v);
    return d;
  }

  get size(): number {
    return this.ks.length;
  }

  /** Sets a value; an existing equal key keeps its position (as in Python). */
  set(key: PyValue, value: PyValue): void {
    const h = indexKey(key);
    const i = this.index.get(h);
    if (i !== undefined) {
      this.vs[i] = value;
      return;
    }
    this.index.set(h, this.ks.length);
    this.ks.push(key);
    this.vs.push(value);
  }

  get(key: PyValue): PyValue | undefined {
    const i = this.index.get(indexKey(key));
    return i === undefined ? undefined : this.vs[i];
  }

  has(key: PyValue): boolean {
    return this.index.has(indexKey(key));
  }

  /** Removes a key, keeping the order of the others. Returns whether it was there. */
  delete(key: PyValue): boolean {
    const i = this.index.get(indexKey(key));
    if (i === undefined) return false;
    this.ks.splice(i, 1);
    this.vs.splice(i, 1);
    this.index.clear();
    this.ks.forEach((k, j) => this.index.set(indexKey(k), j));
    return true;
  }

  keys(): PyValue[] {
    return this.ks.slice();
  }

  values(): PyValue[] {
    return this.vs.slice();
  }

  *entries(): IterableIterator<[PyValue, PyValue]> {
    for (let i = 0; i < this.ks.length; i++) yield [this.ks[i], this.vs[i]];
  }

  [Symbol.iterator](): IterableIterator<[PyValue, PyValue]> {
    return this.entries();
  }
}

export class PySet {
  readonly items: PyValue[] = [];
  private readonly index = new Set<unknown>();
  constructor(
    items: Iterable<PyValue> = [],
    readonly frozen = false,
  ) {
    for (const v of items) this.add(v);
  }
  add(v: PyValue): void {
    const h = indexKey(v);
    if (this.index.has(h)) return;
    this.index.add(h);
    this.items.push(v);
  }
  has(v: PyValue): boolean {
    return this.index.has(indexKey(v));
  }
  get size(): number {
    return this.items.length;
  }
}

const NUMPY_KINDS: Record<string, DType> = {
  f2: DType.float16, f4: DType.float32, f8: DType.float64,
  i1: DType.int8, i2: DType.int16, i4: DType.int32, i8: DType.int64,
  u1: DType.uint8, u2: DType.uint16, u4: DType.uint32, u8: DType.uint64,
  b1: DType.bool, c8: DType.complex64, c16: DType.complex128,
};

/** numpy.dtype(descr, align, copy) plus the state BUILD gave it. */
export class NumpyDType {
  /** '<', '>', '|' or '=' (from the BUILD state; '<' assumed until then for multi-byte types). */
  byteorder = '|';
  state?: PyValue;
  constructor(
    readonly descr: string,
    readonly args: PyValue[] = [],
    readonly module = 'numpy',
  ) {
    const t = this.dtype;
    if (t !== undefined && (dtypeSize(t) ?? 1) > 1) this.byteorder = '<';
  }
  /** The element type, when it is a plain number type RepFuse knows. */
  get dtype(): DType | undefined {
    return Object.prototype.hasOwnProperty.call(NUMPY_KINDS, this.descr) ? NUMPY_KINDS[this.descr] : undefined;
  }
  get itemsize(): number | undefined {
    const t = this.dtype;
    return t === undefined ? undefined : dtypeSize(t);
  }
}

/** A numpy.ndarray rebuilt from numpy.core.multiarray._reconstruct + BUILD: inert bytes plus shape and dtype. */
export class NdArray {
  shape: number[] = [];
  dtype?: NumpyDType;
  fortran = false;
  /** Raw bytes for number arrays; a list of items for object arrays. */
  data: Uint8Array | PyValue[] = new Uint8Array(0);
  /** The BUILD state's format version (1 for current numpy), to write it back the same way. */
  stateVersion?: number;
  constructor(
    /** The class passed to _reconstruct (numpy.ndarray, or a subclass named by the pickle). */
    readonly cls: PyValue,
    /** The module _reconstruct came from (numpy.core.multiarray or numpy._core.multiarray). */
    readonly reconstructModule = 'numpy.core.multiarray',
    readonly reconstructArgs: PyValue[] = [],
  ) {}
}

/** The numeric value of an int/float/bool pickle value (PyFloat unwrapped, BigInt converted), else undefined. */
export function pyNumber(v: PyValue | undefined): number | undefined {
  if (v instanceof NumpyScalar) return pyNumber(v.value);
  if (typeof v === 'number') return v;
  if (typeof v === 'boolean') return v ? 1 : 0;
  if (typeof v === 'bigint') return Number(v);
  if (v instanceof PyFloat) return v.value;
  return undefined;
}

/** Items of a list or tuple, else undefined. */
export function pySequence(v: PyValue | undefined): PyValue[] | undefined {
  if (Array.isArray(v)) return v;
  if (v instanceof PyTuple) return v.items;
  return undefined;
}

/** A short description of a value's type, for messages. */
export function pyTypeName(v: PyValue | undefined): string {
  if (v === undefined) return 'nothing';
  if (v === null) return 'None';
  switch (typeof v) {
    case 'boolean':
      return 'bool';
    case 'number':
      return Number.isInteger(v) ? 'int' : 'float';
    case 'bigint':
      return 'int';
    case 'string':
      return 'str';
  }
  if (v instanceof Uint8Array) return 'bytes';
  if (Array.isArray(v)) return 'list';
  if (v instanceof PyObject) return v.className;
  if (v instanceof PyGlobal) return v.qualname;
  if (v instanceof PyBoundMethod) return `bound method ${v.self.className}.${v.name}`;
  return (v as object).constructor.name;
}

/**
 * A numpy scalar (`numpy.float64(0.5)`, common in YOLO checkpoints' `best_fitness`): its decoded
 * value for readers, and its dtype and raw bytes so a rewritten checkpoint keeps it a numpy scalar.
 */
export class NumpyScalar {
  constructor(
    readonly dtype: NumpyDType,
    readonly data: Uint8Array,
    readonly value: PyValue,
    /** numpy.core.multiarray (numpy 1) or numpy._core.multiarray (numpy 2). */
    readonly module = 'numpy.core.multiarray',
  ) {}
}
