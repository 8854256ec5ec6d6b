// The opt-in end-to-end validation in the user's own PyTorch (`repfuse fuse --python`), with
// Debian's PyTorch (/usr/bin/python3, which CI installs) and the stand-in model package in
// test/fixtures/pyval/ (made by make_pyval_fixtures.py): the report's whole-model numbers equal a
// direct torch computation, a model whose forward RepFuse cannot read fails with exit 1, and every
// way the Python side can fail (no interpreter, no torch, model code that does not import, a crash,
// a hang) is one line naming the file, never a dead CLI.
//
// Without PyTorch these tests FAIL (they do not skip): install it with `apt-get install python3-torch`.
import assert from 'node:assert/strict';
import { execFile, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { after, before, describe, test } from 'node:test';
import type { FuseReport, TensorDiff } from '../src/core/report';
import { checkpointInputShape, defaultPythonPath, resolveInterpreter, validateInPython } from '../src/validate/python';
import { cliPath, makeTmp, repoRoot, rmTmp } from './helpers/paths';

const PYTHON = process.env.REPFUSE_TEST_PYTHON || '/usr/bin/python3';
const FIX = path.join(repoRoot, 'test', 'fixtures', 'pyval');
const YOLO = path.join(FIX, 'yolo_full.pt');
const YOLO16 = path.join(FIX, 'yolo_full_fp16.pt');
const ODD = path.join(FIX, 'odd', 'odd_full.pt');

let tmp: string;
let torchProblem: string | undefined;

before(() => {
  tmp = makeTmp();
  const r = spawnSync(PYTHON, ['-c', 'import torch'], { encoding: 'utf8', timeout: 120_000 });
  if (r.error || r.status !== 0) torchProblem = `these tests need Debian's PyTorch: \`${PYTHON} -c "import torch"\` failed (${r.error?.message ?? r.stderr.trim().split('\n').pop()}); apt-get install python3-torch.`;
});
after(() => rmTmp(tmp));

function requireTorch(): void {
  if (torchProblem) assert.fail(torchProblem);
}

interface Run {
  code: number;
  stdout: string;
  stderr: string;
}

function cli(...args: string[]): Promise<Run> {
  return new Promise((resolve) => {
    execFile(process.execPath, [cliPath, ...args], { cwd: repoRoot, maxBuffer: 64 << 20, timeout: 300_000 }, (err, stdout, stderr) => {
      resolve({ code: err ? ((err as { code?: number }).code ?? -1) : 0, stdout, stderr });
    });
  });
}

/** A shell script standing in for an interpreter (a python without torch, one that crashes, hangs). */
function fakePython(name: string, body: string): string {
  const p = path.join(tmp, name);
  fs.writeFileSync(p, `#!/bin/sh\n${body}\n`, { mode: 0o755 });
  return p;
}

/** The single stderr line of a failed run, checked to be one line that names `file`. */
function oneLine(r: Run, file: string): string {
  const lines = r.stderr.split('\n').filter((l) => l && !l.startsWith('… '));
  assert.equal(lines.length, 1, `one error line, got:\n${r.stderr}`);
  assert.ok(lines[0].startsWith(`repfuse: ${path.relative(repoRoot, file)}: `) || lines[0].startsWith(`repfuse: ${file}: `), lines[0]);
  return lines[0];
}

const rel = (f: string) => path.relative(repoRoot, f);

describe('defaults and options', () => {
  test('default python path: the checkpoint folder and its parents up to the project root', () => {
    const root = path.join(tmp, 'proj');
    const deep = path.join(root, 'runs', 'train', 'weights');
    fs.mkdirSync(deep, { recursive: true });
    fs.writeFileSync(path.join(root, 'setup.py'), '');
    assert.deepEqual(defaultPythonPath(path.join(deep, 'best.pt')), [deep, path.dirname(deep), path.join(root, 'runs'), root]);
    fs.rmSync(path.join(root, 'setup.py'));
    fs.mkdirSync(path.join(path.dirname(deep), '.git'));
    assert.deepEqual(defaultPythonPath(path.join(deep, 'best.pt')), [deep, path.dirname(deep)]);
    // In this checkout: the fixture folder up to the repository (its .git).
    assert.deepEqual(defaultPythonPath(YOLO), [FIX, path.dirname(FIX), path.join(repoRoot, 'test'), repoRoot]);
    // Without any marker: every parent, never the file-system root.
    const bare = defaultPythonPath('/no-such-dir-repfuse/a/b.pt');
    assert.deepEqual(bare, ['/no-such-dir-repfuse/a', '/no-such-dir-repfuse']);
  });

  test('interpreters: a path as given, a bare name on PATH, nothing else', () => {
    assert.equal(resolveInterpreter(PYTHON), PYTHON);
    assert.equal(resolveInterpreter('python3', { PATH: path.dirname(PYTHON) }), path.join(path.dirname(PYTHON), 'python3'));
    assert.equal(resolveInterpreter('python3', { PATH: tmp }), undefined);
    assert.equal(resolveInterpreter(path.join(tmp, 'nope', 'python')), undefined);
    assert.equal(resolveInterpreter(tmp), undefined, 'a folder is not an interpreter');
    assert.equal(resolveInterpreter('  '), undefined);
  });

  test('a checkpoint model takes one --input; its name does not matter', () => {
    assert.equal(checkpointInputShape({}, 'm.pt'), null);
    assert.deepEqual(checkpointInputShape({ images: [1, 3, 32, 32] }, 'm.pt'), [1, 3, 32, 32]);
    assert.throws(() => checkpointInputShape({ a: [1], b: [2] }, 'm.pt'), /one --input \(got 2: a, b\)/);
  });
});

/** Recomputes the report's statistics with torch directly: original vs fused, same input, float64. */
function directTorch(original: string, fused: string, shape: number[], seed: number): Record<string, { maxAbs: number; meanAbs: number; maxRef: number; maxRel: number; shape: number[] }> {
  const code = `
import sys, json, torch
sys.path.insert(0, ${JSON.stringify(FIX)})
def load(f):
    return torch.load(f, map_location='cpu', weights_only=False)['model'].float().eval()
a, b = load(${JSON.stringify(original)}), load(${JSON.stringify(fused)})
g = torch.Generator().manual_seed(${seed})
x = torch.rand(*${JSON.stringify(shape)}, generator=g) * 2 - 1
with torch.no_grad():
    pa, (ra0, ra1) = a(x)
    pb, (rb0, rb1) = b(x)
out = {}
for name, u, v in (('model[0]', pa, pb), ('model[1][0]', ra0, rb0), ('model[1][1]', ra1, rb1)):
    u, v = u.double(), v.double()
    d = (u - v).abs()
    out[name] = dict(maxAbs=d.max().item(), meanAbs=d.mean().item(), maxRef=u.abs().max().item(),
                     maxRel=(d / u.abs().clamp(min=1e-4)).max().item(), shape=list(u.shape))
print(json.dumps(out))
`;
  const r = spawnSync(PYTHON, ['-c', code], { encoding: 'utf8', timeout: 120_000, env: { ...process.env, PYTHONDONTWRITEBYTECODE: '1' } });
  assert.equal(r.status, 0, r.stderr);
  return JSON.parse(r.stdout.trim().split('\n').pop()!);
}

function close(a: number, b: number, what: string): void {
  assert.ok(Math.abs(a - b) <= 1e-12 + 1e-9 * Math.abs(b), `${what}: report ${a}, torch ${b}`);
}

describe('repfuse fuse --python', () => {
  test('whole-model numbers in the report equal a direct torch computation; exit 0', async () => {
    requireTorch();
    const out = path.join(tmp, 'yolo.fused.pt');
    const r = await cli('fuse', YOLO, '-o', out, '--json', '--python', PYTHON);
    assert.equal(r.code, 0, r.stderr);
    const report = JSON.parse(r.stdout) as FuseReport;
    const v = report.validation!;
    assert.ok(v.passed);
    assert.equal(v.blocks.length, 3, 'the block-by-block check still runs');
    assert.deepEqual(v.endToEnd?.models, [{ entry: 'model', className: 'models.yolo.Model' }]);
    assert.equal(v.endToEnd?.interpreter, PYTHON);
    assert.match(v.endToEnd!.torch, /^\d+\.\d+/);
    assert.deepEqual(v.endToEnd?.pythonPath, defaultPythonPath(YOLO));
    // The input: 1 × (first conv's in-channels) × 64 × 64, seeded.
    const inp = v.inputs.find((i) => i.name === "ckpt['model'] input")!;
    assert.deepEqual(inp.shape, [1, 3, 64, 64]);
    assert.match(inp.source, /seed 0/);
    // (pred, [p4, p5]) flattened in order.
    assert.deepEqual(v.outputs.map((o) => o.name), ['model[0]', 'model[1][0]', 'model[1][1]']);
    const ref = directTorch(YOLO, out, [1, 3, 64, 64], 0);
    for (const o of v.outputs) {
      const t = ref[o.name];
      assert.deepEqual(o.shape, t.shape, o.name);
      close(o.maxAbsDiff, t.maxAbs, `${o.name} max |Δ|`);
      close(o.meanAbsDiff, t.meanAbs, `${o.name} mean |Δ|`);
      close(o.maxAbsRef, t.maxRef, `${o.name} max |y|`);
      close(o.maxRelDiff, t.maxRel, `${o.name} max rel`);
      close(o.tolerance, 1e-4 + 1e-3 * t.maxRef, `${o.name} tolerance`);
      assert.ok(o.maxAbsDiff > 0 && o.maxAbsDiff < 1e-5 * Math.max(1, t.maxRef), `${o.name}: fused in float64, rounded once: ${o.maxAbsDiff}`);
      assert.equal(o.nonFinite, 0);
      assert.ok(o.passed);
    }
    // The text report: a table in the ONNX report's format and a verdict that says what ran.
    const text = await cli('fuse', YOLO, '-o', path.join(tmp, 'yolo.text.pt'), '--python', PYTHON, '--seed', '3');
    assert.equal(text.code, 0, text.stderr);
    assert.match(text.stdout, /whole model, end to end: ckpt\['model'\] \(models\.yolo\.Model\) run original against fused in PyTorch/);
    assert.match(text.stdout, /^output\s+max \|Δ\|\s+max rel\s+mean \|Δ\|\s+worst at\s+max \|y\|\s+tolerance\s+verdict$/m);
    assert.match(text.stdout, /^model\[1\]\[1\]\s+\S+\s+\S+\s+\S+\s+\[[\d,]+\]\s+\S+\s+\S+\s+pass$/m);
    assert.match(text.stdout.trim().split('\n').pop()!, /^Fused 3 blocks · (folded \d+ BN · )?max \|Δ\| \S+ \(whole model, in PyTorch [^)]+\) · passed\b/);
    assert.ok(text.stderr.includes('… PyTorch: running the fused Model'), 'progress from the Python side');
  });

  test('a forward RepFuse cannot read: blocks pass, the whole model fails, exit 1', async () => {
    requireTorch();
    const out = path.join(tmp, 'odd.fused.pt');
    const r = await cli('fuse', ODD, '-o', out, '--json', '--python', PYTHON);
    assert.equal(r.code, 1, r.stderr);
    const v = (JSON.parse(r.stdout) as FuseReport).validation!;
    assert.equal(v.passed, false);
    assert.ok(v.blocks.every((b) => b.passed), 'block by block, as read by RepFuse, every block passes');
    assert.ok(v.outputs.length === 3 && v.outputs.every((o: TensorDiff) => !o.passed));
    assert.ok(v.outputs[0].maxAbsDiff > 1e-3, `${v.outputs[0].maxAbsDiff}`);
    assert.ok(fs.existsSync(out), 'the output is written (exit 1: fused, over tolerance)');
    // The default python path found odd/models, not ../models (the one that would agree).
    assert.equal(v.endToEnd!.pythonPath[0], path.dirname(ODD));
    const text = await cli('fuse', ODD, '-o', path.join(tmp, 'odd.text.pt'), '--python', PYTHON);
    assert.equal(text.code, 1);
    assert.match(text.stdout.trim().split('\n').pop()!, /\(whole model, in PyTorch [^)]+\) · OVER TOLERANCE\b/);
    assert.match(text.stdout, /^model\[0\]\s.*FAIL$/m);
  });

  test('fp16 checkpoint: run as float32, validated with the float16-sized rtol; --rtol is honoured', async () => {
    requireTorch();
    const r = await cli('fuse', YOLO16, '-o', path.join(tmp, 'y16.pt'), '--json', '--python', PYTHON);
    assert.equal(r.code, 0, r.stderr);
    const v = (JSON.parse(r.stdout) as FuseReport).validation!;
    assert.equal(v.rtol, 5e-3);
    assert.equal(v.outputs.length, 3);
    assert.ok(v.outputs.every((o) => o.passed && o.tolerance === 1e-4 + 5e-3 * o.maxAbsRef));
    const strict = await cli('fuse', YOLO16, '-o', path.join(tmp, 'y16s.pt'), '--json', '--python', PYTHON, '--rtol', '0.002');
    assert.equal((JSON.parse(strict.stdout) as FuseReport).validation!.rtol, 0.002);
  });

  test('--input sets the whole-model input shape', async () => {
    requireTorch();
    const r = await cli('fuse', YOLO, '-o', path.join(tmp, 'in.pt'), '--json', '--python', PYTHON, '--input', 'images=2x3x96x128');
    assert.equal(r.code, 0, r.stderr);
    const v = (JSON.parse(r.stdout) as FuseReport).validation!;
    assert.deepEqual(v.inputs.at(-1)!.shape, [2, 3, 96, 128]);
    // (pred, [stride-4 map, stride-8 map]) of a 96×128 input.
    assert.deepEqual(v.outputs[1].shape, [2, 3, 24, 32, 7]);
    assert.deepEqual(v.outputs[2].shape, [2, 3, 12, 16, 7]);
    assert.equal(v.inputs.at(-1)!.source, 'torch.rand, seed 0, uniform [-1, 1)');
  });

  test('without --python, and for state_dict outputs, the report says: block by block, as read by RepFuse', async () => {
    requireTorch();
    const plain = await cli('fuse', YOLO, '-o', path.join(tmp, 'plain.pt'));
    assert.equal(plain.code, 0, plain.stderr);
    assert.match(plain.stdout, /Checked block by block, as read by RepFuse: .*the whole model was not run \(.*--python runs it end to end in your own PyTorch\)/);
    assert.match(plain.stdout.trim().split('\n').pop()!, /^Fused 3 blocks · (folded \d+ BN · )?max \|Δ\| \S+ \(worst block; checked block by block, as read by RepFuse\) · passed\b/);
    const sd = await cli('fuse', YOLO, '-o', path.join(tmp, 'sd.pt'), '--state-dict', '--json', '--python', PYTHON);
    assert.equal(sd.code, 0, sd.stderr);
    const v = (JSON.parse(sd.stdout) as FuseReport).validation!;
    assert.equal(v.outputs.length, 0);
    assert.equal(v.endToEnd, undefined);
    assert.match(v.endToEndSkipped!, /runs module objects.*the output is a state_dict/);
    const bare = await cli('fuse', path.join(repoRoot, 'test', 'fixtures', 'torch', 'repvgg_sd.pt'), '-o', path.join(tmp, 'repvgg.pt'), '--json', '--python', PYTHON);
    assert.equal(bare.code, 0, bare.stderr);
    assert.match((JSON.parse(bare.stdout) as FuseReport).validation!.endToEndSkipped!, /needs a full-module checkpoint; this one holds a state_dict/);
  });
});

describe('failures are one line naming the file', () => {
  test('a missing interpreter: exit 2 before anything is written', async () => {
    const out = path.join(tmp, 'never.pt');
    const r = await cli('fuse', YOLO, '-o', out, '--python', path.join(tmp, 'no', 'python3'));
    assert.equal(r.code, 2);
    assert.match(oneLine(r, YOLO), /the Python interpreter '.*no\/python3' was not found/);
    assert.ok(!fs.existsSync(out));
    const usage = await cli('fuse', YOLO, '-o', out, '--python-path', tmp);
    assert.equal(usage.code, 2);
    assert.match(usage.stderr, /--python-path needs --python/);
  });

  test('an interpreter without torch: exit 3, the output kept', async () => {
    requireTorch();
    // Debian's python without its site packages (-S): no torch.
    const noTorch = fakePython('python-no-torch', `exec ${PYTHON} -S "$@"`);
    const out = path.join(tmp, 'notorch.pt');
    const r = await cli('fuse', YOLO, '-o', out, '--python', noTorch);
    assert.equal(r.code, 3, r.stderr);
    const line = oneLine(r, YOLO);
    assert.match(line, /end-to-end validation could not run: .*python-no-torch cannot import torch: ModuleNotFoundError: No module named 'torch' \(use --python with an interpreter that has PyTorch\); the fused checkpoint was written but not validated end to end\.$/);
    assert.ok(fs.existsSync(out));
  });

  test("model code that does not import: exit 3, the error and where it looked", async () => {
    requireTorch();
    const empty = fs.mkdtempSync(path.join(tmp, 'empty-'));
    const r = await cli('fuse', YOLO, '-o', path.join(tmp, 'noimport.pt'), '--python', PYTHON, '--python-path', empty);
    assert.equal(r.code, 3, r.stderr);
    assert.match(oneLine(r, YOLO), /cannot import the model code it pickles: ModuleNotFoundError: No module named 'models' \(the model's package must be on the Python path: .*empty-\w+; add its folder with --python-path\)/);
    // The user's package is found but fails to import (a missing dependency of theirs).
    const broken = fs.mkdtempSync(path.join(tmp, 'broken-'));
    fs.mkdirSync(path.join(broken, 'models'));
    fs.writeFileSync(path.join(broken, 'models', '__init__.py'), 'print("loading models")\nimport cv2_not_installed_here\n');
    const b = await cli('fuse', YOLO, '-o', path.join(tmp, 'broken.pt'), '--python', PYTHON, '--python-path', broken);
    assert.equal(b.code, 3, b.stderr);
    assert.match(oneLine(b, YOLO), /ModuleNotFoundError: No module named 'cv2_not_installed_here'/);
    assert.ok(!fs.readdirSync(path.join(broken, 'models')).includes('__pycache__'), 'no bytecode written into the user\'s folders');
  });

  test('a crash and a hang end in one line; the Python process is killed', async () => {
    const req = { original: YOLO, fused: YOLO, entries: ['model'], pythonPath: [], inputShape: null, defaultSize: 64, seed: 0, atol: 1e-4, rtol: 1e-3 };
    const crash = fakePython('python-crash', 'echo "Fatal Python error: Segmentation fault" >&2\nkill -SEGV $$');
    await assert.rejects(validateInPython(req, { interpreter: crash, timeoutMs: 30_000 }), (e: Error & { file?: string }) => {
      assert.equal(e.name, 'ValidationError');
      assert.equal(e.file, YOLO);
      assert.match(e.message, /the Python process \(.*python-crash\) was killed by SIGSEGV without a result: Fatal Python error: Segmentation fault;/);
      assert.doesNotMatch(e.message, /\n/);
      return true;
    });
    const pidFile = path.join(tmp, 'hang.pid');
    const hang = fakePython('python-hang', `echo $$ > ${pidFile}\nexec sleep 60`);
    const t0 = Date.now();
    await assert.rejects(validateInPython(req, { interpreter: hang, timeoutMs: 1500 }), /python-hang did not finish within 1\.5 s and was stopped \(raise the timeout\)/);
    assert.ok(Date.now() - t0 < 10_000);
    const pid = Number(fs.readFileSync(pidFile, 'utf8'));
    await new Promise((r) => setTimeout(r, 200));
    assert.throws(() => process.kill(pid, 0), /ESRCH/, 'the hung process is gone');
    // A cancelled job stops the process too.
    const controller = new AbortController();
    const job = validateInPython(req, { interpreter: hang, timeoutMs: 60_000, signal: controller.signal });
    setTimeout(() => controller.abort(), 300);
    await assert.rejects(job, /validation cancelled/);
  });

  test('a checkpoint without a module in the entry asked for', async () => {
    requireTorch();
    const sd = path.join(repoRoot, 'test', 'fixtures', 'torch', 'repvgg_sd.pt');
    const req = { original: sd, fused: sd, entries: ['model'], pythonPath: [], inputShape: null, defaultSize: 64, seed: 0, atol: 1e-4, rtol: 1e-3 };
    await assert.rejects(validateInPython(req, { interpreter: PYTHON, timeoutMs: 120_000 }), (e: Error & { file?: string }) => {
      assert.equal(e.file, sd);
      assert.match(e.message, /holds a OrderedDict, not a dict with 'model'|is a NoneType, not a torch\.nn\.Module/);
      return true;
    });
  });
});

test('the fixtures are what make_pyval_fixtures.py writes', () => {
  requireTorch();
  // Regenerating into a copy of the folder gives byte-identical files.
  const copy = path.join(tmp, 'regen');
  fs.cpSync(FIX, copy, { recursive: true, filter: (s) => !s.endsWith('.pt') });
  const r = spawnSync(PYTHON, [path.join(copy, 'make_pyval_fixtures.py')], { encoding: 'utf8', timeout: 300_000 });
  assert.equal(r.status, 0, r.stderr);
  for (const f of ['yolo_full.pt', 'yolo_full_fp16.pt', path.join('odd', 'odd_full.pt')]) {
    assert.ok(fs.readFileSync(path.join(copy, f)).equals(fs.readFileSync(path.join(FIX, f))), `${rel(path.join(FIX, f))} is reproducible`);
  }
});
