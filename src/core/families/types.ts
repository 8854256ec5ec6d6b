// What a re-parameterization family is, as data: one file per family in this folder, one line in
// index.ts. Both detectors, the tree, the report and the tests read these definitions.
import type { BranchKind } from '../branches';
import type { MatchContext, MatchResult } from '../checkpoint/match';
import type { ModuleNode } from '../checkpoint/tree';

/** What an ONNX block looks like, for the family guess (names from the exporter's scopes). */
export interface OnnxFacts {
  /** Names of the block's nodes, space-separated (e.g. `/model.2/rbr_dense/conv/Conv …`). */
  names: string;
  /** Names of every node in the graph, space-separated, when the caller has them (model-wide hints). */
  modelNames?: string;
  kinds: BranchKind[];
  postBN: boolean;
  /** Some conv branch has a constant factor. */
  scaled: boolean;
  /** Some conv branch has a non-square kernel. */
  asym: boolean;
  depthwise: boolean;
}

/**
 * How the family's official conversion leaves a block: the contract with the writers
 * (src/core/checkpoint/index.ts and deploy*.ts). Names are child names relative to the block.
 */
export interface DeployLayout {
  /** Child name of the fused conv, e.g. `rbr_reparam`; '' when the fused conv replaces the block module itself. */
  module: string;
  /** Children (modules, parameters or buffers) the official conversion deletes. */
  remove: string[];
  /** Plain attributes it sets, e.g. `{ deploy: true }`. */
  setAttrs?: Record<string, boolean | number | string>;
  /** Slots it sets to None (a parameter or module slot that stays, empty): Ultralytics' `bn`. */
  setNone?: string[];
  /** Children it keeps and that stay in the deploy model as they are (QARepVGG's post-add `bn`). */
  keep?: string[];
  /**
   * Instance attributes bound to a method of the block's class (`{ forward: 'forward_fuse' }`):
   * the official conversion assigns `self.forward = self.forward_fuse`.
   */
  bindMethods?: Record<string, string>;
  /**
   * A plain tensor attribute the official conversion leaves behind when the block has a BN(x)
   * identity branch: MobileOne's `_fuse_bn_tensor` caches the identity kernel as `id_tensor` and
   * `reparameterize` never deletes it. Written as that kernel (in × in/groups × k × k, ones at the
   * centre, in the identity BN's dtype), not a parameter, not in the state_dict.
   */
  identityTensor?: string;
  /**
   * The official conversion replaces the whole block module with the fused conv (RepViT's
   * `replace_batchnorm`: `token_mixer.0.weight`, no `.conv.`); `module` is then only a fallback.
   */
  replaceBlock?: boolean;
  /** Qualified class of the fused conv module (default: the class of the block's first conv). */
  convClass?: string;
}

/** The official code a family definition mirrors. */
export interface OfficialRef {
  repo: string;
  /** File of the block class. */
  path: string;
  /** Class and conversion function, e.g. `RepVGGBlock.switch_to_deploy`. */
  fn: string;
}

export interface FamilyDef<Id extends string = string> {
  id: Id;
  /** What the report, the tree and the CLI call it (the same from ONNX and from checkpoints). */
  label: string;
  /** Codicon id and theme colour for the tree. */
  icon: { id: string; color?: string };
  /** BN epsilon of the family's training code (for state_dicts that do not store it). */
  eps: number;
  /** Last segment of the block classes the family uses (`RepVGGBlock`). */
  classes: string[];
  /** Child module names that mark the family's blocks (`rbr_dense`, `rbr_1x1`, …). */
  modules: string[];
  /**
   * Children of the block applied after the sum (activations, SE) or known to do nothing for the
   * fusion; they stay as they are in the deploy model. Anything else not consumed rejects the block.
   */
  after?: string[];
  deploy: DeployLayout;
  official: OfficialRef;
  /** Checkpoints: the branches of `node` if it is one of this family's blocks (throw Reject if it looks like one but cannot be fused). */
  match?(node: ModuleNode, ctx: MatchContext): MatchResult | undefined;
  /** ONNX: whether an ONNX block with these facts is this family's. */
  onnx?(f: OnnxFacts): boolean;
  /** For `--family`: a variant a state_dict cannot tell apart from another (same keys). */
  variantOf?: string;
}

export function defineFamily<const Id extends string>(def: FamilyDef<Id>): FamilyDef<Id> {
  return def;
}
