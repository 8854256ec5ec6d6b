// Diverse Branch Block (DingXiaoH/DiverseBranchBlock, diversebranchblock.py): `dbb_origin` k×k
// conv+BN, `dbb_1x1` 1×1 conv+BN, `dbb_1x1_kxk` 1×1 (`idconv1` IdentityBasedConv1x1: weight + I,
// or `conv1`) → BNAndPadLayer (pads with BN(0)) → k×k conv (padding 0) → BN, and `dbb_avg`: 1×1
// conv → BNAndPadLayer → AvgPool(k, padding 0) → BN, or (depthwise) AvgPool(k, padding k//2) → BN.
import { asAvgPool, asBN, asConv, asConvBN, type BNRef, type CkptBranch, type EpsOf, fmt, type PoolRef, Reject } from '../checkpoint/match';
import type { ModuleNode } from '../checkpoint/tree';
import { defineFamily } from './types';

/** The BN inside a BNAndPadLayer, its padding checked against the block's (k−1)/2. */
function bnAndPad(n: ModuleNode | undefined, eps: EpsOf, pad: number[]): BNRef | undefined {
  if (!n) return undefined;
  const bn = asBN(n.children.get('bn'), eps) ?? asBN(n, eps);
  if (!bn) return undefined;
  const pp = n.attrs.get('pad_pixels');
  if (typeof pp === 'number' && pad.some((p) => p !== pp)) throw new Reject(`'${n.path}' pads ${pp} pixels; the ${fmt(pad.map((p) => 2 * p + 1))} kernel needs ${fmt(pad)}.`);
  return bn;
}

export default defineFamily({
  id: 'dbb',
  label: 'DBB',
  icon: { id: 'type-hierarchy', color: 'charts.orange' },
  eps: 1e-5,
  classes: ['DiverseBranchBlock'],
  modules: ['dbb_origin', 'dbb_1x1', 'dbb_1x1_kxk', 'dbb_avg'],
  after: ['nonlinear'],
  deploy: { module: 'dbb_reparam', remove: ['dbb_origin', 'dbb_avg', 'dbb_1x1', 'dbb_1x1_kxk'] },
  official: { repo: 'DingXiaoH/DiverseBranchBlock', path: 'diversebranchblock.py', fn: 'DiverseBranchBlock.switch_to_deploy' },
  match(n, ctx) {
    const c = n.children;
    if (!c.has('dbb_origin')) return undefined;
    const eps = ctx.eps('dbb');
    const origin = asConvBN(c.get('dbb_origin'), eps);
    if (!origin) throw new Reject(`'dbb_origin' is not a conv followed by a BatchNorm.`);
    const k = origin.conv.kernel;
    const pad = k.map((x) => (x - 1) / 2);
    const branches: CkptBranch[] = [{ kind: 'conv_bn', ...origin }];
    if (c.has('dbb_1x1')) {
      const one = asConvBN(c.get('dbb_1x1'), eps);
      if (!one) throw new Reject(`'dbb_1x1' is not a conv followed by a BatchNorm.`);
      branches.push({ kind: 'conv_bn', ...one });
    }
    const kxk = c.get('dbb_1x1_kxk');
    if (kxk) {
      const idc = kxk.children.get('idconv1');
      const firstConv = asConv(idc ?? kxk.children.get('conv1'));
      const bn1 = bnAndPad(kxk.children.get('bn1'), eps, pad);
      const conv2 = asConv(kxk.children.get('conv2'));
      const bn2 = asBN(kxk.children.get('bn2'), eps);
      if (!firstConv || !bn1 || !conv2 || !bn2) throw new Reject(`'dbb_1x1_kxk' is not 1×1 conv → BN-pad → k×k conv → BN.`);
      if (conv2.padding && conv2.padding.some((p) => p !== 0)) throw new Reject(`'${conv2.node.path}' pads ${fmt(conv2.padding)}; DBB's second conv pads nothing (BNAndPadLayer does).`);
      branches.push({ kind: 'sequential', first: { conv: firstConv, bn: bn1, addIdentity: !!idc }, conv: conv2, bn: bn2, seqPadding: pad });
    }
    const avg = c.get('dbb_avg');
    if (avg) {
      const avgbn = asBN(avg.children.get('avgbn'), eps);
      if (!avgbn) throw new Reject(`'dbb_avg' has no BatchNorm 'avgbn'.`);
      const poolNode = avg.children.get('avg');
      const conv = asConv(avg.children.get('conv'));
      if (conv) {
        const bn = bnAndPad(avg.children.get('bn'), eps, pad);
        if (!bn) throw new Reject(`'dbb_avg.bn' is not a BNAndPadLayer.`);
        // AvgPool(k, stride, padding 0) after the BN-valued padding.
        let pool: PoolRef = { kernel: k, padding: k.map(() => 0), stride: origin.conv.stride };
        if (poolNode) {
          const p = asAvgPool(poolNode, k.map(() => 0));
          if (!p) throw new Reject(`'${poolNode.path}' (${poolNode.className ?? 'no class'}) is not an average pooling.`);
          pool = p;
        }
        branches.push({ kind: 'sequential', first: { conv, bn }, pool: { ...pool, node: poolNode }, bn: avgbn, seqPadding: pad });
      } else {
        const pool = poolNode ? asAvgPool(poolNode) : { kernel: k, stride: origin.conv.stride };
        if (!pool) throw new Reject(`'dbb_avg.avg' (${poolNode?.className ?? 'no class'}) is not an average pooling.`);
        branches.push({ kind: 'avgpool', pool, bn: avgbn });
      }
    }
    return { family: 'dbb', branches };
  },
  onnx: (f) => /\bdbb_origin\b/.test(f.names),
});
