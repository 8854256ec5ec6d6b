// Writing PyTorch checkpoints in torch.save's zip format: `<root>/data.pkl` (protocol-2 pickle),
// `<root>/byteorder`, `<root>/data/<key>` per storage (64-byte aligned, streamed from the source
// file or produced on demand) and `<root>/version`. Output is atomic (temp file + rename).
import * as path from 'node:path';
import { pipeRange } from '../bytes';
import { type DType, dtypeName, dtypeSize } from '../dtype';
import { RepFuseError } from '../errors';
import { checkpoint, writeAtomically } from '../atomic';
import { pickle } from './pickle';
import { NewStorage, storageClassName, TorchStorage } from './tensor';
import { PyGlobal, PyTuple, type PyValue } from './values';
import { ZipWriter } from './zip';

export interface TorchSaveOptions {
  /** The archive's root folder (default `archive`, what torch.save uses for file objects). */
  archiveName?: string;
  /** Location written for every storage (e.g. `cpu`), instead of each storage's own. */
  location?: string;
  /** Let the pickle name dangerous globals (os.system, eval, …). Off: such a root is refused. */
  allowDangerousGlobals?: boolean;
  signal?: AbortSignal;
}

export interface TorchSaveResult {
  path: string;
  bytes: number;
  storages: number;
}

interface PlannedStorage {
  key: string;
  bytes: number;
  write: (emit: (chunk: Uint8Array) => void) => void;
}

/** Pickles `root`, giving each distinct storage (by identity) a key "0", "1", … in order of first use. */
function plan(root: PyValue, opts: TorchSaveOptions): { pkl: Uint8Array; storages: PlannedStorage[]; sources: Set<string> } {
  const keys = new Map<object, PyTuple>();
  const storages: PlannedStorage[] = [];
  const sources = new Set<string>();
  const persistentId = (v: PyValue): PyValue | undefined => {
    if (!(v instanceof TorchStorage) && !(v instanceof NewStorage)) return undefined;
    const known = keys.get(v);
    if (known) return known;
    const key = String(storages.length);
    const es = dtypeSize(v.dtype);
    if (!es) throw new RepFuseError(`cannot save a storage of ${dtypeName(v.dtype)} elements.`);
    const bytes = v.numel * es;
    if (v instanceof TorchStorage) {
      if (v.offset < 0) throw new RepFuseError(`storage ${v.key} has no data location.`);
      const src = v.source;
      const at = v.offset;
      sources.add(path.resolve(src.name));
      storages.push({ key, bytes, write: (emit) => pipeRange(src, at, bytes, emit) });
    } else if (v.stream) {
      const stream = v.stream;
      storages.push({ key, bytes, write: (emit) => countedStream(stream, emit, bytes, v.dtype, v.numel) });
    } else {
      const produce = v.produce;
      storages.push({
        key,
        bytes,
        write: (emit) => {
          const b = produce();
          if (b.length !== bytes) throw new RepFuseError(`a new ${dtypeName(v.dtype)} storage of ${v.numel} elements produced ${b.length} bytes; ${bytes} expected.`);
          emit(b);
        },
      });
    }
    const pid = new PyTuple(['storage', new PyGlobal('torch', storageClassName(v.dtype)), key, opts.location ?? v.location, v.numel]);
    keys.set(v, pid);
    return pid;
  };
  const pkl = pickle(root, { persistentId, allowDangerousGlobals: opts.allowDangerousGlobals });
  return { pkl, storages, sources };
}

/** Runs a storage's stream, checking it emits exactly the planned byte count. */
export function countedStream(stream: (emit: (c: Uint8Array) => void) => void, emit: (c: Uint8Array) => void, bytes: number, dtype: DType, numel: number): void {
  let n = 0;
  stream((c) => {
    n += c.length;
    if (n > bytes) throw new RepFuseError(`a new ${dtypeName(dtype)} storage of ${numel} elements produced more than ${bytes} bytes.`);
    emit(c);
  });
  if (n !== bytes) throw new RepFuseError(`a new ${dtypeName(dtype)} storage of ${numel} elements produced ${n} bytes; ${bytes} expected.`);
}

async function writeArchive(
  sink: (chunk: Uint8Array) => void,
  pkl: Uint8Array,
  storages: PlannedStorage[],
  archiveName: string,
  signal?: AbortSignal,
): Promise<void> {
  const zw = new ZipWriter(sink);
  await zw.addBytes(`${archiveName}/data.pkl`, pkl);
  await zw.addBytes(`${archiveName}/byteorder`, Buffer.from('little', 'latin1'));
  // torch.save writes the records in the sorted order of their (string) keys.
  const sorted = storages.slice().sort((a, b) => (a.key < b.key ? -1 : a.key > b.key ? 1 : 0));
  let sinceYield = 0;
  for (const s of sorted) {
    await zw.add(`${archiveName}/data/${s.key}`, s.bytes, s.write);
    sinceYield += s.bytes;
    if (sinceYield > 16 << 20) {
      sinceYield = 0;
      await checkpoint(signal);
    }
  }
  await zw.addBytes(`${archiveName}/version`, Buffer.from('3\n', 'latin1'));
  zw.finish();
}

function checkArchiveName(name: string): string {
  if (!/^[A-Za-z0-9_.-]+$/.test(name) || name === '.' || name === '..') throw new RepFuseError(`invalid archive root name ${JSON.stringify(name)}.`);
  return name;
}

/**
 * Writes `root` as a torch.save zip checkpoint at `target`, atomically. Tensors are existing lazy
 * TorchTensors (their storages' bytes are streamed from the source file) or NewTensors (bytes
 * produced when written); storages shared by several tensors are written once, fp16 stays fp16.
 */
export async function writeTorchZip(target: string, root: PyValue, opts: TorchSaveOptions = {}): Promise<TorchSaveResult> {
  const abs = path.resolve(target);
  const archiveName = checkArchiveName(opts.archiveName ?? 'archive');
  const { pkl, storages, sources } = plan(root, opts);
  // Refuse to replace a file the tensors are read from.
  if (sources.has(abs)) throw new RepFuseError('refusing to overwrite the input checkpoint; choose another output path.', target);
  const bytes = await writeAtomically(abs, (sink) => writeArchive(sink, pkl, storages, archiveName, opts.signal), opts.signal);
  return { path: abs, bytes, storages: storages.length };
}

/** The same archive in memory (for small checkpoints and tests). */
export async function encodeTorchZip(root: PyValue, opts: TorchSaveOptions = {}): Promise<Uint8Array> {
  const archiveName = checkArchiveName(opts.archiveName ?? 'archive');
  const { pkl, storages } = plan(root, opts);
  const chunks: Uint8Array[] = [];
  await writeArchive((c) => chunks.push(c.slice()), pkl, storages, archiveName, opts.signal);
  return Buffer.concat(chunks);
}
