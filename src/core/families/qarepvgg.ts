// QARepVGG (YOLOv6's QARepVGGBlock): 3×3 conv+BN + raw 1×1 conv + x, then a BN on the sum that the
// official conversion keeps ("keep post bn for QAT").
import { matchRbr, only } from './shared';
import { defineFamily } from './types';

export default defineFamily({
  id: 'qarepvgg',
  label: 'QARepVGG',
  icon: { id: 'symbol-structure', color: 'charts.purple' },
  eps: 1e-5,
  classes: ['QARepVGGBlock'],
  modules: ['rbr_dense', 'rbr_1x1', 'rbr_identity', 'bn'],
  after: ['nonlinearity', 'se'],
  deploy: { module: 'rbr_reparam', remove: ['rbr_dense', 'rbr_1x1', 'rbr_identity', 'id_tensor'], keep: ['bn'], setAttrs: { deploy: true } },
  official: { repo: 'meituan/YOLOv6', path: 'yolov6/layers/common.py', fn: 'QARepVGGBlock.switch_to_deploy' },
  match: (n, ctx) => only('qarepvgg', matchRbr(n, ctx)),
  onnx: (f) => /\brbr_dense\b/.test(f.names) && f.postBN,
  variantOf: 'qarepvggv2',
});
