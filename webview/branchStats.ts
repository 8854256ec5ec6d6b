// The branch statistics page: for one block at a time (asked from the host by request), a table
// of per-branch numbers and Chart.js charts: energy shares, k×k energy heatmaps, raw and folded
// weight histograms, per-channel L2 norms, BatchNorm parameters.
import './lib/elements';
import type { BlockChoice, BranchStatsFromWebview, BranchStatsState, BranchStatsToWebview, WeightMode } from '../src/extension/protocol';
import type { BlockStats, BNStats, TensorStats } from '../src/core/stats';
import type { BlockQuantDetail } from '../src/core/quant';
import { fmtCount, fmtNum, pct } from '../src/extension/view/format';
import { applyTheme, channelChart, currentTheme, destroyCharts, heatmapChart, histogramChart, shareChart } from './lib/charts';
import { h, mount, table } from './lib/dom';
import { onThemeChange, withAlpha } from './lib/theme';
import { connect } from './lib/vscode';

const host = connect<BranchStatsState, BranchStatsToWebview, BranchStatsFromWebview>();
const app = document.getElementById('app')!;
let state: BranchStatsState | undefined = host.state();
let blocks: BlockChoice[] = [];
let fileName = '';
let current: BlockStats | undefined;
/** INT8/FP16 detail of the block on screen (asked after its statistics, so they show first). */
let currentQuant: BlockQuantDetail | undefined;
let seq = 0;

function save(): void {
  if (state) host.saveState(state);
}

async function show(block: string): Promise<void> {
  if (!state) return;
  state = { ...state, block };
  save();
  host.post({ type: 'showing', block });
  const mine = ++seq;
  destroyCharts();
  mount(app, header(), h('div', { class: 'center-state', 'aria-busy': 'true' }, h('vscode-progress-ring', { 'aria-label': 'Computing statistics' }), h('p', null, `Computing statistics of ${block}…`)));
  try {
    const stats = await host.requests.request('blockStats', { block });
    if (mine !== seq) return; // a newer block was chosen meanwhile
    current = stats;
    currentQuant = undefined;
    render();
    void loadQuant(block, mine);
  } catch (err) {
    if (mine !== seq) return;
    current = undefined;
    mount(app, header(), h('div', { class: 'center-state error-state', role: 'alert' }, h('vscode-icon', { name: 'error', size: 32 }), h('p', { class: 'message' }, (err as Error).message)));
  }
}

async function loadQuant(block: string, mine: number): Promise<void> {
  try {
    const q = await host.requests.request('blockQuant', { block });
    if (mine !== seq) return;
    currentQuant = q;
    renderQuant();
  } catch (err) {
    if (mine !== seq) return;
    document.getElementById('quant-section')?.replaceChildren(h('p', { class: 'message error', role: 'alert' }, (err as Error).message));
  }
}

const dbText = (v: number | null): string => (v === null ? 'exact (no error)' : `${v.toFixed(1)} dB`);

/** The block's quantization numbers: per-channel ranges before and after fusion, branch BN gains. */
function renderQuant(): void {
  const box = document.getElementById('quant-section');
  const q = currentQuant;
  if (!box || !q) return;
  const th = currentTheme();
  const color = (i: number) => th.series[i % th.series.length];
  const chart = canvas('Per-output-channel max |w|: each branch before fusion, and the fused kernel', 'chart');
  const f = q.fused;
  const gains = table(
    ['branch', 'BN', 'median |γ/√(σ²+ε)|', 'max |γ/√(σ²+ε)|'],
    [
      ...q.gains.branches.map((g) => [g.branch, g.bn ? 'yes' : 'no', g.median === null ? '—' : fmtNum(g.median), g.max === null ? '—' : fmtNum(g.max)]),
      ...(q.gains.postBN ? [['post-add BN', 'yes', fmtNum(q.gains.postBN.median), fmtNum(q.gains.postBN.max)]] : []),
    ],
    { numeric: [2, 3] },
  );
  mount(
    box,
    h('p', null, `Fused kernel under INT8: weight SQNR ${dbText(f.perTensorSqnrDb)} per tensor, ${dbText(f.perChannelSqnrDb)} per channel · channel range max/median ${f.rangeImbalance === null ? '—' : fmtNum(f.rangeImbalance) + '×'} · FP16: ${f.fp16.overflow} overflow, ${f.fp16.subnormal} subnormal.`),
    q.gains.flag
      ? h('p', { class: 'warn', role: 'alert' }, h('vscode-icon', { name: 'warning' }), ` ${q.gains.flag}. A smaller branch's BN gain ≥ ${q.gainFlagRatio}× the k×k branch's sets the fused kernel's range: per-tensor INT8 loses the rest (QARepVGG).`)
      : h('p', { class: 'muted small' }, `No branch BN gain dwarfs the k×k branch's (flag at ≥ ${q.gainFlagRatio}×, median or max; only branches with their own BN are compared).`),
    h('div', { class: 'two-col' }, h('div', null, chart.box), h('div', null, gains)),
    q.postBN ? h('p', { class: 'muted small' }, 'Branch ranges are before the post-add BatchNorm; the fused kernel includes it.') : null,
  );
  channelChart(chart.canvas, [...q.branches.map((b, i) => ({ label: `${b.label} (before)`, values: b.ranges, color: color(i) })), { label: 'fused', values: f.ranges, color: th.fused, dashed: true }], 'max |w|');
}

function header(): HTMLElement {
  const select = h('vscode-single-select', { 'aria-label': 'Block', class: 'block-picker' }, blocks.map((b) => h('vscode-option', { value: b.name, description: b.description, selected: b.name === state?.block }, b.name)));
  (select as HTMLElement & { value: string }).value = state?.block ?? '';
  select.addEventListener('change', () => {
    const v = (select as HTMLElement & { value: string }).value;
    if (v && v !== state?.block) void show(v);
  });
  const mode = h(
    'vscode-radio-group',
    { 'aria-label': 'Weights' },
    h('vscode-radio', { name: 'mode', value: 'raw', checked: state?.mode === 'raw' }, 'raw weights'),
    h('vscode-radio', { name: 'mode', value: 'folded', checked: state?.mode !== 'raw' }, 'BN-folded'),
  );
  mode.addEventListener('change', (e) => {
    const v = (e.target as HTMLInputElement).value as WeightMode;
    if (!state || (v !== 'raw' && v !== 'folded') || v === state.mode) return;
    state = { ...state, mode: v };
    save();
    render();
  });
  const desc = blocks.find((b) => b.name === state?.block)?.description ?? '';
  return h(
    'header',
    { class: 'page-head' },
    h('div', { class: 'title' }, h('vscode-icon', { name: 'graph', size: 20 }), h('h1', null, state?.block ?? ''), h('span', { class: 'muted' }, desc), h('span', { class: 'muted small' }, fileName)),
    h('div', { class: 'actions' }, blocks.length > 1 ? select : null, mode),
  );
}

const num = (v: number | null) => (v === null ? '—' : fmtNum(v));

function statCells(s: TensorStats | null): (string | HTMLElement)[] {
  if (!s) return ['—', '—', '—', '—', '—', '—', '—', '—'];
  const bad = s.nan + s.inf;
  return [
    num(s.min),
    num(s.max),
    num(s.mean),
    num(s.std),
    num(s.meanAbs),
    fmtNum(s.l2),
    h('span', { class: s.nearZeroShare > 0.5 ? 'warn' : undefined, title: `|w| < ${fmtNum(s.nearZeroThreshold)}` }, pct(s.nearZeroShare)),
    h('span', { class: bad ? 'error' : undefined }, bad ? `${s.nan} NaN / ${s.inf} Inf` : '0'),
  ];
}

/** A colour key that matches the charts exactly (theme colours may carry alpha; charts drop it). */
function swatch(color: string): HTMLElement {
  const el = h('span', { class: 'swatch' });
  el.style.background = withAlpha(color, 1); // CSSOM, allowed by the CSP (no inline style attribute)
  return el;
}

/** Why a branch has no raw weights: an identity stores none; a branch computed from a region (avg-pool, convs in series) has no one stored tensor. */
function noRawWeights(b: BlockStats['branches'][number]): string {
  return b.kind === 'identity' || b.kind === 'bn_identity' ? '— (no weights)' : '— (no single stored tensor)';
}

function branchTable(st: BlockStats, mode: WeightMode): HTMLElement {
  const th = currentTheme();
  const rows = st.branches.map((b, i) => {
    const s = mode === 'raw' ? b.raw : b.folded;
    const shape = mode === 'raw' ? (b.shape ? b.shape.join('×') : noRawWeights(b)) : b.foldedShape ? b.foldedShape.join('×') : `diag ${b.folded.count}`;
    return [
      h('span', { class: 'series-label', title: b.description }, swatch(th.series[i % th.series.length]), b.label),
      shape,
      fmtCount(b.params),
      b.epsilon === null ? '—' : fmtNum(b.epsilon),
      ...statCells(s),
      `${pct(b.energyShare)} / ${pct(b.projectionShare)}`,
    ];
  });
  rows.push([
    h('strong', { class: 'series-label' }, swatch(th.fused), 'fused kernel'),
    st.fused.shape.join('×'),
    fmtCount(st.block.paramsAfter),
    st.postBN ? fmtNum(st.postBN.eps) : '—',
    ...statCells(st.fused.weight),
    '100% / 100%',
  ]);
  return h('div', { class: 'table-scroll' }, table(['branch', 'shape', 'params', 'BN ε', 'min', 'max', 'mean', 'std', 'mean |w|', 'L2 norm', 'near zero', 'NaN/Inf', 'share E / P'], rows, { class: 'stats', numeric: [2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12] }));
}

function canvas(label: string, cls = 'chart'): { box: HTMLElement; canvas: HTMLCanvasElement } {
  const c = h('canvas', { role: 'img', 'aria-label': label });
  return { box: h('div', { class: cls }, c), canvas: c };
}

function card(title: string, ...body: (HTMLElement | null)[]): HTMLElement {
  return h('div', { class: 'card' }, h('h3', null, title), ...body);
}

function section(title: string, body: HTMLElement, note?: string): HTMLElement {
  return h('section', { class: 'stats-section' }, h('h2', null, title), note ? h('p', { class: 'muted small' }, note) : null, body);
}

function bnCharts(title: string, bn: BNStats, colors: string[]): HTMLElement {
  const a = canvas(`${title}: gamma and beta per channel`);
  const b = canvas(`${title}: running mean and variance per channel`);
  queueMicrotask(() => {
    channelChart(a.canvas, [{ label: 'γ (weight)', values: bn.gamma, color: colors[0] }, { label: 'β (bias)', values: bn.beta, color: colors[1] }, { label: 'γ/√(σ²+ε)', values: bn.scale, color: colors[2], dashed: true }], 'value');
    channelChart(b.canvas, [{ label: 'running mean', values: bn.mean, color: colors[3] }, { label: 'running variance', values: bn.variance, color: colors[4] }], 'value');
  });
  return card(`${title} · ε ${fmtNum(bn.eps)}`, h('div', { class: 'pair' }, a.box, b.box));
}

function render(): void {
  const st = current;
  if (!st || !state) return;
  destroyCharts();
  const th = applyTheme();
  const color = (i: number) => th.series[i % th.series.length];
  const mode = state.mode;
  const labels = st.branches.map((b) => b.label);

  // Shares of the fused kernel.
  const shares = canvas('Share of the fused kernel per branch', 'chart short');
  // Heatmaps on one colour scale, so branches compare at a glance.
  const maxHeat = Math.max(0, ...st.branches.flatMap((b) => b.heatmap.values), ...st.fused.heatmap.values);
  const heatCards = [
    ...st.branches.map((b, i) => ({ title: b.label, heat: b.heatmap, color: color(i), total: b.heatmap.values.reduce((x, y) => x + y, 0) })),
    { title: 'fused kernel', heat: st.fused.heatmap, color: th.fused, total: st.fused.heatmap.values.reduce((x, y) => x + y, 0) },
  ].map((x) => ({ ...x, c: canvas(`Spatial energy of ${x.title}`, 'chart heat') }));
  // Histograms: raw and folded per branch.
  const histCards = st.branches.map((b, i) => {
    const raw = b.rawHistogram ? canvas(`Histogram of the raw weights of ${b.label}`, 'chart small') : null;
    const folded = canvas(`Histogram of the BN-folded weights of ${b.label}`, 'chart small');
    return { b, i, raw, folded };
  });
  const fusedHist = canvas('Histogram of the fused kernel', 'chart small');
  // Per-channel L2.
  const l2 = canvas('Per-output-channel L2 norm per branch');
  const bnList: { title: string; bn: BNStats }[] = st.branches.flatMap((b) => (b.bn ? [{ title: b.label, bn: b.bn }] : []));
  if (st.postBN) bnList.push({ title: 'post-add BN', bn: st.postBN });

  mount(
    app,
    header(),
    h(
      'p',
      { class: 'headline' },
      `${st.branches.length} branches → one ${st.fused.shape.slice(2).join('×')} convolution (${st.fused.shape.join('×')}). `,
      h('span', { class: 'muted' }, `Check: max |fused − Σ branch contributions| = ${fmtNum(st.reconstructionError)}.`),
    ),
    section(
      mode === 'raw' ? 'Branches — raw stored weights' : 'Branches — BN-folded weights',
      branchTable(st, mode),
      `near zero: |w| < ${fmtNum(st.nearZeroRel)} · max|w| of the same tensor. Share E (energy): ‖Cᵦ‖² / Σ‖C‖² of each branch’s contribution Cᵦ to the fused kernel; P (projection): ⟨Cᵦ, ΣC⟩ / ‖ΣC‖² (sums to 100%, negative when a branch cancels others).${st.postBN ? ' Shares are of the sum before the post-add BatchNorm.' : ''}${mode === 'folded' ? ' Identity branches show the diagonal of their identity kernel.' : ''}`,
    ),
    h(
      'div',
      { class: 'two-col' },
      section('Share of the fused kernel', shares.box),
      section('Spatial energy Σ|W| per k×k position', h('div', { class: 'heat-grid' }, heatCards.map((x) => card(`${x.title}`, x.c.box, h('p', { class: 'muted small' }, `Σ ${fmtNum(x.total)}`)))), 'Summed over output and input channels; one colour scale for all (darkest = ' + fmtNum(maxHeat) + ').'),
    ),
    section(
      'Weight histograms',
      h(
        'div',
        { class: 'card-grid' },
        histCards.map((x) => card(x.b.label, h('div', { class: 'pair' }, x.raw ? h('div', null, h('p', { class: 'muted small' }, 'raw'), x.raw.box) : h('p', { class: 'muted small' }, x.b.kind === 'identity' || x.b.kind === 'bn_identity' ? 'identity: no stored weights' : 'raw: no single stored tensor (its kernel is computed from several ops)'), h('div', null, h('p', { class: 'muted small' }, 'BN-folded'), x.folded.box)))),
        card('fused kernel', h('p', { class: 'muted small' }, 'fused'), fusedHist.box),
      ),
    ),
    section(mode === 'raw' ? 'Per-output-channel L2 norm (raw weights)' : 'Per-output-channel L2 norm (contribution to the fused kernel)', l2.box),
    bnList.length ? section('BatchNorm parameters', h('div', { class: 'card-grid wide' }, bnList.map((x) => bnCharts(x.title, x.bn, th.series)))) : null,
    section('Quantization (INT8 / FP16)', h('div', { id: 'quant-section' }, h('p', { class: 'muted' }, 'Computing…'))),
  );
  renderQuant();

  shareChart(shares.canvas, labels, [
    { label: 'energy share', values: st.branches.map((b) => b.energyShare), colors: st.branches.map((_, i) => color(i)) },
    { label: 'projection', values: st.branches.map((b) => b.projectionShare), colors: st.branches.map((_, i) => color(i)) },
  ]);
  for (const x of heatCards) heatmapChart(x.c.canvas, x.heat, maxHeat, x.color, x.title);
  for (const x of histCards) {
    if (x.raw && x.b.rawHistogram) histogramChart(x.raw.canvas, x.b.rawHistogram, `${x.b.label} raw`, color(x.i));
    histogramChart(x.folded.canvas, x.b.foldedHistogram, `${x.b.label} folded`, color(x.i));
  }
  histogramChart(fusedHist.canvas, st.fused.histogram, 'fused', th.fused);
  channelChart(
    l2.canvas,
    [
      ...st.branches.flatMap((b, i) => {
        const values = mode === 'raw' ? b.rawChannelL2 : b.foldedChannelL2;
        return values ? [{ label: b.label, values, color: color(i) }] : [];
      }),
      ...(mode === 'folded' ? [{ label: 'fused', values: st.fused.channelL2, color: th.fused, dashed: true }] : []),
    ],
    'L2 norm',
  );
}

host.onMessage((m) => {
  switch (m.type) {
    case 'init': {
      blocks = m.blocks;
      fileName = m.fileName;
      const keep = state && state.uri === m.uri;
      state = { uri: m.uri, block: m.block, mode: keep ? state!.mode : m.mode };
      save();
      void show(m.block);
      break;
    }
    case 'show':
      void show(m.block);
      break;
  }
});

onThemeChange(() => render());
mount(app, h('div', { class: 'center-state' }, h('vscode-progress-ring', { 'aria-label': 'Loading' })));
host.post({ type: 'ready' });
