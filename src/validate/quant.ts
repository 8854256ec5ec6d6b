// The quantization job, run inside the onnxruntime child process (worker.ts dispatches to it): the
// float fused model runs once, then once per block and mode with only that block's fused weight
// INT8 fake-quantized (fed through an overridable initializer), and the SQNR of all outputs against
// the float run is recorded. Checkpoints have no graph: there each block's one-block model is used.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { DType, dtypeName, encodeFloats } from '../core/dtype';
import { oneLineError, RepFuseError } from '../core/errors';
import type { InputSpec } from '../core/onnx/inputs';
import { numelOf, openOnnx, readTensorValues } from '../core/onnx/reader';
import { emptyPlan, encodeOnnx, writeOnnx } from '../core/onnx/writer';
import { channelLayout, fakeQuantInt8, sqnrDb } from '../core/quant';
import { Rng } from '../core/random';
import type { BlockSqnr, QuantMeasurement, QuantModelRequest, QuantPairsRequest, QuantRequest } from './quantProtocol';

type Ort = typeof import('onnxruntime-node');
type OrtTensor = import('onnxruntime-node').Tensor;
type Session = import('onnxruntime-node').InferenceSession;

/** What the worker lends this job (kept there so input feeding stays in one place). */
export interface WorkerKit {
  makeInput(ort: Ort, spec: InputSpec, rng: Rng): OrtTensor;
  toNumbers(t: OrtTensor): { shape: number[]; values: Float64Array };
  progress(message: string): Promise<void>;
}

const SESSION: import('onnxruntime-node').InferenceSession.SessionOptions = { graphOptimizationLevel: 'disabled', executionProviders: ['cpu'], logSeverityLevel: 3 };

/** Energy of the reference outputs and of their difference to `got`, over every output in order. */
function outputSqnr(ref: Float64Array[], got: Float64Array[]): number | null {
  let s = 0;
  let e = 0;
  ref.forEach((r, k) => {
    const g = got[k];
    if (g.length !== r.length) throw new RepFuseError(`output ${k} changed size under quantization (${r.length} → ${g.length}).`);
    for (let i = 0; i < r.length; i++) {
      s += r[i] * r[i];
      const d = r[i] - g[i];
      e += d * d;
    }
  });
  return sqnrDb(s, e);
}

/** Quantized values in the weight's own element type, as an onnxruntime tensor. */
function weightTensor(ort: Ort, values: Float64Array, dtype: number, dims: number[]): OrtTensor {
  if (dtype === DType.float32) return new ort.Tensor('float32', Float32Array.from(values), dims);
  if (dtype === DType.float64) return new ort.Tensor('float64', values, dims);
  if (dtype === DType.float16) {
    const b = encodeFloats(values, DType.float16);
    return new ort.Tensor('float16', new Uint16Array(b.buffer, b.byteOffset, b.length / 2), dims);
  }
  throw new RepFuseError(`a ${dtypeName(dtype)} weight cannot be fed to onnxruntime.`);
}

async function runQuantModel(ort: Ort, req: QuantModelRequest, kit: WorkerKit): Promise<QuantMeasurement> {
  const t0 = Date.now();
  const rng = new Rng(req.seed);
  const feeds: Record<string, OrtTensor> = {};
  for (const spec of req.inputs) feeds[spec.name] = kit.makeInput(ort, spec, rng);

  const model = openOnnx(req.model);
  let session: Session | undefined;
  let tmp: string | undefined;
  try {
    const weights = req.blocks.map((b) => {
      const t = model.graph.initializers.get(b.weight);
      if (!t) throw new RepFuseError(`the fused model has no initializer '${b.weight}' (block '${b.name}').`, req.model);
      return t;
    });
    const extraInputs = weights.map((t) => ({ name: t.name, elemType: t.dtype, dims: t.dims }));
    // One session for every run: each block weight becomes a graph input (onnxruntime-node ignores
    // feeds for initializers that are merely listed as inputs), fed float or quantized per run.
    const plan = emptyPlan();
    for (const t of weights) plan.removeInitializers.add(t.name);
    const floats = new Map<string, { values: ArrayLike<number>; tensor: OrtTensor }>();
    for (const t of weights) {
      const values = readTensorValues(model, t);
      if (t.dims.length < 2 || values.length !== numelOf(t.dims)) throw new RepFuseError(`weight '${t.name}' has shape ${t.dims.join('×')}, not a Conv/Gemm weight.`, req.model);
      // float32 (the usual case): the decoded array is the tensor's data, not a copy of it.
      const tensor = values instanceof Float32Array && t.dtype === DType.float32 ? new ort.Tensor('float32', values, t.dims) : weightTensor(ort, Float64Array.from(values), t.dtype, t.dims);
      floats.set(t.name, { values, tensor });
    }
    const floatFeeds = Object.fromEntries([...floats].map(([k, v]) => [k, v.tensor]));
    if (!model.usesExternalData) {
      session = await ort.InferenceSession.create(await encodeOnnx(model, plan, { extraInputs }), SESSION);
    } else {
      tmp = path.join(path.dirname(path.resolve(req.model)), `.${path.basename(req.model)}.${process.pid}.quant.onnx`);
      await writeOnnx(model, plan, tmp, { extraInputs, keepExternalReferences: true });
      session = await ort.InferenceSession.create(tmp, SESSION);
    }
    const s = session;
    const outputs = s.outputNames;
    const run = async (extra: Record<string, OrtTensor>) => {
      const r = await s.run({ ...feeds, ...floatFeeds, ...extra }, outputs);
      return outputs.map((n) => kit.toNumbers(r[n]).values);
    };
    await kit.progress('running the float fused model');
    const ref = await run({});
    const blocks: BlockSqnr[] = [];
    for (let i = 0; i < req.blocks.length; i++) {
      const b = req.blocks[i];
      const t = weights[i];
      try {
        const values = floats.get(t.name)!.values;
        const layout = channelLayout(t.dims, b.axis);
        const perTensor = outputSqnr(ref, await run({ [t.name]: weightTensor(ort, fakeQuantInt8(values), t.dtype, t.dims) }));
        const perChannel = outputSqnr(ref, await run({ [t.name]: weightTensor(ort, fakeQuantInt8(values, layout), t.dtype, t.dims) }));
        blocks.push({ name: b.name, perTensor, perChannel });
      } catch (err) {
        blocks.push({ name: b.name, perTensor: null, perChannel: null, error: oneLineError(err) });
      }
      await kit.progress(`measured block ${b.name} (${i + 1}/${req.blocks.length})`);
    }
    return {
      scope: 'model',
      runtime: `onnxruntime-node ${ort.env.versions.node ?? ''} (CPU, graph optimizations disabled)`,
      seed: req.seed,
      inputs: req.inputs.map((sp) => ({ name: sp.name, shape: sp.shape, dtype: dtypeName(sp.dtype), source: sp.npy ? sp.npy : `random uniform [-1, 1), seed ${req.seed}` })),
      blocks,
      durationMs: Date.now() - t0,
    };
  } finally {
    model.close();
    if (tmp) fs.rmSync(tmp, { force: true });
    await session?.release();
  }
}

async function runQuantPairs(ort: Ort, req: QuantPairsRequest, kit: WorkerKit): Promise<QuantMeasurement> {
  const t0 = Date.now();
  const rng = new Rng(req.seed);
  const inputs: QuantMeasurement['inputs'] = [];
  const blocks: BlockSqnr[] = [];
  const once = async (file: string, x: OrtTensor) => {
    const s = await ort.InferenceSession.create(file, SESSION);
    try {
      return [kit.toNumbers((await s.run({ x }))[s.outputNames[0]]).values];
    } finally {
      await s.release();
    }
  };
  for (const b of req.blocks) {
    const x = kit.makeInput(ort, { name: 'x', dtype: DType.float32, shape: b.inputShape }, rng);
    inputs.push({ name: `${b.name}:x`, shape: b.inputShape, dtype: 'float32', source: `random uniform [-1, 1), seed ${req.seed}` });
    try {
      const ref = await once(b.float, x);
      blocks.push({ name: b.name, perTensor: outputSqnr(ref, await once(b.perTensor, x)), perChannel: outputSqnr(ref, await once(b.perChannel, x)) });
    } catch (err) {
      blocks.push({ name: b.name, perTensor: null, perChannel: null, error: oneLineError(err) });
    }
    await kit.progress(`measured block ${b.name}`);
  }
  return {
    scope: 'block',
    runtime: `onnxruntime-node ${ort.env.versions.node ?? ''} (CPU, graph optimizations disabled)`,
    seed: req.seed,
    inputs,
    blocks,
    durationMs: Date.now() - t0,
  };
}

export function runQuant(req: QuantRequest, kit: WorkerKit): Promise<QuantMeasurement> {
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  const ort: Ort = require('onnxruntime-node');
  return req.type === 'quant-model' ? runQuantModel(ort, req, kit) : runQuantPairs(ort, req, kit);
}
