// Python pickles (protocols 0–5) read by EMULATION: every opcode is interpreted over plain data and
// nothing named by the file is ever imported or called. A small allow-list maps the globals that
// PyTorch/NumPy files need (OrderedDict, tensor rebuild functions, storage types, numpy scalars…)
// to data; every other call becomes an inert PyObject, and dangerous names are reported.
// Also a protocol-2 writer that produces what torch.save's pickler produces.
import { BufferSource, type ByteSource, GrowableBytes } from '../bytes';
import { DType, dtypeSize } from '../dtype';
import { FormatError, RepFuseError } from '../errors';
import { checkView, NewStorage, NewTensor, TorchStorage, TorchTensor } from './tensor';
import {
  BOUND_METHOD_NAME,
  NdArray,
  NumpyDType,
  NumpyScalar,
  PyComplex,
  PyBoundMethod,
  PyDict,
  PyFloat,
  PyGlobal,
  PyObject,
  type PyObjectHow,
  PySet,
  PySlice,
  PyTuple,
  type PyValue,
  pyNumber,
  pySequence,
  pyTypeName,
} from './values';

export * from './values';

// ---------------------------------------------------------------------------------------------
// Opcodes

const OP = {
  MARK: 0x28, STOP: 0x2e, POP: 0x30, POP_MARK: 0x31, DUP: 0x32, FLOAT: 0x46, INT: 0x49, BININT: 0x4a,
  BININT1: 0x4b, LONG: 0x4c, BININT2: 0x4d, NONE: 0x4e, PERSID: 0x50, BINPERSID: 0x51, REDUCE: 0x52,
  STRING: 0x53, BINSTRING: 0x54, SHORT_BINSTRING: 0x55, UNICODE: 0x56, BINUNICODE: 0x58, APPEND: 0x61,
  BUILD: 0x62, GLOBAL: 0x63, DICT: 0x64, EMPTY_DICT: 0x7d, APPENDS: 0x65, GET: 0x67, BINGET: 0x68,
  INST: 0x69, LONG_BINGET: 0x6a, LIST: 0x6c, EMPTY_LIST: 0x5d, OBJ: 0x6f, PUT: 0x70, BINPUT: 0x71,
  LONG_BINPUT: 0x72, SETITEM: 0x73, TUPLE: 0x74, EMPTY_TUPLE: 0x29, SETITEMS: 0x75, BINFLOAT: 0x47,
  PROTO: 0x80, NEWOBJ: 0x81, EXT1: 0x82, EXT2: 0x83, EXT4: 0x84, TUPLE1: 0x85, TUPLE2: 0x86, TUPLE3: 0x87,
  NEWTRUE: 0x88, NEWFALSE: 0x89, LONG1: 0x8a, LONG4: 0x8b, BINBYTES: 0x42, SHORT_BINBYTES: 0x43,
  SHORT_BINUNICODE: 0x8c, BINUNICODE8: 0x8d, BINBYTES8: 0x8e, EMPTY_SET: 0x8f, ADDITEMS: 0x90,
  FROZENSET: 0x91, NEWOBJ_EX: 0x92, STACK_GLOBAL: 0x93, MEMOIZE: 0x94, FRAME: 0x95, BYTEARRAY8: 0x96,
  NEXT_BUFFER: 0x97, READONLY_BUFFER: 0x98,
} as const;

// ---------------------------------------------------------------------------------------------
// Names

/** Python 2 module names Python 3's unpickler maps (fix_imports; the ones that matter here). */
const PY2_MODULES: Record<string, string> = {
  __builtin__: 'builtins', copy_reg: 'copyreg', exceptions: 'builtins', commands: 'subprocess', cPickle: 'pickle',
  urllib2: 'urllib.request', httplib: 'http.client', Queue: 'queue', SocketServer: 'socketserver', repr: 'reprlib',
  __main__: '__main__',
};
/** Platform modules behind `os` functions (os.system is pickled as posix.system or nt.system). */
const OS_ALIASES = new Set(['posix', 'nt']);
/** And back, for protocol-2 output (what Python 3's pickler writes). */
const PY3_TO_PY2: Record<string, string> = { builtins: '__builtin__', copyreg: 'copy_reg' };

function py2Module(module: string): string {
  return Object.prototype.hasOwnProperty.call(PY3_TO_PY2, module) ? PY3_TO_PY2[module] : module;
}

const DANGEROUS_MODULES = [
  'os', 'posix', 'nt', 'subprocess', 'sys', 'shutil', 'socket', 'pty', 'commands', 'ctypes', 'importlib',
  'runpy', 'code', 'codeop', 'pdb', 'bdb', 'marshal', 'pickle', '_pickle', 'cPickle', 'dill', 'shelve',
  'webbrowser', 'multiprocessing', 'asyncio', 'signal', 'platform', 'timeit', 'pydoc', 'tempfile', 'io', '_io',
  'urllib', 'urllib2', 'http', 'httplib', 'ftplib', 'smtplib', 'telnetlib', 'requests',
  'threading', '_thread', 'zipimport', 'imp', 'site', 'ensurepip', 'pip', 'types', 'inspect', 'gc',
];
const DANGEROUS_BUILTINS = new Set([
  'eval', 'exec', 'execfile', 'compile', 'open', 'file', 'getattr', 'setattr', 'delattr', '__import__',
  'input', 'raw_input', 'breakpoint', 'globals', 'locals', 'vars', 'apply', 'reload', 'exit', 'quit', 'help',
  'memoryview', 'classmethod', 'staticmethod', 'property', 'super', 'type',
]);
const DANGEROUS_NAMES = new Set([
  'operator.attrgetter', 'operator.methodcaller', 'operator.itemgetter', 'functools.partial', 'functools.reduce',
  'torch.load', 'torch.hub.load', 'torch.jit.load', 'torch.storage._load_from_bytes', 'torch.serialization.load',
  'numpy.load', 'numpy.testing._private.utils.runstring', 'numpy.lib.npyio.load', 'torch._C._jit_compile',
]);

/** Whether naming this global in a pickle is a red flag (running it could execute code or touch the system). */
export function isDangerousGlobal(module: string, name: string): boolean {
  if (module === 'builtins') return DANGEROUS_BUILTINS.has(name);
  if (DANGEROUS_NAMES.has(`${module}.${name}`)) return true;
  const top = module.split('.')[0];
  return DANGEROUS_MODULES.includes(top);
}

/** `torch.float16` and friends → element type. */
export const TORCH_DTYPES: Record<string, DType> = {
  float16: DType.float16, half: DType.float16, float32: DType.float32, float: DType.float32,
  float64: DType.float64, double: DType.float64, bfloat16: DType.bfloat16, int64: DType.int64, long: DType.int64,
  int32: DType.int32, int: DType.int32, int16: DType.int16, short: DType.int16, int8: DType.int8,
  uint8: DType.uint8, bool: DType.bool, complex64: DType.complex64, cfloat: DType.complex64,
  complex128: DType.complex128, cdouble: DType.complex128, uint16: DType.uint16, uint32: DType.uint32, uint64: DType.uint64,
};

/** The element type a `torch.<dtype>` global names, else undefined. */
export function torchDTypeOf(v: PyValue | undefined): DType | undefined {
  if (!(v instanceof PyGlobal) || v.module !== 'torch') return undefined;
  return Object.prototype.hasOwnProperty.call(TORCH_DTYPES, v.name) ? TORCH_DTYPES[v.name] : undefined;
}

// ---------------------------------------------------------------------------------------------
// Reader

export interface UnpickleOptions {
  /** Resolves a persistent id (BINPERSID/PERSID), e.g. torch's ('storage', type, key, location, numel). */
  persistentLoad?: (pid: PyValue, offset: number) => PyValue;
  /** Where the pickle starts in the source (default 0) and the most it may span (default: to the end). */
  start?: number;
  end?: number;
  /** Limits: stack items, memo entries, nested MARKs (defaults 4M, 4M, 10000). */
  maxStack?: number;
  maxMemo?: number;
  maxMarks?: number;
}

export interface UnpickleResult {
  value: PyValue;
  /** Offset just past the STOP opcode. */
  end: number;
  /** Highest PROTO seen (0 when none). */
  protocol: number;
  /** One line per dangerous global the file names: "the file references os.system: not executed". */
  warnings: string[];
  /** The dangerous globals themselves (module.name as written in the file). */
  dangerous: string[];
  /** Every global the pickle names, as written in the file (module.name, Python 2 names unmapped), in first-seen order. */
  globals: string[];
}

const CHUNK = 16384;

/** Sequential reads over a ByteSource range, through small cached chunks. */
class Cursor {
  pos: number;
  private chunk: Uint8Array = new Uint8Array(0);
  private chunkStart = 0;
  constructor(
    readonly src: ByteSource,
    start: number,
    readonly end: number,
    private readonly onTruncated: (need: number) => never,
  ) {
    this.pos = start;
  }

  get remaining(): number {
    return this.end - this.pos;
  }

  u8(): number {
    let i = this.pos - this.chunkStart;
    if (i < 0 || i >= this.chunk.length) {
      if (this.pos >= this.end) this.onTruncated(1);
      this.chunk = this.src.read(this.pos, Math.min(CHUNK, this.end - this.pos));
      this.chunkStart = this.pos;
      i = 0;
    }
    this.pos++;
    return this.chunk[i];
  }

  /** `n` bytes; a view that is valid until the next read (copy to keep). Checked against the range first. */
  take(n: number): Uint8Array {
    if (!Number.isSafeInteger(n) || n < 0 || n > this.end - this.pos) this.onTruncated(n);
    if (n > CHUNK * 4) {
      const b = this.src.readOwned(this.pos, n);
      this.pos += n;
      return b;
    }
    let i = this.pos - this.chunkStart;
    if (i < 0 || i + n > this.chunk.length) {
      this.chunk = this.src.read(this.pos, Math.min(Math.max(n, CHUNK), this.end - this.pos));
      this.chunkStart = this.pos;
      i = 0;
    }
    this.pos += n;
    return this.chunk.subarray(i, i + n);
  }

  /** Bytes up to (not including) the next '\n', which is consumed. */
  line(max: number): Uint8Array {
    const parts: Uint8Array[] = [];
    let total = 0;
    for (;;) {
      const avail = Math.min(CHUNK, this.end - this.pos);
      if (avail <= 0) this.onTruncated(1);
      const b = this.take(avail);
      const nl = b.indexOf(0x0a);
      if (nl >= 0) {
        this.pos -= avail - nl - 1;
        parts.push(b.slice(0, nl));
        total += nl;
        break;
      }
      parts.push(b.slice());
      total += b.length;
      if (total > max) throw new FormatError(`a pickle text line is longer than ${max} bytes.`, this.src.name);
    }
    return parts.length === 1 ? parts[0] : Buffer.concat(parts);
  }
}

const utf8 = new TextDecoder('utf-8');
const utf8Strict = new TextDecoder('utf-8', { fatal: true });

function latin1(b: Uint8Array): string {
  return Buffer.from(b.buffer, b.byteOffset, b.length).toString('latin1');
}

/** A Python 2 `str`: text when it is valid UTF-8 (ASCII in practice), else the bytes themselves. */
function py2Str(b: Uint8Array): string | Uint8Array {
  let ascii = true;
  for (let i = 0; i < b.length; i++) {
    if (b[i] > 0x7f) {
      ascii = false;
      break;
    }
  }
  if (ascii) return latin1(b);
  try {
    return utf8Strict.decode(b);
  } catch {
    return b.slice();
  }
}

/** Bytes of a value used as raw data (numpy payloads): bytes as is; a Python 2 str back to its bytes. */
function asBytes(v: PyValue): Uint8Array | undefined {
  if (v instanceof Uint8Array) return v;
  if (typeof v === 'string') return Buffer.from(v, 'utf8');
  return undefined;
}

/** Integers exactly: a number when it is a safe integer, else a BigInt. */
function normInt(v: bigint): number | bigint {
  return v >= -9007199254740991n && v <= 9007199254740991n ? Number(v) : v;
}

/** Little-endian two's complement (pickle LONG1/LONG4). */
export function decodeLong(b: Uint8Array): number | bigint {
  const n = b.length;
  if (n === 0) return 0;
  if (n <= 6) {
    let v = 0;
    for (let i = n - 1; i >= 0; i--) v = v * 256 + b[i];
    if (b[n - 1] & 0x80) v -= 2 ** (8 * n);
    return v;
  }
  let hex = '';
  for (let i = n - 1; i >= 0; i--) hex += b[i].toString(16).padStart(2, '0');
  let v = BigInt(`0x${hex}`);
  if (b[n - 1] & 0x80) v -= 1n << BigInt(8 * n);
  return normInt(v);
}

function pyFloat(v: number): number | PyFloat {
  return Number.isInteger(v) ? new PyFloat(v) : v;
}

/** Undoes Python's repr escapes of a protocol-0 STRING (codecs.escape_decode). */
function escapeDecode(b: Uint8Array): Uint8Array {
  const out: number[] = [];
  for (let i = 0; i < b.length; i++) {
    const c = b[i];
    if (c !== 0x5c || i + 1 >= b.length) {
      out.push(c);
      continue;
    }
    const e = String.fromCharCode(b[++i]);
    const simple: Record<string, number> = { '\\': 0x5c, "'": 0x27, '"': 0x22, a: 7, b: 8, f: 12, n: 10, r: 13, t: 9, v: 11 };
    if (e in simple) out.push(simple[e]);
    else if (e === '\n') continue;
    else if (e === 'x' && i + 2 < b.length + 1) {
      const h = parseInt(String.fromCharCode(b[i + 1], b[i + 2]), 16);
      if (Number.isNaN(h)) throw new FormatError('invalid \\x escape in a pickle STRING.');
      out.push(h);
      i += 2;
    } else if (e >= '0' && e <= '7') {
      let s = e;
      while (s.length < 3 && i + 1 < b.length && b[i + 1] >= 0x30 && b[i + 1] <= 0x37) s += String.fromCharCode(b[++i]);
      out.push(parseInt(s, 8) & 0xff);
    } else out.push(0x5c, b[i]);
  }
  return Uint8Array.from(out);
}

/** Python's raw-unicode-escape (protocol-0 UNICODE): \uXXXX and \UXXXXXXXX escapes, other bytes latin-1. */
function rawUnicodeDecode(b: Uint8Array): string {
  let s = '';
  for (let i = 0; i < b.length; i++) {
    if (b[i] === 0x5c && i + 1 < b.length && (b[i + 1] === 0x75 || b[i + 1] === 0x55)) {
      const len = b[i + 1] === 0x75 ? 4 : 8;
      const hex = latin1(b.subarray(i + 2, i + 2 + len));
      const cp = hex.length === len && /^[0-9a-fA-F]+$/.test(hex) ? parseInt(hex, 16) : NaN;
      if (Number.isNaN(cp) || cp > 0x10ffff) throw new FormatError('invalid \\u escape in a pickle UNICODE string.');
      s += String.fromCodePoint(cp);
      i += 1 + len;
    } else s += String.fromCharCode(b[i]);
  }
  return s;
}

function parsePyInt(text: string): number | bigint | undefined {
  const t = text.trim().replace(/L$/, '');
  if (!/^[+-]?\d+$/.test(t)) return undefined;
  return normInt(BigInt(t));
}

function parsePyFloatText(text: string): number | undefined {
  const t = text.trim().toLowerCase();
  if (t === 'inf' || t === '+inf' || t === 'infinity') return Infinity;
  if (t === '-inf' || t === '-infinity') return -Infinity;
  if (t === 'nan' || t === '+nan' || t === '-nan') return NaN;
  if (!/^[+-]?(\d+\.?\d*|\.\d+)(e[+-]?\d+)?$/.test(t)) return undefined;
  return Number(t);
}

type Handler = (u: Unpickler, args: PyValue[], fn: PyGlobal) => PyValue | undefined;

/** Why a value is not a list of non-negative integers, else the integers. */
function intList(v: PyValue, what: string, u: Unpickler): number[] {
  const seq = pySequence(v);
  if (!seq) u.fail(`${what} is a ${pyTypeName(v)}, not a tuple of integers`);
  return seq.map((x) => {
    const n = typeof x === 'bigint' ? Number(x) : x;
    if (typeof n !== 'number' || !Number.isSafeInteger(n) || n < 0) u.fail(`${what} contains ${String(x)}, not a non-negative integer`);
    return n;
  });
}

function intArg(v: PyValue, what: string, u: Unpickler): number {
  const n = typeof v === 'bigint' ? Number(v) : v;
  if (typeof n !== 'number' || !Number.isSafeInteger(n) || n < 0) u.fail(`${what} is ${pyTypeName(v)} ${String(v)}, not a non-negative integer`);
  return n;
}

function rebuildTensor(u: Unpickler, args: PyValue[], name: string, min: number): TorchTensor {
  if (args.length < min) u.fail(`${name} called with ${args.length} arguments`);
  const storage = args[0];
  if (!(storage instanceof TorchStorage)) u.fail(`${name} called on a ${pyTypeName(storage)}, not a storage`);
  const offset = intArg(args[1], `${name}'s storage offset`, u);
  const shape = intList(args[2], `${name}'s size`, u);
  const stride = intList(args[3], `${name}'s stride`, u);
  checkView(storage, offset, shape, stride);
  const rg = args.length > 4 ? args[4] : false;
  return new TorchTensor(storage, offset, shape, stride, rg === true || rg === 1, false);
}

function encodeText(u: Unpickler, text: PyValue, encoding: PyValue): Uint8Array | undefined {
  if (typeof text !== 'string') return asBytes(text);
  const enc = typeof encoding === 'string' ? encoding.toLowerCase().replace(/_/g, '-') : 'utf-8';
  if (['latin1', 'latin-1', 'iso-8859-1', 'iso8859-1', 'l1'].includes(enc)) {
    for (let i = 0; i < text.length; i++) if (text.charCodeAt(i) > 0xff) u.fail('a latin-1 byte string contains a character above U+00FF');
    return Uint8Array.from(Buffer.from(text, 'latin1'));
  }
  if (['utf8', 'utf-8', 'ascii', 'us-ascii'].includes(enc)) return Uint8Array.from(Buffer.from(text, 'utf8'));
  return undefined;
}

function decodeNumpyScalar(u: Unpickler, dt: NumpyDType, data: Uint8Array): PyValue | undefined {
  const t = dt.dtype;
  const size = dt.itemsize;
  if (t === undefined || size === undefined) return undefined;
  if (data.length !== size) u.fail(`numpy scalar of type ${dt.descr} has ${data.length} bytes`);
  const b = dt.byteorder === '>' ? data.slice().reverse() : data;
  const v = new DataView(b.buffer, b.byteOffset, b.length);
  switch (t) {
    case DType.float64:
      return pyFloat(v.getFloat64(0, true));
    case DType.float32:
      return pyFloat(v.getFloat32(0, true));
    case DType.float16: {
      const h = v.getUint16(0, true);
      const s = h & 0x8000 ? -1 : 1;
      const e = (h >> 10) & 0x1f;
      const m = h & 0x3ff;
      const x = e === 0 ? s * m * 2 ** -24 : e === 31 ? (m ? NaN : s * Infinity) : s * (1 + m / 1024) * 2 ** (e - 15);
      return pyFloat(x);
    }
    case DType.int64:
      return normInt(v.getBigInt64(0, true));
    case DType.uint64:
      return normInt(v.getBigUint64(0, true));
    case DType.int32:
      return v.getInt32(0, true);
    case DType.uint32:
      return v.getUint32(0, true);
    case DType.int16:
      return v.getInt16(0, true);
    case DType.uint16:
      return v.getUint16(0, true);
    case DType.int8:
      return v.getInt8(0);
    case DType.uint8:
      return v.getUint8(0);
    case DType.bool:
      return v.getUint8(0) !== 0;
    case DType.complex64:
      return new PyComplex(v.getFloat32(0, true), v.getFloat32(4, true));
    case DType.complex128:
      return new PyComplex(v.getFloat64(0, true), v.getFloat64(8, true));
    default:
      return undefined;
  }
}

function fillPairs(u: Unpickler, d: PyDict, src: PyValue | undefined): PyDict {
  if (src === undefined) return d;
  if (src instanceof PyDict) {
    for (const [k, v] of src) d.set(k, v);
    return d;
  }
  const seq = pySequence(src);
  if (!seq) u.fail(`a dict built from a ${pyTypeName(src)}`);
  for (const pair of seq) {
    const kv = pySequence(pair);
    if (!kv || kv.length !== 2) u.fail('a dict built from an item that is not a pair');
    d.set(kv[0], kv[1]);
  }
  return d;
}

function setFrom(u: Unpickler, src: PyValue | undefined, frozen: boolean): PySet {
  if (src === undefined) return new PySet([], frozen);
  const items = src instanceof PySet ? src.items : pySequence(src);
  if (!items) u.fail(`a set built from a ${pyTypeName(src)}`);
  return new PySet(items, frozen);
}

function bytesFrom(u: Unpickler, args: PyValue[]): Uint8Array | undefined {
  if (args.length === 0) return new Uint8Array(0);
  const a = args[0];
  if (typeof a === 'string') return encodeText(u, a, args[1] ?? 'utf-8');
  if (a instanceof Uint8Array) return a.slice();
  const seq = pySequence(a);
  if (seq && seq.every((x) => typeof x === 'number' && Number.isInteger(x) && x >= 0 && x < 256)) return Uint8Array.from(seq as number[]);
  return undefined;
}

const rebuildV2: Handler = (u, a) => {
  const t = rebuildTensor(u, a, '_rebuild_tensor_v2', 5);
  if (a.length > 6) t.metadata = a[6];
  return t;
};

/** Calls the allow-list turns into data. Anything else stays an inert PyObject. */
const CALLS: Record<string, Handler> = {
  'collections.OrderedDict': (u, a) => fillPairs(u, new PyDict(true), a[0]),
  'builtins.dict': (u, a) => fillPairs(u, new PyDict(false), a[0]),
  'builtins.set': (u, a) => setFrom(u, a[0], false),
  'builtins.frozenset': (u, a) => setFrom(u, a[0], true),
  'builtins.slice': (_u, a) => (a.length === 1 ? new PySlice(null, a[0], null) : a.length <= 3 ? new PySlice(a[0] ?? null, a[1] ?? null, a[2] ?? null) : undefined),
  'builtins.complex': (_u, a) => {
    const re = pyNumber(a[0] ?? 0);
    const im = pyNumber(a[1] ?? 0);
    return re === undefined || im === undefined ? undefined : new PyComplex(re, im);
  },
  'builtins.bytes': (u, a) => bytesFrom(u, a),
  'builtins.bytearray': (u, a) => bytesFrom(u, a),
  '_codecs.encode': (u, a) => encodeText(u, a[0], a[1] ?? 'utf-8'),
  'torch._utils._rebuild_tensor': (u, a) => rebuildTensor(u, a, '_rebuild_tensor', 4),
  'torch._utils._rebuild_tensor_v2': rebuildV2,
  'torch._utils._rebuild_tensor_v3': (u, a) => {
    // (storage, offset, size, stride, requires_grad, hooks, dtype[, metadata]): an untyped storage viewed as dtype.
    const dtype = torchDTypeOf(a[6]);
    const st = a[0];
    if (dtype === undefined || !(st instanceof TorchStorage)) return undefined;
    const es = dtypeSize(dtype) ?? 1;
    const typed = new TorchStorage(st.key, dtype, Math.floor(st.byteLength / es), st.location, st.source, st.offset, Math.floor(st.byteLength / es) * es);
    const t = rebuildTensor(u, [typed, ...a.slice(1, 6)], '_rebuild_tensor_v3', 5);
    if (a.length > 7) t.metadata = a[7];
    return t;
  },
  'torch._utils._rebuild_parameter': (u, a) => {
    const data = a[0];
    if (!(data instanceof TorchTensor)) throw u.error(`_rebuild_parameter called on a ${pyTypeName(data)}, not a tensor`);
    return data.asParameter(a[1] === true || a[1] === 1);
  },
  'torch._utils._rebuild_parameter_with_state': (u, a) => {
    const data = a[0];
    if (!(data instanceof TorchTensor)) throw u.error(`_rebuild_parameter_with_state called on a ${pyTypeName(data)}, not a tensor`);
    const p = data.asParameter(a[1] === true || a[1] === 1);
    if (a.length > 3 && a[3] !== null) p.state = a[3];
    return p;
  },
  'torch._tensor._rebuild_from_type_v2': (u, a) => {
    // (func, new_type, args, state): func(*args), then the type and state applied.
    const [func, newType, fargs, state] = a;
    const argv = pySequence(fargs);
    if (!(func instanceof PyGlobal) || !(newType instanceof PyGlobal) || !argv) return undefined;
    const h = handlerFor(func.qualname);
    if (!h || !func.qualname.startsWith('torch._utils._rebuild_tensor')) return undefined;
    const t = h(u, argv, func);
    if (!(t instanceof TorchTensor)) return undefined;
    let out = t;
    if (newType.qualname === 'torch.nn.parameter.Parameter') out = t.asParameter(t.requiresGrad);
    else if (newType.qualname !== 'torch.Tensor') return undefined;
    const empty = state === null || state === undefined || (state instanceof PyDict && state.size === 0);
    if (!empty) out.state = state;
    return out;
  },
  'torch.Size': (u, a) => {
    const seq = a.length === 0 ? [] : pySequence(a[0]);
    if (!seq) throw u.error(`torch.Size of a ${pyTypeName(a[0])}`);
    const t = new PyTuple(seq.slice());
    t.tag = 'torch.Size';
    return t;
  },
  'numpy.dtype': (_u, a) => (typeof a[0] === 'string' ? new NumpyDType(a[0], a, 'numpy') : undefined),
  'numpy.core.multiarray.scalar': (u, a, fn) => numpyScalar(u, a, fn.module),
  'numpy._core.multiarray.scalar': (u, a, fn) => numpyScalar(u, a, fn.module),
  'numpy.core.multiarray._reconstruct': (_u, a, fn) => new NdArray(a[0] ?? null, fn.module, a),
  'numpy._core.multiarray._reconstruct': (_u, a, fn) => new NdArray(a[0] ?? null, fn.module, a),
};

/** The allow-list handler for a qualified name (own properties only: names come from the file). */
function handlerFor(qualname: string): Handler | undefined {
  return Object.prototype.hasOwnProperty.call(CALLS, qualname) ? CALLS[qualname] : undefined;
}

function numpyScalar(u: Unpickler, a: PyValue[], module: string): PyValue | undefined {
  const dt = a[0];
  const data = a.length > 1 ? asBytes(a[1]) : undefined;
  if (!(dt instanceof NumpyDType) || !data) return undefined;
  const value = decodeNumpyScalar(u, dt, data);
  return value === undefined ? undefined : new NumpyScalar(dt, data, value, module);
}

/** The emulating unpickler. Use `unpickle()`. */
export class Unpickler {
  private readonly stack: PyValue[] = [];
  private readonly marks: number[] = [];
  private readonly memo = new Map<number, PyValue>();
  private readonly warningSet = new Set<string>();
  private readonly dangerSet = new Set<string>();
  private readonly globalSet = new Set<string>();
  /**
   * `builtins.getattr` globals, judged at STOP rather than when named: the one shape a module's
   * bound-method attribute is pickled in (`forward` → getattr(self, 'forward_fuse'), see
   * boundMethod()) is accepted; any other use is reported as dangerous.
   */
  private readonly getattrs = new Map<PyGlobal, string>();
  private getattrPushes = 0;
  private readonly boundMethods: PyBoundMethod[] = [];
  /** A bound method was called (REDUCE/NEWOBJ/OBJ): loading the file in Python would run it. */
  private boundMethodCalled = false;
  private readonly cur: Cursor;
  private op = 0;
  private opAt = 0;
  private protocol = 0;
  private readonly maxStack: number;
  private readonly maxMemo: number;
  private readonly maxMarks: number;

  constructor(
    private readonly src: ByteSource,
    private readonly opts: UnpickleOptions = {},
  ) {
    const start = opts.start ?? 0;
    const end = Math.min(opts.end ?? src.size, src.size);
    if (start < 0 || start > end) throw new FormatError(`pickle start offset ${start} is outside the file.`, src.name);
    this.cur = new Cursor(src, start, end, (need) => {
      throw new FormatError(
        `the pickle ends unexpectedly at offset ${this.cur.pos} (opcode 0x${hex(this.op)} at offset ${this.opAt} needs ${need} more bytes; ${this.cur.remaining} remain): truncated or corrupt file.`,
        src.name,
      );
    });
    this.maxStack = opts.maxStack ?? 1 << 22;
    this.maxMemo = opts.maxMemo ?? 1 << 22;
    this.maxMarks = opts.maxMarks ?? 10000;
  }

  /** A FormatError naming the current opcode and its offset. */
  error(msg: string): FormatError {
    return new FormatError(`${msg} (pickle opcode 0x${hex(this.op)} at offset ${this.opAt}).`, this.src.name);
  }

  /** Throws error(msg). */
  fail(msg: string): never {
    throw this.error(msg);
  }

  private push(v: PyValue): void {
    if (this.stack.length >= this.maxStack) this.fail(`the pickle stack grows past ${this.maxStack} items`);
    if (this.getattrs.size && v instanceof PyGlobal && this.getattrs.has(v)) this.getattrPushes++;
    this.stack.push(v);
  }

  private base(): number {
    return this.marks.length ? this.marks[this.marks.length - 1] : 0;
  }

  private pop(): PyValue {
    if (this.stack.length <= this.base()) this.fail('pickle stack underflow');
    return this.stack.pop() as PyValue;
  }

  private top(): PyValue {
    if (this.stack.length <= this.base()) this.fail('pickle stack underflow');
    return this.stack[this.stack.length - 1];
  }

  private popMark(): PyValue[] {
    if (!this.marks.length) this.fail('no MARK on the pickle stack');
    const b = this.marks.pop() as number;
    return this.stack.splice(b);
  }

  private u32(): number {
    const b = this.cur.take(4);
    return (b[0] | (b[1] << 8) | (b[2] << 16)) + b[3] * 0x1000000;
  }

  private i32(): number {
    const b = this.cur.take(4);
    return b[0] | (b[1] << 8) | (b[2] << 16) | (b[3] << 24);
  }

  private u64(): number {
    const b = this.cur.take(8);
    const lo = (b[0] | (b[1] << 8) | (b[2] << 16)) + b[3] * 0x1000000;
    const hi = (b[4] | (b[5] << 8) | (b[6] << 16)) + b[7] * 0x1000000;
    if (hi >= 0x200000) this.fail('a pickle length does not fit in 53 bits');
    return hi * 0x100000000 + lo;
  }

  /** Checks a declared length against the bytes left before anything is allocated. */
  private len(n: number, what: string): number {
    if (n < 0 || n > this.cur.remaining) {
      this.fail(`a ${what} of ${n} bytes runs past the end of the pickle (${this.cur.remaining} bytes remain)`);
    }
    return n;
  }

  private text(n: number): string {
    return utf8.decode(this.cur.take(this.len(n, 'string')));
  }

  private lineText(): string {
    return latin1(this.cur.line(Math.min(this.cur.remaining, 1 << 26)));
  }

  private getMemo(i: number): PyValue {
    const v = this.memo.get(i);
    if (v === undefined) this.fail(`memo key ${i} is not defined`);
    return v;
  }

  private putMemo(i: number): void {
    if (!Number.isSafeInteger(i) || i < 0) this.fail(`invalid memo key ${i}`);
    if (!this.memo.has(i) && this.memo.size >= this.maxMemo) this.fail(`the pickle memo grows past ${this.maxMemo} entries`);
    this.memo.set(i, this.top());
  }

  private global(moduleRaw: string, name: string): PyGlobal {
    const module = Object.prototype.hasOwnProperty.call(PY2_MODULES, moduleRaw) ? PY2_MODULES[moduleRaw] : moduleRaw;
    const raw = `${moduleRaw}.${name}`;
    const g = new PyGlobal(module, name);
    if (module === 'builtins' && name === 'getattr') {
      this.globalSet.add(raw);
      this.getattrs.set(g, raw);
      return g;
    }
    if (!this.globalSet.has(raw)) {
      this.globalSet.add(raw);
      if (isDangerousGlobal(module, name)) this.flag(raw, module, name);
    }
    return g;
  }

  private flag(raw: string, module: string, name: string): void {
    this.dangerSet.add(raw);
    const shown = OS_ALIASES.has(module) ? `os.${name}` : `${module}.${name}`;
    this.warningSet.add(shown === raw ? `the file references ${raw}: not executed` : `the file references ${shown} (pickled as ${raw}): not executed`);
  }

  /**
   * REDUCE of `builtins.getattr` with (an instance of a class, 'method_name'): how Python pickles a
   * bound method stored on the instance (torch.save of a YOLO model after fuse(): `forward` →
   * getattr(self, 'forward_fuse')). Kept as an inert PyBoundMethod; whether it really sits in its
   * own object's `forward` attribute is checked at STOP (checkGetattrs). Any other shape: undefined.
   */
  private boundMethod(callable: PyValue, argv: PyValue[]): PyBoundMethod | undefined {
    if (!(callable instanceof PyGlobal) || !this.getattrs.has(callable) || argv.length !== 2) return undefined;
    const [self, name] = argv;
    if (!(self instanceof PyObject) || typeof name !== 'string' || !BOUND_METHOD_NAME.test(name)) return undefined;
    const isInstance = self.how === 'newobj' || (self.how === 'reduce' && self.module === 'copyreg' && self.name === '_reconstructor');
    if (!isInstance || self.callee !== undefined) return undefined;
    const cls = self.className;
    const dot = cls.lastIndexOf('.');
    if (dot <= 0 || isDangerousGlobal(cls.slice(0, dot), cls.slice(dot + 1))) return undefined;
    const bm = new PyBoundMethod(self, name);
    this.boundMethods.push(bm);
    return bm;
  }

  /** Reports every getattr global not used exactly as a module's `forward` bound method. */
  private checkGetattrs(): void {
    if (!this.getattrs.size) return;
    const stored = this.boundMethods.filter((bm) => bm.self.state instanceof PyDict && bm.self.state.get('forward') === bm);
    if (this.boundMethodCalled || this.getattrPushes !== this.boundMethods.length || stored.length !== this.boundMethods.length) {
      for (const raw of new Set(this.getattrs.values())) this.flag(raw, 'builtins', 'getattr');
    }
  }

  private call(callable: PyValue, args: PyValue[], how: PyObjectHow): PyValue {
    if (callable instanceof PyBoundMethod) this.boundMethodCalled = true;
    if (callable instanceof PyGlobal) {
      const h = handlerFor(callable.qualname);
      if (h) {
        const r = h(this, args, callable);
        if (r !== undefined) return r;
      }
      return new PyObject(callable.module, callable.name, how, args);
    }
    const o = new PyObject('', `<call of ${pyTypeName(callable)}>`, how, args);
    o.callee = callable;
    return o;
  }

  private newobj(cls: PyValue, args: PyValue, kwargs?: PyValue): PyValue {
    const argv = pySequence(args);
    if (!argv) this.fail(`NEWOBJ arguments are a ${pyTypeName(args)}, not a tuple`);
    const how: PyObjectHow = kwargs === undefined ? 'newobj' : 'newobj_ex';
    if (!(cls instanceof PyGlobal)) {
      if (cls instanceof PyBoundMethod) this.boundMethodCalled = true;
      const o = new PyObject('', `<instance of ${pyTypeName(cls)}>`, how, argv, kwargs);
      o.callee = cls;
      return o;
    }
    switch (cls.qualname) {
      case 'collections.OrderedDict':
        return new PyDict(true);
      case 'builtins.dict':
        return new PyDict(false);
      case 'builtins.set':
        return new PySet();
      case 'builtins.list':
        return [];
      case 'torch.nn.parameter.Parameter': {
        const data = argv[0];
        if (data instanceof TorchTensor) return data.asParameter(argv.length > 1 ? argv[1] === true || argv[1] === 1 : true);
        break;
      }
    }
    return new PyObject(cls.module, cls.name, how, argv, kwargs);
  }

  private build(inst: PyValue, state: PyValue): void {
    if (inst instanceof PyObject) {
      if (inst.state instanceof PyDict && state instanceof PyDict && inst.state !== state) {
        for (const [k, v] of state) inst.state.set(k, v);
      } else inst.state = state;
      return;
    }
    if (inst instanceof PyDict) {
      inst.state = state;
      return;
    }
    if (inst instanceof TorchTensor) {
      inst.state = state;
      return;
    }
    if (inst instanceof NumpyDType) {
      inst.state = state;
      const s = pySequence(state);
      if (s && typeof s[1] === 'string') inst.byteorder = s[1];
      return;
    }
    if (inst instanceof NdArray) {
      // (version, shape, dtype, is_fortran, data) or the older (shape, dtype, is_fortran, data).
      const s = pySequence(state);
      if (!s || (s.length !== 5 && s.length !== 4)) this.fail('a numpy array BUILD state that is not a 4- or 5-tuple');
      const [shapeV, dtV, fortranV, dataV] = s.length === 5 ? s.slice(1) : s;
      if (s.length === 5) inst.stateVersion = pyNumber(s[0]);
      inst.shape = intList(shapeV, 'numpy array shape', this);
      if (!(dtV instanceof NumpyDType)) this.fail(`a numpy array whose dtype is a ${pyTypeName(dtV)}`);
      inst.dtype = dtV;
      inst.fortran = fortranV === true || fortranV === 1;
      const raw = asBytes(dataV);
      if (raw) {
        const numel = inst.shape.reduce((a, b) => a * b, 1);
        const size = dtV.itemsize;
        if (size !== undefined && raw.length !== numel * size) this.fail(`a numpy array of shape (${inst.shape.join(', ')}) with ${raw.length} data bytes`);
        inst.data = raw;
      } else {
        const items = pySequence(dataV);
        if (!items) this.fail(`numpy array data is a ${pyTypeName(dataV)}`);
        inst.data = items;
      }
      return;
    }
    this.fail(`BUILD on a ${pyTypeName(inst)}`);
  }

  private append(target: PyValue, items: PyValue[]): void {
    if (Array.isArray(target)) {
      for (const it of items) target.push(it);
    } else if (target instanceof PyObject) {
      const list = (target.listItems ??= []);
      for (const it of items) list.push(it); // not push(...items): a long MARK run would overflow the stack
    } else this.fail(`APPEND to a ${pyTypeName(target)}`);
  }

  private setItems(target: PyValue, items: PyValue[]): void {
    if (items.length % 2) this.fail('SETITEMS with an odd number of items');
    if (target instanceof PyDict) {
      for (let i = 0; i < items.length; i += 2) target.set(items[i], items[i + 1]);
    } else if (target instanceof PyObject) {
      const d = (target.dictItems ??= []);
      for (let i = 0; i < items.length; i += 2) d.push([items[i], items[i + 1]]);
    } else this.fail(`SETITEM on a ${pyTypeName(target)}`);
  }

  private persistent(pid: PyValue): PyValue {
    if (!this.opts.persistentLoad) this.fail('the pickle refers to external data (a persistent id) but none is available');
    return this.opts.persistentLoad(pid, this.opAt);
  }

  load(): UnpickleResult {
    const cur = this.cur;
    for (;;) {
      this.opAt = cur.pos;
      if (cur.remaining <= 0) {
        throw new FormatError(`the pickle ends at offset ${cur.pos} without a STOP opcode: truncated or corrupt file.`, this.src.name);
      }
      const op = (this.op = cur.u8());
      switch (op) {
        case OP.PROTO: {
          const v = cur.u8();
          if (v > 5) this.fail(`unsupported pickle protocol ${v}`);
          this.protocol = Math.max(this.protocol, v);
          break;
        }
        case OP.FRAME:
          this.len(this.u64(), 'frame');
          break;
        case OP.STOP: {
          const value = this.pop();
          this.checkGetattrs();
          return {
            value,
            end: cur.pos,
            protocol: this.protocol,
            warnings: [...this.warningSet],
            dangerous: [...this.dangerSet],
            globals: [...this.globalSet],
          };
        }
        case OP.MARK:
          if (this.marks.length >= this.maxMarks) this.fail(`pickle MARKs nest deeper than ${this.maxMarks}`);
          this.marks.push(this.stack.length);
          break;
        case OP.POP:
          if (this.stack.length > this.base()) this.stack.pop();
          else this.popMark();
          break;
        case OP.POP_MARK:
          this.popMark();
          break;
        case OP.DUP:
          this.push(this.top());
          break;
        // --- numbers
        case OP.INT: {
          const t = this.lineText();
          if (t === '00') this.push(false);
          else if (t === '01') this.push(true);
          else {
            const v = parsePyInt(t);
            if (v === undefined) this.fail(`invalid INT literal ${JSON.stringify(t.slice(0, 40))}`);
            this.push(v);
          }
          break;
        }
        case OP.LONG: {
          const t = this.lineText();
          const v = parsePyInt(t);
          if (v === undefined) this.fail(`invalid LONG literal ${JSON.stringify(t.slice(0, 40))}`);
          this.push(v);
          break;
        }
        case OP.BININT:
          this.push(this.i32());
          break;
        case OP.BININT1:
          this.push(cur.u8());
          break;
        case OP.BININT2: {
          const b = cur.take(2);
          this.push(b[0] | (b[1] << 8));
          break;
        }
        case OP.LONG1:
          this.push(decodeLong(cur.take(this.len(cur.u8(), 'long integer'))));
          break;
        case OP.LONG4: {
          const n = this.i32();
          if (n > 1 << 16) this.fail(`a ${n}-byte integer is too large`);
          this.push(decodeLong(cur.take(this.len(n, 'long integer'))));
          break;
        }
        case OP.FLOAT: {
          const t = this.lineText();
          const v = parsePyFloatText(t);
          if (v === undefined) this.fail(`invalid FLOAT literal ${JSON.stringify(t.slice(0, 40))}`);
          this.push(pyFloat(v));
          break;
        }
        case OP.BINFLOAT: {
          const b = cur.take(8);
          this.push(pyFloat(new DataView(b.buffer, b.byteOffset, 8).getFloat64(0, false)));
          break;
        }
        case OP.NONE:
          this.push(null);
          break;
        case OP.NEWTRUE:
          this.push(true);
          break;
        case OP.NEWFALSE:
          this.push(false);
          break;
        // --- strings and bytes
        case OP.STRING: {
          const raw = cur.line(Math.min(cur.remaining, 1 << 30));
          const q = raw[0];
          if (raw.length < 2 || raw[raw.length - 1] !== q || (q !== 0x27 && q !== 0x22)) this.fail('a STRING literal that is not quoted');
          this.push(py2Str(escapeDecode(raw.subarray(1, raw.length - 1))));
          break;
        }
        case OP.BINSTRING:
          this.push(py2Str(cur.take(this.len(this.i32(), 'string'))));
          break;
        case OP.SHORT_BINSTRING:
          this.push(py2Str(cur.take(cur.u8())));
          break;
        case OP.UNICODE:
          this.push(rawUnicodeDecode(cur.line(Math.min(cur.remaining, 1 << 30))));
          break;
        case OP.BINUNICODE:
          this.push(this.text(this.u32()));
          break;
        case OP.SHORT_BINUNICODE:
          this.push(this.text(cur.u8()));
          break;
        case OP.BINUNICODE8:
          this.push(this.text(this.u64()));
          break;
        case OP.BINBYTES:
          this.push(cur.take(this.len(this.u32(), 'bytes object')).slice());
          break;
        case OP.SHORT_BINBYTES:
          this.push(cur.take(cur.u8()).slice());
          break;
        case OP.BINBYTES8:
        case OP.BYTEARRAY8:
          this.push(cur.take(this.len(this.u64(), 'bytes object')).slice());
          break;
        case OP.NEXT_BUFFER:
        case OP.READONLY_BUFFER:
          this.fail('out-of-band pickle buffers (protocol 5) are not supported');
          break;
        // --- containers
        case OP.EMPTY_TUPLE:
          this.push(new PyTuple([]));
          break;
        case OP.TUPLE1:
          this.push(new PyTuple([this.pop()]));
          break;
        case OP.TUPLE2: {
          const b = this.pop();
          const a = this.pop();
          this.push(new PyTuple([a, b]));
          break;
        }
        case OP.TUPLE3: {
          const c = this.pop();
          const b = this.pop();
          const a = this.pop();
          this.push(new PyTuple([a, b, c]));
          break;
        }
        case OP.TUPLE:
          this.push(new PyTuple(this.popMark()));
          break;
        case OP.EMPTY_LIST:
          this.push([]);
          break;
        case OP.LIST:
          this.push(this.popMark());
          break;
        case OP.EMPTY_DICT:
          this.push(new PyDict(false));
          break;
        case OP.DICT: {
          const items = this.popMark();
          const d = new PyDict(false);
          this.setItems(d, items);
          this.push(d);
          break;
        }
        case OP.EMPTY_SET:
          this.push(new PySet());
          break;
        case OP.FROZENSET:
          this.push(new PySet(this.popMark(), true));
          break;
        case OP.ADDITEMS: {
          const items = this.popMark();
          const target = this.top();
          if (target instanceof PySet) for (const it of items) target.add(it);
          else if (target instanceof PyObject) this.append(target, items);
          else this.fail(`ADDITEMS to a ${pyTypeName(target)}`);
          break;
        }
        case OP.APPEND: {
          const item = this.pop();
          this.append(this.top(), [item]);
          break;
        }
        case OP.APPENDS: {
          const items = this.popMark();
          this.append(this.top(), items);
          break;
        }
        case OP.SETITEM: {
          const v = this.pop();
          const k = this.pop();
          this.setItems(this.top(), [k, v]);
          break;
        }
        case OP.SETITEMS: {
          const items = this.popMark();
          this.setItems(this.top(), items);
          break;
        }
        // --- memo
        case OP.GET: {
          const i = parsePyInt(this.lineText());
          if (typeof i !== 'number') this.fail('invalid GET index');
          this.push(this.getMemo(i));
          break;
        }
        case OP.BINGET:
          this.push(this.getMemo(cur.u8()));
          break;
        case OP.LONG_BINGET:
          this.push(this.getMemo(this.u32()));
          break;
        case OP.PUT: {
          const i = parsePyInt(this.lineText());
          if (typeof i !== 'number') this.fail('invalid PUT index');
          this.putMemo(i);
          break;
        }
        case OP.BINPUT:
          this.putMemo(cur.u8());
          break;
        case OP.LONG_BINPUT:
          this.putMemo(this.u32());
          break;
        case OP.MEMOIZE:
          this.putMemo(this.memo.size);
          break;
        // --- globals and objects (emulated, never executed)
        case OP.GLOBAL: {
          const module = utf8.decode(cur.line(Math.min(cur.remaining, 4096)));
          const name = utf8.decode(cur.line(Math.min(cur.remaining, 4096)));
          this.push(this.global(module, name));
          break;
        }
        case OP.STACK_GLOBAL: {
          const name = this.pop();
          const module = this.pop();
          if (typeof module !== 'string' || typeof name !== 'string') this.fail('STACK_GLOBAL with a module or name that is not a string');
          this.push(this.global(module, name));
          break;
        }
        case OP.EXT1:
        case OP.EXT2:
        case OP.EXT4:
          this.fail('pickle extension-registry codes (EXT1/EXT2/EXT4) are not supported');
          break;
        case OP.REDUCE: {
          const args = this.pop();
          const callable = this.pop();
          const argv = pySequence(args);
          if (!argv) this.fail(`REDUCE arguments are a ${pyTypeName(args)}, not a tuple`);
          this.push(this.boundMethod(callable, argv) ?? this.call(callable, argv, 'reduce'));
          break;
        }
        case OP.BUILD: {
          const state = this.pop();
          this.build(this.top(), state);
          break;
        }
        case OP.NEWOBJ: {
          const args = this.pop();
          const cls = this.pop();
          this.push(this.newobj(cls, args));
          break;
        }
        case OP.NEWOBJ_EX: {
          const kwargs = this.pop();
          const args = this.pop();
          const cls = this.pop();
          this.push(this.newobj(cls, args, kwargs));
          break;
        }
        case OP.INST: {
          const module = utf8.decode(cur.line(Math.min(cur.remaining, 4096)));
          const name = utf8.decode(cur.line(Math.min(cur.remaining, 4096)));
          const args = this.popMark();
          this.push(this.call(this.global(module, name), args, 'inst'));
          break;
        }
        case OP.OBJ: {
          const items = this.popMark();
          if (!items.length) this.fail('OBJ without a class');
          this.push(this.call(items[0], items.slice(1), 'obj'));
          break;
        }
        case OP.PERSID:
          this.push(this.persistent(this.lineText()));
          break;
        case OP.BINPERSID:
          this.push(this.persistent(this.pop()));
          break;
        default:
          throw new FormatError(`unknown pickle opcode 0x${hex(op)} at offset ${this.opAt}.`, this.src.name);
      }
    }
  }
}

function hex(n: number): string {
  return n.toString(16).padStart(2, '0');
}

/** Reads one pickle from `src` (a range of it with opts.start/end) by emulation. */
export function unpickle(src: ByteSource | Uint8Array, opts: UnpickleOptions = {}): UnpickleResult {
  const s = src instanceof Uint8Array ? new BufferSource(src, '<pickle>') : src;
  return new Unpickler(s, opts).load();
}

// ---------------------------------------------------------------------------------------------
// Writer

export interface PickleOptions {
  /**
   * Like Python's Pickler.persistent_id: return an id to write (as BINPERSID) instead of the value,
   * or undefined. torch storages (TorchStorage, NewStorage) can only be written through it.
   */
  persistentId?: (v: PyValue) => PyValue | undefined;
  /** Deepest nesting written (default 1000, like Python's recursion limit). */
  maxDepth?: number;
  /** Write bytes with protocol-3 BINBYTES instead of Python 3's protocol-2 `_codecs.encode(str, 'latin1')`. */
  binbytes?: boolean;
  /**
   * Allow writing references to dangerous globals (os.system, builtins.eval, …). Off by default, so
   * a hostile object read from one file is never re-emitted into a new one.
   */
  allowDangerousGlobals?: boolean;
}

class Out extends GrowableBytes {
  constructor() {
    super(1 << 12);
  }
  u8(b: number): void {
    this.ensure(1);
    this.buf[this.len++] = b;
  }
  u16(v: number): void {
    this.ensure(2);
    this.buf[this.len++] = v & 0xff;
    this.buf[this.len++] = (v >>> 8) & 0xff;
  }
  u32(v: number): void {
    this.ensure(4);
    new DataView(this.buf.buffer).setUint32(this.len, v >>> 0, true);
    this.len += 4;
  }
  i32(v: number): void {
    this.ensure(4);
    new DataView(this.buf.buffer).setInt32(this.len, v, true);
    this.len += 4;
  }
  u64(v: number): void {
    this.ensure(8);
    new DataView(this.buf.buffer).setBigUint64(this.len, BigInt(v), true);
    this.len += 8;
  }
  f64be(v: number): void {
    this.ensure(8);
    new DataView(this.buf.buffer).setFloat64(this.len, v, false);
    this.len += 8;
  }
  bytes(b: Uint8Array): void {
    this.ensure(b.length);
    this.buf.set(b, this.len);
    this.len += b.length;
  }
}

/** Python's encode_long: minimal little-endian two's complement. */
export function encodeLong(v: bigint): Uint8Array {
  if (v === 0n) return new Uint8Array(0);
  const out: number[] = [];
  let x = v;
  for (;;) {
    const b = Number(x & 0xffn);
    out.push(b);
    x >>= 8n;
    if ((x === 0n && !(b & 0x80)) || (x === -1n && b & 0x80)) break;
  }
  return Uint8Array.from(out);
}

const BATCH = 1000;

class PickleWriter {
  private readonly out = new Out();
  private readonly memo = new Map<object, number>();
  private readonly strMemo = new Map<string, number>();
  private nextMemo = 0;
  private readonly maxDepth: number;
  constructor(private readonly opts: PickleOptions) {
    this.maxDepth = opts.maxDepth ?? 1000;
  }

  finish(root: PyValue): Uint8Array {
    this.out.u8(OP.PROTO);
    this.out.u8(2);
    this.save(root, 0);
    this.out.u8(OP.STOP);
    return this.out.finish();
  }

  private put(): number {
    const i = this.nextMemo++;
    if (i < 256) {
      this.out.u8(OP.BINPUT);
      this.out.u8(i);
    } else {
      this.out.u8(OP.LONG_BINPUT);
      this.out.u32(i);
    }
    return i;
  }

  private get(i: number): void {
    if (i < 256) {
      this.out.u8(OP.BINGET);
      this.out.u8(i);
    } else {
      this.out.u8(OP.LONG_BINGET);
      this.out.u32(i);
    }
  }

  private memoize(obj: object): void {
    this.memo.set(obj, this.put());
  }

  private checkGlobal(module: string, name: string): void {
    if (!this.opts.allowDangerousGlobals && isDangerousGlobal(module, name)) {
      throw new RepFuseError(`refusing to write a reference to ${module}.${name} (a global that can run code) into a pickle.`);
    }
  }

  /** GLOBAL module name (memoized). `trusted`: the caller wrote the one safe use of a flagged name (a bound method). */
  private global(module: string, name: string, trusted = false): void {
    // Checked before the memo: a trusted earlier use must not let an untrusted one through.
    if (!trusted) this.checkGlobal(module, name);
    const key = `\0g${module}\n${name}`;
    const m = this.strMemo.get(key);
    if (m !== undefined) return this.get(m);
    const mod = py2Module(module);
    if (mod.includes('\n') || name.includes('\n')) throw new RepFuseError(`cannot pickle a global named ${JSON.stringify(`${module}.${name}`)}.`);
    this.out.u8(OP.GLOBAL);
    this.out.bytes(Buffer.from(`${mod}\n${name}\n`, 'utf8'));
    this.strMemo.set(key, this.put());
  }

  private saveInt(v: number | bigint): void {
    if (typeof v === 'bigint' && v >= -(2n ** 31n) && v < 2n ** 31n) v = Number(v);
    if (typeof v === 'number') {
      if (v >= 0 && v <= 0xff) {
        this.out.u8(OP.BININT1);
        this.out.u8(v);
        return;
      }
      if (v >= 0 && v <= 0xffff) {
        this.out.u8(OP.BININT2);
        this.out.u16(v);
        return;
      }
      if (v >= -(2 ** 31) && v < 2 ** 31) {
        this.out.u8(OP.BININT);
        this.out.i32(v);
        return;
      }
      v = BigInt(v);
    }
    const b = encodeLong(v);
    if (b.length < 256) {
      this.out.u8(OP.LONG1);
      this.out.u8(b.length);
    } else {
      this.out.u8(OP.LONG4);
      this.out.u32(b.length);
    }
    this.out.bytes(b);
  }

  private saveFloat(v: number): void {
    this.out.u8(OP.BINFLOAT);
    this.out.f64be(v);
  }

  private saveStr(s: string): void {
    const m = this.strMemo.get(s);
    if (m !== undefined) return this.get(m);
    const b = Buffer.from(s, 'utf8');
    if (b.length > 0xffffffff) {
      this.out.u8(OP.BINUNICODE8);
      this.out.u64(b.length);
    } else {
      this.out.u8(OP.BINUNICODE);
      this.out.u32(b.length);
    }
    this.out.bytes(b);
    this.strMemo.set(s, this.put());
  }

  /** save_reduce: func, args, REDUCE, memoize, then list items, dict items, BUILD state. */
  private reduce(
    func: () => void,
    args: PyValue[],
    obj: object,
    depth: number,
    extra: { listItems?: PyValue[]; dictItems?: Iterable<[PyValue, PyValue]>; state?: PyValue } = {},
    op: number = OP.REDUCE,
    kwargs?: PyValue,
  ): void {
    func();
    this.saveTuple(new PyTuple(args), depth + 1);
    if (op === OP.NEWOBJ_EX) this.save(kwargs ?? new PyDict(), depth + 1);
    this.out.u8(op);
    this.afterBuild(obj, depth, extra);
  }

  private afterBuild(obj: object, depth: number, extra: { listItems?: PyValue[]; dictItems?: Iterable<[PyValue, PyValue]>; state?: PyValue }): void {
    const m = this.memo.get(obj);
    if (m !== undefined) {
      // The object was reached (and written) through its own arguments: use that one, as Python does.
      this.out.u8(OP.POP);
      this.get(m);
    } else this.memoize(obj);
    if (extra.listItems?.length) this.appends(extra.listItems, depth);
    if (extra.dictItems) this.setitems(extra.dictItems, depth);
    if (extra.state !== undefined) {
      this.save(extra.state, depth + 1);
      this.out.u8(OP.BUILD);
    }
  }

  private appends(items: PyValue[], depth: number): void {
    for (let i = 0; i < items.length; i += BATCH) {
      const n = Math.min(BATCH, items.length - i);
      if (n > 1) this.out.u8(OP.MARK);
      for (let j = i; j < i + n; j++) this.save(items[j], depth + 1);
      this.out.u8(n > 1 ? OP.APPENDS : OP.APPEND);
    }
  }

  private setitems(entries: Iterable<[PyValue, PyValue]>, depth: number): void {
    const all = [...entries];
    for (let i = 0; i < all.length; i += BATCH) {
      const n = Math.min(BATCH, all.length - i);
      if (n > 1) this.out.u8(OP.MARK);
      for (let j = i; j < i + n; j++) {
        this.save(all[j][0], depth + 1);
        this.save(all[j][1], depth + 1);
      }
      this.out.u8(n > 1 ? OP.SETITEMS : OP.SETITEM);
    }
  }

  private saveTuple(t: PyTuple, depth: number): void {
    const n = t.items.length;
    if (n === 0) {
      this.out.u8(OP.EMPTY_TUPLE);
      return;
    }
    if (n > 3) this.out.u8(OP.MARK);
    for (const it of t.items) this.save(it, depth + 1);
    const m = this.memo.get(t);
    if (m !== undefined) {
      // Written while its items were (a cycle through a list or dict): drop the copy, use the memo.
      if (n > 3) this.out.u8(OP.POP_MARK);
      else for (let i = 0; i < n; i++) this.out.u8(OP.POP);
      this.get(m);
      return;
    }
    this.out.u8(n === 1 ? OP.TUPLE1 : n === 2 ? OP.TUPLE2 : n === 3 ? OP.TUPLE3 : OP.TUPLE);
    this.memoize(t);
  }

  private saveBytes(b: Uint8Array, depth: number): void {
    if (this.opts.binbytes) {
      if (b.length < 256) {
        this.out.u8(OP.SHORT_BINBYTES);
        this.out.u8(b.length);
      } else if (b.length <= 0xffffffff) {
        this.out.u8(OP.BINBYTES);
        this.out.u32(b.length);
      } else {
        this.out.u8(OP.BINBYTES8);
        this.out.u64(b.length);
      }
      this.out.bytes(b);
      this.memoize(b);
      return;
    }
    if (b.length === 0) return this.reduce(() => this.global('builtins', 'bytes'), [], b, depth);
    this.reduce(() => this.global('_codecs', 'encode'), [latin1(b), 'latin1'], b, depth);
  }

  private saveTensor(t: TorchTensor | NewTensor, depth: number): void {
    const isTorch = t instanceof TorchTensor;
    const storage = t.storage;
    const offset = isTorch ? t.storageOffset : 0;
    const stride = t.stride;
    const state = isTorch ? t.state : undefined;
    if (t.isParameter) {
      // Parameter(data): the data is a plain tensor on the same storage, written as its own rebuild call.
      let inner: TorchTensor | NewTensor;
      if (isTorch) {
        inner = new TorchTensor(t.storage, t.storageOffset, t.shape, t.stride);
        inner.metadata = t.metadata;
      } else inner = new NewTensor(t.dtype, t.shape, t.storage);
      const withState = state !== undefined && state !== null;
      const args: PyValue[] = [inner, t.requiresGrad, new PyDict(true)];
      if (withState) args.push(state);
      return this.reduce(() => this.global('torch._utils', withState ? '_rebuild_parameter_with_state' : '_rebuild_parameter'), args, t, depth);
    }
    const args: PyValue[] = [storage, offset, new PyTuple(t.shape.slice()), new PyTuple(stride.slice()), t.requiresGrad, new PyDict(true)];
    if (isTorch && t.metadata !== undefined) args.push(t.metadata);
    if (state !== undefined && state !== null) {
      const fargs = new PyTuple(args);
      return this.reduce(
        () => this.global('torch._tensor', '_rebuild_from_type_v2'),
        [new PyGlobal('torch._utils', '_rebuild_tensor_v2'), new PyGlobal('torch', 'Tensor'), fargs, state],
        t,
        depth,
      );
    }
    this.reduce(() => this.global('torch._utils', '_rebuild_tensor_v2'), args, t, depth);
  }

  save(v: PyValue, depth: number): void {
    if (depth > this.maxDepth) throw new RepFuseError(`cannot pickle: the value nests deeper than ${this.maxDepth} levels.`);
    if (v === null) return this.out.u8(OP.NONE);
    switch (typeof v) {
      case 'boolean':
        return this.out.u8(v ? OP.NEWTRUE : OP.NEWFALSE);
      case 'number':
        if (Number.isInteger(v) && Math.abs(v) <= Number.MAX_SAFE_INTEGER) return this.saveInt(v);
        return this.saveFloat(v);
      case 'bigint':
        return this.saveInt(v);
      case 'string':
        return this.saveStr(v);
    }
    if (typeof v !== 'object') throw new RepFuseError(`cannot pickle a ${typeof v}.`);
    if (this.opts.persistentId) {
      const pid = this.opts.persistentId(v);
      if (pid !== undefined) {
        this.save(pid, depth + 1);
        this.out.u8(OP.BINPERSID);
        return;
      }
    }
    if (v instanceof PyFloat) return this.saveFloat(v.value);
    if (v instanceof PyGlobal) return this.global(v.module, v.name);
    const m = this.memo.get(v);
    if (v instanceof PyBoundMethod) {
      // As Python pickles a bound method (method.__reduce__): getattr(self, name), self from the memo.
      // Only the one shape the reader accepts: the module's own `forward` attribute.
      if (!BOUND_METHOD_NAME.test(v.name)) throw new RepFuseError(`cannot pickle a bound method named ${JSON.stringify(v.name.slice(0, 80))}.`);
      if (!(v.self.state instanceof PyDict) || v.self.state.get('forward') !== v) {
        throw new RepFuseError(`refusing to pickle the bound method ${v.self.className}.${v.name} anywhere but as its own module's 'forward' attribute.`);
      }
      if (m !== undefined) return this.get(m);
      return this.reduce(() => this.global('builtins', 'getattr', true), [v.self, v.name], v, depth);
    }
    if (m !== undefined) return this.get(m);
    if (v instanceof Uint8Array) return this.saveBytes(v, depth);
    if (Array.isArray(v)) {
      this.out.u8(OP.EMPTY_LIST);
      this.memoize(v);
      this.appends(v, depth);
      return;
    }
    if (v instanceof PyTuple) {
      if (v.tag === 'torch.Size') return this.reduce(() => this.global('torch', 'Size'), [new PyTuple(v.items)], v, depth);
      return this.saveTuple(v, depth);
    }
    if (v instanceof PyDict) {
      if (v.ordered) {
        return this.reduce(() => this.global('collections', 'OrderedDict'), [], v, depth, { dictItems: v.entries(), state: v.state });
      }
      this.out.u8(OP.EMPTY_DICT);
      this.afterBuild(v, depth, { dictItems: v.entries(), state: v.state });
      return;
    }
    if (v instanceof PySet) {
      return this.reduce(() => this.global('builtins', v.frozen ? 'frozenset' : 'set'), [v.items.slice()], v, depth);
    }
    if (v instanceof PyObject) {
      const extra = { listItems: v.listItems, dictItems: v.dictItems, state: v.state };
      if (v.callee instanceof PyBoundMethod) throw new RepFuseError(`refusing to pickle a call of the bound method ${v.callee.self.className}.${v.callee.name} (it would run when loaded).`);
      const callee = (): void => (v.callee !== undefined ? this.save(v.callee, depth + 1) : this.global(v.module, v.name));
      switch (v.how) {
        case 'reduce':
          return this.reduce(callee, v.args, v, depth, extra);
        case 'newobj':
          return this.reduce(callee, v.args, v, depth, extra, OP.NEWOBJ);
        case 'newobj_ex':
          return this.reduce(callee, v.args, v, depth, extra, OP.NEWOBJ_EX, v.kwargs);
        case 'inst':
        case 'obj': {
          if (v.how === 'inst' && v.callee !== undefined) throw new RepFuseError('cannot pickle an INST object without a class name.');
          this.out.u8(OP.MARK);
          if (v.how === 'obj') callee();
          for (const a of v.args) this.save(a, depth + 1);
          if (v.how === 'inst') {
            this.checkGlobal(v.module, v.name);
            this.out.u8(OP.INST);
            this.out.bytes(Buffer.from(`${py2Module(v.module)}\n${v.name}\n`, 'utf8'));
          } else this.out.u8(OP.OBJ);
          this.afterBuild(v, depth, extra);
          return;
        }
      }
    }
    if (v instanceof TorchTensor || v instanceof NewTensor) return this.saveTensor(v, depth);
    if (v instanceof TorchStorage || v instanceof NewStorage) {
      throw new RepFuseError('cannot pickle a torch storage without a persistent id (write it with writeTorchZip).');
    }
    if (v instanceof PySlice) return this.reduce(() => this.global('builtins', 'slice'), [v.start, v.stop, v.step], v, depth);
    if (v instanceof PyComplex) {
      return this.reduce(() => this.global('builtins', 'complex'), [new PyFloat(v.re), new PyFloat(v.im)], v, depth);
    }
    if (v instanceof NumpyDType) {
      const args = v.args.length ? v.args : [v.descr, false, true];
      return this.reduce(() => this.global(v.module, 'dtype'), args, v, depth, { state: v.state });
    }
    if (v instanceof NumpyScalar) {
      return this.reduce(() => this.global(v.module, 'scalar'), [v.dtype, v.data], v, depth);
    }
    if (v instanceof NdArray) {
      const args = v.reconstructArgs.length ? v.reconstructArgs : [new PyGlobal('numpy', 'ndarray'), new PyTuple([0]), Uint8Array.of(0x62)];
      const dt = v.dtype ?? new NumpyDType('f8');
      const st: PyValue[] = [v.stateVersion ?? 1, new PyTuple(v.shape.slice()), dt, v.fortran, v.data];
      return this.reduce(() => this.global(v.reconstructModule, '_reconstruct'), args, v, depth, { state: new PyTuple(st) });
    }
    throw new RepFuseError(`cannot pickle a ${pyTypeName(v)}.`);
  }
}

/** Serializes a value as a protocol-2 pickle, like Python 3's `pickle.dumps(v, protocol=2)` (torch.save's default). */
export function pickle(root: PyValue, opts: PickleOptions = {}): Uint8Array {
  return new PickleWriter(opts).finish(root);
}
