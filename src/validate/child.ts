// One place for the lifecycle of a short-lived child job (onnxruntime worker, the user's Python):
// it settles exactly once, on its result, its error, its timeout or the caller's cancellation, and a
// child still running when it settles is killed (SIGKILL: a hung native call ignores SIGTERM).
import type { ChildProcess } from 'node:child_process';

export interface SuperviseOptions {
  timeoutMs: number;
  signal?: AbortSignal;
  /** The error the job ends with when it runs past `timeoutMs`. */
  timeoutError: () => Error;
  /** The error the job ends with when `signal` aborts (also when it was aborted before the start). */
  abortError: () => Error;
}

export interface Supervisor<R> {
  /** Settles the job: the first call wins, later ones are ignored. */
  finish(err: Error | undefined, result?: R): void;
  /** Whether the job has settled (an exit seen after a result is not an error). */
  readonly settled: boolean;
}

export function supervise<R>(child: ChildProcess, opts: SuperviseOptions, resolve: (r: R) => void, reject: (e: Error) => void): Supervisor<R> {
  let settled = false;
  const onAbort = () => finish(opts.abortError());
  const timer = setTimeout(() => finish(opts.timeoutError()), opts.timeoutMs);
  function finish(err: Error | undefined, result?: R): void {
    if (settled) return;
    settled = true;
    clearTimeout(timer);
    opts.signal?.removeEventListener('abort', onAbort);
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
    if (err) reject(err);
    else resolve(result as R);
  }
  // A spawn failure after an early settle must not become an unhandled 'error' event.
  child.on('error', () => undefined);
  if (opts.signal?.aborted) onAbort();
  else opts.signal?.addEventListener('abort', onAbort, { once: true });
  return {
    finish,
    get settled() {
      return settled;
    },
  };
}
