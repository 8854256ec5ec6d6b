// Host side of the model worker: starts dist/model-worker.js on first use, matches responses to
// requests by id, forwards progress, cancels, and shuts the worker down. No `vscode` here, so the
// real worker is exercised by plain node:test tests.
import { Worker } from 'node:worker_threads';
import type { HostToWorker, WorkerError, WorkerRequestKind, WorkerRequests, WorkerToHost } from './protocol';

/** A failed worker request: the one-line message plus what kind of failure it was. */
export class WorkerRequestError extends Error {
  readonly cancelled: boolean;
  readonly kind: string;
  readonly outputWritten?: string;
  constructor(e: WorkerError) {
    super(e.message);
    this.name = 'WorkerRequestError';
    this.kind = e.name;
    this.cancelled = e.cancelled;
    this.outputWritten = e.outputWritten;
  }
}

export interface RequestOptions {
  onProgress?: (message: string) => void;
  /** Aborting sends `cancel` to the worker; the request then rejects with `cancelled: true`. */
  signal?: AbortSignal;
}

interface Waiting {
  resolve: (v: unknown) => void;
  reject: (e: Error) => void;
  onProgress?: (message: string) => void;
}

export class ModelWorkerClient {
  private worker: Worker | undefined;
  private next = 1;
  private readonly waiting = new Map<number, Waiting>();
  private disposed = false;

  /** `script`: absolute path of dist/model-worker.js. */
  constructor(private readonly script: string) {}

  /** True once the worker thread has been started (tests check activation does not start it). */
  get started(): boolean {
    return this.worker !== undefined;
  }

  private ensure(): Worker {
    if (this.disposed) throw new Error('the RepFuse model worker has been shut down.');
    if (this.worker) return this.worker;
    const w = new Worker(this.script, { stdout: false, stderr: false });
    w.on('message', (m: WorkerToHost) => this.onMessage(m));
    w.on('error', (err) => this.failAll(`the RepFuse model worker crashed: ${err.message}`));
    w.on('exit', (code) => {
      if (this.worker === w) this.worker = undefined;
      if (this.waiting.size) this.failAll(`the RepFuse model worker exited (code ${code}) while working${code === 134 || code === 1 ? ' (out of memory?)' : ''}.`);
    });
    // An idle worker does not keep the process alive; one with requests in flight does.
    w.unref();
    this.worker = w;
    return w;
  }

  private onMessage(m: WorkerToHost): void {
    const w = this.waiting.get(m.id);
    if (!w) return;
    if (m.type === 'progress') {
      w.onProgress?.(m.message);
      return;
    }
    this.waiting.delete(m.id);
    if (!this.waiting.size) this.worker?.unref();
    if (m.ok) w.resolve(m.result);
    else w.reject(new WorkerRequestError(m.error));
  }

  private failAll(message: string): void {
    const all = [...this.waiting.values()];
    this.waiting.clear();
    for (const w of all) w.reject(new WorkerRequestError({ name: 'Error', message, cancelled: false }));
  }

  request<K extends WorkerRequestKind>(kind: K, params: WorkerRequests[K]['params'], opts: RequestOptions = {}): Promise<WorkerRequests[K]['result']> {
    let worker: Worker;
    try {
      worker = this.ensure();
    } catch (err) {
      return Promise.reject(err);
    }
    if (opts.signal?.aborted) return Promise.reject(new WorkerRequestError({ name: 'Cancelled', message: 'cancelled.', cancelled: true }));
    const id = this.next++;
    return new Promise((resolve, reject) => {
      const onAbort = () => this.send(worker, { type: 'cancel', id });
      this.waiting.set(id, {
        resolve: (v) => {
          opts.signal?.removeEventListener('abort', onAbort);
          resolve(v as WorkerRequests[K]['result']);
        },
        reject: (e) => {
          opts.signal?.removeEventListener('abort', onAbort);
          reject(e);
        },
        onProgress: opts.onProgress,
      });
      worker.ref();
      this.send(worker, { type: 'request', id, kind, params } as HostToWorker);
      opts.signal?.addEventListener('abort', onAbort, { once: true });
    });
  }

  private send(w: Worker, m: HostToWorker): void {
    w.postMessage(m);
  }

  /**
   * Asks the worker to abort its jobs and clean up (temp files, cancelled outputs), then exit;
   * terminates it if it has not exited after `graceMs`.
   */
  async dispose(graceMs = 4000): Promise<void> {
    if (this.disposed) return;
    this.disposed = true;
    const w = this.worker;
    this.worker = undefined;
    if (!w) return;
    const exited = new Promise<void>((r) => w.once('exit', () => r()));
    w.postMessage({ type: 'shutdown' } satisfies HostToWorker);
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<'timeout'>((r) => {
      timer = setTimeout(() => r('timeout'), graceMs);
    });
    const how = await Promise.race([exited, timeout]);
    clearTimeout(timer);
    if (how === 'timeout') await w.terminate();
    this.failAll('RepFuse was shut down.');
  }
}
