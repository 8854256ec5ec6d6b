// YOLOv6's RepVGGBlock (meituan/YOLOv6): RepVGG's branches with ConvModule children; BN ε 1e-3
// (yolov6/utils/torch_utils.py initialize_weights sets it on every BatchNorm2d).
import { matchRbr, only, YOLOV6_PATHS } from './shared';
import { defineFamily } from './types';

export default defineFamily({
  id: 'yolov6',
  label: 'YOLOv6 RepVGGBlock',
  icon: { id: 'symbol-structure', color: 'charts.blue' },
  eps: 1e-3,
  classes: ['RepVGGBlock'],
  modules: ['rbr_dense', 'rbr_1x1', 'rbr_identity'],
  after: ['nonlinearity', 'se'],
  deploy: { module: 'rbr_reparam', remove: ['rbr_dense', 'rbr_1x1', 'rbr_identity', 'id_tensor'], setAttrs: { deploy: true } },
  official: { repo: 'meituan/YOLOv6', path: 'yolov6/layers/common.py', fn: 'RepVGGBlock.switch_to_deploy' },
  match: (n, ctx) => only('yolov6', matchRbr(n, ctx)),
  onnx: (f) => /\brbr_dense\b/.test(f.names) && !f.postBN && YOLOV6_PATHS.test(`${f.names} ${f.modelNames ?? ''}`),
});
