// OREPA, Online Convolutional Re-parameterization (JUGGHM/OREPA_CVPR2022, blocks.py and
// blocks_repvgg.py). The kernel is computed at run time, `weight_gen()`, from branch weights the
// block holds as its own parameters, each branch scaled per output channel by a row of `vector`:
//   origin k×k · v0 + (1×1 avg_conv ⊗ avg_avg window) · v1 + (1×1 pfir_conv ⊗ frequency prior) · v2
//   + (1×1 (idconv1 + id_tensor) → k×k conv2) · v3 + (1×1 padded to k×k) · v4
//   + dwsc2full(depthwise gconv_dw, pointwise gconv_pw) · v5,
// then ONE conv and `bn`. `switch_to_deploy` folds `bn` into `orepa_reparam`. OREPA_1x1 does the
// same for 1×1 convs (origin · v0 + l2i_conv1 → l2i_conv2 · v1, `or1x1_reparam`). RepVGGBlock_OREPA
// is a RepVGG block whose `rbr_dense` is an OREPA_3x3_RepVGG (weights `weight_rbr_*`, no 1×1 branch,
// dwsc2full over groups 1): its fused conv is `rbr_reparam`. Every branch kernel is computed here
// in float64 from the stored tensors (buffers read, not assumed), as weight_gen does; the buffers
// `id_tensor`, `*_avg_avg` and `*_prior` are read as stored. OREPA_LargeConv (nested OREPA blocks
// with weight_only=True, composed by convolution) is rejected by name.
import type { CkptBranch, ConvRef, EpsOf, MatchResult } from '../checkpoint/match';
import { asBN, asConvBN, fmt, pyTuple, Reject } from '../checkpoint/match';
import { type CkptTensor, type ModuleNode, newNode } from '../checkpoint/tree';
import { defineFamily } from './types';

const prod = (xs: number[]) => xs.reduce((a, b) => a * b, 1);

/** Tensors of one OREPA-style module, by local name; a missing one is a named rejection. */
function tensorsOf(n: ModuleNode, what: string) {
  const need = (name: string, rank?: number): CkptTensor => {
    const t = n.tensors.get(name);
    if (!t) throw new Reject(`${what} '${n.path}' has no '${name}'; weight_gen() needs it.`);
    if (rank !== undefined && t.shape.length !== rank) throw new Reject(`'${t.key}' has shape ${fmt(t.shape)}; expected rank ${rank}.`);
    return t;
  };
  return { need, opt: (name: string) => n.tensors.get(name) };
}

/** A kernel computed here, as a tensor the fusion reads (float64, never rounded before the sum). */
function computed(key: string, like: CkptTensor, shape: number[], f: () => Float64Array): CkptTensor {
  let v: Float64Array | undefined;
  return { key, dtype: like.dtype, shape, read: () => (v ??= f()) };
}

/** One row of `vector` (the per-output-channel factor of branch `row`). */
function vectorRow(vec: CkptTensor, row: number): CkptTensor {
  const o = vec.shape[1];
  return computed(`${vec.key}[${row}]`, vec, [o], () => Float64Array.from(vec.read() as ArrayLike<number>).slice(row * o, (row + 1) * o));
}

/** The module's own conv attributes when it was pickled (stride, padding, dilation, groups). */
function pickledGeometry(n: ModuleNode, k: number[]): { stride?: number[]; padding?: number[]; groups?: number } {
  if (!n.className && !n.attrs.size) return {};
  const full = (v: unknown) => {
    const p = pyTuple(v);
    return p && p.length === 1 ? k.map(() => p[0]) : p;
  };
  const dil = full(n.attrs.get('dilation'));
  if (dil && dil.some((d) => d !== 1)) throw new Reject(`'${n.path}' has dilation ${fmt(dil)}; only dilation 1 can be merged.`);
  const g = n.attrs.get('groups');
  return { stride: full(n.attrs.get('stride')), padding: full(n.attrs.get('padding')), groups: typeof g === 'number' ? g : undefined };
}

interface OrepaBranch {
  /** Branch name for the report (`origin`, `avg`, …). */
  name: string;
  /** Stored tensors it is computed from. */
  sources: CkptTensor[];
  kernel: number[];
  weight: CkptTensor;
  row: number;
}

/**
 * OREPA / OREPA_3x3_RepVGG branch kernels, as weight_gen() computes them (prefix `weight_orepa_` or
 * `weight_rbr_`). `oneByOne`: whether the block has the 1×1 branch (OREPA: vector row 4; the
 * RepVGG variant has none and its depthwise branch is row 4).
 */
function orepaBranches(n: ModuleNode, prefix: string, vgg: boolean): { branches: OrepaBranch[]; groups: number; cout: number; cpg: number; k: number[]; vector: CkptTensor; used: string[] } {
  const what = vgg ? 'OREPA_3x3_RepVGG' : 'OREPA';
  const { need, opt } = tensorsOf(n, what);
  const P = (s: string) => `${prefix}${s}`;
  const origin = need(P('origin'), 4);
  const [cout, cpg, ...k] = origin.shape;
  const ks = prod(k);
  if (k.length !== 2 || k.some((x) => x % 2 === 0)) throw new Reject(`'${origin.key}' has a ${fmt(k)} kernel; OREPA merges odd 2-D kernels.`);
  const vector = need('vector', 2);
  const avgConv = need(P('avg_conv'), 4);
  const avgAvg = need(P('avg_avg'), 2);
  const pfirConv = need(P('pfir_conv'), 4);
  const prior = need(P('prior'), 3);
  const one = vgg ? undefined : opt(P('1x1'));
  const idconv = opt(P('1x1_kxk_idconv1'));
  const conv1 = opt(P('1x1_kxk_conv1'));
  if (idconv && conv1) throw new Reject(`${what} '${n.path}' has both '${P('1x1_kxk_idconv1')}' and '${P('1x1_kxk_conv1')}'; weight_gen() reads one.`);
  const first = idconv ?? conv1;
  if (!first) throw new Reject(`${what} '${n.path}' has neither '${P('1x1_kxk_idconv1')}' nor '${P('1x1_kxk_conv1')}'.`);
  const idTensor = idconv ? need('id_tensor', 4) : undefined;
  const conv2 = need(P('1x1_kxk_conv2'), 4);
  const dw = need(P('gconv_dw'), 4);
  const pw = need(P('gconv_pw'), 4);

  // Shapes, and the groups they imply: cpg = in/g, the depthwise expansion E = pw's width / cpg,
  // in = dw rows / E (official: E = 8), g = in / cpg.
  const is1x1 = (t: CkptTensor) => t.shape.length === 4 && t.shape[2] === 1 && t.shape[3] === 1;
  const same = (t: CkptTensor, shape: number[]) => {
    if (fmt(t.shape) !== fmt(shape)) throw new Reject(`'${t.key}' has shape ${fmt(t.shape)}; ${what} '${n.path}' needs ${fmt(shape)}.`);
  };
  same(avgConv, [cout, cpg, 1, 1]);
  same(pfirConv, [cout, cpg, 1, 1]);
  same(avgAvg, k);
  same(prior, [cout, ...k]);
  if (one) same(one, [cout, cpg, 1, 1]);
  if (!is1x1(first) || first.shape[1] !== cpg) throw new Reject(`'${first.key}' has shape ${fmt(first.shape)}; expected [t, ${cpg}, 1, 1].`);
  if (idTensor) same(idTensor, first.shape);
  const mid = first.shape[0];
  if (dw.shape[1] !== 1 || fmt(dw.shape.slice(2)) !== fmt(k) || !is1x1(pw) || pw.shape[0] !== cout) {
    throw new Reject(`'${dw.key}' ${fmt(dw.shape)} and '${pw.key}' ${fmt(pw.shape)} are not a depthwise ${fmt(k)} and a pointwise conv to ${cout} channels.`);
  }
  const E = pw.shape[1] / cpg;
  const cin = dw.shape[0] / E;
  const groups = cin / cpg;
  if (!Number.isInteger(E) || !Number.isInteger(cin) || !Number.isInteger(groups) || cout % groups !== 0 || mid % groups !== 0) {
    throw new Reject(`${what} '${n.path}': shapes do not give whole groups (origin ${fmt(origin.shape)}, gconv_dw ${fmt(dw.shape)}, gconv_pw ${fmt(pw.shape)}).`);
  }
  if (vgg && groups !== 1) throw new Reject(`OREPA_3x3_RepVGG '${n.path}' has groups ${groups}; its dwsc2full only computes groups 1.`);
  same(conv2, [cout, mid / groups, ...k]);
  const rows = vgg ? 5 : 6;
  if (vector.shape[1] !== cout || (vector.shape[0] !== rows && !(vgg && vector.shape[0] === rows + 1))) {
    throw new Reject(`'${vector.key}' has shape ${fmt(vector.shape)}; ${what} '${n.path}' scales its ${rows} branches by [${rows}, ${cout}].`);
  }
  const W = (): Float64Array => new Float64Array(cout * cpg * ks);
  const rd = (t: CkptTensor) => t.read() as ArrayLike<number>;
  const kk = [cout, cpg, ...k];
  const branches: OrepaBranch[] = [{ name: 'origin', sources: [origin], kernel: k, weight: origin, row: 0 }];
  // avg: avg_conv[o, i] · avg_avg[h, w].
  branches.push({
    name: 'avg', sources: [avgConv, avgAvg], kernel: k, row: 1,
    weight: computed(`${avgConv.key}⊗${avgAvg.key}`, avgConv, kk, () => {
      const w = W(), a = rd(avgConv), m = rd(avgAvg);
      for (let oi = 0; oi < cout * cpg; oi++) for (let q = 0; q < ks; q++) w[oi * ks + q] = a[oi] * m[q];
      return w;
    }),
  });
  // prior: pfir_conv[o, i] · prior[o, h, w].
  branches.push({
    name: 'prior', sources: [pfirConv, prior], kernel: k, row: 2,
    weight: computed(`${pfirConv.key}⊗${prior.key}`, pfirConv, kk, () => {
      const w = W(), a = rd(pfirConv), p = rd(prior);
      for (let o = 0; o < cout; o++) for (let i = 0; i < cpg; i++) for (let q = 0; q < ks; q++) w[(o * cpg + i) * ks + q] = a[o * cpg + i] * p[o * ks + q];
      return w;
    }),
  });
  // 1×1 → k×k: (idconv1 + id_tensor)[t, i] then conv2[o, t/g, h, w], per group.
  branches.push({
    name: '1x1_kxk', sources: [first, ...(idTensor ? [idTensor] : []), conv2], kernel: k, row: 3,
    weight: computed(`${first.key}→${conv2.key}`, conv2, kk, () => {
      const w = W(), c1 = rd(first), id = idTensor ? rd(idTensor) : undefined, c2 = rd(conv2);
      const tg = mid / groups, og = cout / groups;
      for (let o = 0; o < cout; o++) {
        const g = Math.floor(o / og);
        for (let tt = 0; tt < tg; tt++) {
          const t = g * tg + tt;
          for (let i = 0; i < cpg; i++) {
            const a = c1[t * cpg + i] + (id ? id[t * cpg + i] : 0);
            if (a === 0) continue;
            for (let q = 0; q < ks; q++) w[(o * cpg + i) * ks + q] += a * c2[(o * tg + tt) * ks + q];
          }
        }
      }
      return w;
    }),
  });
  if (one) branches.push({ name: '1x1', sources: [one], kernel: [1, 1], weight: one, row: 4 });
  // dwsc2full(dw, pw, in, g): dw viewed [g, cpg, E, 1, k, k], pw viewed [o/g, g, cpg, E];
  // output channel c·(o/g) + a reads pointwise row a·g + c (the official view interleaves them).
  branches.push({
    name: 'gconv', sources: [dw, pw], kernel: k, row: vgg ? 4 : 5,
    weight: computed(`${dw.key}→${pw.key}`, pw, kk, () => {
      const w = W(), d = rd(dw), p = rd(pw);
      const og = cout / groups;
      for (let c = 0; c < groups; c++) {
        for (let a = 0; a < og; a++) {
          const o = c * og + a;
          for (let gg = 0; gg < cpg; gg++) {
            for (let t = 0; t < E; t++) {
              const pv = p[((a * groups + c) * cpg + gg) * E + t];
              const base = ((c * cpg + gg) * E + t) * ks;
              for (let q = 0; q < ks; q++) w[(o * cpg + gg) * ks + q] += d[base + q] * pv;
            }
          }
        }
      }
      return w;
    }),
  });
  const used = [origin, vector, avgConv, avgAvg, pfirConv, prior, ...(one ? [one] : []), first, ...(idTensor ? [idTensor] : []), conv2, dw, pw].map((t) => t.key.slice(t.key.lastIndexOf('.') + 1));
  return { branches, groups, cout, cpg, k, vector, used };
}

/** A stand-in module node for one computed branch (its path names the branch; its tensors are the sources). */
function branchNode(n: ModuleNode, b: OrepaBranch): ModuleNode {
  const m = newNode(`${n.path}.${b.name}`, b.name, n);
  for (const t of b.sources) m.tensors.set(t.key.slice(t.key.lastIndexOf('.') + 1), t);
  return m;
}

function convRef(node: ModuleNode, weight: CkptTensor, kernel: number[], groups: number, geo: ReturnType<typeof pickledGeometry>, blockKernel: number[]): ConvRef {
  // A pickled block pads its k×k conv by its own `padding` (checked centred by the detector); a
  // smaller branch kernel is zero-padded to k×k by weight_gen (transVI_multiscale): centred.
  const padding = geo.padding ? (fmt(kernel) === fmt(blockKernel) ? geo.padding : kernel.map((x) => (x - 1) / 2)) : undefined;
  return { node, weight, kernel, groups, stride: geo.stride, padding };
}

/** The block's own tensors that are not the ones weight_gen() reads (a tensor RepFuse does not understand). */
function strayTensors(n: ModuleNode, used: string[]): string[] {
  return [...n.tensors.keys()].filter((k) => !used.includes(k));
}

function matchOrepa(n: ModuleNode, eps: EpsOf): MatchResult | undefined {
  if (!n.tensors.has('weight_orepa_origin')) return undefined;
  const bnNode = n.children.get('bn');
  if (!bnNode) throw new Reject(`OREPA '${n.path}' has no 'bn' (weight_only=True: a kernel generator inside OREPA_LargeConv, whose kernels are composed by convolution; RepFuse does not fuse that).`);
  const bn = asBN(bnNode, eps);
  if (!bn) throw new Reject(`'${bnNode.path}' is not a BatchNorm with running statistics.`);
  const r = orepaBranches(n, 'weight_orepa_', false);
  const geo = pickledGeometry(n, r.k);
  if (geo.groups !== undefined && geo.groups !== r.groups) throw new Reject(`OREPA '${n.path}' has groups ${geo.groups}, its weights ${r.groups}.`);
  const branches: CkptBranch[] = r.branches.map((b) => ({ kind: 'conv', conv: convRef(branchNode(n, b), b.weight, b.kernel, r.groups, geo, r.k), scale: vectorRow(r.vector, b.row) }));
  return { family: 'orepa', branches, postBN: bn, ownTensors: r.used };
}

function matchOrepa1x1(n: ModuleNode, eps: EpsOf): MatchResult | undefined {
  if (!n.tensors.has('weight_or1x1_origin')) return undefined;
  const { need } = tensorsOf(n, 'OREPA_1x1');
  const origin = need('weight_or1x1_origin', 4);
  const c1 = need('weight_or1x1_l2i_conv1', 4);
  const c2 = need('weight_or1x1_l2i_conv2', 4);
  const vector = need('vector', 2);
  const bn = asBN(n.children.get('bn'), eps);
  if (!bn) throw new Reject(`OREPA_1x1 '${n.path}' has no BatchNorm 'bn'.`);
  const [cout, cin, ...k] = origin.shape;
  if (fmt(k) !== '1×1' || c1.shape[1] !== cin || fmt(c1.shape.slice(2)) !== '1×1' || c2.shape[0] !== cout || c2.shape[1] !== c1.shape[0] || fmt(c2.shape.slice(2)) !== '1×1') {
    throw new Reject(`OREPA_1x1 '${n.path}': origin ${fmt(origin.shape)}, l2i_conv1 ${fmt(c1.shape)}, l2i_conv2 ${fmt(c2.shape)} do not chain as 1×1 convs ${cin} → ${cout}.`);
  }
  if (fmt(vector.shape) !== fmt([2, cout])) throw new Reject(`'${vector.key}' has shape ${fmt(vector.shape)}; OREPA_1x1 scales its 2 branches by [2, ${cout}].`);
  const geo = pickledGeometry(n, k);
  if (geo.groups !== undefined && geo.groups !== 1) throw new Reject(`OREPA_1x1 '${n.path}' has groups ${geo.groups}; the official block asserts groups 1.`);
  const t = c1.shape[0];
  // l2i: einsum('tihw,othw->oihw', conv1, conv2) over 1×1 kernels.
  const l2i = computed(`${c1.key}→${c2.key}`, c2, [cout, cin, 1, 1], () => {
    const w = new Float64Array(cout * cin), a = c1.read() as ArrayLike<number>, b = c2.read() as ArrayLike<number>;
    for (let o = 0; o < cout; o++) for (let tt = 0; tt < t; tt++) {
      const bv = b[o * t + tt];
      for (let i = 0; i < cin; i++) w[o * cin + i] += a[tt * cin + i] * bv;
    }
    return w;
  });
  const mk = (name: string, sources: CkptTensor[], weight: CkptTensor, row: number): CkptBranch => ({
    kind: 'conv',
    conv: convRef(branchNode(n, { name, sources, kernel: k, weight, row }), weight, k, 1, geo, k),
    scale: vectorRow(vector, row),
  });
  return { family: 'orepa_1x1', branches: [mk('origin', [origin], origin, 0), mk('l2i', [c1, c2], l2i, 1)], postBN: bn, ownTensors: ['weight_or1x1_origin', 'weight_or1x1_l2i_conv1', 'weight_or1x1_l2i_conv2', 'vector'] };
}

function matchRepvggOrepa(n: ModuleNode, eps: EpsOf): MatchResult | undefined {
  const dense = n.children.get('rbr_dense');
  if (!dense || !dense.tensors.has('weight_rbr_origin')) return undefined;
  const dbn = asBN(dense.children.get('bn'), eps);
  if (!dbn) throw new Reject(`OREPA_3x3_RepVGG '${dense.path}' has no BatchNorm 'bn'.`);
  const r = orepaBranches(dense, 'weight_rbr_', true);
  const stray = strayTensors(dense, r.used);
  if (stray.length) throw new Reject(`not understood: ${stray.map((s) => `rbr_dense.${s}`).join(', ')} (tensors of OREPA_3x3_RepVGG that weight_gen() does not read); the block is left as it is.`);
  const geo = pickledGeometry(dense, r.k);
  const ks = prod(r.k);
  // The whole generated kernel: Σ branch kernel · its vector row (float64), then rbr_dense.bn.
  const kernel = computed(`${dense.path}.weight_gen()`, r.branches[0].weight, [r.cout, r.cpg, ...r.k], () => {
    const w = new Float64Array(r.cout * r.cpg * ks);
    const vec = r.vector.read() as ArrayLike<number>;
    for (const b of r.branches) {
      const bw = b.weight.read() as ArrayLike<number>;
      for (let o = 0; o < r.cout; o++) {
        const s = vec[b.row * r.cout + o];
        for (let j = o * r.cpg * ks; j < (o + 1) * r.cpg * ks; j++) w[j] += bw[j] * s;
      }
    }
    return w;
  });
  const branches: CkptBranch[] = [{ kind: 'conv_bn', conv: convRef(dense, kernel, r.k, r.groups, geo, r.k), bn: dbn }];
  const one = n.children.get('rbr_1x1');
  if (one) {
    const cb = asConvBN(one, eps);
    if (!cb) throw new Reject(`'rbr_1x1' is not a conv followed by a BatchNorm.`);
    branches.push({ kind: 'conv_bn', ...cb });
  }
  const id = asBN(n.children.get('rbr_identity'), eps);
  if (id) branches.push({ kind: 'bn_identity', bn: id });
  else if (n.children.has('rbr_identity') && n.children.get('rbr_identity')!.tensors.size) throw new Reject(`'rbr_identity' is not a BatchNorm.`);
  return { family: 'orepa_repvgg', branches };
}

const ICON = { id: 'sparkle', color: 'charts.purple' };
const REPO = 'JUGGHM/OREPA_CVPR2022';
const EPS = 1e-5;

const orepa = defineFamily({
  id: 'orepa',
  label: 'OREPA',
  icon: ICON,
  eps: EPS,
  classes: ['OREPA'],
  modules: ['weight_orepa_origin', 'vector', 'bn'],
  after: ['nonlinear'],
  deploy: {
    module: 'orepa_reparam',
    remove: [
      'weight_orepa_origin', 'weight_orepa_1x1', 'weight_orepa_1x1_kxk_conv2', 'id_tensor', 'weight_orepa_1x1_kxk_idconv1', 'weight_orepa_1x1_kxk_conv1',
      'weight_orepa_avg_avg', 'weight_orepa_avg_conv', 'weight_orepa_pfir_conv', 'weight_orepa_prior', 'weight_orepa_gconv_dw', 'weight_orepa_gconv_pw', 'bn', 'vector',
    ],
    convClass: 'torch.nn.modules.conv.Conv2d',
  },
  official: { repo: REPO, path: 'blocks.py', fn: 'OREPA.weight_gen / OREPA.switch_to_deploy (convert.py)' },
  match: (n, ctx) => matchOrepa(n, ctx.eps('orepa')),
});

const orepa1x1 = defineFamily({
  id: 'orepa_1x1',
  label: 'OREPA 1×1',
  icon: ICON,
  eps: EPS,
  classes: ['OREPA_1x1'],
  modules: ['weight_or1x1_origin', 'vector', 'bn'],
  after: ['nonlinear'],
  deploy: { module: 'or1x1_reparam', remove: ['weight_or1x1_origin', 'weight_or1x1_l2i_conv1', 'weight_or1x1_l2i_conv2', 'vector', 'bn'], convClass: 'torch.nn.modules.conv.Conv2d' },
  official: { repo: REPO, path: 'blocks.py', fn: 'OREPA_1x1.weight_gen / OREPA_1x1.switch_to_deploy (convert.py)' },
  match: (n, ctx) => matchOrepa1x1(n, ctx.eps('orepa_1x1')),
});

const orepaRepvgg = defineFamily({
  id: 'orepa_repvgg',
  label: 'RepVGG OREPA',
  icon: ICON,
  eps: EPS,
  classes: ['RepVGGBlock_OREPA'],
  modules: ['rbr_dense', 'rbr_1x1', 'rbr_identity'],
  after: ['nonlinearity', 'se'],
  deploy: { module: 'rbr_reparam', remove: ['rbr_dense', 'rbr_1x1', 'rbr_identity'], convClass: 'torch.nn.modules.conv.Conv2d' },
  official: { repo: REPO, path: 'blocks_repvgg.py', fn: 'RepVGGBlock_OREPA.switch_to_deploy (OREPA_3x3_RepVGG.weight_gen)' },
  match: (n, ctx) => matchRepvggOrepa(n, ctx.eps('orepa_repvgg')),
});

/** The OREPA families, in match order (RepVGGBlock_OREPA before the `rbr_dense` families). */
export default [orepaRepvgg, orepa, orepa1x1] as const;
