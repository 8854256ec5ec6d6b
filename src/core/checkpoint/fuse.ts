// Fusion specs for checkpoint blocks: each branch read from the checkpoint (fp16/bf16 widened
// exactly) and lowered to plain conv terms by the branch-kind table (src/core/branches.ts), then the
// same exact math as for ONNX (src/core/fusion.ts).
import { type BranchSpec, type ConvPart, type LowerContext, lowerBranch } from '../branches';
import type { BNParams, ConvTerm, FuseSpec, IdentityTerm } from '../fusion';
import type { BNRef, CkptBlock, CkptBranch, ConvRef } from './detect';
import { keepsPostBN } from './detect';

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

function convPart(conv: ConvRef, bn: BNRef | undefined): ConvPart {
  return {
    weight: conv.weight.rows ? { rows: conv.weight.rows } : conv.weight.read(),
    kernel: conv.kernel,
    bias: conv.bias?.read(),
    bn: bn ? bnParams(bn) : undefined,
    outChannels: conv.weight.shape[0],
    groups: conv.groups,
  };
}

/** The factor of a branch: its scale tensor, negated when the branch is subtracted. */
function factorOf(b: CkptBranch): number | ArrayLike<number> | undefined {
  const s = b.scale ? b.scale.read() : undefined;
  if (!b.negate) return s;
  if (!s) return -1;
  return Float64Array.from(s as ArrayLike<number>, (v) => -v);
}

/** A checkpoint branch with its numbers, ready for the lowering. */
export function branchSpec(b: CkptBranch): BranchSpec {
  const scale = factorOf(b);
  switch (b.kind) {
    case 'identity':
      return { kind: 'identity', scale };
    case 'bn_identity':
      return { kind: 'bn_identity', bn: bnParams(b.bn!), scale };
    case 'avgpool':
      return { kind: 'avgpool', pool: b.pool!.kernel, bn: b.bn ? bnParams(b.bn) : undefined, scale };
    case 'sequential':
      return { kind: 'sequential', first: convPart(b.first!.conv, b.first!.bn), second: convPart(b.conv!, b.bn), scale };
    case 'dilated':
      return { kind: 'dilated', ...convPart(b.conv!, b.bn), dilation: b.conv!.dilation ?? b.conv!.kernel.map(() => 1), scale };
    case 'conv':
      return { kind: 'conv', ...convPart(b.conv!, b.bn), scale };
    case 'conv_bn':
      return { kind: 'conv_bn', ...convPart(b.conv!, b.bn), bn: bnParams(b.bn!), scale };
  }
}

/** The block's terms, read from the checkpoint and lowered. */
export function ckptBlockSpec(block: CkptBlock): FuseSpec {
  const name = `block '${block.info.name}'`;
  const ctx: LowerContext = { name, outChannels: block.outChannels, inPerGroup: block.inPerGroup, groups: block.groups };
  const terms: (ConvTerm | IdentityTerm)[] = block.branches.map((b) => lowerBranch(branchSpec(b), ctx));
  const foldPost = block.postBN && !keepsPostBN(block.family, block.postBN);
  return {
    name,
    outChannels: block.outChannels,
    inPerGroup: block.inPerGroup,
    groups: block.groups,
    kernel: block.kernel,
    terms,
    postBN: foldPost ? bnParams(block.postBN!) : undefined,
  };
}
