// The validation child process: the only place onnxruntime-node is loaded. It runs the original
// and the fused model on the same inputs and compares every output and every block output.
// A crash or hang here cannot take the extension host or the CLI down with it.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { DType, dtypeName, floatToHalf, halfToFloat } from '../core/dtype';
import { oneLineError, RepFuseError } from '../core/errors';
import { readNpy } from '../core/npy';
import type { InputSpec } from '../core/onnx/inputs';
import { openOnnx } from '../core/onnx/reader';
import { emptyPlan, encodeOnnx, writeOnnx } from '../core/onnx/writer';
import { Rng } from '../core/random';
import type { BlockDiff, TensorDiff, ValidatePairsRequest, ValidateRequest, ValidationReport, WorkerMessage, WorkerRequest } from './protocol';
import { runQuant } from './quant';
import { isQuantRequest } from './quantProtocol';
import { pairsLatency, runLatency, runStaged, type StagedKit } from './staged';
import type { ValidateFusedMessage } from './stagedProtocol';

type Ort = typeof import('onnxruntime-node');
type OrtTensor = import('onnxruntime-node').Tensor;

function send(m: WorkerMessage): Promise<void> {
  return new Promise((resolve) => {
    if (!process.send) {
      process.stdout.write(JSON.stringify(m) + '\n');
      resolve();
    } else process.send(m, undefined, {}, () => resolve());
  });
}

const ORT_TYPES: Record<number, string> = {
  [DType.float32]: 'float32', [DType.float16]: 'float16', [DType.float64]: 'float64', [DType.int64]: 'int64',
  [DType.int32]: 'int32', [DType.uint8]: 'uint8', [DType.int8]: 'int8', [DType.bool]: 'bool',
};

function makeInput(ort: Ort, spec: InputSpec, rng: Rng): OrtTensor {
  const type = ORT_TYPES[spec.dtype];
  if (!type) throw new RepFuseError(`input '${spec.name}' has type ${dtypeName(spec.dtype)}, which validation cannot feed.`);
  const n = spec.shape.reduce((a, b) => a * b, 1);
  if (spec.npy) {
    const arr = readNpy(spec.npy);
    const b = arr.bytes;
    const view = (C: { new (buf: ArrayBuffer, off: number, len: number): ArrayLike<number> | BigInt64Array }, size: number) =>
      new C(b.buffer as ArrayBuffer, b.byteOffset, b.length / size);
    const data =
      type === 'float32' ? view(Float32Array, 4) : type === 'float64' ? view(Float64Array, 8) : type === 'float16' ? view(Uint16Array, 2)
      : type === 'int64' ? view(BigInt64Array, 8) : type === 'int32' ? view(Int32Array, 4) : type === 'int8' ? view(Int8Array, 1) : view(Uint8Array, 1);
    return new ort.Tensor(type as 'float32', data as Float32Array, spec.shape);
  }
  let data: Float32Array | Float64Array | Uint16Array | BigInt64Array | Int32Array | Int8Array | Uint8Array;
  switch (type) {
    case 'float32':
      data = rng.fill(new Float32Array(n)) as Float32Array;
      break;
    case 'float64':
      data = rng.fill(new Float64Array(n)) as Float64Array;
      break;
    case 'float16': {
      const h = new Uint16Array(n);
      for (let i = 0; i < n; i++) h[i] = floatToHalf(rng.uniform(-1, 1));
      data = h;
      break;
    }
    case 'int64':
      data = new BigInt64Array(n);
      break;
    case 'int32':
      data = new Int32Array(n);
      break;
    case 'int8':
      data = new Int8Array(n);
      break;
    default:
      data = new Uint8Array(n);
  }
  return new ort.Tensor(type as 'float32', data as Float32Array, spec.shape);
}

/** Copies a result tensor into float64 so it outlives its session and compares exactly. */
function toNumbers(t: OrtTensor): { shape: number[]; values: Float64Array } {
  const d = t.data as ArrayLike<number | bigint>;
  const out = new Float64Array(d.length);
  if (t.type === 'float16' && d instanceof Uint16Array) for (let i = 0; i < d.length; i++) out[i] = halfToFloat(d[i]);
  else for (let i = 0; i < d.length; i++) out[i] = Number(d[i]);
  return { shape: [...t.dims], values: out };
}

async function runModel(ort: Ort, file: string, extra: { name: string; elemType: number }[], feeds: Record<string, OrtTensor>, fetch: string[]) {
  const model = openOnnx(file);
  let tmp: string | undefined;
  let session: import('onnxruntime-node').InferenceSession | undefined;
  const options: import('onnxruntime-node').InferenceSession.SessionOptions = {
    graphOptimizationLevel: 'disabled',
    executionProviders: ['cpu'],
    logSeverityLevel: 3,
  };
  try {
    if (!model.usesExternalData) {
      const bytes = extra.length ? await encodeOnnx(model, emptyPlan(), { extraOutputs: extra }) : fs.readFileSync(file);
      session = await ort.InferenceSession.create(bytes, options);
    } else {
      // External data is resolved relative to the model file, so the variant must sit beside it.
      tmp = path.join(path.dirname(path.resolve(file)), `.${path.basename(file)}.${process.pid}.validate.onnx`);
      await writeOnnx(model, emptyPlan(), tmp, { extraOutputs: extra, keepExternalReferences: true });
      session = await ort.InferenceSession.create(tmp, options);
    }
  } finally {
    model.close();
    if (tmp) fs.rmSync(tmp, { force: true });
  }
  try {
    const results = await session.run(feeds, fetch);
    const out = new Map<string, { shape: number[]; values: Float64Array }>();
    for (const name of fetch) out.set(name, toNumbers(results[name]));
    return out;
  } finally {
    await session.release();
  }
}

function unravel(i: number, shape: number[]): number[] {
  const idx = new Array<number>(shape.length).fill(0);
  for (let d = shape.length - 1; d >= 0; d--) {
    idx[d] = i % shape[d];
    i = Math.floor(i / shape[d]);
  }
  return idx;
}

export function compare(name: string, a: { shape: number[]; values: Float64Array }, b: { shape: number[]; values: Float64Array }, atol: number, rtol: number): TensorDiff {
  if (a.shape.join('x') !== b.shape.join('x')) {
    throw new RepFuseError(`output '${name}' has shape ${a.shape.join('×')} in the original but ${b.shape.join('×')} in the fused model.`);
  }
  let maxAbs = 0;
  let maxRel = 0;
  let sum = 0;
  let worst = 0;
  let maxRef = 0;
  let nonFinite = 0;
  const x = a.values;
  const y = b.values;
  for (let i = 0; i < x.length; i++) {
    const r = x[i];
    const f = y[i];
    if (!Number.isFinite(r) || !Number.isFinite(f)) {
      if (!Object.is(r, f) && !(Number.isNaN(r) && Number.isNaN(f))) nonFinite++;
      continue;
    }
    const ar = Math.abs(r);
    if (ar > maxRef) maxRef = ar;
    const d = Math.abs(r - f);
    sum += d;
    if (d > maxAbs) {
      maxAbs = d;
      worst = i;
    }
    const rel = d / Math.max(ar, atol, 1e-12);
    if (rel > maxRel) maxRel = rel;
  }
  const tolerance = atol + rtol * maxRef;
  return {
    name,
    shape: a.shape,
    maxAbsDiff: maxAbs,
    maxRelDiff: maxRel,
    meanAbsDiff: x.length ? sum / x.length : 0,
    worstIndex: unravel(worst, a.shape),
    maxAbsRef: maxRef,
    tolerance,
    passed: maxAbs <= tolerance && nonFinite === 0,
    nonFinite,
  };
}

export async function runValidation(req: ValidateRequest): Promise<ValidationReport> {
  const t0 = Date.now();
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  const ort: Ort = require('onnxruntime-node');
  const rng = new Rng(req.seed);
  const feeds: Record<string, OrtTensor> = {};
  for (const spec of req.inputs) feeds[spec.name] = makeInput(ort, spec, rng);

  const probe = openOnnx(req.original);
  const outputs = probe.graph.outputs.map((o) => o.name);
  probe.close();
  const blockOutputs = req.blocks.map((b) => b.output).filter((o) => !outputs.includes(o));
  const extra = req.blocks.filter((b) => blockOutputs.includes(b.output)).map((b) => ({ name: b.output, elemType: b.elemType }));
  const fetch = [...outputs, ...blockOutputs];

  await send({ type: 'progress', message: 'running the original model' });
  const ref = await runModel(ort, req.original, extra, feeds, fetch);
  await send({ type: 'progress', message: 'running the fused model' });
  const got = await runModel(ort, req.fused, extra, feeds, fetch);

  const outDiffs = outputs.map((n) => compare(n, ref.get(n)!, got.get(n)!, req.atol, req.rtol));
  const blockDiffs: BlockDiff[] = req.blocks.map((b) => ({ block: b.name, ...compare(b.output, ref.get(b.output)!, got.get(b.output)!, req.atol, req.rtol) }));
  return {
    passed: outDiffs.every((d) => d.passed) && blockDiffs.every((d) => d.passed),
    atol: req.atol,
    rtol: req.rtol,
    seed: req.seed,
    runtime: `onnxruntime-node ${ort.env.versions.node ?? ''} (CPU, graph optimizations disabled)`.replace('  ', ' '),
    inputs: req.inputs.map((s) => ({ name: s.name, shape: s.shape, dtype: dtypeName(s.dtype), source: s.npy ? s.npy : `random uniform [-1, 1), seed ${req.seed}` })),
    outputs: outDiffs,
    blocks: blockDiffs,
    durationMs: Date.now() - t0,
  };
}

/** Validates blocks one by one from tiny unfused/fused model pairs (checkpoints have no graph). */
export async function runPairs(req: ValidatePairsRequest): Promise<ValidationReport> {
  const t0 = Date.now();
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  const ort: Ort = require('onnxruntime-node');
  const rng = new Rng(req.seed);
  const blocks: BlockDiff[] = [];
  const inputs: ValidationReport['inputs'] = [];
  for (const p of req.pairs) {
    const x = makeInput(ort, { name: 'x', dtype: DType.float32, shape: p.inputShape }, rng);
    inputs.push({ name: `${p.block}:x`, shape: p.inputShape, dtype: 'float32', source: `random uniform [-1, 1), seed ${req.seed}` });
    const run = async (file: string) => {
      const session = await ort.InferenceSession.create(file, { graphOptimizationLevel: 'disabled', executionProviders: ['cpu'], logSeverityLevel: 3 });
      try {
        const out = await session.run({ x });
        return toNumbers(out[session.outputNames[0]]);
      } finally {
        await session.release();
      }
    };
    const a = await run(p.unfused);
    const b = await run(p.fused);
    blocks.push({ block: p.block, ...compare(p.block, a, b, req.atol, req.rtol) });
    await send({ type: 'progress', message: `validated block ${p.block}` });
  }
  if (req.latencyRuns) {
    await send({ type: 'progress', message: `measuring latency (${req.latencyRuns} runs of each block model)` });
    await send({ type: 'latency', latency: await pairsLatency(ort, req.pairs, req.latencyRuns, req.threads ?? 0, req.seed, stagedKit) });
  }
  return {
    passed: blocks.every((d) => d.passed),
    atol: req.atol,
    rtol: req.rtol,
    seed: req.seed,
    runtime: `onnxruntime-node ${ort.env.versions.node ?? ''} (CPU, graph optimizations disabled)`,
    inputs,
    outputs: [],
    blocks,
    durationMs: Date.now() - t0,
  };
}

const stagedKit: StagedKit = { makeInput, toNumbers, compare, send };

if (require.main === module) {
  // Load onnxruntime while the host is still analyzing the model (a staged session's first request
  // comes only after that); every job needs it.
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  setImmediate(() => require('onnxruntime-node'));
  process.once('message', (req: WorkerRequest) => {
    // A staged session: the second message says the fused model is written.
    const fused = new Promise<ValidateFusedMessage>((resolve) => process.on('message', (m: ValidateFusedMessage) => m.type === 'validate-fused' && resolve(m)));
    (req.type === 'validate-begin' ? runStaged(req, fused, stagedKit) : req.type === 'latency' ? runLatency(req, stagedKit) : isQuantRequest(req) ? runQuant(req, { makeInput, toNumbers, progress: (message) => send({ type: 'progress', message }) })
      : req.type === 'validate-pairs' ? runPairs(req) : runValidation(req))
      .then((report) => send({ type: 'result', report }))
      .catch((err) => send({ type: 'error', message: oneLineError(err) }))
      .finally(() => process.exit(0));
  });
}
