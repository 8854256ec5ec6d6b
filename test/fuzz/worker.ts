// A fuzzing worker thread: runs ranges of cases and reports per-case outcomes in batches. Before
// each case it writes (reader, case, start time) into shared memory, so the main thread's
// watchdog can see a case that runs too long and terminate this thread.
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { parentPort, workerData } from 'node:worker_threads';
import { loadCorpus, READERS, type Reader, type Seed } from './corpus';
import { caseSeed, MAX_HOSTILE, makeCase } from './mutate';
import { runTarget } from './targets';

export interface Task {
  reader: Reader;
  seed: number;
  from: number;
  to: number;
  deepEvery: number;
  maxHostile: number;
}

export interface CaseResult {
  reader: Reader;
  index: number;
  seedFile: string;
  desc: string;
  size: number;
  kind: string;
  stage: string;
  ms: number;
  /** Growth of heapUsed + arrayBuffers while the case ran (bytes). */
  mem: number;
  /** The ArrayBuffer part of it (what declared sizes would turn into). */
  buffers: number;
  message?: string;
  messageLength?: number;
  stack?: string;
}

export type FromWorker = { type: 'results'; results: CaseResult[] } | { type: 'done' } | { type: 'fatal'; message: string };

/** Heartbeat layout (Float64Array over a SharedArrayBuffer): reader index, case index, start ms (0 = idle). */
export const HB_READER = 0;
export const HB_CASE = 1;
export const HB_START = 2;

const corpora = new Map<Reader, Seed[]>();

async function corpus(reader: Reader): Promise<Seed[]> {
  let c = corpora.get(reader);
  if (!c) {
    c = await loadCorpus(reader);
    corpora.set(reader, c);
  }
  return c;
}

/** Runs one case and measures it (also used in-process to reproduce a case). */
export async function oneCase(reader: Reader, seed: number, index: number, deepEvery: number, dir: string, maxHostile = MAX_HOSTILE): Promise<CaseResult & { bytes: Uint8Array }> {
  const seeds = await corpus(reader);
  const m = await makeCase(reader, seeds, caseSeed(seed, reader, index), maxHostile);
  const before = process.memoryUsage();
  const t0 = performance.now();
  const o = await runTarget(reader, m.bytes, { dir, deep: deepEvery > 0 && index % deepEvery === 0, foldBN: index % 2 === 0 });
  const ms = performance.now() - t0;
  const after = process.memoryUsage();
  const buffers = Math.max(0, after.arrayBuffers - before.arrayBuffers);
  const mem = Math.max(0, after.heapUsed - before.heapUsed) + buffers;
  return { reader, index, seedFile: m.seed, desc: m.desc, size: m.bytes.length, kind: o.kind, stage: o.stage, ms, mem, buffers, message: o.message, messageLength: o.messageLength, stack: o.stack, bytes: m.bytes };
}

if (parentPort && workerData?.fuzzWorker) {
  const port = parentPort;
  const hb = new Float64Array(workerData.heartbeat as SharedArrayBuffer);
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'repfuse-fuzz-'));
  const cleanup = () => fs.rmSync(dir, { recursive: true, force: true });
  process.on('exit', cleanup);
  port.on('message', (task: Task | { type: 'exit' }) => {
    if ('type' in task) {
      cleanup();
      process.exit(0);
    }
    void (async () => {
      try {
        for (let i = task.from; i < task.to; i++) {
          hb[HB_READER] = READERS.indexOf(task.reader);
          hb[HB_CASE] = i;
          hb[HB_START] = Date.now();
          const r = await oneCase(task.reader, task.seed, i, task.deepEvery, dir, task.maxHostile);
          hb[HB_START] = 0;
          const res: CaseResult & { bytes?: Uint8Array } = { ...r };
          delete res.bytes;
          // One message per case: a worker terminated by the watchdog loses nothing already run.
          port.postMessage({ type: 'results', results: [res] } satisfies FromWorker);
        }
        port.postMessage({ type: 'done' } satisfies FromWorker);
      } catch (err) {
        port.postMessage({ type: 'fatal', message: (err as Error).stack ?? String(err) } satisfies FromWorker);
      }
    })();
  });
}
