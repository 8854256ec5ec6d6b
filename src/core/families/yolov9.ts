// YOLOv9 / GELAN RepConvN (WongKinYiu/yolov9, models/common.py): Ultralytics' RepConv layout
// without the BN identity; a state_dict cannot tell it from Ultralytics RepConv (same keys).
import { matchConv12, only } from './shared';
import { defineFamily } from './types';

export default defineFamily({
  id: 'yolov9',
  label: 'YOLOv9 RepConvN',
  icon: { id: 'layers', color: 'charts.yellow' },
  eps: 1e-3,
  classes: ['RepConvN'],
  modules: ['conv1', 'conv2'],
  after: ['act'],
  // fuse_convs deletes conv1, conv2 and (when present) nm, bn (RepConvN's bn is None) and id_tensor; Model.fuse() binds forward_fuse.
  deploy: { module: 'conv', remove: ['conv1', 'conv2', 'nm', 'bn', 'id_tensor'], bindMethods: { forward: 'forward_fuse' } },
  official: { repo: 'WongKinYiu/yolov9', path: 'models/common.py', fn: 'RepConvN.fuse_convs (Model.fuse)' },
  match: (n, ctx) => only('yolov9', matchConv12(n, ctx)),
});
