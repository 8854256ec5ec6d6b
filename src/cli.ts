// The repfuse command line: a thin shell over the engine. Exit codes: 0 success, 1 fused but over
// tolerance, 2 bad input or usage, 3 fused but validation could not run (crash, timeout).
import { parseArgs } from 'node:util';
import { oneLineError, RepFuseError } from './core/errors';
import { parseShape } from './core/onnx/inputs';
import { pendingTempFiles } from './core/onnx/writer';
import { renderFuse, renderInspect } from './core/report';
import { defaultFuseOptions, fuse, inspect } from './engine';
import { ValidationError } from './validate';
import * as fs from 'node:fs';

const USAGE = `repfuse — find and fuse structural re-parameterization blocks (RepVGG, YOLOv7 RepConv, MobileOne, ACNet, …)

Usage:
  repfuse inspect <model.onnx> [--json] [--no-fold-bn]
  repfuse fuse <model.onnx> [-o out.onnx] [--force] [--json] [--no-validate] [--no-fold-bn]
               [--input name=1x3x640x640]... [--input-npy name=file.npy]...
               [--atol 1e-4] [--rtol 1e-3] [--seed 0] [--timeout 300]

fuse writes <name>.fused.onnx beside the input (never the input itself), then runs original and
fused model in onnxruntime on the same inputs and reports the maximum output difference, per
output and per block. It passes when max|Δ| ≤ atol + rtol·max|y|.

Exit codes: 0 ok · 1 fused, but validation over tolerance · 2 bad input or usage · 3 fused, but
validation could not run.`;

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
      input: { type: 'string', multiple: true },
      'input-npy': { type: 'string', multiple: true },
      atol: { type: 'string' },
      rtol: { type: 'string' },
      seed: { type: 'string' },
      timeout: { type: 'string' },
      help: { type: 'boolean', short: 'h', default: false },
      version: { type: 'boolean', short: 'v', default: false },
    },
  });
  if (values.version) {
    // eslint-disable-next-line @typescript-eslint/no-require-imports
    process.stdout.write(`${require('../package.json').version}\n`);
    return 0;
  }
  const [cmd, file, ...rest] = positionals;
  if (values.help || !cmd) {
    process.stdout.write(USAGE + '\n');
    return values.help ? 0 : 2;
  }
  if (cmd !== 'inspect' && cmd !== 'fuse') throw new RepFuseError(`unknown command '${cmd}'; use inspect or fuse (see --help).`);
  if (!file) throw new RepFuseError(`${cmd} needs a model file (see --help).`);
  if (rest.length) throw new RepFuseError(`unexpected argument '${rest[0]}'.`);
  if (!fs.existsSync(file)) throw new RepFuseError('no such file.', file);
  const foldBN = !values['no-fold-bn'];

  if (cmd === 'inspect') {
    const report = inspect(file, { foldBN });
    process.stdout.write(values.json ? JSON.stringify(report, null, 2) + '\n' : renderInspect(report) + '\n');
    return 0;
  }

  const inputShapes: Record<string, number[]> = {};
  for (const [name, shape] of parsePairs('input', values.input)) inputShapes[name] = parseShape(shape);
  const inputNpy: Record<string, string> = {};
  for (const [name, f] of parsePairs('input-npy', values['input-npy'])) inputNpy[name] = f;
  const controller = new AbortController();
  process.once('SIGINT', () => controller.abort(new RepFuseError('interrupted.')));
  process.once('SIGTERM', () => controller.abort(new RepFuseError('terminated.')));
  const report = await fuse(file, {
    ...defaultFuseOptions,
    foldBN,
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
  process.stdout.write(values.json ? JSON.stringify(report, null, 2) + '\n' : renderFuse(report) + '\n');
  return report.validation && !report.validation.passed ? 1 : 0;
}

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
