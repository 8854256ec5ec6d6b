// Streams a fused weight to a writer in slices of output channels, so memory stays bounded by the
// slice size whatever the layer size, and buffers are reused instead of freshly allocated.
import { dtypeSize, encodeFloatsInto } from './dtype';
import { FusionError } from './errors';
import { fuseRange, type PreparedFusion } from './fusion';

/** Elements per slice (8 MiB of float64). */
const SLICE = 1 << 20;

export function streamFusedWeight(prep: PreparedFusion, dtype: number, sink: (chunk: Uint8Array) => void): void {
  const per = prep.perChannel;
  const cout = prep.spec.outChannels;
  const step = Math.max(1, Math.floor(SLICE / per));
  const f64 = new Float64Array(Math.min(cout, step) * per);
  const enc = new Uint8Array(f64.length * dtypeSize(dtype)!);
  for (let o0 = 0; o0 < cout; o0 += step) {
    const o1 = Math.min(cout, o0 + step);
    const view = f64.subarray(0, (o1 - o0) * per);
    fuseRange(prep, o0, o1, view);
    // x·0 is 0 for finite x and NaN for NaN/±Inf: one pass finds any non-finite value.
    let acc = 0;
    for (let i = 0; i < view.length; i++) acc += view[i] * 0;
    if (acc !== 0) {
      const bad = view.findIndex((v) => !Number.isFinite(v));
      throw new FusionError(`${prep.spec.name}: the fused weight is not finite at output channel ${o0 + Math.floor(bad / per)} (NaN or Inf in the branch weights or BN parameters); refusing to write it.`);
    }
    sink(encodeFloatsInto(view, dtype, enc));
  }
}

/** Checks the fused bias, which is computed whole. */
export function checkFinite(values: Float64Array, what: string): void {
  const bad = values.findIndex((v) => !Number.isFinite(v));
  if (bad >= 0) throw new FusionError(`${what} is not finite at channel ${bad} (NaN or Inf in the inputs); refusing to write it.`);
}
