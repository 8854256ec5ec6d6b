// Protocol-buffer wire format at the byte level: enough to walk a message's fields over a
// ByteSource without decoding it, so large tensors stay where they are and unknown fields survive.
import { type ByteSource, GrowableBytes } from '../bytes';
import { FormatError } from '../errors';

export const WT_VARINT = 0;
export const WT_I64 = 1;
export const WT_LEN = 2;
export const WT_I32 = 5;

/** One field of a message, located in the source. */
export interface WireField {
  field: number;
  wireType: number;
  /** Offset of the tag: the field's encoding is [start, end). */
  start: number;
  end: number;
  /** For WT_LEN: the payload is [valueStart, end). For others, valueStart is where the value begins. */
  valueStart: number;
  /** For WT_VARINT: the value (exact up to 2^53; larger values are rounded, negatives are two's complement). */
  varint: number;
}

/** Decodes a varint from `buf` at `pos`; returns [value, nextPos] or throws on truncation/overlong. */
export function readVarint(buf: Uint8Array, pos: number, name?: string): [number, number] {
  let result = 0;
  let mul = 1;
  for (let i = 0; i < 10; i++) {
    if (pos >= buf.length) throw new FormatError('truncated protobuf varint.', name);
    const b = buf[pos++];
    result += (b & 0x7f) * mul;
    if ((b & 0x80) === 0) {
      if (i === 9 && b > 1) throw new FormatError('protobuf varint exceeds 64 bits.', name);
      // Ten-byte varints are negative int64s; map them back to a (rounded) negative number.
      if (i === 9) result -= 2 ** 64;
      return [result, pos];
    }
    mul *= 128;
  }
  throw new FormatError('protobuf varint is longer than 10 bytes.', name);
}

/**
 * Walks the fields of the message occupying [start, end) of `src`. Lengths are checked against
 * the enclosing range before anything is read, so a hostile length cannot cause a huge read.
 */
export function* walkFields(src: ByteSource, start: number, end: number): Generator<WireField> {
  let pos = start;
  while (pos < end) {
    const head = src.read(pos, Math.min(22, end - pos));
    const [tag, p1] = readVarint(head, 0, src.name);
    const field = Math.floor(tag / 8);
    const wireType = tag % 8;
    if (field === 0) throw new FormatError(`invalid protobuf field number 0 at offset ${pos}.`, src.name);
    let valueStart = pos + p1;
    let fieldEnd: number;
    let varint = 0;
    switch (wireType) {
      case WT_VARINT: {
        const [v, p2] = readVarint(head, p1, src.name);
        varint = v;
        fieldEnd = pos + p2;
        break;
      }
      case WT_I64:
        fieldEnd = valueStart + 8;
        break;
      case WT_I32:
        fieldEnd = valueStart + 4;
        break;
      case WT_LEN: {
        const [len, p2] = readVarint(head, p1, src.name);
        valueStart = pos + p2;
        if (len < 0 || valueStart + len > end) {
          throw new FormatError(
            `protobuf field ${field} at offset ${pos} declares ${len} bytes but only ${end - valueStart} remain in its message (truncated or corrupt file).`,
            src.name,
          );
        }
        fieldEnd = valueStart + len;
        break;
      }
      default:
        throw new FormatError(`unsupported protobuf wire type ${wireType} at offset ${pos} (corrupt file?).`, src.name);
    }
    if (fieldEnd > end) throw new FormatError(`protobuf field ${field} at offset ${pos} runs past the end of its message.`, src.name);
    yield { field, wireType, start: pos, end: fieldEnd, valueStart, varint };
    pos = fieldEnd;
  }
}

/** Reads a WT_LEN field's payload as UTF-8. */
export function fieldString(src: ByteSource, f: WireField): string {
  return Buffer.from(src.read(f.valueStart, f.end - f.valueStart)).toString('utf8');
}

/** Reads a fixed32 float field. */
export function fieldFloat(src: ByteSource, f: WireField): number {
  const b = src.read(f.valueStart, 4);
  return new DataView(b.buffer, b.byteOffset, 4).getFloat32(0, true);
}

// ---------------------------------------------------------------------------------------------
// Encoding

export function varintSize(v: number): number {
  if (v < 0) return 10;
  let n = 1;
  while (v >= 128) {
    v = Math.floor(v / 128);
    n++;
  }
  return n;
}

/** Growable byte builder for small messages (headers, nodes); big payloads are written as pieces. */
export class ByteBuilder extends GrowableBytes {
  varint(v: number): this {
    if (v < 0) {
      // int64 two's complement, 10 bytes.
      let big = BigInt.asUintN(64, BigInt(Math.trunc(v)));
      this.ensure(10);
      for (let i = 0; i < 10; i++) {
        const b = Number(big & 0x7fn);
        big >>= 7n;
        this.buf[this.len++] = i < 9 ? b | 0x80 : b;
      }
      return this;
    }
    this.ensure(10);
    while (v >= 128) {
      this.buf[this.len++] = (v % 128) | 0x80;
      v = Math.floor(v / 128);
    }
    this.buf[this.len++] = v;
    return this;
  }

  tag(field: number, wireType: number): this {
    return this.varint(field * 8 + wireType);
  }

  bytes(b: Uint8Array): this {
    this.ensure(b.length);
    this.buf.set(b, this.len);
    this.len += b.length;
    return this;
  }

  /** A length-delimited field. */
  lenField(field: number, payload: Uint8Array): this {
    return this.tag(field, WT_LEN).varint(payload.length).bytes(payload);
  }

  stringField(field: number, s: string): this {
    return this.lenField(field, Buffer.from(s, 'utf8'));
  }

  varintField(field: number, v: number): this {
    return this.tag(field, WT_VARINT).varint(v);
  }

}
