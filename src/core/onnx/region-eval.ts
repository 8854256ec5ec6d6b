// A small float64 interpreter for the ONNX operators a linear region is made of (Conv,
// BatchNormalization, elementwise arithmetic, AveragePool, Pad, Slice, Concat, ScatterND, Expand)
// and for the shape arithmetic exporters wrap around them (Shape, Gather, Range, Reshape, Where, …).
// Region fusion runs a region on small probe tensors to read off its equivalent convolution; the
// same interpreter folds constant subgraphs (weights computed at run time from constants).
import { attrFloat, attrInt, attrInts, attrString, type OnnxNode } from './reader';

/** A dense tensor: float64 values in row-major order; `int` marks integer element types. */
export interface Tensor {
  dims: number[];
  data: Float64Array;
  int?: boolean;
}

/** An operator the interpreter cannot run, or inputs it cannot run on; names the node. */
export class EvalError extends Error {
  constructor(
    readonly node: OnnxNode,
    message: string,
  ) {
    super(`${node.opType} '${node.name || node.outputs[0]}' ${message}`);
  }
}

const numel = (d: number[]) => d.reduce((a, b) => a * b, 1);

/** An allocation over the evaluation limit; runNode / conv turn it into an EvalError naming the node. */
class TooBig extends Error {}

/**
 * Most values one evaluated tensor may hold. region.ts scales it to the model's file size, so a
 * hostile shape (a dim of 2^32) is refused before it is allocated instead of exhausting memory.
 */
let maxElements = 1 << 24;
export function setEvalLimit(n: number): void {
  maxElements = n;
}
export const evalLimit = (): number => maxElements;

function checkSize(n: number): number {
  if (!(n >= 0 && n <= maxElements)) throw new TooBig(`would make a tensor of ${n} values, more than the ${maxElements} RepFuse evaluates.`);
  return n;
}

function alloc(n: number): Float64Array {
  return new Float64Array(checkSize(n));
}
const strides = (d: number[]) => {
  const s = new Array<number>(d.length).fill(1);
  for (let i = d.length - 2; i >= 0; i--) s[i] = s[i + 1] * d[i + 1];
  return s;
};

export const scalar = (v: number, int = false): Tensor => ({ dims: [], data: Float64Array.of(v), int });
export const tensor = (dims: number[], data: ArrayLike<number>, int = false): Tensor => ({ dims, data: Float64Array.from(data), int });

/** Element types the interpreter treats as integers. */
const INT_TYPES = new Set([2, 3, 4, 5, 6, 7, 9, 12, 13]);
export const isIntType = (t: number) => INT_TYPES.has(t);

function broadcastDims(a: number[], b: number[], node: OnnxNode): number[] {
  const r = Math.max(a.length, b.length);
  const out: number[] = [];
  for (let i = 0; i < r; i++) {
    const x = a[a.length - r + i] ?? 1;
    const y = b[b.length - r + i] ?? 1;
    if (x !== y && x !== 1 && y !== 1) throw new EvalError(node, `cannot broadcast shapes [${a.join(', ')}] and [${b.join(', ')}].`);
    out.push(x === 1 ? y : x);
  }
  return out;
}

/** Index map from an output of shape `out` into a tensor of shape `d` broadcast to it. */
function broadcastIndex(d: number[], out: number[]): Int32Array {
  const n = checkSize(numel(out));
  const idx = new Int32Array(n);
  const r = out.length;
  const ds = strides(d);
  const os = strides(out);
  const off = r - d.length;
  for (let i = 0; i < n; i++) {
    let j = 0;
    let rem = i;
    for (let a = 0; a < r; a++) {
      const q = Math.floor(rem / os[a]);
      rem -= q * os[a];
      const k = a - off;
      if (k >= 0 && d[k] !== 1) j += q * ds[k];
    }
    idx[i] = j;
  }
  return idx;
}

function elementwise(ts: Tensor[], node: OnnxNode, f: (x: number, y: number) => number, int?: boolean): Tensor {
  let dims = ts[0].dims;
  for (const t of ts.slice(1)) dims = broadcastDims(dims, t.dims, node);
  const n = numel(dims);
  const same = ts.every((t) => numel(t.dims) === n && t.dims.length === dims.length);
  const maps = same ? undefined : ts.map((t) => broadcastIndex(t.dims, dims));
  const out = alloc(n);
  const first = ts[0].data;
  for (let i = 0; i < n; i++) out[i] = first[maps ? maps[0][i] : i];
  for (let k = 1; k < ts.length; k++) {
    const d = ts[k].data;
    const m = maps?.[k];
    for (let i = 0; i < n; i++) out[i] = f(out[i], d[m ? m[i] : i]);
  }
  return { dims, data: out, int: int ?? ts.every((t) => t.int) };
}

const normAxis = (a: number, r: number) => (a < 0 ? a + r : a);

/** Spatial geometry of a sliding window over [N, C, ...spatial]. */
interface Window {
  kernel: number[];
  stride: number[];
  dil: number[];
  padBegin: number[];
  padEnd: number[];
  out: number[];
}

function windowOf(node: OnnxNode, spatial: number[], kernel: number[], ceil = false): Window {
  const r = spatial.length;
  const stride = attrInts(node, 'strides') ?? new Array(r).fill(1);
  const dil = attrInts(node, 'dilations') ?? new Array(r).fill(1);
  const autoPad = attrString(node, 'auto_pad') ?? 'NOTSET';
  let pads = attrInts(node, 'pads') ?? new Array(2 * r).fill(0);
  if (autoPad === 'SAME_UPPER' || autoPad === 'SAME_LOWER') {
    pads = new Array(2 * r).fill(0);
    for (let i = 0; i < r; i++) {
      const o = Math.ceil(spatial[i] / stride[i]);
      const total = Math.max(0, (o - 1) * stride[i] + (kernel[i] - 1) * dil[i] + 1 - spatial[i]);
      const small = Math.floor(total / 2);
      pads[i] = autoPad === 'SAME_UPPER' ? small : total - small;
      pads[i + r] = total - pads[i];
    }
  } else if (autoPad === 'VALID') pads = new Array(2 * r).fill(0);
  else if (autoPad !== 'NOTSET') throw new EvalError(node, `has unknown auto_pad '${autoPad}'.`);
  if (pads.length !== 2 * r || stride.length !== r || dil.length !== r) throw new EvalError(node, 'has attributes that do not match its spatial rank.');
  const out = spatial.map((s, i) => {
    const span = s + pads[i] + pads[i + r] - (kernel[i] - 1) * dil[i] - 1;
    return (ceil ? Math.ceil(span / stride[i]) : Math.floor(span / stride[i])) + 1;
  });
  if (out.some((o) => o <= 0)) throw new EvalError(node, `would produce an empty output from spatial size ${spatial.join('×')}.`);
  return { kernel, stride, dil, padBegin: pads.slice(0, r), padEnd: pads.slice(r), out };
}

/** Spatial dims as exactly 3 (leading 1s), so one loop nest serves 1-D, 2-D and 3-D. */
const as3 = (d: number[]) => [...new Array(3 - d.length).fill(1), ...d];
const pad3 = (d: number[], fill: number) => [...new Array(3 - d.length).fill(fill), ...d];

/** When set, Conv and AveragePool compute only their output shape (zeros): for probing sizes. */
let dry = false;
export function dryRun<T>(f: () => T): T {
  const was = dry;
  dry = true;
  try {
    return f();
  } finally {
    dry = was;
  }
}

export function conv(node: OnnxNode, x: Tensor, w: Tensor, b: Tensor | undefined): Tensor {
  try {
    return convUnchecked(node, x, w, b);
  } catch (e) {
    if (e instanceof TooBig) throw new EvalError(node, e.message);
    throw e;
  }
}

function convUnchecked(node: OnnxNode, x: Tensor, w: Tensor, b: Tensor | undefined): Tensor {
  const [n, c, ...sp] = x.dims;
  const [m, cpg, ...k] = w.dims;
  if (sp.length < 1 || sp.length > 3 || k.length !== sp.length) throw new EvalError(node, `cannot take input [${x.dims.join(', ')}] with weight [${w.dims.join(', ')}].`);
  const g = attrInt(node, 'group', 1);
  if (c !== cpg * g || m % g !== 0) throw new EvalError(node, `has ${c} input channels but a weight for ${cpg}×${g} groups.`);
  const win = windowOf(node, sp, k);
  const [D, H, W] = as3(sp);
  const [kd, kh, kw] = as3(k);
  const [od, oh, ow] = as3(win.out);
  const [sd, sh, sw] = pad3(win.stride, 1);
  const [dd, dh, dw] = pad3(win.dil, 1);
  const [pd, ph, pw] = pad3(win.padBegin, 0);
  const out = alloc(n * m * od * oh * ow);
  if (dry) return { dims: [n, m, ...win.out], data: out };
  const mpg = m / g;
  const X = x.data;
  const Wt = w.data;
  const oPlane = od * oh * ow;
  const iPlane = D * H * W;
  // Bounding box of the non-zero values of each input plane: impulse probes are mostly zeros, so
  // the loops visit only the outputs a non-zero input can reach.
  const box = new Int32Array(checkSize(n * c * 6));
  for (let p = 0; p < n * c; p++) {
    let z0 = D, z1 = -1, y0 = H, y1 = -1, x0 = W, x1 = -1;
    const base = p * iPlane;
    for (let z = 0; z < D; z++) for (let y = 0; y < H; y++) {
      const row = base + (z * H + y) * W;
      for (let xx = 0; xx < W; xx++) {
        if (X[row + xx] === 0) continue;
        if (z < z0) z0 = z;
        if (z > z1) z1 = z;
        if (y < y0) y0 = y;
        if (y > y1) y1 = y;
        if (xx < x0) x0 = xx;
        if (xx > x1) x1 = xx;
      }
    }
    box.set([z0, z1, y0, y1, x0, x1], p * 6);
  }
  // Output range [lo, hi] whose input index o·s − p + t·d falls in [i0, i1].
  const range = (i0: number, i1: number, s: number, pb: number, t: number, len: number): [number, number] => [
    Math.max(0, Math.ceil((i0 + pb - t) / s)),
    Math.min(len - 1, Math.floor((i1 + pb - t) / s)),
  ];
  for (let bi = 0; bi < n; bi++) {
    for (let o = 0; o < m; o++) {
      const gi = Math.floor(o / mpg);
      const ob = (bi * m + o) * oPlane;
      if (b) out.fill(b.data[o], ob, ob + oPlane);
      for (let ci = 0; ci < cpg; ci++) {
        const pl = bi * c + gi * cpg + ci;
        const bx = box.subarray(pl * 6, pl * 6 + 6);
        if (bx[1] < 0) continue; // an all-zero plane contributes nothing
        const ib = pl * iPlane;
        for (let a = 0; a < kd; a++) {
          const [z0, z1] = range(bx[0], bx[1], sd, pd, a * dd, od);
          for (let p = 0; p < kh; p++) {
            const [y0, y1] = range(bx[2], bx[3], sh, ph, p * dh, oh);
            for (let q = 0; q < kw; q++) {
              const wv = Wt[(((o * cpg + ci) * kd + a) * kh + p) * kw + q];
              if (wv === 0) continue;
              const [x0, x1] = range(bx[4], bx[5], sw, pw, q * dw, ow);
              for (let z = z0; z <= z1; z++) {
                const iz = z * sd - pd + a * dd;
                for (let y = y0; y <= y1; y++) {
                  const iy = y * sh - ph + p * dh;
                  const orow = ob + (z * oh + y) * ow;
                  const irow = ib + (iz * H + iy) * W;
                  for (let xx = x0; xx <= x1; xx++) out[orow + xx] += wv * X[irow + xx * sw - pw + q * dw];
                }
              }
            }
          }
        }
      }
    }
  }
  return { dims: [n, m, ...win.out], data: out };
}

function avgPool(node: OnnxNode, x: Tensor): Tensor {
  const [n, c, ...sp] = x.dims;
  const kernel = attrInts(node, 'kernel_shape');
  if (!kernel || kernel.length !== sp.length || sp.length > 3) throw new EvalError(node, 'has no kernel_shape matching its input.');
  const win = windowOf(node, sp, kernel, attrInt(node, 'ceil_mode', 0) === 1);
  const includePad = attrInt(node, 'count_include_pad', 0) === 1;
  const [D, H, W] = as3(sp);
  const [kd, kh, kw] = as3(kernel);
  const [od, oh, ow] = as3(win.out);
  const [sd, sh, sw] = pad3(win.stride, 1);
  const [dd, dh, dw] = pad3(win.dil, 1);
  const [pd, ph, pw] = pad3(win.padBegin, 0);
  const [ed, eh, ew] = pad3(win.padEnd, 0);
  const out = alloc(n * c * od * oh * ow);
  if (dry) return { dims: [n, c, ...win.out], data: out };
  let i = 0;
  for (let pl = 0; pl < n * c; pl++) {
    const base = pl * D * H * W;
    for (let z = 0; z < od; z++) {
      for (let y = 0; y < oh; y++) {
        for (let xx = 0; xx < ow; xx++) {
          let s = 0;
          let cnt = 0;
          for (let a = 0; a < kd; a++) {
            const iz = z * sd - pd + a * dd;
            for (let p = 0; p < kh; p++) {
              const iy = y * sh - ph + p * dh;
              for (let q = 0; q < kw; q++) {
                const ix = xx * sw - pw + q * dw;
                const inside = iz >= 0 && iz < D && iy >= 0 && iy < H && ix >= 0 && ix < W;
                // count_include_pad counts padding cells, never cells past the padding (ceil_mode).
                const inPad = iz >= -pd && iz < D + ed && iy >= -ph && iy < H + eh && ix >= -pw && ix < W + ew;
                if (inside) s += x.data[base + (iz * H + iy) * W + ix];
                if (inside || (includePad && inPad)) cnt++;
              }
            }
          }
          out[i++] = cnt ? s / cnt : 0;
        }
      }
    }
  }
  return { dims: [n, c, ...win.out], data: out };
}

function batchNorm(node: OnnxNode, x: Tensor, s: Tensor, b: Tensor, mean: Tensor, v: Tensor): Tensor {
  const c = x.dims[1];
  if ([s, b, mean, v].some((t) => t.data.length !== c)) throw new EvalError(node, `has parameters that do not match ${c} channels.`);
  const eps = attrFloat(node, 'epsilon', 1e-5);
  const plane = numel(x.dims.slice(2));
  const out = new Float64Array(x.data.length);
  for (let i = 0; i < x.data.length; i++) {
    const ch = Math.floor(i / plane) % c;
    out[i] = ((x.data[i] - mean.data[ch]) / Math.sqrt(v.data[ch] + eps)) * s.data[ch] + b.data[ch];
  }
  return { dims: x.dims, data: out };
}

/** Copies `x` into a tensor of shape `dims`, with x's element at multi-index i going to i + offset (out-of-range dropped). */
function place(x: Tensor, dims: number[], offset: number[], fill: number, into?: Float64Array): Float64Array {
  const out = into ?? alloc(numel(dims)).fill(fill);
  const xs = strides(x.dims);
  const os = strides(dims);
  const r = dims.length;
  for (let i = 0; i < x.data.length; i++) {
    let rem = i;
    let j = 0;
    let ok = true;
    for (let a = 0; a < r; a++) {
      const q = Math.floor(rem / xs[a]);
      rem -= q * xs[a];
      const t = q + offset[a];
      if (t < 0 || t >= dims[a]) {
        ok = false;
        break;
      }
      j += t * os[a];
    }
    if (ok) out[j] = x.data[i];
  }
  return out;
}

function pad(node: OnnxNode, ins: (Tensor | undefined)[], opset: number): Tensor {
  const x = ins[0]!;
  const mode = attrString(node, 'mode') ?? 'constant';
  if (mode !== 'constant') throw new EvalError(node, `uses mode '${mode}'; only constant padding is linear like a convolution's.`);
  const r = x.dims.length;
  let pads: number[];
  let value = 0;
  if (opset < 11) {
    pads = attrInts(node, 'pads') ?? [];
    value = attrFloat(node, 'value', 0);
  } else {
    pads = Array.from(ins[1]?.data ?? []);
    if (ins[2] && ins[2].data.length) value = ins[2].data[0];
    if (ins[3]) {
      const axes = Array.from(ins[3].data).map((a) => normAxis(a, r));
      const full = new Array(2 * r).fill(0);
      axes.forEach((a, i) => {
        full[a] = pads[i];
        full[a + r] = pads[i + axes.length];
      });
      pads = full;
    }
  }
  if (pads.length !== 2 * r) throw new EvalError(node, `has ${pads.length} pads for a rank-${r} input.`);
  const dims = x.dims.map((d, i) => d + pads[i] + pads[i + r]);
  if (dims.some((d) => d < 0)) throw new EvalError(node, 'crops more than its input has.');
  return { dims, data: place(x, dims, pads.slice(0, r), value), int: x.int };
}

function slice(node: OnnxNode, ins: (Tensor | undefined)[], opset: number): Tensor {
  const x = ins[0]!;
  const r = x.dims.length;
  let starts: number[], ends: number[], axes: number[] | undefined, steps: number[] | undefined;
  if (opset < 10) {
    starts = attrInts(node, 'starts') ?? [];
    ends = attrInts(node, 'ends') ?? [];
    axes = attrInts(node, 'axes');
  } else {
    starts = Array.from(ins[1]?.data ?? []);
    ends = Array.from(ins[2]?.data ?? []);
    axes = ins[3] ? Array.from(ins[3].data) : undefined;
    steps = ins[4] ? Array.from(ins[4].data) : undefined;
  }
  axes = (axes ?? starts.map((_, i) => i)).map((a) => normAxis(a, r));
  const st = x.dims.map(() => 0);
  const step = x.dims.map(() => 1);
  const len = [...x.dims];
  axes.forEach((a, i) => {
    const d = x.dims[a];
    const s = steps?.[i] ?? 1;
    if (s === 0) throw new EvalError(node, 'has a step of 0.');
    let b = starts[i];
    let e = ends[i];
    b = b < 0 ? b + d : b;
    e = e < 0 ? e + d : e;
    if (s > 0) {
      b = Math.min(Math.max(b, 0), d);
      e = Math.min(Math.max(e, 0), d);
      len[a] = Math.max(0, Math.ceil((e - b) / s));
    } else {
      b = Math.min(Math.max(b, -1), d - 1);
      e = Math.min(Math.max(e, -1), d - 1);
      len[a] = Math.max(0, Math.ceil((b - e) / -s));
    }
    st[a] = b;
    step[a] = s;
  });
  const xs = strides(x.dims);
  const os = strides(len);
  const n = numel(len);
  const out = alloc(n);
  for (let i = 0; i < n; i++) {
    let rem = i;
    let j = 0;
    for (let a = 0; a < r; a++) {
      const q = Math.floor(rem / os[a]);
      rem -= q * os[a];
      j += (st[a] + q * step[a]) * xs[a];
    }
    out[i] = x.data[j];
  }
  return { dims: len, data: out, int: x.int };
}

function concat(node: OnnxNode, ts: Tensor[]): Tensor {
  const r = ts[0].dims.length;
  const axis = normAxis(attrInt(node, 'axis', 0), r);
  const dims = [...ts[0].dims];
  dims[axis] = ts.reduce((s, t) => s + (t.dims[axis] ?? 0), 0);
  for (const t of ts) {
    if (t.dims.length !== r || t.dims.some((d, i) => i !== axis && d !== dims[i])) throw new EvalError(node, 'joins tensors whose shapes differ off its axis.');
  }
  const out = alloc(numel(dims));
  let at = 0;
  for (const t of ts) {
    const off = dims.map((_, i) => (i === axis ? at : 0));
    place(t, dims, off, 0, out);
    at += t.dims[axis];
  }
  return { dims, data: out, int: ts.every((t) => t.int) };
}

function scatterND(node: OnnxNode, data: Tensor, idx: Tensor, upd: Tensor): Tensor {
  if ((attrString(node, 'reduction') ?? 'none') !== 'none') throw new EvalError(node, 'uses a reduction; only plain ScatterND is supported.');
  const k = idx.dims[idx.dims.length - 1];
  const r = data.dims.length;
  if (k > r) throw new EvalError(node, 'has indices deeper than its data.');
  const out = Float64Array.from(data.data);
  const ds = strides(data.dims);
  const sliceLen = numel(data.dims.slice(k));
  const count = numel(idx.dims.slice(0, -1));
  if (upd.data.length !== count * sliceLen) throw new EvalError(node, 'has updates that do not match its indices.');
  for (let i = 0; i < count; i++) {
    let off = 0;
    for (let a = 0; a < k; a++) {
      let v = idx.data[i * k + a];
      if (v < 0) v += data.dims[a];
      if (v < 0 || v >= data.dims[a]) throw new EvalError(node, 'has an index out of range.');
      off += v * ds[a];
    }
    out.set(upd.data.subarray(i * sliceLen, (i + 1) * sliceLen), off);
  }
  return { dims: data.dims, data: out, int: data.int };
}

function expand(node: OnnxNode, x: Tensor, shape: number[]): Tensor {
  const dims = broadcastDims(x.dims, shape, node);
  const m = broadcastIndex(x.dims, dims);
  const out = new Float64Array(m.length);
  for (let i = 0; i < m.length; i++) out[i] = x.data[m[i]];
  return { dims, data: out, int: x.int };
}

function transpose(node: OnnxNode, x: Tensor): Tensor {
  const r = x.dims.length;
  const perm = attrInts(node, 'perm') ?? x.dims.map((_, i) => r - 1 - i);
  const dims = perm.map((p) => x.dims[p]);
  const xs = strides(x.dims);
  const os = strides(dims);
  const out = new Float64Array(x.data.length);
  for (let i = 0; i < out.length; i++) {
    let rem = i;
    let j = 0;
    for (let a = 0; a < r; a++) {
      const q = Math.floor(rem / os[a]);
      rem -= q * os[a];
      j += q * xs[perm[a]];
    }
    out[i] = x.data[j];
  }
  return { dims, data: out, int: x.int };
}

function gather(node: OnnxNode, x: Tensor, idx: Tensor): Tensor {
  const r = x.dims.length;
  const axis = normAxis(attrInt(node, 'axis', 0), r);
  const outer = numel(x.dims.slice(0, axis));
  const inner = numel(x.dims.slice(axis + 1));
  const d = x.dims[axis];
  const dims = [...x.dims.slice(0, axis), ...idx.dims, ...x.dims.slice(axis + 1)];
  const out = alloc(numel(dims));
  let o = 0;
  for (let a = 0; a < outer; a++) {
    for (let i = 0; i < idx.data.length; i++) {
      let v = idx.data[i];
      if (v < 0) v += d;
      if (v < 0 || v >= d) throw new EvalError(node, 'has an index out of range.');
      for (let j = 0; j < inner; j++) out[o++] = x.data[(a * d + v) * inner + j];
    }
  }
  return { dims, data: out, int: x.int };
}

function matmul(node: OnnxNode, a: Tensor, b: Tensor): Tensor {
  if (a.dims.length !== 2 || b.dims.length !== 2 || a.dims[1] !== b.dims[0]) throw new EvalError(node, 'supports only 2-D operands here.');
  const [m, k] = a.dims;
  const n = b.dims[1];
  const out = alloc(m * n);
  for (let i = 0; i < m; i++) for (let p = 0; p < k; p++) {
    const v = a.data[i * k + p];
    if (v) for (let j = 0; j < n; j++) out[i * n + j] += v * b.data[p * n + j];
  }
  return { dims: [m, n], data: out };
}

/** Most multiply-adds one Einsum may take (OREPA's largest kernel products take a few million). */
const MAX_EINSUM_STEPS = 1 << 28;

/**
 * Einsum with explicit or implicit output, letters only (OREPA's `oihw,o->oihw`,
 * `cgtihw,ocgt->cogihw`: its run-time kernels): every product summed in float64. A repeated letter
 * in one operand takes its diagonal; an ellipsis (broadcast dims) is refused by name.
 */
/** An Einsum equation checked against its operands' shapes: the terms, the output labels, each label's size. */
export interface EinsumPlan {
  terms: string[];
  out: string[];
  size: Map<string, number>;
}

/**
 * Parses an Einsum equation (explicit or implicit output, letters only) against the operands'
 * shapes; returns why it does not fit as a string. A dim of 1 broadcasts against a larger one
 * (torch and onnxruntime do so: OREPA_3x3_RepVGG's `oihw,hw->oihw` multiplies a [o, i, 1, 1]
 * weight by a [k, k] window). Shared by the evaluator and the MAC counter's shape inference.
 */
export function planEinsum(equation: string, shapes: number[][]): EinsumPlan | string {
  const eq = equation.replace(/\s+/g, '');
  if (eq.includes('.')) return `has an ellipsis in '${eq}'; only lettered equations are evaluated.`;
  const arrow = eq.indexOf('->');
  const lhs = arrow >= 0 ? eq.slice(0, arrow) : eq;
  const terms = lhs.split(',');
  if (terms.length !== shapes.length || !/^[A-Za-z,]*(->[A-Za-z]*)?$/.test(eq)) return `has an equation '${eq}' that does not fit its ${shapes.length} inputs.`;
  const size = new Map<string, number>();
  for (const [k, t] of terms.entries()) {
    if (t.length !== shapes[k].length) return `operand ${k} has rank ${shapes[k].length}, its term '${t}' ${t.length}.`;
    for (const [a, c] of [...t].entries()) {
      const d = shapes[k][a];
      const e = size.get(c);
      if (e !== undefined && e !== d && e !== 1 && d !== 1) return `label '${c}' has sizes ${e} and ${d}.`;
      size.set(c, e === undefined || e === 1 ? d : e);
    }
  }
  let out: string[];
  if (arrow >= 0) out = [...eq.slice(arrow + 2)];
  else {
    const count = new Map<string, number>();
    for (const c of lhs.replace(/,/g, '')) count.set(c, (count.get(c) ?? 0) + 1);
    out = [...count.keys()].filter((c) => count.get(c) === 1).sort();
  }
  if (new Set(out).size !== out.length || out.some((c) => !size.has(c))) return `has an output '${out.join('')}' that is not a set of input labels.`;
  return { terms, out, size };
}

function einsum(node: OnnxNode, ts: Tensor[]): Tensor {
  const plan = planEinsum(attrString(node, 'equation') ?? '', ts.map((t) => t.dims));
  if (typeof plan === 'string') throw new EvalError(node, plan);
  const { terms, out, size } = plan;
  const labels = [...out, ...[...size.keys()].filter((c) => !out.includes(c))];
  const dims = out.map((c) => size.get(c)!);
  const res = alloc(numel(dims));
  const total = numel(labels.map((c) => size.get(c)!));
  if (total > MAX_EINSUM_STEPS) throw new EvalError(node, `would take ${total} products, more than the ${MAX_EINSUM_STEPS} RepFuse evaluates.`);
  if (total === 0) return { dims, data: res };
  // Per operand, the stride each label moves it by (repeated letters add up: the diagonal).
  const st = terms.map((t, k) => {
    const s = strides(ts[k].dims);
    return labels.map((c) => [...t].reduce((a, x, i) => (x === c && ts[k].dims[i] !== 1 ? a + s[i] : a), 0));
  });
  const n = labels.length;
  const sz = labels.map((c) => size.get(c)!);
  const inner = numel(sz.slice(out.length)); // summed steps per output element
  const idx = new Array<number>(n).fill(0);
  const off = new Array<number>(ts.length).fill(0);
  for (let o = 0; o < res.length; o++) {
    let acc = 0;
    for (let q = 0; q < inner; q++) {
      let p = 1;
      for (let k = 0; k < ts.length; k++) p *= ts[k].data[off[k]];
      acc += p;
      // Odometer over all labels (the summed ones vary fastest, then the output's).
      for (let a = n - 1; a >= 0; a--) {
        idx[a]++;
        for (let k = 0; k < ts.length; k++) off[k] += st[k][a];
        if (idx[a] < sz[a]) break;
        for (let k = 0; k < ts.length; k++) off[k] -= st[k][a] * sz[a];
        idx[a] = 0;
      }
    }
    res[o] = acc;
  }
  return { dims, data: res };
}

function axesOf(node: OnnxNode, ins: (Tensor | undefined)[], opset: number): number[] | undefined {
  if (opset >= 13) return ins[1] ? Array.from(ins[1].data) : undefined;
  return attrInts(node, 'axes');
}

const castTo = (to: number, v: number) => (to === 9 ? (v !== 0 ? 1 : 0) : isIntType(to) ? Math.trunc(v) : to === 1 ? Math.fround(v) : v);

/**
 * Runs one node. `ins` are its inputs (undefined for an omitted optional input); returns its
 * outputs. Throws EvalError for an operator or attribute outside the supported set.
 */
export function runNode(node: OnnxNode, ins: (Tensor | undefined)[], opset: number): Tensor[] {
  try {
    return runNodeUnchecked(node, ins, opset);
  } catch (e) {
    if (e instanceof TooBig) throw new EvalError(node, e.message);
    throw e;
  }
}

function runNodeUnchecked(node: OnnxNode, ins: (Tensor | undefined)[], opset: number): Tensor[] {
  const need = (i: number): Tensor => {
    const t = ins[i];
    if (!t) throw new EvalError(node, `is missing input ${i}.`);
    return t;
  };
  const ints = (t: Tensor) => Array.from(t.data);
  switch (node.opType) {
    case 'Identity':
    case 'Dropout':
      return [need(0)];
    case 'Constant':
      throw new EvalError(node, 'is read by the caller.');
    case 'Conv':
      return [conv(node, need(0), need(1), ins[2])];
    case 'BatchNormalization':
      if (attrInt(node, 'training_mode', 0) !== 0) throw new EvalError(node, 'is in training mode.');
      return [batchNorm(node, need(0), need(1), need(2), need(3), need(4))];
    case 'AveragePool':
      return [avgPool(node, need(0))];
    case 'Add':
    case 'Sum':
      return [elementwise(ins.filter((t): t is Tensor => !!t), node, (a, b) => a + b)];
    case 'Sub':
      return [elementwise([need(0), need(1)], node, (a, b) => a - b)];
    case 'Mul':
      return [elementwise([need(0), need(1)], node, (a, b) => a * b)];
    case 'Div': {
      const int = need(0).int && need(1).int;
      return [elementwise([need(0), need(1)], node, int ? (a, b) => Math.trunc(a / b) : (a, b) => a / b, int)];
    }
    case 'Pow':
      return [elementwise([need(0), need(1)], node, (a, b) => a ** b, need(0).int)];
    case 'Neg':
      return [{ ...need(0), data: need(0).data.map((v) => -v) }];
    case 'Sqrt':
      return [{ dims: need(0).dims, data: need(0).data.map(Math.sqrt) }];
    case 'Reciprocal':
      return [{ dims: need(0).dims, data: need(0).data.map((v) => 1 / v) }];
    case 'Equal':
      return [elementwise([need(0), need(1)], node, (a, b) => (a === b ? 1 : 0), true)];
    case 'Where': {
      const c = need(0);
      const r = elementwise([c, need(1), need(2)], node, () => 0, need(1).int && need(2).int);
      const mc = broadcastIndex(c.dims, r.dims);
      const m1 = broadcastIndex(need(1).dims, r.dims);
      const m2 = broadcastIndex(need(2).dims, r.dims);
      for (let i = 0; i < r.data.length; i++) r.data[i] = c.data[mc[i]] ? need(1).data[m1[i]] : need(2).data[m2[i]];
      return [r];
    }
    case 'Pad':
      return [pad(node, ins, opset)];
    case 'Slice':
      return [slice(node, ins, opset)];
    case 'Concat':
      return [concat(node, ins.filter((t): t is Tensor => !!t))];
    case 'ScatterND':
      return [scatterND(node, need(0), need(1), need(2))];
    case 'Expand':
      return [expand(node, need(0), ints(need(1)))];
    case 'Transpose':
      return [transpose(node, need(0))];
    case 'Gather':
      return [gather(node, need(0), need(1))];
    case 'Einsum':
      return [einsum(node, ins.map((_, k) => need(k)))];
    case 'MatMul':
      return [matmul(node, need(0), need(1))];
    case 'Shape': {
      const d = need(0).dims;
      const r = d.length;
      const s = attrInt(node, 'start', 0);
      const e = node.attrs.has('end') ? attrInt(node, 'end', r) : r;
      const cl = (v: number) => Math.min(Math.max(v < 0 ? v + r : v, 0), r);
      const part = d.slice(cl(s), cl(e));
      return [tensor([part.length], part, true)];
    }
    case 'Size':
      return [scalar(numel(need(0).dims), true)];
    case 'Cast': {
      const to = attrInt(node, 'to', 1);
      const x = need(0);
      return [{ dims: x.dims, data: x.data.map((v) => castTo(to, v)), int: isIntType(to) }];
    }
    case 'Range': {
      const [s, l, d] = [need(0).data[0], need(1).data[0], need(2).data[0]];
      const n = Math.max(0, Math.ceil((l - s) / d));
      if (!(n < 1 << 22)) throw new EvalError(node, 'would make a range too long.');
      return [tensor([n], Array.from({ length: n }, (_, i) => s + i * d), need(0).int)];
    }
    case 'ConstantOfShape': {
      const dims = ints(need(0));
      const v = node.attrs.get('value');
      let fill = 0;
      let int = false;
      if (v?.t) {
        const t = v.t;
        int = isIntType(t.dataType ?? 1);
        fill = t.floatData?.length ? t.floatData[0] : t.int64Data?.length ? Number(t.int64Data[0]) : t.int32Data?.length ? t.int32Data[0] : t.doubleData?.length ? t.doubleData[0] : rawScalar(t.rawData, t.dataType ?? 1);
      }
      if (!(numel(dims) < 1 << 22)) throw new EvalError(node, 'would make a tensor too big.');
      return [{ dims, data: alloc(numel(dims)).fill(fill), int }];
    }
    case 'Reshape': {
      const x = need(0);
      const allowZero = attrInt(node, 'allowzero', 0) === 1;
      const shape = ints(need(1)).map((v, i) => (v === 0 && !allowZero ? x.dims[i] : v));
      const known = shape.filter((v) => v !== -1).reduce((a, b) => a * b, 1);
      const dims = shape.map((v) => (v === -1 ? x.data.length / known : v));
      if (numel(dims) !== x.data.length || dims.some((d) => !Number.isInteger(d) || d < 0)) throw new EvalError(node, `cannot reshape [${x.dims.join(', ')}] to [${shape.join(', ')}].`);
      return [{ ...x, dims }];
    }
    case 'Flatten': {
      const x = need(0);
      const a = normAxis(attrInt(node, 'axis', 1), x.dims.length);
      return [{ ...x, dims: [numel(x.dims.slice(0, a)), numel(x.dims.slice(a))] }];
    }
    case 'Unsqueeze': {
      const x = need(0);
      const axes = axesOf(node, ins, opset) ?? [];
      const r = x.dims.length + axes.length;
      const set = new Set(axes.map((a) => normAxis(a, r)));
      const dims: number[] = [];
      let j = 0;
      for (let i = 0; i < r; i++) dims.push(set.has(i) ? 1 : x.dims[j++]);
      return [{ ...x, dims }];
    }
    case 'Squeeze': {
      const x = need(0);
      const axes = axesOf(node, ins, opset);
      const set = new Set((axes ?? x.dims.flatMap((d, i) => (d === 1 ? [i] : []))).map((a) => normAxis(a, x.dims.length)));
      return [{ ...x, dims: x.dims.filter((_, i) => !set.has(i)) }];
    }
    default:
      throw new EvalError(node, 'is not an operator the region evaluator knows.');
  }
}

function rawScalar(raw: Uint8Array | null | undefined, dataType: number): number {
  if (!raw || !raw.length) return 0;
  const dv = new DataView(raw.buffer, raw.byteOffset, raw.byteLength);
  switch (dataType) {
    case 1:
      return dv.getFloat32(0, true);
    case 11:
      return dv.getFloat64(0, true);
    case 7:
      return Number(dv.getBigInt64(0, true));
    case 6:
      return dv.getInt32(0, true);
    case 9:
    case 2:
      return dv.getUint8(0);
    default:
      return 0;
  }
}

/** Ops the interpreter runs (the set a region's nodes and constant subgraphs must come from). */
export const EVAL_OPS = new Set([
  'Identity', 'Dropout', 'Conv', 'BatchNormalization', 'AveragePool', 'Add', 'Sum', 'Sub', 'Mul', 'Div', 'Pow', 'Neg', 'Sqrt', 'Reciprocal',
  'Equal', 'Where', 'Pad', 'Slice', 'Concat', 'ScatterND', 'Expand', 'Transpose', 'Gather', 'MatMul', 'Einsum', 'Shape', 'Size', 'Cast', 'Range',
  'ConstantOfShape', 'Reshape', 'Flatten', 'Unsqueeze', 'Squeeze',
]);
