// RepVGG (DingXiaoH/RepVGG): 3×3 conv+BN + 1×1 conv+BN + BN(x).
import { matchRbr, only } from './shared';
import { defineFamily } from './types';

export default defineFamily({
  id: 'repvgg',
  label: 'RepVGG',
  icon: { id: 'symbol-structure', color: 'charts.green' },
  eps: 1e-5,
  classes: ['RepVGGBlock'],
  modules: ['rbr_dense', 'rbr_1x1', 'rbr_identity'],
  after: ['nonlinearity', 'se'],
  deploy: { module: 'rbr_reparam', remove: ['rbr_dense', 'rbr_1x1', 'rbr_identity', 'id_tensor'], setAttrs: { deploy: true } },
  official: { repo: 'DingXiaoH/RepVGG', path: 'repvgg.py', fn: 'RepVGGBlock.switch_to_deploy (repvgg_model_convert)' },
  match: (n, ctx) => only('repvgg', matchRbr(n, ctx)),
  onnx: (f) => /\brbr_dense\b/.test(f.names) && !f.postBN,
});
