// The shared vocabulary: what every format reader reports about a model and its blocks.
// Detection, the CLI, the tree view and the webview consume only these types.

import type { BranchKind } from './branches';

export type ModelFormat = 'onnx' | 'pytorch' | 'safetensors';

/** How one parallel branch of a block contributes to the sum: the table is src/core/branches.ts. */
export type { BranchKind } from './branches';

export interface BranchInfo {
  kind: BranchKind;
  /** Spatial kernel size of a conv branch, e.g. [3, 3]; identity branches have none. */
  kernel?: number[];
  hasBias: boolean;
  hasBN: boolean;
  /** Epsilon of this branch's BN, as stored in the model (or assumed: see `epsilonSource`). */
  epsilon?: number;
  epsilonSource?: 'model' | 'assumed' | 'override';
  /** A constant factor multiplies the branch (PP-YOLOE's alpha, a layer scale). */
  scaled?: boolean;
  /** The branch is subtracted from the sum (FastViT RepMixer's norm). */
  subtracted?: boolean;
  /** Parameter count of the branch (weights, bias, BN γ/β/mean/var, factor). */
  params: number;
  /** Element type of the branch weights. */
  dtype?: string;
  /** Names of the model nodes or modules that make up this branch. */
  parts: string[];
}

export interface BlockInfo {
  /** Module path taken from the exporter's name scopes (e.g. `model.102`), else the output tensor. */
  name: string;
  /** Best guess of the architecture family, from names and structure. */
  family: string;
  /** Spatial size of the fused kernel. */
  kernel: number[];
  stride: number[];
  groups: number;
  inChannels: number;
  outChannels: number;
  branches: BranchInfo[];
  /** A BatchNormalization applied to the sum (QARepVGG, RepViT). */
  postBN?: { epsilon: number; epsilonSource?: 'model' | 'assumed' | 'override' };
  /** Op or module right after the block (kept as is), when there is exactly one. */
  activation?: string;
  /** Tensor (ONNX) or module path (checkpoint) the block produces. */
  output: string;
  /** Parameters before and after fusion. */
  paramsBefore: number;
  paramsAfter: number;
  /** What was inferred rather than read (checkpoints without modules: stride, padding, epsilon). */
  assumptions?: string[];
  /** Checkpoints: the module name the fused conv gets in the deploy model (e.g. `rbr_reparam`). */
  deployName?: string;
}

/** Something that looks like a block but cannot be fused exactly, with the reason. */
export interface RejectedCandidate {
  name: string;
  reason: string;
  parts: string[];
}

/** A standalone Conv → BatchNormalization pair folded into the Conv. */
export interface FoldInfo {
  name: string;
  conv: string;
  bn: string;
  epsilon: number;
}

export interface ModelSummary {
  format: ModelFormat;
  path: string;
  fileSize: number;
  producer?: string;
  irVersion?: number;
  opsets?: { domain: string; version: number }[];
  /** For checkpoints: where the weights were found ("model", "ema", "state_dict", …) and how. */
  layout?: string;
  nodeCount?: number;
  paramCount: number;
  paramBytes: number;
  dtypes: Record<string, number>;
  opCounts?: Record<string, number>;
  /** YOLO auxiliary training heads found (DualDDetect, IAuxDetect, …): `fuse --drop-aux` applies. */
  auxHeads?: string[];
  notes: string[];
}

export interface InspectReport {
  model: ModelSummary;
  blocks: BlockInfo[];
  rejected: RejectedCandidate[];
  folds: FoldInfo[];
  /** Conv → BN pairs seen but left alone, with the reason. */
  notFolded: RejectedCandidate[];
  /** Op counts after fusion (ONNX). */
  opCountsAfter?: Record<string, number>;
  nodeCountAfter?: number;
  paramCountAfter: number;
}

/** Numbers of one branch, for statistics views (host computes, webview displays). */
export interface BranchData {
  /** e.g. "3×3 conv+bn", "bn(x)", "x". */
  label: string;
  kind: BranchKind;
  /** Raw weight [Cout, Cin/g, ...k] as stored (identity branches have none). */
  weight?: { shape: number[]; values: ArrayLike<number> };
  bias?: ArrayLike<number>;
  bn?: { gamma: ArrayLike<number>; beta: ArrayLike<number>; mean: ArrayLike<number>; variance: ArrayLike<number>; eps: number };
  /** Constant factor (PP-YOLOE α), scalar or per output channel. */
  scale?: ArrayLike<number>;
  /**
   * The branch's kernel with everything on its path folded in, at its own size (ONNX linear
   * regions, whose branches are computed rather than stored); when absent, the statistics fold
   * `weight`, `bn` and `scale` themselves.
   */
  folded?: { shape: number[]; values: ArrayLike<number> };
  /**
   * The branch's exact contribution to the fused conv: BN folded, factor applied, zero-padded to
   * the fused kernel size, identity expanded to its kernel. Sum over branches (then post-BN) = fused.
   */
  contribution: { shape: number[]; weight: Float64Array; bias: Float64Array };
}

export interface BlockData {
  block: BlockInfo;
  branches: BranchData[];
  postBN?: { gamma: ArrayLike<number>; beta: ArrayLike<number>; mean: ArrayLike<number>; variance: ArrayLike<number>; eps: number };
  fused: { shape: number[]; weight: Float64Array; bias: Float64Array };
}

// ----- --drop-aux (YOLO training → deploy) -------------------------------------------------

export interface DropAuxLayer {
  from: number;
  to: number | null;
  type: string;
}

/** What --drop-aux did to one model object of a checkpoint. */
export interface DropAuxResult {
  /** Entry in the checkpoint ('model', 'ema', or '' for a bare module). */
  entry: string;
  /** Whether the model had an auxiliary part and was converted. */
  converted: boolean;
  note: string;
  head?: { from: string; to: string; index: number; newIndex: number; mirrors: string };
  /** Every layer: its old index, its new index (null = removed) and class. */
  layers: DropAuxLayer[];
  removed: DropAuxLayer[];
  renumbered: DropAuxLayer[];
  /** Lead convs whose ImplicitA / ImplicitM were folded into weight and bias. */
  implicitFolded: number;
}

/** What --drop-aux removed from an ONNX graph. */
export interface OnnxDropAuxInfo {
  heads: { scope: string; kind: string }[];
  removedOutputs: string[];
  keptOutputs: string[];
  removedNodes: number;
  removedInitializers: number;
  note: string;
}
