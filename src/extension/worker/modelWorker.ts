// The model worker: a worker_threads entry (bundled as dist/model-worker.js) that parses models,
// computes branch statistics and runs fuse jobs off the extension host's thread. It uses only the
// pure core and the engine; onnxruntime is still loaded only in the validation child process.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { parentPort } from 'node:worker_threads';
import { oneLineError, RepFuseError } from '../../core/errors';
import { pendingTempFiles } from '../../core/atomic';
import { blockStats } from '../../core/stats';
import { blockQuantDetail } from '../../core/quant';
import { analyzeQuant, defaultQuantOptions } from '../../validate/quantHost';
import { DType } from '../../core/dtype';
import * as engine from '../../engine';
import { ValidationError } from '../../validate';
import { type InspectOptions, inspectKey } from '../view/settings';
import type { HostToWorker, WorkerError, WorkerRequest, WorkerRequests, WorkerToHost } from './protocol';

/** A parsed model kept open while an editor shows it, so statistics need no re-parse. */
type OpenModel = engine.OpenedModel;

/** Engine options from the extension's settings (checkpoint epsilon and output dtype). */
function engineOptions(opts: InspectOptions): { foldBN: boolean; eps?: number; dtype?: DType } {
  const eps = opts.checkpoint.defaultEpsilon === 'auto' ? undefined : opts.checkpoint.defaultEpsilon;
  const dtype = opts.checkpoint.outputDtype === 'float32' ? DType.float32 : opts.checkpoint.outputDtype === 'float16' ? DType.float16 : undefined;
  return { foldBN: opts.foldBN, eps, dtype };
}

/** Opens a model for inspection and keeps it open for statistics: ONNX or a checkpoint. */
function openModel(file: string, opts: InspectOptions): OpenModel {
  return engine.openModel(file, engineOptions(opts));
}

interface CacheEntry {
  key: string;
  model: OpenModel;
}
const cache = new Map<string, CacheEntry>();

function keyOf(file: string, opts: InspectOptions): string {
  const st = fs.statSync(file);
  return `${inspectKey(opts)}|${st.size}|${st.mtimeMs}`;
}

/** The open model for a file, re-parsed when the file or the options changed. */
function modelFor(file: string, opts: InspectOptions): OpenModel {
  if (!fs.existsSync(file)) throw new RepFuseError('no such file.', file);
  const key = keyOf(file, opts);
  const hit = cache.get(file);
  if (hit && hit.key === key) return hit.model;
  if (hit) {
    cache.delete(file);
    hit.model.close();
  }
  const model = openModel(file, opts);
  cache.set(file, { key, model });
  return model;
}

function closeModel(file: string): void {
  const hit = cache.get(file);
  if (!hit) return;
  cache.delete(file);
  hit.model.close();
}

// ----- fuse jobs ---------------------------------------------------------------------------

const jobs = new Map<number, { controller: AbortController; done: Promise<unknown> }>();

/** Identity of a file before the job, to tell whether the job created or replaced it. */
function snapshot(p: string): string | null {
  try {
    const st = fs.statSync(p);
    return `${st.ino}|${st.size}|${st.mtimeMs}`;
  } catch {
    return null;
  }
}

/** Removes `p` when this job created or replaced it. */
function removeIfNew(p: string, before: string | null): void {
  const now = snapshot(p);
  if (now !== null && now !== before) fs.rmSync(p, { force: true });
}

function removeTempFiles(): void {
  for (const t of pendingTempFiles) {
    fs.rmSync(t, { force: true });
    pendingTempFiles.delete(t);
  }
}

class Cancelled extends Error {}

async function runFuse(id: number, file: string, o: WorkerRequests['fuse']['params']['options']) {
  const controller = new AbortController();
  const out = path.resolve(o.output);
  const data = `${out}.data`;
  const before = { out: snapshot(out), data: snapshot(data) };
  const run = (async () => {
    try {
      // Let a cancel sent right after the request arrive before any work starts.
      await new Promise((r) => setImmediate(r));
      controller.signal.throwIfAborted();
      const eo = engineOptions(o);
      return await engine.fuse(file, {
        ...engine.defaultFuseOptions,
        foldBN: o.foldBN,
        eps: eo.eps,
        dtype: eo.dtype,
        checkpointFoldBN: o.checkpoint.foldBN === 'on' ? true : o.checkpoint.foldBN === 'off' ? false : undefined,
        output: out,
        force: o.force,
        validate: o.validate,
        atol: o.atol,
        rtol: o.rtol,
        rtolExplicit: o.rtolExplicit,
        python: o.python,
        dropAux: o.dropAux,
        timeoutMs: o.timeoutMs,
        inputShapes: o.inputShapes,
        inputNpy: {},
        signal: controller.signal,
        onProgress: (message) => post({ type: 'progress', id, message }),
      });
    } catch (err) {
      if (controller.signal.aborted) {
        // A cancelled run leaves nothing: not the output (validation may have been running
        // after the rename), not its external data, not a temp file.
        removeIfNew(out, before.out);
        removeIfNew(data, before.data);
        removeTempFiles();
        throw new Cancelled('cancelled.');
      }
      if (err instanceof ValidationError && snapshot(out) !== before.out) (err as ValidationError & { outputWritten?: string }).outputWritten = out;
      throw err;
    }
  })();
  jobs.set(id, { controller, done: run.catch(() => undefined) });
  try {
    return await run;
  } finally {
    jobs.delete(id);
  }
}

// ----- message loop ------------------------------------------------------------------------

function post(m: WorkerToHost): void {
  parentPort!.postMessage(m);
}

function toWorkerError(err: unknown, file?: string): WorkerError {
  if (err instanceof Cancelled) return { name: 'Cancelled', message: 'cancelled.', cancelled: true };
  const name = err instanceof Error ? err.name : 'Error';
  const known = err instanceof RepFuseError;
  const message = known ? oneLineError(err, file) : `internal error: ${oneLineError(err, file)}`;
  const outputWritten = (err as { outputWritten?: string } | undefined)?.outputWritten;
  return { name, message, cancelled: false, ...(outputWritten ? { outputWritten } : {}) };
}

async function handle(m: WorkerRequest): Promise<unknown> {
  switch (m.kind) {
    case 'open':
      return modelFor(m.params.file, m.params.options).report;
    case 'blockStats':
      return blockStats(modelFor(m.params.file, m.params.options).blockData(m.params.block));
    case 'blockQuant':
      return blockQuantDetail(modelFor(m.params.file, m.params.options).blockData(m.params.block));
    case 'quant': {
      const eo = engineOptions(m.params.options);
      return analyzeQuant(m.params.file, {
        ...defaultQuantOptions,
        foldBN: eo.foldBN,
        eps: eo.eps,
        inputShapes: m.params.inputShapes,
        timeoutMs: m.params.timeoutMs,
        onProgress: (message) => post({ type: 'progress', id: m.id, message }),
      });
    }
    case 'close':
      closeModel(m.params.file);
      return null;
    case 'fuse':
      return runFuse(m.id, m.params.file, m.params.options);
  }
}

async function shutdown(): Promise<void> {
  for (const j of jobs.values()) j.controller.abort(new RepFuseError('RepFuse is shutting down.'));
  // Let aborted jobs remove their outputs, but do not hang on them.
  await Promise.race([Promise.allSettled([...jobs.values()].map((j) => j.done)), new Promise((r) => setTimeout(r, 3000))]);
  removeTempFiles();
  for (const f of [...cache.keys()]) closeModel(f);
  process.exit(0);
}

if (!parentPort) throw new Error('model-worker.js must run as a worker thread.');
parentPort.on('message', (m: HostToWorker) => {
  if (m.type === 'cancel') {
    jobs.get(m.id)?.controller.abort(new RepFuseError('cancelled.'));
    return;
  }
  if (m.type === 'shutdown') {
    void shutdown();
    return;
  }
  handle(m).then(
    (result) => post({ type: 'response', id: m.id, ok: true, result }),
    (err) => post({ type: 'response', id: m.id, ok: false, error: toWorkerError(err, 'file' in m.params ? m.params.file : undefined) }),
  );
});
