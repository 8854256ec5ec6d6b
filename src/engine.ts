// The fuse job shared by the CLI and the extension: analyze, write, validate in a child process.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { FormatError, FusionError, oneLineError, RepFuseError } from './core/errors';
import { checkpointBenefit, countMacs, onnxBenefit } from './core/macs';
import { readNpy } from './core/npy';
import { analyzeOnnx, type EngineOptions, onnxBlockData, openOnnx, writeFused } from './core/onnx';
import { resolveInputs } from './core/onnx/inputs';
import { findOnnxAuxHeads, type OnnxDropAux, planDropAux } from './core/onnx/dropaux';
import { writeOnnx } from './core/onnx/writer';
import type { FuseReport } from './core/report';
import type { BlockData, InspectReport } from './core/model';
import { type ValidateOptions, type ValidationReport } from './validate';
import type { ValidatePairsRequest } from './validate/protocol';
import { type LatencyResult, ValidationSession } from './validate/session';
import { DType, dtypeName } from './core/dtype';
import { analyzeCheckpoint, type CheckpointAnalysis, checkpointBlockData, checkpointFolds, writeCheckpoint, writtenValues } from './core/checkpoint';
import { checkOutputExtension, modelKind, type ModelKind } from './core/formats';
import { ckptBlockSpec } from './core/checkpoint/fuse';
import { fuseBlock } from './core/fusion';
import { buildBlockModels } from './core/onnx/blockmodel';
import * as os from 'node:os';
import { checkpointFp16, enforceFp16, FP16_MODEL_RTOL, planFp16 } from './core/fp16';
import { planEndToEnd, type PythonOptions, runEndToEnd } from './validate/python';

export interface FuseOptions extends EngineOptions {
  output?: string;
  /** Checkpoints: BN epsilon for every BN (overrides what the file says or the family default). */
  eps?: number;
  /** Checkpoints: the family variant a state_dict cannot show (`--family qarepvggv2`; see src/core/families). */
  family?: string;
  /** Checkpoints: convert float tensors to this dtype in the output. */
  dtype?: DType;
  /**
   * Store float weights as float16 after the FP16 check: refuses when a value would overflow
   * (|w| > 65504) unless `forceFp16`; subnormal values are reported. ONNX: float32 initializers
   * become float16 behind a Cast to float32; checkpoints: --dtype float16.
   */
  fp16?: boolean;
  forceFp16?: boolean;
  /**
   * Checkpoints holding module objects: true = rewrite them in deploy form (the default for
   * full-module inputs written as .pt), false = write a fused state_dict.
   */
  keepModules?: boolean;
  /** YOLO training checkpoints: remove the auxiliary heads and branch first (the deploy architecture). */
  dropAux?: boolean;
  /**
   * Checkpoints (--fold-bn / --no-fold-bn): fold every plain Conv+BN as the family's official
   * whole-model fuse does (YOLO Model.fuse(), YOLOv6 fuse_model, RepViT replace_batchnorm).
   * Undefined = the default: on for full-module YOLO checkpoints and for RepViT, off otherwise.
   */
  checkpointFoldBN?: boolean;
  /** rtol was given by the user (otherwise fp16 checkpoints get a float16-sized default). */
  rtolExplicit?: boolean;
  /** After validating, measure the median latency of this many runs of each model (0 = do not). */
  latencyRuns?: number;
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

export function openModel(file: string, opts: EngineOptions & { eps?: number; family?: string }): OpenedModel {
  try {
    const kind = modelKind(file); // a one-line error for anything else
    if (kind === 'checkpoint') {
      const a = analyzeCheckpoint(file, { eps: opts.eps, family: opts.family });
      try {
        // What `fuse` would fold besides the blocks (its default; --no-fold-bn keeps them), and what
        // it would leave alone and why: said, not silently skipped. The folds themselves are listed by fuse.
        const plan = checkpointFolds(a.primary, opts.foldBN === false ? false : undefined, opts.eps, a.modules.length > 0);
        if (plan.note) a.report.model.notes.push(`on fuse: ${plan.note}`);
        a.report.notFolded.push(...plan.notFolded);
      } catch (err) {
        a.close();
        throw err;
      }
      return { kind, report: a.report, blockData: (b) => checkpointBlockData(a, b), close: () => a.close() };
    }
    const model = openOnnx(file);
    try {
      const a = analyzeOnnx(model, opts);
      const aux = findOnnxAuxHeads(model);
      if (aux.length) {
        a.report.model.auxHeads = aux;
        a.report.model.notes.push(`auxiliary training head${aux.length === 1 ? '' : 's'} ${aux.join(', ')}: \`repfuse fuse --drop-aux\` removes the outputs only they compute`);
      }
      return { kind, report: a.report, blockData: (b) => onnxBlockData(a, b), close: () => model.close() };
    } catch (err) {
      model.close();
      throw err;
    }
  } catch (err) {
    throw naming(file, err);
  }
}

export function inspect(file: string, opts: EngineOptions & { eps?: number; family?: string }): InspectReport {
  const m = openModel(file, opts);
  m.close();
  return m.report;
}

export async function fuse(input: string, opts: FuseOptions): Promise<FuseReport> {
  try {
    if (modelKind(input) === 'checkpoint') return await fuseCheckpoint(input, opts);
    return await (opts.dropAux ? fuseOnnxDropAux(input, opts) : fuseOnnx(input, opts));
  } catch (err) {
    throw naming(input, err);
  }
}

const dropAuxInfo = (p: OnnxDropAux): FuseReport['dropAuxOnnx'] => ({
  heads: p.heads,
  removedOutputs: p.removedOutputs,
  keptOutputs: p.keptOutputs,
  removedNodes: p.removedNodes,
  removedInitializers: p.removedInitializers,
  note: p.note,
});

/**
 * ONNX with --drop-aux: the graph outputs only auxiliary heads compute are pruned into a temporary
 * model beside the output (exact: the kept outputs need none of the removed nodes), which is then
 * fused and validated as usual; the report names the input and what was removed.
 */
async function fuseOnnxDropAux(input: string, opts: FuseOptions): Promise<FuseReport> {
  const out = outputPath(input, opts);
  const model = openOnnx(input);
  let pruned: OnnxDropAux;
  const tmp = path.join(path.dirname(out), `.${path.basename(out, '.onnx')}.repfuse-aux-${process.pid}.onnx`);
  let tmpData: string | undefined;
  try {
    pruned = planDropAux(model);
    if (!pruned.removedOutputs.length) {
      model.close();
      const r = await fuseOnnx(input, opts);
      r.dropAuxOnnx = dropAuxInfo(pruned);
      r.inspect.model.notes.push(`--drop-aux: ${pruned.note}`);
      return r;
    }
    tmpData = (await writeOnnx(model, pruned.plan, tmp, { externalData: 'auto' })).externalDataPath;
  } finally {
    model.close();
  }
  try {
    const r = await fuseOnnx(tmp, { ...opts, output: out });
    r.input = input;
    r.inspect.model.path = input;
    r.dropAuxOnnx = dropAuxInfo(pruned);
    r.inspect.model.notes.push(`--drop-aux: ${pruned.note}`);
    if (!r.output) {
      // Nothing to fuse: the pruned model is the output.
      if (tmpData) throw new RepFuseError('--drop-aux pruned the model but found nothing to fuse, and the pruned model uses external data; nothing written.', input);
      fs.renameSync(tmp, out);
      r.output = out;
      r.bytesWritten = fs.statSync(out).size;
    }
    return r;
  } finally {
    fs.rmSync(tmp, { force: true });
    if (tmpData) fs.rmSync(tmpData, { force: true });
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
  // The validation child starts now, so onnxruntime loads while the model is analyzed, and the
  // original model runs in it while the fused one is being written here.
  const session = opts.validate ? new ValidationSession({ timeoutMs: opts.timeoutMs, signal: opts.signal, onProgress: opts.onProgress }) : undefined;
  try {
    const model = openOnnx(input);
    let report: FuseReport;
    let began = false;
    let inputShapes = opts.inputShapes;
    try {
      const a = analyzeOnnx(model, opts);
      timings.analyze = performance.now() - t0;
      const fp16Notes = opts.fp16 ? enforceFp16(planFp16(model, a.rewrite.plan), !!opts.forceFp16, input) : undefined;
      if (fp16Notes) a.report.model.notes.push(...fp16Notes);
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
      if (!a.detection.blocks.length && !a.detection.folds.length && !fp16Notes) {
        report.validationSkipped = 'nothing to fuse';
        return report;
      }
      if (session) {
        // Resolve validation inputs before writing, so a bad --input fails fast and writes nothing.
        const npy: Record<string, { file: string; shape: number[]; dtype: number }> = {};
        for (const [name, file] of Object.entries(opts.inputNpy)) {
          const arr = readNpy(file);
          npy[name] = { file, shape: arr.shape, dtype: arr.dtype };
        }
        const inputs = resolveInputs(model, opts.inputShapes, npy);
        inputShapes = Object.fromEntries(inputs.map((i) => [i.name, i.shape]));
        const blocks = a.detection.blocks.map((b) => ({ name: b.info.name, output: b.output, elemType: b.dtype }));
        session.begin({ type: 'validate-begin', original: input, outputs: model.graph.outputs.map((o) => o.name), blocks, inputs, seed: opts.seed, threads: 0, latencyRuns: opts.latencyRuns ?? 0 });
        began = true;
      }
      opts.onProgress?.(`writing ${path.basename(out)}`);
      const t1 = performance.now();
      const res = await writeFused(a, out, opts.signal);
      timings.write = performance.now() - t1;
      report.output = res.path;
      report.bytesWritten = res.bytes;
      report.externalData = res.externalDataPath;
      // MACs of both graphs (while the child runs the original): never a reason to fail the fuse.
      const t3 = performance.now();
      try {
        const fusedModel = openOnnx(res.path);
        try {
          report.benefit = onnxBenefit(countMacs(model, inputShapes), countMacs(fusedModel, inputShapes), a.detection.blocks);
        } finally {
          fusedModel.close();
        }
      } catch (err) {
        report.inspect.model.notes.push(`MACs not counted: ${oneLineError(err)}`);
      }
      timings.macs = performance.now() - t3;
    } finally {
      model.close();
    }

    if (!opts.validate) {
      report.validationSkipped = '--no-validate';
    } else if (session && began) {
      opts.onProgress?.('validating with onnxruntime');
      const t2 = performance.now();
      session.fused({ fused: report.output!, atol: opts.atol, rtol: opts.fp16 && !opts.rtolExplicit ? FP16_MODEL_RTOL : opts.rtol });
      const r = await cancellable(opts.signal, [report.output, report.externalData], () => session.result());
      report.validation = r.report;
      if (r.latency) setLatency(report, r.latency);
      // The wait after writing; the original model ran while the fused one was written.
      timings.validate = performance.now() - t2;
    }
    timings.total = performance.now() - t0;
    return report;
  } finally {
    session?.dispose();
  }
}

/** Latency from the child, into the report's benefit. */
function setLatency(report: FuseReport, l: LatencyResult): void {
  if (report.benefit) report.benefit.latencyMs = { before: l.before, after: l.after, runs: l.runs, threads: l.threads, scope: l.scope };
}

/** Block-by-block validation in the child; latency (when asked) goes into the report's benefit. */
async function pairsInChild(report: FuseReport, req: ValidatePairsRequest, opts: ValidateOptions): Promise<ValidationReport> {
  const session = new ValidationSession(opts);
  try {
    session.begin(req);
    const r = await session.result();
    if (r.latency) setLatency(report, r.latency);
    return r.report;
  } finally {
    session.dispose();
  }
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
  if (opts.fp16) {
    if (opts.dtype !== undefined && opts.dtype !== DType.float16) throw new RepFuseError(`--fp16 and --dtype ${dtypeName(opts.dtype)} exclude each other.`, input);
    opts = { ...opts, dtype: DType.float16 };
  }
  const a = analyzeCheckpoint(input, { eps: opts.eps, family: opts.family, dropAux: opts.dropAux });
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
    const converted = a.dropAux?.some((d) => d.converted) ?? false;
    if (a.dropAux) report.dropAux = a.dropAux;
    if (converted && !keepModules) throw new RepFuseError('--drop-aux rewrites the model objects: write a .pt checkpoint (without --state-dict).', input);
    const foldPlan = checkpointFolds(w, opts.checkpointFoldBN, opts.eps, keepModules);
    if (opts.fp16) report.inspect.model.notes.push(...enforceFp16(checkpointFp16(w, foldPlan.folds), !!opts.forceFp16, input));
    if (!w.detection.blocks.length && !converted && !opts.fp16 && !foldPlan.folds.length) {
      if (foldPlan.note) report.inspect.model.notes.push(foldPlan.note);
      report.validationSkipped = 'nothing to fuse';
      return report;
    }
    opts.onProgress?.(`writing ${path.basename(out)}`);
    const t1 = performance.now();
    const res = await writeCheckpoint(a, out, { dtype: opts.dtype, keepModules, foldBN: opts.checkpointFoldBN, eps: opts.eps, signal: opts.signal });
    timings.write = performance.now() - t1;
    report.output = res.path;
    report.bytesWritten = res.bytes;
    // Whole-model folds (--fold-bn): listed, counted, and said to be outside the per-block check.
    report.inspect.folds.push(...res.folds);
    report.inspect.notFolded.push(...res.notFolded);
    report.bnFolded = res.folds.length;
    report.paramsAfter += res.paramsDelta;
    for (const n of res.foldNotes) report.inspect.model.notes.push(`${n}${res.folds.length ? ' — folded in float64, rounded once; not part of the block-by-block validation' : ''}`);
    report.inspect.model.notes.push(`wrote ${res.layout}${keepModules ? ' (module objects switched to deploy form, every other entry kept)' : ''}`);
    if (w.detection.blocks.length) report.benefit = checkpointBenefit(w.detection.blocks.map((b) => b.info));
    if (!opts.validate) {
      report.validationSkipped = '--no-validate';
      return report;
    }
    if (!w.detection.blocks.length) {
      if (endToEnd && !('skipped' in endToEnd)) {
        report.validation = await cancellable(opts.signal, [report.output], () =>
          runEndToEnd(endToEnd, null, { original: input, fused: report.output!, seed: opts.seed, atol: opts.atol, rtol: opts.rtol, timeoutMs: opts.timeoutMs, signal: opts.signal, onProgress: opts.onProgress }),
        );
        return report;
      }
      report.validationSkipped = 'no block was fused; the --drop-aux conversion and --fold-bn folds are checked end to end only by the Python validation';
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
      pairsInChild(report, { type: 'validate-pairs', pairs, seed: opts.seed, atol: opts.atol, rtol, latencyRuns: opts.latencyRuns ?? 0 }, { timeoutMs: opts.timeoutMs, signal: opts.signal, onProgress: opts.onProgress }),
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


