// Matchers shared by families that use the same child names and differ in details (RepVGG,
// YOLOv6, YOLOv7, QARepVGG/V2 all have `rbr_dense`; Ultralytics and PP-YOLOE share `conv1`/`conv2`;
// RepViT and Ultralytics share `conv`/`conv1`). Each decides the variant once; every family file of
// the group accepts only its own.
import { asAvgPool, asBN, asConv, asConvBN, type CkptBranch, type ConvRef, fmt, type MatchContext, type MatchResult, Reject } from '../checkpoint/match';
import { get, type ModuleNode, walk } from '../checkpoint/tree';

const lastSegment = (c: string | undefined) => (c ? c.slice(c.lastIndexOf('.') + 1) : undefined);

/** YOLOv6's module names, anywhere in the file (`backbone.ERBlock_2`, `neck.Rep_p4`). */
export const YOLOV6_PATHS = /ERBlock_|Rep_p\d|Rep_n\d|\bneck[./]Rep/;
/** A whole YOLOv6 model: EfficientRep backbone and EffiDeHead names. */
const YOLOV6_MODEL = /\bbackbone\.ERBlock_\d/;
const YOLOV6_HEAD = /\bdetect\.(proj_conv|stems|cls_preds|reg_preds)\b/;
/** Where YOLOv6's EfficientRep backbone and RepPAN neck put their stride-2 blocks. */
const YOLOV6_STRIDE2 = /(^|\.)(stem|downsample\d*)$|(^|\.)ERBlock_\d+\.0$/;

/** One result per node and detection run (the group's family files all ask for the same node). */
const cache = new WeakMap<ModuleNode, { ctx: MatchContext; r: MatchResult | undefined }>();

/** The `rbr_dense` group: returns the variant's result, or undefined when `n` is not such a block. */
export function matchRbr(n: ModuleNode, ctx: MatchContext): MatchResult | undefined {
  const hit = cache.get(n);
  if (hit && hit.ctx === ctx) return hit.r;
  const r = matchRbrUncached(n, ctx);
  cache.set(n, { ctx, r });
  return r;
}

function matchRbrUncached(n: ModuleNode, ctx: MatchContext): MatchResult | undefined {
  const c = n.children;
  if (!c.has('rbr_dense')) return undefined;
  const cls = lastSegment(n.className);
  const assumptions: string[] = [];
  let stride: number[] | undefined;
  const sequential = get(n, 'rbr_dense', '0') !== undefined;
  const rawOne = asConv(c.get('rbr_1x1'));
  const isQA = !!rawOne && !!asBN(c.get('bn'), () => ({ eps: 0, epsSource: 'model' }));
  let family: string;
  if (sequential) family = 'yolov7';
  else if (isQA) {
    if (n.className) family = cls === 'QARepVGGBlockV2' || c.has('rbr_avg') ? 'qarepvggv2' : 'qarepvgg';
    else if (ctx.forced === 'qarepvgg' || ctx.forced === 'qarepvggv2') {
      family = ctx.forced;
      assumptions.push(`${family === 'qarepvggv2' ? 'QARepVGGBlockV2' : 'QARepVGGBlock'} chosen with --family ${family} (a state_dict cannot tell the two apart)`);
    } else {
      // The previous behaviour (and the paper's block) stays the default; the note says what to do
      // for the other variant, loudly when YOLOv6's names suggest its QA configs.
      family = 'qarepvgg';
      assumptions.push(
        YOLOV6_PATHS.test(ctx.allPaths)
          ? "QARepVGGBlock assumed (no avg-pool branch): a state_dict cannot tell it from QARepVGGBlockV2, whose identity and avg-pool branches have no tensors. YOLOv6's QA configs (configs/qarepvgg/*.py, training_mode='qarepvggv2') train QARepVGGBlockV2: for such a checkpoint use --family qarepvggv2, or the fused weights miss its avg-pool branch"
          : 'QARepVGGBlock assumed (no avg-pool branch): a state_dict cannot tell it from QARepVGGBlockV2, whose avg-pool branch has no tensors; use --family qarepvggv2 for QARepVGGBlockV2',
      );
    }
  } else family = YOLOV6_PATHS.test(ctx.allPaths) || /yolov6/i.test(n.className ?? '') ? 'yolov6' : 'repvgg';
  // YOLOv6's initialize_weights sets every BatchNorm2d's eps to 1e-3, QARepVGG blocks included:
  // taken when the file is a whole YOLOv6 model (its backbone and EffiDeHead names).
  const eps = ctx.eps((family === 'qarepvgg' || family === 'qarepvggv2') && YOLOV6_MODEL.test(ctx.allPaths) && YOLOV6_HEAD.test(ctx.allPaths) ? 'yolov6' : family);
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
  const avg = c.get('rbr_avg');
  if (avg) {
    const pool = asAvgPool(avg);
    if (!pool) throw new Reject(`'rbr_avg' (${avg.className ?? 'no class'}) is not an average pooling RepFuse can read.`);
    branches.push({ kind: 'avgpool', pool });
  }
  if ((family === 'qarepvgg' || family === 'qarepvggv2') && !n.className && !id) {
    // nn.Identity and nn.AvgPool2d have no tensors, so a bare state_dict cannot show them: QARepVGG
    // has them exactly when the block keeps its width and has stride 1, neither of which a
    // state_dict stores. In YOLOv6's layout the stride-2 blocks sit at `stem`, `ERBlock_k.0` and
    // `downsampleN` (EfficientRep / RepPAN).
    const w = dense.conv.weight.shape;
    const yolov6 = YOLOV6_PATHS.test(ctx.allPaths);
    const stride2 = yolov6 && YOLOV6_STRIDE2.test(n.path);
    // Groups 1 and the same width in and out: the weight says it all. Otherwise (grouped blocks,
    // or a block that widens) the input width comes from the layer before.
    const cin = w[1] === w[0] ? w[1] : (ctx.previousOutChannels(n) ?? w[1]);
    const what = family === 'qarepvggv2' ? `identity and ${fmt(dense.conv.kernel)} avg-pool (count_include_pad) branches` : 'identity branch';
    if (stride2) {
      stride = dense.conv.kernel.map(() => 2);
      assumptions.push(`no ${what}: stride 2 assumed (YOLOv6 puts its stride-2 blocks at stem, ERBlock_k.0 and downsampleN)`);
    }
    else if (cin === w[0]) {
      branches.push({ kind: 'identity' });
      if (family === 'qarepvggv2') branches.push({ kind: 'avgpool', pool: { kernel: dense.conv.kernel } });
      assumptions.push(
        `${what} inferred (they have no tensors): ${w[1] === w[0] ? `the weight takes ${cin} input channels (groups 1)` : `the layer before outputs ${cin} channels`} = the block's output, stride 1 assumed`,
      );
    }
  }
  const postBN = family === 'qarepvgg' || family === 'qarepvggv2' ? asBN(c.get('bn'), eps) : undefined;
  return { family, branches, postBN, assumptions, stride };
}

/** The block's class, if pickled, tested against `re`; undefined for a state_dict. */
const repClass = (n: ModuleNode, re: RegExp) => (n.className ? re.test(n.className) : undefined);

/** Same channels, different kernels: can only be parallel branches of one input. */
export const parallelShapes = (a: ConvRef, b: ConvRef): boolean =>
  a.weight.shape[0] === b.weight.shape[0] && a.weight.shape[1] === b.weight.shape[1] && fmt(a.kernel) !== fmt(b.kernel);

/** PP-YOLOE's CSPResNet layout, or any block with alpha, marks the whole file as PP-YOLOE. */
const ppyoloeCache = new WeakMap<ModuleNode, boolean>();
function ppyoloeHints(root: ModuleNode, allPaths: string): boolean {
  let h = ppyoloeCache.get(root);
  if (h === undefined) {
    h = /\bstages\.\d+\.blocks\.\d+\.conv2\.conv1\b/.test(allPaths) || [...walk(root)].some((m) => m.children.has('conv1') && m.children.has('conv2') && m.tensors.has('alpha'));
    ppyoloeCache.set(root, h);
  }
  return h;
}

const rootOf = (n: ModuleNode): ModuleNode => {
  let r = n;
  while (r.parent) r = r.parent;
  return r;
};

/** `conv1` (k×k conv+BN) + `conv2` (1×1 conv+BN) [+ `bn` identity]: Ultralytics RepConv, YOLOv9 RepConvN, PP-YOLOE RepVggBlock. */
export function matchConv12(n: ModuleNode, ctx: MatchContext): MatchResult | undefined {
  const c = n.children;
  // conv1/conv2 are common names for convs in SERIES too (YOLOX, ResNet-style blocks). Only take
  // them as parallel branches when the class says so, or — in a bare state_dict — when the shapes
  // can only be parallel branches of one input.
  if (!(c.has('conv1') && c.has('conv2') && repClass(n, /Rep(Conv|Vgg|VGG)/) !== false)) return undefined;
  const alpha = n.tensors.get('alpha');
  const cls = lastSegment(n.className);
  const family = alpha || cls === 'RepVggBlock' || (!n.className && !c.has('bn') && ppyoloeHints(rootOf(n), ctx.allPaths)) ? 'ppyoloe' : cls === 'RepConvN' ? 'yolov9' : 'ultralytics_repconv';
  const eps = ctx.eps(family);
  const a = asConvBN(c.get('conv1'), eps);
  const b = asConvBN(c.get('conv2'), eps);
  if (!a || !b) return undefined;
  if (!n.className && !(parallelShapes(a.conv, b.conv) && b.conv.kernel.every((k) => k === 1))) return undefined;
  const branches: CkptBranch[] = [{ kind: 'conv_bn', ...a }, { kind: 'conv_bn', ...b, scale: alpha }];
  const id = asBN(c.get('bn'), eps);
  if (id && family !== 'ppyoloe') branches.push({ kind: 'bn_identity', bn: id });
  return { family, branches, ownTensors: alpha ? ['alpha'] : undefined };
}

/** `conv` + `conv1` depthwise: RepViT's RepVGGDW (conv+BN, raw conv, x, then BN) or Ultralytics' RepVGGDW (two conv+BN). */
export function matchConvConv1(n: ModuleNode, ctx: MatchContext): MatchResult | undefined {
  const c = n.children;
  if (!(c.has('conv') && c.has('conv1') && repClass(n, /RepVGGDW|RepVggDW|RepViT/i) !== false)) return undefined;
  const rvEps = ctx.eps('repvit');
  const rv = asConvBN(c.get('conv'), rvEps);
  const raw = asConv(c.get('conv1'));
  const post = asBN(c.get('bn'), rvEps);
  if (rv && raw && post && (n.className || (parallelShapes(rv.conv, raw) && rv.conv.weight.shape[1] === 1))) {
    return { family: 'repvit', branches: [{ kind: 'conv_bn', ...rv }, { kind: 'conv', conv: raw }, { kind: 'identity' }], postBN: post };
  }
  const eps = ctx.eps('ultralytics_repvggdw');
  const a = asConvBN(c.get('conv'), eps);
  const b = asConvBN(c.get('conv1'), eps);
  if (a && b && (n.className || (parallelShapes(a.conv, b.conv) && a.conv.weight.shape[1] === 1))) return { family: 'ultralytics_repvggdw', branches: [{ kind: 'conv_bn', ...a }, { kind: 'conv_bn', ...b }] };
  return undefined;
}

/** Only this family's result of a shared matcher. */
export const only = (id: string, r: MatchResult | undefined): MatchResult | undefined => (r && r.family === id ? r : undefined);
