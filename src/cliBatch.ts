// Several models in one `repfuse fuse` / `repfuse inspect`: the arguments expanded (a folder: its
// model files), each model run in turn, one summary table at the end, the exit code the worst.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { oneLineError, RepFuseError } from './core/errors';
import { isModelPath } from './core/formats';
import { benefitParts, type FuseReport, table, verdictLine } from './core/report';
import type { InspectReport } from './core/model';
import { ValidationError } from './validate';

/** An earlier fuse's output (`x.fused.onnx`): skipped when a folder is expanded. */
const FUSED_OUTPUT = /\.fused\.[^.]+$/i;

/**
 * The model files the arguments name: files as given (checked to exist), folders expanded to the
 * model files directly inside them, sorted, without earlier fuse outputs. `skipped` lists what a
 * folder held that was passed over, with why.
 */
export function expandModelArgs(args: string[]): { files: string[]; skipped: string[] } {
  const files: string[] = [];
  const skipped: string[] = [];
  for (const a of args) {
    let st: fs.Stats;
    try {
      st = fs.statSync(a);
    } catch {
      throw new RepFuseError('no such file.', a);
    }
    if (!st.isDirectory()) {
      files.push(a);
      continue;
    }
    const inside = fs
      .readdirSync(a, { withFileTypes: true })
      .filter((e) => e.isFile() && isModelPath(e.name))
      .map((e) => e.name)
      .sort();
    for (const n of inside) {
      if (FUSED_OUTPUT.test(n)) skipped.push(`${path.join(a, n)} (an earlier fuse's output)`);
      else files.push(path.join(a, n));
    }
    if (!inside.length) throw new RepFuseError('the folder holds no model files.', a);
  }
  return { files: [...new Set(files)], skipped };
}

/** The exit code a model's failure stands for (as for one model): 3 validation could not run, else 2. */
export function exitCodeOf(err: unknown): number {
  return err instanceof ValidationError ? 3 : 2;
}

/** One model's outcome in a batch. */
export interface BatchEntry {
  input: string;
  exitCode: number;
  report?: FuseReport | InspectReport;
  /** The one-line error when the model failed. */
  error?: string;
}

/** The worst exit code: the highest (0 ok < 1 over tolerance < 2 bad input < 3 not validated). */
export function worstExitCode(entries: BatchEntry[]): number {
  return entries.reduce((w, e) => Math.max(w, e.exitCode), 0);
}

const isFuse = (r: FuseReport | InspectReport | undefined): r is FuseReport => !!r && 'blocksFused' in r;

/** The summary table printed after the last model. */
export function renderBatchSummary(cmd: 'fuse' | 'inspect', entries: BatchEntry[]): string {
  const rows = entries.map((e) => {
    const name = e.input;
    if (!e.report) return [name, '-', '-', '', `error: ${e.error ?? ''}`, String(e.exitCode)];
    if (isFuse(e.report)) {
      const r = e.report;
      return [name, r.format, String(r.blocksFused), benefitParts(r.benefit).join(' · ') || '-', verdictLine(r).replace(/ · (block )?MACs [−+±].*$/, ''), String(e.exitCode)];
    }
    const r = e.report;
    return [name, r.model.format, String(r.blocks.length), '', `${r.rejected.length} rejected, ${r.folds.length} BN folds`, String(e.exitCode)];
  });
  const head = cmd === 'fuse' ? ['model', 'format', 'blocks', 'benefit', 'verdict', 'exit'] : ['model', 'format', 'blocks', '', 'notes', 'exit'];
  const worst = worstExitCode(entries);
  const failed = entries.filter((e) => e.exitCode !== 0).length;
  return [`${entries.length} models: ${failed ? `${failed} not ok` : 'all ok'}; exit code ${worst} (the worst of them)`, table(head, rows)].join('\n');
}

/**
 * Runs `one` for each file in turn; a failure is recorded (and printed to stderr) and the next
 * model runs. An interrupt (the signal aborted) stops the batch: it is rethrown.
 */
export async function runBatch<R extends FuseReport | InspectReport>(files: string[], one: (file: string) => Promise<{ report: R; exitCode: number }>, signal: AbortSignal, onError: (file: string, message: string) => void): Promise<BatchEntry[]> {
  const entries: BatchEntry[] = [];
  for (const file of files) {
    try {
      const r = await one(file);
      entries.push({ input: file, exitCode: r.exitCode, report: r.report });
    } catch (err) {
      if (signal.aborted) throw err;
      const message = oneLineError(err);
      onError(file, message);
      entries.push({ input: file, exitCode: exitCodeOf(err), error: message });
    }
  }
  return entries;
}
