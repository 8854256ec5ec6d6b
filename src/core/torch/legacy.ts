// The legacy (pre-1.6, `_use_new_zipfile_serialization=False`) torch.save format: five pickles and
// the raw storages, back to back:
//   magic number pickle (0x1950a86a20f9469cfc6c), protocol version pickle (1001), sys_info pickle,
//   the main pickle (persistent ids ('storage', type, key, location, numel, view_metadata)),
//   the pickled list of storage keys, then per key: int64 element count + the raw bytes.
// Storage offsets are computed from the counts; no tensor data is read.
import type { ByteSource } from '../bytes';
import { dtypeName, dtypeSize } from '../dtype';
import { FormatError } from '../errors';
import { type UnpickleOptions, unpickle } from './pickle';
import { storageDType, TorchStorage } from './tensor';
import { PyDict, PyGlobal, type PyValue, pySequence, pyTypeName } from './values';

export const LEGACY_MAGIC = 0x1950a86a20f9469cfc6cn;
export const LEGACY_PROTOCOL_VERSION = 1001;
/** What torch.save writes first: PROTO 2, LONG1 of 10 bytes, the magic number little-endian. */
const MAGIC_PREFIX = Uint8Array.of(0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19);

export function looksLikeLegacyTorch(src: ByteSource): boolean {
  if (src.size < MAGIC_PREFIX.length) return false;
  const b = src.read(0, MAGIC_PREFIX.length);
  return MAGIC_PREFIX.every((x, i) => b[i] === x);
}

export interface LegacyTorch {
  root: PyValue;
  sysInfo: PyValue;
  /** Storages in file order (views of them excluded). */
  storages: TorchStorage[];
  warnings: string[];
  globals: string[];
  /** The main pickle's protocol. */
  pickleProtocol: number;
  /** Dangerous globals named by any of the pickles. */
  dangerous: string[];
}

function str(v: PyValue | undefined): string | undefined {
  if (typeof v === 'string') return v;
  if (v instanceof Uint8Array) return Buffer.from(v).toString('latin1');
  if (typeof v === 'number') return String(v);
  return undefined;
}

/** Reads a legacy torch file. Storages are located (offsets computed) but not read. */
export function readLegacyTorch(src: ByteSource, opts: Omit<UnpickleOptions, 'start' | 'end' | 'persistentLoad'> = {}): LegacyTorch {
  const file = src.name;
  const magic = unpickle(src, { ...opts, start: 0 });
  if (magic.value !== LEGACY_MAGIC) throw new FormatError('not a PyTorch file: wrong magic number.', file);
  const proto = unpickle(src, { ...opts, start: magic.end });
  if (proto.value !== LEGACY_PROTOCOL_VERSION) throw new FormatError(`unsupported legacy PyTorch protocol version ${String(proto.value)}.`, file);
  const sys = unpickle(src, { ...opts, start: proto.end });
  if (sys.value instanceof PyDict && sys.value.get('little_endian') === false) {
    throw new FormatError('this file was saved on a big-endian machine; only little-endian files are supported.', file);
  }

  const roots = new Map<string, TorchStorage>();
  const views: { storage: TorchStorage; root: TorchStorage; offset: number }[] = [];
  const viewByKey = new Map<string, TorchStorage>();
  const persistentLoad = (pid: PyValue): PyValue => {
    const t = pySequence(pid);
    const kind = str(t?.[0]);
    if (!t || kind === undefined) throw new FormatError(`unexpected persistent id (a ${pyTypeName(pid)}) in a legacy PyTorch file.`, file);
    if (kind === 'module') return t[1] ?? null; // (source code of a module class): only its type is kept
    if (kind !== 'storage' || t.length < 5) throw new FormatError(`unexpected persistent id of kind "${kind}" in a legacy PyTorch file.`, file);
    const [, stype, keyV, locV, sizeV] = t;
    const viewMeta = t.length > 5 ? t[5] : null;
    const dtype = stype instanceof PyGlobal ? storageDType(stype.module, stype.name) : undefined;
    if (dtype === undefined) throw new FormatError(`unsupported storage type ${pyTypeName(stype)} in a legacy PyTorch file.`, file);
    const key = str(keyV);
    const numel = typeof sizeV === 'bigint' ? Number(sizeV) : sizeV;
    if (key === undefined || typeof numel !== 'number' || !Number.isSafeInteger(numel) || numel < 0) {
      throw new FormatError(`invalid storage id (key ${String(keyV)}, size ${String(sizeV)}) in a legacy PyTorch file.`, file);
    }
    let root = roots.get(key);
    if (!root) {
      const size = numel * (dtypeSize(dtype) ?? 1);
      root = new TorchStorage(key, dtype, numel, str(locV) ?? 'cpu', src, -1, size);
      roots.set(key, root);
    } else if (root.dtype !== dtype || root.numel !== numel) {
      throw new FormatError(`storage ${key} is declared twice with different types or sizes (${dtypeName(root.dtype)}×${root.numel}, ${dtypeName(dtype)}×${numel}).`, file);
    }
    if (viewMeta === null || viewMeta === undefined) return root;
    const vm = pySequence(viewMeta);
    const viewKey = str(vm?.[0]);
    const vOff = vm?.[1];
    const vSize = vm?.[2];
    if (!vm || viewKey === undefined || typeof vOff !== 'number' || typeof vSize !== 'number' || vOff < 0 || vSize < 0 || vOff + vSize > numel) {
      throw new FormatError(`invalid storage view of ${key} in a legacy PyTorch file.`, file);
    }
    const known = viewByKey.get(viewKey);
    if (known) return known;
    const view = new TorchStorage(viewKey, dtype, vSize, root.location, src, -1, vSize * root.elementSize);
    viewByKey.set(viewKey, view);
    views.push({ storage: view, root, offset: vOff });
    return view;
  };
  const main = unpickle(src, { ...opts, start: sys.end, persistentLoad });
  const keysP = unpickle(src, { ...opts, start: main.end });
  const keys = pySequence(keysP.value);
  if (!keys) throw new FormatError(`the legacy storage key list is a ${pyTypeName(keysP.value)}.`, file);

  let pos = keysP.end;
  const ordered: TorchStorage[] = [];
  const seen = new Set<string>();
  for (const kv of keys) {
    const key = str(kv);
    if (key === undefined) throw new FormatError('a legacy storage key is not a string.', file);
    if (seen.has(key)) throw new FormatError(`legacy storage ${key} is listed twice.`, file);
    seen.add(key);
    const st = roots.get(key);
    if (!st) throw new FormatError(`the file stores storage ${key}, which the pickle never references.`, file);
    if (pos + 8 > src.size) throw new FormatError(`the data of storage ${key} is missing at offset ${pos} (truncated file?).`, file);
    const b = src.read(pos, 8);
    const count = new DataView(b.buffer, b.byteOffset, 8).getBigInt64(0, true);
    if (count !== BigInt(st.numel)) {
      throw new FormatError(`storage ${key} at offset ${pos} holds ${count} elements, but the pickle declares ${st.numel}.`, file);
    }
    const dataStart = pos + 8;
    if (dataStart + st.byteLength > src.size) {
      throw new FormatError(`storage ${key} needs ${st.byteLength} bytes at offset ${dataStart}, past the end of the file (${src.size} bytes; truncated?).`, file);
    }
    st.offset = dataStart;
    ordered.push(st);
    pos = dataStart + st.byteLength;
  }
  for (const st of roots.values()) {
    if (st.offset < 0) throw new FormatError(`storage ${st.key} is referenced by the pickle but its data is not in the file.`, file);
  }
  for (const v of views) v.storage.offset = v.root.offset + v.offset * v.root.elementSize;

  const warnings = [...new Set([...magic.warnings, ...proto.warnings, ...sys.warnings, ...main.warnings, ...keysP.warnings])];
  const globals = [...new Set([...main.globals, ...sys.globals])];
  const dangerous = [...new Set([...magic.dangerous, ...proto.dangerous, ...sys.dangerous, ...main.dangerous, ...keysP.dangerous])];
  return { root: main.value, sysInfo: sys.value, storages: ordered, warnings, globals, pickleProtocol: main.protocol, dangerous };
}
