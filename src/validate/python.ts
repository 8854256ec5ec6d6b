// Host side of the opt-in end-to-end check in the user's own PyTorch: runs pyval.py (shipped as
// dist/pyval.py) with the user's interpreter in a child process, with a timeout, and turns every
// way it can fail (no interpreter, no torch, model code that does not import, a crash, a hang)
// into a one-line ValidationError naming the file. This is the one place RepFuse lets a
// checkpoint's pickled code run, and only when the user asked for it.
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { RepFuseError } from '../core/errors';
import type { EndToEndInfo, TensorDiff, ValidationReport } from '../core/report';
import { supervise } from './child';
import { ValidationError } from './index';

/** Where the whole-model check runs: an interpreter and the folders its sys.path gains. */
export interface PythonOptions {
  /** A path or a command name looked up on PATH (`python3`). */
  interpreter: string;
  /** Folders put first on sys.path; empty = defaultPythonPath(checkpoint). */
  path: string[];
}

/** What pyval.py reads on stdin. */
export interface PythonRequest {
  original: string;
  fused: string;
  /** Checkpoint entries holding the rewritten modules ('' = the root object). */
  entries: string[];
  pythonPath: string[];
  inputShape: number[] | null;
  /** Spatial size of an inferred input (first Conv2d's in-channels × size × size). */
  defaultSize: number;
  seed: number;
  atol: number;
  rtol: number;
}

export interface PythonResult {
  info: EndToEndInfo;
  input: { shape: number[]; dtype: string };
  outputs: TensorDiff[];
  durationMs: number;
}

/** Spatial size of the inferred input: divisible by 32 (YOLO strides), small enough for a CPU. */
export const DEFAULT_INPUT_SIZE = 64;

/** Files whose folder is taken as the root of the user's Python project. */
const PROJECT_MARKERS = ['.git', 'setup.py', 'setup.cfg', 'pyproject.toml'];

/**
 * The default sys.path additions for a checkpoint: its folder and each parent, nearest first, up
 * to and including the nearest one holding .git, setup.py, setup.cfg or pyproject.toml; without
 * such a folder, every parent up to (not including) the file-system root.
 */
export function defaultPythonPath(checkpoint: string): string[] {
  const dirs: string[] = [];
  let dir = path.dirname(path.resolve(checkpoint));
  for (;;) {
    const up = path.dirname(dir);
    if (up === dir) break; // the file-system root itself is never added
    dirs.push(dir);
    if (PROJECT_MARKERS.some((m) => fs.existsSync(path.join(dir, m)))) break;
    dir = up;
  }
  return dirs;
}

/** The interpreter's absolute path: a path as given, a bare name looked up on PATH; undefined when not found. */
export function resolveInterpreter(interpreter: string, env: NodeJS.ProcessEnv = process.env): string | undefined {
  const isFile = (p: string) => {
    try {
      return fs.statSync(p).isFile();
    } catch {
      return false;
    }
  };
  if (!interpreter.trim()) return undefined;
  if (path.isAbsolute(interpreter) || /[\\/]/.test(interpreter)) return isFile(interpreter) ? path.resolve(interpreter) : undefined;
  const exts = process.platform === 'win32' ? ['', ...(env.PATHEXT ?? '.EXE;.CMD;.BAT').split(';')] : [''];
  for (const dir of (env.PATH ?? '').split(path.delimiter).filter(Boolean)) {
    for (const ext of exts) {
      const p = path.join(dir, interpreter + ext);
      if (isFile(p)) return p;
    }
  }
  return undefined;
}

/** Checks the interpreter before anything is written; a one-line error naming it otherwise. */
export function requireInterpreter(interpreter: string, file: string): string {
  const found = resolveInterpreter(interpreter);
  if (!found) throw new RepFuseError(`the Python interpreter '${interpreter}' was not found (give the path of a python with PyTorch, e.g. --python /usr/bin/python3).`, file);
  return found;
}

/** A checkpoint model has one input: the single --input shape (its name is not used), or null to infer it. */
export function checkpointInputShape(inputShapes: Record<string, number[]>, file: string): number[] | null {
  const shapes = Object.values(inputShapes);
  if (shapes.length > 1) throw new RepFuseError(`a checkpoint's model is run on one input; give one --input (got ${shapes.length}: ${Object.keys(inputShapes).join(', ')}).`, file);
  return shapes[0] ?? null;
}

/** pyval.py: beside the bundle (dist/), else in the source tree (tests compiled by tsc). */
export function pyvalScript(): string {
  const candidates = [path.join(__dirname, 'pyval.py')];
  for (let dir = __dirname; path.dirname(dir) !== dir; dir = path.dirname(dir)) {
    if (fs.existsSync(path.join(dir, 'package.json'))) {
      candidates.push(path.join(dir, 'src', 'validate', 'pyval.py'));
      break;
    }
  }
  const found = candidates.find((c) => fs.existsSync(c));
  if (!found) throw new ValidationError(`the end-to-end validation script is missing (looked for ${candidates.join(', ')}); rebuild with npm run build.`);
  return found;
}

export interface PythonRunOptions {
  /** Resolved interpreter path. */
  interpreter: string;
  timeoutMs: number;
  signal?: AbortSignal;
  onProgress?: (message: string) => void;
  script?: string;
}

interface PyReply {
  ok: boolean;
  stage?: string;
  file?: string | null;
  message?: string;
  torch?: string;
  python?: string;
  input?: { shape: number[]; dtype: string };
  models?: { entry: string; className: string }[];
  outputs?: TensorDiff[];
  durationMs?: number;
}

const NOT_VALIDATED = 'the fused checkpoint was written but not validated end to end';

function failure(message: string, file: string): ValidationError {
  const e = new ValidationError(`end-to-end validation could not run: ${message}; ${NOT_VALIDATED}.`);
  e.file = file;
  return e;
}

/** The reply's failure in words, with what the user can do about it. */
function explain(r: PyReply, req: PythonRequest, interpreter: string): string {
  const msg = r.message ?? 'no message';
  switch (r.stage) {
    case 'torch':
      return `${interpreter} ${msg} (use --python with an interpreter that has PyTorch)`;
    case 'import':
      return `${interpreter} ${msg} (the model's package must be on the Python path: ${req.pythonPath.length ? req.pythonPath.join(path.delimiter) : 'none given'}; add its folder with --python-path)`;
    case 'no-module':
      return `${msg} (end-to-end validation runs full-module checkpoints)`;
    default:
      return `${msg}`;
  }
}

/** Runs pyval.py; resolves with the per-output differences, rejects with a one-line ValidationError. */
export function validateInPython(req: PythonRequest, opts: PythonRunOptions): Promise<PythonResult> {
  const script = opts.script ?? pyvalScript();
  const file = req.original;
  return new Promise((resolve, reject) => {
    let stdout = '';
    let stderrTail = '';
    let partial = '';
    const child = spawn(opts.interpreter, [script], {
      stdio: ['pipe', 'pipe', 'pipe'],
      // No __pycache__ written into the user's (or our fixtures') folders; progress arrives at once.
      env: { ...process.env, PYTHONDONTWRITEBYTECODE: '1', PYTHONUNBUFFERED: '1' },
      windowsHide: true,
    });
    const job = supervise<PythonResult>(child, {
      timeoutMs: opts.timeoutMs,
      signal: opts.signal,
      timeoutError: () => failure(`${opts.interpreter} did not finish within ${Number((opts.timeoutMs / 1000).toPrecision(3))} s and was stopped (raise the timeout)`, file),
      abortError: () => new ValidationError('validation cancelled.'),
    }, resolve, reject);
    if (job.settled) return;
    const finish = job.finish;

    child.stdout.on('data', (d: Buffer) => {
      stdout = (stdout + d.toString()).slice(-(64 << 20));
    });
    child.stderr.on('data', (d: Buffer) => {
      const lines = (partial + d.toString()).split('\n');
      partial = lines.pop() ?? '';
      for (const line of lines) {
        const m = /^@@repfuse-progress (.*)$/.exec(line.trimEnd());
        if (m) opts.onProgress?.(`PyTorch: ${m[1]}`);
        else if (line.trim()) stderrTail = `${stderrTail}\n${line}`.slice(-4000);
      }
    });
    // The interpreter may exit before reading its request (a broken install): that is reported on exit.
    child.stdin.on('error', () => undefined);
    child.on('error', (err: NodeJS.ErrnoException) => {
      const why = err.code === 'ENOENT' ? 'was not found' : err.code === 'EACCES' ? 'is not executable' : `cannot be started (${err.message})`;
      finish(failure(`the Python interpreter ${opts.interpreter} ${why}`, file));
    });
    child.on('close', (code, signal) => {
      if (job.settled) return;
      const line = stdout.trim().split('\n').pop() ?? '';
      let reply: PyReply | undefined;
      try {
        reply = JSON.parse(line) as PyReply;
      } catch {
        reply = undefined;
      }
      if (!reply || typeof reply.ok !== 'boolean') {
        const lines = `${stderrTail}\n${partial}`.trim().split('\n').filter(Boolean);
        const tail = lines.pop()?.trim();
        const why = signal ? `was killed by ${signal}` : `exited with code ${code}`;
        finish(failure(`the Python process (${opts.interpreter}) ${why} without a result${tail ? `: ${tail}` : ''}`, file));
        return;
      }
      if (!reply.ok) {
        finish(failure(explain(reply, req, opts.interpreter), reply.file ?? file));
        return;
      }
      const models = reply.models ?? [];
      finish(undefined, {
        info: {
          interpreter: opts.interpreter,
          python: reply.python ?? '?',
          torch: reply.torch ?? '?',
          pythonPath: req.pythonPath,
          models,
        },
        input: reply.input ?? { shape: [], dtype: 'float32' },
        outputs: reply.outputs ?? [],
        durationMs: reply.durationMs ?? 0,
      });
    });
    child.stdin.end(JSON.stringify(req));
  });
}

/**
 * Adds the whole-model result to the block-by-block report (outputs, runtime, input, verdict); with
 * no block report (nothing was fused, e.g. only --drop-aux), the whole-model result is the report.
 */
export function withEndToEnd(v: ValidationReport | null, r: PythonResult, job: { seed: number; atol: number; rtol: number }): ValidationReport {
  const entries = r.info.models.map((m) => (m.entry ? `ckpt['${m.entry}']` : 'the checkpoint')).join(', ');
  const torch = `PyTorch ${r.info.torch} (Python ${r.info.python}, ${r.info.interpreter}, float32, eval mode)`;
  return {
    passed: (v?.passed ?? true) && r.outputs.every((o) => o.passed),
    atol: v?.atol ?? job.atol,
    rtol: v?.rtol ?? job.rtol,
    seed: job.seed,
    runtime: v ? `${v.runtime} for blocks; ${torch} for the whole model` : `${torch} for the whole model`,
    inputs: [...(v?.inputs ?? []), { name: `${entries} input`, shape: r.input.shape, dtype: r.input.dtype, source: `torch.rand, seed ${job.seed}, uniform [-1, 1)` }],
    outputs: r.outputs,
    blocks: v?.blocks ?? [],
    endToEnd: r.info,
    durationMs: (v?.durationMs ?? 0) + r.durationMs,
  };
}

/** The whole-model run a fuse will do, decided before anything is written; or why it will not run. */
export type EndToEndPlan = { interpreter: string; pythonPath: string[]; inputShape: number[] | null; entries: string[] } | { skipped: string };

/**
 * Checks the --python options of a checkpoint fuse up front (a missing interpreter or a bad --input
 * fails before anything is written). Whole-model validation compares module objects, original
 * against rewritten: a state_dict output has no model to run, so it is skipped with the reason.
 */
export function planEndToEnd(input: string, py: PythonOptions, inputShapes: Record<string, number[]>, moduleEntries: string[], keepModules: boolean): EndToEndPlan {
  const interpreter = requireInterpreter(py.interpreter, input);
  const inputShape = checkpointInputShape(inputShapes, input);
  if (!moduleEntries.length) return { skipped: 'end-to-end validation in PyTorch needs a full-module checkpoint; this one holds a state_dict, from which RepFuse cannot build a model' };
  if (!keepModules) return { skipped: 'end-to-end validation in PyTorch runs module objects, original against rewritten; the output is a state_dict; write a .pt without --state-dict to have it run' };
  return { interpreter, pythonPath: py.path.length ? py.path.map((p) => path.resolve(p)) : defaultPythonPath(input), inputShape, entries: moduleEntries };
}

/** Runs the planned whole-model check and adds it to the block-by-block report. */
export async function runEndToEnd(
  plan: EndToEndPlan,
  v: ValidationReport | null,
  job: { original: string; fused: string; seed: number; atol: number; rtol: number; timeoutMs: number; signal?: AbortSignal; onProgress?: (m: string) => void },
): Promise<ValidationReport | null> {
  if ('skipped' in plan) return v ? { ...v, endToEndSkipped: plan.skipped } : null;
  job.onProgress?.(`validating the whole model in PyTorch (${plan.interpreter})`);
  const r = await validateInPython(
    { original: job.original, fused: job.fused, entries: plan.entries, pythonPath: plan.pythonPath, inputShape: plan.inputShape, defaultSize: DEFAULT_INPUT_SIZE, seed: job.seed, atol: job.atol, rtol: job.rtol },
    { interpreter: plan.interpreter, timeoutMs: job.timeoutMs, signal: job.signal, onProgress: job.onProgress },
  );
  return withEndToEnd(v, r, job);
}
