// Messages between the extension host and the model worker (a worker_threads Worker that parses
// models, computes branch statistics and runs fuse jobs, so none of it blocks the host thread).
import type { InspectReport } from '../../core/model';
import type { FuseReport } from '../../core/report';
import type { BlockStats } from '../../core/stats';
import type { BlockQuantDetail, QuantReport } from '../../core/quant';
import type { FuseJobOptions, InspectOptions } from '../view/settings';

/** Requests the worker answers, with parameters and results. */
export interface WorkerRequests {
  /** Parse a model and report its blocks; the worker keeps it open for `blockStats`. */
  open: { params: { file: string; options: InspectOptions }; result: InspectReport };
  /** Statistics of one block's branches. */
  blockStats: { params: { file: string; block: string; options: InspectOptions }; result: BlockStats };
  /** Forget a model (its editor closed). */
  close: { params: { file: string }; result: null };
  /** INT8/FP16 numbers of one block (its branch ranges before and after fusion, branch BN gains). */
  blockQuant: { params: { file: string; block: string; options: InspectOptions }; result: BlockQuantDetail };
  /** The quantization report (fused in memory, output SQNR measured in the onnxruntime child); sends `progress`. */
  quant: { params: { file: string; options: InspectOptions; inputShapes: Record<string, number[]>; timeoutMs: number }; result: QuantReport };
  /** Fuse a model into `options.output`; sends `progress` messages; cancel with `cancel`. */
  fuse: { params: { file: string; options: FuseJobOptions }; result: FuseReport };
}

export type WorkerRequestKind = keyof WorkerRequests;

export type WorkerRequest = {
  [K in WorkerRequestKind]: { type: 'request'; id: number; kind: K; params: WorkerRequests[K]['params'] };
}[WorkerRequestKind];

export type HostToWorker =
  | WorkerRequest
  /** Abort request `id` (a fuse job): its output and temp files are removed. */
  | { type: 'cancel'; id: number }
  /** Abort everything, remove temp files, exit. */
  | { type: 'shutdown' };

/** A failure, as one line plus what kind of failure it was. */
export interface WorkerError {
  /** Error class: RepFuseError, FormatError, FusionError, ValidationError, Error. */
  name: string;
  /** One line, naming the file. */
  message: string;
  /** The job was cancelled (and cleaned up). */
  cancelled: boolean;
  /** A fuse job wrote its output but validation could not run (crash, timeout). */
  outputWritten?: string;
}

export type WorkerToHost =
  | { type: 'response'; id: number; ok: true; result: unknown }
  | { type: 'response'; id: number; ok: false; error: WorkerError }
  | { type: 'progress'; id: number; message: string };
