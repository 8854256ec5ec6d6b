// Messages between the host (CLI or extension) and the validation child process.
import type { InputSpec } from '../core/onnx/inputs';
import type { ValidationReport } from '../core/report';
import type { QuantMeasurement, QuantRequest } from './quantProtocol';
import type { LatencyRequest, LatencyResult, ValidateBeginRequest } from './stagedProtocol';

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

/** Block-by-block validation: each pair is a tiny model of one block, unfused and fused. */
export interface ValidatePairsRequest {
  type: 'validate-pairs';
  pairs: { block: string; unfused: string; fused: string; inputShape: number[] }[];
  seed: number;
  atol: number;
  rtol: number;
  /** Latency runs per block model after validation (0 or absent = do not measure). */
  latencyRuns?: number;
  threads?: number;
}

export type WorkerRequest = ValidateRequest | ValidatePairsRequest | QuantRequest | ValidateBeginRequest | LatencyRequest;

export type WorkerMessage =
  | { type: 'progress'; message: string }
  | { type: 'result'; report: ValidationReport | QuantMeasurement | LatencyResult }
  /** Sent before the result of a validation asked to measure latency. */
  | { type: 'latency'; latency: LatencyResult }
  | { type: 'error'; message: string };
