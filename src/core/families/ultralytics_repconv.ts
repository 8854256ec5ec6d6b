// Ultralytics RepConv (ultralytics/nn/modules/conv.py): conv1 (k×k Conv) + conv2 (1×1 Conv) + BN(x).
import { matchConv12, only } from './shared';
import { defineFamily } from './types';

export default defineFamily({
  id: 'ultralytics_repconv',
  label: 'Ultralytics RepConv',
  icon: { id: 'layers', color: 'charts.green' },
  eps: 1e-3,
  classes: ['RepConv'],
  modules: ['conv1', 'conv2', 'bn'],
  after: ['act'],
  // fuse_convs deletes conv1, conv2 and (when present) nm, bn — also a None bn — and id_tensor; Model.fuse() binds forward_fuse.
  deploy: { module: 'conv', remove: ['conv1', 'conv2', 'nm', 'bn', 'id_tensor'], bindMethods: { forward: 'forward_fuse' } },
  official: { repo: 'ultralytics/ultralytics', path: 'ultralytics/nn/modules/conv.py', fn: 'RepConv.fuse_convs (Model.fuse)' },
  match: (n, ctx) => only('ultralytics_repconv', matchConv12(n, ctx)),
  onnx: (f) => /\/conv1\b/.test(f.names) && /\/conv2\b/.test(f.names) && !f.scaled,
});
