// Concrete input shapes for validation: fixed dims as declared, dynamic ones from the user or a
// sensible default (batch = 1), else a clear error naming the dimension.
import { DType, dtypeName } from '../dtype';
import { RepFuseError } from '../errors';
import type { OnnxModel } from './reader';

export interface InputSpec {
  name: string;
  dtype: number;
  shape: number[];
  /** .npy file holding the data; random seeded data otherwise. */
  npy?: string;
}

/** Parses `1x3x640x640` (or `1,3,640,640`). */
export function parseShape(text: string): number[] {
  const parts = text.split(/[x×,]/).map((s) => s.trim());
  const dims = parts.map(Number);
  if (!parts.length || parts.some((p) => !/^\d+$/.test(p)) || dims.some((d) => d < 1)) {
    throw new RepFuseError(`invalid shape '${text}'; expected positive sizes like 1x3x640x640.`);
  }
  return dims;
}

export function modelInputs(model: OnnxModel) {
  const inits = model.graph.initializers;
  return model.graph.inputs.filter((i) => !inits.has(i.name));
}

export function resolveInputs(model: OnnxModel, shapes: Record<string, number[]>, npyShapes: Record<string, { file: string; shape: number[]; dtype: number }> = {}): InputSpec[] {
  const inputs = modelInputs(model);
  const names = inputs.map((i) => i.name);
  for (const n of [...Object.keys(shapes), ...Object.keys(npyShapes)]) {
    if (!names.includes(n)) throw new RepFuseError(`the model has no input named '${n}' (its inputs: ${names.map((x) => `'${x}'`).join(', ') || 'none'}).`, model.path);
  }
  return inputs.map((vi) => {
    const dtype = vi.elemType ?? DType.float32;
    const declared = vi.shape;
    const npy = npyShapes[vi.name];
    if (npy) {
      if (npy.dtype !== dtype) throw new RepFuseError(`input '${vi.name}' is ${dtypeName(dtype)} but ${npy.file} holds ${dtypeName(npy.dtype)}.`, model.path);
      checkAgainst(model.path, vi.name, declared, npy.shape, npy.file);
      return { name: vi.name, dtype, shape: npy.shape, npy: npy.file };
    }
    const given = shapes[vi.name];
    if (given) {
      checkAgainst(model.path, vi.name, declared, given, '--input');
      return { name: vi.name, dtype, shape: given };
    }
    if (!declared) throw new RepFuseError(`input '${vi.name}' has no declared shape; give one with --input ${vi.name}=1x3x224x224.`, model.path);
    const shape = declared.map((d, i) => {
      if (typeof d === 'number' && d > 0) return d;
      if (i === 0) return 1; // batch
      const what = typeof d === 'string' ? `'${d}'` : 'unknown';
      throw new RepFuseError(
        `input '${vi.name}' dimension ${i} (${what}) is dynamic and cannot be guessed; give the shape with --input ${vi.name}=${declared.map((x, j) => (typeof x === 'number' && x > 0 ? x : j === 0 ? 1 : 'N')).join('x')}.`,
        model.path,
      );
    });
    return { name: vi.name, dtype, shape };
  });
}

function checkAgainst(file: string, name: string, declared: (number | string | undefined)[] | undefined, given: number[], from: string): void {
  if (!declared) return;
  if (declared.length !== given.length) throw new RepFuseError(`input '${name}' has rank ${declared.length} but ${from} gives ${given.join('x')}.`, file);
  declared.forEach((d, i) => {
    if (typeof d === 'number' && d > 0 && d !== given[i]) {
      throw new RepFuseError(`input '${name}' dimension ${i} is fixed at ${d} but ${from} gives ${given[i]}.`, file);
    }
  });
}
