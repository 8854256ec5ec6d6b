// What the fuzzer runs on each input: the reader, and on what parses, what RepFuse does next
// (ONNX: detection + planning, and for some cases writing to memory and re-opening the result;
// checkpoints: analyzeCheckpoint → detection, and for some cases statistics, writing, re-opening).
import * as fs from 'node:fs';
import * as path from 'node:path';
import { BufferSource } from '../../src/core/bytes';
import { analyzeCheckpoint, checkpointBlockData, writeCheckpoint } from '../../src/core/checkpoint';
import { FormatError, oneLineError, RepFuseError } from '../../src/core/errors';
import { readNpy } from '../../src/core/npy';
import { analyzeOnnx, onnxBlockData, openOnnx } from '../../src/core/onnx';
import { encodeOnnx } from '../../src/core/onnx/writer';
import { readSafetensors } from '../../src/core/safetensors';
import { blockStats } from '../../src/core/stats';
import type { Reader } from './corpus';

export type OutcomeKind = 'ok' | 'format' | 'repfuse' | 'other' | 'multiline' | 'roundtrip';

export interface Outcome {
  kind: OutcomeKind;
  /** Where it ended: parse, analyze, write, reopen, stats. */
  stage: string;
  message?: string;
  /** Length of the whole one-line message. */
  messageLength?: number;
  stack?: string;
}

export interface CaseContext {
  /** A folder of the worker's own, emptied after each case. */
  dir: string;
  /** Also write (to memory or the folder), re-open and compute statistics. */
  deep: boolean;
  foldBN: boolean;
}

/** A one-line message: no line breaks, no terminal control characters. */
export function isOneLine(s: string): boolean {
  // eslint-disable-next-line no-control-regex
  return !/[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]/.test(s);
}

function classify(err: unknown, stage: string): Outcome {
  if (err instanceof RepFuseError) {
    const line = oneLineError(err);
    if (!isOneLine(line)) return { kind: 'multiline', stage, message: JSON.stringify(line).slice(0, 300) };
    return { kind: err instanceof FormatError ? 'format' : 'repfuse', stage, message: line.slice(0, 300), messageLength: line.length };
  }
  const e = err as Error;
  return { kind: 'other', stage, message: `${e?.name ?? typeof err}: ${String(e?.message ?? err).slice(0, 300)}`, stack: e?.stack?.split('\n').slice(0, 12).join('\n') };
}

class StageError {
  constructor(
    readonly stage: string,
    readonly err: unknown,
  ) {}
}

async function stage<T>(name: string, fn: () => T | Promise<T>): Promise<T> {
  try {
    return await fn();
  } catch (err) {
    throw new StageError(name, err);
  }
}

async function onnxCase(bytes: Uint8Array, ctx: CaseContext): Promise<string> {
  const model = await stage('parse', () => openOnnx(new BufferSource(bytes, path.join(ctx.dir, 'case.onnx'))));
  try {
    const a = await stage('analyze', () => analyzeOnnx(model, { foldBN: ctx.foldBN }));
    if (!ctx.deep) return 'analyze';
    if (a.detection.blocks.length) await stage('stats', () => blockStats(onnxBlockData(a, a.detection.blocks[0].info.name)));
    const out = await stage('write', () => encodeOnnx(model, a.rewrite.plan));
    try {
      const again = openOnnx(new BufferSource(out, path.join(ctx.dir, 'case.fused.onnx')));
      analyzeOnnx(again, { foldBN: ctx.foldBN });
      again.close();
    } catch (err) {
      throw new StageError('reopen', err);
    }
    return 'reopen';
  } finally {
    model.close();
  }
}

async function checkpointCase(file: string, ctx: CaseContext): Promise<string> {
  const a = await stage('analyze', () => analyzeCheckpoint(file));
  try {
    if (!ctx.deep) return 'analyze';
    const blocks = a.primary.detection.blocks;
    if (!blocks.length) return 'analyze';
    await stage('stats', () => blockStats(checkpointBlockData(a, blocks[0].info.name)));
    const keep = a.modules.length > 0 && a.torch !== undefined;
    const out = path.join(ctx.dir, keep ? 'out.pt' : 'out.safetensors');
    await stage('write', () => writeCheckpoint(a, out, { keepModules: keep }));
    try {
      analyzeCheckpoint(out).close();
    } catch (err) {
      throw new StageError('reopen', err);
    }
    return 'reopen';
  } finally {
    a.close();
  }
}

async function runCase(reader: Reader, bytes: Uint8Array, ctx: CaseContext): Promise<string> {
  switch (reader) {
    case 'onnx':
      return onnxCase(bytes, ctx);
    case 'zip':
    case 'pickle':
    case 'legacy': {
      const file = path.join(ctx.dir, 'case.pt');
      fs.writeFileSync(file, bytes);
      return checkpointCase(file, ctx);
    }
    case 'safetensors': {
      const st = await stage('parse', () => readSafetensors(new BufferSource(bytes, path.join(ctx.dir, 'case.safetensors'))));
      st.close();
      const file = path.join(ctx.dir, 'case.safetensors');
      fs.writeFileSync(file, bytes);
      return checkpointCase(file, ctx);
    }
    case 'npy': {
      const arr = await stage('parse', () => readNpy(new BufferSource(bytes, path.join(ctx.dir, 'case.npy'))));
      await stage('analyze', () => arr.values());
      return 'analyze';
    }
  }
}

/** Runs one input; never throws. */
export async function runTarget(reader: Reader, bytes: Uint8Array, ctx: CaseContext): Promise<Outcome> {
  try {
    const stageReached = await runCase(reader, bytes, ctx);
    return { kind: 'ok', stage: stageReached };
  } catch (err) {
    if (err instanceof StageError) {
      const o = classify(err.err, err.stage);
      // What RepFuse wrote from an input it accepted must read back.
      if (err.stage === 'reopen') return { ...o, kind: 'roundtrip' };
      return o;
    }
    return classify(err, 'harness');
  } finally {
    for (const f of fs.readdirSync(ctx.dir)) fs.rmSync(path.join(ctx.dir, f), { force: true, recursive: true });
  }
}
