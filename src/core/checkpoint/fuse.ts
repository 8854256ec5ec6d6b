// Fusion specs for checkpoint blocks: each branch read from the checkpoint (fp16/bf16 widened
// exactly) and lowered to plain conv terms by the branch-kind table (src/core/branches.ts), then the
// same exact math as for ONNX (src/core/fusion.ts).
import { type BranchSpec, type ConvPart, type LowerContext, lowerBranch } from '../branches';
import { FusionError } from '../errors';
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

/** A channel-diagonal kernel [cout, cpg, …k] with value v (DBB's avg-pool as the second step of a sequential branch). */
function diagonal(cout: number, cpg: number, kernel: number[], v: number): Float64Array {
  const ks = kernel.reduce((a, b) => a * b, 1);
  const w = new Float64Array(cout * cpg * ks);
  for (let o = 0; o < cout; o++) w.fill(v, (o * cpg + (o % cpg)) * ks, (o * cpg + (o % cpg) + 1) * ks);
  return w;
}

function convPart(conv: ConvRef, bn: BNRef | undefined, addIdentity = false): ConvPart {
  let weight: ConvPart['weight'] = conv.weight.rows && !addIdentity ? { rows: conv.weight.rows } : conv.weight.read();
  if (addIdentity) {
    // IdentityBasedConv1x1: the kernel used is weight + I (I[o, o mod cpg] = 1).
    const [cout, cpg] = conv.weight.shape;
    const w = Float64Array.from(weight as ArrayLike<number>);
    const ks = w.length / (cout * cpg);
    if (ks !== 1) throw new FusionError(`'${conv.node.path}': an identity-based conv must be 1×1.`);
    for (let o = 0; o < cout; o++) w[o * cpg + (o % cpg)] += 1;
    weight = w;
  }
  return {
    weight,
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
export function branchSpec(b: CkptBranch, block: Pick<CkptBlock, 'groups'>): BranchSpec {
  const scale = factorOf(b);
  switch (b.kind) {
    case 'identity':
      return { kind: 'identity', scale };
    case 'bn_identity':
      return { kind: 'bn_identity', bn: bnParams(b.bn!), scale };
    case 'avgpool':
      return { kind: 'avgpool', pool: b.pool!.kernel, bn: b.bn ? bnParams(b.bn) : undefined, scale };
    case 'sequential': {
      const first = convPart(b.first!.conv, b.first!.bn, b.first!.addIdentity);
      if (b.conv) return { kind: 'sequential', first, second: convPart(b.conv, b.bn), scale };
      // Pooling as the second step: a channel-diagonal 1/k² kernel over the first conv's outputs.
      const mid = b.first!.conv.weight.shape[0];
      const cpg = mid / block.groups;
      const k = b.pool!.kernel;
      const second: ConvPart = { weight: diagonal(mid, cpg, k, 1 / k.reduce((x, y) => x * y, 1)), kernel: k, bn: b.bn ? bnParams(b.bn) : undefined, outChannels: mid, groups: block.groups };
      return { kind: 'sequential', first, second, scale };
    }
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
  const terms: (ConvTerm | IdentityTerm)[] = block.branches.map((b) => lowerBranch(branchSpec(b, block), ctx));
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
