// onnxruntime-node, loaded in the test process to run models directly (the engine itself only
// loads it in its validation child).
import { halfToFloat } from '../../src/core/dtype';

type Ort = typeof import('onnxruntime-node');
// eslint-disable-next-line @typescript-eslint/no-require-imports
export const ort: Ort = require('onnxruntime-node');

export interface Result {
  dims: number[];
  data: Float64Array;
}

/** Runs a model (file or bytes) on CPU with graph optimizations off; returns every output as float64. */
export async function runOrt(model: string | Uint8Array, feeds: Record<string, import('onnxruntime-node').Tensor>): Promise<Record<string, Result>> {
  const opts: import('onnxruntime-node').InferenceSession.SessionOptions = { graphOptimizationLevel: 'disabled', executionProviders: ['cpu'], logSeverityLevel: 3 };
  const session = typeof model === 'string' ? await ort.InferenceSession.create(model, opts) : await ort.InferenceSession.create(model, opts);
  try {
    const res = await session.run(feeds);
    const out: Record<string, Result> = {};
    for (const [name, t] of Object.entries(res)) {
      const d = t.data as ArrayLike<number>;
      const f = new Float64Array(d.length);
      if (t.type === 'float16' && d instanceof Uint16Array) for (let i = 0; i < d.length; i++) f[i] = halfToFloat(d[i]);
      else for (let i = 0; i < d.length; i++) f[i] = Number(d[i]);
      out[name] = { dims: [...t.dims], data: f };
    }
    return out;
  } finally {
    await session.release();
  }
}

export function maxAbsDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  if (a.length !== b.length) throw new Error(`length ${a.length} vs ${b.length}`);
  let m = 0;
  for (let i = 0; i < a.length; i++) {
    const d = Math.abs(a[i] - b[i]);
    if (!(d <= m)) m = d; // NaN propagates
  }
  return m;
}
