// RepViT's RepVGGDW (THU-MIG/RepViT, model/repvit.py): conv (Conv2d_BN) + conv1 (dw conv) + x, then BN.
import { matchConvConv1, only } from './shared';
import { defineFamily } from './types';

export default defineFamily({
  id: 'repvit',
  label: 'RepViT RepVGGDW',
  icon: { id: 'symbol-array', color: 'charts.purple' },
  eps: 1e-5,
  classes: ['RepVGGDW'],
  modules: ['conv', 'conv1', 'bn'],
  // The official replace_batchnorm puts the fused Conv2d in the block's place (replaceBlock); `module`
  // is where writers that keep the block put it.
  deploy: { module: 'conv', remove: ['conv', 'conv1', 'bn'], replaceBlock: true },
  official: { repo: 'THU-MIG/RepViT', path: 'model/repvit.py', fn: 'RepVGGDW.fuse (replace_batchnorm)' },
  match: (n, ctx) => only('repvit', matchConvConv1(n, ctx)),
  onnx: (f) => /\/conv\b/.test(f.names) && /\/conv1\b/.test(f.names) && f.depthwise && f.postBN,
});
