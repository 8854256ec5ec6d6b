// What the model editor's Quantization section shows, computed from a QuantReport: display-ready
// strings, worst block first. Pure (no vscode, no DOM).
import type { QuantReport } from '../../core/quant';
import { sortWorstFirst } from '../../core/quant';
import { fmtNum } from '../../core/report';

export interface QuantRow {
  name: string;
  perTensor: string;
  perChannel: string;
  weightSqnr: string;
  imbalance: string;
  verdict: string;
  /** Below the threshold per tensor: on the fallback list. */
  fallback: boolean;
  /** The QARepVGG branch-gain flag, or ''. */
  gainFlag: string;
}

export interface QuantView {
  headline: string;
  /** Where the output SQNR was measured, in words. */
  measuredOn: string;
  thresholdDb: number;
  rows: QuantRow[];
  fp16: { summary: string; rows: { name: string; overflow: number; subnormal: number }[] };
  /** Weights outside blocks (stem, head, deploy convs), worst per-tensor weight SQNR first, at most 20. */
  others: { name: string; op: string; perTensor: string; perChannel: string; imbalance: string }[];
  othersTotal: number;
  fallback: string[];
  /** The fallback list as copied to the clipboard: one block name per line. */
  fallbackText: string;
  notes: string[];
}

const db = (v: number | null | undefined): string => (v === null || v === undefined ? '—' : `${v.toFixed(1)} dB`);

export function quantView(r: QuantReport): QuantView {
  const tensors = new Map(r.tensors.map((t) => [t.name, t]));
  const rows = sortWorstFirst(r.blocks).map((b) => {
    const t = tensors.get(b.weight);
    return {
      name: b.name,
      perTensor: db(b.outputSqnrDb.perTensor),
      perChannel: db(b.outputSqnrDb.perChannel),
      weightSqnr: db(t?.int8.perTensorSqnrDb),
      imbalance: t?.rangeImbalance ? `${fmtNum(t.rangeImbalance)}×` : '—',
      verdict: b.verdict,
      fallback: r.fallback.includes(b.name),
      gainFlag: b.branchGains?.flag ?? '',
    };
  });
  const hz = r.tensors.filter((t) => t.fp16.overflow || t.fp16.subnormal);
  const measuredOn = !r.measured
    ? 'Output SQNR not measured (no blocks).'
    : r.measured.scope === 'model'
      ? `Output SQNR: all model outputs, only that block's fused weight INT8, against the float fused model; inputs ${r.measured.inputs.map((i) => `${i.name} ${i.shape.join('×')}`).join(', ')} (${r.measured.inputs[0]?.source ?? ''}).`
      : 'Output SQNR: each block alone (its fused conv, float vs INT8, on random input): a checkpoint has no graph of the whole model.';
  const n = r.blocks.length;
  return {
    headline: `${n} block${n === 1 ? '' : 's'} · ${r.fallback.length} below ${r.thresholdDb} dB per tensor · FP16: ${r.fp16.overflow} overflow, ${r.fp16.subnormal} subnormal${r.fusedInMemory ? ' · analysed as fused' : ''}`,
    measuredOn,
    thresholdDb: r.thresholdDb,
    rows,
    fp16: {
      summary: hz.length ? `${r.fp16.overflow} value(s) overflow FP16 (|w| > 65504), ${r.fp16.subnormal} subnormal (0 < |w| < 2⁻¹⁴) in ${hz.length} tensor(s).` : 'No weight overflows FP16 or is subnormal in it.',
      rows: hz.map((t) => ({ name: t.name, overflow: t.fp16.overflow, subnormal: t.fp16.subnormal })),
    },
    others: r.tensors
      .filter((t) => !t.block)
      .sort((a, b) => (a.int8.perTensorSqnrDb ?? Infinity) - (b.int8.perTensorSqnrDb ?? Infinity))
      .slice(0, 20)
      .map((t) => ({ name: t.name, op: t.op, perTensor: db(t.int8.perTensorSqnrDb), perChannel: db(t.int8.perChannelSqnrDb), imbalance: t.rangeImbalance ? `${fmtNum(t.rangeImbalance)}×` : '—' })),
    othersTotal: r.tensors.filter((t) => !t.block).length,
    fallback: r.fallback,
    fallbackText: r.fallback.join('\n'),
    notes: r.notes,
  };
}
