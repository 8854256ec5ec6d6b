// RepLKNet / FastViT ReparamLargeKernelConv (DingXiaoH/RepLKNet-pytorch replknet.py, apple/ml-fastvit
// models/modules/replknet.py): a large k×k conv+BN `lkb_origin` plus a centred small conv+BN
// `small_conv`; FastViT applies `activation` after the sum.
import { asConvBN, type CkptBranch, Reject } from '../checkpoint/match';
import { defineFamily } from './types';

export default defineFamily({
  id: 'replknet',
  label: 'ReparamLargeKernelConv',
  icon: { id: 'symbol-namespace', color: 'charts.blue' },
  eps: 1e-5,
  classes: ['ReparamLargeKernelConv'],
  modules: ['lkb_origin', 'small_conv'],
  after: ['activation'],
  deploy: { module: 'lkb_reparam', remove: ['lkb_origin', 'small_conv'] },
  official: { repo: 'DingXiaoH/RepLKNet-pytorch', path: 'replknet.py', fn: 'ReparamLargeKernelConv.merge_kernel (RepLKNet.structural_reparam); FastViT: ReparamLargeKernelConv.reparameterize' },
  match(n, ctx) {
    if (!n.children.has('lkb_origin')) return undefined;
    const eps = ctx.eps('replknet');
    const big = asConvBN(n.children.get('lkb_origin'), eps);
    if (!big) throw new Reject(`'lkb_origin' is not a conv followed by a BatchNorm.`);
    const branches: CkptBranch[] = [{ kind: 'conv_bn', ...big }];
    if (n.children.has('small_conv')) {
      const small = asConvBN(n.children.get('small_conv'), eps);
      if (!small) throw new Reject(`'small_conv' is not a conv followed by a BatchNorm.`);
      branches.push({ kind: 'conv_bn', ...small });
    }
    return { family: 'replknet', branches };
  },
  onnx: (f) => /\blkb_origin\b/.test(f.names),
});
