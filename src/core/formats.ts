// The one registry of model file formats: which extensions each format owns, how its bytes are
// recognised, which outputs it can write and how a fuse of it is validated. The engine, the CLI,
// the extension (editor selectors, menus, file dialogs) and the tests all read this list, so a
// format is added here once (plus its reader) and every layer agrees on it.
import * as path from 'node:path';
import type { ByteSource } from './bytes';
import { RepFuseError } from './errors';
import { looksLikeSafetensors } from './safetensors';

export type FormatId = 'onnx' | 'pytorch' | 'safetensors';

/** Which engine path opens the format. */
export type ModelKind = 'onnx' | 'checkpoint';

export interface FormatDef {
  id: FormatId;
  label: string;
  kind: ModelKind;
  /** Extensions this format's reader accepts (lower case, with the dot). */
  extensions: readonly string[];
  /** Extensions a fused output of this format may be written as. */
  writes: readonly string[];
  /** Cheap content sniff on the first bytes: true when the bytes look like this format. */
  match(head: Uint8Array, size: number): boolean;
  /** How `repfuse fuse` proves the fused output of this format, in one sentence (report and README). */
  validation: string;
}

const startsWith = (b: Uint8Array, sig: number[], at = 0) => b.length >= at + sig.length && sig.every((x, i) => b[at + i] === x);

export const FORMATS: readonly FormatDef[] = [
  {
    id: 'onnx',
    label: 'ONNX model',
    kind: 'onnx',
    extensions: ['.onnx'],
    writes: ['.onnx'],
    // ModelProto starts with a small field: ir_version (tag 0x08) in every exporter we know of; a
    // producer that reorders fields still opens by extension.
    match: (b) => b.length > 1 && b[0] === 0x08 && b[1] > 0 && b[1] < 0x20,
    validation: 'the original and the fused model run whole in onnxruntime (a child process) on the same inputs; every graph output and every fused block output is compared',
  },
  {
    id: 'pytorch',
    label: 'PyTorch checkpoint',
    kind: 'checkpoint',
    // .bin: Hugging Face's pytorch_model.bin; .pkl / .tar: torch.save's legacy formats.
    extensions: ['.pt', '.pth', '.ckpt', '.bin', '.pkl', '.tar'],
    writes: ['.pt', '.pth', '.ckpt', '.bin', '.safetensors'],
    // torch.save's zip ('PK\x03\x04'), its legacy pickle stream (PROTO 2..5) or its legacy tar.
    match: (b) => startsWith(b, [0x50, 0x4b, 0x03, 0x04]) || (b[0] === 0x80 && b[1] >= 2 && b[1] <= 5) || startsWith(b, [0x75, 0x73, 0x74, 0x61, 0x72], 257),
    validation: 'block by block: each fused block, as written, runs in onnxruntime against its branches as RepFuse read them (whole-model end-to-end checks need the opt-in Python validation)',
  },
  {
    id: 'safetensors',
    label: 'safetensors file',
    kind: 'checkpoint',
    extensions: ['.safetensors'],
    writes: ['.safetensors', '.pt', '.pth', '.ckpt', '.bin'],
    match: (b, size) => {
      if (b.length < 9) return false;
      const n = new DataView(b.buffer, b.byteOffset, 8).getBigUint64(0, true);
      return n >= 2n && n <= BigInt(size - 8) && b[8] === 0x7b;
    },
    validation: 'block by block, as for PyTorch checkpoints',
  },
];

/** Every extension some format reads, in registry order, without duplicates. */
export const MODEL_EXTENSIONS: readonly string[] = [...new Set(FORMATS.flatMap((f) => f.extensions))];

export const extOf = (file: string): string => path.extname(file).toLowerCase();

/** The format that owns a file's extension, or undefined. */
export function formatByExtension(file: string): FormatDef | undefined {
  const ext = extOf(file);
  return FORMATS.find((f) => f.extensions.includes(ext));
}

export function isModelPath(file: string): boolean {
  return formatByExtension(file) !== undefined;
}

export function isCheckpointPath(file: string): boolean {
  return formatByExtension(file)?.kind === 'checkpoint';
}

/** One-line list of what RepFuse reads, for error messages and help. */
export function describeFormats(): string {
  return FORMATS.map((f) => `${f.label}s (${f.extensions.join(', ')})`).join(', ');
}

/** The engine path for a file, by extension; a one-line error for anything else. */
export function modelKind(file: string): ModelKind {
  const f = formatByExtension(file);
  if (!f) throw new RepFuseError(`unsupported file type '${extOf(file) || '(none)'}'; RepFuse reads ${describeFormats()}.`, file);
  return f.kind;
}

/**
 * The format the bytes say, when they say one: a safetensors file named .pt still opens as
 * safetensors. Falls back to the extension's format.
 */
export function sniffFormat(src: ByteSource, file = src.name): FormatDef | undefined {
  const head = src.read(0, Math.min(src.size, 512));
  // safetensors first: its header length is a stricter test than the one-byte ONNX tag.
  if (looksLikeSafetensors(src)) return FORMATS.find((f) => f.id === 'safetensors');
  const byExt = formatByExtension(file);
  if (byExt?.match(head, src.size)) return byExt;
  return FORMATS.find((f) => f.match(head, src.size)) ?? byExt;
}

/** Checks that an output path can hold a fused model of `input`'s format; one-line error otherwise. */
export function checkOutputExtension(input: string, output: string): void {
  const f = formatByExtension(input);
  if (!f) return;
  const ext = extOf(output);
  if (!f.writes.includes(ext)) throw new RepFuseError(`cannot write '${ext || '(no extension)'}': a fused ${f.label} is written as ${f.writes.join(', ')}.`, output);
}
