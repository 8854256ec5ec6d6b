// The staged validation session and latency measurement, run inside the onnxruntime child process
// (worker.ts dispatches to them). The original model is loaded and run as soon as the host knows
// its blocks, while the host is still writing the fused model; the fused one follows when the host
// says it is on disk. Models go to onnxruntime as buffers, block outputs added without re-encoding.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { DType, dtypeName } from '../core/dtype';
import { type InputSpec, resolveInputs } from '../core/onnx/inputs';
import { type OnnxModel, openOnnx } from '../core/onnx/reader';
import { ByteBuilder, walkFields, WT_LEN } from '../core/proto/wire';
import { Rng } from '../core/random';
import { onnx } from 'onnx-proto';
import type { BlockDiff, TensorDiff, ValidationReport, WorkerMessage } from './protocol';
import { type LatencyRequest, type LatencyResult, type ValidateBeginRequest, type ValidateFusedMessage, validationHeaderName } from './stagedProtocol';

type Ort = typeof import('onnxruntime-node');
type OrtTensor = import('onnxruntime-node').Tensor;
type Session = import('onnxruntime-node').InferenceSession;
type Numbers = { shape: number[]; values: Float64Array };

/** What the worker lends these jobs (kept there so input feeding and comparing stay in one place). */
export interface StagedKit {
  makeInput(ort: Ort, spec: InputSpec, rng: Rng): OrtTensor;
  toNumbers(t: OrtTensor): Numbers;
  compare(name: string, a: Numbers, b: Numbers, atol: number, rtol: number): TensorDiff;
  send(m: WorkerMessage): Promise<void>;
}

const VALIDATE_OPTIONS: import('onnxruntime-node').InferenceSession.SessionOptions = { graphOptimizationLevel: 'disabled', executionProviders: ['cpu'], logSeverityLevel: 3 };

function ortModule(): Ort {
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  return require('onnxruntime-node');
}

/**
 * Bytes that, appended to a serialized ModelProto, add graph outputs: a second `graph` field (7)
 * holding only `output` entries. Protobuf merges repeated occurrences of an embedded message, so
 * the parsed model has the original outputs followed by these, and nothing is re-encoded.
 */
export function extraOutputsSuffix(extra: { name: string; elemType: number }[]): Uint8Array {
  if (!extra.length) return new Uint8Array(0);
  const graph = onnx.GraphProto.encode({ output: extra.map((o) => ({ name: o.name, type: { tensorType: { elemType: o.elemType } } })) }).finish();
  return new ByteBuilder().tag(7, WT_LEN).varint(graph.length).bytes(graph).finish();
}

/** TensorProto fields that hold data: dropped when a tensor is turned into an external reference. */
const DATA_FIELDS = new Set([4, 5, 7, 9, 10, 11, 13, 14]);

/**
 * A small model that is `model` with every raw initializer of at least `threshold` bytes turned
 * into an ONNX external-data reference to the bytes where it already lies, in the model file
 * itself (reached as `dataName`, a link beside the header); `extra` outputs appended. onnxruntime
 * maps such tensors from the file (already in the page cache) instead of copying them, so the
 * validation reads no model into its own memory and re-encodes nothing but node-sized fields.
 */
export function externalHeader(model: OnnxModel, dataName: string, extra: { name: string; elemType: number }[], threshold = 4096): Uint8Array {
  const src = model.source;
  const graph = new ByteBuilder();
  for (const f of model.graph.fields) {
    const t = f.kind === 'initializer' ? model.graph.initializers.get(f.name) : undefined;
    if (t && t.storage.kind === 'raw' && t.storage.length >= threshold && t.span) {
      const parts = new ByteBuilder();
      for (const g of walkFields(src, t.span.start, t.span.end)) if (!DATA_FIELDS.has(g.field)) parts.bytes(src.read(g.start, g.end - g.start));
      const kv = (k: string, v: string) => parts.lenField(13, new ByteBuilder().stringField(1, k).stringField(2, v).finish());
      kv('location', dataName);
      kv('offset', String(t.storage.offset));
      kv('length', String(t.storage.length));
      parts.varintField(14, 1);
      const body = parts.finish();
      graph.tag(5, WT_LEN).varint(body.length).bytes(body);
    } else graph.bytes(src.read(f.wire.start, f.wire.end - f.wire.start));
  }
  for (const o of extra) {
    const vi = onnx.ValueInfoProto.encode({ name: o.name, type: { tensorType: { elemType: o.elemType } } }).finish();
    graph.tag(12, WT_LEN).varint(vi.length).bytes(vi);
  }
  const g = graph.finish();
  const out = new ByteBuilder();
  for (const f of model.topFields) {
    if (f === model.graphField) out.tag(7, WT_LEN).varint(g.length).bytes(g);
    else out.bytes(src.read(f.start, f.end - f.start));
  }
  return out.finish();
}

/** The model file read into one buffer with room for `suffix`, which ends it. */
export function readWithSuffix(file: string, suffix: Uint8Array): Uint8Array {
  const fd = fs.openSync(file, 'r');
  try {
    const size = fs.fstatSync(fd).size;
    const buf = Buffer.allocUnsafe(size + suffix.length);
    let off = 0;
    while (off < size) {
      const n = fs.readSync(fd, buf, off, size - off, off);
      if (n === 0) throw new Error(`${path.basename(file)} ended after ${off} of ${size} bytes while being read.`);
      off += n;
    }
    buf.set(suffix, size);
    return buf;
  } finally {
    fs.closeSync(fd);
  }
}

/**
 * A session for `file` with `extra` graph outputs. First choice: a small header beside the model
 * whose big initializers refer to the model file's own bytes (see externalHeader), removed again
 * once the session exists. Where that cannot be written or loaded (a read-only folder, a model
 * reached through a link), the model is read into a buffer with the outputs appended (or, with
 * external data, copied beside itself with them).
 */
async function createWithOutputs(ort: Ort, file: string, extra: { name: string; elemType: number }[], options: import('onnxruntime-node').InferenceSession.SessionOptions = VALIDATE_OPTIONS): Promise<Session> {
  const abs = path.resolve(file);
  const model = openOnnx(abs);
  const header = path.join(path.dirname(abs), validationHeaderName(abs, process.pid));
  let wrote = false;
  try {
    try {
      fs.writeFileSync(header, externalHeader(model, path.basename(abs), extra), { flag: 'wx' });
      wrote = true;
      return await ort.InferenceSession.create(header, options);
    } catch {
      // fall back below
    }
    const suffix = extraOutputsSuffix(extra);
    if (!model.usesExternalData) return await ort.InferenceSession.create(readWithSuffix(abs, suffix), options);
    // External data is resolved relative to the model file, so the variant must sit beside it.
    const tmp = `${header}.copy`;
    try {
      fs.copyFileSync(abs, tmp);
      fs.appendFileSync(tmp, suffix);
      return await ort.InferenceSession.create(tmp, options);
    } finally {
      fs.rmSync(tmp, { force: true });
    }
  } finally {
    model.close();
    if (wrote) fs.rmSync(header, { force: true });
  }
}

async function runOnce(kit: StagedKit, ort: Ort, file: string, extra: { name: string; elemType: number }[], feeds: Record<string, OrtTensor>, fetch: string[]): Promise<Map<string, Numbers>> {
  const session = await createWithOutputs(ort, file, extra);
  try {
    const results = await session.run(feeds, fetch);
    const out = new Map<string, Numbers>();
    for (const name of fetch) out.set(name, kit.toNumbers(results[name]));
    return out;
  } finally {
    await session.release();
  }
}

function feedsFor(kit: StagedKit, ort: Ort, inputs: InputSpec[], seed: number): Record<string, OrtTensor> {
  const rng = new Rng(seed);
  const feeds: Record<string, OrtTensor> = {};
  for (const spec of inputs) feeds[spec.name] = kit.makeInput(ort, spec, rng);
  return feeds;
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}

/**
 * Median latency of two models with onnxruntime's default optimizations and the same thread
 * count: one warm-up run each, then `runs` runs alternating between them (the order flips every
 * round), so load from elsewhere on the machine falls on both alike.
 */
export async function measureLatency(ort: Ort, before: string, after: string, feeds: Record<string, OrtTensor>, runs: number, threads: number): Promise<{ before: number; after: number }> {
  const options: import('onnxruntime-node').InferenceSession.SessionOptions = { executionProviders: ['cpu'], logSeverityLevel: 3 };
  if (threads > 0) options.intraOpNumThreads = threads;
  const create = (m: string) => createWithOutputs(ort, m, [], options);
  const sessions: Session[] = [];
  try {
    sessions.push(await create(before));
    sessions.push(await create(after));
    const times: number[][] = [[], []];
    for (const s of sessions) await s.run(feeds);
    for (let i = 0; i < runs; i++) {
      for (const k of i % 2 ? [1, 0] : [0, 1]) {
        const t0 = performance.now();
        await sessions[k].run(feeds);
        times[k].push(performance.now() - t0);
      }
    }
    return { before: median(times[0]), after: median(times[1]) };
  } finally {
    for (const s of sessions) await s.release();
  }
}

function runtimeName(ort: Ort): string {
  return `onnxruntime-node ${ort.env.versions.node ?? ''} (CPU, graph optimizations disabled)`.replace('  ', ' ');
}

/**
 * The staged session: runs the original as soon as this request arrives, waits for `next()` (the
 * host's word that the fused model is written), runs that, compares every output and block
 * output, and measures latency when asked (sent as a `latency` message before the result).
 */
export async function runStaged(req: ValidateBeginRequest, next: Promise<ValidateFusedMessage>, kit: StagedKit): Promise<ValidationReport> {
  const t0 = Date.now();
  const ort = ortModule();
  const feeds = feedsFor(kit, ort, req.inputs, req.seed);
  const blockOutputs = [...new Set(req.blocks.map((b) => b.output).filter((o) => !req.outputs.includes(o)))];
  const extra = blockOutputs.map((o) => ({ name: o, elemType: req.blocks.find((b) => b.output === o)!.elemType }));
  const fetch = [...req.outputs, ...blockOutputs];

  await kit.send({ type: 'progress', message: 'running the original model' });
  const ref = await runOnce(kit, ort, req.original, extra, feeds, fetch);
  await kit.send({ type: 'progress', message: 'original model ran; waiting for the fused model' });
  const f = await next;
  await kit.send({ type: 'progress', message: 'running the fused model' });
  const got = await runOnce(kit, ort, f.fused, extra, feeds, fetch);

  const outDiffs = req.outputs.map((n) => kit.compare(n, ref.get(n)!, got.get(n)!, f.atol, f.rtol));
  const blockDiffs: BlockDiff[] = req.blocks.map((b) => ({ block: b.name, ...kit.compare(b.output, ref.get(b.output)!, got.get(b.output)!, f.atol, f.rtol) }));
  const report: ValidationReport = {
    passed: outDiffs.every((d) => d.passed) && blockDiffs.every((d) => d.passed),
    atol: f.atol,
    rtol: f.rtol,
    seed: req.seed,
    runtime: runtimeName(ort),
    inputs: req.inputs.map((s) => ({ name: s.name, shape: s.shape, dtype: dtypeName(s.dtype), source: s.npy ? s.npy : `random uniform [-1, 1), seed ${req.seed}` })),
    outputs: outDiffs,
    blocks: blockDiffs,
    durationMs: Date.now() - t0,
  };
  if (req.latencyRuns > 0) {
    await kit.send({ type: 'progress', message: `measuring latency (${req.latencyRuns} runs of each model)` });
    const m = await measureLatency(ort, req.original, f.fused, feeds, req.latencyRuns, req.threads);
    const latency: LatencyResult = { ...m, runs: req.latencyRuns, threads: req.threads, scope: 'model' };
    await kit.send({ type: 'latency', latency });
  }
  return report;
}

/** Latency of a model and its fused form on their own (no validation). */
export async function runLatency(req: LatencyRequest, kit: StagedKit): Promise<LatencyResult> {
  const ort = ortModule();
  const model = openOnnx(req.original);
  let inputs: InputSpec[];
  try {
    inputs = resolveInputs(model, req.inputShapes);
  } finally {
    model.close();
  }
  const feeds = feedsFor(kit, ort, inputs, req.seed);
  await kit.send({ type: 'progress', message: `measuring latency (${req.runs} runs of each model)` });
  const m = await measureLatency(ort, req.original, req.fused, feeds, req.runs, req.threads);
  return { ...m, runs: req.runs, threads: req.threads, scope: 'model' };
}

/** Latency of a checkpoint's one-block models (unfused against fused), medians summed over blocks. */
export async function pairsLatency(ort: Ort, pairs: { unfused: string; fused: string; inputShape: number[] }[], runs: number, threads: number, seed: number, kit: StagedKit): Promise<LatencyResult> {
  let before = 0;
  let after = 0;
  const rng = new Rng(seed);
  for (const p of pairs) {
    const x = kit.makeInput(ort, { name: 'x', dtype: DType.float32, shape: p.inputShape }, rng);
    const m = await measureLatency(ort, p.unfused, p.fused, { x }, runs, threads);
    before += m.before;
    after += m.after;
  }
  return { before, after, runs, threads, scope: 'blocks' };
}
