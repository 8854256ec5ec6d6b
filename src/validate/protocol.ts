// Messages between the host (CLI or extension) and the validation child process.
import type { InputSpec } from '../core/onnx/inputs';
import type { ValidationReport } from '../core/report';

export type { BlockDiff, TensorDiff, ValidationReport } from '../core/report';

export interface ValidateRequest {
  type: 'validate';
  original: string;
  fused: string;
  /** Block output tensors to compare as well (exposed as extra graph outputs in both models). */
  blocks: { name: string; output: string; elemType: number }[];
  inputs: InputSpec[];
  seed: number;
  atol: number;
  rtol: number;
  /** Threads for onnxruntime's intra-op pool (0 = its default). */
  threads: number;
}

export type WorkerMessage =
  | { type: 'progress'; message: string }
  | { type: 'result'; report: ValidationReport }
  | { type: 'error'; message: string };
