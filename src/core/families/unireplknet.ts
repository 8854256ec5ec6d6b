// UniRepLKNet DilatedReparamBlock (AILab-CVC/UniRepLKNet unireplknet.py): a large depthwise
// `lk_origin` conv + `origin_bn`, plus dilated depthwise conv+BN branches `dil_conv_k{k}_{r}` /
// `dil_bn_k{k}_{r}`; each dilated kernel spreads to (k−1)·r+1 and joins the large kernel's centre.
import { asBN, asConv, type CkptBranch, Reject } from '../checkpoint/match';
import { defineFamily } from './types';

/** Every (k, r) of the class's kernel tables (kernel sizes 5 … 17). */
const PAIRS = [[3, 1], [3, 2], [3, 3], [3, 4], [3, 5], [3, 7], [5, 1], [5, 2], [7, 2], [9, 2]];
const DIL = /^dil_conv_k(\d+)_(\d+)$/;

export default defineFamily({
  id: 'unireplknet',
  label: 'UniRepLKNet DilatedReparamBlock',
  icon: { id: 'symbol-namespace', color: 'charts.purple' },
  eps: 1e-5,
  classes: ['DilatedReparamBlock'],
  modules: ['lk_origin', 'origin_bn', 'dil_conv_k*_*', 'dil_bn_k*_*'],
  // The merged conv takes lk_origin's place (same name, now with a bias).
  deploy: { module: 'lk_origin', remove: ['lk_origin', 'origin_bn', ...PAIRS.flatMap(([k, r]) => [`dil_conv_k${k}_${r}`, `dil_bn_k${k}_${r}`])] },
  official: { repo: 'AILab-CVC/UniRepLKNet', path: 'unireplknet.py', fn: 'DilatedReparamBlock.merge_dilated_branches' },
  match(n, ctx) {
    const c = n.children;
    if (!c.has('lk_origin') || !c.has('origin_bn')) return undefined;
    const eps = ctx.eps('unireplknet');
    const conv = asConv(c.get('lk_origin'));
    const bn = asBN(c.get('origin_bn'), eps);
    if (!conv || !bn) throw new Reject(`'lk_origin'/'origin_bn' is not a conv followed by a BatchNorm.`);
    const branches: CkptBranch[] = [{ kind: 'conv_bn', conv, bn }];
    for (const [name, node] of c) {
      const m = DIL.exec(name);
      if (!m) continue;
      const [k, r] = [Number(m[1]), Number(m[2])];
      const dc = asConv(node);
      const db = asBN(c.get(`dil_bn_k${k}_${r}`), eps);
      if (!dc || !db) throw new Reject(`'${name}' has no conv weight or no BatchNorm 'dil_bn_k${k}_${r}'.`);
      if (dc.kernel.some((x) => x !== k)) throw new Reject(`'${name}' has a ${dc.kernel.join('×')} kernel; its name says ${k}×${k}.`);
      // A state_dict does not store the dilation: the name does (UniRepLKNet's naming).
      dc.dilation ??= r === 1 ? undefined : [r, r];
      if (dc.dilation && dc.dilation.some((d) => d !== r)) throw new Reject(`'${name}' has dilation ${dc.dilation.join('×')}; its name says ${r}.`);
      branches.push({ kind: r === 1 ? 'conv_bn' : 'dilated', conv: dc, bn: db });
    }
    return { family: 'unireplknet', branches, assumptions: n.className ? undefined : ['dilation of each dil_conv_k{k}_{r} read from its name (a state_dict does not store it)'] };
  },
  onnx: (f) => /\blk_origin\b/.test(f.names) && /\bdil_conv_k\d+_\d+\b/.test(f.names),
});
