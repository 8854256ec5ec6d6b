// The fuzzer's seeds: the real fixtures of every format, loaded once per worker and pre-parsed
// (protobuf tree, zip directory, pickle instructions, safetensors header) so that structure-aware
// mutations know where the length fields and entries are.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { BufferSource } from '../../src/core/bytes';
import { DType } from '../../src/core/dtype';
import { encodeNpy } from '../../src/core/npy';
import { encodeSafetensors } from '../../src/core/safetensors';
import { readLegacyTorch } from '../../src/core/torch/legacy';
import { namedTensors, openTorch } from '../../src/core/torch/load';
import { ZipArchive } from '../../src/core/torch/zip';
import { repoRoot } from '../helpers/paths';
import { disassemble, type Instr } from './pickleops';
import { parseMessage, type PField } from './proto';

export const READERS = ['onnx', 'zip', 'pickle', 'legacy', 'safetensors', 'npy'] as const;
export type Reader = (typeof READERS)[number];

export interface ZipLayout {
  eocd: number;
  /** ZIP64 end record and locator offsets, when present. */
  z64Record?: number;
  z64Locator?: number;
  cdOffset: number;
  cdSize: number;
  /** Central directory records: [start, end) each. */
  records: { start: number; end: number; localOffset: number }[];
}

export interface Seed {
  name: string;
  bytes: Uint8Array;
  /** onnx */
  tree?: PField[];
  /** zip */
  zip?: ZipLayout;
  /** pickle: the archive's entries (data.pkl is replaced by the mutated pickle). */
  entries?: { name: string; data: Uint8Array }[];
  pklIndex?: number;
  /** pickle, legacy: the pickles' instructions. */
  pickles?: { start: number; end: number; instrs: Instr[] }[];
  /** legacy: offsets of the int64 element counts before each storage. */
  counts?: number[];
  /** safetensors: the parsed header. */
  header?: Record<string, unknown>;
}

const TORCH = path.join(repoRoot, 'test', 'fixtures', 'torch');
const ONNX = path.join(repoRoot, 'test', 'fixtures', 'onnx');
const EXAMPLES = path.join(repoRoot, 'examples');

function files(dir: string, re: RegExp): string[] {
  if (!fs.existsSync(dir)) return [];
  return fs.readdirSync(dir).filter((f) => re.test(f)).sort().map((f) => path.join(dir, f));
}

const isZip = (b: Uint8Array) => b.length > 4 && b[0] === 0x50 && b[1] === 0x4b && b[2] === 3 && b[3] === 4;

export function zipLayout(b: Uint8Array): ZipLayout {
  const dv = new DataView(b.buffer, b.byteOffset, b.length);
  let eocd = -1;
  for (let i = b.length - 22; i >= Math.max(0, b.length - 22 - 0xffff); i--) {
    if (dv.getUint32(i, true) === 0x06054b50) {
      eocd = i;
      break;
    }
  }
  if (eocd < 0) throw new Error('no EOCD');
  let cdOffset = dv.getUint32(eocd + 16, true);
  let cdSize = dv.getUint32(eocd + 12, true);
  let z64Record: number | undefined;
  let z64Locator: number | undefined;
  if (eocd >= 20 && dv.getUint32(eocd - 20, true) === 0x07064b50) {
    z64Locator = eocd - 20;
    z64Record = Number(dv.getBigUint64(z64Locator + 8, true));
    cdSize = Number(dv.getBigUint64(z64Record + 40, true));
    cdOffset = Number(dv.getBigUint64(z64Record + 48, true));
  }
  const records: ZipLayout['records'] = [];
  for (let p = cdOffset; p < cdOffset + cdSize; ) {
    const end = p + 46 + dv.getUint16(p + 28, true) + dv.getUint16(p + 30, true) + dv.getUint16(p + 32, true);
    records.push({ start: p, end, localOffset: dv.getUint32(p + 42, true) });
    p = end;
  }
  return { eocd, z64Record, z64Locator, cdOffset, cdSize, records };
}

function pickleChain(b: Uint8Array, count: number): { start: number; end: number; instrs: Instr[] }[] {
  const out: { start: number; end: number; instrs: Instr[] }[] = [];
  let at = 0;
  for (let i = 0; i < count && at < b.length; i++) {
    const d = disassemble(b, at);
    out.push({ start: at, end: d.end, instrs: d.instrs });
    at = d.end;
  }
  return out;
}

async function safetensorsSeeds(): Promise<Seed[]> {
  const seeds: Seed[] = [];
  for (const f of files(TORCH, /\.safetensors$/)) seeds.push({ name: path.basename(f), bytes: fs.readFileSync(f) });
  // More seeds: the zip state_dicts re-encoded (fp32 and fp16, int64 scalars included).
  for (const f of files(TORCH, /^(repvgg|acnet|qarepvgg|yolov7|ppyoloe|repvit)_sd(_fp16)?\.pt$/)) {
    const t = openTorch(new BufferSource(fs.readFileSync(f), f));
    const st = new Map(namedTensors(t.root));
    seeds.push({ name: `${path.basename(f)}.safetensors`, bytes: await encodeSafetensors(st, { metadata: { format: 'pt' } }) });
  }
  for (const s of seeds) {
    const n = Number(Buffer.from(s.bytes.buffer, s.bytes.byteOffset, 8).readBigUInt64LE(0));
    s.header = JSON.parse(Buffer.from(s.bytes.subarray(8, 8 + n)).toString('utf8')) as Record<string, unknown>;
  }
  return seeds;
}

function npySeeds(): Seed[] {
  const seen = new Set<string>();
  const seeds: Seed[] = [];
  for (const f of [...files(ONNX, /\.npy$/), ...files(TORCH, /\.npy$/)]) {
    const bytes = fs.readFileSync(f);
    const key = bytes.toString('base64');
    if (seen.has(key)) continue;
    seen.add(key);
    seeds.push({ name: path.basename(f), bytes });
  }
  // Other element types and shapes (0-d, empty, version 2 headers are made by the mutator).
  const mk = (name: string, dtype: DType, shape: number[], bytes: number) => seeds.push({ name, bytes: encodeNpy(dtype, shape, new Uint8Array(bytes).map((_, i) => (i * 37) & 0xff)) });
  mk('i64.npy', DType.int64, [3, 2], 48);
  mk('f16.npy', DType.float16, [5], 10);
  mk('u8.npy', DType.uint8, [2, 2, 2], 8);
  mk('scalar.npy', DType.float64, [], 8);
  mk('empty.npy', DType.float32, [0, 4], 0);
  return seeds;
}

/** Loads the seeds of one reader (deterministic order), as plain Uint8Arrays (copies). */
export async function loadCorpus(reader: Reader): Promise<Seed[]> {
  const seeds = await load(reader);
  for (const s of seeds) s.bytes = new Uint8Array(s.bytes);
  return seeds;
}

async function load(reader: Reader): Promise<Seed[]> {
  switch (reader) {
    case 'onnx': {
      const seeds: Seed[] = [];
      for (const f of [...files(ONNX, /\.onnx$/), ...files(EXAMPLES, /\.onnx$/)]) {
        const bytes = fs.readFileSync(f);
        seeds.push({ name: path.basename(f), bytes, tree: parseMessage(bytes, 'model') });
      }
      return seeds;
    }
    case 'zip': {
      const seeds: Seed[] = [];
      for (const f of files(TORCH, /\.(pt|pth)$/)) {
        const bytes = fs.readFileSync(f);
        if (isZip(bytes)) seeds.push({ name: path.basename(f), bytes, zip: zipLayout(bytes) });
      }
      return seeds;
    }
    case 'pickle': {
      const seeds: Seed[] = [];
      for (const f of files(TORCH, /\.(pt|pth)$/)) {
        const bytes = fs.readFileSync(f);
        if (!isZip(bytes)) continue;
        const zip = ZipArchive.open(new BufferSource(bytes, f));
        const entries = zip.entries.map((e) => ({ name: e.name, data: new Uint8Array(zip.read(e)) }));
        const pklIndex = entries.findIndex((e) => /^[^/]+\/data\.pkl$/.test(e.name));
        const pkl = entries[pklIndex].data;
        seeds.push({ name: path.basename(f), bytes: pkl, entries, pklIndex, pickles: pickleChain(pkl, 1) });
      }
      return seeds;
    }
    case 'legacy': {
      const seeds: Seed[] = [];
      for (const f of files(TORCH, /legacy\.pt$/)) {
        const bytes = fs.readFileSync(f);
        const l = readLegacyTorch(new BufferSource(bytes, f));
        seeds.push({ name: path.basename(f), bytes, pickles: pickleChain(bytes, 5), counts: l.storages.map((s) => s.offset - 8) });
      }
      return seeds;
    }
    case 'safetensors':
      return safetensorsSeeds();
    case 'npy':
      return npySeeds();
  }
}
