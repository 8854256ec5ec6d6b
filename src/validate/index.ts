// Host side of validation: runs the worker in a child process with a timeout, so a native crash,
// a hang or an out-of-memory in onnxruntime ends with a clear error, not a dead host.
import { fork } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { RepFuseError } from '../core/errors';
import { supervise } from './child';
import type { ValidatePairsRequest, ValidateRequest, ValidationReport, WorkerMessage, WorkerRequest } from './protocol';
import { isQuantRequest, type QuantMeasurement } from './quantProtocol';

export type { ValidationReport, TensorDiff, BlockDiff } from './protocol';

export class ValidationError extends RepFuseError {
  constructor(message: string) {
    super(message);
    this.name = 'ValidationError';
  }
}

/** The worker script: next to this file when bundled (dist/), or compiled beside it (out/). */
export function workerScript(): string {
  const candidates = [path.join(__dirname, 'validate-worker.js'), path.join(__dirname, 'worker.js')];
  const found = candidates.find((c) => fs.existsSync(c));
  if (!found) throw new ValidationError(`the validation worker is missing (looked for ${candidates.join(', ')}); rebuild with npm run build.`);
  return found;
}

export interface ValidateOptions {
  timeoutMs: number;
  signal?: AbortSignal;
  onProgress?: (message: string) => void;
  /** Extra V8 flags for the child (tests use them to provoke failures). */
  execArgv?: string[];
  script?: string;
}

export function validateInChild(req: ValidateRequest | ValidatePairsRequest, opts: ValidateOptions): Promise<ValidationReport> {
  return runInChild<ValidationReport>(req, opts, 'the fused model was written but not validated');
}

/** Runs one job (validation or quantization) in the onnxruntime child process; `crashNote` ends a crash message. */
export function runInChild<R extends ValidationReport | QuantMeasurement>(req: WorkerRequest, opts: ValidateOptions, crashNote: string): Promise<R> {
  const quant = isQuantRequest(req);
  const what = quant ? 'the quantization analysis' : 'validation';
  const script = opts.script ?? workerScript();
  return new Promise((resolve, reject) => {
    const child = fork(script, [], {
      stdio: ['ignore', 'ignore', 'pipe', 'ipc'],
      execArgv: opts.execArgv ?? [],
      serialization: 'advanced',
    });
    let stderr = '';
    child.stderr?.on('data', (d: Buffer) => {
      stderr = (stderr + d.toString()).slice(-4000);
    });
    const job = supervise<R>(child, {
      timeoutMs: opts.timeoutMs,
      signal: opts.signal,
      timeoutError: () => new ValidationError(`${what} did not finish within ${Number((opts.timeoutMs / 1000).toPrecision(3))} s; the onnxruntime process was stopped (raise the timeout${quant ? '' : ', or use --no-validate'}).`),
      abortError: () => new ValidationError(`${what} cancelled.`),
    }, resolve, reject);
    if (job.settled) return;
    const finish = job.finish;
    child.on('message', (m: WorkerMessage) => {
      if (m.type === 'progress') opts.onProgress?.(m.message);
      else if (m.type === 'result') finish(undefined, m.report as R);
      else if (m.type === 'error') finish(new ValidationError(`${what} failed: ${m.message}`));
    });
    child.on('error', (err) => finish(new ValidationError(`cannot start the validation process: ${err.message}`)));
    child.on('exit', (code, signal) => {
      if (job.settled) return;
      const lines = stderr.trim().split('\n').filter(Boolean);
      const oomLine = lines.find((l) => /heap out of memory|std::bad_alloc|Allocation failed/i.test(l));
      // The line saying why, not the last frame of a native stack dump.
      const tail = (oomLine ?? lines.pop())?.trim();
      const oom = !!oomLine || signal === 'SIGKILL';
      const why = signal ? `was killed by ${signal}` : `exited with code ${code}`;
      finish(new ValidationError(`the onnxruntime ${quant ? 'quantization' : 'validation'} process ${why}${oom ? ' (out of memory?)' : ''}${tail ? `: ${tail}` : ''}; ${crashNote}.`));
    });
    child.send(req);
  });
}
