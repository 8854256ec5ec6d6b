// RepGhost (ChengpengChen/RepGhost model/repghost.py): in a RepGhostModule, x1 = primary_conv(x)
// (kept), then cheap_operation(x1) (depthwise conv+BN) + Σ fusion_bn[i](fusion_conv[i](x1)) with
// (Identity, BN) pairs (reparam_bn) or (Identity, Identity) (reparam_identity). The fused conv
// takes cheap_operation's place.
import { asBN, asConvBN, type CkptBranch, Reject } from '../checkpoint/match';
import { defineFamily } from './types';

export default defineFamily({
  id: 'repghost',
  label: 'RepGhost',
  icon: { id: 'symbol-event', color: 'charts.blue' },
  eps: 1e-5,
  classes: ['RepGhostModule'],
  modules: ['primary_conv', 'cheap_operation', 'fusion_conv', 'fusion_bn'],
  // primary_conv runs before the sum (its output is the block's input), relu after it.
  after: ['primary_conv', 'relu'],
  // switch_to_deploy also sets fusion_conv = fusion_bn = [] (plain lists).
  deploy: { module: 'cheap_operation', remove: ['cheap_operation', 'fusion_conv', 'fusion_bn'], setAttrs: { deploy: true } },
  official: { repo: 'ChengpengChen/RepGhost', path: 'model/repghost.py', fn: 'RepGhostModule.switch_to_deploy (repghost_model_convert)' },
  match(n, ctx) {
    const c = n.children;
    if (!c.has('cheap_operation') || !c.has('primary_conv') || !(c.has('fusion_bn') || c.has('fusion_conv'))) return undefined;
    const eps = ctx.eps('repghost');
    const cheap = asConvBN(c.get('cheap_operation'), eps);
    if (!cheap) throw new Reject(`'cheap_operation' is not a conv followed by a BatchNorm.`);
    const branches: CkptBranch[] = [{ kind: 'conv_bn', ...cheap }];
    const assumptions: string[] = [];
    const bns = c.get('fusion_bn');
    const convs = c.get('fusion_conv');
    if (n.className) {
      // Pickled: pairs by index; each fusion_conv must be nn.Identity.
      const nb = bns?.children.size ?? 0;
      if ((convs?.children.size ?? 0) !== nb) throw new Reject(`fusion_conv has ${convs?.children.size ?? 0} modules, fusion_bn ${nb}.`);
      for (const [i, b] of bns?.children ?? []) {
        const fc = convs!.children.get(i);
        if (!fc || !/Identity$/.test(fc.className ?? '')) throw new Reject(`'fusion_conv.${i}' (${fc?.className ?? 'missing'}) is not nn.Identity.`);
        const bn = asBN(b, eps);
        if (bn) branches.push({ kind: 'bn_identity', bn });
        else if (/Identity$/.test(b.className ?? '')) branches.push({ kind: 'identity' });
        else throw new Reject(`'fusion_bn.${i}' (${b.className ?? 'no class'}) is neither a BatchNorm nor nn.Identity.`);
      }
    } else {
      for (const b of bns?.children.values() ?? []) {
        const bn = asBN(b, eps);
        if (!bn) throw new Reject(`'${b.path}' is not a BatchNorm.`);
        branches.push({ kind: 'bn_identity', bn });
      }
      assumptions.push('no bare identity branch assumed (reparam_identity=False, the default): its (Identity, Identity) pair leaves no state_dict keys');
    }
    return { family: 'repghost', branches, assumptions };
  },
  onnx: (f) => /\bcheap_operation\b/.test(f.names),
});
