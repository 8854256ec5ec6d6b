// Messages of the quantization job in the onnxruntime child process: per block, the output SQNR
// when only that block's fused weight is INT8 fake-quantized, against the float fused model.
import type { InputSpec } from '../core/onnx/inputs';
import type { QuantMeasured } from '../core/quant';

/** A whole fused ONNX model: each block's weight is fed quantized in turn, the rest stays float. */
export interface QuantModelRequest {
  type: 'quant-model';
  /** The float fused model (a temporary fuse of the input, or the input itself when nothing fuses). */
  model: string;
  /** Blocks, the initializer holding each one's fused weight, and its output-channel axis (Conv 0; Gemm 1 − transB). */
  blocks: { name: string; weight: string; axis: number }[];
  inputs: InputSpec[];
  seed: number;
}

/** Checkpoints (no graph): one-block models, float and quantized, run on the same random input. */
export interface QuantPairsRequest {
  type: 'quant-pairs';
  blocks: { name: string; float: string; perTensor: string; perChannel: string; inputShape: number[] }[];
  seed: number;
}

export type QuantRequest = QuantModelRequest | QuantPairsRequest;

export interface BlockSqnr {
  name: string;
  perTensor: number | null;
  perChannel: number | null;
  /** Why this block could not be measured (e.g. a weight type the runtime cannot be fed). */
  error?: string;
}

export interface QuantMeasurement extends QuantMeasured {
  blocks: BlockSqnr[];
}

export function isQuantRequest(r: { type: string }): r is QuantRequest {
  return r.type === 'quant-model' || r.type === 'quant-pairs';
}
