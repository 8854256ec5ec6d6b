// YOLOv6's QARepVGGBlockV2: QARepVGG plus `rbr_avg = nn.AvgPool2d(3, 1, 1)` (a 1/9 channel-diagonal
// 3×3 kernel) where the block keeps its width; the post-add BN stays in the deploy model.
import { matchRbr, only } from './shared';
import { defineFamily } from './types';

export default defineFamily({
  id: 'qarepvggv2',
  label: 'QARepVGG V2',
  icon: { id: 'symbol-structure', color: 'charts.red' },
  // YOLOv6's initialize_weights sets every BatchNorm2d's eps to 1e-3.
  eps: 1e-3,
  classes: ['QARepVGGBlockV2'],
  modules: ['rbr_dense', 'rbr_1x1', 'rbr_identity', 'rbr_avg', 'bn'],
  after: ['nonlinearity', 'se'],
  deploy: { module: 'rbr_reparam', remove: ['rbr_dense', 'rbr_1x1', 'rbr_identity', 'rbr_avg', 'id_tensor'], keep: ['bn'], setAttrs: { deploy: true } },
  official: { repo: 'meituan/YOLOv6', path: 'yolov6/layers/common.py', fn: 'QARepVGGBlockV2.switch_to_deploy' },
  match: (n, ctx) => only('qarepvggv2', matchRbr(n, ctx)),
  // A V2 block keeps rbr_avg only where it keeps its width: elsewhere the model's other blocks tell.
  onnx: (f) => f.postBN && (f.kinds.includes('avgpool') || (/\brbr_dense\b/.test(f.names) && /\brbr_avg\b/.test(f.modelNames ?? ''))),
  variantOf: 'qarepvgg',
});
