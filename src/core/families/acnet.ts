// ACNet (DingXiaoH/ACNet, acb.py): square k×k, vertical k×1 and horizontal 1×k conv+BN branches.
import { asBN, asConv, type CkptBranch, Reject } from '../checkpoint/match';
import { defineFamily } from './types';

export default defineFamily({
  id: 'acnet',
  label: 'ACNet',
  icon: { id: 'symbol-ruler', color: 'charts.yellow' },
  eps: 1e-5,
  classes: ['ACBlock'],
  modules: ['square_conv', 'square_bn', 'ver_conv', 'ver_bn', 'hor_conv', 'hor_bn'],
  after: ['nonlinear'],
  deploy: { module: 'fused_conv', remove: ['square_conv', 'square_bn', 'ver_conv', 'ver_bn', 'hor_conv', 'hor_bn'], setAttrs: { deploy: true } },
  official: { repo: 'DingXiaoH/ACNet', path: 'acnet/acb.py', fn: 'ACBlock.switch_to_deploy' },
  match(n, ctx) {
    const c = n.children;
    if (!(c.has('square_conv') && c.has('square_bn'))) return undefined;
    const eps = ctx.eps('acnet');
    const branches: CkptBranch[] = [];
    for (const p of ['square', 'ver', 'hor']) {
      const conv = asConv(c.get(`${p}_conv`));
      const bn = asBN(c.get(`${p}_bn`), eps);
      if (!conv && !bn) continue;
      if (!conv || !bn) throw new Reject(`'${p}_conv'/'${p}_bn' is not a conv followed by a BatchNorm.`);
      branches.push({ kind: 'conv_bn', conv, bn });
    }
    return { family: 'acnet', branches };
  },
  onnx: (f) => /\/square\b|\/hor\b|\/ver\b/.test(f.names) || (f.asym && /square|hor|ver/.test(f.names)),
});
