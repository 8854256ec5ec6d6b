// Hand-built bytes for the torch I/O tests: pickles opcode by opcode, raw zip archives (including
// ZIP64 forms) independent of RepFuse's writer, and a cycle-aware structural comparison.
import * as zlib from 'node:zlib';
import { crc32 } from '../../src/core/torch/zip';
import {
  NdArray,
  NumpyScalar,
  NumpyDType,
  PyComplex,
  PyDict,
  PyFloat,
  PyGlobal,
  PyObject,
  PySet,
  PySlice,
  PyTuple,
  type PyValue,
} from '../../src/core/torch/values';
import { TorchStorage, TorchTensor } from '../../src/core/torch/tensor';

/** Concatenates opcodes: numbers are bytes, strings latin-1 text, arrays/Uint8Arrays raw bytes. */
export function pk(...parts: (number | string | Uint8Array | number[])[]): Uint8Array {
  const out: number[] = [];
  for (const p of parts) {
    if (typeof p === 'number') out.push(p);
    else if (typeof p === 'string') for (const b of Buffer.from(p, 'latin1')) out.push(b);
    else for (const b of p) out.push(b);
  }
  return Uint8Array.from(out);
}

export function u32le(v: number): number[] {
  return [v & 0xff, (v >>> 8) & 0xff, (v >>> 16) & 0xff, (v >>> 24) & 0xff];
}

export function u64le(v: number | bigint): number[] {
  const b = Buffer.alloc(8);
  b.writeBigUInt64LE(BigInt(v));
  return [...b];
}

export function utf8(s: string): number[] {
  return [...Buffer.from(s, 'utf8')];
}

export interface RawEntry {
  name: string;
  data: Uint8Array;
  /** 0 stored (default) or 8 deflate. */
  method?: number;
  /** Override the sizes written in the central directory (to lie). */
  size?: number;
  compressedSize?: number;
}

/**
 * A zip built by hand: local headers with real sizes (no data descriptors), a central directory
 * and end records. With `zip64`, every entry's sizes and offset are saturated (0xFFFFFFFF) in the
 * central directory and given in a ZIP64 extra field, and a ZIP64 end record + locator precede a
 * saturated classic end record.
 */
export function rawZip(entries: RawEntry[], opts: { zip64?: boolean; comment?: string } = {}): Uint8Array {
  const chunks: Buffer[] = [];
  let pos = 0;
  const push = (b: Buffer): void => {
    chunks.push(b);
    pos += b.length;
  };
  const central: Buffer[] = [];
  for (const e of entries) {
    const name = Buffer.from(e.name, 'utf8');
    const method = e.method ?? 0;
    const payload = method === 8 ? zlib.deflateRawSync(e.data) : Buffer.from(e.data);
    const crc = crc32(e.data);
    const offset = pos;
    const lh = Buffer.alloc(30);
    lh.writeUInt32LE(0x04034b50, 0);
    lh.writeUInt16LE(20, 4);
    lh.writeUInt16LE(0x800, 6);
    lh.writeUInt16LE(method, 8);
    lh.writeUInt32LE(crc, 14);
    lh.writeUInt32LE(payload.length, 18);
    lh.writeUInt32LE(e.data.length, 22);
    lh.writeUInt16LE(name.length, 26);
    lh.writeUInt16LE(0, 28);
    push(Buffer.concat([lh, name, payload]));
    const usize = e.size ?? e.data.length;
    const csize = e.compressedSize ?? (method === 0 ? usize : payload.length);
    const extra = opts.zip64 ? Buffer.alloc(28) : Buffer.alloc(0);
    if (opts.zip64) {
      extra.writeUInt16LE(1, 0);
      extra.writeUInt16LE(24, 2);
      extra.writeBigUInt64LE(BigInt(usize), 4);
      extra.writeBigUInt64LE(BigInt(csize), 12);
      extra.writeBigUInt64LE(BigInt(offset), 20);
    }
    const ch = Buffer.alloc(46);
    ch.writeUInt32LE(0x02014b50, 0);
    ch.writeUInt16LE(45, 4);
    ch.writeUInt16LE(opts.zip64 ? 45 : 20, 6);
    ch.writeUInt16LE(0x800, 8);
    ch.writeUInt16LE(method, 10);
    ch.writeUInt32LE(crc, 16);
    ch.writeUInt32LE(opts.zip64 ? 0xffffffff : csize, 20);
    ch.writeUInt32LE(opts.zip64 ? 0xffffffff : usize, 24);
    ch.writeUInt16LE(name.length, 28);
    ch.writeUInt16LE(extra.length, 30);
    ch.writeUInt32LE(opts.zip64 ? 0xffffffff : offset, 42);
    central.push(Buffer.concat([ch, name, extra]));
  }
  const cdOffset = pos;
  for (const c of central) push(c);
  const cdSize = pos - cdOffset;
  const n = entries.length;
  if (opts.zip64) {
    const recOffset = pos;
    const rec = Buffer.alloc(56);
    rec.writeUInt32LE(0x06064b50, 0);
    rec.writeBigUInt64LE(44n, 4);
    rec.writeUInt16LE(45, 12);
    rec.writeUInt16LE(45, 14);
    rec.writeBigUInt64LE(BigInt(n), 24);
    rec.writeBigUInt64LE(BigInt(n), 32);
    rec.writeBigUInt64LE(BigInt(cdSize), 40);
    rec.writeBigUInt64LE(BigInt(cdOffset), 48);
    push(rec);
    const loc = Buffer.alloc(20);
    loc.writeUInt32LE(0x07064b50, 0);
    loc.writeBigUInt64LE(BigInt(recOffset), 8);
    loc.writeUInt32LE(1, 16);
    push(loc);
  }
  const comment = Buffer.from(opts.comment ?? '', 'latin1');
  const eocd = Buffer.alloc(22);
  eocd.writeUInt32LE(0x06054b50, 0);
  eocd.writeUInt16LE(opts.zip64 ? 0xffff : n, 8);
  eocd.writeUInt16LE(opts.zip64 ? 0xffff : n, 10);
  eocd.writeUInt32LE(opts.zip64 ? 0xffffffff : cdSize, 12);
  eocd.writeUInt32LE(opts.zip64 ? 0xffffffff : cdOffset, 16);
  eocd.writeUInt16LE(comment.length, 20);
  push(Buffer.concat([eocd, comment]));
  return Buffer.concat(chunks);
}

/** Replaces every occurrence of `from` with `to` (same length) in a copy of `buf`. */
export function patchAll(buf: Uint8Array, from: string, to: string): Uint8Array {
  if (from.length !== to.length) throw new Error('patchAll needs equal lengths');
  const out = Buffer.from(buf);
  const f = Buffer.from(from, 'utf8');
  const t = Buffer.from(to, 'utf8');
  let i = out.indexOf(f);
  while (i >= 0) {
    t.copy(out, i);
    i = out.indexOf(f, i + 1);
  }
  return out;
}

/**
 * Structural equality of unpickled values, cycle-aware: two graphs are equal when they have the
 * same shape, values and sharing pattern. Returns a path to the first difference, or undefined.
 */
export function pyDiff(a: PyValue | undefined, b: PyValue | undefined): string | undefined {
  const pairs = new Map<object, object>();
  const work: [PyValue | undefined, PyValue | undefined, string][] = [[a, b, '$']];
  const fail = (p: string, why: string): string => `${p}: ${why}`;
  while (work.length) {
    const [x, y, p] = work.pop() as [PyValue, PyValue, string];
    if (x === null || y === null || typeof x !== 'object' || typeof y !== 'object') {
      if (typeof x === 'number' && typeof y === 'number' && Number.isNaN(x) && Number.isNaN(y)) continue;
      if (!Object.is(x, y)) return fail(p, `${String(x)} !== ${String(y)}`);
      continue;
    }
    const seen = pairs.get(x);
    if (seen !== undefined) {
      if (seen !== y) return fail(p, 'sharing differs');
      continue;
    }
    pairs.set(x, y);
    if (x.constructor !== y.constructor) return fail(p, `${x.constructor.name} vs ${y.constructor.name}`);
    const kids: [PyValue | undefined, PyValue | undefined, string][] = [];
    if (x instanceof Uint8Array) {
      if (!Buffer.from(x).equals(Buffer.from(y as Uint8Array))) return fail(p, 'bytes differ');
    } else if (Array.isArray(x)) {
      const ya = y as PyValue[];
      if (x.length !== ya.length) return fail(p, `length ${x.length} vs ${ya.length}`);
      x.forEach((v, i) => kids.push([v, ya[i], `${p}[${i}]`]));
    } else if (x instanceof PyTuple) {
      const yt = y as PyTuple;
      if (x.items.length !== yt.items.length || x.tag !== yt.tag) return fail(p, 'tuple length/tag');
      x.items.forEach((v, i) => kids.push([v, yt.items[i], `${p}(${i})`]));
    } else if (x instanceof PyDict) {
      const yd = y as PyDict;
      if (x.ordered !== yd.ordered || x.size !== yd.size) return fail(p, 'dict kind/size');
      const xe = [...x.entries()];
      const ye = [...yd.entries()];
      xe.forEach(([k, v], i) => {
        kids.push([k, ye[i][0], `${p}{key ${i}}`]);
        kids.push([v, ye[i][1], `${p}{${String(k)}}`]);
      });
      kids.push([x.state, yd.state, `${p}.state`]);
    } else if (x instanceof PySet) {
      const ys = y as PySet;
      if (x.frozen !== ys.frozen || x.size !== ys.size) return fail(p, 'set kind/size');
      x.items.forEach((v, i) => kids.push([v, ys.items[i], `${p}<${i}>`]));
    } else if (x instanceof PyObject) {
      const yo = y as PyObject;
      if (x.module !== yo.module || x.name !== yo.name || x.how !== yo.how) return fail(p, `${x.qualname}/${x.how} vs ${yo.qualname}/${yo.how}`);
      kids.push([x.args, yo.args, `${p}.args`], [x.kwargs, yo.kwargs, `${p}.kwargs`], [x.state, yo.state, `${p}.state`], [x.callee, yo.callee, `${p}.callee`]);
      kids.push([x.listItems ?? [], yo.listItems ?? [], `${p}.listItems`]);
      kids.push([(x.dictItems ?? []).map((kv) => new PyTuple(kv)), (yo.dictItems ?? []).map((kv) => new PyTuple(kv)), `${p}.dictItems`]);
    } else if (x instanceof PyGlobal) {
      if (x.qualname !== (y as PyGlobal).qualname) return fail(p, `${x.qualname} vs ${(y as PyGlobal).qualname}`);
    } else if (x instanceof PyFloat) {
      if (!Object.is(x.value, (y as PyFloat).value)) return fail(p, `${x.value} vs ${(y as PyFloat).value}`);
    } else if (x instanceof PySlice) {
      const ys = y as PySlice;
      kids.push([x.start, ys.start, `${p}.start`], [x.stop, ys.stop, `${p}.stop`], [x.step, ys.step, `${p}.step`]);
    } else if (x instanceof PyComplex) {
      if (!Object.is(x.re, (y as PyComplex).re) || !Object.is(x.im, (y as PyComplex).im)) return fail(p, 'complex');
    } else if (x instanceof NumpyDType) {
      const yd = y as NumpyDType;
      if (x.descr !== yd.descr || x.byteorder !== yd.byteorder) return fail(p, 'numpy dtype');
    } else if (x instanceof NumpyScalar) {
      const yn = y as NumpyScalar;
      if (!Buffer.from(x.data).equals(Buffer.from(yn.data)) || x.module !== yn.module) return fail(p, 'numpy scalar differs');
      kids.push([x.dtype, yn.dtype, `${p}.dtype`], [x.value, yn.value, `${p}.value`]);
    } else if (x instanceof NdArray) {
      const yn = y as NdArray;
      if (x.shape.join() !== yn.shape.join() || x.fortran !== yn.fortran) return fail(p, 'ndarray shape');
      kids.push([x.dtype, yn.dtype, `${p}.dtype`], [x.data as PyValue, yn.data as PyValue, `${p}.data`]);
    } else if (x instanceof TorchTensor) {
      const yt = y as TorchTensor;
      if (
        x.shape.join() !== yt.shape.join() || x.stride.join() !== yt.stride.join() || x.storageOffset !== yt.storageOffset ||
        x.requiresGrad !== yt.requiresGrad || x.isParameter !== yt.isParameter
      ) return fail(p, 'tensor view differs');
      kids.push([x.storage, yt.storage, `${p}.storage`], [x.state, yt.state, `${p}.state`]);
    } else if (x instanceof TorchStorage) {
      const ys = y as TorchStorage;
      if (x.dtype !== ys.dtype || x.numel !== ys.numel) return fail(p, 'storage differs');
      const xb = Buffer.from(x.source.read(x.offset, x.byteLength));
      const yb = Buffer.from(ys.source.read(ys.offset, ys.byteLength));
      if (!xb.equals(yb)) return fail(p, 'storage bytes differ');
    } else return fail(p, `cannot compare ${x.constructor.name}`);
    for (let i = kids.length - 1; i >= 0; i--) work.push(kids[i]);
  }
  return undefined;
}
