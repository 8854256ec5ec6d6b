// Host side of a validation session in the onnxruntime child: forked early (before the model is
// analyzed, so onnxruntime loads meanwhile), fed in stages, ended by one result. A crash, a hang,
// an out-of-memory or a cancel ends it with one ValidationError, whenever it happens: an error that
// comes while the host is still writing is kept and thrown when the host asks for the result.
import { type ChildProcess, fork } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import type { ValidatePairsRequest, ValidationReport, WorkerMessage } from './protocol';
import { type LatencyRequest, type LatencyResult, type ValidateBeginRequest, type ValidateFusedMessage, validationHeaderName } from './stagedProtocol';
import { type ValidateOptions, ValidationError, workerScript } from './index';

export type { LatencyResult } from './stagedProtocol';

export interface SessionResult<R> {
  report: R;
  latency?: LatencyResult;
}

/** The one-line error for a child that ended without answering (the line saying why, not a stack frame). */
export function childExitError(code: number | null, signal: NodeJS.Signals | null, stderr: string, note: string): ValidationError {
  const lines = stderr.trim().split('\n').filter(Boolean);
  const oomLine = lines.find((l) => /heap out of memory|std::bad_alloc|Allocation failed/i.test(l));
  const tail = (oomLine ?? lines.pop())?.trim();
  const oom = !!oomLine || signal === 'SIGKILL';
  const why = signal ? `was killed by ${signal}` : `exited with code ${code}`;
  return new ValidationError(`the onnxruntime validation process ${why}${oom ? ' (out of memory?)' : ''}${tail ? `: ${tail}` : ''}; ${note}.`);
}

export class ValidationSession<R = ValidationReport> {
  private readonly child: ChildProcess;
  private stderr = '';
  private timer: NodeJS.Timeout | undefined;
  private latency: LatencyResult | undefined;
  private settled = false;
  private readonly done: Promise<SessionResult<R>>;
  private resolveDone!: (r: SessionResult<R>) => void;
  private rejectDone!: (e: Error) => void;
  private readonly onAbort = () => this.fail(new ValidationError('validation cancelled.'));

  /** Forks the child now; it loads onnxruntime while the caller gets on with its work. */
  constructor(
    private readonly opts: ValidateOptions,
    private readonly note = 'the fused model was written but not validated',
  ) {
    this.done = new Promise<SessionResult<R>>((resolve, reject) => {
      this.resolveDone = resolve;
      this.rejectDone = reject;
    });
    this.done.catch(() => undefined); // kept until result() is asked for; never unhandled
    this.child = fork(opts.script ?? workerScript(), [], { stdio: ['ignore', 'ignore', 'pipe', 'ipc'], execArgv: opts.execArgv ?? [], serialization: 'advanced' });
    this.child.stderr?.on('data', (d: Buffer) => {
      this.stderr = (this.stderr + d.toString()).slice(-4000);
    });
    this.child.on('message', (m: WorkerMessage) => {
      if (m.type === 'progress') opts.onProgress?.(m.message);
      else if (m.type === 'latency') this.latency = m.latency;
      else if (m.type === 'result') this.succeed(m.report as R);
      else if (m.type === 'error') this.fail(new ValidationError(`validation failed: ${m.message}`));
    });
    this.child.on('error', (err) => this.fail(new ValidationError(`cannot start the validation process: ${err.message}`)));
    this.child.on('exit', (code, signal) => this.fail(childExitError(code, signal, this.stderr, this.note)));
    if (opts.signal?.aborted) this.onAbort();
    else opts.signal?.addEventListener('abort', this.onAbort, { once: true });
  }

  /** Starts the job; the timeout counts from here. */
  begin(req: ValidateBeginRequest | ValidatePairsRequest | LatencyRequest): void {
    if (this.settled) return;
    this.timer = setTimeout(() => {
      this.fail(new ValidationError(`validation did not finish within ${Number((this.opts.timeoutMs / 1000).toPrecision(3))} s; the onnxruntime process was stopped (raise the timeout, or use --no-validate).`));
    }, this.opts.timeoutMs);
    this.send(req);
  }

  /** Tells a staged session that the fused model is on disk. */
  fused(m: Omit<ValidateFusedMessage, 'type'>): void {
    this.send({ type: 'validate-fused', ...m });
  }

  /** The job's result, or the error that ended it (possibly one that came earlier). */
  result(): Promise<SessionResult<R>> {
    return this.done;
  }

  /** Stops the child (nothing more is wanted from it). */
  dispose(): void {
    this.fail(new ValidationError('validation was not needed.'));
  }

  /** Model files the child may have put a header beside. */
  private readonly models = new Set<string>();

  private send(m: object): void {
    for (const k of ['original', 'fused'] as const) {
      const f = (m as Record<string, unknown>)[k];
      if (typeof f === 'string') this.models.add(f);
    }
    for (const p of ((m as { pairs?: { unfused: string; fused: string }[] }).pairs ?? [])) this.models.add(p.unfused).add(p.fused);
    if (this.settled || !this.child.connected) return;
    this.child.send(m, (err) => {
      if (err) this.fail(childExitError(this.child.exitCode, this.child.signalCode, this.stderr, this.note));
    });
  }

  private end(): void {
    this.settled = true;
    clearTimeout(this.timer);
    this.opts.signal?.removeEventListener('abort', this.onAbort);
    if (this.child.exitCode === null && this.child.signalCode === null) this.child.kill('SIGKILL');
    // A child killed while it had a header model beside a model file cannot remove it: do it here.
    if (this.child.pid) {
      for (const m of this.models) {
        const header = path.join(path.dirname(path.resolve(m)), validationHeaderName(m, this.child.pid));
        fs.rmSync(header, { force: true });
        fs.rmSync(`${header}.copy`, { force: true });
      }
    }
  }

  private succeed(report: R): void {
    if (this.settled) return;
    this.end();
    this.resolveDone({ report, latency: this.latency });
  }

  private fail(err: Error): void {
    if (this.settled) return;
    this.end();
    this.rejectDone(err);
  }
}

/**
 * Median latency of an ONNX model and its fused output, each alone in onnxruntime (default
 * optimizations, same threads, after a warm-up), in the child process: the report's "Measure
 * speed-up". Reads nothing here (the child opens the models), so it may run on a UI thread.
 */
export async function measureSpeedup(req: Omit<LatencyRequest, 'type' | 'threads'> & { threads?: number }, opts: ValidateOptions): Promise<LatencyResult> {
  if (!/\.onnx$/i.test(req.original) || !/\.onnx$/i.test(req.fused)) throw new ValidationError('latency needs an ONNX model and its fused output (a checkpoint has no graph to run; fuse --latency measures its blocks).');
  const s = new ValidationSession<LatencyResult>(opts, 'latency was not measured');
  try {
    s.begin({ type: 'latency', threads: 0, ...req });
    return (await s.result()).report;
  } finally {
    s.dispose();
  }
}
