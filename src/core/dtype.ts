// Element types shared by every format, and exact conversions between them and float64.
import { FormatError } from './errors';

/** Element types RepFuse knows by name. Values are ONNX TensorProto.DataType codes. */
export enum DType {
  float32 = 1,
  uint8 = 2,
  int8 = 3,
  uint16 = 4,
  int16 = 5,
  int32 = 6,
  int64 = 7,
  string = 8,
  bool = 9,
  float16 = 10,
  float64 = 11,
  uint32 = 12,
  uint64 = 13,
  complex64 = 14,
  complex128 = 15,
  bfloat16 = 16,
}

const SIZES: Record<number, number> = {
  [DType.float32]: 4, [DType.uint8]: 1, [DType.int8]: 1, [DType.uint16]: 2, [DType.int16]: 2,
  [DType.int32]: 4, [DType.int64]: 8, [DType.bool]: 1, [DType.float16]: 2, [DType.float64]: 8,
  [DType.uint32]: 4, [DType.uint64]: 8, [DType.complex64]: 8, [DType.complex128]: 16, [DType.bfloat16]: 2,
};

export function dtypeName(t: number): string {
  return DType[t] ?? `dtype#${t}`;
}

/** Bytes per element, or undefined for variable-size types (string) and unknown codes. */
export function dtypeSize(t: number): number | undefined {
  return SIZES[t];
}

export function isFloatType(t: number): boolean {
  return t === DType.float32 || t === DType.float16 || t === DType.float64 || t === DType.bfloat16;
}

if (new Uint8Array(new Uint16Array([1]).buffer)[0] !== 1) {
  // Every format RepFuse reads stores little-endian data; typed-array views assume the host agrees.
  throw new Error('RepFuse requires a little-endian host.');
}

const f32 = new Float32Array(1);
const u32 = new Uint32Array(f32.buffer);

export function halfToFloat(h: number): number {
  const s = h & 0x8000 ? -1 : 1;
  const e = (h >> 10) & 0x1f;
  const m = h & 0x3ff;
  if (e === 0) return s * m * 2 ** -24;
  if (e === 31) return m ? NaN : s * Infinity;
  return s * (1 + m / 1024) * 2 ** (e - 15);
}

/**
 * Rounds a float64 to a small IEEE-style binary format (sign, `eBits` exponent, `mBits` mantissa),
 * to nearest even, straight from the double so there is no double rounding. Returns the bit pattern.
 */
function encodeSmallFloat(v: number, eBits: number, mBits: number): number {
  const bias = (1 << (eBits - 1)) - 1;
  const eMax = (1 << eBits) - 1;
  const signBit = 1 << (eBits + mBits);
  if (Number.isNaN(v)) return (eMax << mBits) | (1 << (mBits - 1));
  const sign = v < 0 || Object.is(v, -0) ? signBit : 0;
  const a = Math.abs(v);
  if (a === Infinity) return sign | (eMax << mBits);
  if (a === 0) return sign;
  let e = Math.floor(Math.log2(a));
  if (2 ** e > a) e -= 1; // Math.log2 may be off by one ulp near powers of two
  else if (2 ** (e + 1) <= a) e += 1;
  if (e < 1 - bias) {
    // Subnormal: count units of the smallest subnormal. A carry into 1 << mBits is exactly the
    // smallest normal number, whose bit pattern is the same integer.
    return sign | roundHalfEven(a / 2 ** (1 - bias - mBits));
  }
  let m = roundHalfEven((a / 2 ** e - 1) * 2 ** mBits);
  let biased = e + bias;
  if (m === 1 << mBits) {
    m = 0;
    biased += 1;
  }
  if (biased >= eMax) return sign | (eMax << mBits);
  return sign | (biased << mBits) | m;
}

function roundHalfEven(x: number): number {
  const f = Math.floor(x);
  const d = x - f;
  if (d > 0.5) return f + 1;
  if (d < 0.5) return f;
  return f % 2 === 0 ? f : f + 1;
}

/** float64 → IEEE binary16 bits, round to nearest even. */
export function floatToHalf(v: number): number {
  return encodeSmallFloat(v, 5, 10);
}

export function bfloat16ToFloat(b: number): number {
  u32[0] = (b & 0xffff) << 16;
  return f32[0];
}

/** float64 → bfloat16 bits, round to nearest even. */
export function floatToBfloat16(v: number): number {
  return encodeSmallFloat(v, 8, 7);
}

/** A read-only numeric view of tensor data, widened exactly to JS numbers. */
export type NumArray = Float32Array | Float64Array | Int32Array | Uint8Array | Int8Array | Int16Array | Uint16Array | Uint32Array | number[];

/**
 * Decodes little-endian bytes of `dtype` into numbers without loss. float32/float64 are zero-copy
 * views when the bytes are aligned; float16/bfloat16 widen to float32 (exact).
 */
export function decodeNumbers(bytes: Uint8Array, dtype: number, file?: string): NumArray {
  const size = dtypeSize(dtype);
  if (!size) throw new FormatError(`cannot read numbers of type ${dtypeName(dtype)}.`, file);
  if (bytes.length % size !== 0) throw new FormatError(`${bytes.length} bytes is not a whole number of ${dtypeName(dtype)} elements.`, file);
  const n = bytes.length / size;
  // A copy, also for a Buffer (whose slice() is a view that keeps the odd offset).
  const aligned = bytes.byteOffset % 8 === 0 ? bytes : Uint8Array.prototype.slice.call(bytes);
  const buf = aligned.buffer;
  const off = aligned.byteOffset;
  switch (dtype) {
    case DType.float32:
      return new Float32Array(buf, off, n);
    case DType.float64:
      return new Float64Array(buf, off, n);
    case DType.int32:
      return new Int32Array(buf, off, n);
    case DType.uint8:
    case DType.bool:
      return new Uint8Array(buf, off, n);
    case DType.int8:
      return new Int8Array(buf, off, n);
    case DType.int16:
      return new Int16Array(buf, off, n);
    case DType.uint16:
      return new Uint16Array(buf, off, n);
    case DType.uint32:
      return new Uint32Array(buf, off, n);
    case DType.float16: {
      const src = new Uint16Array(buf, off, n);
      const out = new Float32Array(n);
      for (let i = 0; i < n; i++) out[i] = halfToFloat(src[i]);
      return out;
    }
    case DType.bfloat16: {
      const src = new Uint16Array(buf, off, n);
      const out = new Uint32Array(n);
      for (let i = 0; i < n; i++) out[i] = src[i] << 16;
      return new Float32Array(out.buffer);
    }
    case DType.int64:
    case DType.uint64: {
      const src = dtype === DType.int64 ? new BigInt64Array(buf, off, n) : new BigUint64Array(buf, off, n);
      const out = new Array<number>(n);
      for (let i = 0; i < n; i++) out[i] = Number(src[i]);
      return out;
    }
    default:
      throw new FormatError(`cannot read numbers of type ${dtypeName(dtype)}.`, file);
  }
}

/** Encodes float64 values as little-endian bytes of a float dtype, rounding once (to nearest even). */
export function encodeFloats(values: ArrayLike<number>, dtype: number): Uint8Array {
  const n = values.length;
  switch (dtype) {
    case DType.float32: {
      // The typed-array constructor converts natively (round to nearest even), much faster than a loop.
      const out = values instanceof Float64Array || values instanceof Float32Array ? new Float32Array(values) : Float32Array.from(values);
      return new Uint8Array(out.buffer);
    }
    case DType.float64: {
      const out = Float64Array.from(values as ArrayLike<number>);
      return new Uint8Array(out.buffer);
    }
    case DType.float16: {
      const out = new Uint16Array(n);
      for (let i = 0; i < n; i++) out[i] = floatToHalf(values[i]);
      return new Uint8Array(out.buffer);
    }
    case DType.bfloat16: {
      const out = new Uint16Array(n);
      for (let i = 0; i < n; i++) out[i] = floatToBfloat16(values[i]);
      return new Uint8Array(out.buffer);
    }
    default:
      throw new Error(`cannot write fused weights as ${dtypeName(dtype)}; only float types are supported.`);
  }
}

/**
 * Encodes float64 values into `out` (which must hold values.length × size bytes) as a float dtype,
 * rounding once; returns the filled view. Lets streaming writers reuse one buffer.
 */
export function encodeFloatsInto(values: Float64Array, dtype: number, out: Uint8Array): Uint8Array {
  const n = values.length;
  const size = dtypeSize(dtype)!;
  if (out.byteOffset % 8 !== 0 || out.length < n * size) throw new Error('internal error: encode buffer too small or unaligned');
  switch (dtype) {
    case DType.float32:
      new Float32Array(out.buffer, out.byteOffset, n).set(values);
      break;
    case DType.float64:
      new Float64Array(out.buffer, out.byteOffset, n).set(values);
      break;
    case DType.float16: {
      const h = new Uint16Array(out.buffer, out.byteOffset, n);
      for (let i = 0; i < n; i++) h[i] = floatToHalf(values[i]);
      break;
    }
    case DType.bfloat16: {
      const h = new Uint16Array(out.buffer, out.byteOffset, n);
      for (let i = 0; i < n; i++) h[i] = floatToBfloat16(values[i]);
      break;
    }
    default:
      throw new Error(`cannot write fused weights as ${dtypeName(dtype)}; only float types are supported.`);
  }
  return out.subarray(0, n * size);
}
