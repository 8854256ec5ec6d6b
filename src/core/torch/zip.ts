// ZIP archives the way torch.save writes them. The reader validates the central directory against
// the file before anything is allocated and hands out stored entries as (offset, length) views; the
// writer streams stored entries with PyTorch's 64-byte payload alignment, CRC-32 and ZIP64.
import * as zlib from 'node:zlib';
import type { ByteSource } from '../bytes';
import { FormatError, RepFuseError } from '../errors';

// ---------------------------------------------------------------------------------------------
// CRC-32 (IEEE 802.3, reflected polynomial 0xEDB88320): table-driven, slicing by 8, reading the
// aligned middle as 32-bit words (the host is little-endian; dtype.ts checks).

const CRC_TABLES: Int32Array[] = (() => {
  const t0 = new Int32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    t0[n] = c;
  }
  const tables = [t0];
  for (let k = 1; k < 8; k++) {
    const prev = tables[k - 1];
    const t = new Int32Array(256);
    for (let n = 0; n < 256; n++) t[n] = t0[prev[n] & 0xff] ^ (prev[n] >>> 8);
    tables.push(t);
  }
  return tables;
})();

/** Node's native CRC-32 (zlib.crc32, Node ≥ 20.15), when present: same values, ~5× faster. */
const nativeCrc32 = (zlib as unknown as { crc32?: (data: Uint8Array, value?: number) => number }).crc32;

/** CRC-32 of `data`, continuing from `crc` (the CRC of the bytes before it; 0 to start). */
export function crc32(data: Uint8Array, crc = 0): number {
  if (nativeCrc32 && data.length >= 4096) return nativeCrc32(data, crc) >>> 0;
  return crc32Table(data, crc);
}

/** The table-driven CRC-32 (what crc32() uses for small inputs and where zlib has no crc32). */
export function crc32Table(data: Uint8Array, crc = 0): number {
  const [t0, t1, t2, t3, t4, t5, t6, t7] = CRC_TABLES;
  let c = ~crc;
  let i = 0;
  const n = data.length;
  while (i < n && (data.byteOffset + i) & 3) c = t0[(c ^ data[i++]) & 0xff] ^ (c >>> 8);
  const pairs = (n - i) >>> 3;
  if (pairs > 0) {
    const w = new Int32Array(data.buffer, data.byteOffset + i, pairs * 2);
    for (let j = 0; j < w.length; j += 2) {
      c ^= w[j];
      const h = w[j + 1];
      c = t7[c & 0xff] ^ t6[(c >>> 8) & 0xff] ^ t5[(c >>> 16) & 0xff] ^ t4[c >>> 24] ^
        t3[h & 0xff] ^ t2[(h >>> 8) & 0xff] ^ t1[(h >>> 16) & 0xff] ^ t0[h >>> 24];
    }
    i += pairs * 8;
  }
  for (; i < n; i++) c = t0[(c ^ data[i]) & 0xff] ^ (c >>> 8);
  return ~c >>> 0;
}

// ---------------------------------------------------------------------------------------------
// Reader

const SIG_LOCAL = 0x04034b50;
const SIG_CENTRAL = 0x02014b50;
const SIG_EOCD = 0x06054b50;
const SIG_ZIP64_EOCD = 0x06064b50;
const SIG_ZIP64_LOCATOR = 0x07064b50;
const SIG_DESCRIPTOR = 0x08074b50;
const U16_MAX = 0xffff;
const U32_MAX = 0xffffffff;

/** Entries bigger than this are never inflated into memory. */
export const MAX_INFLATE_BYTES = 64 << 20;

export interface ZipEntry {
  name: string;
  /** 0 = stored, 8 = deflate. */
  method: number;
  flags: number;
  crc32: number;
  compressedSize: number;
  /** Uncompressed size. */
  size: number;
  localHeaderOffset: number;
  /** Offset of the entry's (compressed) bytes: local header offset + 30 + name length + extra length. */
  dataOffset: number;
}

/** A range of a source. */
export interface ByteView {
  source: ByteSource;
  offset: number;
  length: number;
}

function dv(b: Uint8Array): DataView {
  return new DataView(b.buffer, b.byteOffset, b.length);
}

function u64(view: DataView, at: number, what: string, file: string): number {
  const v = view.getBigUint64(at, true);
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw new FormatError(`zip ${what} ${v} is out of range (corrupt file?).`, file);
  return Number(v);
}

/** Why an entry name is unsafe or invalid, or undefined when it is fine. */
export function badEntryName(name: string): string | undefined {
  if (name.length === 0) return 'an empty name';
  if (name.includes('\0')) return 'a NUL character';
  if (name.startsWith('/') || name.startsWith('\\') || /^[A-Za-z]:/.test(name)) return 'an absolute path';
  if (name.split(/[/\\]/).some((seg) => seg === '..')) return 'a ".." segment';
  return undefined;
}

/** Whether the source starts like a zip archive (a local header, or the EOCD of an empty archive). */
export function looksLikeZip(src: ByteSource): boolean {
  if (src.size < 22) return false;
  const b = src.read(0, 4);
  const sig = dv(b).getUint32(0, true);
  return sig === SIG_LOCAL || sig === SIG_EOCD;
}

export interface ZipOpenOptions {
  /** Limit on the number of entries (default 1,000,000). */
  maxEntries?: number;
}

/** A zip archive read through a ByteSource. Entries are located but nothing is read until asked. */
export class ZipArchive {
  private readonly byName = new Map<string, ZipEntry>();

  private constructor(
    readonly source: ByteSource,
    readonly entries: readonly ZipEntry[],
    /** Offset of the central directory: every entry's data ends at or before it. */
    readonly centralDirectoryOffset: number,
    readonly zip64: boolean,
  ) {
    for (const e of entries) this.byName.set(e.name, e);
  }

  get(name: string): ZipEntry | undefined {
    return this.byName.get(name);
  }

  static open(src: ByteSource, opts: ZipOpenOptions = {}): ZipArchive {
    const file = src.name;
    const size = src.size;
    if (size < 22) throw new FormatError('not a zip archive: too short.', file);

    // End of central directory: the last signature whose comment fits in the file. Most archives
    // have no comment, so try the last 22 bytes before searching the largest possible tail.
    let tailLen = 22;
    let tailStart = size - tailLen;
    let tail = src.read(tailStart, tailLen);
    let tv = dv(tail);
    let eocd = -1;
    for (let pass = 0; pass < 2 && eocd < 0; pass++) {
      if (pass === 1) {
        tailLen = Math.min(size, 22 + U16_MAX);
        tailStart = size - tailLen;
        tail = src.read(tailStart, tailLen);
        tv = dv(tail);
      }
      for (let i = tailLen - 22; i >= 0; i--) {
        if (tail[i] === 0x50 && tail[i + 1] === 0x4b && tv.getUint32(i, true) === SIG_EOCD && i + 22 + tv.getUint16(i + 20, true) <= tailLen) {
          eocd = i;
          break;
        }
      }
    }
    if (eocd < 0) throw new FormatError('not a zip archive (no end-of-central-directory record; truncated?).', file);
    const eocdOffset = tailStart + eocd;
    const diskNo = tv.getUint16(eocd + 4, true);
    const cdDisk = tv.getUint16(eocd + 6, true);
    let entriesOnDisk = tv.getUint16(eocd + 8, true);
    let total = tv.getUint16(eocd + 10, true);
    let cdSize = tv.getUint32(eocd + 12, true);
    let cdOffset = tv.getUint32(eocd + 16, true);
    let cdLimit = eocdOffset;

    // ZIP64: a locator right before the EOCD points at the ZIP64 end record.
    let zip64 = false;
    if (eocdOffset >= 20) {
      const loc = src.read(eocdOffset - 20, 20);
      const lv = dv(loc);
      if (lv.getUint32(0, true) === SIG_ZIP64_LOCATOR) {
        zip64 = true;
        const recOffset = u64(lv, 8, 'ZIP64 end record offset', file);
        if (lv.getUint32(4, true) !== 0 || lv.getUint32(16, true) > 1) throw new FormatError('multi-disk zip archives are not supported.', file);
        if (recOffset + 56 > eocdOffset - 20) throw new FormatError(`ZIP64 end record offset ${recOffset} is outside the file (corrupt archive).`, file);
        const rec = src.read(recOffset, 56);
        const rv = dv(rec);
        if (rv.getUint32(0, true) !== SIG_ZIP64_EOCD) throw new FormatError(`no ZIP64 end record at offset ${recOffset} (corrupt archive).`, file);
        const recSize = u64(rv, 4, 'ZIP64 end record size', file);
        if (recSize < 44 || recOffset + 12 + recSize > eocdOffset - 20) throw new FormatError(`ZIP64 end record size ${recSize} is invalid.`, file);
        if (rv.getUint32(16, true) !== 0 || rv.getUint32(20, true) !== 0) throw new FormatError('multi-disk zip archives are not supported.', file);
        entriesOnDisk = u64(rv, 24, 'entry count', file);
        total = u64(rv, 32, 'entry count', file);
        cdSize = u64(rv, 40, 'central directory size', file);
        cdOffset = u64(rv, 48, 'central directory offset', file);
        cdLimit = recOffset;
      }
    }
    if (!zip64 && (diskNo !== 0 || cdDisk !== 0)) throw new FormatError('multi-disk zip archives are not supported.', file);
    if (entriesOnDisk !== total) throw new FormatError('multi-disk zip archives are not supported.', file);
    if (cdOffset + cdSize > cdLimit) {
      throw new FormatError(`the zip central directory (${cdSize} bytes at offset ${cdOffset}) runs past its end record at ${cdLimit} (truncated or corrupt archive).`, file);
    }
    const maxEntries = opts.maxEntries ?? 1_000_000;
    if (total * 46 > cdSize || total > maxEntries) {
      throw new FormatError(`the zip archive claims ${total} entries, which cannot fit in its ${cdSize}-byte central directory.`, file);
    }

    const cd = src.readOwned(cdOffset, cdSize);
    const cv = dv(cd);
    const entries: ZipEntry[] = [];
    const names = new Set<string>();
    let p = 0;
    for (let n = 0; n < total; n++) {
      if (p + 46 > cdSize || cv.getUint32(p, true) !== SIG_CENTRAL) throw new FormatError(`zip central directory entry ${n} at offset ${cdOffset + p} is corrupt.`, file);
      const flags = cv.getUint16(p + 8, true);
      const method = cv.getUint16(p + 10, true);
      const crc = cv.getUint32(p + 16, true);
      let compressedSize = cv.getUint32(p + 20, true);
      let uncompressedSize = cv.getUint32(p + 24, true);
      const nameLen = cv.getUint16(p + 28, true);
      const extraLen = cv.getUint16(p + 30, true);
      const commentLen = cv.getUint16(p + 32, true);
      let diskStart = cv.getUint16(p + 34, true);
      let localOffset = cv.getUint32(p + 42, true);
      const next = p + 46 + nameLen + extraLen + commentLen;
      if (next > cdSize) throw new FormatError(`zip central directory entry ${n} runs past the directory.`, file);
      const nameBytes = cd.subarray(p + 46, p + 46 + nameLen);
      const name = Buffer.from(nameBytes).toString(flags & 0x800 ? 'utf8' : 'latin1');
      // ZIP64 extended information: the 64-bit values of the fields that are saturated, in order.
      let e = p + 46 + nameLen;
      const extraEnd = e + extraLen;
      while (e + 4 <= extraEnd) {
        const id = cv.getUint16(e, true);
        const len = cv.getUint16(e + 2, true);
        const body = e + 4;
        if (body + len > extraEnd) throw new FormatError(`zip entry "${name}" has a corrupt extra field.`, file);
        if (id === 0x0001) {
          let q = body;
          const take = (what: string): number => {
            if (q + 8 > body + len) throw new FormatError(`zip entry "${name}" has a short ZIP64 extra field (no ${what}).`, file);
            const v = u64(cv, q, what, file);
            q += 8;
            return v;
          };
          if (uncompressedSize === U32_MAX) uncompressedSize = take('size');
          if (compressedSize === U32_MAX) compressedSize = take('compressed size');
          if (localOffset === U32_MAX) localOffset = take('offset');
          if (diskStart === U16_MAX) {
            if (q + 4 > body + len) throw new FormatError(`zip entry "${name}" has a short ZIP64 extra field.`, file);
            diskStart = cv.getUint32(q, true);
          }
        }
        e = body + len;
      }
      if (diskStart !== 0) throw new FormatError('multi-disk zip archives are not supported.', file);
      const bad = badEntryName(name);
      if (bad) throw new FormatError(`zip entry name ${JSON.stringify(name)} has ${bad}; refusing to read the archive.`, file);
      if (names.has(name)) throw new FormatError(`zip entry name ${JSON.stringify(name)} appears twice.`, file);
      names.add(name);
      if (flags & 0x1) throw new FormatError(`zip entry "${name}" is encrypted.`, file);
      if (localOffset + 30 + nameLen > cdOffset) {
        throw new FormatError(`zip entry "${name}" has its local header at offset ${localOffset}, past the start of the central directory (${cdOffset}).`, file);
      }
      // The local header's name and extra lengths can differ from the central ones: the data starts after them.
      const lh = src.readOwned(localOffset, 30 + nameLen);
      const lv = dv(lh);
      if (lv.getUint32(0, true) !== SIG_LOCAL) throw new FormatError(`zip entry "${name}": no local header at offset ${localOffset}.`, file);
      const lNameLen = lv.getUint16(26, true);
      const lExtraLen = lv.getUint16(28, true);
      if (lNameLen !== nameLen || !Buffer.from(lh.subarray(30)).equals(Buffer.from(nameBytes))) {
        throw new FormatError(`zip entry "${name}": its local header names a different file.`, file);
      }
      const dataOffset = localOffset + 30 + lNameLen + lExtraLen;
      if (dataOffset + compressedSize > cdOffset) {
        throw new FormatError(
          `zip entry "${name}" declares ${compressedSize} bytes at offset ${dataOffset}, past the start of the central directory (${cdOffset}); the sizes are wrong or the file is truncated.`,
          file,
        );
      }
      if (method === 0 && compressedSize !== uncompressedSize) {
        throw new FormatError(`stored zip entry "${name}" declares ${uncompressedSize} bytes but occupies ${compressedSize}.`, file);
      }
      entries.push({ name, method, flags, crc32: crc, compressedSize, size: uncompressedSize, localHeaderOffset: localOffset, dataOffset });
      p = next;
    }

    // Entries must not share bytes: each one's data ends before the next local header starts.
    const byOffset = entries.slice().sort((a, b) => a.localHeaderOffset - b.localHeaderOffset);
    for (let i = 1; i < byOffset.length; i++) {
      const prev = byOffset[i - 1];
      const cur = byOffset[i];
      if (prev.dataOffset + prev.compressedSize > cur.localHeaderOffset) {
        throw new FormatError(`zip entries "${prev.name}" and "${cur.name}" overlap (a malformed or hostile archive).`, file);
      }
    }
    return new ZipArchive(src, entries, cdOffset, zip64);
  }

  /** A stored entry's bytes as a view of the source; nothing is read or copied. */
  view(entry: ZipEntry): ByteView {
    if (entry.method !== 0) {
      throw new FormatError(`zip entry "${entry.name}" is compressed (method ${entry.method}); only stored entries can be read in place.`, this.source.name);
    }
    return { source: this.source, offset: entry.dataOffset, length: entry.size };
  }

  /**
   * The entry's bytes in memory: stored entries are read, deflated ones inflated (at most
   * `maxBytes`, default 64 MB). The CRC-32 is checked.
   */
  read(entry: ZipEntry, maxBytes = MAX_INFLATE_BYTES): Uint8Array {
    const file = this.source.name;
    if (entry.size > maxBytes) {
      throw new FormatError(`zip entry "${entry.name}" is ${entry.size} bytes, over the ${maxBytes}-byte limit for reading it into memory.`, file);
    }
    let out: Uint8Array;
    if (entry.method === 0) {
      out = this.source.readOwned(entry.dataOffset, entry.size);
    } else if (entry.method === 8) {
      const raw = this.source.read(entry.dataOffset, entry.compressedSize);
      try {
        out = zlib.inflateRawSync(raw, { maxOutputLength: Math.max(1, entry.size) });
      } catch (err) {
        const code = (err as NodeJS.ErrnoException).code;
        if (code === 'ERR_BUFFER_TOO_LARGE' || err instanceof RangeError) {
          throw new FormatError(`zip entry "${entry.name}" inflates to more than its declared ${entry.size} bytes.`, file);
        }
        throw new FormatError(`zip entry "${entry.name}" is not valid deflate data (${(err as Error).message}).`, file);
      }
      if (out.length !== entry.size) throw new FormatError(`zip entry "${entry.name}" inflates to ${out.length} bytes, not the declared ${entry.size}.`, file);
    } else {
      throw new FormatError(`zip entry "${entry.name}" uses compression method ${entry.method}; only stored and deflate are supported.`, file);
    }
    const c = crc32(out);
    if (c !== entry.crc32) {
      throw new FormatError(`zip entry "${entry.name}" fails its CRC-32 check (0x${c.toString(16)} vs 0x${entry.crc32.toString(16)}); the file is corrupt.`, file);
    }
    return out;
  }

  /** CRC-32 of a stored entry computed by streaming its bytes (for explicit verification of big entries). */
  verify(entry: ZipEntry): boolean {
    if (entry.method !== 0) return crc32(this.read(entry)) === entry.crc32;
    let c = 0;
    const step = 1 << 22;
    for (let done = 0; done < entry.size; done += step) {
      c = crc32(this.source.read(entry.dataOffset + done, Math.min(step, entry.size - done)), c);
    }
    return c === entry.crc32;
  }
}

// ---------------------------------------------------------------------------------------------
// Writer

/** Receives the archive's bytes in order. Chunks may be reused after the call returns. */
export type ZipSink = (chunk: Uint8Array) => void;

export interface ZipWriterOptions {
  /** Payload alignment (PyTorch uses 64). 0 or 1: none. */
  align?: number;
  /** 'always' writes ZIP64 fields for every entry (for tests); 'auto' only where sizes or offsets need them. */
  zip64?: 'auto' | 'always';
}

interface WrittenEntry {
  name: Uint8Array;
  crc: number;
  size: number;
  offset: number;
}

/**
 * Writes a stored (uncompressed) zip archive as a stream, the way PyTorch's writer lays it out:
 * each local header carries an 'FB' extra field of 'Z' padding so the payload starts on a 64-byte
 * boundary, sizes and CRC follow the payload in a data descriptor (so payloads can be produced
 * lazily), and the end of the archive has a ZIP64 end record and locator.
 */
export class ZipWriter {
  private pos = 0;
  private readonly written: WrittenEntry[] = [];
  private readonly names = new Set<string>();
  private finished = false;
  private readonly align: number;

  constructor(
    private readonly sink: ZipSink,
    private readonly opts: ZipWriterOptions = {},
  ) {
    this.align = opts.align ?? 64;
  }

  /** Bytes written so far. */
  get offset(): number {
    return this.pos;
  }

  private out(b: Uint8Array): void {
    this.sink(b);
    this.pos += b.length;
  }

  /**
   * Adds a stored entry of exactly `size` bytes; `produce` emits them in chunks (it may be async).
   * The CRC-32 is computed while the bytes stream past.
   */
  async add(name: string, size: number, produce: (emit: (chunk: Uint8Array) => void) => void | Promise<void>): Promise<void> {
    if (this.finished) throw new RepFuseError('zip writer: the archive is already finished.');
    const bad = badEntryName(name);
    if (bad) throw new RepFuseError(`zip writer: entry name ${JSON.stringify(name)} has ${bad}.`);
    if (this.names.has(name)) throw new RepFuseError(`zip writer: duplicate entry name ${JSON.stringify(name)}.`);
    if (!Number.isSafeInteger(size) || size < 0) throw new RepFuseError(`zip writer: invalid size ${size} for ${name}.`);
    this.names.add(name);
    const nameBytes = Buffer.from(name, 'utf8');
    if (nameBytes.length > U16_MAX) throw new RepFuseError(`zip writer: entry name too long (${nameBytes.length} bytes).`);
    const offset = this.pos;
    const always = this.opts.zip64 === 'always';
    const bigSize = always || size >= U32_MAX;
    const bigOffset = always || offset >= U32_MAX;
    // ZIP64 extra in the local header, as miniz writes it: sizes if the size needs it, offset if the offset does.
    const z64Len = bigSize || bigOffset ? 4 + (bigSize ? 16 : 0) + (bigOffset ? 8 : 0) : 0;
    // PyTorch's getPadding(): the 'FB' field's own 4-byte header is always present.
    const start = offset + 30 + nameBytes.length + z64Len + 4;
    const pad = this.align > 1 ? (this.align - (start % this.align)) % this.align : 0;
    const extraLen = z64Len + 4 + pad;
    const head = new Uint8Array(30 + nameBytes.length + extraLen);
    const hv = dv(head);
    hv.setUint32(0, SIG_LOCAL, true);
    hv.setUint16(4, z64Len ? 45 : 20, true); // version needed
    hv.setUint16(6, 0x0808, true); // bit 3: sizes in the data descriptor; bit 11: UTF-8 name
    hv.setUint16(8, 0, true); // stored
    hv.setUint16(10, 0, true); // time
    hv.setUint16(12, 0x21, true); // date: 1980-01-01
    // crc and sizes (14..25) are zero: they follow the data.
    hv.setUint16(26, nameBytes.length, true);
    hv.setUint16(28, extraLen, true);
    head.set(nameBytes, 30);
    let x = 30 + nameBytes.length;
    if (z64Len) {
      hv.setUint16(x, 0x0001, true);
      hv.setUint16(x + 2, z64Len - 4, true);
      x += 4;
      if (bigSize) {
        hv.setBigUint64(x, BigInt(size), true);
        hv.setBigUint64(x + 8, BigInt(size), true);
        x += 16;
      }
      if (bigOffset) {
        hv.setBigUint64(x, BigInt(offset), true);
        x += 8;
      }
    }
    head[x] = 0x46; // 'F'
    head[x + 1] = 0x42; // 'B'
    hv.setUint16(x + 2, pad, true);
    head.fill(0x5a, x + 4, x + 4 + pad); // 'Z'
    this.out(head);

    let crc = 0;
    let count = 0;
    await produce((chunk) => {
      if (count + chunk.length > size) throw new RepFuseError(`zip writer: entry ${name} produced more than its declared ${size} bytes.`);
      crc = crc32(chunk, crc);
      count += chunk.length;
      this.out(chunk);
    });
    if (count !== size) throw new RepFuseError(`zip writer: entry ${name} produced ${count} bytes; ${size} declared.`);

    const desc = new Uint8Array(z64Len ? 24 : 16);
    const dd = dv(desc);
    dd.setUint32(0, SIG_DESCRIPTOR, true);
    dd.setUint32(4, crc, true);
    if (z64Len) {
      dd.setBigUint64(8, BigInt(size), true);
      dd.setBigUint64(16, BigInt(size), true);
    } else {
      dd.setUint32(8, size, true);
      dd.setUint32(12, size, true);
    }
    this.out(desc);
    this.written.push({ name: nameBytes, crc, size, offset });
  }

  /** Adds an entry whose bytes are already in memory. */
  addBytes(name: string, bytes: Uint8Array): Promise<void> {
    return this.add(name, bytes.length, (emit) => emit(bytes));
  }

  /** Writes the central directory and the end records. */
  finish(): void {
    if (this.finished) return;
    this.finished = true;
    const always = this.opts.zip64 === 'always';
    const cdOffset = this.pos;
    for (const e of this.written) {
      const bigSize = always || e.size >= U32_MAX;
      const bigOffset = always || e.offset >= U32_MAX;
      const z64Len = bigSize || bigOffset ? 4 + (bigSize ? 16 : 0) + (bigOffset ? 8 : 0) : 0;
      const rec = new Uint8Array(46 + e.name.length + z64Len);
      const rv = dv(rec);
      rv.setUint32(0, SIG_CENTRAL, true);
      rv.setUint16(4, 45, true); // version made by
      rv.setUint16(6, z64Len ? 45 : 20, true); // version needed
      rv.setUint16(8, 0x0808, true);
      rv.setUint16(10, 0, true);
      rv.setUint16(12, 0, true);
      rv.setUint16(14, 0x21, true);
      rv.setUint32(16, e.crc, true);
      rv.setUint32(20, bigSize ? U32_MAX : e.size, true);
      rv.setUint32(24, bigSize ? U32_MAX : e.size, true);
      rv.setUint16(28, e.name.length, true);
      rv.setUint16(30, z64Len, true);
      // comment length, disk, internal and external attributes: 0
      rv.setUint32(42, bigOffset ? U32_MAX : e.offset, true);
      rec.set(e.name, 46);
      let x = 46 + e.name.length;
      if (z64Len) {
        rv.setUint16(x, 0x0001, true);
        rv.setUint16(x + 2, z64Len - 4, true);
        x += 4;
        if (bigSize) {
          rv.setBigUint64(x, BigInt(e.size), true);
          rv.setBigUint64(x + 8, BigInt(e.size), true);
          x += 16;
        }
        if (bigOffset) rv.setBigUint64(x, BigInt(e.offset), true);
      }
      this.out(rec);
    }
    const cdSize = this.pos - cdOffset;
    const n = this.written.length;
    // ZIP64 end record and locator (PyTorch always writes them), then the classic end record.
    const z64Offset = this.pos;
    const end = new Uint8Array(56 + 20 + 22);
    const ev = dv(end);
    ev.setUint32(0, SIG_ZIP64_EOCD, true);
    ev.setBigUint64(4, 44n, true);
    ev.setUint16(12, 45, true);
    ev.setUint16(14, 45, true);
    ev.setBigUint64(24, BigInt(n), true);
    ev.setBigUint64(32, BigInt(n), true);
    ev.setBigUint64(40, BigInt(cdSize), true);
    ev.setBigUint64(48, BigInt(cdOffset), true);
    ev.setUint32(56, SIG_ZIP64_LOCATOR, true);
    ev.setBigUint64(64, BigInt(z64Offset), true);
    ev.setUint32(72, 1, true);
    ev.setUint32(76, SIG_EOCD, true);
    ev.setUint16(84, Math.min(n, U16_MAX), true);
    ev.setUint16(86, Math.min(n, U16_MAX), true);
    ev.setUint32(88, Math.min(cdSize, U32_MAX), true);
    ev.setUint32(92, always ? U32_MAX : Math.min(cdOffset, U32_MAX), true);
    this.out(end);
  }
}
