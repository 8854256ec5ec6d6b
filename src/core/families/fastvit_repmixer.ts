// FastViT RepMixer (apple/ml-fastvit models/fastvit.py): x + layer_scale · (mixer(x) − norm(x)),
// mixer and norm MobileOneBlocks (norm: only the BN skip). One conv: identity + ls·mixer − ls·norm.
import { type CkptBranch, Reject } from '../checkpoint/match';
import { mobileOneBranches } from './mobileone';
import { defineFamily } from './types';

export default defineFamily({
  id: 'fastvit_repmixer',
  label: 'FastViT RepMixer',
  icon: { id: 'symbol-misc', color: 'charts.green' },
  eps: 1e-5,
  classes: ['RepMixer'],
  modules: ['mixer', 'norm', 'layer_scale'],
  deploy: { module: 'reparam_conv', remove: ['mixer', 'norm', 'layer_scale'] },
  official: { repo: 'apple/ml-fastvit', path: 'models/fastvit.py', fn: 'RepMixer.reparameterize (reparameterize_model)' },
  match(n, ctx) {
    const c = n.children;
    const mixer = c.get('mixer');
    const norm = c.get('norm');
    if (!mixer || !norm || !(mixer.children.has('rbr_conv') || mixer.children.has('rbr_skip')) || !norm.children.has('rbr_skip')) return undefined;
    if (n.className && !/RepMixer$/.test(n.className)) return undefined;
    const eps = ctx.eps('fastvit_repmixer');
    const ls = n.tensors.get('layer_scale');
    const m = mobileOneBranches(mixer, eps);
    const nm = mobileOneBranches(norm, eps);
    if (!m.some((b) => b.conv)) throw new Reject(`'mixer' has no conv branch.`);
    for (const sub of [mixer, norm]) {
      for (const k of sub.children.keys()) if (!['rbr_conv', 'rbr_scale', 'rbr_skip', 'se', 'activation'].includes(k)) throw new Reject(`not understood: ${sub.name}.${k} (${sub.children.get(k)!.className ?? 'tensors'})`);
      const act = sub.children.get('activation');
      if (act?.className && !/Identity$/.test(act.className)) throw new Reject(`'${act.path}' (${act.className}) is applied inside the residual; only nn.Identity can be merged.`);
      const se = sub.children.get('se');
      if (se?.className && !/Identity$/.test(se.className)) throw new Reject(`'${se.path}' (${se.className}) is applied inside the residual; only nn.Identity can be merged.`);
    }
    const branches: CkptBranch[] = [
      { kind: 'identity' },
      ...m.map((b) => ({ ...b, scale: ls })),
      ...nm.map((b) => ({ ...b, scale: ls, negate: true })),
    ];
    return { family: 'fastvit_repmixer', branches, ownTensors: ls ? ['layer_scale'] : [] };
  },
  onnx: (f) => /\btoken_mixer\b/.test(f.names) && /\bmixer\b/.test(f.names) && /\bnorm\b/.test(f.names),
});
