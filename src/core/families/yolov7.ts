// YOLOv7's RepConv (WongKinYiu/yolov7): rbr_dense / rbr_1x1 are nn.Sequential(conv, BN), BN(x).
import { matchRbr, only } from './shared';
import { defineFamily } from './types';

export default defineFamily({
  id: 'yolov7',
  label: 'YOLOv7 RepConv',
  icon: { id: 'layers', color: 'charts.blue' },
  eps: 1e-3,
  classes: ['RepConv'],
  modules: ['rbr_dense', 'rbr_1x1', 'rbr_identity'],
  after: ['act'],
  deploy: { module: 'rbr_reparam', remove: ['rbr_dense', 'rbr_1x1', 'rbr_identity'], setNone: ['rbr_dense', 'rbr_1x1', 'rbr_identity'], setAttrs: { deploy: true } },
  official: { repo: 'WongKinYiu/yolov7', path: 'models/common.py', fn: 'RepConv.fuse_repvgg_block (Model.fuse)' },
  match: (n, ctx) => only('yolov7', matchRbr(n, ctx)),
  onnx: (f) => /rbr_dense[./]0\b/.test(f.names),
});
