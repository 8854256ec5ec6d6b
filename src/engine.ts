// The fuse job shared by the CLI and the extension: analyze, write, validate in a child process.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { RepFuseError } from './core/errors';
import { readNpy } from './core/npy';
import { analyzeOnnx, type EngineOptions, inspectOnnxFile, openOnnx, writeFused } from './core/onnx';
import { type InputSpec, resolveInputs } from './core/onnx/inputs';
import type { FuseReport } from './core/report';
import type { InspectReport } from './core/model';
import { validateInChild } from './validate';

export interface FuseOptions extends EngineOptions {
  output?: string;
  force: boolean;
  validate: boolean;
  atol: number;
  rtol: number;
  seed: number;
  timeoutMs: number;
  /** Shapes for dynamic input dimensions, by input name. */
  inputShapes: Record<string, number[]>;
  /** .npy files with real input data, by input name. */
  inputNpy: Record<string, string>;
  signal?: AbortSignal;
  onProgress?: (message: string) => void;
}

export const defaultFuseOptions: FuseOptions = {
  foldBN: true,
  force: false,
  validate: true,
  atol: 1e-4,
  rtol: 1e-3,
  seed: 0,
  timeoutMs: 300_000,
  inputShapes: {},
  inputNpy: {},
};

export type ModelKind = 'onnx';

export function modelKind(file: string): ModelKind {
  const ext = path.extname(file).toLowerCase();
  if (ext === '.onnx') return 'onnx';
  throw new RepFuseError(`unsupported file type '${ext || '(none)'}'; RepFuse reads .onnx models.`, file);
}

/** `<dir>/<name>.fused<ext>` beside the input. */
export function defaultOutput(input: string, suffix = '.fused'): string {
  const ext = path.extname(input);
  return path.join(path.dirname(input), `${path.basename(input, ext)}${suffix}${ext}`);
}

export function inspect(file: string, opts: EngineOptions): InspectReport {
  modelKind(file);
  return inspectOnnxFile(file, opts);
}

export async function fuse(input: string, opts: FuseOptions): Promise<FuseReport> {
  modelKind(input);
  const t0 = performance.now();
  const timings: Record<string, number> = {};
  const out = path.resolve(opts.output ?? defaultOutput(input));
  if (out === path.resolve(input)) throw new RepFuseError('the output would overwrite the input; choose another -o.', input);
  if (!fs.existsSync(path.dirname(out))) throw new RepFuseError(`the output folder ${path.dirname(out)} does not exist.`, input);
  if (fs.existsSync(out) && !opts.force) throw new RepFuseError(`${out} already exists; use --force to replace it.`, input);

  const model = openOnnx(input);
  let report: FuseReport;
  let blocks: { name: string; output: string; elemType: number }[];
  let inputs: InputSpec[] | undefined;
  try {
    const a = analyzeOnnx(model, opts);
    timings.analyze = performance.now() - t0;
    // Resolve validation inputs before writing, so a bad --input fails fast and writes nothing.
    if (opts.validate && (a.detection.blocks.length || a.detection.folds.length)) {
      const npy: Record<string, { file: string; shape: number[]; dtype: number }> = {};
      for (const [name, file] of Object.entries(opts.inputNpy)) {
        const arr = readNpy(file);
        npy[name] = { file, shape: arr.shape, dtype: arr.dtype };
      }
      inputs = resolveInputs(model, opts.inputShapes, npy);
    }
    blocks = a.detection.blocks.map((b) => ({ name: b.info.name, output: b.output, elemType: b.dtype }));
    report = {
      input,
      format: 'onnx',
      output: null,
      bytesWritten: 0,
      blocksFused: a.detection.blocks.length,
      bnFolded: a.detection.folds.length,
      nodesBefore: a.rewrite.summary.nodesBefore,
      nodesAfter: a.rewrite.summary.nodesAfter,
      paramsBefore: a.rewrite.summary.paramsBefore,
      paramsAfter: a.rewrite.summary.paramsAfter,
      inspect: a.report,
      validation: null,
      timingsMs: timings,
    };
    if (!a.detection.blocks.length && !a.detection.folds.length) {
      report.validationSkipped = 'nothing to fuse';
      return report;
    }
    opts.onProgress?.(`writing ${path.basename(out)}`);
    const t1 = performance.now();
    const res = await writeFused(a, out, opts.signal);
    timings.write = performance.now() - t1;
    report.output = res.path;
    report.bytesWritten = res.bytes;
    report.externalData = res.externalDataPath;
  } finally {
    model.close();
  }

  if (!opts.validate) {
    report.validationSkipped = '--no-validate';
  } else if (inputs) {
    opts.onProgress?.('validating with onnxruntime');
    const t2 = performance.now();
    report.validation = await validateInChild(
      { type: 'validate', original: input, fused: report.output!, blocks, inputs, seed: opts.seed, atol: opts.atol, rtol: opts.rtol, threads: 0 },
      { timeoutMs: opts.timeoutMs, signal: opts.signal, onProgress: opts.onProgress },
    );
    timings.validate = performance.now() - t2;
  }
  timings.total = performance.now() - t0;
  return report;
}
