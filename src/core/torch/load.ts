// Opening PyTorch checkpoints without Python: zip archives (torch ≥ 1.6), the legacy format, and
// plain pickles. The pickle is emulated (nothing in it runs); tensors are lazy views of the file.
import { BufferSource, type ByteSource, FileSource } from '../bytes';
import { dtypeSize } from '../dtype';
import { FormatError } from '../errors';
import { LEGACY_MAGIC, looksLikeLegacyTorch, readLegacyTorch } from './legacy';
import { torchDTypeOf, type UnpickleOptions, unpickle } from './pickle';
import { storageDType, TorchStorage, TorchTensor } from './tensor';
import { PyDict, PyGlobal, PyObject, PySet, PyTuple, type PyValue, pySequence, pyTypeName } from './values';
import { looksLikeZip, MAX_INFLATE_BYTES, ZipArchive } from './zip';

export type TorchFormat = 'zip' | 'legacy' | 'pickle';

export interface TorchFile {
  /** The file's path (or the source's name). */
  readonly path: string;
  readonly format: TorchFormat;
  /** What torch.load would return, as inert data. */
  readonly root: PyValue;
  /** One line per concern: dangerous globals named by the file (never executed), TorchScript, … */
  readonly warnings: string[];
  /** Every global the pickle names, as written (module.name). */
  readonly globals: string[];
  /** The main pickle's protocol (highest PROTO opcode; 0 when none). */
  readonly pickleProtocol: number;
  /** Dangerous globals the pickle names (as written), none of which was executed. */
  readonly dangerousGlobals: string[];
  /** Every storage the pickle references, in first-use order. */
  readonly storages: TorchStorage[];
  /** zip: the archive's root folder (`archive`, or the saved file's base name). */
  readonly archiveRoot?: string;
  readonly source: ByteSource;
  /** Closes the file (when openTorch opened it). Tensors cannot be read afterwards. */
  close(): void;
}

export interface OpenTorchOptions extends Pick<UnpickleOptions, 'maxStack' | 'maxMemo' | 'maxMarks'> {
  /**
   * 'refuse': throw a FormatError when the pickle names a dangerous global (os.system, eval, …).
   * Default 'report': read it as inert data and list it in `warnings` / `dangerousGlobals`.
   */
  dangerous?: 'report' | 'refuse';
}

function str(v: PyValue | undefined): string | undefined {
  if (typeof v === 'string') return v;
  if (v instanceof Uint8Array) return Buffer.from(v).toString('latin1');
  if (typeof v === 'number') return String(v);
  return undefined;
}

/** Opens a PyTorch file (path or ByteSource), sniffing zip vs legacy vs plain pickle. */
export function openTorch(file: string | ByteSource, opts: OpenTorchOptions = {}): TorchFile {
  const owned = typeof file === 'string';
  const src = owned ? new FileSource(file) : file;
  try {
    const r = openSource(src, opts);
    if (opts.dangerous === 'refuse' && r.dangerousGlobals.length) {
      throw new FormatError(`the pickle references ${r.dangerousGlobals.join(', ')}, which can run code; refusing to load it (nothing was executed).`, src.name);
    }
    return { ...r, path: src.name, source: src, close: () => (owned ? src.close() : undefined) };
  } catch (err) {
    if (owned) src.close();
    throw err;
  }
}

type Opened = Omit<TorchFile, 'path' | 'source' | 'close'>;

function openSource(src: ByteSource, opts: OpenTorchOptions): Opened {
  const file = src.name;
  if (src.size === 0) throw new FormatError('the file is empty.', file);
  if (looksLikeZip(src)) return openZip(src, opts);
  if (looksLikeLegacyTorch(src)) {
    const r = readLegacyTorch(src, opts);
    return { format: 'legacy', root: r.root, warnings: r.warnings, globals: r.globals, pickleProtocol: r.pickleProtocol, dangerousGlobals: r.dangerous, storages: uniqueStorages(r.root, r.storages) };
  }
  const head = src.read(0, Math.min(src.size, 512));
  if (src.size >= 512 && Buffer.from(head.subarray(257, 262)).toString('latin1') === 'ustar') {
    throw new FormatError('this is a tar archive (the PyTorch < 0.4 format), which is not supported; re-save it with a newer PyTorch.', file);
  }
  if (head.length >= 9 && head[8] === 0x7b) {
    throw new FormatError('this looks like a safetensors file, not a PyTorch pickle; open it as safetensors.', file);
  }
  if (head[0] !== 0x80) throw new FormatError('not a PyTorch file: neither a zip archive nor a pickle.', file);
  const r = unpickle(src, {
    ...opts,
    persistentLoad: () => {
      throw new FormatError('the pickle refers to tensor storages, but the file has no storage data (not a torch.save file?).', file);
    },
  });
  if (r.value === LEGACY_MAGIC) {
    // A legacy file saved with another pickle protocol (the magic number is not PROTO 2 + LONG1).
    const l = readLegacyTorch(src, opts);
    return { format: 'legacy', root: l.root, warnings: l.warnings, globals: l.globals, pickleProtocol: l.pickleProtocol, dangerousGlobals: l.dangerous, storages: uniqueStorages(l.root, l.storages) };
  }
  return { format: 'pickle', root: r.value, warnings: r.warnings, globals: r.globals, pickleProtocol: r.protocol, dangerousGlobals: r.dangerous, storages: [] };
}

function openZip(src: ByteSource, opts: OpenTorchOptions): Opened {
  const file = src.name;
  const zip = ZipArchive.open(src);
  const pkls = zip.entries.filter((e) => /^[^/]+\/data\.pkl$/.test(e.name));
  if (pkls.length === 0) throw new FormatError('a zip archive without <root>/data.pkl: not a PyTorch checkpoint.', file);
  if (pkls.length > 1) throw new FormatError(`the archive has ${pkls.length} data.pkl files (${pkls.map((e) => e.name).join(', ')}); which one is the checkpoint is ambiguous.`, file);
  const root = pkls[0].name.slice(0, -'/data.pkl'.length);
  const warnings: string[] = [];

  const bo = zip.get(`${root}/byteorder`);
  if (bo) {
    const text = Buffer.from(zip.read(bo, 64)).toString('latin1').trim();
    if (text === 'big') throw new FormatError('this checkpoint was saved big-endian; only little-endian files are supported.', file);
    if (text !== 'little') throw new FormatError(`unknown byte order "${text.slice(0, 20)}" in ${bo.name}.`, file);
  }
  const ver = zip.get(`${root}/version`) ?? zip.get(`${root}/.data/version`);
  if (ver) {
    const text = Buffer.from(zip.read(ver, 64)).toString('latin1').trim();
    const n = Number(text);
    if (!Number.isInteger(n) || n < 1) throw new FormatError(`invalid archive version "${text.slice(0, 20)}" in ${ver.name}.`, file);
    if (n > 10) warnings.push(`the archive format version is ${n}, newer than this reader knows; reading it anyway.`);
  }
  if (zip.get(`${root}/constants.pkl`) || zip.entries.some((e) => e.name.startsWith(`${root}/code/`))) {
    warnings.push('this is a TorchScript archive: only its data.pkl (attributes and weights) is read; its code is ignored.');
  }

  const cache = new Map<string, TorchStorage>();
  const persistentLoad = (pid: PyValue): PyValue => {
    const t = pySequence(pid);
    const kind = str(t?.[0]);
    if (!t || kind !== 'storage' || t.length < 5) {
      throw new FormatError(`unexpected persistent id ${t ? `of kind "${kind ?? pyTypeName(t[0])}"` : `(a ${pyTypeName(pid)})`} in data.pkl.`, file);
    }
    const [, stype, keyV, locV, numelV] = t;
    let dtype = stype instanceof PyGlobal ? storageDType(stype.module, stype.name) : undefined;
    dtype ??= torchDTypeOf(stype);
    if (dtype === undefined) throw new FormatError(`unsupported storage type ${pyTypeName(stype)} for storage ${String(keyV)}.`, file);
    const key = str(keyV);
    const numel = typeof numelV === 'bigint' ? Number(numelV) : numelV;
    if (key === undefined || typeof numel !== 'number' || !Number.isSafeInteger(numel) || numel < 0) {
      throw new FormatError(`invalid storage id (key ${String(keyV)}, numel ${String(numelV)}) in data.pkl.`, file);
    }
    const ck = `${key}\0${dtype}\0${numel}`;
    const hit = cache.get(ck);
    if (hit) return hit;
    const name = `${root}/data/${key}`;
    const entry = zip.get(name);
    if (!entry) throw new FormatError(`data.pkl references storage ${key}, but the archive has no record ${name}.`, file);
    const bytes = numel * (dtypeSize(dtype) ?? 1);
    if (bytes > entry.size) {
      throw new FormatError(`storage ${key} declares ${numel} elements (${bytes} bytes), but its record ${name} holds only ${entry.size} bytes.`, file);
    }
    let st: TorchStorage;
    if (entry.method === 0) st = new TorchStorage(key, dtype, numel, str(locV) ?? 'cpu', src, entry.dataOffset, bytes);
    else {
      if (entry.size > MAX_INFLATE_BYTES) throw new FormatError(`storage record ${name} is compressed and too large (${entry.size} bytes) to inflate in memory.`, file);
      const mem = new BufferSource(zip.read(entry), `${file}:${name}`);
      st = new TorchStorage(key, dtype, numel, str(locV) ?? 'cpu', mem, 0, bytes);
    }
    cache.set(ck, st);
    return st;
  };

  const pkl = pkls[0];
  const r =
    pkl.method === 0
      ? unpickle(src, { ...opts, start: pkl.dataOffset, end: pkl.dataOffset + pkl.size, persistentLoad })
      : unpickle(new BufferSource(zip.read(pkl), file), { ...opts, persistentLoad });
  return {
    format: 'zip',
    root: r.value,
    warnings: [...warnings, ...r.warnings],
    globals: r.globals,
    pickleProtocol: r.protocol,
    dangerousGlobals: r.dangerous,
    storages: uniqueStorages(r.value, [...cache.values()]),
    archiveRoot: root,
  };
}

function uniqueStorages(root: PyValue, known: TorchStorage[]): TorchStorage[] {
  const seen = new Set<TorchStorage>();
  const out: TorchStorage[] = [];
  for (const t of namedTensors(root).values()) {
    if (!seen.has(t.storage)) {
      seen.add(t.storage);
      out.push(t.storage);
    }
  }
  for (const s of known) {
    if (!seen.has(s)) {
      seen.add(s);
      out.push(s);
    }
  }
  return out;
}

function join(prefix: string, key: string): string {
  return prefix ? `${prefix}.${key}` : key;
}

/** Whether a PyObject's state looks like an nn.Module's __dict__. */
function moduleState(v: PyValue | undefined): PyDict | undefined {
  if (!(v instanceof PyObject) || !(v.state instanceof PyDict)) return undefined;
  const s = v.state;
  return s.get('_parameters') !== undefined && s.get('_modules') !== undefined ? s : undefined;
}

/** Nesting (dicts, lists, objects, states) below which namedTensors does not look for tensors. */
const MAX_NAME_DEPTH = 1024;

/**
 * Every tensor reachable from `root`, named like state_dict keys: dict keys and list indexes joined
 * with '.', nn.Module objects expanded through `_parameters`, `_buffers` and `_modules` (so a
 * YOLO checkpoint gives `model.model.0.conv.weight`). Other objects contribute their BUILD state.
 * A tensor reachable under several names is listed under each. Cycle-safe, iterative.
 */
export function namedTensors(root: PyValue): Map<string, TorchTensor> {
  const out = new Map<string, TorchTensor>();
  const seen = new Set<object>();
  const work: [PyValue, string, number][] = [[root, '', 0]];
  while (work.length) {
    const [v, prefix, depth] = work.pop() as [PyValue, string, number];
    // Names of values nested deeper than any real checkpoint would cost time and memory quadratic in the depth.
    if (depth > MAX_NAME_DEPTH) continue;
    if (v instanceof TorchTensor) {
      if (!out.has(prefix)) out.set(prefix, v);
      continue;
    }
    if (v === null || typeof v !== 'object' || v instanceof Uint8Array) continue;
    if (seen.has(v)) continue;
    seen.add(v);
    const children: [PyValue, string][] = [];
    if (v instanceof PyDict) {
      for (const [k, x] of v) {
        const ks = typeof k === 'string' ? k : typeof k === 'number' || typeof k === 'bigint' ? String(k) : undefined;
        if (ks !== undefined) children.push([x, join(prefix, ks)]);
      }
    } else if (Array.isArray(v) || v instanceof PyTuple) {
      (Array.isArray(v) ? v : v.items).forEach((x, i) => children.push([x, join(prefix, String(i))]));
    } else if (v instanceof PyObject) {
      const ms = moduleState(v);
      if (ms) {
        const np = ms.get('_non_persistent_buffers_set');
        const skip = new Set<string>();
        if (np instanceof PySet) for (const x of np.items) if (typeof x === 'string') skip.add(x);
        for (const field of ['_parameters', '_buffers', '_modules']) {
          const d = ms.get(field);
          if (!(d instanceof PyDict)) continue;
          for (const [k, x] of d) {
            if (typeof k !== 'string' || (field === '_buffers' && skip.has(k))) continue;
            children.push([x, join(prefix, k)]);
          }
        }
      } else if (v.state !== undefined) {
        children.push([v.state, prefix]);
      }
      if (v.dictItems) for (const [k, x] of v.dictItems) if (typeof k === 'string') children.push([x, join(prefix, k)]);
      if (v.listItems) v.listItems.forEach((x, i) => children.push([x, join(prefix, String(i))]));
    }
    for (let i = children.length - 1; i >= 0; i--) work.push([children[i][0], children[i][1], depth + 1]);
  }
  return out;
}
