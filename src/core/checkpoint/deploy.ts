// Deploy forms of checkpoints, as each family's official conversion leaves them: every fused block
// laid out by its family's DeployLayout (src/core/families/*), and — with --fold-bn — every plain
// Conv+BN, BN+Linear and distillation head folded the way the official whole-model fuse does it
// (YOLO's Model.fuse(), YOLOv6's fuse_model, RepViT's replace_batchnorm). Applied to module objects
// (full-module pickles, rewritten in place, bound `forward` methods included) and to state_dicts
// (keys exactly as the official deploy model names them). Fold math in float64, rounded once.
import { DType, encodeFloats, isFloatType } from '../dtype';
import { RepFuseError } from '../errors';
import { FAMILIES, type FamilyId } from '../families';
import { checkFinite } from '../fusestream';
import type { FoldInfo, RejectedCandidate } from '../model';
import { NewTensor, TorchTensor } from '../torch/tensor';
import { PyBoundMethod, PyDict, PyObject, PyTuple, type PyValue } from '../torch/values';
import type { CkptBlock } from './detect';
import { asBN, asConv, type BNRef, type ConvRef, isInertClass, Reject } from './match';
import { type CkptTensor, isModuleObject, keysUnder, type ModuleNode, modulesOf, numelOf, walk } from './tree';

// ----- the official whole-model folds -------------------------------------------------------------

/** One kind of module the official whole-model conversion folds. */
export interface FoldRule {
  /** Last segment of the module classes folded (full modules); state_dicts are matched by child names. */
  classes: string[];
  kind: 'conv_bn' | 'bn_linear' | 'distill_head' | 'implicit';
  /**
   * Child names: conv and BN (`conv_bn`), BN and Linear (`bn_linear`), the two heads
   * (`distill_head`), the ImplicitA and ImplicitM lists beside the head convs `m` (`implicit`).
   */
  first: string;
  second: string;
  /**
   * `inplace`: the conv child becomes the fused nn.Conv2d (with a bias), the BN child is deleted and
   * `forward` is bound to `forward` (YOLO). `replace`: the module itself becomes the fused
   * nn.Conv2d / nn.Linear in its parent (RepViT).
   */
  result: 'inplace' | 'replace';
  forward?: string;
  /** The new parameters require grad (a plain new nn.Conv2d); default false (fuse_conv_and_bn's requires_grad_(False)). */
  requiresGrad?: boolean;
  /** The official code this mirrors. */
  official: string;
}

/** A model family's whole-model fold: which rules, and the official function. */
export interface FoldSet {
  id: 'yolov6' | 'yolov7' | 'yolov9' | 'ultralytics' | 'repvit' | 'dbb';
  label: string;
  rules: FoldRule[];
  /** Full-module checkpoints of this family are folded by default (the official loaders fuse them). */
  yolo: boolean;
  /** Family whose BN epsilon a state_dict assumes. */
  epsFamily: FamilyId;
}

const yoloConv = (classes: string[], forward: string, official: string): FoldRule => ({ classes, kind: 'conv_bn', first: 'conv', second: 'bn', result: 'inplace', forward, official });

/** The whole-model folds, one per model family (README: "Deploy forms"). */
export const FOLD_SETS: Record<FoldSet['id'], FoldSet> = {
  yolov7: {
    id: 'yolov7',
    label: 'YOLOv7 Model.fuse()',
    yolo: true,
    epsFamily: 'yolov7',
    // `type(m) is Conv`: subclasses are not folded.
    rules: [
      yoloConv(['Conv'], 'fuseforward', 'WongKinYiu/yolov7 models/yolo.py Model.fuse: fuse_conv_and_bn, delattr bn, forward = fuseforward'),
      // The head's implicit knowledge: m[i].bias += m[i].weight·ia[i]; then m[i] *= im[i]; ia/im stay.
      { classes: ['IDetect', 'IAuxDetect'], kind: 'implicit', first: 'ia', second: 'im', result: 'inplace', forward: 'fuseforward', official: 'WongKinYiu/yolov7 models/yolo.py IDetect.fuse / IAuxDetect.fuse (Model.fuse), forward = fuseforward' },
    ],
  },
  yolov9: {
    id: 'yolov9',
    label: 'YOLOv9 Model.fuse()',
    yolo: true,
    epsFamily: 'yolov9',
    rules: [yoloConv(['Conv', 'DWConv'], 'forward_fuse', 'WongKinYiu/yolov9 models/yolo.py BaseModel.fuse: fuse_conv_and_bn, delattr bn, forward = forward_fuse')],
  },
  ultralytics: {
    id: 'ultralytics',
    label: 'Ultralytics BaseModel.fuse()',
    yolo: true,
    epsFamily: 'ultralytics_repconv',
    rules: [yoloConv(['Conv', 'DWConv'], 'forward_fuse', 'ultralytics/ultralytics ultralytics/nn/tasks.py BaseModel.fuse: fuse_conv_and_bn, delattr bn, forward = forward_fuse')],
  },
  yolov6: {
    id: 'yolov6',
    label: 'YOLOv6 fuse_model()',
    yolo: true,
    epsFamily: 'yolov6',
    // `type(m) is ConvModule`.
    rules: [yoloConv(['ConvModule'], 'forward_fuse', 'meituan/YOLOv6 yolov6/utils/torch_utils.py fuse_model: fuse_conv_and_bn, delattr bn, forward = forward_fuse')],
  },
  dbb: {
    id: 'dbb',
    label: 'DBB convert.py (ConvBN.switch_to_deploy)',
    yolo: false,
    epsFamily: 'dbb',
    // The official convert.py calls switch_to_deploy on every module: ConvBN folds into a new
    // `conv` (with bias) and deletes `bn`; its forward checks hasattr(self, 'bn'), nothing is bound.
    rules: [{ classes: ['ConvBN'], kind: 'conv_bn', first: 'conv', second: 'bn', result: 'inplace', requiresGrad: true, official: 'DingXiaoH/DiverseBranchBlock convnet_utils.py ConvBN.switch_to_deploy (convert.py)' }],
  },
  repvit: {
    id: 'repvit',
    label: 'RepViT replace_batchnorm()',
    yolo: false,
    epsFamily: 'repvit',
    rules: [
      { classes: ['Conv2d_BN'], kind: 'conv_bn', first: 'c', second: 'bn', result: 'replace', official: 'THU-MIG/RepViT model/repvit.py Conv2d_BN.fuse (utils.replace_batchnorm)' },
      { classes: ['BN_Linear'], kind: 'bn_linear', first: 'bn', second: 'l', result: 'replace', official: 'THU-MIG/RepViT model/repvit.py BN_Linear.fuse' },
      { classes: ['Classfier'], kind: 'distill_head', first: 'classifier', second: 'classifier_dist', result: 'replace', official: 'THU-MIG/RepViT model/repvit.py Classfier.fuse (classifier and classifier_dist averaged)' },
    ],
  },
};

const last = (c: string | undefined) => (c ? c.slice(c.lastIndexOf('.') + 1) : undefined);

/** The whole-model fold of the model in `root` (by its blocks' families and its classes), or a reason there is none. */
export function foldSetFor(root: ModuleNode, blocks: CkptBlock[]): { set?: FoldSet; why?: string } {
  const fams = new Set<string>(blocks.map((b) => b.family));
  const classes = new Set<string>();
  for (const n of walk(root)) if (n.className) classes.add(n.className);
  const has = (re: RegExp) => [...classes].some((c) => re.test(c));
  if (fams.has('repvit') || has(/(^|\.)(Conv2d_BN|BN_Linear|Classfier)$/)) return { set: FOLD_SETS.repvit };
  if (fams.has('dbb') || has(/(^|\.)(DiverseBranchBlock|convnet_utils\.ConvBN)$/)) return { set: FOLD_SETS.dbb };
  if (fams.has('yolov6') || fams.has('qarepvgg') || fams.has('qarepvggv2') || has(/^yolov6\./)) return { set: FOLD_SETS.yolov6 };
  if ([...fams].some((f) => f.startsWith('ultralytics')) || has(/^ultralytics\./)) return { set: FOLD_SETS.ultralytics };
  const v7 = fams.has('yolov7') || has(/^models\.(yolo\.(IDetect|IAuxDetect|IBin|IKeypoint)|common\.(RepConv|SPPCSPC|ReOrg|MP))$/);
  const v9 = fams.has('yolov9') || has(/^models\.(yolo\.(DDetect|DualDDetect|TripleDDetect|DSegment|DualDSegment)|common\.(RepConvN|RepNCSPELAN4|ADown|SPPELAN|CBLinear|CBFuse|ELAN1))$/);
  if (v7 && !v9) return { set: FOLD_SETS.yolov7 };
  if (v9 && !v7) return { set: FOLD_SETS.yolov9 };
  if (v7 && v9) return { why: 'the model has classes of both YOLOv7 and YOLOv9 (models.common.Conv binds fuseforward in one, forward_fuse in the other)' };
  if (has(/^models\.common\.Conv$/)) return { why: 'models.common.Conv could be YOLOv7 or YOLOv9 (no RepConv/RepConvN, detect head or other class tells them apart)' };
  return { why: 'no family with an official whole-model Conv+BN fold (YOLOv6/v7/v9, Ultralytics, RepViT) was recognised' };
}

/** One planned fold. */
export interface PlannedFold {
  rule: FoldRule;
  node: ModuleNode;
  conv?: ConvRef;
  bn?: BNRef;
  /** bn_linear: the Linear's weight and bias. */
  linear?: { node: ModuleNode; weight: CkptTensor; bias?: CkptTensor };
  /** distill_head: the two BN_Linear folds averaged. */
  heads?: PlannedFold[];
  /** implicit: each head conv m[i] with its ImplicitA (added before it) and ImplicitM (multiplied after it). */
  implicit?: { conv: ConvRef; bias: CkptTensor; ia: CkptTensor; im: CkptTensor }[];
  /** The BN fold as the report lists it (not for implicit folds, which have no BN). */
  info?: FoldInfo;
}

export interface FoldPlan {
  set?: FoldSet;
  folds: PlannedFold[];
  notFolded: RejectedCandidate[];
  /** In words, for the report. */
  note?: string;
}

/**
 * Whether to fold: `mode` true/false as the user said; undefined = the default: YOLO module objects
 * rewritten in deploy form (the official loaders run Model.fuse() on them; a state_dict output is
 * for the deploy model as built, which keeps Conv+BN until fuse()), and RepViT, whose official
 * conversion replace_batchnorm always folds. `kind`: what the tree was read from (a module's classes
 * are checked); `writesModules`: the output keeps the module objects; `leftAlone`: the paths of
 * rejected block candidates, whose layers stay as they are.
 */
export function planFolds(root: ModuleNode, blocks: CkptBlock[], kind: 'module' | 'state_dict', mode: boolean | undefined, eps?: number, writesModules = kind === 'module', leftAlone: readonly string[] = []): FoldPlan {
  const { set, why } = foldSetFor(root, blocks);
  if (mode === false) return set?.id === 'repvit' ? noRepvitFold(root, blocks, kind, eps, writesModules, leftAlone) : { folds: [], notFolded: [] };
  if (!set) return { folds: [], notFolded: [], note: mode ? `--fold-bn: nothing folded: ${why}.` : undefined };
  // RepViT's and DBB's official conversions always fold; YOLO repos fold in Model.fuse() on modules.
  const on = mode ?? (!set.yolo || (kind === 'module' && writesModules));
  if (!on) return { folds: [], notFolded: [] };
  // A block's own layers are fused with it; a rejected candidate (`leftAlone`) is left entirely as it is.
  const claimed = (n: ModuleNode) =>
    blocks.some((b) => n.path === b.node.path || n.path.startsWith(`${b.node.path}.`) || b.node.path.startsWith(`${n.path}.`)) || leftAlone.some((p) => n.path.startsWith(`${p}.`));
  const epsOf = (n: ModuleNode): Pick<BNRef, 'eps' | 'epsSource'> => {
    if (eps !== undefined) return { eps, epsSource: 'override' };
    const e = n.attrs.get('eps');
    if (typeof e === 'number') return { eps: e, epsSource: 'model' };
    return { eps: FAMILIES[set.epsFamily].eps, epsSource: 'assumed' };
  };
  const plan: FoldPlan = { set, folds: [], notFolded: [] };
  const done = new Set<ModuleNode>();
  for (const node of walk(root)) {
    if (!node.path || [...done].some((d) => node.path.startsWith(`${d.path}.`))) continue;
    for (const rule of set.rules) {
      if (kind === 'module' && !rule.classes.includes(last(node.className) ?? '')) continue;
      if (claimed(node)) break; // a block's own conv+BN: fused with the block
      let f: PlannedFold | undefined;
      try {
        f = matchFold(rule, node, epsOf, kind);
      } catch (err) {
        if (!(err instanceof Reject)) throw err;
        plan.notFolded.push({ name: node.path, reason: `${set.label}: ${err.message}`, parts: [...node.children.keys()] });
        done.add(node);
        break;
      }
      if (!f) continue;
      plan.folds.push(f);
      done.add(node);
      break;
    }
  }
  const assumed = plan.folds.some((f) => f.bn?.epsSource === 'assumed' || f.heads?.some((h) => h.bn?.epsSource === 'assumed'));
  plan.note = `${set.label}: ${plan.folds.length} module${plan.folds.length === 1 ? '' : 's'} folded (${[...new Set(plan.folds.map((f) => f.rule.classes[0]))].join(', ') || 'none found'})${assumed ? `; BN epsilon ${FAMILIES[set.epsFamily].eps} assumed (a state_dict does not store it; override with --eps)` : ''}`;
  return plan;
}

/**
 * `--no-fold-bn` on a RepViT model, whose official conversion (utils.replace_batchnorm) folds every
 * Conv2d_BN, BN_Linear and Classfier together with the RepVGGDW blocks: only the blocks are switched,
 * and the report says what stays and what that output is. Module objects: a model the official code
 * still runs, and that replace_batchnorm can finish. A state_dict: it loads into a model whose blocks
 * alone were replaced (a custom deploy model), not into the official converted RepViT.
 */
function noRepvitFold(root: ModuleNode, blocks: CkptBlock[], kind: 'module' | 'state_dict', eps: number | undefined, writesModules: boolean, leftAlone: readonly string[]): FoldPlan {
  const would = planFolds(root, blocks, kind, true, eps, writesModules, leftAlone).folds;
  if (!would.length) return { folds: [], notFolded: [] };
  const what = `${would.length} RepViT module${would.length === 1 ? '' : 's'} (${[...new Set(would.map((f) => f.rule.classes[0]))].join(', ')}) kept in training form; only the re-parameterizable blocks are in deploy form`;
  return {
    folds: [],
    notFolded: [],
    note: writesModules
      ? `--no-fold-bn: ${what} (the official code runs this model, and utils.replace_batchnorm folds the rest)`
      : `--no-fold-bn: ${what}. The official utils.replace_batchnorm folds them too, so this state_dict loads into a model whose blocks alone were replaced, not into the officially converted RepViT (leave the fold on for that)`,
  };
}

/** Tensor-holding children of a node. */
const tensorChildren = (n: ModuleNode) => [...n.children.values()].filter((c) => keysUnder(c).length > 0);

function matchFold(rule: FoldRule, node: ModuleNode, epsOf: (n: ModuleNode) => Pick<BNRef, 'eps' | 'epsSource'>, kind: 'module' | 'state_dict'): PlannedFold | undefined {
  const a = node.children.get(rule.first);
  const b = node.children.get(rule.second);
  if (rule.kind === 'implicit') return matchImplicit(rule, node, a, b); // the head keeps its anchors
  if (kind === 'module' && rule.result === 'replace') return matchReplaceModule(rule, node, epsOf);
  if (node.tensors.size) return undefined;
  if (rule.kind === 'distill_head') {
    if (!a) return undefined;
    const heads = [a, b].filter((x): x is ModuleNode => !!x).map((h) => matchFold(FOLD_SETS.repvit.rules[1], h, epsOf, 'state_dict'));
    if (heads.some((h) => !h)) return undefined;
    if (tensorChildren(node).length !== heads.length) return undefined;
    const h0 = heads[0]!;
    return { rule, node, heads: heads as PlannedFold[], info: { name: node.path, conv: h0.linear!.node.path, bn: heads.map((h) => h!.bn!.node.path).join(' + '), epsilon: h0.bn!.eps } };
  }
  if (!a || !b) return undefined;
  // Only the two children hold tensors (activations and the like may sit beside them).
  if (tensorChildren(node).some((c) => c !== a && c !== b)) {
    if (kind === 'module') throw new Reject(`has other children with weights (${tensorChildren(node).filter((c) => c !== a && c !== b).map((c) => c.name).join(', ')}) besides '${rule.first}' and '${rule.second}'.`);
    return undefined;
  }
  if (rule.kind === 'conv_bn') {
    const conv = asConv(a);
    const bn = asBN(b, epsOf);
    if (!conv || !bn) return undefined;
    if (!isFloatType(conv.weight.dtype)) throw new Reject(`'${conv.node.path}' weight is not a float tensor.`);
    if (bn.mean.shape[0] !== conv.weight.shape[0]) throw new Reject(`'${bn.node.path}' has ${bn.mean.shape[0]} channels, '${conv.node.path}' outputs ${conv.weight.shape[0]}.`);
    return { rule, node, conv, bn, info: { name: node.path, conv: conv.node.path, bn: bn.node.path, epsilon: bn.eps } };
  }
  const bn = asBN(a, epsOf);
  const w = b.tensors.get('weight');
  if (!bn || !w || w.shape.length !== 2 || b.tensors.has('running_mean')) return undefined;
  if (bn.mean.shape.length !== 1 || bn.mean.shape[0] !== w.shape[1]) throw new Reject(`'${bn.node.path}' has ${bn.mean.shape[0]} features, '${b.path}' takes ${w.shape[1]}.`);
  return { rule, node, bn, linear: { node: b, weight: w, bias: b.tensors.get('bias') }, info: { name: node.path, conv: b.path, bn: bn.node.path, epsilon: bn.eps } };
}

/** The plain torch.nn layers a RepViT fold is made of. */
const TORCH_LAYER = {
  conv: /^torch\.nn\.modules\.conv\.Conv2d$/,
  bn2d: /^torch\.nn\.modules\.batchnorm\.BatchNorm2d$/,
  bn1d: /^torch\.nn\.modules\.batchnorm\.BatchNorm1d$/,
  linear: /^torch\.nn\.modules\.linear\.Linear$/,
};

/**
 * A RepViT module object that replace_batchnorm replaces by one folded layer (Conv2d_BN → nn.Conv2d,
 * BN_Linear → nn.Linear, Classfier → one nn.Linear): nothing else may be lost with it. Its two
 * children must be the plain torch.nn layers its fuse() reads (Classfier: the BN_Linear heads its
 * forward calls, as its `distillation` flag says); any other child that is not inert (nn.Identity,
 * Dropout) and any tensor of its own leaves the module unfolded, named with its class.
 */
function matchReplaceModule(rule: FoldRule, node: ModuleNode, epsOf: (n: ModuleNode) => Pick<BNRef, 'eps' | 'epsSource'>): PlannedFold {
  const what = (n: ModuleNode) => `'${n.name}' (${n.className ?? 'no class'})`;
  if (node.tensors.size) throw new Reject(`has tensors of its own (${[...node.tensors.keys()].join(', ')}) that the folded layer would lose.`);
  const extra = [...node.children.values()].filter((c) => c.name !== rule.first && c.name !== rule.second && !(isInertClass(c.className) && !c.tensors.size && !c.children.size));
  if (extra.length) throw new Reject(`not understood: ${extra.map(what).join(', ')} beside '${rule.first}' and '${rule.second}'; the folded layer would lose ${extra.length === 1 ? 'it' : 'them'}.`);
  if (rule.kind === 'distill_head') {
    const distillation = node.attrs.get('distillation');
    if (typeof distillation !== 'boolean') throw new Reject(`has no boolean 'distillation' attribute (Classfier.forward reads it to average the two heads).`);
    // distillation=False: the forward and Classfier.fuse use `classifier` only.
    const heads = (distillation ? [rule.first, rule.second] : [rule.first]).map((name) => {
      const h = node.children.get(name);
      if (!h) throw new Reject(`has no '${name}' head (distillation=${distillation ? 'True' : 'False'}).`);
      if (last(h.className) !== 'BN_Linear') throw new Reject(`head ${what(h)} is not a BN_Linear, which Classfier.fuse folds.`);
      try {
        return matchReplaceModule(FOLD_SETS.repvit.rules[1], h, epsOf);
      } catch (err) {
        if (err instanceof Reject) throw new Reject(`head '${h.name}': ${err.message}`);
        throw err;
      }
    });
    const h0 = heads[0];
    return { rule, node, heads, info: { name: node.path, conv: h0.linear!.node.path, bn: heads.map((h) => h.bn!.node.path).join(' + '), epsilon: h0.bn!.eps } };
  }
  const want = rule.kind === 'conv_bn' ? [TORCH_LAYER.conv, TORCH_LAYER.bn2d] : [TORCH_LAYER.bn1d, TORCH_LAYER.linear];
  [rule.first, rule.second].forEach((name, i) => {
    const c = node.children.get(name);
    if (!c) throw new Reject(`has no '${name}' child.`);
    if (!want[i].test(c.className ?? '') || c.children.size) throw new Reject(`${what(c)} is not the plain torch.nn layer its fuse() reads.`);
  });
  const f = matchFold(rule, node, epsOf, 'state_dict');
  if (!f) throw new Reject(`'${rule.first}' and '${rule.second}' do not hold the weights and running statistics a fold needs.`);
  return f;
}

/** YOLOv7's IDetect/IAuxDetect: head convs m.<i> (1×1, with bias), ia.<i>.implicit (1, in, 1, 1), im.<i>.implicit (1, out, 1, 1). */
function matchImplicit(rule: FoldRule, node: ModuleNode, ia: ModuleNode | undefined, im: ModuleNode | undefined): PlannedFold | undefined {
  const m = node.children.get('m');
  if (!m || !ia || !im) return undefined;
  const parts: NonNullable<PlannedFold['implicit']> = [];
  for (const [i, cn] of m.children) {
    const a = ia.children.get(i)?.tensors.get('implicit');
    const mm = im.children.get(i)?.tensors.get('implicit');
    if (!a || !mm) {
      if (ia.children.has(i) || im.children.has(i)) throw new Reject(`'${node.path}.ia.${i}'/'${node.path}.im.${i}' hold no 'implicit' tensor.`);
      continue; // IAuxDetect: only the first nl convs have implicit layers
    }
    const conv = asConv(cn);
    if (!conv) throw new Reject(`'${cn.path}' is not a conv.`);
    if (conv.kernel.some((k) => k !== 1) || (conv.groups ?? 1) !== 1) throw new Reject(`'${cn.path}' is not a 1×1 conv (the official fuse multiplies it as a matrix).`);
    if (!conv.bias) throw new Reject(`'${cn.path}' has no bias to take the ImplicitA term.`);
    const [cout, cin] = conv.weight.shape;
    if (numelOf(a.shape) !== cin || numelOf(mm.shape) !== cout) throw new Reject(`'${node.path}.ia.${i}'/'im.${i}' do not match '${cn.path}' (${cin} in, ${cout} out).`);
    parts.push({ conv, bias: conv.bias, ia: a, im: mm });
  }
  if (!parts.length) return undefined;
  return { rule, node, implicit: parts };
}

/** A head conv with its implicit layers folded: W·im, (b + W·ia)·im. */
export function implicitValues(p: NonNullable<PlannedFold['implicit']>[number]): { weight: Float64Array; bias: Float64Array } {
  const [cout, cin] = p.conv.weight.shape;
  const w = f64(p.conv.weight, cout * cin, 0);
  const b = f64(p.bias, cout, 0);
  const a = f64(p.ia, cin, 0);
  const m = f64(p.im, cout, 1);
  for (let o = 0; o < cout; o++) {
    let acc = b[o];
    for (let i = 0; i < cin; i++) {
      acc += w[o * cin + i] * a[i];
      w[o * cin + i] *= m[o];
    }
    b[o] = acc * m[o];
  }
  return { weight: w, bias: b };
}

function implicitTensors(p: NonNullable<PlannedFold['implicit']>[number], dtype: DType, asParameter: boolean, requiresGrad: boolean): { weight: NewTensor; bias: NewTensor } {
  let v: ReturnType<typeof implicitValues> | undefined;
  const values = () => {
    if (!v) {
      v = implicitValues(p);
      checkFinite(v.weight, `${p.conv.node.path}: the folded weight`);
      checkFinite(v.bias, `${p.conv.node.path}: the folded bias`);
    }
    return v;
  };
  const shape = p.conv.weight.shape;
  return {
    weight: new NewTensor(dtype, shape.slice(), () => encodeFloats(values().weight, dtype), requiresGrad, asParameter),
    bias: new NewTensor(dtype, [shape[0]], () => encodeFloats(values().bias, dtype), requiresGrad, asParameter),
  };
}

/** Elements the fold adds to the state_dict minus those it removes (a BN's num_batches_tracked included). */
export function foldParamsDelta(f: PlannedFold): number {
  if (f.implicit) return 0;
  const removed = f.rule.result === 'replace' ? [f.node] : [f.conv!.node, f.bn!.node];
  let before = 0;
  for (const r of removed) for (const n of walk(r)) for (const t of n.tensors.values()) before += numelOf(t.shape);
  const shape = f.conv ? f.conv.weight.shape : f.linear ? f.linear.weight.shape : f.heads![0].linear!.weight.shape;
  return numelOf(shape) + shape[0] - before;
}

// ----- fold math (float64, rounded once) --------------------------------------------------------

const f64 = (t: CkptTensor | undefined, n: number, fill: number): Float64Array => {
  if (!t) return new Float64Array(n).fill(fill);
  const v = t.read();
  const out = new Float64Array(n);
  for (let i = 0; i < n; i++) out[i] = Number(v[i]);
  return out;
};

/** Per-channel scale γ/√(var+ε) and shift β − μ·scale of a BN. */
function bnAffine(bn: BNRef): { scale: Float64Array; shift: Float64Array } {
  const n = bn.mean.shape[0];
  const gamma = f64(bn.gamma, n, 1);
  const beta = f64(bn.beta, n, 0);
  const mean = f64(bn.mean, n, 0);
  const v = f64(bn.variance, n, 0);
  const scale = new Float64Array(n);
  const shift = new Float64Array(n);
  for (let i = 0; i < n; i++) {
    scale[i] = gamma[i] / Math.sqrt(v[i] + bn.eps);
    shift[i] = beta[i] - mean[i] * scale[i];
  }
  return { scale, shift };
}

/** Weight and bias of a planned fold, in float64. */
export function foldValues(f: PlannedFold): { shape: number[]; weight: Float64Array; bias: Float64Array } {
  if (f.rule.kind === 'distill_head') {
    const parts = f.heads!.map(foldValues);
    const w = new Float64Array(parts[0].weight.length);
    const b = new Float64Array(parts[0].bias.length);
    for (const p of parts) {
      if (p.weight.length !== w.length) throw new RepFuseError(`'${f.node.path}': the classifier heads have different shapes.`);
      for (let i = 0; i < w.length; i++) w[i] += p.weight[i] / parts.length;
      for (let i = 0; i < b.length; i++) b[i] += p.bias[i] / parts.length;
    }
    return { shape: parts[0].shape, weight: w, bias: b };
  }
  const { scale, shift } = bnAffine(f.bn!);
  if (f.rule.kind === 'conv_bn') {
    const shape = f.conv!.weight.shape;
    const cout = shape[0];
    const per = numelOf(shape) / cout;
    const w = f64(f.conv!.weight, numelOf(shape), 0);
    const cb = f64(f.conv!.bias, cout, 0);
    const bias = new Float64Array(cout);
    for (let o = 0; o < cout; o++) {
      for (let i = o * per; i < (o + 1) * per; i++) w[i] *= scale[o];
      bias[o] = cb[o] * scale[o] + shift[o];
    }
    return { shape, weight: w, bias };
  }
  // BN (over the Linear's inputs) then Linear: W·diag(scale), b + W·shift.
  const [out, inF] = f.linear!.weight.shape;
  const w = f64(f.linear!.weight, out * inF, 0);
  const bias = f64(f.linear!.bias, out, 0);
  for (let o = 0; o < out; o++) {
    let acc = 0;
    for (let i = 0; i < inF; i++) {
      acc += w[o * inF + i] * shift[i];
      w[o * inF + i] *= scale[i];
    }
    bias[o] += acc;
  }
  return { shape: [out, inF], weight: w, bias };
}

/** The fold's weight and bias as lazily produced tensors in `dtype`. */
export function foldTensors(f: PlannedFold, dtype: DType, asParameter: boolean, requiresGrad: boolean): { weight: NewTensor; bias: NewTensor } {
  let v: ReturnType<typeof foldValues> | undefined;
  const values = () => {
    if (!v) {
      v = foldValues(f);
      checkFinite(v.weight, `${f.node.path}: the folded weight`);
      checkFinite(v.bias, `${f.node.path}: the folded bias`);
    }
    return v;
  };
  const shape = f.rule.kind === 'conv_bn' ? f.conv!.weight.shape : f.rule.kind === 'bn_linear' ? f.linear!.weight.shape : f.heads![0].linear!.weight.shape;
  const weight = new NewTensor(dtype, shape.slice(), () => encodeFloats(values().weight, dtype), requiresGrad, asParameter);
  const bias = new NewTensor(dtype, [shape[0]], () => encodeFloats(values().bias, dtype), requiresGrad, asParameter);
  return { weight, bias };
}

/** The dtype a fold is written in: the option, else its own weight's. */
export function foldDtype(f: PlannedFold, dtype?: DType): DType {
  if (dtype !== undefined) return dtype;
  if (f.conv) return f.conv.weight.dtype;
  if (f.linear) return f.linear.weight.dtype;
  return f.heads![0].linear!.weight.dtype;
}

// ----- state_dicts ---------------------------------------------------------------------------------

/** What replaces a group of keys: the new entries, written where the first removed key was. */
interface Replacement {
  removed: string[];
  entries: [string, TorchTensor | NewTensor][];
}

/** Keys a block's deploy layout removes from the state_dict, and the base name of its fused conv. */
export function blockDeployKeys(b: CkptBlock): { removed: string[]; base: string } {
  const lay = FAMILIES[b.family].deploy;
  const keep = new Set(lay.keep ?? []);
  let removed: string[];
  if (lay.replaceBlock) removed = keysUnder(b.node).filter((k) => ![...keep].some((name) => k.startsWith(`${b.node.path}.${name}.`)));
  else {
    removed = [];
    for (const name of [...lay.remove, ...(lay.setNone ?? [])]) {
      if (keep.has(name)) continue;
      const c = b.node.children.get(name);
      if (c) removed.push(...keysUnder(c));
      const t = b.node.tensors.get(name);
      if (t) removed.push(t.key);
    }
  }
  const base = lay.replaceBlock ? b.node.path : b.node.path ? `${b.node.path}.${lay.module}` : lay.module;
  return { removed: [...new Set(removed)], base };
}

/**
 * The deploy state_dict: every block's keys replaced by its family's deploy keys and every planned
 * fold's by the folded conv/linear, each at the place of the first key it replaces; the other
 * tensors as they are (converted to `dtype` when given).
 */
export function deployStateDict(
  tensors: Map<string, TorchTensor>,
  blocks: CkptBlock[],
  folds: PlannedFold[],
  fused: (b: CkptBlock, dtype: DType) => { weight: NewTensor; bias: NewTensor },
  convert: (t: TorchTensor) => TorchTensor | NewTensor,
  dtype?: DType,
): Map<string, TorchTensor | NewTensor> {
  const reps: Replacement[] = [];
  for (const b of blocks) {
    const { removed, base } = blockDeployKeys(b);
    if (!removed.length) continue;
    const { weight, bias } = fused(b, dtype ?? b.branches.find((x) => x.conv)!.conv!.weight.dtype);
    reps.push({ removed, entries: [[`${base}.weight`, weight], [`${base}.bias`, bias]] });
  }
  for (const f of folds) {
    if (f.implicit) {
      for (const p of f.implicit) {
        const { weight, bias } = implicitTensors(p, dtype ?? p.conv.weight.dtype, false, false);
        reps.push({ removed: [p.conv.weight.key, p.bias.key], entries: [[p.conv.weight.key, weight], [p.bias.key, bias]] });
      }
      continue;
    }
    const { weight, bias } = foldTensors(f, foldDtype(f, dtype), false, false);
    const base = f.rule.result === 'replace' ? f.node.path : f.conv!.node.path;
    const removed = f.rule.result === 'replace' ? keysUnder(f.node) : [...keysUnder(f.conv!.node), ...keysUnder(f.bn!.node)];
    reps.push({ removed, entries: [[`${base}.weight`, weight], [`${base}.bias`, bias]] });
  }
  const at = new Map<string, Replacement>();
  const removed = new Set<string>();
  const order = [...tensors.keys()];
  const index = new Map(order.map((k, i) => [k, i]));
  for (const r of reps) {
    const first = r.removed.filter((k) => index.has(k)).sort((x, y) => index.get(x)! - index.get(y)!)[0];
    if (first === undefined) continue;
    at.set(first, r);
    for (const k of r.removed) removed.add(k);
  }
  const out = new Map<string, TorchTensor | NewTensor>();
  for (const [k, t] of tensors) {
    const r = at.get(k);
    if (r) for (const [nk, nt] of r.entries) out.set(nk, nt);
    if (!removed.has(k)) out.set(k, convert(t));
  }
  return out;
}

// ----- module objects ------------------------------------------------------------------------------

export { isModuleObject };

/** The module object at a dotted path under `root`, and its parent. */
export function objectAt(root: PyObject, p: string): { obj?: PyObject; parent?: PyObject; name: string } {
  let o: PyValue | undefined = root;
  let parent: PyObject | undefined;
  const parts = p.split('.').filter(Boolean);
  for (const name of parts) {
    if (!isModuleObject(o)) return { name };
    parent = o;
    o = modulesOf(o).get(name);
  }
  return { obj: isModuleObject(o) ? o : undefined, parent, name: parts[parts.length - 1] ?? '' };
}

function shallowClone(d: PyDict): PyDict {
  const c = new PyDict(d.ordered);
  for (const [k, v] of d) c.set(k, v instanceof PyDict && v.size === 0 ? new PyDict(v.ordered) : v);
  return c;
}

/** A new module object like `template` (same class, same plain attributes) holding `weight` and `bias`. */
function moduleLike(template: PyObject, weight: NewTensor, bias: NewTensor, attrs: Record<string, PyValue> = {}): PyObject {
  const st = shallowClone(template.state as PyDict);
  const p = new PyDict(true);
  p.set('weight', weight);
  p.set('bias', bias);
  st.set('_parameters', p);
  st.set('_buffers', new PyDict(true));
  st.set('_modules', new PyDict(true));
  for (const [k, v] of Object.entries(attrs)) st.set(k, v);
  const o = new PyObject(template.module, template.name, template.how, template.args, template.kwargs);
  o.callee = template.callee;
  o.state = st;
  return o;
}

/** Whether the template's weight is a parameter that requires grad (the fused one follows it). */
function requiresGradOf(template: PyObject): boolean {
  const w = ((template.state as PyDict).get('_parameters') as PyDict | undefined)?.get('weight');
  return w instanceof TorchTensor ? w.requiresGrad : w instanceof NewTensor ? w.requiresGrad : true;
}

/**
 * Families whose official conversion ends with `for para in self.parameters(): para.detach_()`:
 * every parameter left in the block, the new conv's included, stops requiring grad. Not RepVGG:
 * DingXiaoH/RepVGG's switch_to_deploy detached from 2021 until commit 82b28bb (2022-09) and no
 * longer does; its rbr_reparam is a fresh nn.Conv2d whose parameters require grad. FastViT's
 * RepMixer and RepCPE detach; ReparamLargeKernelConv (FastViT's reparameterize, RepLKNet's
 * merge_kernel) does not.
 */
const DETACHES = new Set<string>(['yolov6', 'qarepvgg', 'qarepvggv2', 'mobileone', 'dbb', 'ultralytics_repconv', 'yolov9', 'fastvit_repmixer', 'fastvit_repcpe']);

/** `para.detach_()` on every parameter of a module tree: requires_grad becomes False. */
function detachParameters(root: PyObject): void {
  const seen = new Set<PyObject>();
  const visit = (o: PyObject) => {
    if (seen.has(o)) return;
    seen.add(o);
    const params = (o.state as PyDict).get('_parameters');
    if (params instanceof PyDict) {
      for (const [k, v] of params) {
        if (v instanceof TorchTensor && v.requiresGrad) params.set(k, v.asParameter(false));
        else if (v instanceof NewTensor && v.requiresGrad) params.set(k, new NewTensor(v.dtype, v.shape, v.storage, false, v.isParameter));
      }
    }
    for (const [, c] of modulesOf(o)) if (isModuleObject(c)) visit(c);
  };
  visit(root);
}

/** Deletes an attribute the way `del module.name` does: from _modules, _parameters, _buffers or __dict__. */
function deleteAttr(obj: PyObject, name: string): void {
  const st = obj.state as PyDict;
  for (const field of ['_modules', '_parameters', '_buffers']) {
    const d = st.get(field);
    if (d instanceof PyDict) d.delete(name);
  }
  st.delete(name);
}

/**
 * Switches one block's module object to its family's deploy form, in place, as the official
 * conversion does: `self.<module> = fused conv` (in place when the name exists, else appended),
 * then the removed children deleted, slots set to None, flags set and methods bound.
 */
export function deployBlockObject(block: CkptBlock, root: PyObject, fused: (b: CkptBlock, dtype: DType, requiresGrad: boolean) => { weight: NewTensor; bias: NewTensor }, dtype?: DType): void {
  const lay = FAMILIES[block.family].deploy;
  const { obj, parent, name } = objectAt(root, block.node.path);
  if (!obj) throw new RepFuseError(`cannot find the module '${block.node.path}' to switch to deploy form.`);
  const convRef = block.branches.find((b) => b.conv)!.conv!;
  const template = objectAt(obj, convRef.node.path.slice(block.node.path.length)).obj;
  if (!template) throw new RepFuseError(`cannot find the conv module '${convRef.node.path}' to model the fused conv on.`);
  const { weight, bias } = fused(block, dtype ?? convRef.weight.dtype, requiresGradOf(template));
  const tuple = (xs: number[]) => new PyTuple(xs);
  const conv = moduleLike(template, weight, bias, {
    kernel_size: tuple(block.kernel),
    padding: tuple(block.kernel.map((k) => (k - 1) / 2)),
    in_channels: block.info.inChannels,
    out_channels: block.outChannels,
    groups: block.groups,
  });
  if (lay.convClass) {
    const dot = lay.convClass.lastIndexOf('.');
    conv.module = lay.convClass.slice(0, dot);
    conv.name = lay.convClass.slice(dot + 1);
  }
  if (lay.replaceBlock) {
    if (!parent) throw new RepFuseError(`'${block.node.path}' is the root module; it cannot be replaced by its fused conv.`);
    modulesOf(parent).set(name, conv);
    return;
  }
  const st = obj.state as PyDict;
  modulesOf(obj).set(lay.module, conv);
  for (const r of lay.remove) if (r !== lay.module && !(lay.keep ?? []).includes(r)) deleteAttr(obj, r);
  const params = st.get('_parameters') as PyDict;
  for (const n of lay.setNone ?? []) {
    if (params.has(n)) params.set(n, null);
    else st.set(n, null);
  }
  for (const [k, v] of Object.entries(lay.setAttrs ?? {})) st.set(k, v);
  for (const [k, m] of Object.entries(lay.bindMethods ?? {})) st.set(k, new PyBoundMethod(obj, m));
  const idBranch = lay.identityTensor ? block.branches.find((b) => b.kind === 'bn_identity') : undefined;
  if (lay.identityTensor && idBranch) st.set(lay.identityTensor, identityKernel(block, dtype ?? idBranch.bn?.gamma?.dtype ?? convRef.weight.dtype));
  if (DETACHES.has(block.family)) detachParameters(obj);
}

/** The identity as the block's k×k kernel (in × in/groups × kh × kw, ones at the centre), a plain tensor. */
function identityKernel(block: CkptBlock, dtype: DType): NewTensor {
  const cin = block.info.inChannels;
  const ipg = cin / block.groups;
  const [kh, kw] = block.kernel;
  const shape = [cin, ipg, kh, kw];
  return new NewTensor(dtype, shape, () => {
    const v = new Float64Array(numelOf(shape));
    for (let i = 0; i < cin; i++) v[((i * ipg + (i % ipg)) * kh + (kh - 1) / 2) * kw + (kw - 1) / 2] = 1;
    return encodeFloats(v, dtype);
  });
}

/** Applies one planned fold to the module objects under `root`, in place, as the official fuse does. */
export function foldObject(f: PlannedFold, root: PyObject, dtype?: DType): void {
  const { obj, parent, name } = objectAt(root, f.node.path);
  if (!obj) throw new RepFuseError(`cannot find the module '${f.node.path}' to fold.`);
  if (f.implicit) {
    // IDetect.fuse changes the head convs' parameters in place; ia/im stay; Model.fuse binds fuseforward.
    for (const p of f.implicit) {
      const conv = objectAt(root, p.conv.node.path).obj;
      if (!conv) throw new RepFuseError(`cannot find the head conv '${p.conv.node.path}'.`);
      const params = (conv.state as PyDict).get('_parameters') as PyDict;
      const { weight, bias } = implicitTensors(p, dtype ?? p.conv.weight.dtype, true, requiresGradOf(conv));
      params.set('weight', weight);
      params.set('bias', bias);
    }
    if (f.rule.forward) (obj.state as PyDict).set('forward', new PyBoundMethod(obj, f.rule.forward));
    return;
  }
  const dt = foldDtype(f, dtype);
  if (f.rule.result === 'inplace') {
    const conv = modulesOf(obj).get(f.rule.first);
    if (!isModuleObject(conv)) throw new RepFuseError(`'${f.node.path}.${f.rule.first}' is not a module object.`);
    // fuse_conv_and_bn: a new nn.Conv2d(..., bias=True).requires_grad_(False) (DBB's ConvBN: a plain new Conv2d).
    const { weight, bias } = foldTensors(f, dt, true, f.rule.requiresGrad ?? false);
    modulesOf(obj).set(f.rule.first, moduleLike(conv, weight, bias));
    deleteAttr(obj, f.rule.second);
    if (f.rule.forward) (obj.state as PyDict).set('forward', new PyBoundMethod(obj, f.rule.forward));
    return;
  }
  if (!parent) throw new RepFuseError(`'${f.node.path}' is the root module; it cannot be replaced by its folded layer.`);
  const templatePath = f.rule.kind === 'conv_bn' ? f.rule.first : f.rule.kind === 'bn_linear' ? f.rule.second : `${f.rule.first}.${FOLD_SETS.repvit.rules[1].second}`;
  const template = objectAt(obj, templatePath).obj;
  if (!template) throw new RepFuseError(`cannot find '${f.node.path}.${templatePath}' to model the folded layer on.`);
  const { weight, bias } = foldTensors(f, dt, true, requiresGradOf(template));
  modulesOf(parent).set(name, moduleLike(template, weight, bias));
}
