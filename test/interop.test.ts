// RepFuse's checkpoint outputs, loaded back in real PyTorch (Debian's python3-torch, which CI
// installs): every fixture form is fused to a temp folder and checked by test/interop/check_fused.py.
//  * state_dict outputs (.pt and .safetensors): torch.load(..., weights_only=True), strict
//    load_state_dict into the family's deploy model, output = the unfused reference output;
//  * full-module outputs: unpickled with the fixture classes on sys.path, every block in deploy
//    form, every other checkpoint entry and attribute intact, output = the reference.
// And the hostile pickles: `repfuse inspect` / `repfuse fuse` on each run nothing, and PyTorch's
// own weights_only loader (check_fused.py load) refuses them too.
//
// Without PyTorch these tests FAIL (they do not skip): install it with `apt-get install python3-torch`.
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { DType } from '../src/core/dtype';
import { defaultFuseOptions, fuse, type FuseOptions } from '../src/engine';
import { fixturePath, freshDirs, fusedName, haveTorchFixtures, isFullModule, type ManifestFile, manifestParts, sha256 } from './helpers/ckpt-fixtures';
import { cliPath, makeTmp, repoRoot, rmTmp } from './helpers/paths';

/** Debian's interpreter (its python3-torch); REPFUSE_TEST_PYTHON overrides it (e.g. to see the failure without torch). */
const PYTHON = process.env.REPFUSE_TEST_PYTHON || '/usr/bin/python3';
const CHECK = path.join(repoRoot, 'test', 'interop', 'check_fused.py');
const { fixtures, hostile, marker: MARKER, byName } = manifestParts();

/** Why PyTorch cannot be used, or undefined when `/usr/bin/python3 -c "import torch"` works. */
let torchProblem: string | undefined;
let tmp: string;
const freshDir = freshDirs(() => tmp);

before(() => {
  tmp = makeTmp();
  const r = spawnSync(PYTHON, ['-c', 'import torch, numpy; print(torch.__version__)'], { encoding: 'utf8', timeout: 120_000 });
  if (r.error || r.status !== 0) {
    const why = r.error ? r.error.message : (r.stderr || r.stdout).trim().split('\n').pop();
    torchProblem =
      `the PyTorch interop tests need Debian's PyTorch: \`${PYTHON} -c "import torch"\` failed (${why}). ` +
      'Install it with `apt-get install python3-torch python3-numpy` (CI does this in .ci/run).';
  }
});
after(() => rmTmp(tmp));

/** Fails the calling test, loudly, when PyTorch is missing: these tests must not pass or skip silently without it. */
function requireTorch(): void {
  if (torchProblem) assert.fail(torchProblem);
}

interface CheckResult {
  code: number;
  json: Record<string, unknown>;
  stdout: string;
  stderr: string;
}

/** Runs check_fused.py; it prints exactly one JSON line (exit 0 ok / 1 wrong / 2 could not run). */
function check(...args: string[]): Promise<CheckResult> {
  return new Promise((resolve) => {
    execFile(PYTHON, [CHECK, ...args], { cwd: repoRoot, maxBuffer: 64 << 20, timeout: 300_000 }, (err, stdout, stderr) => {
      const code = err ? ((err as { code?: number }).code ?? -1) : 0;
      let json: Record<string, unknown> = {};
      try {
        json = JSON.parse(stdout.trim().split('\n').pop() ?? '');
      } catch {
        json = { ok: false, error: `no JSON on stdout: ${stdout.slice(0, 500)} ${stderr.slice(-500)}` };
      }
      resolve({ code: typeof code === 'number' ? code : -1, json, stdout, stderr });
    });
  });
}

/** Asserts a check passed, with PyTorch's own words in the message when it did not. */
function passed(r: CheckResult, what: string): Record<string, unknown> {
  const j = r.json;
  assert.equal(
    r.code,
    0,
    `${what}: check_fused.py exit ${r.code} at stage '${String(j.stage)}': ${String(j.error)}${j.missing ? ` missing ${JSON.stringify(j.missing)}` : ''}${j.unexpected ? ` unexpected ${JSON.stringify(j.unexpected)}` : ''}${r.code === 2 ? `\n${r.stderr.slice(-2000)}` : ''}`,
  );
  assert.equal(j.ok, true, what);
  return j;
}

function cli(...args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(process.execPath, [cliPath, ...args], { cwd: repoRoot, maxBuffer: 64 << 20 }, (err, stdout, stderr) => {
      const code = err ? ((err as { code?: number }).code ?? -1) : 0;
      resolve({ code: typeof code === 'number' ? code : -1, stdout, stderr });
    });
  });
}

async function fuseTo(fx: ManifestFile, output: string, opts: Partial<FuseOptions> = {}): Promise<string> {
  const input = fixturePath(fx);
  const hash = sha256(input);
  // Validation is covered by checkpoint.test.ts; here PyTorch is the judge.
  // The self-written fixture nets deploy their blocks only: no whole-model Conv+BN fold (that is
  // checked against the official code in deploy-official.test.ts).
  const r = await fuse(input, { ...defaultFuseOptions, validate: false, output, checkpointFoldBN: false, ...opts });
  assert.equal(sha256(input), hash, 'the input is unchanged');
  assert.ok(r.output, `nothing written (${r.validationSkipped})`);
  assert.equal(r.blocksFused, fx.blocks!.length);
  return r.output;
}

/** check_fused.py state_dict on a fused state_dict of `fx`'s family; `fp16` when its float tensors are float16. */
async function checkStateDict(fx: ManifestFile, output: string, fp16: boolean): Promise<Record<string, unknown>> {
  const j = passed(await check('state_dict', fx.family!, output, ...(fp16 ? ['--fp16'] : [])), path.basename(output));
  // RepFuse writes a bare state_dict (no wrapping entry, `module.` stripped) with exactly the deploy keys.
  assert.equal(j.entry, null, 'a bare state_dict');
  assert.equal(j.prefix, '', 'module. prefix stripped');
  assert.deepEqual(j.missing, []);
  assert.deepEqual(j.unexpected, []);
  assert.equal(j.tensors, fx.deploy_state_dict_keys.length);
  assert.equal(j.format, output.endsWith('.safetensors') ? 'safetensors' : 'zip');
  assert.ok((j.max_abs_diff as number) <= (j.tolerance as number), `max |Δ| ${j.max_abs_diff} > ${j.tolerance}`);
  return j;
}

// ---------------------------------------------------------------------------------------------
test('PyTorch is available to the interop tests (/usr/bin/python3 with torch; apt-get install python3-torch)', () => {
  requireTorch();
  assert.ok(fs.existsSync(CHECK), `${CHECK} exists`);
  assert.ok(haveTorchFixtures, 'test/fixtures/torch/manifest.json exists');
});

describe('PyTorch loads every fused fixture and reproduces the unfused output', { concurrency: 2 }, () => {
  for (const fx of fixtures) {
    const kind = isFullModule(fx) ? 'full-module checkpoint, classes on the path' : fx.format === 'safetensors' ? '.safetensors' : 'state_dict, weights_only=True, strict';
    test(`${fx.file} (${fx.family}, ${fx.form}, ${fx.dtype}) → ${kind}`, async () => {
      requireTorch();
      const output = await fuseTo(fx, fusedName(fx, freshDir()));
      if (!isFullModule(fx)) {
        await checkStateDict(fx, output, fx.dtype === 'float16');
        return;
      }
      const j = passed(await check('full_module', output, '--original', fixturePath(fx)), path.basename(output));
      assert.equal(j.model_entry, fx.entry);
      assert.equal(j.family, fx.family);
      assert.equal(j.deploy_blocks, fx.blocks!.length, 'every block in deploy form');
      assert.deepEqual(j.entries, Object.keys(fx.entries ?? {}), 'every checkpoint entry kept, in order');
      assert.ok((j.max_abs_diff as number) <= (j.tolerance as number));
      // The original checkpoint's dtype is kept (fp16 YOLO checkpoints stay fp16).
      assert.deepEqual(Object.keys(j.dtypes as object).filter((d) => d.startsWith('float')), [fx.dtype]);
    });
  }
});

describe('PyTorch loads the other output forms', { concurrency: 2 }, () => {
  const cases: { name: string; fixture: string; ext: string; opts: Partial<FuseOptions>; fp16: boolean }[] = [
    { name: 'full module (fp16) → state_dict .pt (keepModules: false)', fixture: 'yolov7_full.pt', ext: '.pt', opts: { keepModules: false }, fp16: true },
    { name: 'full module with EMA (fp32) → state_dict .pt', fixture: 'yolov7_full_ema.pt', ext: '.pt', opts: { keepModules: false }, fp16: false },
    { name: 'full module (fp16) → .safetensors', fixture: 'ultralytics_full.pt', ext: '.safetensors', opts: {}, fp16: true },
    { name: 'fp32 state_dict → dtype float16', fixture: 'qarepvgg_sd.pt', ext: '.pt', opts: { dtype: DType.float16 }, fp16: true },
    { name: 'safetensors → dtype float16 .safetensors', fixture: 'mobileone_sd.safetensors', ext: '.safetensors', opts: { dtype: DType.float16 }, fp16: true },
    { name: 'legacy-format input → .safetensors', fixture: 'ppyoloe_legacy.pt', ext: '.safetensors', opts: {}, fp16: false },
    { name: 'module. prefix → .safetensors', fixture: 'repvgg_module_prefix.pth', ext: '.safetensors', opts: {}, fp16: false },
  ];
  for (const c of cases) {
    test(c.name, async () => {
      requireTorch();
      const fx = byName(c.fixture);
      const output = await fuseTo(fx, fusedName(fx, freshDir(), c.ext), c.opts);
      const j = await checkStateDict(fx, output, c.fp16);
      assert.deepEqual(Object.keys(j.dtypes as object).filter((d) => d.startsWith('float')), [c.fp16 ? 'float16' : 'float32']);
    });
  }

  test('fp16 state_dict → dtype float32: float32 tensors that load strictly; accuracy is the fp16 source\'s', async () => {
    requireTorch();
    const fx = byName('yolov7_sd_fp16.pt');
    const output = await fuseTo(fx, fusedName(fx, freshDir()), { dtype: DType.float32 });
    // The checker's float32 mode holds outputs to 1e-4 of the fp32 reference, but these weights were
    // rounded to half precision before RepFuse saw them: everything up to the comparison must pass
    // (weights_only load, keys, shapes, float32 dtypes, strict load_state_dict) and the difference
    // must be what the fp16 checkpoint itself gives (the --fp16 bound, 5e-2 relative).
    const r = await check('state_dict', 'yolov7', output);
    if (r.code !== 0) {
      assert.equal(r.code, 1, JSON.stringify(r.json));
      assert.equal(r.json.stage, 'compare', `fails only in the comparison: ${String(r.json.error)}`);
    }
    assert.deepEqual(r.json.missing, []);
    assert.deepEqual(r.json.unexpected, []);
    assert.deepEqual(Object.keys(r.json.dtypes as object).filter((d) => d.startsWith('float')), ['float32']);
    assert.ok((r.json.max_abs_diff as number) <= (r.json.tolerance as number) * 500, `max |Δ| ${r.json.max_abs_diff} beyond fp16 accuracy`);
    // And exactly as close as the fp16 output of the same checkpoint.
    const half = await fuseTo(fx, fusedName(fx, freshDir()));
    const h = passed(await check('state_dict', 'yolov7', half, '--fp16'), 'fp16 output');
    assert.ok((r.json.max_abs_diff as number) <= (h.max_abs_diff as number) * 1.5 + 1e-6, `float32 output (${r.json.max_abs_diff}) is no worse than the float16 one (${h.max_abs_diff})`);
  });

  test('control: the checker notices a wrong fusion (RepVGG fused with BN epsilon 1e-1 instead of 1e-5)', async () => {
    requireTorch();
    const fx = byName('repvgg_sd.pt');
    const output = await fuseTo(fx, fusedName(fx, freshDir()), { eps: 1e-1 });
    const r = await check('state_dict', 'repvgg', output);
    assert.equal(r.code, 1, `exit 1 (wrong file): ${JSON.stringify(r.json)}`);
    assert.equal(r.json.stage, 'compare');
  });
});

describe('hostile pickles: nothing runs in RepFuse, and PyTorch refuses them too', { concurrency: 2 }, () => {
  for (const fx of hostile) {
    test(`${fx.file} (${fx.payload?.callable})`, async () => {
      requireTorch();
      const file = fixturePath(fx);
      const hash = sha256(file);
      fs.rmSync(MARKER, { force: true });
      // repfuse inspect: reads it, runs nothing, finds nothing to fuse, names the danger.
      const ins = await cli('inspect', file, '--json');
      assert.equal(ins.code, 0, ins.stderr);
      const ij = JSON.parse(ins.stdout) as { blocks: unknown[]; model: { notes: string[] } };
      assert.deepEqual(ij.blocks, []);
      assert.match(ij.model.notes.join('\n'), /not executed/);
      assert.equal(fs.existsSync(MARKER), false, `repfuse inspect ran the payload of ${fx.file}`);
      // repfuse fuse: the same, and writes nothing.
      const dir = freshDir();
      const fz = await cli('fuse', file, '-o', path.join(dir, 'out.pt'), '--json');
      assert.equal(fz.code, 0, fz.stderr);
      const fj = JSON.parse(fz.stdout) as { output: string | null; validationSkipped?: string };
      assert.equal(fj.output, null);
      assert.equal(fj.validationSkipped, 'nothing to fuse');
      assert.deepEqual(fs.readdirSync(dir), []);
      assert.equal(fs.existsSync(MARKER), false, `repfuse fuse ran the payload of ${fx.file}`);
      // PyTorch with weights_only=True refuses it; the checker's full-unpickle mode refuses it before unpickling.
      const load = await check('load', file);
      assert.equal(load.code, 1, `check_fused.py load must refuse ${fx.file}: ${JSON.stringify(load.json)}`);
      assert.equal(load.json.ok, false);
      assert.equal(load.json.stage, 'load');
      assert.match(String(load.json.error), /weights_only=True\) failed/);
      const full = await check('load', file, '--full');
      assert.equal(full.code, 1, `check_fused.py load --full must refuse ${fx.file}: ${JSON.stringify(full.json)}`);
      assert.equal(full.json.stage, 'pickle_scan');
      assert.equal(fs.existsSync(MARKER), false, `loading ${fx.file} in Python ran its payload`);
      assert.equal(sha256(file), hash);
    });
  }
});
