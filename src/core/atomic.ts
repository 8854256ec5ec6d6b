// Atomic file output shared by every writer (ONNX, torch zip, safetensors): bytes stream into a
// temp file in the target's folder (buffered, fsynced), renamed over the target only when complete.
// Temp files are registered so an interrupted CLI or extension can remove them.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { RepFuseError } from './errors';

/** Temp files being written right now, so an interrupted process can remove them. */
export const pendingTempFiles = new Set<string>();

/** Buffers small writes into 1 MiB blocks; passes big chunks straight through. */
export class FileSink {
  private buf = new Uint8Array(1 << 20);
  private used = 0;
  written = 0;
  constructor(private readonly fd: number) {}
  write(chunk: Uint8Array): void {
    if (chunk.length >= this.buf.length) {
      this.flush();
      this.writeAll(chunk);
      return;
    }
    if (this.used + chunk.length > this.buf.length) this.flush();
    this.buf.set(chunk, this.used);
    this.used += chunk.length;
  }
  flush(): void {
    if (this.used) this.writeAll(this.buf.subarray(0, this.used));
    this.used = 0;
  }
  private writeAll(b: Uint8Array): void {
    let off = 0;
    while (off < b.length) off += fs.writeSync(this.fd, b, off, b.length - off);
    this.written += b.length;
  }
}

function tempName(target: string): string {
  const rnd = Math.random().toString(36).slice(2, 10);
  return path.join(path.dirname(target), `.${path.basename(target)}.${process.pid}.${rnd}.tmp`);
}

/** Resolves after giving the event loop a turn (so SIGINT / Cancel can be noticed), or throws if aborted. */
export async function checkpoint(signal?: AbortSignal): Promise<void> {
  if (signal?.aborted) throw signal.reason ?? new RepFuseError('cancelled.');
  await new Promise((r) => setImmediate(r));
  if (signal?.aborted) throw signal.reason ?? new RepFuseError('cancelled.');
}

/**
 * Streams content into a fsynced temp file beside `target` and returns its path, still registered
 * in pendingTempFiles: the caller renames it (commitTemp) or removes it (discardTemp). On failure
 * the temp file is already gone.
 */
export async function writeTemp(target: string, write: (sink: (chunk: Uint8Array) => void) => Promise<void>): Promise<{ tmp: string; bytes: number }> {
  const tmp = tempName(target);
  pendingTempFiles.add(tmp);
  let fd: number;
  try {
    fd = fs.openSync(tmp, 'wx', 0o644);
  } catch (err) {
    pendingTempFiles.delete(tmp);
    throw new RepFuseError(`cannot write: ${(err as NodeJS.ErrnoException).code ?? String(err)}.`, target);
  }
  try {
    const sink = new FileSink(fd);
    await write((c) => sink.write(c));
    sink.flush();
    fs.fsyncSync(fd);
    fs.closeSync(fd);
    return { tmp, bytes: sink.written };
  } catch (err) {
    fs.closeSync(fd);
    discardTemp(tmp);
    throw err;
  }
}

export function commitTemp(tmp: string, target: string): void {
  fs.renameSync(tmp, target);
  pendingTempFiles.delete(tmp);
}

export function discardTemp(tmp: string): void {
  fs.rmSync(tmp, { force: true });
  pendingTempFiles.delete(tmp);
}

/** Writes `target` atomically (temp file, fsync, rename). Returns the byte count. */
export async function writeAtomically(
  target: string,
  write: (sink: (chunk: Uint8Array) => void) => Promise<void>,
  signal?: AbortSignal,
): Promise<number> {
  const { tmp, bytes } = await writeTemp(target, write);
  try {
    if (signal?.aborted) throw signal.reason ?? new RepFuseError('cancelled.');
    commitTemp(tmp, target);
    return bytes;
  } finally {
    discardTemp(tmp); // no-op once renamed
  }
}
