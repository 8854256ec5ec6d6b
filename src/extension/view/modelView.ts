// What the model editor shows, computed from an InspectReport: display-ready strings, so the
// webview only lays them out. Pure (no vscode, no DOM).
import type { BlockInfo, InspectReport } from '../../core/model';
import { baseName, branchLabel, channels, dims, epsilons, fmtBytes, fmtCount, hasAssumedEpsilon, strideText } from './format';

export interface Fact {
  label: string;
  value: string;
}

export interface BlockRow {
  name: string;
  family: string;
  kernel: string;
  stride: string;
  groups: string;
  channels: string;
  branches: string;
  /** Each branch as a chip: `3×3 conv`, `bn(x)`. */
  branchKinds: string[];
  eps: string;
  assumedEps: boolean;
  activation: string;
  params: string;
}

export interface OpRow {
  op: string;
  before: number;
  after: number;
  /** after − before, e.g. `−8`, `+0` is shown as empty. */
  delta: string;
}

export interface ModelView {
  fileName: string;
  path: string;
  /** `ONNX`, `PyTorch checkpoint`, `safetensors`. */
  formatLabel: string;
  headline: string;
  facts: Fact[];
  notes: string[];
  blocks: BlockRow[];
  rejected: { name: string; reason: string; parts: string }[];
  folds: { name: string; conv: string; bn: string; eps: string }[];
  notFolded: { name: string; reason: string }[];
  ops: OpRow[];
  opsTotal: { before: number; after: number } | null;
  params: { before: string; after: string; saved: string };
  assumedEpsNote: boolean;
}

const FORMAT_LABEL: Record<string, string> = { onnx: 'ONNX', pytorch: 'PyTorch checkpoint', safetensors: 'safetensors' };

export function blockRow(b: BlockInfo): BlockRow {
  return {
    name: b.name,
    family: b.family,
    kernel: dims(b.kernel),
    stride: strideText(b.stride),
    groups: String(b.groups),
    channels: channels(b),
    branches: b.branches.map(branchLabel).join(' + ') + (b.postBN ? ' → bn' : ''),
    branchKinds: [...b.branches.map(branchLabel), ...(b.postBN ? ['→ bn'] : [])],
    eps: epsilons(b),
    assumedEps: hasAssumedEpsilon(b),
    activation: b.activation ?? '',
    params: `${fmtCount(b.paramsBefore)} → ${fmtCount(b.paramsAfter)}`,
  };
}

function opsetText(r: InspectReport): string {
  return (r.model.opsets ?? []).map((o) => `${o.domain || 'ai.onnx'} ${o.version}`).join(', ');
}

function dtypeText(d: Record<string, number>): string {
  return Object.entries(d)
    .sort((a, b) => b[1] - a[1])
    .map(([k, n]) => `${k} (${fmtCount(n)})`)
    .join(', ');
}

export function modelView(r: InspectReport): ModelView {
  const m = r.model;
  const facts: Fact[] = [{ label: 'Format', value: FORMAT_LABEL[m.format] ?? m.format }];
  if (m.producer) facts.push({ label: 'Producer', value: m.producer });
  if (m.irVersion !== undefined) facts.push({ label: 'IR version', value: String(m.irVersion) });
  if (m.opsets?.length) facts.push({ label: 'Opsets', value: opsetText(r) });
  if (m.layout) facts.push({ label: 'Layout', value: m.layout });
  facts.push({ label: 'File size', value: fmtBytes(m.fileSize) });
  facts.push({ label: 'Parameters', value: `${fmtCount(m.paramCount)} (${fmtBytes(m.paramBytes)})` });
  if (Object.keys(m.dtypes).length) facts.push({ label: 'Weight dtypes', value: dtypeText(m.dtypes) });
  if (m.nodeCount !== undefined) facts.push({ label: 'Nodes', value: r.nodeCountAfter !== undefined ? `${m.nodeCount} → ${r.nodeCountAfter} after fusion` : String(m.nodeCount) });

  let ops: OpRow[] = [];
  let opsTotal: ModelView['opsTotal'] = null;
  if (m.opCounts) {
    const after = r.opCountsAfter ?? {};
    const names = [...new Set([...Object.keys(m.opCounts), ...Object.keys(after)])];
    ops = names
      .map((op) => {
        const b = m.opCounts![op] ?? 0;
        const a = after[op] ?? 0;
        const d = a - b;
        return { op, before: b, after: a, delta: d === 0 ? '' : d > 0 ? `+${d}` : `−${-d}` };
      })
      .sort((x, y) => y.before - x.before || x.op.localeCompare(y.op));
    opsTotal = { before: m.nodeCount ?? ops.reduce((s, o) => s + o.before, 0), after: r.nodeCountAfter ?? ops.reduce((s, o) => s + o.after, 0) };
  }

  const n = r.blocks.length;
  const headline = n
    ? `${n} re-parameterizable block${n === 1 ? '' : 's'}${r.folds.length ? ` · ${r.folds.length} Conv→BN fold${r.folds.length === 1 ? '' : 's'}` : ''}${r.rejected.length ? ` · ${r.rejected.length} rejected` : ''}`
    : r.folds.length
      ? `No re-parameterizable blocks · ${r.folds.length} Conv→BN fold${r.folds.length === 1 ? '' : 's'}`
      : 'No re-parameterizable blocks found';
  const saved = m.paramCount - r.paramCountAfter;
  return {
    fileName: baseName(m.path),
    path: m.path,
    formatLabel: FORMAT_LABEL[m.format] ?? m.format,
    headline,
    facts,
    notes: [...m.notes],
    blocks: r.blocks.map(blockRow),
    rejected: r.rejected.map((x) => ({ name: x.name, reason: x.reason, parts: x.parts.join(', ') })),
    folds: r.folds.map((f) => ({ name: f.name, conv: f.conv, bn: f.bn, eps: String(f.epsilon) })),
    notFolded: r.notFolded.map((x) => ({ name: x.name, reason: x.reason })),
    ops,
    opsTotal,
    params: { before: fmtCount(m.paramCount), after: fmtCount(r.paramCountAfter), saved: saved > 0 ? fmtCount(saved) : '0' },
    assumedEpsNote: r.blocks.some(hasAssumedEpsilon),
  };
}
