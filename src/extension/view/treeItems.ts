// Labels, descriptions, tooltips, icons and context values of the RepConv Blocks tree, as plain
// data (the tree provider turns them into vscode.TreeItems). Pure, so it is unit-tested.
import { BRANCH_KINDS } from '../../core/branches';
import { familyIcon as registryIcon } from '../../core/families';
import type { BlockInfo, BranchInfo, InspectReport, RejectedCandidate } from '../../core/model';
import { baseName, branchLabel, channels, dims, epsilons, fmtBytes, fmtCount, fmtNum, hasAssumedEpsilon, kindLong, strideText } from './format';

/** A codicon id and an optional theme colour id (`charts.blue`). */
export interface IconView {
  id: string;
  color?: string;
}

export interface ItemView {
  label: string;
  description?: string;
  /** Markdown. */
  tooltip: string;
  icon: IconView;
  /** `viewItem` for menus: repfuse.model, repfuse.model.loading, repfuse.block, repfuse.branch, … */
  contextValue: string;
  collapsible: 'none' | 'collapsed' | 'expanded';
}

/** Context values, also used by package.json `when` clauses. */
export const CONTEXT = {
  model: 'repfuse.model',
  modelLoading: 'repfuse.model.loading',
  modelError: 'repfuse.model.error',
  block: 'repfuse.block',
  branch: 'repfuse.branch',
  rejectedGroup: 'repfuse.rejectedGroup',
  rejected: 'repfuse.rejected',
} as const;

/** One icon (and colour) per architecture family, so families stand apart in a long list: from the family registry. */
export function familyIcon(family: string): IconView {
  return registryIcon(family);
}

const BRANCH_ICONS = Object.fromEntries(Object.entries(BRANCH_KINDS).map(([k, d]) => [k, { id: d.icon }])) as Record<BranchInfo['kind'], IconView>;

/** The state of the model behind the tree's root. */
export type ModelState = { status: 'loading'; path: string } | { status: 'error'; path: string; message: string } | { status: 'ready'; path: string; report: InspectReport };

export function modelItem(s: ModelState): ItemView {
  const name = baseName(s.path);
  if (s.status === 'loading') {
    return { label: name, description: 'parsing…', tooltip: `**${name}**\n\nParsing the model…`, icon: { id: 'loading~spin' }, contextValue: CONTEXT.modelLoading, collapsible: 'none' };
  }
  if (s.status === 'error') {
    // The message names the file; the tree's label already does.
    const short = s.message.startsWith(`${s.path}: `) ? s.message.slice(s.path.length + 2) : s.message;
    return { label: name, description: short, tooltip: `**${name}**\n\n${s.message}`, icon: { id: 'error', color: 'errorForeground' }, contextValue: CONTEXT.modelError, collapsible: 'none' };
  }
  const r = s.report;
  const n = r.blocks.length;
  const description = `${n} block${n === 1 ? '' : 's'}${r.rejected.length ? ` · ${r.rejected.length} rejected` : ''}`;
  const facts = [
    `${r.model.format.toUpperCase()}${r.model.producer ? ` · ${r.model.producer}` : ''}`,
    `${fmtCount(r.model.paramCount)} parameters (${fmtBytes(r.model.paramBytes)}) → ${fmtCount(r.paramCountAfter)} after fusion`,
    `${n} re-parameterizable block${n === 1 ? '' : 's'}, ${r.folds.length} Conv→BN fold${r.folds.length === 1 ? '' : 's'}, ${r.rejected.length} rejected candidate${r.rejected.length === 1 ? '' : 's'}`,
  ];
  return {
    label: name,
    description,
    tooltip: `**${name}**\n\n${facts.join('  \n')}`,
    icon: { id: n ? 'circuit-board' : 'circle-slash' },
    contextValue: CONTEXT.model,
    collapsible: n || r.rejected.length ? 'expanded' : 'none',
  };
}

/** `YOLOv7 RepConv · 3×3 · 32→64 · s2` */
export function blockDescription(b: BlockInfo): string {
  return `${b.family} · ${dims(b.kernel)} · ${channels(b)} · s${strideText(b.stride)}`;
}

export function blockItem(b: BlockInfo): ItemView {
  const lines = [
    `**${b.name}** — ${b.family}`,
    '',
    `| | |`,
    `|---|---|`,
    `| kernel | ${dims(b.kernel)} |`,
    `| stride | ${b.stride.join('×')} |`,
    `| groups | ${b.groups} |`,
    `| channels | ${channels(b)} |`,
    `| branches | ${b.branches.map(branchLabel).join(' + ')}${b.postBN ? ' → bn' : ''} |`,
    `| BN ε | ${epsilons(b)} |`,
    `| parameters | ${fmtCount(b.paramsBefore)} → ${fmtCount(b.paramsAfter)} |`,
  ];
  if (b.activation) lines.push(`| followed by | ${b.activation} |`);
  lines.push(`| output | \`${b.output}\` |`);
  if (hasAssumedEpsilon(b)) lines.push('', '⚠ BN epsilon not stored in the file: assumed.');
  const icon = hasAssumedEpsilon(b) ? { id: familyIcon(b.family).id, color: 'list.warningForeground' } : familyIcon(b.family);
  return { label: b.name, description: blockDescription(b), tooltip: lines.join('\n'), icon, contextValue: CONTEXT.block, collapsible: 'collapsed' };
}

/** `ε 0.001 · 9.3k params`, or `kernel 1×1 · 1.1k params` for a plain conv. */
export function branchDescription(br: BranchInfo): string {
  const parts: string[] = [];
  if (br.epsilon !== undefined) parts.push(`ε ${fmtNum(br.epsilon)}${br.epsilonSource === 'assumed' ? ' (assumed)' : ''}`);
  if (br.hasBias && !br.hasBN) parts.push('bias');
  if (br.dtype) parts.push(br.dtype);
  parts.push(`${fmtCount(br.params)} params`);
  return parts.join(' · ');
}

export function branchItem(br: BranchInfo): ItemView {
  const lines = [
    `**${branchLabel(br)}** — ${kindLong(br.kind)}${br.scaled ? ', scaled by a constant α' : ''}`,
    '',
    `kernel ${dims(br.kernel)} · ${br.hasBias ? 'with' : 'no'} bias · ${br.hasBN ? `BatchNorm ε ${fmtNum(br.epsilon ?? NaN)}${br.epsilonSource === 'assumed' ? ' (assumed)' : ''}` : 'no BatchNorm'} · ${br.params} parameters`,
  ];
  if (br.parts.length) lines.push('', br.parts.map((p) => `\`${p}\``).join('  \n'));
  return { label: branchLabel(br), description: branchDescription(br), tooltip: lines.join('\n'), icon: BRANCH_ICONS[br.kind], contextValue: CONTEXT.branch, collapsible: 'none' };
}

export function rejectedGroupItem(n: number): ItemView {
  return {
    label: 'Not fused',
    description: `${n} rejected candidate${n === 1 ? '' : 's'}`,
    tooltip: 'Structures that look like re-parameterization blocks but cannot be fused exactly; each says why.',
    icon: { id: 'warning', color: 'list.warningForeground' },
    contextValue: CONTEXT.rejectedGroup,
    collapsible: 'collapsed',
  };
}

export function rejectedItem(r: RejectedCandidate): ItemView {
  return {
    label: r.name,
    description: r.reason,
    tooltip: `**${r.name}** — not fused\n\n${r.reason}${r.parts.length ? `\n\n${r.parts.map((p) => `\`${p}\``).join('  \n')}` : ''}`,
    icon: { id: 'circle-slash' },
    contextValue: CONTEXT.rejected,
    collapsible: 'none',
  };
}
