// Block detection in checkpoints: by the module names each family uses and by structure. Works on
// trees from pickled modules (class names, eps, stride, padding, groups known) and on trees from
// bare state_dict keys (those inferred from shapes or family defaults, and said so).
import { dtypeName, isFloatType } from '../dtype';
import type { BranchInfo, BranchKind, BlockInfo, RejectedCandidate } from '../model';
import { type CkptTensor, get, type ModuleNode, numelOf, walk } from './tree';

export type FamilyId = 'yolov7' | 'repvgg' | 'yolov6' | 'qarepvgg' | 'mobileone' | 'ultralytics_repconv' | 'ultralytics_repvggdw' | 'acnet' | 'repvit' | 'ppyoloe';

export interface FamilyDef {
  label: string;
  /** BN epsilon the family's training code uses (for bare state_dicts). */
  eps: number;
  /** Module name of the fused conv in the deploy model. */
  deployName: string;
  /** Children removed by the family's own deploy conversion. */
  remove: string[];
  /** Attributes the deploy conversion sets. */
  setAttrs?: Record<string, unknown>;
  /** Attributes set to None (a parameter or module slot that disappears). */
  setNone?: string[];
  /** The post-add BN stays in the deploy model (YOLOv6 QARepVGG) instead of being folded. */
  keepPostBN?: boolean;
}

export const FAMILIES: Record<FamilyId, FamilyDef> = {
  yolov7: { label: 'YOLOv7 RepConv', eps: 1e-3, deployName: 'rbr_reparam', remove: ['rbr_dense', 'rbr_1x1', 'rbr_identity'], setAttrs: { deploy: true } },
  repvgg: { label: 'RepVGG', eps: 1e-5, deployName: 'rbr_reparam', remove: ['rbr_dense', 'rbr_1x1', 'rbr_identity'], setAttrs: { deploy: true } },
  yolov6: { label: 'YOLOv6 RepVGGBlock', eps: 1e-3, deployName: 'rbr_reparam', remove: ['rbr_dense', 'rbr_1x1', 'rbr_identity'], setAttrs: { deploy: true } },
  qarepvgg: { label: 'QARepVGG', eps: 1e-5, deployName: 'rbr_reparam', remove: ['rbr_dense', 'rbr_1x1', 'rbr_identity'], setAttrs: { deploy: true }, keepPostBN: true },
  mobileone: { label: 'MobileOne', eps: 1e-5, deployName: 'reparam_conv', remove: ['rbr_conv', 'rbr_scale', 'rbr_skip'], setAttrs: { inference_mode: true } },
  ultralytics_repconv: { label: 'Ultralytics RepConv', eps: 1e-3, deployName: 'conv', remove: ['conv1', 'conv2', 'bn', 'id_tensor'], setNone: ['bn'] },
  ultralytics_repvggdw: { label: 'Ultralytics RepVGGDW', eps: 1e-3, deployName: 'conv', remove: ['conv', 'conv1'] },
  acnet: { label: 'ACNet', eps: 1e-5, deployName: 'fused_conv', remove: ['square_conv', 'square_bn', 'ver_conv', 'ver_bn', 'hor_conv', 'hor_bn'], setAttrs: { deploy: true } },
  repvit: { label: 'RepViT RepVGGDW', eps: 1e-5, deployName: 'conv', remove: ['conv', 'conv1', 'bn'] },
  ppyoloe: { label: 'PP-YOLOE RepVgg', eps: 1e-5, deployName: 'conv', remove: ['conv1', 'conv2'], setNone: ['alpha'] },
};

export interface ConvRef {
  node: ModuleNode;
  weight: CkptTensor;
  bias?: CkptTensor;
  kernel: number[];
  /** From the pickled module, else undefined. */
  stride?: number[];
  padding?: number[];
  groups?: number;
}

export interface BNRef {
  node: ModuleNode;
  gamma?: CkptTensor;
  beta?: CkptTensor;
  mean: CkptTensor;
  variance: CkptTensor;
  eps: number;
  epsSource: 'model' | 'assumed' | 'override';
}

export interface CkptBranch {
  kind: BranchKind;
  conv?: ConvRef;
  bn?: BNRef;
  /** PP-YOLOE's alpha. */
  scale?: CkptTensor;
}

export interface CkptBlock {
  info: BlockInfo;
  node: ModuleNode;
  family: FamilyId;
  branches: CkptBranch[];
  /** BN on the sum, folded into the fused conv (unless the family keeps it: see FamilyDef). */
  postBN?: BNRef;
  kernel: number[];
  stride: number[];
  groups: number;
  inPerGroup: number;
  outChannels: number;
  dtype: number;
}

export interface CkptDetection {
  blocks: CkptBlock[];
  rejected: RejectedCandidate[];
}

export interface CkptDetectOptions {
  /** Overrides every BN epsilon (for bare state_dicts whose family default is wrong). */
  eps?: number;
  /**
   * Whether the tensors are in module order, so "the layer before" a block means something
   * (true for torch state_dicts; safetensors sorts its names).
   */
  moduleOrder?: boolean;
}

class Reject extends Error {}

const pyTuple = (v: unknown): number[] | undefined => {
  if (typeof v === 'number') return [v];
  if (Array.isArray(v) && v.every((x) => typeof x === 'number')) return v as number[];
  return undefined;
};

function asConv(n: ModuleNode | undefined): ConvRef | undefined {
  if (!n) return undefined;
  const w = n.tensors.get('weight');
  if (!w || w.shape.length < 3 || n.tensors.has('running_mean')) return undefined;
  const ref: ConvRef = { node: n, weight: w, bias: n.tensors.get('bias'), kernel: w.shape.slice(2) };
  if (n.className || n.attrs.size) {
    ref.stride = pyTuple(n.attrs.get('stride'));
    const pad = n.attrs.get('padding');
    if (typeof pad === 'string') {
      if (pad === 'same') ref.padding = ref.kernel.map((k) => (k - 1) / 2);
      else if (pad === 'valid') ref.padding = ref.kernel.map(() => 0);
    } else ref.padding = pyTuple(pad);
    const g = n.attrs.get('groups');
    if (typeof g === 'number') ref.groups = g;
    const dil = pyTuple(n.attrs.get('dilation'));
    if (dil && dil.some((d) => d !== 1)) throw new Reject(`'${n.path}' has dilation ${dil.join('×')}; only dilation 1 can be merged.`);
    const mode = n.attrs.get('padding_mode');
    if (typeof mode === 'string' && mode !== 'zeros') throw new Reject(`'${n.path}' pads with '${mode}', not zeros; padding would not commute with the sum.`);
  }
  return ref;
}

function asBN(n: ModuleNode | undefined, eps: (n: ModuleNode) => Pick<BNRef, 'eps' | 'epsSource'>): BNRef | undefined {
  if (!n) return undefined;
  const mean = n.tensors.get('running_mean');
  const variance = n.tensors.get('running_var');
  if (!mean || !variance) return undefined;
  if (n.attrs.get('track_running_stats') === false) throw new Reject(`'${n.path}' does not track running statistics.`);
  return { node: n, gamma: n.tensors.get('weight'), beta: n.tensors.get('bias'), mean, variance, ...eps(n) };
}

/** A conv followed by its BN, in any of the child namings the families use. */
function asConvBN(n: ModuleNode | undefined, eps: (n: ModuleNode) => Pick<BNRef, 'eps' | 'epsSource'>): { conv: ConvRef; bn: BNRef } | undefined {
  if (!n) return undefined;
  for (const [c, b] of [['conv', 'bn'], ['0', '1'], ['c', 'bn']]) {
    const conv = asConv(n.children.get(c));
    const bn = asBN(n.children.get(b), eps);
    if (conv && bn) return { conv, bn };
  }
  return undefined;
}

const fmt = (k: number[]) => k.join('×');

/** Elements held by a module's own tensors (a BN's num_batches_tracked included). */
const tensorCount = (n: ModuleNode | undefined): number => (n ? [...n.tensors.values()].reduce((a, t) => a + numelOf(t.shape), 0) : 0);

export function detectCheckpoint(root: ModuleNode, opts: CkptDetectOptions = {}): CkptDetection {
  const det: CkptDetection = { blocks: [], rejected: [] };
  const claimed = new Set<ModuleNode>();
  const allPaths = [...walk(root)].map((n) => n.path).join(' ');
  const yolov6Hints = /ERBlock_|Rep_p\d|Rep_n\d|\bneck\.Rep/.test(allPaths);
  // PP-YOLOE's RepVggBlock has alpha only when use_alpha is set; its CSPResNet layout names blocks
  // stages.N.blocks.M, and one block with alpha marks the whole file as PP-YOLOE.
  const ppyoloeHints = /\bstages\.\d+\.blocks\.\d+\.conv2\.conv1\b/.test(allPaths) || [...walk(root)].some((n) => n.children.has('conv1') && n.children.has('conv2') && n.tensors.has('alpha'));

  const order = [...walk(root)];
  const inferred = new Map<ModuleNode, string>();
  /** Output channels of the nearest module before `n` (in state_dict order) that holds tensors. */
  function previousOutChannels(n: ModuleNode): number | undefined {
    if (opts.moduleOrder === false) return undefined;
    const i = order.indexOf(n);
    for (let j = i - 1; j >= 0; j--) {
      const m = order[j];
      if (n.path.startsWith(m.path + '.') || m.path === '') continue; // an ancestor
      const t = m.tensors.get('running_var') ?? m.tensors.get('weight');
      if (t && t.shape.length >= 1) return t.shape[0];
    }
    return undefined;
  }

  for (const node of order) {
    if ([...claimed].some((c) => node.path.startsWith(c.path + '.'))) continue;
    let family: FamilyId | undefined;
    try {
      const found = match(node);
      if (!found) continue;
      family = found.family;
      const block = build(node, found.family, found.branches, found.postBN);
      det.blocks.push(block);
      claimed.add(node);
    } catch (err) {
      if (!(err instanceof Reject)) throw err;
      det.rejected.push({ name: node.path, reason: `${family ? FAMILIES[family].label + ': ' : ''}${err.message}`, parts: [...node.children.keys()] });
      claimed.add(node);
    }
  }
  return det;

  function epsFor(family: FamilyId) {
    return (n: ModuleNode): Pick<BNRef, 'eps' | 'epsSource'> => {
      if (opts.eps !== undefined) return { eps: opts.eps, epsSource: 'override' };
      const e = n.attrs.get('eps');
      if (typeof e === 'number') return { eps: e, epsSource: 'model' };
      return { eps: FAMILIES[family].eps, epsSource: 'assumed' };
    };
  }

  function match(n: ModuleNode): { family: FamilyId; branches: CkptBranch[]; postBN?: BNRef } | undefined {
    const c = n.children;
    if (c.has('rbr_dense')) {
      const sequential = get(n, 'rbr_dense', '0') !== undefined;
      const rawOne = asConv(c.get('rbr_1x1'));
      const isQA = !!rawOne && !!asBN(c.get('bn'), () => ({ eps: 0, epsSource: 'model' }));
      const family: FamilyId = sequential ? 'yolov7' : isQA ? 'qarepvgg' : yolov6Hints || /yolov6/i.test(n.className ?? '') ? 'yolov6' : 'repvgg';
      const eps = epsFor(family);
      const dense = asConvBN(c.get('rbr_dense'), eps);
      if (!dense) throw new Reject(`'rbr_dense' is not a conv followed by a BatchNorm.`);
      const branches: CkptBranch[] = [{ kind: 'conv_bn', ...dense }];
      if (c.get('rbr_1x1')) {
        const one = asConvBN(c.get('rbr_1x1'), eps);
        if (one) branches.push({ kind: 'conv_bn', ...one });
        else if (rawOne) branches.push({ kind: 'conv', conv: rawOne });
        else throw new Reject(`'rbr_1x1' is neither a conv nor a conv followed by a BatchNorm.`);
      }
      const id = c.get('rbr_identity');
      const idBN = asBN(id, eps);
      if (idBN) branches.push({ kind: 'bn_identity', bn: idBN });
      else if (id && id.className && /Identity$/.test(id.className)) branches.push({ kind: 'identity' });
      else if (!id && family === 'qarepvgg' && !n.className) {
        // nn.Identity has no tensors, so a bare state_dict cannot show it: QARepVGG has it exactly
        // when the block keeps its width (and stride 1, which a state_dict cannot show either). The
        // input width is read off the layer before the block.
        const w = dense.conv.weight.shape;
        const cin = previousOutChannels(n) ?? w[1];
        if (cin === w[0]) {
          branches.push({ kind: 'identity' });
          inferred.set(n, `identity branch inferred (nn.Identity has no tensors): the layer before outputs ${cin} channels = the block's output, stride 1 assumed`);
        }
      }
      const postBN = family === 'qarepvgg' ? asBN(c.get('bn'), eps) : undefined;
      return { family, branches, postBN };
    }
    if (c.has('rbr_conv') || c.has('rbr_skip') || (c.has('rbr_scale') && !c.has('rbr_dense'))) {
      const eps = epsFor('mobileone');
      const branches: CkptBranch[] = [];
      for (const b of c.get('rbr_conv')?.children.values() ?? []) {
        const cb = asConvBN(b, eps);
        if (!cb) throw new Reject(`'${b.path}' is not a conv followed by a BatchNorm.`);
        branches.push({ kind: 'conv_bn', ...cb });
      }
      if (c.get('rbr_scale')) {
        const s = asConvBN(c.get('rbr_scale'), eps);
        if (!s) throw new Reject(`'rbr_scale' is not a conv followed by a BatchNorm.`);
        branches.push({ kind: 'conv_bn', ...s });
      }
      const skip = asBN(c.get('rbr_skip'), eps);
      if (skip) branches.push({ kind: 'bn_identity', bn: skip });
      if (!branches.some((b) => b.conv)) return undefined;
      return { family: 'mobileone', branches };
    }
    if (c.has('square_conv') && c.has('square_bn')) {
      const eps = epsFor('acnet');
      const branches: CkptBranch[] = [];
      for (const p of ['square', 'ver', 'hor']) {
        const conv = asConv(c.get(`${p}_conv`));
        const bn = asBN(c.get(`${p}_bn`), eps);
        if (!conv && !bn) continue;
        if (!conv || !bn) throw new Reject(`'${p}_conv'/'${p}_bn' is not a conv followed by a BatchNorm.`);
        branches.push({ kind: 'conv_bn', conv, bn });
      }
      return { family: 'acnet', branches };
    }
    // conv1/conv2 and conv/conv1 are common names for convs in SERIES too (YOLOX, ResNet-style
    // blocks). Only take them as parallel branches when the class says so, or — in a bare
    // state_dict — when the shapes can only be parallel branches of one input.
    const repClass = (re: RegExp) => (n.className ? re.test(n.className) : undefined);
    const parallelShapes = (a: ConvRef, b: ConvRef) =>
      a.weight.shape[0] === b.weight.shape[0] && a.weight.shape[1] === b.weight.shape[1] && fmt(a.kernel) !== fmt(b.kernel);
    if (c.has('conv1') && c.has('conv2') && repClass(/Rep(Conv|Vgg|VGG)/) !== false) {
      const alpha = n.tensors.get('alpha');
      const family: FamilyId = alpha || /RepVggBlock$/.test(n.className ?? '') || (!n.className && ppyoloeHints && !c.has('bn')) ? 'ppyoloe' : 'ultralytics_repconv';
      const eps = epsFor(family);
      const a = asConvBN(c.get('conv1'), eps);
      const b = asConvBN(c.get('conv2'), eps);
      if (!a || !b) return undefined;
      if (!n.className && !(parallelShapes(a.conv, b.conv) && b.conv.kernel.every((k) => k === 1))) return undefined;
      const branches: CkptBranch[] = [{ kind: 'conv_bn', ...a }, { kind: 'conv_bn', ...b, scale: alpha }];
      const id = asBN(c.get('bn'), eps);
      if (id && family === 'ultralytics_repconv') branches.push({ kind: 'bn_identity', bn: id });
      return { family, branches };
    }
    if (c.has('conv') && c.has('conv1') && repClass(/RepVGGDW|RepVggDW|RepViT/i) !== false) {
      // RepViT: conv (Conv2d_BN) + conv1 (raw dw conv with bias) + x, then bn.
      const rvEps = epsFor('repvit');
      const rv = asConvBN(c.get('conv'), rvEps);
      const raw = asConv(c.get('conv1'));
      const post = asBN(c.get('bn'), rvEps);
      if (rv && raw && post && (n.className || (parallelShapes(rv.conv, raw) && rv.conv.weight.shape[1] === 1))) {
        return { family: 'repvit', branches: [{ kind: 'conv_bn', ...rv }, { kind: 'conv', conv: raw }, { kind: 'identity' }], postBN: post };
      }
      const eps = epsFor('ultralytics_repvggdw');
      const a = asConvBN(c.get('conv'), eps);
      const b = asConvBN(c.get('conv1'), eps);
      if (a && b && (n.className || (parallelShapes(a.conv, b.conv) && a.conv.weight.shape[1] === 1))) return { family: 'ultralytics_repvggdw', branches: [{ kind: 'conv_bn', ...a }, { kind: 'conv_bn', ...b }] };
    }
    return undefined;
  }

  function build(node: ModuleNode, family: FamilyId, branches: CkptBranch[], postBN: BNRef | undefined): CkptBlock {
    const def = FAMILIES[family];
    const convs = branches.filter((b) => b.conv).map((b) => b.conv!);
    if (!convs.length) throw new Reject('no convolution branch.');
    const assumptions: string[] = inferred.has(node) ? [inferred.get(node)!] : [];
    const w0 = convs[0].weight;
    const cout = w0.shape[0];
    const cpg = w0.shape[1];
    for (const cv of convs) {
      if (!isFloatType(cv.weight.dtype)) throw new Reject(`'${cv.node.path}' weight is ${dtypeName(cv.weight.dtype)}; only float weights can be fused.`);
      if (cv.weight.shape.length !== w0.shape.length) throw new Reject('branches mix convolutions of different rank.');
      if (cv.weight.shape[0] !== cout || cv.weight.shape[1] !== cpg) {
        throw new Reject(`branches have different channels ('${convs[0].node.path}' ${fmt(w0.shape)}, '${cv.node.path}' ${fmt(cv.weight.shape)}).`);
      }
      if (cv.kernel.some((k) => k % 2 === 0)) throw new Reject(`'${cv.node.path}' has an even kernel ${fmt(cv.kernel)}, which has no centre.`);
      const want = cv.kernel.map((k) => (k - 1) / 2);
      if (cv.padding) {
        if (fmt(cv.padding) !== fmt(want)) throw new Reject(`'${cv.node.path}' pads ${fmt(cv.padding)} for a ${fmt(cv.kernel)} kernel; only centred kernels (padding ${fmt(want)}) can be merged.`);
      }
      if (cv.weight.dtype !== w0.dtype) throw new Reject(`branches have different dtypes (${dtypeName(w0.dtype)}, ${dtypeName(cv.weight.dtype)}).`);
    }
    if (convs.some((cv) => !cv.padding)) assumptions.push('padding assumed centred ((k−1)/2), as the family defines it');
    const strides = convs.map((cv) => cv.stride);
    let stride: number[];
    if (strides.every((s) => s)) {
      stride = strides[0]!;
      if (strides.some((s) => fmt(s!) !== fmt(stride))) throw new Reject(`branches have different strides (${strides.map((s) => fmt(s!)).join(', ')}).`);
    } else {
      stride = w0.shape.slice(2).map(() => 1);
      assumptions.push(branches.some((b) => b.kind === 'identity' || b.kind === 'bn_identity') ? 'stride 1 (the block has an identity branch)' : 'stride not stored in a state_dict (fusion does not depend on it; shown as 1)');
    }
    const groupsList = convs.map((cv) => cv.groups);
    let groups: number;
    const hasId = branches.some((b) => b.kind === 'identity' || b.kind === 'bn_identity');
    if (groupsList.every((g) => g !== undefined)) {
      groups = groupsList[0]!;
      if (groupsList.some((g) => g !== groups)) throw new Reject(`branches have different groups (${groupsList.join(', ')}).`);
    } else {
      // A state_dict stores in/groups per weight, not groups: with an identity branch the block
      // keeps its width; otherwise the input width is read off the layer before the block.
      const before = hasId ? undefined : previousOutChannels(node);
      if (hasId) {
        groups = cout / cpg;
        assumptions.push(`groups ${groups} inferred from weight shapes (identity: in = out = ${cout} channels)`);
      } else if (before !== undefined && before % cpg === 0 && cout % (before / cpg) === 0) {
        groups = before / cpg;
        assumptions.push(`groups ${groups} inferred: the layer before outputs ${before} channels, the weights take ${cpg} per group`);
      } else if (cpg === 1 && cout > 1) {
        // One input channel per output channel: a depthwise conv (MobileOne, RepVGGDW) far more
        // often than a conv over a single-channel input.
        groups = cout;
        assumptions.push(`groups ${groups} assumed (depthwise: one input channel per weight; the input width is not stored)`);
      } else {
        groups = 1;
        assumptions.push('groups 1 assumed (the input width is not stored in a state_dict)');
      }
    }
    const cin = cpg * groups;
    if (hasId) {
      if (stride.some((s) => s !== 1)) throw new Reject(`an identity branch cannot join convolutions with stride ${fmt(stride)}.`);
      if (cin !== cout) throw new Reject(`an identity branch needs as many input as output channels (in ${cin}, out ${cout}).`);
    }
    for (const b of branches) {
      for (const bn of [b.bn]) {
        if (bn && bn.mean.shape[0] !== cout) throw new Reject(`'${bn.node.path}' has ${bn.mean.shape[0]} channels, the block has ${cout}.`);
      }
      if (b.scale && numelOf(b.scale.shape) !== 1 && numelOf(b.scale.shape) !== cout) throw new Reject(`'alpha' has shape ${fmt(b.scale.shape)}; expected a scalar or one value per channel.`);
    }
    const epsSources = new Set(branches.map((b) => b.bn?.epsSource).filter(Boolean));
    if (epsSources.has('assumed')) assumptions.push(`BN epsilon ${def.eps.toExponential(0)} assumed (${def.label} training default; override with --eps)`);
    const kernel = w0.shape.slice(2).map((_, i) => Math.max(...convs.map((cv) => cv.kernel[i])));
    const foldPost = postBN && !def.keepPostBN;
    const branchInfos: BranchInfo[] = branches.map((b) => ({
      kind: b.kind,
      kernel: b.conv?.kernel,
      hasBias: !!b.conv?.bias,
      hasBN: !!b.bn,
      epsilon: b.bn?.eps,
      epsilonSource: b.bn?.epsSource,
      scaled: !!b.scale,
      params: tensorCount(b.conv?.node) + tensorCount(b.bn?.node) + (b.scale ? numelOf(b.scale.shape) : 0),
      dtype: b.conv ? dtypeName(b.conv.weight.dtype) : undefined,
      parts: [b.conv?.node.path, b.bn?.node.path].filter((x): x is string => !!x),
    }));
    const info: BlockInfo = {
      name: node.path,
      family: def.label,
      kernel,
      stride,
      groups,
      inChannels: cin,
      outChannels: cout,
      branches: branchInfos,
      postBN: postBN ? { epsilon: postBN.eps, epsilonSource: postBN.epsSource } : undefined,
      output: node.path,
      paramsBefore: branchInfos.reduce((a, b) => a + b.params, 0) + (foldPost ? tensorCount(postBN!.node) : 0),
      paramsAfter: cout * cpg * numelOf(kernel) + cout,
      assumptions: assumptions.length ? assumptions : undefined,
      deployName: def.deployName,
    };
    if (def.keepPostBN && postBN) assumptions.push(`the post-add BN '${postBN.node.path}' stays in the deploy model (${def.label} keeps it)`);
    return { info, node, family, branches, postBN, kernel, stride, groups, inPerGroup: cpg, outChannels: cout, dtype: w0.dtype };
  }
}
