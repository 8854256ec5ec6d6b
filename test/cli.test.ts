// The command-line contract: JSON shapes, exit codes, and one-line errors without stack traces.
import * as assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { encodeNpy } from '../src/core/npy';
import { DType } from '../src/core/dtype';
import { Rng } from '../src/core/random';
import { ModelBuilder } from './helpers/onnx-builder';
import { cliPath, fixturesDir, makeTmp, repoRoot, rmTmp } from './helpers/paths';

interface Run {
  code: number;
  stdout: string;
  stderr: string;
}

function cli(...args: string[]): Promise<Run> {
  return new Promise((resolve) => {
    execFile(process.execPath, [cliPath, ...args], { cwd: repoRoot, maxBuffer: 64 << 20 }, (err, stdout, stderr) => {
      const code = err ? ((err as { code?: number }).code ?? -1) : 0;
      resolve({ code: typeof code === 'number' ? code : -1, stdout, stderr });
    });
  });
}

/** Exit code 2, exactly one line on stderr, no stack trace; returns the line. */
function usageError(r: Run, ...mentions: string[]): string {
  assert.equal(r.code, 2, `exit code ${r.code}; stderr: ${r.stderr}`);
  const lines = r.stderr.split('\n').filter((l) => l.length > 0);
  assert.equal(lines.length, 1, `one line on stderr, got:\n${r.stderr}`);
  const line = lines[0];
  assert.ok(line.startsWith('repfuse: '), line);
  assert.doesNotMatch(r.stderr, /\n\s+at /, 'no stack trace');
  for (const m of mentions) assert.ok(line.includes(m), `'${line}' mentions ${m}`);
  return line;
}

let dir: string;
let fixture: string;
let dynamic: string;
before(() => {
  dir = makeTmp();
  assert.ok(fs.existsSync(cliPath), 'dist/cli.js is built (npm run pretest)');
  fixture = path.join(dir, 'repvgg_bn.onnx');
  fs.copyFileSync(path.join(fixturesDir, 'repvgg_bn.onnx'), fixture);
  // A model with dynamic batch and spatial size.
  const b = new ModelBuilder({ seed: 8 });
  const x = b.input('images', ['batch', 3, 'h', 'w']);
  const y = b.add(b.add(b.conv(x, 3, 3, [3, 3], { bn: true }), b.conv(x, 3, 3, [1, 1], { bn: true })), b.bn(x, 3));
  b.output(b.relu(y), ['batch', 3, 'h', 'w']);
  dynamic = path.join(dir, 'dynamic.onnx');
  fs.writeFileSync(dynamic, b.encode());
});
after(() => rmTmp(dir));

describe('repfuse CLI', { concurrency: 4 }, () => {
  it('inspect --json prints one JSON object and exits 0', async () => {
    const r = await cli('inspect', fixture, '--json');
    assert.equal(r.code, 0, r.stderr);
    const j = JSON.parse(r.stdout);
    for (const k of ['model', 'blocks', 'rejected', 'folds', 'notFolded', 'paramCountAfter', 'nodeCountAfter', 'opCountsAfter']) assert.ok(k in j, k);
    assert.deepEqual(j.blocks.map((b: { name: string }) => b.name), ['stage0', 'stage1.0', 'stage1.1']);
    assert.equal(j.folds.length, 1);
    assert.equal(j.model.format, 'onnx');
    assert.equal(r.stderr, '');
    assert.ok(!fs.existsSync(fixture.replace(/\.onnx$/, '.fused.onnx')), 'inspect writes nothing');
  });

  it('inspect --no-fold-bn leaves Conv→BN pairs', async () => {
    const r = await cli('inspect', fixture, '--json', '--no-fold-bn');
    assert.equal(r.code, 0);
    assert.equal(JSON.parse(r.stdout).folds.length, 0);
  });

  it('inspect without --json prints the table', async () => {
    const r = await cli('inspect', fixture);
    assert.equal(r.code, 0);
    assert.match(r.stdout, /3 re-parameterizable blocks:/);
    assert.match(r.stdout, /stage1\.0\s+RepVGG\s+3×3\s+1×1\s+2\s+16→16/);
  });

  it('fuse --json: the documented keys, exit 0; --atol 0 --rtol 0 on a non-bit-identical result: exit 1', async () => {
    const out = path.join(dir, 'cli-fused.onnx');
    const r = await cli('fuse', fixture, '--json', '-o', out);
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.stderr, '', 'no progress lines with --json');
    const j = JSON.parse(r.stdout);
    assert.equal(j.output, out);
    assert.ok(fs.existsSync(out));
    assert.equal(j.blocksFused, 3);
    assert.equal(j.bnFolded, 1);
    for (const k of ['nodesBefore', 'nodesAfter', 'paramsBefore', 'paramsAfter', 'bytesWritten']) assert.equal(typeof j[k], 'number', k);
    assert.ok(j.nodesAfter < j.nodesBefore && j.paramsAfter < j.paramsBefore);
    assert.equal(j.bytesWritten, fs.statSync(out).size);
    assert.equal(j.validation.passed, true);
    assert.equal(j.validation.outputs.length, 1);
    for (const d of [...j.validation.outputs, ...j.validation.blocks]) {
      for (const k of ['maxAbsDiff', 'maxRelDiff', 'meanAbsDiff']) assert.equal(typeof d[k], 'number', k);
      assert.equal(d.passed, true);
    }
    assert.deepEqual(j.validation.blocks.map((b: { block: string }) => b.block), ['stage0', 'stage1.0', 'stage1.1']);
    const maxDiff = Math.max(...j.validation.outputs.map((d: { maxAbsDiff: number }) => d.maxAbsDiff));
    assert.ok(maxDiff > 0, 'the fused output is not bit-identical (needed for the next check)');

    const strict = await cli('fuse', fixture, '--json', '-o', out, '--force', '--atol', '0', '--rtol', '0');
    assert.equal(strict.code, 1, strict.stderr);
    const s = JSON.parse(strict.stdout);
    assert.equal(s.validation.passed, false);
    assert.equal(s.validation.atol, 0);
    assert.ok(fs.existsSync(out), 'the fused model is still written');
  });

  it('fuse without --json prints the report and the verdict', async () => {
    const out = path.join(dir, 'cli-text.onnx');
    const r = await cli('fuse', fixture, '-o', out);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /Fused 3 blocks · folded 1 BN · max \|Δ\| .* · passed/);
  });

  it('--input images=1x3x40x40 works on a dynamic-size model', async () => {
    const r = await cli('fuse', dynamic, '--json', '--input', 'images=1x3x40x40', '-o', path.join(dir, 'dyn-fused.onnx'));
    assert.equal(r.code, 0, r.stderr);
    const j = JSON.parse(r.stdout);
    assert.deepEqual(j.validation.inputs[0].shape, [1, 3, 40, 40]);
    assert.equal(j.validation.passed, true);
  });

  it('--input-npy feeds real data', async () => {
    const npy = path.join(fixturesDir, 'repvgg.input.npy');
    const r = await cli('fuse', fixture, '--json', '--input-npy', `images=${npy}`, '-o', path.join(dir, 'npy-fused.onnx'));
    assert.equal(r.code, 0, r.stderr);
    assert.equal(JSON.parse(r.stdout).validation.inputs[0].source, npy);
  });

  it('an existing output without --force: exit 2, one line', async () => {
    const out = path.join(dir, 'exists.onnx');
    fs.writeFileSync(out, 'x');
    usageError(await cli('fuse', fixture, '-o', out), out, '--force');
    assert.equal(fs.readFileSync(out, 'utf8'), 'x');
  });

  it('a missing file: exit 2, one line naming it', async () => {
    const missing = path.join(dir, 'nope.onnx');
    usageError(await cli('inspect', missing), missing);
    usageError(await cli('fuse', missing), missing);
  });

  it('a truncated ONNX file: exit 2, one line naming it', async () => {
    const bytes = fs.readFileSync(fixture);
    const t = path.join(dir, 'truncated.onnx');
    fs.writeFileSync(t, bytes.subarray(0, Math.floor(bytes.length / 2)));
    usageError(await cli('inspect', t), t, 'truncated');
    usageError(await cli('fuse', t), t);
    assert.ok(!fs.existsSync(path.join(dir, 'truncated.fused.onnx')));
  });

  it('a random-bytes file: exit 2, one line naming it', async () => {
    const rng = new Rng(123);
    const f = path.join(dir, 'random.onnx');
    fs.writeFileSync(f, Uint8Array.from({ length: 4096 }, () => Math.floor(rng.next() * 256)));
    usageError(await cli('inspect', f), f);
    usageError(await cli('fuse', f), f);
  });

  it('an empty file and a text file: exit 2, one line naming them', async () => {
    const empty = path.join(dir, 'empty.onnx');
    fs.writeFileSync(empty, '');
    usageError(await cli('inspect', empty), empty, 'empty');
    const text = path.join(dir, 'text.onnx');
    fs.writeFileSync(text, 'this is not a model\n');
    usageError(await cli('inspect', text), text);
  });

  it('a file that is not .onnx: exit 2', async () => {
    const f = path.join(dir, 'model.txt');
    fs.writeFileSync(f, 'x');
    usageError(await cli('inspect', f), f, "'.txt'");
  });

  it('an unknown option: exit 2, one line naming the option', async () => {
    usageError(await cli('fuse', fixture, '--bogus'), '--bogus');
  });

  it('an unknown command and a missing command', async () => {
    usageError(await cli('frobnicate', fixture), 'frobnicate');
    const none = await cli();
    assert.equal(none.code, 2);
    assert.match(none.stdout, /^repfuse — /);
  });

  it('a bad --input shape: exit 2, one line', async () => {
    usageError(await cli('fuse', dynamic, '--input', 'images=1xAx40'), "'1xAx40'");
    usageError(await cli('fuse', dynamic, '--input', 'images'), "'images'");
    usageError(await cli('fuse', dynamic, '--input', 'images=0x3x4x4'), "'0x3x4x4'");
  });

  it('an --input shape that contradicts the model: exit 2, one line naming the file', async () => {
    usageError(await cli('fuse', fixture, '--input', 'images=1x3x32'), fixture, 'rank 4');
    usageError(await cli('fuse', fixture, '--input', 'images=1x4x32x32'), fixture, 'dimension 1 is fixed at 3');
    assert.ok(!fs.existsSync(fixture.replace(/\.onnx$/, '.fused.onnx')), 'nothing written');
  });

  it('a dynamic dimension that cannot be guessed: exit 2, one line naming the file and the fix', async () => {
    const line = usageError(await cli('fuse', dynamic), dynamic, "'h'", '--input images=1x3xNxN');
    assert.match(line, /dimension 2/);
    assert.ok(!fs.existsSync(dynamic.replace(/\.onnx$/, '.fused.onnx')), 'a bad input fails before anything is written');
  });

  it('--input-npy for an unknown input name: exit 2, one line naming the file', async () => {
    const npy = path.join(fixturesDir, 'repvgg.input.npy');
    usageError(await cli('fuse', fixture, '--input-npy', `nope=${npy}`), fixture, "'nope'", "'images'");
  });

  it('--input-npy with a missing .npy file or the wrong shape: exit 2, one line', async () => {
    const missing = path.join(dir, 'missing.npy');
    usageError(await cli('fuse', fixture, '--input-npy', `images=${missing}`), missing);
    const wrong = path.join(dir, 'wrong.npy');
    fs.writeFileSync(wrong, encodeNpy(DType.float32, [1, 3, 8, 8], new Uint8Array(3 * 64 * 4)));
    usageError(await cli('fuse', fixture, '--input-npy', `images=${wrong}`), fixture, 'fixed at 32');
  });

  it('--input-npy holding the wrong element type: exit 2, one line naming both files', async () => {
    const f64 = path.join(dir, 'f64-input.npy');
    fs.writeFileSync(f64, encodeNpy(DType.float64, [1, 3, 32, 32], new Uint8Array(3 * 1024 * 8)));
    usageError(await cli('fuse', fixture, '--input-npy', `images=${f64}`), fixture, f64, 'float64');
  });

  it('--version and --help exit 0', async () => {
    const v = await cli('--version');
    assert.equal(v.code, 0);
    assert.equal(v.stdout.trim(), JSON.parse(fs.readFileSync(path.join(repoRoot, 'package.json'), 'utf8')).version);
    const h = await cli('--help');
    assert.equal(h.code, 0);
    assert.match(h.stdout, /Exit codes: 0 ok/);
  });

  it('a BatchNormalization parameter with an undefined data type: exit 2, one line, not an internal error', async () => {
    const b = new ModelBuilder({ seed: 1 });
    const x = b.input('x', [1, 4, 6, 6]);
    b.output(b.relu(b.add(b.conv(x, 4, 4, [3, 3], { bn: true }), b.conv(x, 4, 4, [1, 1], { bias: true }))));
    b.initializers.find((i) => i.name === 'bn.running_var')!.dataType = 0;
    const f = path.join(dir, 'dtype0.onnx');
    fs.writeFileSync(f, b.encode());
    const line = usageError(await cli('fuse', f, '--json', '-o', path.join(dir, 'dtype0-out.onnx')), f);
    assert.doesNotMatch(line, /internal error/);
    assert.ok(!fs.existsSync(path.join(dir, 'dtype0-out.onnx')));
  });

  it('a negative --atol: exit 2', async () => {
    usageError(await cli('fuse', fixture, '--atol', '-1'), '--atol');
  });

  it('exit 3 when the fused model cannot be validated (onnxruntime has no float64 Conv)', async () => {
    const b = new ModelBuilder({ seed: 1, dtype: 'float64' });
    const x = b.input('x', [1, 2, 4, 4]);
    b.output(b.relu(b.add(b.conv(x, 2, 2, [3, 3], { bias: true }), b.conv(x, 2, 2, [1, 1], { bias: true }))));
    const f = path.join(dir, 'f64.onnx');
    fs.writeFileSync(f, b.encode());
    const r = await cli('fuse', f, '--json');
    assert.equal(r.code, 3, r.stderr);
    const lines = r.stderr.split('\n').filter(Boolean);
    assert.equal(lines.length, 1, r.stderr);
    assert.match(lines[0], /^repfuse: validation failed: /);
    assert.ok(fs.existsSync(path.join(dir, 'f64.fused.onnx')), 'the fused model was written');
    const nv = await cli('fuse', f, '--json', '--no-validate', '--force');
    assert.equal(nv.code, 0, nv.stderr);
    assert.equal(JSON.parse(nv.stdout).validationSkipped, '--no-validate');
  });
});
