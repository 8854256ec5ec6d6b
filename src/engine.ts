// The fuse job shared by the CLI and the extension: analyze, write, validate in a child process.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { FormatError, FusionError, RepFuseError } from './core/errors';
import { readNpy } from './core/npy';
import { analyzeOnnx, type EngineOptions, onnxBlockData, openOnnx, writeFused } from './core/onnx';
import { type InputSpec, resolveInputs } from './core/onnx/inputs';
import type { FuseReport } from './core/report';
import type { BlockData, InspectReport } from './core/model';
import { validateInChild } from './validate';
import { DType, dtypeName } from './core/dtype';
import { analyzeCheckpoint, type CheckpointAnalysis, checkpointBlockData, writeCheckpoint, writtenValues } from './core/checkpoint';
import { checkOutputExtension, modelKind, type ModelKind } from './core/formats';
import { ckptBlockSpec } from './core/checkpoint/fuse';
import { fuseBlock } from './core/fusion';
import { buildBlockModels } from './core/onnx/blockmodel';
import * as os from 'node:os';
import { planEndToEnd, type PythonOptions, runEndToEnd } from './validate/python';

export interface FuseOptions extends EngineOptions {
  output?: string;
  /** Checkpoints: BN epsilon for every BN (overrides what the file says or the family default). */
  eps?: number;
  /** Checkpoints: convert float tensors to this dtype in the output. */
  dtype?: DType;
  /**
   * Checkpoints holding module objects: true = rewrite them in deploy form (the default for
   * full-module inputs written as .pt), false = write a fused state_dict.
   */
  keepModules?: boolean;
  /** rtol was given by the user (otherwise fp16 checkpoints get a float16-sized default). */
  rtolExplicit?: boolean;
  /**
   * Full-module checkpoints: also run the original and the fused checkpoint whole in the user's own
   * PyTorch (opt-in: this runs the checkpoint's pickled code).
   */
  python?: PythonOptions;
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

/** The engine path for a file (by the format registry); a one-line error for anything else. */
export { modelKind, type ModelKind };

/** `<dir>/<name>.fused<ext>` beside the input. */
export function defaultOutput(input: string, suffix = '.fused'): string {
  const ext = path.extname(input);
  return path.join(path.dirname(input), `${path.basename(input, ext)}${suffix}${ext}`);
}

/**
 * Runs the validation step of a fuse whose output is already written: if the job is cancelled
 * meanwhile, the output is removed again (a cancelled fuse leaves nothing behind) and the
 * cancellation's reason is thrown instead of the validation error.
 */
async function cancellable<T>(signal: AbortSignal | undefined, outputs: (string | null | undefined)[], run: () => Promise<T>): Promise<T> {
  try {
    const r = await run();
    if (!signal?.aborted) return r;
  } catch (err) {
    if (!signal?.aborted) throw err;
  }
  for (const o of outputs) if (o) fs.rmSync(o, { force: true });
  throw signal.reason ?? new RepFuseError('cancelled.');
}

/** Errors about the file's content from layers that do not know its name (fusion, module trees) get it. */
function naming(file: string, err: unknown): unknown {
  if ((err instanceof FormatError || err instanceof FusionError) && !err.file) err.file = file;
  return err;
}

/** A model opened for inspection and kept open for per-block statistics (ONNX or checkpoint). */
export interface OpenedModel {
  kind: ModelKind;
  report: InspectReport;
  /** Branch numbers of one block, read when asked. */
  blockData(block: string): BlockData;
  close(): void;
}

export function openModel(file: string, opts: EngineOptions & { eps?: number }): OpenedModel {
  try {
    const kind = modelKind(file); // a one-line error for anything else
    if (kind === 'checkpoint') {
      const a = analyzeCheckpoint(file, { eps: opts.eps });
      return { kind, report: a.report, blockData: (b) => checkpointBlockData(a, b), close: () => a.close() };
    }
    const model = openOnnx(file);
    try {
      const a = analyzeOnnx(model, opts);
      return { kind, report: a.report, blockData: (b) => onnxBlockData(a, b), close: () => model.close() };
    } catch (err) {
      model.close();
      throw err;
    }
  } catch (err) {
    throw naming(file, err);
  }
}

export function inspect(file: string, opts: EngineOptions & { eps?: number }): InspectReport {
  const m = openModel(file, opts);
  m.close();
  return m.report;
}

export async function fuse(input: string, opts: FuseOptions): Promise<FuseReport> {
  try {
    return await (modelKind(input) === 'checkpoint' ? fuseCheckpoint(input, opts) : fuseOnnx(input, opts));
  } catch (err) {
    throw naming(input, err);
  }
}

/** The output path, checked before anything is read: never the input, an existing folder, no silent replace. */
function outputPath(input: string, opts: FuseOptions): string {
  const out = path.resolve(opts.output ?? defaultOutput(input));
  if (out === path.resolve(input)) throw new RepFuseError('the output would overwrite the input; choose another -o.', input);
  checkOutputExtension(input, out);
  if (!fs.existsSync(path.dirname(out))) throw new RepFuseError(`the output folder ${path.dirname(out)} does not exist.`, input);
  if (fs.existsSync(out) && !opts.force) throw new RepFuseError(`${out} already exists; use --force to replace it.`, input);
  return out;
}

async function fuseOnnx(input: string, opts: FuseOptions): Promise<FuseReport> {
  const t0 = performance.now();
  const timings: Record<string, number> = {};
  const out = outputPath(input, opts);

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
    report.validation = await cancellable(opts.signal, [report.output, report.externalData], () =>
      validateInChild(
        { type: 'validate', original: input, fused: report.output!, blocks, inputs, seed: opts.seed, atol: opts.atol, rtol: opts.rtol, threads: 0 },
        { timeoutMs: opts.timeoutMs, signal: opts.signal, onProgress: opts.onProgress },
      ),
    );
    timings.validate = performance.now() - t2;
  }
  timings.total = performance.now() - t0;
  return report;
}

/** Output dtype of a checkpoint block: the option, else the block's own weights. */
function blockDtype(a: CheckpointAnalysis, name: string, opts: FuseOptions): DType {
  const b = a.primary.detection.blocks.find((x) => x.info.name === name)!;
  return opts.dtype ?? b.dtype;
}

async function fuseCheckpoint(input: string, opts: FuseOptions): Promise<FuseReport> {
  const t0 = performance.now();
  const timings: Record<string, number> = {};
  const out = outputPath(input, opts);
  const a = analyzeCheckpoint(input, { eps: opts.eps });
  let tmpDir: string | undefined;
  try {
    timings.analyze = performance.now() - t0;
    const w = a.primary;
    const outExt = path.extname(out).toLowerCase();
    // Full-module checkpoints are rewritten as checkpoints by default: the user's loader (e.g.
    // YOLO's attempt_load) expects ckpt['model'] to be a module, and a state_dict would break it.
    const keepModules = opts.keepModules ?? (a.modules.length > 0 && outExt !== '.safetensors');
    // The opt-in whole-model run in the user's PyTorch: its options are checked before anything is written.
    const endToEnd = opts.validate && opts.python ? planEndToEnd(input, opts.python, opts.inputShapes, a.modules.map((m) => m.entry), keepModules) : undefined;
    const report: FuseReport = {
      input,
      format: a.format,
      output: null,
      bytesWritten: 0,
      blocksFused: w.detection.blocks.length,
      bnFolded: 0,
      paramsBefore: a.report.model.paramCount,
      paramsAfter: a.report.paramCountAfter,
      inspect: a.report,
      validation: null,
      timingsMs: timings,
    };
    if (!w.detection.blocks.length) {
      report.validationSkipped = 'nothing to fuse';
      return report;
    }
    opts.onProgress?.(`writing ${path.basename(out)}`);
    const t1 = performance.now();
    const res = await writeCheckpoint(a, out, { dtype: opts.dtype, keepModules, signal: opts.signal });
    timings.write = performance.now() - t1;
    report.output = res.path;
    report.bytesWritten = res.bytes;
    report.inspect.model.notes.push(`wrote ${res.layout}${keepModules ? ' (module objects switched to deploy form, every other entry kept)' : ''}`);
    if (!opts.validate) {
      report.validationSkipped = '--no-validate';
      return report;
    }
    // A checkpoint has no graph of the whole network: each block is checked on its own, its
    // branches as the module defines them against the fused conv as written.
    opts.onProgress?.('validating blocks with onnxruntime');
    const t2 = performance.now();
    tmpDir = fs.mkdtempSync(path.join(os.tmpdir(), 'repfuse-blocks-'));
    const pairs: { block: string; unfused: string; fused: string; inputShape: number[] }[] = [];
    const dtypes = new Set<DType>();
    w.detection.blocks.forEach((b, i) => {
      const spec = ckptBlockSpec(b);
      const fused = fuseBlock(spec);
      const dt = blockDtype(a, b.info.name, opts);
      dtypes.add(dt);
      const asWritten = { shape: fused.shape, weight: Float64Array.from(writtenValues(fused.weight, dt)), bias: Float64Array.from(writtenValues(fused.bias, dt)) };
      // A family that keeps its post-add BN in the deploy model (QARepVGG) leaves it out of both sides.
      const models = buildBlockModels(spec, asWritten, b.stride);
      const u = path.join(tmpDir!, `b${i}.unfused.onnx`);
      const f = path.join(tmpDir!, `b${i}.fused.onnx`);
      fs.writeFileSync(u, models.unfused);
      fs.writeFileSync(f, models.fused);
      pairs.push({ block: b.info.name, unfused: u, fused: f, inputShape: models.inputShape });
    });
    let rtol = opts.rtol;
    const low = [...dtypes].filter((d) => d === DType.float16 || d === DType.bfloat16);
    if (low.length && !opts.rtolExplicit) {
      rtol = low.includes(DType.bfloat16) ? 1e-2 : 5e-3;
      report.inspect.model.notes.push(`fused weights are stored as ${low.map(dtypeName).join('/')}: rounding each weight costs ~${low.includes(DType.bfloat16) ? '4e-3' : '5e-4'} relative, so validation uses rtol ${rtol} (set --rtol to override)`);
    }
    report.validation = await cancellable(opts.signal, [report.output], () =>
      validateInChild({ type: 'validate-pairs', pairs, seed: opts.seed, atol: opts.atol, rtol }, { timeoutMs: opts.timeoutMs, signal: opts.signal, onProgress: opts.onProgress }),
    );
    if (endToEnd) {
      const blocks = report.validation;
      report.validation = await cancellable(opts.signal, [report.output], () =>
        runEndToEnd(endToEnd, blocks, { original: input, fused: report.output!, seed: opts.seed, atol: opts.atol, rtol, timeoutMs: opts.timeoutMs, signal: opts.signal, onProgress: opts.onProgress }),
      );
    }
    timings.validate = performance.now() - t2;
    timings.total = performance.now() - t0;
    return report;
  } finally {
    a.close();
    if (tmpDir) fs.rmSync(tmpDir, { recursive: true, force: true });
  }
}

