// The fuse report (what the CLI prints as JSON and the extension shows), and its text rendering.
import { branchLabel } from './branches';
import type { DropAuxResult, InspectReport, OnnxDropAuxInfo } from './model';

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
  /** Checkpoints with --drop-aux: what was converted, removed and renumbered, per model object. */
  dropAux?: DropAuxResult[];
  /** ONNX with --drop-aux: the auxiliary outputs removed (the writer plan is not part of the report). */
  dropAuxOnnx?: OnnxDropAuxInfo;
  /** What fusion buys: MACs before and after (and latency when asked); absent when nothing was written. */
  benefit?: Benefit;
  timingsMs: Record<string, number>;
}

/**
 * Multiply-accumulates (Conv = N·Cout·H'·W'·(Cin/g)·kh·kw, Gemm/MatMul = M·K·N, batch 1) before and
 * after fusion, and, when asked, the median latency of each model in onnxruntime.
 */
export interface Benefit {
  /**
   * What the MAC counts cover. 'model': every Conv/Gemm/MatMul of the ONNX graph, at the input
   * shapes (declared, batch 1, or --input). 'blocks-per-position': a checkpoint has no graph and no
   * spatial size, so only the fused blocks' convolutions are counted, per output position.
   */
  macsScope: 'model' | 'blocks-per-position';
  macsBefore: number;
  macsAfter: number;
  /** Conv/Gemm/MatMul nodes (or blocks) whose shapes could not be inferred: in neither count. */
  uncounted?: string[];
  blocks: { block: string; macsBefore: number; macsAfter: number }[];
  latencyMs?: {
    before: number;
    after: number;
    runs: number;
    /** intra-op threads of both sessions (0 = onnxruntime's default). */
    threads: number;
    /** 'model': whole models; 'blocks': a checkpoint's one-block models, medians summed. */
    scope: 'model' | 'blocks';
  };
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

export function branchSummary(b: InspectReport['blocks'][number]): string {
  return b.branches.map(branchLabel).join(' + ') + (b.postBN ? ' → bn' : '');
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

/** What --drop-aux did to one model object: the head, the layers removed and renumbered. */
export function renderDropAux(d: DropAuxResult): string[] {
  const out = [`drop-aux: ${d.note}`];
  if (!d.converted) return out;
  if (d.head) out.push(`  mirrors ${d.head.mirrors}`);
  const span = (xs: number[]) => {
    const parts: string[] = [];
    for (let k = 0; k < xs.length; ) {
      let j = k;
      while (j + 1 < xs.length && xs[j + 1] === xs[j] + 1) j++;
      parts.push(j > k ? `${xs[k]}–${xs[j]}` : String(xs[k]));
      k = j + 1;
    }
    return parts.join(', ');
  };
  const byType = new Map<string, number[]>();
  for (const l of d.removed) byType.set(l.type, [...(byType.get(l.type) ?? []), l.from]);
  out.push(`  removed ${d.removed.length} layers: ${[...byType].map(([t, xs]) => `${t.replace(/^.*\./, '')} ${span(xs)}`).join('; ')}`);
  // Renumbering shifts runs of layers by the same amount: one line per shift.
  const shifts = new Map<number, number[]>();
  for (const l of d.renumbered) shifts.set(l.to! - l.from, [...(shifts.get(l.to! - l.from) ?? []), l.from]);
  for (const [delta, xs] of shifts) out.push(`  renumbered layers ${span(xs)} → ${delta > 0 ? '+' : ''}${delta}`);
  return out;
}

export function verdictLine(r: FuseReport): string {
  if (!r.output) return 'Nothing to fuse: no re-parameterizable blocks or Conv→BN pairs found; no file written.';
  const parts = [`Fused ${r.blocksFused} block${r.blocksFused === 1 ? '' : 's'}`];
  const heads = (r.dropAux ?? []).filter((d) => d.converted && d.head).map((d) => d.head!.to.replace(/^.*\./, ''));
  if (heads.length) parts.unshift(`Converted to the deploy architecture (${[...new Set(heads)].join(', ')} head)`);
  if (r.bnFolded) parts.push(`folded ${r.bnFolded} BN`);
  if (r.validation) {
    // A checkpoint has no whole-network outputs: its verdict is the worst block.
    const diffs = r.validation.outputs.length ? r.validation.outputs : r.validation.blocks;
    const max = Math.max(0, ...diffs.map((o) => o.maxAbsDiff));
    const scope = r.validation.endToEnd ? ` (whole model, in PyTorch ${r.validation.endToEnd.torch})` : r.validation.outputs.length ? '' : ' (worst block; checked block by block, as read by RepFuse)';
    parts.push(`max |Δ| ${fmtNum(max)}${scope}`, r.validation.passed ? 'passed' : 'OVER TOLERANCE');
  } else parts.push(`not validated${r.validationSkipped ? ` (${r.validationSkipped})` : ''}`);
  parts.push(...benefitParts(r.benefit));
  return parts.join(' · ');
}

/** `MACs −11 %` and `1.7× faster`: the benefit in the verdict line (and the notification). */
export function benefitParts(b: Benefit | undefined): string[] {
  if (!b) return [];
  const out: string[] = [];
  if (b.macsBefore > 0) out.push(`${b.macsScope === 'model' ? 'MACs' : 'block MACs'} ${changeText(b.macsBefore, b.macsAfter)}`);
  if (b.latencyMs) out.push(speedup(b.latencyMs.before, b.latencyMs.after));
  return out;
}

/** `−10.0 %`, `+2 %`, `±0.0 %` (one decimal below 10 %); `-` without a base. */
export function changeText(before: number, after: number): string {
  if (!(before > 0)) return '-';
  const pct = ((after - before) / before) * 100;
  const a = Math.abs(pct);
  return `${pct < 0 ? '−' : pct > 0 ? '+' : '±'}${a < 10 ? a.toFixed(1) : a.toFixed(0)} %`;
}

/** `1.7× faster` / `1.1× slower` / `same speed`. */
export function speedup(before: number, after: number): string {
  if (!(before > 0) || !(after > 0)) return 'speed not measured';
  const x = before / after;
  const trim = (t: string) => t.replace(/(\.\d*?)0+$/, '$1').replace(/\.$/, '');
  if (x >= 1.005) return `${trim(x.toFixed(x >= 10 ? 0 : 2))}× faster`;
  if (x <= 1 / 1.005) return `${trim((1 / x).toFixed(2))}× slower`;
  return 'same speed';
}

/** The benefit section of the text report: per block and total MACs, latency. */
export function renderBenefit(b: Benefit): string {
  const out: string[] = [];
  const pct = changeText;
  if (b.macsScope === 'model') out.push(`MACs (batch 1, Conv/Gemm/MatMul at the input shapes): ${fmtCount(b.macsBefore)} → ${fmtCount(b.macsAfter)} (${pct(b.macsBefore, b.macsAfter)})`);
  else out.push(`MACs per output position of the fused blocks (a checkpoint has no graph or spatial size; the rest of the network is not counted): ${fmtCount(b.macsBefore)} → ${fmtCount(b.macsAfter)} (${pct(b.macsBefore, b.macsAfter)})`);
  if (b.uncounted?.length) out.push(`not counted (shapes unknown): ${b.uncounted.length <= 5 ? b.uncounted.join(', ') : `${b.uncounted.slice(0, 5).join(', ')} and ${b.uncounted.length - 5} more`}`);
  if (b.blocks.length) out.push(table(['block', 'MACs before', 'after', 'change'], b.blocks.map((x) => [x.block, fmtCount(x.macsBefore), fmtCount(x.macsAfter), pct(x.macsBefore, x.macsAfter)])));
  if (b.latencyMs) {
    const l = b.latencyMs;
    out.push(`latency (onnxruntime, default optimizations, ${l.threads || 'default'} threads, median of ${l.runs} runs after a warm-up${l.scope === 'blocks' ? ', one-block models summed' : ''}): ${fmtNum(l.before)} ms → ${fmtNum(l.after)} ms, ${speedup(l.before, l.after)}`);
  }
  return out.join('\n');
}

export function renderFuse(r: FuseReport): string {
  const out = [renderInspect(r.inspect), ''];
  if (r.output) {
    out.push(`wrote ${r.output} (${fmtBytes(r.bytesWritten)})${r.externalData ? ` + external data ${r.externalData}` : ''}`);
    if (r.nodesBefore !== undefined) out.push(`nodes ${r.nodesBefore} → ${r.nodesAfter}; parameters ${fmtCount(r.paramsBefore)} → ${fmtCount(r.paramsAfter)}`);
  }
  for (const d of r.dropAux ?? []) out.push('', ...renderDropAux(d));
  if (r.dropAuxOnnx) out.push('', `drop-aux: ${r.dropAuxOnnx.note}`);
  if (r.benefit) out.push('', renderBenefit(r.benefit));
  if (r.validation) out.push('', renderValidation(r.validation));
  out.push('', verdictLine(r));
  return out.join('\n');
}
