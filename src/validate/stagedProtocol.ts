// Messages of the staged validation session and of latency measurement in the onnxruntime child.
// A staged session overlaps validation with fusing: the host forks the child before it analyzes
// the model, sends `validate-begin` as soon as the blocks are known (the child then loads and runs
// the original while the host writes the fused model), and `validate-fused` once the output is
// on disk; the child answers with one `result` (and a `latency` message before it when asked).
import * as path from 'node:path';
import type { InputSpec } from '../core/onnx/inputs';

/**
 * The hidden header model the child writes beside `file` for a moment (see staged.ts); named by the
 * child's pid, so the host can remove one left behind by a child that was killed.
 */
export function validationHeaderName(file: string, pid: number): string {
  return `.${path.basename(file)}.${pid}.validate.onnx`;
}

/** Median latency of each model (onnxruntime's default optimizations, after one warm-up run). */
export interface LatencyResult {
  /** Median milliseconds per run of the original model (or of the unfused blocks, summed). */
  before: number;
  /** The same for the fused model (or the fused blocks). */
  after: number;
  runs: number;
  /** intra-op threads both sessions used (0 = onnxruntime's default). */
  threads: number;
  /** 'model': the whole networks; 'blocks': a checkpoint's one-block models, medians summed over blocks. */
  scope: 'model' | 'blocks';
}

export interface ValidateBeginRequest {
  type: 'validate-begin';
  original: string;
  /** The original's graph outputs (the host has parsed it already). */
  outputs: string[];
  /** Block output tensors compared as well (appended to both models as extra graph outputs). */
  blocks: { name: string; output: string; elemType: number }[];
  inputs: InputSpec[];
  seed: number;
  /** Threads for onnxruntime's intra-op pool (0 = its default). */
  threads: number;
  /** Latency runs per model after validation (0 = do not measure). */
  latencyRuns: number;
}

export interface ValidateFusedMessage {
  type: 'validate-fused';
  fused: string;
  atol: number;
  rtol: number;
}

/** Latency of two models on their own, after a fuse (the report's "Measure speed-up"). */
export interface LatencyRequest {
  type: 'latency';
  original: string;
  fused: string;
  /** Shapes for dynamic input dimensions, by input name (the child resolves the inputs). */
  inputShapes: Record<string, number[]>;
  seed: number;
  runs: number;
  threads: number;
}

export type StagedMessage = ValidateFusedMessage;
