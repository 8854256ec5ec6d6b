// float16 / bfloat16 conversions: round to nearest even straight from float64, subnormals,
// overflow, NaN; and the byte codecs decodeNumbers / encodeFloats.
import * as assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { bfloat16ToFloat, decodeNumbers, DType, encodeFloats, floatToBfloat16, floatToHalf, halfToFloat } from '../src/core/dtype';
import { Rng } from '../src/core/random';

const isHalfNaN = (h: number) => (h & 0x7c00) === 0x7c00 && (h & 0x3ff) !== 0;
const isBf16NaN = (h: number) => (h & 0x7f80) === 0x7f80 && (h & 0x7f) !== 0;

/** The representable neighbours of `v` decide: nearest wins, ties go to the even pattern. */
function checkNearestEven(v: number, bits: number, toFloat: (b: number) => number, label: string): void {
  const got = toFloat(bits);
  const up = toFloat(bits + 1);
  const down = bits === 0 ? -toFloat(1) : toFloat(bits - 1);
  const err = Math.abs(got - v);
  for (const [name, n] of [['next', up], ['previous', down]] as const) {
    if (!Number.isFinite(n)) continue;
    const e = Math.abs(n - v);
    assert.ok(err < e || (err === e && (bits & 1) === 0), `${label}(${v}) = 0x${bits.toString(16)} (${got}); the ${name} value ${n} is nearer or an even tie`);
  }
}

describe('floatToHalf', () => {
  const cases: [number, number, string][] = [
    [0, 0x0000, 'zero'],
    [-0, 0x8000, 'negative zero'],
    [1, 0x3c00, 'one'],
    [-2, 0xc000, 'minus two'],
    [0.333251953125, 0x3555, 'exact 1/3 in half'],
    [65504, 0x7bff, 'largest finite'],
    [65519.99, 0x7bff, 'just below the overflow midpoint rounds down'],
    [65520, 0x7c00, 'the midpoint to 65536 rounds (even) to Inf'],
    [1e6, 0x7c00, 'overflow'],
    [-1e6, 0xfc00, 'negative overflow'],
    [Infinity, 0x7c00, '+Inf'],
    [-Infinity, 0xfc00, '-Inf'],
    [2 ** -14, 0x0400, 'smallest normal'],
    [2 ** -24, 0x0001, 'smallest subnormal'],
    [2 ** -25, 0x0000, 'half the smallest subnormal: tie to even (0)'],
    [2 ** -25 * 1.0000001, 0x0001, 'just above half the smallest subnormal'],
    [3 * 2 ** -25, 0x0002, '1.5 subnormal units: tie to even (2)'],
    [5 * 2 ** -25, 0x0002, '2.5 subnormal units: tie to even (2)'],
    [2 ** -14 - 2 ** -25, 0x0400, 'largest subnormal + half a unit: carries into the smallest normal'],
    [-(2 ** -24), 0x8001, 'negative subnormal'],
    [1 + 2 ** -11, 0x3c00, 'tie between 1 and 1+2^-10 goes to even (1)'],
    [1 + 3 * 2 ** -11, 0x3c02, 'tie between 1+2^-10 and 1+2^-9 goes to even'],
    [1 + 2 ** -11 + 2 ** -40, 0x3c01, 'just above the tie rounds up (no double rounding through float32)'],
    [2047.5, 0x6800, 'tie between 2047 (odd pattern) and 2048 goes to even (2048)'],
    [2 ** -14 * (1 + 2 ** -11), 0x0400, 'tie just above the smallest normal goes to even'],
  ];

  for (const [v, want, label] of cases) {
    it(`${label}: ${v} → 0x${want.toString(16).padStart(4, '0')}`, () => {
      assert.equal(floatToHalf(v), want);
    });
  }

  it('NaN gives a NaN pattern', () => {
    assert.ok(isHalfNaN(floatToHalf(NaN)));
    assert.ok(Number.isNaN(halfToFloat(floatToHalf(NaN))));
  });

  it('every finite half value round-trips exactly', () => {
    for (let h = 0; h < 0x10000; h++) {
      if ((h & 0x7c00) === 0x7c00) continue;
      assert.equal(floatToHalf(halfToFloat(h)), h, `0x${h.toString(16)}`);
    }
  });

  it('seeded random doubles round to the nearest half, ties to even', () => {
    const rng = new Rng(42);
    for (let i = 0; i < 20000; i++) {
      const e = Math.floor(rng.uniform(-26, 16));
      const v = (rng.next() < 0.5 ? -1 : 1) * (1 + rng.next()) * 2 ** e;
      const bits = floatToHalf(v);
      if ((bits & 0x7fff) === 0x7c00) {
        assert.ok(Math.abs(v) >= 65520, `${v} overflowed`);
        continue;
      }
      const mag = bits & 0x7fff;
      checkNearestEven(Math.abs(v), mag, halfToFloat, 'floatToHalf');
      assert.equal(bits & 0x8000 ? -1 : 1, Math.sign(v));
    }
  });

  it('exact midpoints between neighbouring halves go to the even one', () => {
    for (let h = 0x0000; h < 0x7bff; h += 37) {
      const mid = (halfToFloat(h) + halfToFloat(h + 1)) / 2;
      assert.equal(floatToHalf(mid), h % 2 === 0 ? h : h + 1, `midpoint after 0x${h.toString(16)}`);
    }
  });
});

describe('floatToBfloat16', () => {
  const maxBf16 = bfloat16ToFloat(0x7f7f);
  const cases: [number, number, string][] = [
    [0, 0x0000, 'zero'],
    [-0, 0x8000, 'negative zero'],
    [1, 0x3f80, 'one'],
    [-1.5, 0xbfc0, 'minus one and a half'],
    [1 + 2 ** -8, 0x3f80, 'tie between 1 and 1+2^-7 goes to even (1)'],
    [1 + 3 * 2 ** -8, 0x3f82, 'tie between 1+2^-7 and 1+2^-6 goes to even'],
    [1 + 2 ** -8 + 2 ** -30, 0x3f81, 'just above the tie rounds up'],
    [maxBf16, 0x7f7f, 'largest finite'],
    [maxBf16 * (1 + 2 ** -9), 0x7f7f, 'a bit above the largest finite, below the midpoint'],
    [2 ** 127 * (2 - 2 ** -8), 0x7f80, 'the midpoint to 2^128 rounds (even) to Inf'],
    [3.4028234663852886e38, 0x7f80, 'float32 max overflows'],
    [Infinity, 0x7f80, '+Inf'],
    [-Infinity, 0xff80, '-Inf'],
    [2 ** -126, 0x0080, 'smallest normal'],
    [2 ** -133, 0x0001, 'smallest subnormal'],
    [2 ** -134, 0x0000, 'half the smallest subnormal: tie to even (0)'],
    [3 * 2 ** -134, 0x0002, '1.5 subnormal units: tie to even (2)'],
    [2 ** -126 - 2 ** -134, 0x0080, 'largest subnormal + half a unit: carries into the smallest normal'],
  ];
  for (const [v, want, label] of cases) {
    it(`${label}: ${v} → 0x${want.toString(16).padStart(4, '0')}`, () => {
      assert.equal(floatToBfloat16(v), want);
    });
  }

  it('NaN gives a NaN pattern', () => {
    assert.ok(isBf16NaN(floatToBfloat16(NaN)));
    assert.ok(Number.isNaN(bfloat16ToFloat(floatToBfloat16(NaN))));
  });

  it('every finite bfloat16 value round-trips exactly', () => {
    for (let h = 0; h < 0x10000; h++) {
      if ((h & 0x7f80) === 0x7f80) continue;
      assert.equal(floatToBfloat16(bfloat16ToFloat(h)), h, `0x${h.toString(16)}`);
    }
  });

  it('seeded random doubles round to the nearest bfloat16, ties to even', () => {
    const rng = new Rng(7);
    for (let i = 0; i < 20000; i++) {
      const e = Math.floor(rng.uniform(-135, 127));
      const v = (1 + rng.next()) * 2 ** e;
      const bits = floatToBfloat16(v);
      if (bits === 0x7f80) continue;
      checkNearestEven(v, bits, bfloat16ToFloat, 'floatToBfloat16');
    }
  });
});

describe('decodeNumbers / encodeFloats', () => {
  const values = [0, -0, 1, -2.5, 3.140625, 1e-3, 65504, -1e-7, 2 ** -20];

  for (const [name, dtype, round] of [
    ['float32', DType.float32, (v: number) => Math.fround(v)],
    ['float64', DType.float64, (v: number) => v],
    ['float16', DType.float16, (v: number) => halfToFloat(floatToHalf(v))],
    ['bfloat16', DType.bfloat16, (v: number) => bfloat16ToFloat(floatToBfloat16(v))],
  ] as const) {
    it(`${name}: encode then decode gives each value rounded once`, () => {
      const bytes = encodeFloats(values, dtype);
      assert.equal(bytes.length, values.length * (dtype === DType.float64 ? 8 : dtype === DType.float32 ? 4 : 2));
      const back = decodeNumbers(bytes, dtype);
      assert.deepEqual(Array.from(back), values.map(round));
      // At an odd byte offset (views must not assume alignment).
      const shifted = new Uint8Array(bytes.length + 1);
      shifted.set(bytes, 1);
      assert.deepEqual(Array.from(decodeNumbers(shifted.subarray(1), dtype)), values.map(round));
    });
  }

  it('bfloat16 bytes are the high half of the float32 pattern, little-endian', () => {
    const bytes = encodeFloats([1, -2, 0.15625], DType.bfloat16);
    assert.deepEqual(Array.from(bytes), [0x80, 0x3f, 0x00, 0xc0, 0x20, 0x3e]);
    assert.deepEqual(Array.from(decodeNumbers(Uint8Array.from([0x80, 0x3f, 0x49, 0x40]), DType.bfloat16)), [1, 3.140625]);
  });

  it('float16 bytes, little-endian, including subnormals and Inf', () => {
    const bytes = encodeFloats([1, 2 ** -24, -Infinity], DType.float16);
    assert.deepEqual(Array.from(bytes), [0x00, 0x3c, 0x01, 0x00, 0x00, 0xfc]);
    assert.deepEqual(Array.from(decodeNumbers(bytes, DType.float16)), [1, 2 ** -24, -Infinity]);
  });

  it('integer types decode exactly; int64 through numbers', () => {
    const i64 = new BigInt64Array([-3n, 2n ** 40n]);
    assert.deepEqual(decodeNumbers(new Uint8Array(i64.buffer), DType.int64), [-3, 2 ** 40]);
    assert.deepEqual(Array.from(decodeNumbers(Uint8Array.from([0xff, 0x01]), DType.int8)), [-1, 1]);
  });

  it('refuses a byte count that is not a whole number of elements, and non-float encodes', () => {
    assert.throws(() => decodeNumbers(new Uint8Array(3), DType.float16), /not a whole number of float16 elements/);
    assert.throws(() => decodeNumbers(new Uint8Array(4), DType.string), /cannot read numbers of type string/);
    assert.throws(() => encodeFloats([1], DType.int32), /only float types are supported/);
  });
});
