// Streams a fused weight to a writer in slices of output channels, so memory stays bounded by the
// slice size whatever the layer size. Each output channel is summed in float64 in a small scratch
// row (cache-resident), checked and rounded once into the slice: one pass over the big arrays.
import { DType, dtypeSize, floatToBfloat16, floatToHalf } from './dtype';
import { FusionError } from './errors';
import { type PreparedFusion, rowsOf } from './fusion';

/** Elements per slice (4 MiB of float32). */
const SLICE = 1 << 20;

export function streamFusedWeight(prep: PreparedFusion, dtype: number, sink: (chunk: Uint8Array) => void): void {
  const per = prep.perChannel;
  const cout = prep.spec.outChannels;
  const size = dtypeSize(dtype);
  if (dtype !== DType.float32 && dtype !== DType.float64 && dtype !== DType.float16 && dtype !== DType.bfloat16) {
    throw new FusionError(`${prep.spec.name}: cannot write fused weights as this element type; only float types are supported.`);
  }
  const step = Math.max(1, Math.floor(SLICE / per));
  const buf = new ArrayBuffer(Math.min(cout, step) * per * size!);
  const f32 = dtype === DType.float32 ? new Float32Array(buf) : undefined;
  const f64 = dtype === DType.float64 ? new Float64Array(buf) : undefined;
  const u16 = dtype === DType.float16 || dtype === DType.bfloat16 ? new Uint16Array(buf) : undefined;
  const half = dtype === DType.float16 ? floatToHalf : floatToBfloat16;
  const row = new Float64Array(per);
  const { spec, spatial } = prep;
  const cpg = spec.inPerGroup;
  for (let o0 = 0; o0 < cout; o0 += step) {
    const o1 = Math.min(cout, o0 + step);
    const weights = prep.terms.map((t) => (t.term.kind === 'conv' ? rowsOf(t.term.weight, o0, o1, cpg * t.ks) : undefined));
    for (let o = o0; o < o1; o++) {
      let started = false;
      for (let ti = 0; ti < prep.terms.length; ti++) {
        const t = prep.terms[ti];
        const f = t.mult ? t.mult[o] : 1;
        if (t.term.kind === 'identity') {
          if (!started) row.fill(0);
          row[(o % cpg) * spatial + t.posMap[0]] += f;
        } else if (t.ks === spatial) {
          const w = weights[ti]!;
          const s = (o - o0) * per;
          if (w instanceof Float32Array) fullRow32(row, w, s, per, f, started);
          else fullRow(row, w, s, per, f, started);
        } else {
          if (!started) row.fill(0);
          smallKernelRow(row, weights[ti]!, (o - o0) * cpg * t.ks, cpg, t.ks, spatial, t.posMap, f);
        }
        started = true;
      }
      if (!started) row.fill(0);
      const ps = prep.postScale ? prep.postScale[o] : 1;
      // x·0 is 0 for finite x and NaN for NaN/±Inf: the same pass finds any non-finite value, as
      // written (a finite double can still overflow float32/float16 to Inf).
      let acc = 0;
      const at = (o - o0) * per;
      if (f32) {
        for (let i = 0; i < per; i++) {
          f32[at + i] = row[i] * ps;
          acc += f32[at + i] * 0;
        }
      } else if (f64) {
        for (let i = 0; i < per; i++) acc += (f64[at + i] = row[i] * ps) * 0;
      } else {
        const expMask = dtype === DType.float16 ? 0x7c00 : 0x7f80;
        for (let i = 0; i < per; i++) {
          const h = half(row[i] * ps);
          u16![at + i] = h;
          if ((h & expMask) === expMask) acc = NaN;
        }
      }
      if (acc !== 0) {
        throw new FusionError(`${spec.name}: the fused weight is not finite at output channel ${o} (NaN or Inf in the branch weights or BN parameters); refusing to write it.`);
      }
    }
    sink(new Uint8Array(buf, 0, (o1 - o0) * per * size!));
  }
}

// The row kernels are separate small functions so each stays monomorphic for the JIT.

function fullRow32(row: Float64Array, w: Float32Array, s: number, n: number, f: number, add: boolean): void {
  if (add) for (let i = 0; i < n; i++) row[i] += w[s + i] * f;
  else for (let i = 0; i < n; i++) row[i] = w[s + i] * f;
}

function fullRow(row: Float64Array, w: ArrayLike<number>, s: number, n: number, f: number, add: boolean): void {
  if (add) for (let i = 0; i < n; i++) row[i] += w[s + i] * f;
  else for (let i = 0; i < n; i++) row[i] = w[s + i] * f;
}

function smallKernelRow(row: Float64Array, w: ArrayLike<number>, s: number, cpg: number, ks: number, spatial: number, posMap: Int32Array, f: number): void {
  if (ks === 1) {
    const c0 = posMap[0];
    for (let c = 0; c < cpg; c++) row[c * spatial + c0] += w[s + c] * f;
    return;
  }
  for (let c = 0; c < cpg; c++) {
    const sc = s + c * ks;
    const dc = c * spatial;
    for (let q = 0; q < ks; q++) row[dc + posMap[q]] += w[sc + q] * f;
  }
}

/** Checks the fused bias, which is computed whole. */
export function checkFinite(values: Float64Array, what: string): void {
  const bad = values.findIndex((v) => !Number.isFinite(v));
  if (bad >= 0) throw new FusionError(`${what} is not finite at channel ${bad} (NaN or Inf in the inputs); refusing to write it.`);
}
