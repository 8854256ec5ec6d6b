// `repfuse quant` and the extension's Quantization section: opens a model, fuses it in memory as
// `repfuse fuse` would write it (ONNX: a temporary fused file; checkpoints: the fused state_dict),
// computes every weight's INT8/FP16 numbers (src/core/quant.ts), and measures each block's output
// SQNR under INT8 in the onnxruntime child process.
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { analyzeCheckpoint, checkpointBlockData, checkpointFolds, fusedStateDict, writtenValues } from '../core/checkpoint';
import { blockDeployKeys } from '../core/checkpoint/deploy';
import { keepsPostBN } from '../core/checkpoint/detect';
import { ckptBlockSpec } from '../core/checkpoint/fuse';
import { isFloatType } from '../core/dtype';
import { FormatError, FusionError } from '../core/errors';
import { modelKind } from '../core/formats';
import { fuseBlock } from '../core/fusion';
import { readNpy } from '../core/npy';
import { analyzeOnnx, onnxBlockData, openOnnx, writeFused } from '../core/onnx';
import { buildBlockModels } from '../core/onnx/blockmodel';
import { GraphIndex } from '../core/onnx/graph';
import { type InputSpec, resolveInputs } from '../core/onnx/inputs';
import { attrInt, type OnnxModel, readTensorValues } from '../core/onnx/reader';
import {
  analyzeTensor, blockVerdict, type BlockGains, type BlockQuant, branchGains, channelLayout, DEFAULT_THRESHOLD_DB, fakeQuantInt8,
  fallbackList, outputAxis, type QuantReport, type TensorQuant,
} from '../core/quant';
import { readTensor } from '../core/torch';
import { runInChild } from './index';
import type { QuantMeasurement } from './quantProtocol';

export interface QuantOptions {
  foldBN: boolean;
  /** Checkpoints: BN epsilon override, as for fuse. */
  eps?: number;
  seed: number;
  thresholdDb: number;
  timeoutMs: number;
  inputShapes: Record<string, number[]>;
  inputNpy: Record<string, string>;
  /** false: weight numbers only, no onnxruntime run (the extension's first, instant view). */
  measure?: boolean;
  signal?: AbortSignal;
  onProgress?: (message: string) => void;
}

export const defaultQuantOptions: QuantOptions = { foldBN: true, seed: 0, thresholdDb: DEFAULT_THRESHOLD_DB, timeoutMs: 300_000, inputShapes: {}, inputNpy: {} };

const WEIGHT_OPS = new Set(['Conv', 'Gemm', 'MatMul']);

interface Collected {
  format: string;
  fusedInMemory: boolean;
  tensors: TensorQuant[];
  blocks: { name: string; family: string; weight: string; axis?: number; gains: BlockGains | null }[];
  notes: string[];
}

/** Conv/Gemm/MatMul weights of an ONNX model (the fused one), each once, in node order. */
function onnxTensors(model: OnnxModel, blockOfWeight: Map<string, string>): TensorQuant[] {
  const index = new GraphIndex(model);
  const seen = new Set<string>();
  const out: TensorQuant[] = [];
  for (const n of model.graph.nodes) {
    if (!WEIGHT_OPS.has(n.opType) || (n.domain && n.domain !== 'ai.onnx')) continue;
    const ref = n.inputs[1] ? index.constant(n.inputs[1]) : undefined;
    if (!ref || !isFloatType(ref.tensor.dtype) || ref.tensor.dims.length < 1) continue;
    const name = ref.initializer ?? n.inputs[1];
    if (seen.has(name)) continue;
    seen.add(name);
    const dims = ref.tensor.dims;
    const axis = outputAxis(n.opType, dims.length, n.opType === 'Gemm' ? attrInt(n, 'transB', 0) : 0);
    out.push(analyzeTensor(name, n.opType, blockOfWeight.get(name) ?? null, dims, readTensorValues(model, ref.tensor), axis));
  }
  return out;
}

function resolveOnnxInputs(model: OnnxModel, opts: QuantOptions): InputSpec[] {
  const npy: Record<string, { file: string; shape: number[]; dtype: number }> = {};
  for (const [name, file] of Object.entries(opts.inputNpy)) {
    const arr = readNpy(file);
    npy[name] = { file, shape: arr.shape, dtype: arr.dtype };
  }
  return resolveInputs(model, opts.inputShapes, npy);
}

async function quantOnnx(file: string, opts: QuantOptions): Promise<{ c: Collected; measured: QuantMeasurement | null }> {
  const notes: string[] = [];
  let tmp: string | undefined;
  const model = openOnnx(file);
  try {
    const a = analyzeOnnx(model, { foldBN: opts.foldBN });
    // Inputs matter only for measuring blocks: a model without blocks gets its weight numbers regardless.
    const inputs = opts.measure === false || !a.detection.blocks.length ? [] : resolveOnnxInputs(model, opts);
    const gains = new Map<string, BlockGains>();
    for (const b of a.detection.blocks) gains.set(b.info.name, branchGains(onnxBlockData(a, b.info.name)));
    let fusedPath = file;
    const fusedInMemory = a.detection.blocks.length + a.detection.folds.length > 0;
    if (fusedInMemory) {
      tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'repfuse-quant-'));
      opts.onProgress?.('fusing in memory');
      fusedPath = (await writeFused(a, path.join(tmp, 'fused.onnx'), opts.signal)).path;
    }
    const fused = fusedPath === file ? model : openOnnx(fusedPath);
    let c: Collected;
    try {
      // The fused Conv of a block produces the block's output tensor; its weight input names it.
      const fi = new GraphIndex(fused);
      const blocks = a.detection.blocks.map((b) => {
        const conv = fi.producer.get(b.output);
        const ref = conv && (conv.opType === 'Conv' || conv.opType === 'Gemm') ? fi.constant(conv.inputs[1]) : undefined;
        // A block that fuses into something else than one Conv/Gemm with a constant weight is listed, not measured.
        const weight = ref ? (ref.initializer ?? conv!.inputs[1]) : '';
        const axis = conv?.opType === 'Gemm' ? outputAxis('Gemm', 2, attrInt(conv, 'transB', 0)) : 0;
        return { name: b.info.name, family: b.info.family, weight, axis, gains: gains.get(b.info.name) ?? null };
      });
      const blockOfWeight = new Map(blocks.map((b) => [b.weight, b.name]));
      c = { format: 'onnx', fusedInMemory, tensors: onnxTensors(fused, blockOfWeight), blocks, notes };
    } finally {
      if (fused !== model) fused.close();
    }
    if (a.detection.folds.length) notes.push(`${a.detection.folds.length} Conv → BatchNormalization pair(s) folded, as fuse does`);
    if (opts.measure === false || !c.blocks.length) return { c, measured: null };
    opts.onProgress?.('measuring output SQNR with onnxruntime');
    const measured = await runInChild<QuantMeasurement>(
      { type: 'quant-model', model: fusedPath, blocks: c.blocks.filter((b) => b.weight).map((b) => ({ name: b.name, weight: b.weight, axis: b.axis ?? 0 })), inputs, seed: opts.seed },
      { timeoutMs: opts.timeoutMs, signal: opts.signal, onProgress: opts.onProgress },
      'the output SQNR was not measured',
    );
    return { c, measured };
  } finally {
    model.close();
    if (tmp) fs.rmSync(tmp, { recursive: true, force: true });
  }
}

/** Linear weights are 2-D, convolution weights 3- to 5-D (PyTorch layout: output channels first). */
const ckptOp = (shape: number[]): string => (shape.length === 2 ? 'Linear' : 'Conv');

async function quantCheckpoint(file: string, opts: QuantOptions): Promise<{ c: Collected; measured: QuantMeasurement | null }> {
  const a = analyzeCheckpoint(file, { eps: opts.eps });
  let tmp: string | undefined;
  try {
    const w = a.primary;
    const notes: string[] = ['checkpoint: weights are state_dict tensors named *weight with 2 (Linear) to 5 (Conv) dimensions; output channels on axis 0'];
    const byKey = new Map(w.detection.blocks.map((b) => [`${blockDeployKeys(b).base}.weight`, b]));
    // The family's default whole-model Conv+BN folds, as fuse writes them (full-module YOLO, RepViT).
    const plan = checkpointFolds(w, undefined, opts.eps, a.modules.length > 0);
    if (plan.folds.length) notes.push(`${plan.folds.length} Conv/Linear → BN pair(s) folded, as fuse does by default for this family`);
    const sd = fusedStateDict(w, undefined, plan.folds);
    const written = new Map<string, { values: Float64Array; bias: Float64Array; shape: number[] }>();
    const tensors: TensorQuant[] = [];
    for (const [key, t] of sd) {
      const b = byKey.get(key);
      if (b) {
        const spec = ckptBlockSpec(b);
        const fused = fuseBlock(spec);
        const dt = b.branches.find((x) => x.conv)!.conv!.weight.dtype;
        const values = Float64Array.from(writtenValues(fused.weight, dt));
        written.set(b.info.name, { values, bias: Float64Array.from(writtenValues(fused.bias, dt)), shape: fused.shape });
        tensors.push(analyzeTensor(key, 'Conv', b.info.name, fused.shape, values, 0));
        continue;
      }
      if (!isFloatType(t.dtype) || t.shape.length < 2 || t.shape.length > 5 || !/(^|\.)weight$/.test(key)) continue;
      tensors.push(analyzeTensor(key, ckptOp(t.shape), null, t.shape, readTensor(t), 0));
    }
    const blocks = w.detection.blocks.map((b) => ({
      name: b.info.name,
      family: b.info.family,
      weight: tensors.find((t) => t.block === b.info.name)?.name ?? '',
      gains: branchGains(checkpointBlockData(a, b.info.name)),
    }));
    if (w.detection.blocks.some((b) => keepsPostBN(b.family, b.postBN))) {
      notes.push('QARepVGG-style blocks keep their post-add BatchNorm in the deploy model: the fused weight (and the measured block output) excludes it');
    }
    const c: Collected = { format: a.format, fusedInMemory: w.detection.blocks.length > 0, tensors, blocks, notes };
    if (opts.measure === false || !blocks.length) return { c, measured: null };
    tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'repfuse-quant-'));
    // A block whose fused conv is not a state_dict weight here (none known today) stays unmeasured, with the reason.
    const pairs = w.detection.blocks.filter((b) => written.has(b.info.name)).map((b, i) => {
      const spec = ckptBlockSpec(b);
      const { values, bias, shape } = written.get(b.info.name)!;
      const model = (weight: Float64Array) => buildBlockModels(spec, { shape, weight, bias }, b.stride);
      const files = { float: values, perTensor: fakeQuantInt8(values), perChannel: fakeQuantInt8(values, channelLayout(shape, 0)) };
      const out = { name: b.info.name, float: '', perTensor: '', perChannel: '', inputShape: [] as number[] };
      for (const [k, v] of Object.entries(files) as [keyof typeof files, Float64Array][]) {
        const m = model(v);
        const p = path.join(tmp!, `b${i}.${k}.onnx`);
        fs.writeFileSync(p, m.fused);
        out[k] = p;
        out.inputShape = m.inputShape;
      }
      return out;
    });
    opts.onProgress?.('measuring block output SQNR with onnxruntime');
    const measured = await runInChild<QuantMeasurement>(
      { type: 'quant-pairs', blocks: pairs, seed: opts.seed },
      { timeoutMs: opts.timeoutMs, signal: opts.signal, onProgress: opts.onProgress },
      'the output SQNR was not measured',
    );
    return { c, measured };
  } finally {
    a.close();
    if (tmp) fs.rmSync(tmp, { recursive: true, force: true });
  }
}

/** The whole quantization report of a model file. */
export async function analyzeQuant(file: string, opts: QuantOptions): Promise<QuantReport> {
  let r: { c: Collected; measured: QuantMeasurement | null };
  try {
    r = modelKind(file) === 'checkpoint' ? await quantCheckpoint(file, opts) : await quantOnnx(file, opts);
  } catch (err) {
    if ((err instanceof FormatError || err instanceof FusionError) && !err.file) err.file = file;
    throw err;
  }
  const { c, measured } = r;
  const scope = measured?.scope ?? (c.format === 'onnx' ? 'model' : 'block');
  const tensorByName = new Map(c.tensors.map((t) => [t.name, t]));
  const blocks: BlockQuant[] = c.blocks.map((b) => {
    const m = measured?.blocks.find((x) => x.name === b.name);
    const outputSqnrDb: BlockQuant['outputSqnrDb'] = m
      ? { perTensor: m.perTensor, perChannel: m.perChannel, scope, ...(m.error ? { error: m.error } : {}) }
      : { perTensor: null, perChannel: null, scope, error: b.weight ? 'not measured' : 'the fused block is not one Conv/Gemm weight here' };
    const partial = { name: b.name, family: b.family, weight: b.weight, outputSqnrDb, branchGains: b.gains };
    return { ...partial, verdict: blockVerdict(partial, tensorByName.get(b.weight), opts.thresholdDb) };
  });
  const hazardous = c.tensors.filter((t) => t.fp16.overflow || t.fp16.subnormal);
  const notes = [...c.notes];
  if (!c.blocks.length) notes.push('no re-parameterization blocks: only weight numbers (nothing to measure per block)');
  if (scope === 'block' && measured) notes.push('checkpoint (no graph): each block\'s output SQNR is measured on the block alone (its fused conv, float vs INT8) on random input, not on the model outputs');
  return {
    input: file,
    format: c.format,
    fusedInMemory: c.fusedInMemory,
    thresholdDb: opts.thresholdDb,
    measured: measured ? { scope: measured.scope, runtime: measured.runtime, seed: measured.seed, inputs: measured.inputs, durationMs: measured.durationMs } : null,
    tensors: c.tensors,
    blocks,
    fallback: fallbackList(blocks, opts.thresholdDb),
    fp16: {
      overflow: hazardous.reduce((s, t) => s + t.fp16.overflow, 0),
      subnormal: hazardous.reduce((s, t) => s + t.fp16.subnormal, 0),
      tensors: hazardous.map((t) => t.name),
    },
    notes,
  };
}
