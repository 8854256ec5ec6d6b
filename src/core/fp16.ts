// `repfuse fuse --fp16`: the FP16 check (every float value the output would store in half
// precision: overflow |w| > 65504 becomes ±inf, 0 < |w| < 2⁻¹⁴ is subnormal) and, for ONNX, the
// plan change that stores every float32 initializer as float16 behind a Cast back to float32.
import { onnx } from 'onnx-proto';
import { DType, decodeNumbers, encodeFloats } from './dtype';
import { RepFuseError } from './errors';
import { readTensorValues, type OnnxModel } from './onnx/reader';
import type { NewTensor, Plan } from './onnx/writer';
import { fp16Hazards } from './quant';
import { fusedStateDict, type WeightSet } from './checkpoint';
import type { PlannedFold } from './checkpoint/deploy';
import { readTensor } from './torch';

/**
 * Default rtol of the whole-model check of an ONNX model written with --fp16 (each stored weight
 * loses up to 2⁻¹¹ relative; errors add up over layers). --rtol overrides it.
 */
export const FP16_MODEL_RTOL = 1e-2;

/** FP16 hazards of one tensor that would be stored as float16. */
export interface Fp16TensorHazard {
  name: string;
  overflow: number;
  subnormal: number;
}

export interface Fp16Check {
  /** Tensors with at least one hazard. */
  tensors: Fp16TensorHazard[];
  overflow: number;
  subnormal: number;
  /** Float tensors checked (and converted). */
  checked: number;
}

export function summarizeFp16(hazards: Fp16TensorHazard[], checked: number): Fp16Check {
  const tensors = hazards.filter((h) => h.overflow || h.subnormal);
  return { tensors, overflow: tensors.reduce((s, t) => s + t.overflow, 0), subnormal: tensors.reduce((s, t) => s + t.subnormal, 0), checked };
}

const names = (ts: Fp16TensorHazard[], pick: (t: Fp16TensorHazard) => number): string => {
  const hit = ts.filter((t) => pick(t) > 0);
  const list = hit.slice(0, 8).map((t) => `${t.name} (${pick(t)})`).join(', ');
  return hit.length > 8 ? `${list}, … ${hit.length - 8} more` : list;
};

/** Refuses (unless forced) when a value would overflow; returns the lines for the report. */
export function enforceFp16(check: Fp16Check, force: boolean, file: string): string[] {
  if (check.overflow && !force) {
    throw new RepFuseError(
      `FP16 would overflow ${check.overflow} value(s) (|w| > 65504 becomes ±inf) in ${names(check.tensors, (t) => t.overflow)}; nothing was written (--force-fp16 writes them anyway, as ±inf).`,
      file,
    );
  }
  const notes = [`--fp16: ${check.checked} float tensors stored as float16`];
  if (check.overflow) notes.push(`FP16 OVERFLOW (--force-fp16): ${check.overflow} value(s) written as ±inf in ${names(check.tensors, (t) => t.overflow)}`);
  if (check.subnormal) notes.push(`FP16: ${check.subnormal} value(s) are subnormal in float16 (0 < |w| < 2^-14: reduced precision, flushed to zero on some hardware) in ${names(check.tensors, (t) => t.subnormal)}`);
  return notes;
}

/**
 * Runs a float32 byte stream, calling `each` with whole float32 values only: a value split across
 * two chunks is carried over to the next one.
 */
function float32Chunks(write: NewTensor['write'], each: (values: Uint8Array) => void): void {
  let rest = new Uint8Array(0);
  write((chunk) => {
    let b = chunk;
    if (rest.length) {
      b = new Uint8Array(rest.length + chunk.length);
      b.set(rest);
      b.set(chunk, rest.length);
    }
    const whole = b.length - (b.length % 4);
    rest = b.slice(whole);
    if (whole) each(b.subarray(0, whole));
  });
  if (rest.length) throw new Error('internal error: a float32 tensor produced a partial value.');
}

/** Re-encodes a float32 byte stream as float16, across chunk boundaries. */
function toHalfStream(write: NewTensor['write']): NewTensor['write'] {
  return (sink) => float32Chunks(write, (b) => sink(encodeFloats(decodeNumbers(b, DType.float32), DType.float16)));
}

/** Hazards of a float32 NewTensor, by producing its bytes once. */
function scanNew(t: NewTensor): Fp16TensorHazard {
  let overflow = 0;
  let subnormal = 0;
  float32Chunks(t.write, (b) => {
    const h = fp16Hazards(decodeNumbers(b, DType.float32));
    overflow += h.overflow;
    subnormal += h.subnormal;
  });
  return { name: t.name, overflow, subnormal };
}

/**
 * Changes `plan` so every float32 initializer of the output (kept or new) is stored as float16
 * under `<name>.fp16` with a Cast node to float32 producing `<name>` before the first node: the
 * graph, its inputs and outputs keep their types; only the stored weights are half precision.
 * Returns the FP16 check of every converted tensor (computed before anything is written).
 */
export function planFp16(model: OnnxModel, plan: Plan): Fp16Check {
  const taken = new Set<string>([...model.graph.initializers.keys(), ...model.graph.inputs.map((i) => i.name), ...model.graph.nodes.flatMap((n) => [...n.outputs, n.name])]);
  for (const l of [...plan.insertInitializers.values(), plan.appendInitializers]) for (const t of l) taken.add(t.name);
  const unique = (base: string): string => {
    let name = base;
    for (let i = 1; taken.has(name); i++) name = `${base}_${i}`;
    taken.add(name);
    return name;
  };
  const hazards: Fp16TensorHazard[] = [];
  const casts: Uint8Array[] = [];
  const cast = (from: string, to: string) =>
    casts.push(onnx.NodeProto.encode({ name: unique(`${to}/fp16/Cast`), opType: 'Cast', input: [from], output: [to], attribute: [{ name: 'to', type: onnx.AttributeProto.AttributeType.INT, i: DType.float32 }] }).finish());
  const half = (t: NewTensor): NewTensor => {
    const name = unique(`${t.name}.fp16`);
    cast(name, t.name);
    return { name, dtype: DType.float16, dims: t.dims, write: toHalfStream(t.write) };
  };
  const convertList = (list: NewTensor[]) => {
    for (let i = 0; i < list.length; i++) {
      if (list[i].dtype !== DType.float32) continue;
      hazards.push(scanNew(list[i]));
      list[i] = half(list[i]);
    }
  };
  for (const list of plan.insertInitializers.values()) convertList(list);
  convertList(plan.appendInitializers);
  let checked = hazards.length;
  for (const t of model.graph.initializers.values()) {
    if (t.dtype !== DType.float32 || plan.removeInitializers.has(t.name)) continue;
    const values = readTensorValues(model, t);
    const h = fp16Hazards(values);
    hazards.push({ name: t.name, ...h });
    checked++;
    plan.removeInitializers.add(t.name);
    // The old graph-input / value_info entries of this name would clash with the Cast's output.
    plan.removedTensors.add(t.name);
    const newT: NewTensor = { name: t.name, dtype: DType.float32, dims: t.dims, write: (sink) => sink(encodeFloats(readTensorValues(model, t), DType.float32)) };
    const l = plan.insertInitializers.get(t.name) ?? [];
    l.push(half(newT));
    plan.insertInitializers.set(t.name, l);
  }
  if (casts.length) {
    const first = model.graph.nodes.length ? 0 : -1;
    plan.insertNodes.set(first, [...casts, ...(plan.insertNodes.get(first) ?? [])]);
  }
  return summarizeFp16(hazards, checked);
}

/** FP16 check of every float tensor of a checkpoint's fused state_dict (fused blocks and folds included). */
export function checkpointFp16(w: WeightSet, folds: PlannedFold[] = []): Fp16Check {
  const hazards: Fp16TensorHazard[] = [];
  for (const [key, t] of fusedStateDict(w, undefined, folds)) {
    if (t.dtype !== DType.float32 && t.dtype !== DType.float64 && t.dtype !== DType.bfloat16 && t.dtype !== DType.float16) continue;
    hazards.push({ name: key, ...fp16Hazards(readTensor(t)) });
  }
  return summarizeFp16(hazards, hazards.length);
}
