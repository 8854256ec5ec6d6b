// Byte sources: random-access reads from a file or a buffer, so readers never need the whole file in memory.
import * as fs from 'node:fs';
import { FormatError } from './errors';

/** Random-access, read-only bytes. `read` returns exactly `length` bytes or throws a FormatError. */
export interface ByteSource {
  /** Path (or label) used in error messages. */
  readonly name: string;
  readonly size: number;
  /**
   * Reads `length` bytes at `offset`. The result may be a view shared with the source's cache:
   * callers must not write to it.
   */
  read(offset: number, length: number): Uint8Array;
  /** Reads into a fresh, 8-byte-aligned buffer the caller owns (safe to view as a typed array). */
  readOwned(offset: number, length: number): Uint8Array;
  /** Fills `target` with the bytes at `offset` (lets hot loops reuse one buffer). */
  readInto?(target: Uint8Array, offset: number): void;
  close(): void;
}

function checkRange(src: ByteSource, offset: number, length: number): void {
  if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0) {
    throw new FormatError(`invalid read of ${length} bytes at offset ${offset}.`, src.name);
  }
  if (offset + length > src.size) {
    throw new FormatError(
      `unexpected end of file: needed ${length} bytes at offset ${offset}, but the file has ${src.size} bytes (truncated?).`,
      src.name,
    );
  }
}

export class BufferSource implements ByteSource {
  readonly size: number;
  readonly bytes: Uint8Array;
  constructor(
    bytes: Uint8Array,
    readonly name = '<buffer>',
  ) {
    // A plain view even of a Buffer: readers copy with slice(), which on a Buffer would not copy.
    this.bytes = new Uint8Array(bytes.buffer, bytes.byteOffset, bytes.length);
    this.size = bytes.length;
  }
  read(offset: number, length: number): Uint8Array {
    checkRange(this, offset, length);
    return this.bytes.subarray(offset, offset + length);
  }
  readOwned(offset: number, length: number): Uint8Array {
    checkRange(this, offset, length);
    const out = new Uint8Array(length);
    out.set(this.bytes.subarray(offset, offset + length));
    return out;
  }
  readInto(target: Uint8Array, offset: number): void {
    checkRange(this, offset, target.length);
    target.set(this.bytes.subarray(offset, offset + target.length));
  }
  close(): void {
    /* nothing to release */
  }
}

const WINDOW = 1 << 16;

/** Reads a file through a file descriptor; small reads are served from a 64 KiB window. */
export class FileSource implements ByteSource {
  readonly size: number;
  private fd: number;
  private window = new Uint8Array(0);
  private windowStart = 0;

  constructor(readonly name: string) {
    let st: fs.Stats;
    try {
      st = fs.statSync(name);
    } catch (err) {
      throw new FormatError(`cannot open: ${(err as NodeJS.ErrnoException).code ?? String(err)}.`, name);
    }
    if (!st.isFile()) throw new FormatError('not a regular file.', name);
    this.fd = fs.openSync(name, 'r');
    this.size = st.size;
  }

  read(offset: number, length: number): Uint8Array {
    checkRange(this, offset, length);
    if (length > WINDOW / 4) return this.readOwned(offset, length);
    const ws = this.windowStart;
    if (offset >= ws && offset + length <= ws + this.window.length) {
      return this.window.subarray(offset - ws, offset - ws + length);
    }
    // A new window each time, so views handed out earlier stay valid.
    const n = Math.min(WINDOW, this.size - offset);
    const w = new Uint8Array(n);
    this.fill(w, offset);
    this.window = w;
    this.windowStart = offset;
    return w.subarray(0, length);
  }

  readOwned(offset: number, length: number): Uint8Array {
    checkRange(this, offset, length);
    const out = new Uint8Array(length);
    this.fill(out, offset);
    return out;
  }

  readInto(target: Uint8Array, offset: number): void {
    checkRange(this, offset, target.length);
    this.fill(target, offset);
  }

  private pipeBuf?: Uint8Array;

  /**
   * Streams `length` bytes at `offset` to `sink` in chunks, without holding them all. The chunk
   * buffer is reused: sinks must consume (copy or write) each chunk before returning.
   */
  pipe(offset: number, length: number, sink: (chunk: Uint8Array) => void, chunk = 1 << 22): void {
    checkRange(this, offset, length);
    const buf = (this.pipeBuf ??= new Uint8Array(chunk));
    let done = 0;
    while (done < length) {
      const n = Math.min(buf.length, length - done);
      this.fill(buf.subarray(0, n), offset + done);
      sink(buf.subarray(0, n));
      done += n;
    }
  }

  private fill(target: Uint8Array, offset: number): void {
    let got = 0;
    while (got < target.length) {
      const n = fs.readSync(this.fd, target, got, target.length - got, offset + got);
      if (n <= 0) throw new FormatError(`unexpected end of file at offset ${offset + got} (the file shrank while being read?).`, this.name);
      got += n;
    }
  }

  close(): void {
    if (this.fd >= 0) {
      fs.closeSync(this.fd);
      this.fd = -1;
    }
  }
}

/** Fills `target` from `src` at `offset`, without allocating when the source can. */
export function readInto(src: ByteSource, target: Uint8Array, offset: number): void {
  if (src.readInto) src.readInto(target, offset);
  else target.set(src.read(offset, target.length));
}

/** Streams a range of any source to a sink in bounded chunks. */
export function pipeRange(src: ByteSource, offset: number, length: number, sink: (chunk: Uint8Array) => void): void {
  if (src instanceof FileSource) return src.pipe(offset, length, sink);
  const step = 1 << 22;
  for (let done = 0; done < length; done += step) sink(src.read(offset + done, Math.min(step, length - done)));
}

/** A byte buffer that grows by doubling: the base of the protobuf and pickle encoders. */
export class GrowableBytes {
  protected buf: Uint8Array;
  protected len = 0;
  constructor(initial = 256) {
    this.buf = new Uint8Array(initial);
  }

  protected ensure(n: number): void {
    if (this.len + n <= this.buf.length) return;
    let cap = this.buf.length * 2;
    while (cap < this.len + n) cap *= 2;
    const next = new Uint8Array(cap);
    next.set(this.buf.subarray(0, this.len));
    this.buf = next;
  }

  get length(): number {
    return this.len;
  }

  /** A copy of the bytes written so far. */
  finish(): Uint8Array {
    return this.buf.slice(0, this.len);
  }
}
