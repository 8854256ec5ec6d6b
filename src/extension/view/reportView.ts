// The fuse report as the report webview and the notifications show it: display-ready rows built
// from a FuseReport (the same numbers as the CLI's tables). Pure.
import { fmtBytes, fmtCount, fmtNum, type FuseReport, type TensorDiff, verdictLine } from '../../core/report';
import { baseName } from './format';

export type Verdict = 'passed' | 'failed' | 'unvalidated' | 'nothing';

export interface DiffRow {
  name: string;
  shape: string;
  maxAbs: string;
  maxRel: string;
  meanAbs: string;
  worstAt: string;
  maxRef: string;
  tolerance: string;
  passed: boolean;
  nonFinite: number;
}

export interface ReportView {
  input: string;
  inputName: string;
  output: string | null;
  outputName: string | null;
  externalData: string | null;
  verdict: Verdict;
  /** `Fused 27 blocks · max |Δ| 2.1e-6 · passed`: the CLI's last line. */
  headline: string;
  facts: { label: string; value: string }[];
  validation: {
    runtime: string;
    inputs: string[];
    atol: string;
    rtol: string;
    seed: number;
    outputs: DiffRow[];
    blocks: DiffRow[];
    duration: string;
  } | null;
  validationSkipped: string | null;
  timings: { label: string; value: string }[];
}

export function verdictOf(r: FuseReport): Verdict {
  if (!r.output) return 'nothing';
  if (!r.validation) return 'unvalidated';
  return r.validation.passed ? 'passed' : 'failed';
}

/** Largest max|Δ| over the model outputs (0 when not validated). */
export function maxOutputDiff(r: FuseReport): number {
  return r.validation ? Math.max(0, ...r.validation.outputs.map((o) => o.maxAbsDiff)) : 0;
}

function ms(n: number): string {
  return n >= 1000 ? `${(n / 1000).toFixed(2)} s` : `${Math.round(n)} ms`;
}

function diffRow(name: string, d: TensorDiff): DiffRow {
  return {
    name,
    shape: d.shape.join('×'),
    maxAbs: fmtNum(d.maxAbsDiff),
    maxRel: fmtNum(d.maxRelDiff),
    meanAbs: fmtNum(d.meanAbsDiff),
    worstAt: `[${d.worstIndex.join(',')}]`,
    maxRef: fmtNum(d.maxAbsRef),
    tolerance: fmtNum(d.tolerance),
    passed: d.passed,
    nonFinite: d.nonFinite,
  };
}

export function reportView(r: FuseReport): ReportView {
  const facts: ReportView['facts'] = [
    { label: 'Blocks fused', value: String(r.blocksFused) },
    { label: 'Conv→BN folded', value: String(r.bnFolded) },
  ];
  if (r.nodesBefore !== undefined) facts.push({ label: 'Nodes', value: `${r.nodesBefore} → ${r.nodesAfter}` });
  facts.push({ label: 'Parameters', value: `${fmtCount(r.paramsBefore)} → ${fmtCount(r.paramsAfter)}` });
  if (r.output) facts.push({ label: 'Written', value: `${fmtBytes(r.bytesWritten)}${r.externalData ? ' + external data' : ''}` });
  const v = r.validation;
  return {
    input: r.input,
    inputName: baseName(r.input),
    output: r.output,
    outputName: r.output ? baseName(r.output) : null,
    externalData: r.externalData ?? null,
    verdict: verdictOf(r),
    headline: verdictLine(r),
    facts,
    validation: v
      ? {
          runtime: v.runtime,
          inputs: v.inputs.map((i) => `${i.name} ${i.shape.join('×')} ${i.dtype} (${i.source})`),
          atol: fmtNum(v.atol),
          rtol: fmtNum(v.rtol),
          seed: v.seed,
          outputs: v.outputs.map((d) => diffRow(d.name, d)),
          blocks: v.blocks.map((d) => diffRow(d.block, d)),
          duration: ms(v.durationMs),
        }
      : null,
    validationSkipped: r.validationSkipped ?? null,
    timings: Object.entries(r.timingsMs).map(([k, n]) => ({ label: k, value: ms(n) })),
  };
}

/** What the notification at the end of a fuse says, and how loud. */
export interface FuseNotice {
  severity: 'info' | 'warning';
  message: string;
  actions: ('Open Fused Model' | 'Show Report')[];
}

export function fuseNotice(r: FuseReport): FuseNotice {
  const verdict = verdictOf(r);
  if (verdict === 'nothing') return { severity: 'info', message: `${baseName(r.input)}: ${verdictLine(r)}`, actions: ['Show Report'] };
  const actions: FuseNotice['actions'] = ['Open Fused Model', 'Show Report'];
  if (verdict === 'failed') {
    // Outputs first (the whole model); a checkpoint checked block by block names its blocks.
    const outs = r.validation!.outputs.filter((o) => !o.passed).map((o) => o.name);
    const blocks = r.validation!.blocks.filter((b) => !b.passed).map((b) => b.block);
    const names = outs.length ? outs : blocks;
    const what = `${outs.length ? 'output' : 'block'}${names.length === 1 ? '' : 's'} ${names.join(', ')}`;
    return {
      severity: 'warning',
      message: `${verdictLine(r)}: ${what} ${names.length === 1 ? 'differs' : 'differ'} by more than the tolerance. The fused model was written; check the report before using it.`,
      actions,
    };
  }
  return { severity: 'info', message: verdictLine(r), actions };
}
