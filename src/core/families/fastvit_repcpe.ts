// FastViT RepCPE (apple/ml-fastvit models/fastvit.py): x + pe(x), pe a depthwise k×k conv with bias.
import { asConv, Reject } from '../checkpoint/match';
import { defineFamily } from './types';

export default defineFamily({
  id: 'fastvit_repcpe',
  label: 'FastViT RepCPE',
  icon: { id: 'symbol-misc', color: 'charts.yellow' },
  eps: 1e-5,
  classes: ['RepCPE'],
  modules: ['pe'],
  deploy: { module: 'reparam_conv', remove: ['pe'] },
  official: { repo: 'apple/ml-fastvit', path: 'models/fastvit.py', fn: 'RepCPE.reparameterize (reparameterize_model)' },
  match(n, ctx) {
    if (!n.children.has('pe') || n.children.size !== 1) return undefined;
    // 'pe' is a common name: only the RepCPE class, or a FastViT state_dict (token mixers around it).
    if (n.className ? !/RepCPE$/.test(n.className) : !/\btoken_mixer\.(mixer|norm)\b/.test(ctx.allPaths)) return undefined;
    const pe = asConv(n.children.get('pe'));
    if (!pe) return undefined;
    if (pe.weight.shape[1] !== 1) throw new Reject(`'pe' takes ${pe.weight.shape[1]} channels per group; RepCPE's is depthwise.`);
    return { family: 'fastvit_repcpe', branches: [{ kind: 'identity' }, { kind: 'conv', conv: pe }] };
  },
  // '/network.4/pe/Conv' + the residual Add; 'pe' alone is too common: FastViT's token mixers must be in the model.
  onnx: (f) => /[/.]pe[/.]/.test(f.names) && f.kinds.includes('identity') && /\btoken_mixer\b/.test(f.modelNames ?? f.names),
});
