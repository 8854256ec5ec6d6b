// The command line with several models (files and folders), the benefit lines (MACs, --latency)
// in text and JSON, and the exit code of a batch: the worst of its models'.
import * as assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { after, before, describe, it } from 'node:test';
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

interface BatchJson {
  exitCode: number;
  models: { input: string; exitCode: number; error?: string; report?: { blocksFused?: number; benefit?: { macsBefore: number; macsAfter: number }; blocks?: unknown[] } }[];
}

let dir: string;
let a: string;
let b: string;
let folder: string;
before(() => {
  dir = makeTmp();
  a = path.join(dir, 'a.onnx');
  b = path.join(dir, 'b.onnx');
  fs.copyFileSync(path.join(fixturesDir, 'repvgg_folded.onnx'), a);
  fs.copyFileSync(path.join(fixturesDir, 'acnet_bn.onnx'), b);
  folder = path.join(dir, 'models');
  fs.mkdirSync(folder);
  fs.copyFileSync(path.join(fixturesDir, 'mobileone_bn.onnx'), path.join(folder, 'mobileone.onnx'));
  fs.writeFileSync(path.join(folder, 'broken.onnx'), 'not a model');
  fs.writeFileSync(path.join(folder, 'README.txt'), 'notes');
});
after(() => rmTmp(dir));

describe('several models in one command', () => {
  it('fuse A B folder/: each in turn, one summary, exit code the worst (a broken file: 2)', async () => {
    const r = await cli('fuse', a, b, folder, '--force');
    assert.equal(r.code, 2, r.stderr);
    for (const f of [a, b, path.join(folder, 'mobileone.onnx'), path.join(folder, 'broken.onnx')]) assert.ok(r.stdout.includes(f), `the summary names ${f}`);
    assert.ok(!r.stdout.includes('README.txt'), 'only model files are taken from a folder');
    assert.match(r.stdout, /4 models: 1 not ok; exit code 2 \(the worst of them\)/);
    assert.match(r.stdout, /model\s+format\s+blocks\s+benefit\s+verdict\s+exit/);
    // The broken file's one-line error is on stderr, and the others were still fused.
    const errLines = r.stderr.split('\n').filter((l) => l.startsWith('repfuse: '));
    assert.equal(errLines.length, 1, r.stderr);
    assert.match(errLines[0], /broken\.onnx: .*not a valid ONNX model/);
    for (const f of ['a.fused.onnx', 'b.fused.onnx', path.join('models', 'mobileone.fused.onnx')]) assert.ok(fs.existsSync(path.join(dir, f)), f);
  });

  it('a folder run again skips the earlier *.fused.* outputs; JSON holds every model with its exit code', async () => {
    fs.rmSync(path.join(folder, 'broken.onnx'));
    const r = await cli('fuse', folder, a, '--force', '--json', '--atol', '0', '--rtol', '0');
    const j = JSON.parse(r.stdout) as BatchJson;
    assert.deepEqual(
      j.models.map((m) => path.basename(m.input)),
      ['mobileone.onnx', 'a.onnx'],
    );
    // atol = rtol = 0: float32 rounding puts both over tolerance → exit 1 each, 1 overall.
    assert.deepEqual(j.models.map((m) => m.exitCode), [1, 1]);
    assert.equal(j.exitCode, 1);
    assert.equal(r.code, 1);
    assert.ok(j.models.every((m) => m.report!.benefit!.macsAfter < m.report!.benefit!.macsBefore));
    const ok = await cli('fuse', folder, '--force', '--no-validate');
    assert.equal(ok.code, 0, ok.stderr);
    assert.match(ok.stderr, /skipping .*mobileone\.fused\.onnx \(an earlier fuse's output\)/);
  });

  it('inspect several: a table, exit 0; -o with several models is a usage error', async () => {
    const r = await cli('inspect', a, b);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /2 models: all ok; exit code 0/);
    const o = await cli('fuse', a, b, '-o', path.join(dir, 'x.onnx'));
    assert.equal(o.code, 2);
    assert.match(o.stderr, /^repfuse: -o names one output file; with several models each is written beside its input\.\n$/);
    const empty = path.join(dir, 'empty');
    fs.mkdirSync(empty);
    const e = await cli('fuse', empty);
    assert.equal(e.code, 2);
    assert.match(e.stderr, /empty: the folder holds no model files\./);
  });
});

describe('benefit: MACs and --latency in text and JSON', () => {
  it('--latency 3: the latency line, the speed-up in the verdict, latencyMs in JSON', async () => {
    const t = await cli('fuse', a, '--force', '--latency', '3');
    assert.equal(t.code, 0, t.stderr);
    assert.match(t.stdout, /MACs \(batch 1, Conv\/Gemm\/MatMul at the input shapes\): 1\.53M → 1\.40M \(−8\.6 %\)/);
    assert.match(t.stdout, /latency \(onnxruntime, default optimizations, default threads, median of 3 runs after a warm-up\): [\d.e-]+ ms → [\d.e-]+ ms, (\d+(\.\d+)?× (faster|slower)|same speed)/);
    assert.match(t.stdout, /· passed · MACs −8\.6 % · (\d+(\.\d+)?× (faster|slower)|same speed)\n$/);
    const j = await cli('fuse', a, '--force', '--latency', '3', '--json');
    const report = JSON.parse(j.stdout) as { benefit: { macsBefore: number; macsAfter: number; latencyMs: { before: number; after: number; runs: number } } };
    assert.equal(report.benefit.macsBefore, 1_532_064);
    assert.equal(report.benefit.macsAfter, 1_400_992);
    assert.equal(report.benefit.latencyMs.runs, 3);
    assert.ok(report.benefit.latencyMs.before > 0 && report.benefit.latencyMs.after > 0);
    // Without --latency: MACs only, no latency.
    const plain = JSON.parse((await cli('fuse', a, '--force', '--json')).stdout) as { benefit: { latencyMs?: unknown } };
    assert.equal(plain.benefit.latencyMs, undefined);
  });

  it('--latency needs a positive count and validation', async () => {
    for (const bad of ['0', 'x', '1.5']) {
      const r = await cli('fuse', a, '--force', '--latency', bad);
      assert.equal(r.code, 2);
      assert.match(r.stderr, /--latency needs a number of runs from 1 to 10000/);
    }
    const r = await cli('fuse', a, '--force', '--latency', '3', '--no-validate');
    assert.equal(r.code, 2);
    assert.match(r.stderr, /cannot be combined with --no-validate/);
  });

  it('a checkpoint: block MACs per output position, and --latency over its one-block models', async () => {
    const pt = path.join(repoRoot, 'test', 'fixtures', 'torch');
    const sd = fs.existsSync(pt) ? fs.readdirSync(pt).find((f) => /^repvgg.*\.pt$/.test(f) && !/fused|deploy/.test(f)) : undefined;
    assert.ok(sd, 'a RepVGG checkpoint fixture');
    const input = path.join(dir, 'sd.pt');
    fs.copyFileSync(path.join(pt, sd), input);
    const r = await cli('fuse', input, '--force', '--latency', '2', '--json');
    assert.ok(r.code === 0 || r.code === 1, r.stderr);
    const j = JSON.parse(r.stdout) as { benefit: { macsScope: string; macsBefore: number; macsAfter: number; blocks: unknown[]; latencyMs: { scope: string; runs: number } }; blocksFused: number };
    assert.equal(j.benefit.macsScope, 'blocks-per-position');
    assert.equal(j.benefit.blocks.length, j.blocksFused);
    assert.ok(j.benefit.macsAfter < j.benefit.macsBefore);
    assert.deepEqual([j.benefit.latencyMs.scope, j.benefit.latencyMs.runs], ['blocks', 2]);
  });
});
