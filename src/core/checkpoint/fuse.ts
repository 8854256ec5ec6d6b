// Fusion specs for checkpoint blocks: the same exact math as for ONNX (src/core/fusion.ts).
import type { BNParams, ConvTerm, FuseSpec, IdentityTerm } from '../fusion';
import { type BNRef, type CkptBlock, FAMILIES } from './detect';

function bnParams(bn: BNRef): BNParams {
  const c = bn.mean.shape[0];
  return {
    gamma: bn.gamma ? bn.gamma.read() : new Float64Array(c).fill(1),
    beta: bn.beta ? bn.beta.read() : new Float64Array(c),
    mean: bn.mean.read(),
    variance: bn.variance.read(),
    eps: bn.eps,
  };
}

/** The block's terms, read from the checkpoint (fp16/bf16 widened exactly). */
export function ckptBlockSpec(block: CkptBlock): FuseSpec {
  const terms: (ConvTerm | IdentityTerm)[] = block.branches.map((b) => {
    if (!b.conv) return { kind: 'identity', bn: b.bn ? bnParams(b.bn) : undefined };
    return {
      kind: 'conv',
      weight: b.conv.weight.rows ? { rows: b.conv.weight.rows } : b.conv.weight.read(),
      kernel: b.conv.kernel,
      bias: b.conv.bias?.read(),
      bn: b.bn ? bnParams(b.bn) : undefined,
      scale: b.scale ? b.scale.read() : undefined,
    };
  });
  const foldPost = block.postBN && !FAMILIES[block.family].keepPostBN;
  return {
    name: `block '${block.info.name}'`,
    outChannels: block.outChannels,
    inPerGroup: block.inPerGroup,
    groups: block.groups,
    kernel: block.kernel,
    terms,
    postBN: foldPost ? bnParams(block.postBN!) : undefined,
  };
}
