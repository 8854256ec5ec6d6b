// The real model worker (dist/model-worker.js) through its host-side client: parsing, branch
// statistics, errors as one line, fuse jobs with validation, and cancellation that leaves no
// output and no temp file behind.
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { after, before, test } from 'node:test';
import { monitorEventLoopDelay } from 'node:perf_hooks';
import { generateRepVGG } from '../bench/gen-model';
import { ModelWorkerClient, WorkerRequestError } from '../src/extension/worker/client';
import type { FuseJobOptions, InspectOptions } from '../src/extension/view/settings';
import { makeTmp, repoRoot, rmTmp } from './helpers/paths';

const script = path.join(repoRoot, 'dist', 'model-worker.js');
const example = path.join(repoRoot, 'examples', 'yolov7_repconv_tiny.onnx');
const inspectOpts: InspectOptions = { foldBN: true, checkpoint: { defaultEpsilon: 'auto', outputDtype: 'keep' } };

let tmp: string;
let client: ModelWorkerClient;

before(() => {
  tmp = makeTmp();
  client = new ModelWorkerClient(script);
});

after(async () => {
  await client.dispose();
  rmTmp(tmp);
});

function copyExample(name: string): string {
  const dst = path.join(tmp, name);
  fs.copyFileSync(example, dst);
  return dst;
}

function fuseOpts(input: string, over: Partial<FuseJobOptions> = {}): FuseJobOptions {
  return { ...inspectOpts, output: input.replace(/\.onnx$/, '.fused.onnx'), force: false, validate: true, atol: 1e-4, rtol: 1e-3, timeoutMs: 120_000, inputShapes: {}, ...over };
}

/** Files left in the folder besides the given ones (temp files would show here). */
function leftovers(dir: string, keep: string[]): string[] {
  return fs.readdirSync(dir).filter((f) => !keep.includes(f));
}

test('the worker starts lazily', () => {
  const c = new ModelWorkerClient(script);
  assert.equal(c.started, false);
  void c.dispose();
});

test('open: the inspect report of the example, parsed in the worker', async () => {
  const r = await client.request('open', { file: example, options: inspectOpts });
  assert.equal(r.model.format, 'onnx');
  assert.deepEqual(
    r.blocks.map((b) => b.name),
    ['model.2', 'model.3', 'model.4', 'model.5'],
  );
});

test('blockStats: one block at a time', async () => {
  const s = await client.request('blockStats', { file: example, block: 'model.3', options: inspectOpts });
  assert.equal(s.block.name, 'model.3');
  assert.deepEqual(s.fused.shape, [64, 32, 3, 3]);
  assert.equal(s.branches.length, 2);
  await assert.rejects(client.request('blockStats', { file: example, block: 'model.99', options: inspectOpts }), (e: WorkerRequestError) => {
    assert.match(e.message, /no block named 'model\.99'/);
    assert.equal(e.cancelled, false);
    return true;
  });
});

test('errors come back as one line naming the file', async () => {
  const junk = path.join(tmp, 'weights.pt');
  fs.writeFileSync(junk, Buffer.from('not a checkpoint at all'));
  await assert.rejects(client.request('open', { file: junk, options: inspectOpts }), (e: WorkerRequestError) => {
    // Today: unsupported file type; once the checkpoint reader lands: a format error. Either way one line.
    assert.match(e.message, /weights\.pt/);
    assert.doesNotMatch(e.message, /\n/);
    assert.doesNotMatch(e.message, /internal error/);
    return true;
  });
  await assert.rejects(client.request('open', { file: path.join(tmp, 'missing.onnx'), options: inspectOpts }), /no such file/);
});

const checkpoint = path.join(repoRoot, 'test', 'fixtures', 'torch', 'yolov7_full_ema.pt');

test('checkpoints: a full-module YOLOv7 .pt opens and gives branch statistics', { skip: !fs.existsSync(checkpoint) && 'no checkpoint fixture' }, async () => {
  const r = await client.request('open', { file: checkpoint, options: inspectOpts });
  assert.equal(r.model.format, 'pytorch');
  assert.ok(r.blocks.length > 0);
  const s = await client.request('blockStats', { file: checkpoint, block: r.blocks[0].name, options: inspectOpts });
  assert.ok(s.branches.every((b) => b.raw !== null || b.kind === 'bn_identity' || b.kind === 'identity'));
  assert.ok(s.reconstructionError < 1e-9);
  await client.request('close', { file: checkpoint });
});

test('the parse cache follows the file: a changed file is parsed again', async () => {
  const f = copyExample('cache.onnx');
  const a = await client.request('open', { file: f, options: inspectOpts });
  assert.equal(a.blocks.length, 4);
  fs.copyFileSync(path.join(repoRoot, 'examples', 'repvgg_tiny.onnx'), f);
  const later = new Date(Date.now() + 5000);
  fs.utimesSync(f, later, later);
  const b = await client.request('open', { file: f, options: inspectOpts });
  assert.equal(b.blocks.length, 6);
  await client.request('close', { file: f });
});

test('fuse: writes <name>.fused.onnx beside the input and validates it in the child process', async () => {
  const input = copyExample('fuse.onnx');
  const progress: string[] = [];
  const r = await client.request('fuse', { file: input, options: fuseOpts(input) }, { onProgress: (m) => progress.push(m) });
  assert.equal(r.output, path.join(tmp, 'fuse.fused.onnx'));
  assert.equal(r.blocksFused, 4);
  assert.ok(r.validation?.passed, 'validation passed');
  assert.ok(r.validation!.outputs[0].maxAbsDiff < 1e-4);
  assert.ok(progress.some((p) => /writing/.test(p)));
  assert.ok(progress.some((p) => /validat/.test(p)));
  assert.deepEqual(leftovers(tmp, ['fuse.onnx', 'fuse.fused.onnx', 'weights.pt', 'cache.onnx']), []);
  // The output exists now: without force the job refuses to replace it.
  await assert.rejects(client.request('fuse', { file: input, options: fuseOpts(input) }), /already exists/);
  fs.rmSync(path.join(tmp, 'fuse.fused.onnx'));
});

for (const when of ['writing', 'validating'] as const) {
  test(`fuse cancelled while ${when}: no output and no temp file are left`, async () => {
    const dir = fs.mkdtempSync(path.join(tmp, `cancel-${when}-`));
    const input = path.join(dir, 'm.onnx');
    fs.copyFileSync(example, input);
    const controller = new AbortController();
    const job = client.request('fuse', { file: input, options: fuseOpts(input) }, {
      signal: controller.signal,
      onProgress: (m) => {
        if (m.startsWith(when)) controller.abort();
      },
    });
    await assert.rejects(job, (e: WorkerRequestError) => {
      assert.equal(e.cancelled, true);
      return true;
    });
    assert.deepEqual(fs.readdirSync(dir), ['m.onnx']);
  });
}

test('shutting the worker down in the middle of a fuse removes the output', async () => {
  const dir = fs.mkdtempSync(path.join(tmp, 'shutdown-'));
  const input = path.join(dir, 'm.onnx');
  fs.copyFileSync(example, input);
  const c = new ModelWorkerClient(script);
  let started!: () => void;
  const validating = new Promise<void>((r) => (started = r));
  const job = c.request('fuse', { file: input, options: fuseOpts(input) }, { onProgress: (m) => m.startsWith('validating') && started() });
  job.catch(() => undefined);
  await validating;
  await c.dispose();
  await assert.rejects(job);
  assert.deepEqual(fs.readdirSync(dir), ['m.onnx']);
});

test('a fuse cancelled before it starts touches nothing, not even an existing output', async () => {
  const dir = fs.mkdtempSync(path.join(tmp, 'keep-'));
  const input = path.join(dir, 'm.onnx');
  fs.copyFileSync(example, input);
  const out = path.join(dir, 'm.fused.onnx');
  fs.writeFileSync(out, 'old');
  const controller = new AbortController();
  controller.abort();
  await assert.rejects(client.request('fuse', { file: input, options: fuseOpts(input, { force: true }) }, { signal: controller.signal }), (e: WorkerRequestError) => e.cancelled);
  assert.equal(fs.readFileSync(out, 'utf8'), 'old');
  assert.deepEqual(fs.readdirSync(dir).sort(), ['m.fused.onnx', 'm.onnx']);
});

test('a RepVGG-B1-sized model (≈ 220 MB): the host thread stays responsive, a cancel mid-write leaves nothing', async () => {
  const dir = fs.mkdtempSync(path.join(tmp, 'big-'));
  const input = path.join(dir, 'repvgg_b1.onnx');
  generateRepVGG(input);
  assert.ok(fs.statSync(input).size > 200e6);
  const delay = monitorEventLoopDelay({ resolution: 5 });
  delay.enable();
  const r = await client.request('open', { file: input, options: inspectOpts });
  const widest = r.blocks.reduce((a, b) => (b.outChannels * b.inChannels > a.outChannels * a.inChannels ? b : a));
  const stats = await client.request('blockStats', { file: input, block: widest.name, options: inspectOpts });
  delay.disable();
  // Parsing and statistics run in the worker: the host's event loop never stalls for long.
  const maxMs = delay.max / 1e6;
  console.log(`# host event loop: max delay ${maxMs.toFixed(1)} ms while parsing ${r.blocks.length} blocks and computing ${widest.name} (${widest.outChannels}×${widest.inChannels})`);
  assert.ok(maxMs < 200, `host thread blocked for ${maxMs.toFixed(0)} ms`);
  // One block's summary stays small even for 512 channels.
  assert.ok(JSON.stringify(stats).length < 400_000);
  await client.request('close', { file: input });

  const controller = new AbortController();
  const job = client.request('fuse', { file: input, options: fuseOpts(input, { validate: false }) }, {
    signal: controller.signal,
    onProgress: (m) => {
      if (m.startsWith('writing')) setTimeout(() => controller.abort(), 20);
    },
  });
  await assert.rejects(job, (e: WorkerRequestError) => e.cancelled);
  assert.deepEqual(fs.readdirSync(dir), ['repvgg_b1.onnx']);
  fs.rmSync(dir, { recursive: true, force: true });
});
