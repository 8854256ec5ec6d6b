// Ultralytics RepVGGDW (ultralytics/nn/modules/block.py, YOLOv10): depthwise 7×7 Conv + 3×3 Conv.
import { matchConvConv1, only } from './shared';
import { defineFamily } from './types';

export default defineFamily({
  id: 'ultralytics_repvggdw',
  label: 'Ultralytics RepVGGDW',
  icon: { id: 'symbol-array', color: 'charts.purple' },
  eps: 1e-3,
  classes: ['RepVGGDW'],
  modules: ['conv', 'conv1'],
  after: ['act'],
  deploy: { module: 'conv', remove: ['conv', 'conv1'], bindMethods: { forward: 'forward_fuse' } },
  official: { repo: 'ultralytics/ultralytics', path: 'ultralytics/nn/modules/block.py', fn: 'RepVGGDW.fuse' },
  match: (n, ctx) => only('ultralytics_repvggdw', matchConvConv1(n, ctx)),
  onnx: (f) => /\/conv\b/.test(f.names) && /\/conv1\b/.test(f.names) && f.depthwise && !f.postBN,
});
