// The model editor page: parse progress, then the model's facts, blocks (selectable, synced with
// the RepConv Blocks tree), rejected candidates, folds and the op table.
import './lib/elements';
import type { ModelEditorFromWebview, ModelEditorState, ModelEditorToWebview, QuantState } from '../src/extension/protocol';
import type { ModelView } from '../src/extension/view/modelView';
import { type Children, h, mount, table } from './lib/dom';
import { connect } from './lib/vscode';

const host = connect<ModelEditorState, ModelEditorToWebview, ModelEditorFromWebview>();
const app = document.getElementById('app')!;
let state: ModelEditorState = host.state() ?? {};
let model: ModelView | undefined;
let fileName = '';
let busy = false;
let quant: QuantState | undefined;

function save(): void {
  host.saveState(state);
}

function button(label: string, icon: string, onClick: () => void, opts: { secondary?: boolean; disabled?: boolean; id?: string; title?: string } = {}): HTMLElement {
  return h('vscode-button', { icon, secondary: opts.secondary, disabled: opts.disabled, id: opts.id, title: opts.title, onclick: onClick }, label);
}

function renderLoading(message: string): void {
  mount(app, h('div', { class: 'center-state', 'aria-busy': 'true' }, h('vscode-progress-ring', { 'aria-label': 'Parsing the model' }), h('p', null, message), h('p', { class: 'muted' }, 'Parsing runs in a worker thread; the window stays responsive.')));
}

function renderError(message: string): void {
  mount(
    app,
    h(
      'div',
      { class: 'center-state error-state', role: 'alert' },
      h('vscode-icon', { name: 'error', size: 32 }),
      h('h2', null, `Cannot show ${fileName}`),
      h('p', { class: 'message' }, message),
      button('Reload', 'refresh', () => host.post({ type: 'reload' }), { secondary: true }),
    ),
  );
}

function selectRow(name: string | undefined, opts: { scroll?: boolean; notify?: boolean } = {}): void {
  state = { ...state, selectedBlock: name };
  save();
  for (const tr of app.querySelectorAll<HTMLTableRowElement>('tr[data-block]')) {
    const on = tr.dataset.block === name;
    tr.classList.toggle('selected', on);
    tr.setAttribute('aria-selected', String(on));
    if (on && opts.scroll) tr.scrollIntoView({ block: 'nearest' });
  }
  const stats = document.getElementById('stats-button');
  if (stats) stats.toggleAttribute('disabled', !name);
  if (name && opts.notify) host.post({ type: 'selectBlock', block: name });
}

function blocksTable(m: ModelView): HTMLElement {
  if (!m.blocks.length) return h('p', { class: 'muted' }, 'No re-parameterizable blocks: nothing here has parallel branches that add up to one convolution.');
  const t = table(
    ['block', 'family', 'kernel', 'stride', 'groups', 'channels', 'branches', 'BN ε', 'params', ''],
    m.blocks.map((b) => [
      h('span', { class: 'mono' }, b.name),
      b.family,
      b.kernel,
      b.stride,
      b.groups,
      b.channels,
      h('span', { class: 'chips' }, b.branchKinds.map((k) => h('span', { class: 'chip' }, k))),
      h('span', { class: b.assumedEps ? 'warn' : undefined, title: b.assumedEps ? 'not stored in the file: assumed' : undefined }, b.eps),
      b.params,
      h('vscode-button', {
        icon: 'graph',
        'icon-only': true,
        secondary: true,
        title: `Branch statistics of ${b.name}`,
        'aria-label': `Branch statistics of ${b.name}`,
        onclick: (e: Event) => {
          e.stopPropagation();
          host.post({ type: 'showBranchStats', block: b.name });
        },
      }),
    ]),
    {
      class: 'blocks selectable',
      numeric: [4],
      rowProps: (i) => ({
        'data-block': m.blocks[i].name,
        tabindex: 0,
        role: 'row',
        'aria-selected': 'false',
        onclick: () => selectRow(m.blocks[i].name, { notify: true }),
        ondblclick: () => host.post({ type: 'showBranchStats', block: m.blocks[i].name }),
        onkeydown: (e: Event) => onRowKey(e as KeyboardEvent, i),
      }),
    },
  );
  return t;
}

function onRowKey(e: KeyboardEvent, i: number): void {
  if (!model) return;
  if (e.key === 'Enter') host.post({ type: 'showBranchStats', block: model.blocks[i].name });
  else if (e.key === 'ArrowDown' || e.key === 'ArrowUp') {
    const j = Math.max(0, Math.min(model.blocks.length - 1, i + (e.key === 'ArrowDown' ? 1 : -1)));
    selectRow(model.blocks[j].name, { notify: true, scroll: true });
    app.querySelector<HTMLElement>(`tr[data-block="${CSS.escape(model.blocks[j].name)}"]`)?.focus();
    e.preventDefault();
  }
}

/** The Quantization section's body: a button until asked, then progress, the ranked blocks, FP16 hazards, the fallback list. */
function quantBody(): HTMLElement {
  const q = quant;
  const run = (label: string) => button(label, 'pulse', () => host.post({ type: 'analyzeQuant' }), { secondary: true, id: 'quant-button', title: 'Fuse in memory, then measure each block under INT8 with onnxruntime (a child process)' });
  if (!q) {
    return h(
      'div',
      { id: 'quant-body' },
      h('p', { class: 'muted' }, 'INT8 and FP16 readiness of the weights as Fuse would write them: per block, the output SQNR when only its fused weight is INT8 (per tensor, per channel), channel range imbalance, FP16 overflow/subnormal values, and the branch BN gains QARepVGG warns about.'),
      run('Analyze Quantization'),
    );
  }
  if (q.status === 'running') return h('div', { id: 'quant-body', class: 'inline-state', 'aria-busy': 'true' }, h('vscode-progress-ring', { 'aria-label': 'Analyzing quantization' }), h('span', null, q.message));
  if (q.status === 'error') return h('div', { id: 'quant-body', role: 'alert' }, h('p', { class: 'message error' }, q.message), run('Try Again'));
  const v = q.view;
  const rows = v.rows.map((r) => [
    h('span', { class: 'mono' }, r.name),
    h('span', { class: r.fallback ? 'warn' : undefined }, r.perTensor),
    r.perChannel,
    r.weightSqnr,
    r.imbalance,
    h('span', { title: r.gainFlag || undefined }, r.verdict),
  ]);
  const copy = h('vscode-button', {
    icon: 'copy',
    secondary: true,
    disabled: !v.fallback.length,
    title: 'Copy the block names, one per line (e.g. for a mixed-precision config)',
    onclick: () => host.post({ type: 'copy', text: v.fallbackText, what: `${v.fallback.length} fallback block name(s)` }),
  }, 'Copy Fallback List');
  return h(
    'div',
    { id: 'quant-body' },
    h('p', { class: 'headline' }, v.headline),
    h('p', { class: 'muted small' }, v.measuredOn),
    v.rows.length ? table(['block (worst first)', 'out SQNR tensor', 'out SQNR channel', 'weight SQNR', 'range max/med', 'verdict'], rows, { class: 'quant', numeric: [1, 2, 3, 4] }) : null,
    v.others.length
      ? [
          h('h3', null, `Other weights (${v.othersTotal}${v.othersTotal > v.others.length ? `; worst ${v.others.length}` : ''}, by per-tensor weight SQNR)`),
          table(['tensor', 'op', 'weight SQNR tensor', 'weight SQNR channel', 'range max/med'], v.others.map((o) => [h('span', { class: 'mono' }, o.name), o.op, o.perTensor, o.perChannel, o.imbalance]), { class: 'quant', numeric: [2, 3, 4] }),
        ]
      : null,
    h('h3', null, 'FP16'),
    h('p', null, v.fp16.summary),
    v.fp16.rows.length ? table(['tensor', 'overflow', 'subnormal'], v.fp16.rows.map((r) => [h('span', { class: 'mono' }, r.name), h('span', { class: r.overflow ? 'warn' : undefined }, r.overflow), r.subnormal]), { numeric: [1, 2] }) : null,
    h('h3', null, `Suggested fallback (per-tensor output SQNR < ${v.thresholdDb} dB, worst first)`),
    v.fallback.length ? h('pre', { class: 'mono fallback', id: 'quant-fallback' }, v.fallbackText) : h('p', { class: 'muted' }, v.rows.length ? 'None: every block keeps its output SQNR with per-tensor INT8.' : 'None (no blocks to measure).'),
    h('div', { class: 'actions' }, copy, run('Analyze Again')),
    v.notes.length ? h('ul', { class: 'notes' }, v.notes.map((n) => h('li', null, h('vscode-icon', { name: 'info' }), ' ', n))) : null,
  );
}

function updateQuant(): void {
  const old = document.getElementById('quant-body');
  if (old) old.replaceWith(quantBody());
}

function section(title: string, count: number | string, body: HTMLElement, open = true, id?: string): HTMLElement {
  return h('vscode-collapsible', { heading: title, description: String(count), open, id }, h('div', { class: 'section-body' }, body));
}

function renderModel(m: ModelView): void {
  const head = h(
    'header',
    { class: 'page-head' },
    h('div', { class: 'title' }, h('vscode-icon', { name: 'circuit-board', size: 20 }), h('h1', null, m.fileName), h('vscode-badge', { variant: 'default' }, m.formatLabel)),
    h(
      'div',
      { class: 'actions' },
      button(busy ? 'Fusing…' : 'Fuse', 'combine', () => host.post({ type: 'fuse' }), { id: 'fuse-button', disabled: busy || (!m.blocks.length && !m.folds.length), title: 'Fuse the re-parameterizable blocks into a new file beside this one, then validate it' }),
      button('Show Branch Statistics', 'graph', () => state.selectedBlock && host.post({ type: 'showBranchStats', block: state.selectedBlock }), { secondary: true, id: 'stats-button', disabled: true, title: 'Statistics of the selected block’s branches' }),
      h('vscode-button', { icon: 'refresh', 'icon-only': true, secondary: true, title: 'Parse the file again', 'aria-label': 'Reload', onclick: () => host.post({ type: 'reload' }) }),
    ),
  );
  const facts = h('dl', { class: 'facts' }, m.facts.map((f) => [h('dt', null, f.label), h('dd', null, f.value)]));
  const notes = m.notes.length ? h('ul', { class: 'notes' }, m.notes.map((n) => h('li', null, h('vscode-icon', { name: 'info' }), ' ', n))) : null;
  const params = h('p', { class: 'muted' }, `Parameters ${m.params.before} → ${m.params.after} after fusion (${m.params.saved} fewer).`, m.assumedEpsNote ? ' Epsilons marked in yellow are assumed, not stored in the file.' : '');

  const sections: HTMLElement[] = [section('Re-parameterizable blocks', m.blocks.length, blocksTable(m), true, 'blocks')];
  if (m.rejected.length) {
    sections.push(section('Rejected candidates (not fused)', m.rejected.length, table(['candidate', 'reason', 'nodes'], m.rejected.map((r) => [h('span', { class: 'mono' }, r.name), r.reason, h('span', { class: 'mono small' }, r.parts)])), true, 'rejected'));
  }
  if (m.folds.length) {
    sections.push(section('Standalone Conv → BatchNormalization folds', m.folds.length, table(['conv', 'batch norm', 'ε'], m.folds.map((f) => [h('span', { class: 'mono' }, f.conv), h('span', { class: 'mono' }, f.bn), f.eps])), false, 'folds'));
  }
  if (m.notFolded.length) {
    sections.push(section('Conv → BatchNormalization pairs left alone', m.notFolded.length, table(['pair', 'reason'], m.notFolded.map((r) => [h('span', { class: 'mono' }, r.name), r.reason])), false));
  }
  // Always offered: even a model without blocks has weights whose FP16/INT8 hazards are worth seeing.
  sections.push(section('Quantization', quant?.status === 'done' ? `${quant.view.fallback.length} fallback` : '', quantBody(), true, 'quant'));
  if (m.ops.length) {
    const rows: Children[][] = m.ops.map((o) => [h('span', { class: 'mono' }, o.op), o.before, o.after, h('span', { class: o.delta.startsWith('−') ? 'good' : o.delta ? 'warn' : undefined }, o.delta)]);
    if (m.opsTotal) rows.push([h('strong', null, 'total'), h('strong', null, m.opsTotal.before), h('strong', null, m.opsTotal.after), '']);
    sections.push(section('Operators before → after fusion', m.ops.length, table(['op', 'before', 'after', 'Δ'], rows, { numeric: [1, 2, 3], class: 'ops' }), true, 'ops'));
  }
  mount(app, head, h('p', { class: 'headline' }, m.headline), facts, notes, params, ...sections);
  selectRow(m.blocks.some((b) => b.name === state.selectedBlock) ? state.selectedBlock : undefined);
}

host.onMessage((m) => {
  switch (m.type) {
    case 'init':
      fileName = m.fileName;
      break;
    case 'loading':
      model = undefined;
      renderLoading(m.message);
      break;
    case 'loadError':
      model = undefined;
      renderError(m.message);
      break;
    case 'model':
      model = m.model;
      renderModel(m.model);
      break;
    case 'select':
      selectRow(m.block, { scroll: true });
      break;
    case 'quant':
      quant = m.quant;
      updateQuant();
      break;
    case 'busy': {
      busy = m.busy;
      const b = document.getElementById('fuse-button');
      if (b) {
        b.toggleAttribute('disabled', busy);
        b.textContent = busy ? 'Fusing…' : 'Fuse';
      }
      break;
    }
  }
});

renderLoading('Opening…');
host.post({ type: 'ready' });
