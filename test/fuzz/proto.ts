// A protobuf message as a tree the fuzzer can edit: ONNX's message-typed fields are parsed
// recursively, everything else stays opaque bytes. Serializing recomputes every length prefix,
// so structural edits (duplicated, deleted, reordered fields) produce a well-framed file; a
// separate edit plants a lying length where wanted.

/** Message-typed fields per message kind (ONNX schema, only what matters for RepFuse). */
const SCHEMA: Record<string, Record<number, string>> = {
  model: { 7: 'graph', 8: 'opset', 14: 'kv' },
  graph: { 1: 'node', 5: 'tensor', 11: 'valueinfo', 12: 'valueinfo', 13: 'valueinfo' },
  node: { 5: 'attribute' },
  attribute: { 5: 'tensor', 6: 'graph', 10: 'tensor', 11: 'graph' },
  tensor: { 13: 'kv' },
  valueinfo: { 2: 'type' },
  type: { 1: 'tensortype' },
  tensortype: { 2: 'shape' },
  shape: { 1: 'dim' },
  opset: {},
  kv: {},
  dim: {},
};

export interface PField {
  field: number;
  wireType: number;
  /** WT_VARINT: the value (as a bigint, so 64-bit values survive). */
  varint?: bigint;
  /** WT_LEN (opaque), WT_I32, WT_I64: the payload bytes. */
  bytes?: Uint8Array;
  /** WT_LEN of a known message kind: its fields. */
  children?: PField[];
  kind?: string;
  /** Serialize this field's length prefix as this value instead of the real length (a lie). */
  lieLength?: bigint;
}

function readVarint(b: Uint8Array, pos: number): [bigint, number] {
  let v = 0n;
  let shift = 0n;
  for (let i = 0; i < 10; i++) {
    if (pos >= b.length) throw new Error('truncated varint');
    const x = b[pos++];
    v |= BigInt(x & 0x7f) << shift;
    if (!(x & 0x80)) return [v, pos];
    shift += 7n;
  }
  throw new Error('long varint');
}

/** Parses a message of `kind`; throws on malformed input (callers fall back to opaque bytes). */
export function parseMessage(b: Uint8Array, kind: string, depth = 0): PField[] {
  const out: PField[] = [];
  let pos = 0;
  while (pos < b.length) {
    const [tag, p1] = readVarint(b, pos);
    const field = Number(tag >> 3n);
    const wireType = Number(tag & 7n);
    if (field === 0) throw new Error('field 0');
    pos = p1;
    if (wireType === 0) {
      const [v, p2] = readVarint(b, pos);
      out.push({ field, wireType, varint: v });
      pos = p2;
    } else if (wireType === 1 || wireType === 5) {
      const n = wireType === 1 ? 8 : 4;
      if (pos + n > b.length) throw new Error('truncated fixed');
      out.push({ field, wireType, bytes: b.subarray(pos, pos + n) });
      pos += n;
    } else if (wireType === 2) {
      const [len, p2] = readVarint(b, pos);
      const end = p2 + Number(len);
      if (end > b.length) throw new Error('truncated len');
      const payload = b.subarray(p2, end);
      const sub = SCHEMA[kind]?.[field];
      let f: PField = { field, wireType, bytes: payload };
      if (sub && depth < 64) {
        try {
          f = { field, wireType, children: parseMessage(payload, sub, depth + 1), kind: sub };
        } catch {
          /* opaque */
        }
      }
      out.push(f);
      pos = end;
    } else throw new Error(`wire type ${wireType}`);
  }
  return out;
}

function varintLen(v: bigint): number {
  let x = BigInt.asUintN(64, v);
  let n = 1;
  while (x >= 128n) {
    x >>= 7n;
    n++;
  }
  return n;
}

function numLen(v: number): number {
  let n = 1;
  while (v >= 128) {
    v = Math.floor(v / 128);
    n++;
  }
  return n;
}

/** Payload sizes of every field (memoized per call in a Map). */
function sizeOf(fields: PField[], sizes: Map<PField, number>): number {
  let total = 0;
  for (const f of fields) {
    total += numLen(f.field * 8 + f.wireType);
    if (f.wireType === 0) total += varintLen(f.varint ?? 0n);
    else if (f.wireType === 2) {
      const len = f.children ? sizeOf(f.children, sizes) : (f.bytes?.length ?? 0);
      sizes.set(f, len);
      total += (f.lieLength !== undefined ? varintLen(f.lieLength) : numLen(len)) + len;
    } else total += f.wireType === 1 ? 8 : 4;
  }
  return total;
}

/** Serializes fields; length prefixes are computed (or lied about where a field asks). */
export function serialize(fields: PField[]): Uint8Array {
  const sizes = new Map<PField, number>();
  const out = new Uint8Array(sizeOf(fields, sizes));
  let o = 0;
  const varint = (v: bigint | number) => {
    if (typeof v === 'number') {
      while (v >= 128) {
        out[o++] = (v % 128) | 0x80;
        v = Math.floor(v / 128);
      }
      out[o++] = v;
      return;
    }
    let x = BigInt.asUintN(64, v);
    while (x >= 128n) {
      out[o++] = Number(x & 0x7fn) | 0x80;
      x >>= 7n;
    }
    out[o++] = Number(x);
  };
  const write = (fs: PField[]) => {
    for (const f of fs) {
      varint(f.field * 8 + f.wireType);
      if (f.wireType === 0) varint(f.varint ?? 0n);
      else if (f.wireType === 2) {
        varint(f.lieLength ?? sizes.get(f)!);
        if (f.children) write(f.children);
        else if (f.bytes) {
          out.set(f.bytes, o);
          o += f.bytes.length;
        }
      } else {
        const n = f.wireType === 1 ? 8 : 4;
        if (f.bytes) out.set(f.bytes.subarray(0, n), o);
        o += n;
      }
    }
  };
  write(fields);
  return out;
}

/** A deep copy that shares opaque payload bytes (they are never written to). */
export function cloneFields(fields: PField[]): PField[] {
  return fields.map((f) => ({ ...f, children: f.children ? cloneFields(f.children) : undefined }));
}

/** Every field with the list that holds it and the kind of message that list is, depth first. */
export function allFields(
  fields: PField[],
  kind = 'model',
  out: { f: PField; list: PField[]; depth: number; kind: string }[] = [],
  depth = 0,
): { f: PField; list: PField[]; depth: number; kind: string }[] {
  for (const f of fields) {
    out.push({ f, list: fields, depth, kind });
    if (f.children) allFields(f.children, f.kind ?? '', out, depth + 1);
  }
  return out;
}
