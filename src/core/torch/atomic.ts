// Atomic file output for the torch and safetensors writers: bytes stream into a temp file in the
// target's folder (buffered, fsynced), which is renamed over the target only when complete.
// Same pattern as the ONNX writer, and the temp files join its `pendingTempFiles` so an
// interrupted CLI removes them.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { RepFuseError } from '../errors';
import { pendingTempFiles } from '../onnx/writer';

export { pendingTempFiles };

/** Buffers small writes into 1 MiB blocks. */
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
 * Writes `target` atomically: `write` streams the content to `sink`; on success the temp file is
 * fsynced and renamed over the target, on failure it is removed. Returns the byte count.
 */
export async function writeAtomically(
  target: string,
  write: (sink: (chunk: Uint8Array) => void) => Promise<void>,
  signal?: AbortSignal,
): Promise<number> {
  const tmp = tempName(target);
  pendingTempFiles.add(tmp);
  let fd: number;
  try {
    fd = fs.openSync(tmp, 'wx', 0o644);
  } catch (err) {
    pendingTempFiles.delete(tmp);
    throw new RepFuseError(`cannot write: ${(err as NodeJS.ErrnoException).code ?? String(err)}.`, target);
  }
  let ok = false;
  try {
    const sink = new FileSink(fd);
    await write((c) => sink.write(c));
    sink.flush();
    fs.fsyncSync(fd);
    fs.closeSync(fd);
    fd = -1;
    if (signal?.aborted) throw signal.reason ?? new RepFuseError('cancelled.');
    fs.renameSync(tmp, target);
    ok = true;
    return sink.written;
  } finally {
    if (fd >= 0) fs.closeSync(fd);
    if (!ok) fs.rmSync(tmp, { force: true });
    pendingTempFiles.delete(tmp);
  }
}
