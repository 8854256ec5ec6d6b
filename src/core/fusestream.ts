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
  // The usual block: one full-size kernel (BN folded by the exporter, or its own BN scale) plus
  // smaller kernels and the identity. Only the positions those touch need a float64 sum; every
  // other value is the big kernel's value (times its BN scale) rounded once — for an unscaled
  // float32 kernel that is a plain copy.
  const first = prep.terms[0];
  const patchable = !prep.postScale && first?.term.kind === 'conv' && first.ks === spatial && prep.terms.slice(1).every((t) => t.ks < spatial);
  const patch = patchable ? [...new Set(prep.terms.slice(1).flatMap((t) => [...t.posMap]))].sort((a, b) => a - b) : [];
  for (let o0 = 0; o0 < cout; o0 += step) {
    const o1 = Math.min(cout, o0 + step);
    const weights = prep.terms.map((t) => (t.term.kind === 'conv' ? rowsOf(t.term.weight, o0, o1, cpg * t.ks) : undefined));
    if (f32 && patchable) {
      copyAndPatch(prep, o0, o1, weights, f32, patch);
      sink(new Uint8Array(buf, 0, (o1 - o0) * per * size!));
      continue;
    }
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

/**
 * Channels [o0, o1) when only `patch` positions get more than the first term: copy the first
 * term's float32 values natively, then write each patched position as one float64 sum.
 */
function copyAndPatch(prep: PreparedFusion, o0: number, o1: number, weights: (ArrayLike<number> | undefined)[], out: Float32Array, patch: number[]): void {
  const { spatial, perChannel: per } = prep;
  const cpg = prep.spec.inPerGroup;
  const n = (o1 - o0) * per;
  const w0 = weights[0]!;
  const m0 = prep.terms[0].mult;
  if (!m0 && w0 instanceof Float32Array) out.set(w0.subarray(0, n));
  else if (!m0) for (let i = 0; i < n; i++) out[i] = w0[i];
  else for (let o = o0; o < o1; o++) scaleInto(out, w0, (o - o0) * per, per, m0[o]);
  const P = patch.length;
  const slot = new Int32Array(spatial).fill(-1);
  patch.forEach((p, k) => (slot[p] = k));
  const acc = new Float64Array(cpg * P);
  for (let o = o0; o < o1; o++) {
    const base = (o - o0) * per;
    const f0 = m0 ? m0[o] : 1;
    for (let c = 0; c < cpg; c++) for (let k = 0; k < P; k++) acc[c * P + k] = w0[base + c * spatial + patch[k]] * f0;
    for (let ti = 1; ti < prep.terms.length; ti++) {
      const t = prep.terms[ti];
      const f = t.mult ? t.mult[o] : 1;
      if (t.term.kind === 'identity') {
        acc[(o % cpg) * P + slot[t.posMap[0]]] += f;
        continue;
      }
      const w = weights[ti]!;
      const s = (o - o0) * cpg * t.ks;
      for (let c = 0; c < cpg; c++) for (let q = 0; q < t.ks; q++) acc[c * P + slot[t.posMap[q]]] += w[s + c * t.ks + q] * f;
    }
    for (let c = 0; c < cpg; c++) for (let k = 0; k < P; k++) out[base + c * spatial + patch[k]] = acc[c * P + k];
  }
  // x·0 is 0 for finite x, NaN for NaN/±Inf: one pass over the slice as written.
  let bad = 0;
  for (let i = 0; i < n; i++) bad += out[i] * 0;
  if (bad !== 0) {
    const i = out.subarray(0, n).findIndex((v) => !Number.isFinite(v));
    throw new FusionError(`${prep.spec.name}: the fused weight is not finite at output channel ${o0 + Math.floor(i / per)} (NaN or Inf in the branch weights or BN parameters); refusing to write it.`);
  }
}

// The row kernels are separate small functions so each stays monomorphic for the JIT.

function scaleInto(out: Float32Array, w: ArrayLike<number>, s: number, n: number, f: number): void {
  for (let i = 0; i < n; i++) out[s + i] = w[s + i] * f;
}

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
