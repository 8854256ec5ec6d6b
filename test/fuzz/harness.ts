// The fuzzing harness: a pool of worker threads runs seeded cases of every reader; a watchdog on
// the main thread terminates a worker whose case runs past the time budget (a hang) and carries
// on with a fresh one. Collects, per reader: outcomes, the slowest case and the largest memory
// growth, and every invariant violation with what is needed to reproduce it.
import * as path from 'node:path';
import { Worker } from 'node:worker_threads';
import { loadCorpus, READERS, type Reader } from './corpus';
import { caseSeed, MAX_HOSTILE, makeCase } from './mutate';
import { type CaseResult, type FromWorker, HB_CASE, HB_READER, HB_START, type Task } from './worker';

export interface FuzzOptions {
  /** Cases per reader. */
  cases: number;
  seed: number;
  readers?: readonly Reader[];
  workers?: number;
  /** A case running longer than this is a hang (ms). */
  budgetMs?: number;
  /** Every n-th case also writes, re-opens and computes statistics (0: never). */
  deepEvery?: number;
  /**
   * A case may grow ArrayBuffer memory (where declared sizes would end up) by at most
   * memFactor × input size + memConstant, and the JS heap plus buffers by at most
   * heapFactor × input size + heapConstant (parsed objects cost a bounded multiple of their
   * bytes: a one-byte EMPTY_DICT opcode is a JS object of a few hundred bytes).
   */
  memFactor?: number;
  memConstant?: number;
  heapFactor?: number;
  heapConstant?: number;
  /** Cases per task handed to a worker. */
  chunk?: number;
  /** Largest hostile structure (nodes, items, nesting) the mutations build. */
  maxHostile?: number;
  onProgress?: (done: number, total: number) => void;
}

export interface ReaderStats {
  cases: number;
  ok: number;
  format: number;
  repfuse: number;
  /** Invariant violations. */
  other: number;
  multiline: number;
  roundtrip: number;
  hang: number;
  memory: number;
  maxMs: number;
  maxMsCase: number;
  maxMem: number;
  maxMemCase: number;
  maxMemSize: number;
  maxBuffers: number;
  maxBuffersCase: number;
  maxBuffersSize: number;
  /** Longest one-line error message (characters). */
  maxMessage: number;
  /** Cases that also wrote and re-opened (or computed statistics). */
  deep: number;
  stages: Record<string, number>;
}

export interface Failure {
  reader: Reader;
  index: number;
  kind: string;
  seedFile?: string;
  buffers?: number;
  desc?: string;
  size?: number;
  stage?: string;
  message?: string;
  stack?: string;
  ms?: number;
  mem?: number;
}

export interface FuzzReport {
  seed: number;
  options: Required<Omit<FuzzOptions, 'onProgress'>>;
  readers: Record<string, ReaderStats>;
  failures: Failure[];
  durationMs: number;
}

const emptyStats = (): ReaderStats => ({
  cases: 0, ok: 0, format: 0, repfuse: 0, other: 0, multiline: 0, roundtrip: 0, hang: 0, memory: 0,
  maxMs: 0, maxMsCase: -1, maxMem: 0, maxMemCase: -1, maxMemSize: 0, maxBuffers: 0, maxBuffersCase: -1, maxBuffersSize: 0, maxMessage: 0, deep: 0, stages: {},
});

interface Slot {
  worker: Worker;
  hb: Float64Array;
  task?: Task;
  /** Next case index of the task not reported yet. */
  next: number;
}

export async function runFuzz(opts: FuzzOptions): Promise<FuzzReport> {
  const o = {
    cases: opts.cases,
    seed: opts.seed,
    readers: opts.readers ?? READERS,
    workers: opts.workers ?? 2,
    budgetMs: opts.budgetMs ?? 10_000,
    deepEvery: opts.deepEvery ?? 4,
    memFactor: opts.memFactor ?? 4,
    // 24 MiB: the ONNX analysis now runs linear regions through a float64 evaluator whose working
    // set (probe tensors, each bounded by region.ts's evalLimitFor) adds a few MiB of ArrayBuffers
    // that the garbage collector may not have reclaimed when the case is measured.
    memConstant: opts.memConstant ?? 24 << 20,
    heapFactor: opts.heapFactor ?? 64,
    heapConstant: opts.heapConstant ?? 64 << 20,
    chunk: opts.chunk ?? 100,
    maxHostile: opts.maxHostile ?? MAX_HOSTILE,
  };
  const t0 = Date.now();
  const stats: Record<string, ReaderStats> = {};
  for (const r of o.readers) stats[r] = emptyStats();
  const failures: Failure[] = [];
  const queue: Task[] = [];
  for (const reader of o.readers) {
    for (let from = 0; from < o.cases; from += o.chunk) queue.push({ reader, seed: o.seed, from, to: Math.min(o.cases, from + o.chunk), deepEvery: o.deepEvery, maxHostile: o.maxHostile });
  }
  const total = o.cases * o.readers.length;
  let done = 0;

  const record = (r: CaseResult) => {
    const s = stats[r.reader];
    s.cases++;
    done++;
    s.stages[`${r.kind}@${r.stage}`] = (s.stages[`${r.kind}@${r.stage}`] ?? 0) + 1;
    if (r.kind === 'ok' || r.kind === 'format' || r.kind === 'repfuse' || r.kind === 'other' || r.kind === 'multiline' || r.kind === 'roundtrip') s[r.kind]++;
    if (['write', 'reopen', 'stats'].includes(r.stage)) s.deep++;
    if (r.ms > s.maxMs) {
      s.maxMs = r.ms;
      s.maxMsCase = r.index;
    }
    s.maxMessage = Math.max(s.maxMessage, r.messageLength ?? 0);
    if (r.mem > s.maxMem) {
      s.maxMem = r.mem;
      s.maxMemCase = r.index;
      s.maxMemSize = r.size;
    }
    if (r.buffers > s.maxBuffers) {
      s.maxBuffers = r.buffers;
      s.maxBuffersCase = r.index;
      s.maxBuffersSize = r.size;
    }
    const fail = (kind: string) => failures.push({ reader: r.reader, index: r.index, kind, seedFile: r.seedFile, desc: r.desc, size: r.size, stage: r.stage, message: r.message, stack: r.stack, ms: r.ms, mem: r.mem, buffers: r.buffers });
    if (r.kind === 'other' || r.kind === 'multiline' || r.kind === 'roundtrip') fail(r.kind);
    if (r.buffers > o.memFactor * r.size + o.memConstant || r.mem > o.heapFactor * r.size + o.heapConstant) {
      s.memory++;
      fail('memory');
    }
    opts.onProgress?.(done, total);
  };

  const describe = async (reader: Reader, index: number): Promise<Pick<Failure, 'seedFile' | 'desc' | 'size'>> => {
    try {
      const m = await makeCase(reader, await loadCorpus(reader), caseSeed(o.seed, reader, index), o.maxHostile);
      return { seedFile: m.seed, desc: m.desc, size: m.bytes.length };
    } catch (err) {
      return { desc: `(cannot regenerate: ${(err as Error).message})` };
    }
  };

  const pending: Promise<void>[] = [];
  await new Promise<void>((resolve, reject) => {
    const slots = new Set<Slot>();
    let finished = false;
    const finishIfIdle = () => {
      if (!finished && queue.length === 0 && [...slots].every((s) => !s.task)) {
        finished = true;
        clearInterval(watchdog);
        for (const s of slots) void s.worker.terminate();
        resolve();
      }
    };
    const assign = (slot: Slot) => {
      const task = queue.shift();
      slot.task = task;
      if (!task) return finishIfIdle();
      slot.next = task.from;
      slot.worker.postMessage(task);
    };
    /** A worker that hung or died: record the case it was on, requeue the rest of its task. */
    const lost = (slot: Slot, kind: string, message: string) => {
      slots.delete(slot);
      const task = slot.task;
      if (task) {
        const index = slot.hb[HB_START] > 0 && READERS[slot.hb[HB_READER]] === task.reader ? slot.hb[HB_CASE] : slot.next;
        const s = stats[task.reader];
        s.cases++;
        done++;
        if (kind === 'hang') s.hang++;
        else s.other++;
        const ms = slot.hb[HB_START] > 0 ? Date.now() - slot.hb[HB_START] : undefined;
        if (index + 1 < task.to) queue.unshift({ ...task, from: index + 1 });
        pending.push(describe(task.reader, index).then((d) => void failures.push({ reader: task.reader, index, kind, message, ms, ...d })));
      }
      spawn();
    };
    const spawn = () => {
      const hb = new Float64Array(new SharedArrayBuffer(8 * 3));
      const worker = new Worker(path.join(__dirname, 'worker.js'), {
        workerData: { fuzzWorker: true, heartbeat: hb.buffer },
        // The main thread's stack (~1 MB), not a worker's 4 MB: overflows show as they would in the CLI.
        resourceLimits: { maxOldGenerationSizeMb: 2048, stackSizeMb: 1 },
      });
      const slot: Slot = { worker, hb, next: 0 };
      slots.add(slot);
      let gone = false;
      worker.on('message', (m: FromWorker) => {
        if (m.type === 'results') {
          for (const r of m.results) {
            record(r);
            slot.next = r.index + 1;
          }
        } else if (m.type === 'done') assign(slot);
        else if (m.type === 'fatal') {
          gone = true;
          void worker.terminate();
          reject(new Error(`fuzz worker failed: ${m.message}`));
        }
      });
      worker.on('error', (err) => {
        if (gone || finished) return;
        gone = true;
        lost(slot, 'crash', `${err.name}: ${err.message}`.slice(0, 300));
      });
      worker.on('exit', (code) => {
        if (gone || finished || !slots.has(slot)) return;
        gone = true;
        lost(slot, 'crash', `worker exited with code ${code}`);
      });
      (slot as Slot & { kill?: () => void }).kill = () => {
        gone = true;
        void worker.terminate();
      };
      worker.once('online', () => assign(slot));
    };
    const watchdog = setInterval(() => {
      const now = Date.now();
      for (const s of [...slots]) {
        const start = s.hb[HB_START];
        if (start > 0 && now - start > o.budgetMs) {
          (s as Slot & { kill?: () => void }).kill?.();
          lost(s, 'hang', `no result after ${now - start} ms (budget ${o.budgetMs} ms)`);
        }
      }
    }, 100);
    for (let i = 0; i < o.workers; i++) spawn();
  });
  await Promise.all(pending);
  failures.sort((a, b) => a.reader.localeCompare(b.reader) || a.index - b.index);
  return { seed: o.seed, options: o, readers: stats, failures, durationMs: Date.now() - t0 };
}

const mib = (b: number) => `${(b / 1048576).toFixed(1)} MiB`;
const kib = (b: number) => `${(b / 1024).toFixed(0)} KiB`;

/** The per-reader table. */
export function formatTable(rep: FuzzReport): string {
  const head = ['reader', 'cases', 'parsed OK', 'FormatError', 'RepFuseError', 'other', 'hang', 'mem>limit', 'deep', 'max ms', 'max buffers Δ (input)', 'max heap+buffers Δ (input)', 'longest msg'];
  const rows = Object.entries(rep.readers).map(([name, s]) => [
    name, String(s.cases), String(s.ok), String(s.format), String(s.repfuse), String(s.other + s.multiline + s.roundtrip), String(s.hang), String(s.memory), String(s.deep),
    s.maxMs.toFixed(1), `${mib(s.maxBuffers)} (${kib(s.maxBuffersSize)})`, `${mib(s.maxMem)} (${kib(s.maxMemSize)})`, String(s.maxMessage),
  ]);
  const width = head.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i].length)));
  const line = (cells: string[]) => `| ${cells.map((c, i) => (i === 0 ? c.padEnd(width[i]) : c.padStart(width[i]))).join(' | ')} |`;
  return [line(head), `|${width.map((w, i) => (i === 0 ? '-'.repeat(w + 2) : `${'-'.repeat(w + 1)}:`)).join('|')}|`, ...rows.map(line)].join('\n');
}

export function formatFailure(f: Failure, rep: Pick<FuzzReport, 'seed' | 'options'>): string {
  const seed = rep.seed;
  const extra = `${rep.options.maxHostile !== MAX_HOSTILE ? ` --max-hostile ${rep.options.maxHostile}` : ''}${rep.options.deepEvery !== 4 ? ` --deep-every ${rep.options.deepEvery}` : ''}`;
  return [
    `${f.kind} in ${f.reader} case ${f.index} (seed ${seed}${f.seedFile ? `, from ${f.seedFile}` : ''}${f.size !== undefined ? `, ${f.size} bytes` : ''}${f.stage ? `, stage ${f.stage}` : ''})`,
    f.desc ? `  mutations: ${f.desc}` : '',
    f.message ? `  ${f.message}` : '',
    f.ms !== undefined ? `  ${f.ms.toFixed(0)} ms${f.mem !== undefined ? `, heap+buffers Δ ${mib(f.mem)}, buffers Δ ${mib(f.buffers ?? 0)}` : ''}` : '',
    f.stack ? f.stack.split('\n').map((l) => `    ${l}`).join('\n') : '',
    `  reproduce: node out/test/fuzz/run.js --reader ${f.reader} --seed ${seed} --case ${f.index}${extra}`,
  ].filter(Boolean).join('\n');
}
