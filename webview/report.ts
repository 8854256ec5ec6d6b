// The fuse report page: verdict, what was written, and the per-output and per-block differences
// between the original and the fused model (the CLI's tables).
import './lib/elements';
import type { ReportFromWebview, ReportState, ReportToWebview } from '../src/extension/protocol';
import type { DiffRow, ReportView } from '../src/extension/view/reportView';
import { h, mount, table } from './lib/dom';
import { connect } from './lib/vscode';

const host = connect<ReportState, ReportToWebview, ReportFromWebview>();
const app = document.getElementById('app')!;

const VERDICT: Record<ReportView['verdict'], { icon: string; cls: string; text: string }> = {
  passed: { icon: 'pass', cls: 'good', text: 'passed' },
  failed: { icon: 'warning', cls: 'warn', text: 'over tolerance' },
  unvalidated: { icon: 'circle-large-outline', cls: 'muted', text: 'not validated' },
  nothing: { icon: 'circle-slash', cls: 'muted', text: 'nothing to fuse' },
};

function diffTable(first: string, rows: DiffRow[]): HTMLElement {
  return table(
    [first, 'shape', 'max |Δ|', 'max rel', 'mean |Δ|', 'worst at', 'max |y|', 'tolerance', 'verdict'],
    rows.map((r) => [
      h('span', { class: 'mono' }, r.name),
      r.shape,
      r.maxAbs,
      r.maxRel,
      r.meanAbs,
      h('span', { class: 'mono small' }, r.worstAt),
      r.maxRef,
      r.tolerance,
      h('span', { class: r.passed ? 'good' : 'warn' }, r.passed ? 'pass' : 'FAIL', r.nonFinite ? ` (${r.nonFinite} non-finite)` : ''),
    ]),
    { numeric: [2, 3, 4, 6, 7], class: 'diff' },
  );
}

/** "Measure speed-up" in flight, or the error it ended with (not kept in the state). */
let measuring: { running: boolean; error?: string } = { running: false };

function benefitSection(r: ReportView): HTMLElement | null {
  const b = r.benefit;
  if (!b) return null;
  const measure = b.canMeasure
    ? h(
        'vscode-button',
        { icon: 'dashboard', secondary: !!b.latency, disabled: measuring.running, onclick: () => host.post({ type: 'measureSpeedup' }) },
        measuring.running ? 'Measuring…' : b.latency ? 'Measure Again' : 'Measure Speed-up',
      )
    : null;
  return h(
    'section',
    { class: 'stats-section benefit' },
    h('h2', null, 'What fusion buys'),
    h('dl', { class: 'facts' }, h('dt', null, 'MACs'), h('dd', null, b.macs), h('dt', null, 'Latency'), h('dd', null, b.latency ?? (b.canMeasure ? 'not measured' : 'not measurable here: a checkpoint has no graph (fuse --latency measures its blocks)'))),
    h('p', { class: 'muted small' }, b.scope, b.uncounted ? ` Not counted (shapes unknown): ${b.uncounted}.` : '', b.latencyNote ? ` Latency: ${b.latencyNote}` : ''),
    measure ? h('div', { class: 'actions' }, measure) : null,
    measuring.error ? h('p', { class: 'warn small', role: 'alert' }, `Could not measure: ${measuring.error}`) : null,
    b.blocks.length
      ? table(
          ['block', 'MACs before', 'after', 'change'],
          b.blocks.map((x) => [h('span', { class: 'mono' }, x.name), x.before, x.after, x.change]),
          { numeric: [1, 2, 3], class: 'diff' },
        )
      : null,
  );
}

function render(r: ReportView): void {
  const v = VERDICT[r.verdict];
  const actions = h(
    'div',
    { class: 'actions' },
    r.output ? h('vscode-button', { icon: 'go-to-file', onclick: () => host.post({ type: 'openModel', path: r.output! }) }, 'Open Fused Model') : null,
    r.output ? h('vscode-button', { icon: 'files', secondary: true, onclick: () => host.post({ type: 'reveal', path: r.output! }) }, 'Reveal in Explorer') : null,
    h('vscode-button', { icon: 'output', secondary: true, onclick: () => host.post({ type: 'showLog' }) }, 'Show Log'),
  );
  const facts = h(
    'dl',
    { class: 'facts' },
    h('dt', null, 'Input'),
    h('dd', { class: 'mono' }, r.input),
    r.output ? [h('dt', null, 'Output'), h('dd', { class: 'mono' }, r.output)] : null,
    r.externalData ? [h('dt', null, 'External data'), h('dd', { class: 'mono' }, r.externalData)] : null,
    r.facts.map((f) => [h('dt', null, f.label), h('dd', null, f.value)]),
  );
  const val = r.validation;
  mount(
    app,
    h('header', { class: 'page-head report-head' }, h('div', { class: 'title' }, h('vscode-icon', { name: v.icon, size: 20, class: v.cls }), h('h1', null, `Fuse report · ${r.inputName}`), h('vscode-badge', null, v.text)), actions),
    h('p', { class: `headline ${v.cls}`, role: 'status' }, r.headline),
    facts,
    benefitSection(r),
    val
      ? [
          h('section', { class: 'stats-section' }, h('h2', null, 'Model outputs: original vs fused'), h('p', { class: 'muted small' }, `${val.runtime}; inputs ${val.inputs.join(', ')}; seed ${val.seed}; a tensor passes when max|Δ| ≤ atol ${val.atol} + rtol ${val.rtol} · max|y|; took ${val.duration}.`), diffTable('output', val.outputs)),
          val.blocks.length ? h('section', { class: 'stats-section' }, h('h2', null, 'Per block'), h('p', { class: 'muted small' }, 'Each block’s output, exposed as an extra graph output in both models.'), diffTable('block', val.blocks)) : null,
        ]
      : h('p', { class: 'muted' }, `Not validated${r.validationSkipped ? `: ${r.validationSkipped}` : ''}.`),
    r.timings.length ? h('p', { class: 'muted small' }, 'Timings: ', r.timings.map((t) => `${t.label} ${t.value}`).join(' · ')) : null,
  );
}

let current: ReportView | undefined;

host.onMessage((m) => {
  if (m.type === 'init') {
    measuring = { running: false };
    current = m.report;
    host.saveState({ report: m.report });
    render(m.report);
  } else if (m.type === 'measuring') {
    measuring = { running: m.running, error: m.error };
    if (current) render(current);
  }
});

const saved = host.state();
if (saved?.report) {
  current = saved.report;
  render(saved.report);
}
host.post({ type: 'ready' });
