// The repfuse command line: a thin shell over the engine. Exit codes: 0 success, 1 fused but over
// tolerance, 2 bad input or usage, 3 fused but validation could not run (crash, timeout).
import { parseArgs } from 'node:util';
import { oneLineError, RepFuseError } from './core/errors';
import { parseShape } from './core/onnx/inputs';
import { pendingTempFiles } from './core/atomic';
import { type FuseReport, renderFuse, renderInspect } from './core/report';
import type { InspectReport } from './core/model';
import { defaultFuseOptions, fuse, type FuseOptions, inspect } from './engine';
import { expandModelArgs, renderBatchSummary, runBatch, worstExitCode } from './cliBatch';
import { ValidationError } from './validate';
import { DType } from './core/dtype';
import { FAMILY_LIST } from './core/families';
import { DEFAULT_THRESHOLD_DB, renderQuant } from './core/quant';
import { analyzeQuant, defaultQuantOptions } from './validate/quantHost';
import * as fs from 'node:fs';

const USAGE = `repfuse — find and fuse structural re-parameterization blocks (RepVGG, YOLOv7 RepConv, MobileOne, ACNet, …)

Usage:
  repfuse inspect <model>... [--json] [--no-fold-bn] [--eps 1e-3] [--family NAME]
  repfuse quant <model> [--json] [--input name=1x3x640x640]... [--input-npy name=file.npy]...
               [--seed 0] [--threshold-db 30] [--timeout 300] [--no-fold-bn] [--eps 1e-3]
  repfuse fuse <model>... [-o out] [--force] [--json] [--no-validate] [--latency N] [--fold-bn | --no-fold-bn]
               [--input name=1x3x640x640]... [--input-npy name=file.npy]...
               [--atol 1e-4] [--rtol 1e-3] [--seed 0] [--timeout 300]
               [--eps 1e-3] [--family NAME] [--dtype keep|float32|float16|bfloat16] [--keep-modules | --state-dict]
               [--drop-aux] [--python PATH [--python-path DIR]...] [--fp16 [--force-fp16]]

<model> is an .onnx model, a PyTorch checkpoint (.pt/.pth/.ckpt: zip or legacy format, state_dict
or full-module pickle, read without Python and without running anything in it) or .safetensors.
Several models (or a folder: the model files in it, earlier *.fused.* outputs skipped) are done
one after the other, then one summary table; the exit code is the worst of theirs (-o needs one).

fuse reports what fusion buys: MACs (batch 1, Conv = N·Cout·H'·W'·(Cin/g)·kh·kw, Gemm/MatMul =
M·K·N) of the whole graph before and after, per block, at the input shapes (declared or --input);
for a checkpoint (no graph, no spatial size) the fused blocks' MACs per output position.
--latency N also measures the median latency of N runs of each model in onnxruntime (default
optimizations, same threads, after a warm-up; a checkpoint's one-block models, summed).

fuse writes <name>.fused.<ext> beside the input (never the input itself), then validates with
onnxruntime: an ONNX model runs whole, original against fused, per output and per block; a
checkpoint (which has no graph) is checked block by block. It passes when max|Δ| ≤ atol + rtol·max|y|.

Checkpoints: -o x.pt writes a fused state_dict with the family's deploy names (rbr_reparam,
reparam_conv, conv, fused_conv) for deploy_model.load_state_dict(torch.load(x.pt), strict=True);
-o x.safetensors the same tensors. A full-module checkpoint (YOLO's {'model': Model, …}) is by
default rewritten as a checkpoint with its blocks in deploy form (--state-dict to get a state_dict).
--fold-bn folds every plain Conv+BN as the family's official whole-model fuse does (YOLOv7/v9 and
Ultralytics Model.fuse(): conv gets the folded weight and a bias, bn deleted, forward = forward_fuse;
YOLOv6 fuse_model; RepViT replace_batchnorm: Conv2d_BN → Conv2d, BN_Linear → Linear, distillation
head averaged). Default: on for full-module YOLO checkpoints and for RepViT; --no-fold-bn keeps them.
--eps overrides BN epsilon (bare state_dicts use the family's training default, and say so).
--family NAME picks the variant a state_dict cannot show (parameterless branches leave no keys):
qarepvgg (YOLOv6 QARepVGGBlock, the default) or qarepvggv2 (QARepVGGBlockV2: + 3×3 avg-pool branch).
quant reports INT8/FP16 readiness of the weights as fuse would write them: per weight the INT8
SQNR (per tensor / per output channel), max/median channel range and FP16 overflow/subnormal counts;
per block the output SQNR when only its fused weight is INT8 (ONNX: all model outputs; checkpoints:
the block's own output) and its branches' BN gains; blocks below --threshold-db are listed as
fallback (keep them in higher precision).

--fp16 stores the output's float weights as float16 after checking them: a value with |w| > 65504
(it would become ±inf) makes fuse refuse with exit code 2 and name the tensors, unless --force-fp16;
subnormal values (0 < |w| < 2^-14) are reported. ONNX: every float32 initializer is stored as
float16 behind a Cast to float32 (inputs, outputs and computation stay float32; validation rtol
defaults to 1e-2); checkpoints: as --dtype float16.
--drop-aux turns a YOLO training checkpoint into the deploy architecture first: YOLOv9 yolov9-*
(DualDDetect, CBLinear/CBFuse auxiliary branch) → GELAN with DDetect; YOLOv7 P6 (IAuxDetect) →
Detect with the implicit knowledge folded; layers renumbered, yaml rewritten. ONNX: removes the
graph outputs that only auxiliary heads compute.

--python PATH (full-module checkpoints, opt-in): also load the original and the fused checkpoint
with that interpreter's PyTorch (torch.load(weights_only=False): this RUNS the checkpoint's pickled
code and imports your model classes; only for files you trust), run both whole models in eval mode
(float32) on the same seeded input (--input x=1x3x640x640, else 1×C×64×64 with C the first conv's
in-channels) and compare every output tensor. --python-path DIR (repeatable) goes first on
sys.path; default: the checkpoint's folder and its parents up to the nearest one that holds .git,
setup.py, setup.cfg or pyproject.toml. Without --python a checkpoint is checked block by block only.

Exit codes: 0 ok · 1 fused, but validation over tolerance · 2 bad input or usage · 3 fused, but
validation could not run · 130 interrupted (Ctrl-C): nothing written.`;

function fail(msg: string, code = 2): never {
  process.stderr.write(`repfuse: ${msg}\n`);
  process.exit(code);
}

function parseNumber(flag: string, v: string | undefined, dflt: number): number {
  if (v === undefined) return dflt;
  const n = Number(v);
  if (!Number.isFinite(n) || n < 0) throw new RepFuseError(`--${flag} needs a non-negative number, got '${v}'.`);
  return n;
}

function parsePairs(flag: string, values: string[] | undefined): [string, string][] {
  return (values ?? []).map((v) => {
    const i = v.lastIndexOf('=');
    if (i <= 0 || i === v.length - 1) throw new RepFuseError(`--${flag} expects name=value, got '${v}'.`);
    return [v.slice(0, i), v.slice(i + 1)];
  });
}

async function main(argv: string[]): Promise<number> {
  const { values, positionals } = parseArgs({
    args: argv,
    allowPositionals: true,
    options: {
      output: { type: 'string', short: 'o' },
      force: { type: 'boolean', default: false },
      json: { type: 'boolean', default: false },
      'no-validate': { type: 'boolean', default: false },
      'no-fold-bn': { type: 'boolean', default: false },
      'fold-bn': { type: 'boolean', default: false },
      input: { type: 'string', multiple: true },
      'input-npy': { type: 'string', multiple: true },
      atol: { type: 'string' },
      rtol: { type: 'string' },
      seed: { type: 'string' },
      timeout: { type: 'string' },
      eps: { type: 'string' },
      family: { type: 'string' },
      dtype: { type: 'string' },
      'keep-modules': { type: 'boolean', default: false },
      'state-dict': { type: 'boolean', default: false },
      'drop-aux': { type: 'boolean', default: false },
      python: { type: 'string' },
      'python-path': { type: 'string', multiple: true },
      'threshold-db': { type: 'string' },
      latency: { type: 'string' },
      fp16: { type: 'boolean', default: false },
      'force-fp16': { type: 'boolean', default: false },
      help: { type: 'boolean', short: 'h', default: false },
      version: { type: 'boolean', short: 'v', default: false },
    },
  });
  if (values.version) {
    // eslint-disable-next-line @typescript-eslint/no-require-imports
    process.stdout.write(`${require('../package.json').version}\n`);
    return 0;
  }
  const [cmd, ...files] = positionals;
  const file = files[0];
  const rest = cmd === 'quant' ? files.slice(1) : [];
  if (values.help || !cmd) {
    process.stdout.write(USAGE + '\n');
    return values.help ? 0 : 2;
  }
  if (cmd !== 'inspect' && cmd !== 'fuse' && cmd !== 'quant') throw new RepFuseError(`unknown command '${cmd}'; use inspect, fuse or quant (see --help).`);
  if (!file) throw new RepFuseError(`${cmd} needs a model file (see --help).`);
  if (rest.length) throw new RepFuseError(`unexpected argument '${rest[0]}'.`);
  if (!fs.existsSync(file)) throw new RepFuseError('no such file.', file);
  // Several models (or a folder): each in turn, then a summary table.
  const batch = cmd !== 'quant' && (files.length > 1 || fs.statSync(file).isDirectory()) ? expandModelArgs(files) : undefined;
  if (batch && values.output !== undefined) throw new RepFuseError('-o names one output file; with several models each is written beside its input.');
  const printBatch = async <R extends FuseReport | InspectReport>(one: (f: string) => Promise<{ report: R; exitCode: number }>, render: (r: R) => string): Promise<number> => {
    for (const sk of batch!.skipped) if (!values.json) process.stderr.write(`… skipping ${sk}\n`);
    const entries = await runBatch(
      batch!.files,
      async (f) => {
        if (!values.json) process.stdout.write(`\n=== ${f} ===\n`);
        const r = await one(f);
        if (!values.json) process.stdout.write(render(r.report) + '\n');
        return r;
      },
      controller.signal,
      (f, message) => process.stderr.write(`repfuse: ${message.startsWith(f) ? message : `${f}: ${message}`}\n`),
    );
    const code = worstExitCode(entries);
    process.stdout.write(values.json ? JSON.stringify({ models: entries, exitCode: code }, null, 2) + '\n' : `\n${renderBatchSummary(cmd as 'fuse' | 'inspect', entries)}\n`);
    return code;
  };
  const foldBN = !values['no-fold-bn'];
  const eps = values.eps === undefined ? undefined : parseNumber('eps', values.eps, 0);
  if (eps !== undefined && !(eps > 0)) throw new RepFuseError(`--eps must be positive, got '${values.eps}'.`);
  const family = values.family;
  const variants = FAMILY_LIST.filter((f) => 'variantOf' in f && f.variantOf).map((f) => f.id as string);
  if (family !== undefined && !variants.includes(family)) throw new RepFuseError(`--family must be one of ${variants.join(', ')} (the variants a state_dict cannot show); got '${family}'.`);

  if (cmd === 'inspect') {
    if (batch) return printBatch(async (f) => ({ report: inspect(f, { foldBN, eps, family }), exitCode: 0 }), renderInspect);
    const report = inspect(file, { foldBN, eps, family });
    process.stdout.write(values.json ? JSON.stringify(report, null, 2) + '\n' : renderInspect(report) + '\n');
    return 0;
  }

  const inputShapes: Record<string, number[]> = {};
  for (const [name, shape] of parsePairs('input', values.input)) inputShapes[name] = parseShape(shape);
  const inputNpy: Record<string, string> = {};
  for (const [name, f] of parsePairs('input-npy', values['input-npy'])) inputNpy[name] = f;
  // Ctrl-C aborts the job: writers stop at their next chunk and remove their temp files, the
  // validation child is killed, and an output already renamed into place is removed again. A
  // second Ctrl-C removes what is pending at once and exits.
  for (const sig of ['SIGINT', 'SIGTERM'] as const) {
    process.on(sig, () => {
      if (controller.signal.aborted) {
        cleanup();
        process.exit(130);
      }
      controller.abort(new RepFuseError(sig === 'SIGINT' ? 'interrupted.' : 'terminated.'));
    });
  }
  if (cmd === 'quant') {
    const thresholdDb = values['threshold-db'] === undefined ? DEFAULT_THRESHOLD_DB : Number(values['threshold-db']);
    if (!Number.isFinite(thresholdDb)) throw new RepFuseError(`--threshold-db needs a number, got '${values['threshold-db']}'.`);
    const q = await analyzeQuant(file, {
      ...defaultQuantOptions,
      foldBN,
      eps,
      seed: parseNumber('seed', values.seed, 0),
      thresholdDb,
      timeoutMs: parseNumber('timeout', values.timeout, defaultQuantOptions.timeoutMs / 1000) * 1000,
      inputShapes,
      inputNpy,
      signal: controller.signal,
      onProgress: values.json ? undefined : (m) => process.stderr.write(`… ${m}\n`),
    });
    process.stdout.write(values.json ? JSON.stringify(q, null, 2) + '\n' : renderQuant(q) + '\n');
    return 0;
  }
  if (values['keep-modules'] && values['state-dict']) throw new RepFuseError('--keep-modules and --state-dict exclude each other.');
  if (values['fold-bn'] && values['no-fold-bn']) throw new RepFuseError('--fold-bn and --no-fold-bn exclude each other.');
  if (values['python-path'] && values.python === undefined) throw new RepFuseError('--python-path needs --python (the interpreter that runs the end-to-end validation).');
  const dtypes: Record<string, DType | undefined> = { keep: undefined, float32: DType.float32, float16: DType.float16, bfloat16: DType.bfloat16, float64: DType.float64 };
  if (values.dtype !== undefined && !(values.dtype in dtypes)) throw new RepFuseError(`--dtype must be one of ${Object.keys(dtypes).join(', ')}, got '${values.dtype}'.`);
  const latencyRuns = values.latency === undefined ? 0 : Number(values.latency);
  if (values.latency !== undefined && !(Number.isInteger(latencyRuns) && latencyRuns >= 1 && latencyRuns <= 10_000)) {
    throw new RepFuseError(`--latency needs a number of runs from 1 to 10000, got '${values.latency}'.`);
  }
  if (values.latency !== undefined && values['no-validate']) throw new RepFuseError('--latency runs in the validation process; it cannot be combined with --no-validate.');
  const fuseOptions = (): FuseOptions => ({
    ...defaultFuseOptions,
    latencyRuns,
    foldBN,
    eps,
    family,
    dtype: values.dtype ? dtypes[values.dtype] : undefined,
    fp16: values.fp16 || values['force-fp16'],
    forceFp16: values['force-fp16'],
    keepModules: values['keep-modules'] ? true : values['state-dict'] ? false : undefined,
    dropAux: values['drop-aux'],
    checkpointFoldBN: values['fold-bn'] ? true : values['no-fold-bn'] ? false : undefined,
    python: values.python !== undefined ? { interpreter: values.python, path: values['python-path'] ?? [] } : undefined,
    rtolExplicit: values.rtol !== undefined,
    output: values.output,
    force: values.force,
    validate: !values['no-validate'],
    atol: parseNumber('atol', values.atol, defaultFuseOptions.atol),
    rtol: parseNumber('rtol', values.rtol, defaultFuseOptions.rtol),
    seed: parseNumber('seed', values.seed, 0),
    timeoutMs: parseNumber('timeout', values.timeout, defaultFuseOptions.timeoutMs / 1000) * 1000,
    inputShapes,
    inputNpy,
    signal: controller.signal,
    onProgress: values.json ? undefined : (m) => process.stderr.write(`… ${m}\n`),
  });
  const exitOf = (r: FuseReport) => (r.validation && !r.validation.passed ? 1 : 0);
  if (batch) return printBatch(async (f) => {
    const r = await fuse(f, fuseOptions());
    return { report: r, exitCode: exitOf(r) };
  }, renderFuse);
  const report = await fuse(file, fuseOptions());
  process.stdout.write(values.json ? JSON.stringify(report, null, 2) + '\n' : renderFuse(report) + '\n');
  return report.validation && !report.validation.passed ? 1 : 0;
}

const controller = new AbortController();

function cleanup(): void {
  for (const t of pendingTempFiles) fs.rmSync(t, { force: true });
}

main(process.argv.slice(2)).then(
  (code) => {
    cleanup();
    process.exitCode = code;
  },
  (err) => {
    cleanup();
    if (controller.signal.aborted) fail(`${oneLineError(controller.signal.reason).replace(/\.$/, '')}; nothing was written.`, 130);
    if (err instanceof ValidationError) fail(oneLineError(err), 3);
    if (err instanceof RepFuseError || (err as NodeJS.ErrnoException)?.code === 'ERR_PARSE_ARGS_UNKNOWN_OPTION' || (err as NodeJS.ErrnoException)?.code?.startsWith?.('ERR_PARSE_ARGS')) {
      fail(oneLineError(err));
    }
    const e = err as NodeJS.ErrnoException;
    if (e?.code && e.syscall) fail(`${e.path ?? ''}: ${e.code} (${e.syscall})`.replace(/^: /, ''));
    // Anything else is a bug in RepFuse: still one line, but say so.
    fail(`internal error: ${oneLineError(err)} (please report this with the model's inspect output).`);
  },
);
