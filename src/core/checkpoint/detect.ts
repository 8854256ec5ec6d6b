// Block detection in checkpoints, driven by the family registry (src/core/families): each family's
// matcher reads its branches by the module names it uses. Works on trees from pickled modules
// (class names, eps, stride, padding, groups known) and on trees from bare state_dict keys (those
// inferred from shapes or family defaults, and said so). In a detected block every child module,
// parameter and buffer is either consumed by the fusion or known to be inert for it; anything
// else rejects the block, named with its class.
import { dtypeName, isFloatType } from '../dtype';
import { RepFuseError } from '../errors';
import { FAMILIES, FAMILY_LIST, type FamilyDef, type FamilyId, isFamilyId } from '../families';
import type { BranchInfo, BlockInfo, RejectedCandidate } from '../model';
import { type BNRef, type CkptBranch, fmt, isInertClass, type MatchContext, type MatchResult, Reject } from './match';
import { type ModuleNode, numelOf, walk } from './tree';

export type { BNRef, CkptBranch, ConvRef, PoolRef } from './match';
export { FAMILIES, type FamilyDef, type FamilyId } from '../families';

export interface CkptBlock {
  info: BlockInfo;
  node: ModuleNode;
  family: FamilyId;
  branches: CkptBranch[];
  /** BN on the sum, folded into the fused conv (unless the family keeps it: see its deploy.keep). */
  postBN?: BNRef;
  kernel: number[];
  stride: number[];
  groups: number;
  inPerGroup: number;
  outChannels: number;
  dtype: number;
}

export interface CkptDetection {
  blocks: CkptBlock[];
  rejected: RejectedCandidate[];
}

export interface CkptDetectOptions {
  /** Overrides every BN epsilon (for bare state_dicts whose family default is wrong). */
  eps?: number;
  /**
   * Whether the tensors are in module order, so "the layer before" a block means something
   * (true for torch state_dicts; safetensors sorts its names).
   */
  moduleOrder?: boolean;
  /** `--family`: the family to assume where a state_dict cannot tell variants apart (qarepvgg / qarepvggv2). */
  family?: string;
}

/** Whether the family keeps its post-add BN in the deploy model (so the fusion must not fold it). */
export const keepsPostBN = (family: FamilyId, postBN: BNRef | undefined): boolean => !!postBN && (FAMILIES[family].deploy.keep ?? []).includes(postBN.node.name);

/** Elements held by a module's own tensors (a BN's num_batches_tracked included). */
const tensorCount = (n: ModuleNode | undefined): number => (n ? [...n.tensors.values()].reduce((a, t) => a + numelOf(t.shape), 0) : 0);

/** Modules of a branch, for accounting and for the report's `parts`. */
function branchNodes(b: CkptBranch): ModuleNode[] {
  return [b.first?.conv.node, b.first?.bn?.node, b.conv?.node, b.bn?.node, b.pool?.node].filter((x): x is ModuleNode => !!x);
}

/** Geometry of one branch as the fused conv sees it. */
interface Geometry {
  node: ModuleNode;
  cout: number;
  cpg: number;
  /** Effective kernel (dilated spread out, sequential composed). */
  kernel: number[];
  padding?: number[];
  stride?: number[];
  groups?: number;
  dtype: number;
}

function geometry(b: CkptBranch): Geometry | undefined {
  if (b.kind === 'identity' || b.kind === 'bn_identity' || b.kind === 'avgpool') return undefined;
  if (b.kind === 'sequential' && !b.conv) {
    // 1×1 conv → BN-pad → avg-pool: the pool is the second step.
    const f = b.first!.conv;
    const p = b.pool!;
    if (f.kernel.some((k) => k !== 1)) throw new Reject(`'${f.node.path}' is ${fmt(f.kernel)}; only a 1×1 conv can precede the pooling.`);
    const padding = f.padding && p.padding ? f.padding.map((x, i) => x + p.padding![i] + (b.seqPadding?.[i] ?? 0)) : undefined;
    const cout = b.bn?.mean.shape[0] ?? f.weight.shape[0];
    return { node: f.node, cout, cpg: f.weight.shape[1], kernel: p.kernel, padding, stride: p.stride, groups: f.groups, dtype: f.weight.dtype };
  }
  const cv = b.conv!;
  if (b.kind === 'sequential') {
    const f = b.first!.conv;
    if (f.stride && f.stride.some((s) => s !== 1) && cv.stride && cv.stride.some((s) => s !== 1)) throw new Reject(`'${f.node.path}' and '${cv.node.path}' both have a stride; only one of two convs in series may.`);
    if (f.dilation || cv.dilation) throw new Reject(`'${(f.dilation ? f : cv).node.path}' is dilated inside a sequential branch; it cannot be merged.`);
    const kernel = f.kernel.map((k, i) => k + cv.kernel[i] - 1);
    const padding = f.padding && cv.padding ? f.padding.map((p, i) => p + cv.padding![i] + (b.seqPadding?.[i] ?? 0)) : undefined;
    const stride = f.stride && cv.stride ? f.stride.map((s, i) => s * cv.stride![i]) : undefined;
    return { node: cv.node, cout: cv.weight.shape[0], cpg: f.weight.shape[1], kernel, padding, stride, groups: f.groups ?? cv.groups, dtype: cv.weight.dtype };
  }
  if (cv.dilation && b.kind !== 'dilated') throw new Reject(`'${cv.node.path}' has dilation ${fmt(cv.dilation)}; only dilation 1 can be merged here.`);
  const d = b.kind === 'dilated' ? (cv.dilation ?? cv.kernel.map(() => 1)) : cv.kernel.map(() => 1);
  const kernel = cv.kernel.map((k, i) => (k - 1) * d[i] + 1);
  return { node: cv.node, cout: cv.weight.shape[0], cpg: cv.weight.shape[1], kernel, padding: cv.padding, stride: cv.stride, groups: cv.groups, dtype: cv.weight.dtype };
}

export function detectCheckpoint(root: ModuleNode, opts: CkptDetectOptions = {}): CkptDetection {
  const det: CkptDetection = { blocks: [], rejected: [] };
  const claimed = new Set<ModuleNode>();
  const order = [...walk(root)];
  const allPaths = order.map((n) => n.path).join(' ');
  if (opts.family !== undefined && !isFamilyId(opts.family)) {
    throw new RepFuseError(`--family: unknown family '${opts.family}'; known: ${FAMILY_LIST.map((f) => f.id).join(', ')}.`);
  }

  const ctx: MatchContext = {
    eps: (family: string) => (n: ModuleNode): Pick<BNRef, 'eps' | 'epsSource'> => {
      if (opts.eps !== undefined) return { eps: opts.eps, epsSource: 'override' };
      const e = n.attrs.get('eps');
      if (typeof e === 'number') return { eps: e, epsSource: 'model' };
      return { eps: FAMILIES[family as FamilyId].eps, epsSource: 'assumed' };
    },
    allPaths,
    previousOutChannels,
    forced: opts.family,
  };

  /** Output channels of the nearest module before `n` (in state_dict order) that holds tensors. */
  function previousOutChannels(n: ModuleNode): number | undefined {
    if (opts.moduleOrder === false) return undefined;
    const i = order.indexOf(n);
    for (let j = i - 1; j >= 0; j--) {
      const m = order[j];
      if (n.path.startsWith(m.path + '.') || m.path === '') continue; // an ancestor
      const t = m.tensors.get('running_var') ?? m.tensors.get('weight');
      if (t && t.shape.length >= 1) return t.shape[0];
    }
    return undefined;
  }

  for (const node of order) {
    if ([...claimed].some((c) => node.path.startsWith(c.path + '.'))) continue;
    let family: FamilyDef | undefined;
    try {
      let found: MatchResult | undefined;
      for (const fam of FAMILY_LIST as readonly FamilyDef[]) {
        found = fam.match?.(node, ctx);
        if (found) break;
      }
      if (!found) continue;
      if (!isFamilyId(found.family)) throw new Error(`internal error: a matcher returned the unknown family '${found.family}'`);
      family = FAMILIES[found.family];
      account(node, family, found);
      det.blocks.push(build(node, found.family, found));
      claimed.add(node);
    } catch (err) {
      if (!(err instanceof Reject)) throw err;
      det.rejected.push({ name: node.path, reason: `${family ? family.label + ': ' : ''}${err.message}`, parts: [...node.children.keys()] });
      claimed.add(node);
    }
  }
  return det;

  /**
   * Nothing unexplained passes: every module and tensor under the block is consumed by a branch
   * (or the post-add BN), applied after the sum (the family's `after` children), or inert
   * (nn.Identity, Dropout); a container counts when everything in it does.
   */
  function account(node: ModuleNode, family: FamilyDef, r: MatchResult): void {
    const consumed = new Set<ModuleNode>(r.branches.flatMap(branchNodes));
    if (r.postBN) consumed.add(r.postBN.node);
    const after = new Set(family.after ?? []);
    const unexplained: string[] = [];
    const rel = (m: ModuleNode) => m.path.slice(node.path.length + (node.path ? 1 : 0));
    const describe = (m: ModuleNode) => `${rel(m)} (${m.className ?? `tensors ${[...m.tensors.keys()].join(', ')}`})`;
    /** True when `m` and everything under it is explained; records what is not. */
    const visit = (m: ModuleNode): boolean => {
      if (consumed.has(m)) {
        let ok = true;
        for (const c of m.children.values()) ok = visit(c) && ok;
        return ok;
      }
      if (m.parent === node && after.has(m.name)) return true;
      if (isInertClass(m.className) && m.tensors.size === 0 && m.children.size === 0) return true;
      if (m.tensors.size === 0 && m.children.size > 0) {
        const before = unexplained.length;
        let ok = true;
        for (const c of m.children.values()) ok = visit(c) && ok;
        if (!ok && unexplained.length === before) unexplained.push(describe(m));
        return ok;
      }
      if (m.tensors.size === 0 && !m.className) return true; // a state_dict cannot show it; nothing to fuse wrongly
      unexplained.push(describe(m));
      return false;
    };
    for (const c of node.children.values()) visit(c);
    const own = new Set(r.ownTensors ?? []);
    for (const k of node.tensors.keys()) if (!own.has(k)) unexplained.push(`${k} (a tensor of the block itself)`);
    if (unexplained.length) {
      throw new Reject(`not understood: ${unexplained.join(', ')}; the block is left as it is (a branch RepFuse cannot read would make the fused conv wrong).`);
    }
  }

  function build(node: ModuleNode, family: FamilyId, r: MatchResult): CkptBlock {
    const def = FAMILIES[family];
    const { branches, postBN } = r;
    const geos = branches.map(geometry);
    const convs = geos.filter((g): g is Geometry => !!g);
    if (!convs.length) throw new Reject('no convolution branch.');
    const assumptions: string[] = [...(r.assumptions ?? [])];
    const g0 = convs[0];
    const cout = g0.cout;
    const cpg = g0.cpg;
    const rank = g0.kernel.length;
    for (const cv of convs) {
      const br = branches[geos.indexOf(cv)];
      const w = (br.conv ?? br.first!.conv).weight;
      if (!isFloatType(w.dtype)) throw new Reject(`'${cv.node.path}' weight is ${dtypeName(w.dtype)}; only float weights can be fused.`);
      if (cv.kernel.length !== rank) throw new Reject('branches mix convolutions of different rank.');
      if (cv.cout !== cout || cv.cpg !== cpg) {
        throw new Reject(`branches have different channels ('${g0.node.path}' ${cout}×${cpg}, '${cv.node.path}' ${cv.cout}×${cv.cpg}).`);
      }
      if (cv.kernel.some((k) => k % 2 === 0)) throw new Reject(`'${cv.node.path}' has an even kernel ${fmt(cv.kernel)}, which has no centre.`);
      const want = cv.kernel.map((k) => (k - 1) / 2);
      if (cv.padding && fmt(cv.padding) !== fmt(want)) throw new Reject(`'${cv.node.path}' pads ${fmt(cv.padding)} for a ${fmt(cv.kernel)} kernel; only centred kernels (padding ${fmt(want)}) can be merged.`);
      if (cv.dtype !== g0.dtype) throw new Reject(`branches have different dtypes (${dtypeName(g0.dtype)}, ${dtypeName(cv.dtype)}).`);
    }
    if (convs.some((cv) => !cv.padding)) assumptions.push('padding assumed centred ((k−1)/2), as the family defines it');
    const pools = branches.filter((b) => b.kind === 'avgpool').map((b) => b.pool!);
    const strides = [...convs.map((cv) => cv.stride), ...pools.map((p) => p.stride)];
    let stride: number[];
    const hasId = branches.some((b) => b.kind === 'identity' || b.kind === 'bn_identity' || b.kind === 'avgpool');
    if (strides.every((s) => s)) {
      stride = strides[0]!;
      if (strides.some((s) => fmt(s!) !== fmt(stride))) throw new Reject(`branches have different strides (${strides.map((s) => fmt(s!)).join(', ')}).`);
    } else if (r.stride) {
      stride = r.stride; // the matcher said why
    } else {
      stride = g0.kernel.map(() => 1);
      assumptions.push(branches.some((b) => b.kind === 'identity' || b.kind === 'bn_identity') ? 'stride 1 (the block has an identity branch)' : 'stride not stored in a state_dict (fusion does not depend on it; shown as 1)');
    }
    const groupsList = convs.map((cv) => cv.groups);
    let groups: number;
    if (groupsList.every((g) => g !== undefined)) {
      groups = groupsList[0]!;
      if (groupsList.some((g) => g !== groups)) throw new Reject(`branches have different groups (${groupsList.join(', ')}).`);
    } else {
      // A state_dict stores in/groups per weight, not groups: with an identity branch the block
      // keeps its width; otherwise the input width is read off the layer before the block.
      const before = hasId ? undefined : previousOutChannels(node);
      if (hasId) {
        groups = cout / cpg;
        assumptions.push(`groups ${groups} inferred from weight shapes (identity: in = out = ${cout} channels)`);
      } else if (before !== undefined && before % cpg === 0 && cout % (before / cpg) === 0) {
        groups = before / cpg;
        assumptions.push(`groups ${groups} inferred: the layer before outputs ${before} channels, the weights take ${cpg} per group`);
      } else if (cpg === 1 && cout > 1) {
        // One input channel per output channel: a depthwise conv (MobileOne, RepVGGDW) far more
        // often than a conv over a single-channel input.
        groups = cout;
        assumptions.push(`groups ${groups} assumed (depthwise: one input channel per weight; the input width is not stored)`);
      } else {
        groups = 1;
        assumptions.push('groups 1 assumed (the input width is not stored in a state_dict)');
      }
    }
    const cin = cpg * groups;
    if (hasId) {
      // An avg-pool strides with the block (its stride is in the list checked above); the identity cannot.
      if (branches.some((b) => b.kind === 'identity' || b.kind === 'bn_identity') && stride.some((s) => s !== 1)) throw new Reject(`an identity branch cannot join convolutions with stride ${fmt(stride)}.`);
      if (cin !== cout) throw new Reject(`an identity or avg-pool branch needs as many input as output channels (in ${cin}, out ${cout}).`);
    }
    for (const b of branches) {
      if (b.bn && b.bn.mean.shape[0] !== cout) throw new Reject(`'${b.bn.node.path}' has ${b.bn.mean.shape[0]} channels, the block has ${cout}.`);
      if (b.scale && numelOf(b.scale.shape) !== 1 && numelOf(b.scale.shape) !== cout) throw new Reject(`'${b.scale.key}' has shape ${fmt(b.scale.shape)}; expected a scalar or one value per channel.`);
    }
    if (postBN && postBN.mean.shape[0] !== cout) throw new Reject(`'${postBN.node.path}' has ${postBN.mean.shape[0]} channels, the block has ${cout}.`);
    const allBNs = [...branches.flatMap((b) => [b.bn, b.first?.bn]), postBN];
    const assumedBN = allBNs.find((bn) => bn?.epsSource === 'assumed');
    if (assumedBN) assumptions.push(`BN epsilon ${assumedBN.eps.toExponential(0)} assumed (${def.label} training default${assumedBN.eps !== def.eps ? ' in this layout' : ''}; override with --eps)`);
    const kernel = g0.kernel.map((_, i) => Math.max(...convs.map((cv) => cv.kernel[i]), ...pools.map((p) => p.kernel[i] ?? 1)));
    for (const p of pools) {
      if (p.kernel.length !== rank) throw new Reject(`the avg-pool '${p.node?.path ?? 'avg'}' has a ${p.kernel.length}-D window in a ${rank}-D block.`);
      if (p.kernel.some((k, i) => (kernel[i] - k) % 2 !== 0)) throw new Reject(`the ${fmt(p.kernel)} avg-pool cannot be centred in the ${fmt(kernel)} kernel.`);
    }
    const keepPost = keepsPostBN(family, postBN);
    const branchInfos: BranchInfo[] = branches.map((b, i) => {
      const bns = [b.first?.bn, b.bn].filter((x): x is BNRef => !!x);
      const geo = geos[i];
      return {
        // DBB's 1×1 → BN-pad → avg-pool is lowered as two steps in series but is an avg-pool branch,
        // as the ONNX region of the same block says (a conv inside shows in `dtype`).
        kind: b.kind === 'sequential' && b.pool ? 'avgpool' : b.kind,
        kernel: geo?.kernel ?? b.pool?.kernel,
        hasBias: !!(b.conv?.bias ?? b.first?.conv.bias),
        hasBN: bns.length > 0,
        epsilon: b.bn?.eps ?? b.first?.bn?.eps,
        epsilonSource: b.bn?.epsSource ?? b.first?.bn?.epsSource,
        scaled: !!b.scale,
        subtracted: b.negate || undefined,
        params: branchNodes(b).reduce((a, m) => a + tensorCount(m), 0) + (b.scale ? numelOf(b.scale.shape) : 0),
        dtype: b.conv || b.first ? dtypeName((b.conv ?? b.first!.conv).weight.dtype) : undefined,
        parts: branchNodes(b).map((m) => m.path),
      };
    });
    if (keepPost) assumptions.push(`the post-add BN '${postBN!.node.path}' stays in the deploy model (${def.label} keeps it)`);
    const info: BlockInfo = {
      name: node.path,
      family: def.label,
      kernel,
      stride,
      groups,
      inChannels: cin,
      outChannels: cout,
      branches: branchInfos,
      postBN: postBN ? { epsilon: postBN.eps, epsilonSource: postBN.epsSource } : undefined,
      output: node.path,
      paramsBefore: branchInfos.reduce((a, b) => a + b.params, 0) + (postBN && !keepPost ? tensorCount(postBN.node) : 0),
      paramsAfter: cout * cpg * numelOf(kernel) + cout,
      assumptions: assumptions.length ? assumptions : undefined,
      deployName: def.deploy.module,
    };
    return { info, node, family, branches, postBN, kernel, stride, groups, inPerGroup: cpg, outChannels: cout, dtype: g0.dtype };
  }
}
