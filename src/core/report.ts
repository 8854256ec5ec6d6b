// The fuse report (what the CLI prints as JSON and the extension shows), and its text rendering.
import type { InspectReport } from './model';

export interface TensorDiff {
  name: string;
  shape: number[];
  maxAbsDiff: number;
  /** max over elements of |Δ| / max(|y|, atol, 1e-12): relative error, tiny values judged absolutely. */
  maxRelDiff: number;
  meanAbsDiff: number;
  /** Multi-index of the element with the largest |Δ|. */
  worstIndex: number[];
  /** max |y| of the original model's tensor. */
  maxAbsRef: number;
  /** atol + rtol · max|y| */
  tolerance: number;
  passed: boolean;
  /** Elements that are NaN/Inf in one output but not equally so in the other. */
  nonFinite: number;
}

export interface BlockDiff extends TensorDiff {
  block: string;
}

export interface ValidationReport {
  passed: boolean;
  atol: number;
  rtol: number;
  seed: number;
  runtime: string;
  inputs: { name: string; shape: number[]; dtype: string; source: string }[];
  outputs: TensorDiff[];
  blocks: BlockDiff[];
  durationMs: number;
  /** Checkpoints: the whole model was also run, original against fused, in the user's PyTorch (`outputs` holds its tensors). */
  endToEnd?: EndToEndInfo;
  /** Checkpoints: why the requested whole-model run did not happen (e.g. the output is a state_dict). */
  endToEndSkipped?: string;
}

/** The opt-in whole-model check of a checkpoint in the user's own PyTorch (--python). */
export interface EndToEndInfo {
  interpreter: string;
  python: string;
  torch: string;
  /** Folders put first on sys.path. */
  pythonPath: string[];
  /** The module objects run: checkpoint entry ('' = the root) and class. */
  models: { entry: string; className: string }[];
}

export interface FuseReport {
  input: string;
  format: InspectReport['model']['format'];
  /** The written file, or null when there was nothing to fuse. */
  output: string | null;
  externalData?: string;
  bytesWritten: number;
  blocksFused: number;
  bnFolded: number;
  nodesBefore?: number;
  nodesAfter?: number;
  paramsBefore: number;
  paramsAfter: number;
  inspect: InspectReport;
  /** null when validation was not run; `skipped` says why. */
  validation: ValidationReport | null;
  validationSkipped?: string;
  timingsMs: Record<string, number>;
}

// ----- text rendering (CLI, output channel) --------------------------------------------------

export function fmtNum(n: number): string {
  if (n === 0) return '0';
  const a = Math.abs(n);
  if (a >= 1e-3 && a < 1e5) return Number(n.toPrecision(3)).toString();
  return n.toExponential(1);
}

export function fmtCount(n: number): string {
  if (n >= 1e9) return `${(n / 1e9).toFixed(2)}G`;
  if (n >= 1e6) return `${(n / 1e6).toFixed(2)}M`;
  if (n >= 1e3) return `${(n / 1e3).toFixed(1)}k`;
  return String(n);
}

export function fmtBytes(n: number): string {
  if (n >= 1 << 30) return `${(n / (1 << 30)).toFixed(2)} GiB`;
  if (n >= 1 << 20) return `${(n / (1 << 20)).toFixed(1)} MiB`;
  if (n >= 1 << 10) return `${(n / (1 << 10)).toFixed(1)} KiB`;
  return `${n} B`;
}

/** A plain-text table with aligned columns. */
export function table(head: string[], rows: string[][]): string {
  const w = head.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? '').length)));
  const line = (r: string[]) => r.map((c, i) => (c ?? '').padEnd(w[i])).join('  ').trimEnd();
  return [line(head), line(w.map((n) => '-'.repeat(n))), ...rows.map(line)].join('\n');
}

const kindLabel: Record<string, string> = { conv: 'conv', conv_bn: 'conv+bn', bn_identity: 'bn(x)', identity: 'x' };

export function branchSummary(b: InspectReport['blocks'][number]): string {
  return b.branches
    .map((br) => {
      const k = br.kernel ? `${br.kernel.join('×')} ` : '';
      return `${k}${kindLabel[br.kind]}${br.scaled ? '·α' : ''}`;
    })
    .join(' + ') + (b.postBN ? ' → bn' : '');
}

function epsText(b: InspectReport['blocks'][number]): string {
  const eps = new Set<string>();
  for (const br of b.branches) if (br.epsilon !== undefined) eps.add(fmtNum(br.epsilon) + (br.epsilonSource === 'assumed' ? '*' : ''));
  if (b.postBN) eps.add(fmtNum(b.postBN.epsilon) + (b.postBN.epsilonSource === 'assumed' ? '*' : ''));
  return [...eps].join(',') || '-';
}

export function renderInspect(r: InspectReport): string {
  const m = r.model;
  const out: string[] = [];
  out.push(`${m.path}`);
  const facts = [
    `format ${m.format}`,
    m.producer ? `producer ${m.producer}` : '',
    m.irVersion ? `IR ${m.irVersion}` : '',
    m.opsets?.length ? `opset ${m.opsets.map((o) => `${o.domain || 'ai.onnx'} ${o.version}`).join(', ')}` : '',
    m.layout ?? '',
    `${fmtCount(m.paramCount)} params (${fmtBytes(m.paramBytes)})`,
    m.nodeCount !== undefined ? `${m.nodeCount} nodes` : '',
  ].filter(Boolean);
  out.push(facts.join(' · '));
  for (const n of m.notes) out.push(`note: ${n}`);
  out.push('');
  if (r.blocks.length) {
    out.push(`${r.blocks.length} re-parameterizable block${r.blocks.length === 1 ? '' : 's'}:`);
    out.push(
      table(
        ['block', 'family', 'kernel', 'stride', 'groups', 'channels', 'branches', 'eps'],
        r.blocks.map((b) => [b.name, b.family, b.kernel.join('×'), b.stride.join('×'), String(b.groups), `${b.inChannels}→${b.outChannels}`, branchSummary(b), epsText(b)]),
      ),
    );
  } else out.push('No re-parameterizable blocks found.');
  if (r.blocks.some((b) => b.branches.some((br) => br.epsilonSource === 'assumed'))) out.push('* epsilon assumed (not stored in the file)');
  // Inferences shared by many blocks are listed once, with the blocks they apply to.
  const assumed = new Map<string, string[]>();
  for (const b of r.blocks) for (const a of b.assumptions ?? []) assumed.set(a, [...(assumed.get(a) ?? []), b.name]);
  if (assumed.size) {
    out.push('inferred, not read from the file:');
    for (const [a, names] of assumed) out.push(`  ${a} (${names.length === r.blocks.length ? 'all blocks' : names.join(', ')})`);
  }
  if (r.rejected.length) {
    out.push('', `${r.rejected.length} rejected candidate${r.rejected.length === 1 ? '' : 's'} (not fused):`);
    for (const x of r.rejected) out.push(`  ${x.name}: ${x.reason}`);
  }
  if (r.folds.length) out.push('', `${r.folds.length} standalone Conv→BatchNormalization pair${r.folds.length === 1 ? '' : 's'} to fold.`);
  if (r.notFolded.length) {
    out.push(`${r.notFolded.length} Conv→BatchNormalization pair${r.notFolded.length === 1 ? '' : 's'} left alone:`);
    for (const x of r.notFolded) out.push(`  ${x.name}: ${x.reason}`);
  }
  if (m.opCounts && r.opCountsAfter) {
    const ops = [...new Set([...Object.keys(m.opCounts), ...Object.keys(r.opCountsAfter)])].sort();
    const rows = ops.map((o) => [o, String(m.opCounts![o] ?? 0), String(r.opCountsAfter![o] ?? 0)]);
    out.push('', table(['op', 'before', 'after'], [...rows, ['(total)', String(m.nodeCount ?? ''), String(r.nodeCountAfter ?? '')]]));
  }
  out.push('', `parameters: ${fmtCount(m.paramCount)} → ${fmtCount(r.paramCountAfter)}`);
  return out.join('\n');
}

export function renderValidation(v: ValidationReport): string {
  const out: string[] = [];
  out.push(`validation: ${v.runtime}; inputs ${v.inputs.map((i) => `${i.name} ${i.shape.join('×')} ${i.dtype}`).join(', ')}; atol ${v.atol}, rtol ${v.rtol}`);
  const row = (name: string, d: TensorDiff) => [name, fmtNum(d.maxAbsDiff), fmtNum(d.maxRelDiff), fmtNum(d.meanAbsDiff), `[${d.worstIndex.join(',')}]`, fmtNum(d.maxAbsRef), fmtNum(d.tolerance), d.passed ? 'pass' : 'FAIL'];
  const head = ['max |Δ|', 'max rel', 'mean |Δ|', 'worst at', 'max |y|', 'tolerance', 'verdict'];
  if (v.endToEnd) {
    const e = v.endToEnd;
    out.push('', `whole model, end to end: ${e.models.map((m) => `${m.entry ? `ckpt['${m.entry}']` : 'the checkpoint'} (${m.className})`).join(', ')} run original against fused in PyTorch ${e.torch} (${e.interpreter})`);
  }
  if (v.outputs.length) out.push('', table(['output', ...head], v.outputs.map((d) => row(d.name, d))));
  else {
    out.push('', `Checked block by block, as read by RepFuse: each fused block, as written, against its branches as RepFuse read them from the file; the whole model was not run${v.endToEndSkipped ? ` (${v.endToEndSkipped})` : ' (a checkpoint has no graph; --python runs it end to end in your own PyTorch)'}.`);
  }
  if (v.blocks.length) out.push('', table(['block', ...head], v.blocks.map((d) => row(d.block, d))));
  return out.join('\n');
}

export function verdictLine(r: FuseReport): string {
  if (!r.output) return 'Nothing to fuse: no re-parameterizable blocks or Conv→BN pairs found; no file written.';
  const parts = [`Fused ${r.blocksFused} block${r.blocksFused === 1 ? '' : 's'}`];
  if (r.bnFolded) parts.push(`folded ${r.bnFolded} BN`);
  if (r.validation) {
    // A checkpoint has no whole-network outputs: its verdict is the worst block.
    const diffs = r.validation.outputs.length ? r.validation.outputs : r.validation.blocks;
    const max = Math.max(0, ...diffs.map((o) => o.maxAbsDiff));
    const scope = r.validation.endToEnd ? ` (whole model, in PyTorch ${r.validation.endToEnd.torch})` : r.validation.outputs.length ? '' : ' (worst block; checked block by block, as read by RepFuse)';
    parts.push(`max |Δ| ${fmtNum(max)}${scope}`, r.validation.passed ? 'passed' : 'OVER TOLERANCE');
  } else parts.push(`not validated${r.validationSkipped ? ` (${r.validationSkipped})` : ''}`);
  return parts.join(' · ');
}

export function renderFuse(r: FuseReport): string {
  const out = [renderInspect(r.inspect), ''];
  if (r.output) {
    out.push(`wrote ${r.output} (${fmtBytes(r.bytesWritten)})${r.externalData ? ` + external data ${r.externalData}` : ''}`);
    if (r.nodesBefore !== undefined) out.push(`nodes ${r.nodesBefore} → ${r.nodesAfter}; parameters ${fmtCount(r.paramsBefore)} → ${fmtCount(r.paramsAfter)}`);
  }
  if (r.validation) out.push('', renderValidation(r.validation));
  out.push('', verdictLine(r));
  return out.join('\n');
}
