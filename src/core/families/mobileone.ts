// MobileOne (apple/ml-mobileone; FastViT's models/modules/mobileone.py is the same block):
// k conv+BN branches in `rbr_conv`, a 1×1 conv+BN `rbr_scale`, BN(x) `rbr_skip`.
import { asBN, asConvBN, type CkptBranch, type EpsOf, Reject } from '../checkpoint/match';
import type { ModuleNode } from '../checkpoint/tree';
import { defineFamily } from './types';

/** The branches of a MobileOneBlock (also inside FastViT's RepMixer, whose `norm` has only `rbr_skip`). */
export function mobileOneBranches(n: ModuleNode, eps: EpsOf): CkptBranch[] {
  const c = n.children;
  const branches: CkptBranch[] = [];
  for (const b of c.get('rbr_conv')?.children.values() ?? []) {
    const cb = asConvBN(b, eps);
    if (!cb) throw new Reject(`'${b.path}' is not a conv followed by a BatchNorm.`);
    branches.push({ kind: 'conv_bn', ...cb });
  }
  if (c.get('rbr_scale')) {
    const s = asConvBN(c.get('rbr_scale'), eps);
    if (!s) throw new Reject(`'rbr_scale' is not a conv followed by a BatchNorm.`);
    branches.push({ kind: 'conv_bn', ...s });
  }
  const skip = asBN(c.get('rbr_skip'), eps);
  if (skip) branches.push({ kind: 'bn_identity', bn: skip });
  return branches;
}

export default defineFamily({
  id: 'mobileone',
  label: 'MobileOne',
  icon: { id: 'symbol-event', color: 'charts.orange' },
  eps: 1e-5,
  classes: ['MobileOneBlock'],
  modules: ['rbr_conv', 'rbr_scale', 'rbr_skip'],
  after: ['activation', 'se'],
  // reparameterize deletes the branches but keeps the identity kernel _fuse_bn_tensor cached.
  deploy: { module: 'reparam_conv', remove: ['rbr_conv', 'rbr_scale', 'rbr_skip'], setAttrs: { inference_mode: true }, identityTensor: 'id_tensor' },
  official: { repo: 'apple/ml-mobileone', path: 'mobileone.py', fn: 'MobileOneBlock.reparameterize (reparameterize_model)' },
  match(n, ctx) {
    const c = n.children;
    if (!(c.has('rbr_conv') || c.has('rbr_skip') || (c.has('rbr_scale') && !c.has('rbr_dense')))) return undefined;
    const branches = mobileOneBranches(n, ctx.eps('mobileone'));
    if (!branches.some((b) => b.conv)) return undefined;
    return { family: 'mobileone', branches };
  },
  onnx: (f) => /\brbr_conv\b|\brbr_scale\b|\brbr_skip\b/.test(f.names),
});
