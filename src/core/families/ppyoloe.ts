// PP-YOLOE's RepVggBlock (PaddleDetection, ppdet/modeling/backbones/cspresnet.py): conv1 (3×3
// ConvBNLayer) + alpha · conv2 (1×1 ConvBNLayer).
import { matchConv12, only } from './shared';
import { defineFamily } from './types';

export default defineFamily({
  id: 'ppyoloe',
  label: 'PP-YOLOE RepVgg',
  icon: { id: 'symbol-operator', color: 'charts.red' },
  eps: 1e-5,
  classes: ['RepVggBlock'],
  modules: ['conv1', 'conv2'],
  after: ['act'],
  deploy: { module: 'conv', remove: ['conv1', 'conv2'], setNone: ['alpha'] },
  official: { repo: 'PaddlePaddle/PaddleDetection', path: 'ppdet/modeling/backbones/cspresnet.py', fn: 'RepVggBlock.convert_to_deploy' },
  match: (n, ctx) => only('ppyoloe', matchConv12(n, ctx)),
  onnx: (f) => /\/conv1\b/.test(f.names) && /\/conv2\b/.test(f.names) && f.scaled,
});
