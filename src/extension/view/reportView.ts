// The fuse report as the report webview and the notifications show it: display-ready rows built
// from a FuseReport (the same numbers as the CLI's tables). Pure.
import { type Benefit, changeText, fmtBytes, fmtCount, fmtNum, type FuseReport, speedup, type TensorDiff, verdictLine } from '../../core/report';
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
  /** What fusion buys (MACs, latency once measured); null when nothing was written. */
  benefit: BenefitView | null;
}

/** Runs of each model when the report's "Measure speed-up" asks for latency. */
export const SPEEDUP_RUNS = 20;

export interface BenefitView {
  /** `13.13G → 11.82G (−10.0 %)`. */
  macs: string;
  /** What the MAC counts cover, in words. */
  scope: string;
  /** Nodes or blocks left out of the counts (shapes unknown), or null. */
  uncounted: string | null;
  blocks: { name: string; before: string; after: string; change: string }[];
  /** `12.3 ms → 7.2 ms · 1.7× faster`, or null until measured. */
  latency: string | null;
  /** How the latency was measured, or null. */
  latencyNote: string | null;
  /** The report can ask the host to measure latency: an ONNX model and its fused output. */
  canMeasure: boolean;
}

export { changeText };

function latencyLines(l: NonNullable<Benefit['latencyMs']>): { latency: string; latencyNote: string } {
  return {
    latency: `${fmtNum(l.before)} ms → ${fmtNum(l.after)} ms · ${speedup(l.before, l.after)}`,
    latencyNote: `onnxruntime with its default optimizations, ${l.threads ? `${l.threads} threads` : 'its default threads'} for both; median of ${l.runs} runs each after a warm-up${l.scope === 'blocks' ? '; the one-block models, summed' : ''}.`,
  };
}

export function benefitView(r: FuseReport): BenefitView | null {
  const b = r.benefit;
  if (!b || !r.output) return null;
  const uncounted = b.uncounted?.length ? (b.uncounted.length <= 5 ? b.uncounted.join(', ') : `${b.uncounted.slice(0, 5).join(', ')} and ${b.uncounted.length - 5} more`) : null;
  return {
    macs: `${fmtCount(b.macsBefore)} → ${fmtCount(b.macsAfter)} (${changeText(b.macsBefore, b.macsAfter)})`,
    scope:
      b.macsScope === 'model'
        ? 'Multiply-accumulates of every Conv, Gemm and MatMul at batch 1 and the input shapes (Conv = N·Cout·H′·W′·(Cin/g)·kh·kw, Gemm/MatMul = M·K·N).'
        : 'A checkpoint has no graph and no spatial size: only the fused blocks’ convolutions, per output position (Cout·(Cin/g)·kh·kw).',
    uncounted,
    blocks: b.blocks.map((x) => ({ name: x.block, before: fmtCount(x.macsBefore), after: fmtCount(x.macsAfter), change: changeText(x.macsBefore, x.macsAfter) })),
    ...(b.latencyMs ? latencyLines(b.latencyMs) : { latency: null, latencyNote: null }),
    canMeasure: r.format === 'onnx',
  };
}

/** The view after "Measure speed-up": the latency line, and the speed-up in the headline. */
export function withLatency(v: ReportView, l: NonNullable<Benefit['latencyMs']>): ReportView {
  if (!v.benefit) return v;
  const headline = v.headline.replace(/ · (\d+(\.\d+)?× (faster|slower)|same speed|speed not measured)$/, '');
  return { ...v, headline: `${headline} · ${speedup(l.before, l.after)}`, benefit: { ...v.benefit, ...latencyLines(l) } };
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
    benefit: benefitView(r),
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
