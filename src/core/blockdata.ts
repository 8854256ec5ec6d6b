// Per-branch numbers of one block (raw weights, BN parameters, exact contribution to the fused
// kernel), format-independent: the statistics view is built from this.
import { branchLabel } from './branches';
import { type ConvTerm, fuseBlock, type FuseSpec, type IdentityTerm, wholeWeight } from './fusion';
import type { BlockData, BlockInfo, BranchData } from './model';


/**
 * Builds BlockData from a fusion spec: each branch's contribution is that branch fused alone. A BN
 * channel with variance + eps ≤ 0 does not stop the statistics (fusion refuses it): its values
 * become NaN there, which the statistics count and show.
 */
export function blockDataFromSpec(block: BlockInfo, spec: FuseSpec): BlockData {
  const branches: BranchData[] = spec.terms.map((t: ConvTerm | IdentityTerm, i) => {
    const info = block.branches[i];
    const alone = fuseBlock({ ...spec, terms: [t], postBN: undefined }, { invalidBN: 'nan' });
    const label = branchLabel(info);
    const d: BranchData = { label, kind: info.kind, contribution: { shape: alone.shape, weight: alone.weight, bias: alone.bias } };
    if (t.kind === 'conv') {
      d.weight = { shape: [spec.outChannels, spec.inPerGroup, ...t.kernel], values: wholeWeight(t.weight, spec.outChannels) };
      if (t.bias) d.bias = t.bias;
      if (t.scale !== undefined) d.scale = typeof t.scale === 'number' ? [t.scale] : t.scale;
    }
    if (t.bn) d.bn = { gamma: t.bn.gamma, beta: t.bn.beta, mean: t.bn.mean, variance: t.bn.variance, eps: t.bn.eps };
    return d;
  });
  const fused = fuseBlock(spec, { invalidBN: 'nan' });
  return {
    block,
    branches,
    postBN: spec.postBN ? { ...spec.postBN } : undefined,
    fused: { shape: fused.shape, weight: fused.weight, bias: fused.bias },
  };
}
