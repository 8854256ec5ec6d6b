// Small formatting helpers shared by the extension's view models (tree, editor, report): pure.
import type { BlockInfo, BranchInfo } from '../../core/model';
import { BRANCH_KINDS, branchLabel as coreBranchLabel } from '../../core/branches';
import { fmtNum } from '../../core/report';

export { fmtBytes, fmtCount, fmtNum } from '../../core/report';

export const kindLabel = (k: BranchInfo['kind']): string => BRANCH_KINDS[k].label;
export const kindLong = (k: BranchInfo['kind']): string => BRANCH_KINDS[k].long;

/** `3×3` */
export const dims = (d: readonly number[] | undefined): string => (d && d.length ? d.join('×') : '—');

/** `32→64` */
export const channels = (b: Pick<BlockInfo, 'inChannels' | 'outChannels'>): string => `${b.inChannels}→${b.outChannels}`;

/** One branch in the CLI's notation: `3×3 conv+bn`, `bn(x)`, `1×1 conv·α` (from the branch-kind table). */
export function branchLabel(br: BranchInfo): string {
  return coreBranchLabel(br);
}

/** Stride as one number when it is the same in every dimension (`2`), else `2×1`. */
export function strideText(stride: readonly number[]): string {
  return stride.length && stride.every((s) => s === stride[0]) ? String(stride[0]) : stride.join('×');
}

/** BN epsilons of a block, deduplicated; `*` marks an assumed one. */
export function epsilons(b: BlockInfo): string {
  const eps = new Set<string>();
  for (const br of b.branches) if (br.epsilon !== undefined) eps.add(fmtNum(br.epsilon) + (br.epsilonSource === 'assumed' ? '*' : ''));
  if (b.postBN) eps.add(fmtNum(b.postBN.epsilon) + (b.postBN.epsilonSource === 'assumed' ? '*' : ''));
  return [...eps].join(', ') || '—';
}

/** True when any epsilon of the block was not stored in the file. */
export function hasAssumedEpsilon(b: BlockInfo): boolean {
  return b.branches.some((br) => br.epsilonSource === 'assumed') || b.postBN?.epsilonSource === 'assumed';
}

/** A percentage with sensible precision: `37.5%`, `0.04%`, `0%`. */
export function pct(share: number): string {
  const p = share * 100;
  if (p === 0) return '0%';
  if (Math.abs(p) >= 10) return `${p.toFixed(1)}%`;
  if (Math.abs(p) >= 0.1) return `${p.toFixed(2)}%`;
  return `${p.toPrecision(1)}%`;
}

/** The last path segment, with either separator. */
export function baseName(p: string): string {
  const i = Math.max(p.lastIndexOf('/'), p.lastIndexOf('\\'));
  return i >= 0 ? p.slice(i + 1) : p;
}
