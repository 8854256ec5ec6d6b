// The report's benefit: the view model (MACs, latency, the speed-up in the headline and the
// notification) and the "Measure speed-up" round trip through the typed protocol, with the report
// panel under the vscode stub and the real onnxruntime child measuring a real fused model.
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { after, before, test } from 'node:test';
import type { FuseReport } from '../src/core/report';
import { defaultFuseOptions, fuse } from '../src/engine';
import type { ReportFromWebview, ReportToWebview } from '../src/extension/protocol';
import { benefitView, changeText, fuseNotice, reportView, SPEEDUP_RUNS, withLatency } from '../src/extension/view/reportView';
import { createStub, installStub, type Stub } from './extension-stub';
import { fixturesDir, makeTmp, rmTmp } from './helpers/paths';

let dir: string;
let fused: FuseReport;
before(async () => {
  dir = makeTmp();
  fs.copyFileSync(path.join(fixturesDir, 'repvgg_folded.onnx'), path.join(dir, 'repvgg.onnx'));
  fused = await fuse(path.join(dir, 'repvgg.onnx'), { ...defaultFuseOptions, validate: false });
});
after(() => rmTmp(dir));

const withBenefit = (r: FuseReport, latency?: { before: number; after: number }): FuseReport => ({
  ...r,
  benefit: {
    macsScope: 'model',
    macsBefore: 13_128_089_600,
    macsAfter: 11_684_000_000,
    blocks: [{ block: 'stage1.0', macsBefore: 327_680, macsAfter: 294_912 }],
    ...(latency ? { latencyMs: { ...latency, runs: 20, threads: 0, scope: 'model' as const } } : {}),
  },
});

test('the notification and the headline carry "MACs −11 % · 1.7× faster"', () => {
  const r = withBenefit({ ...fused, validationSkipped: undefined }, { before: 17, after: 10 });
  const n = fuseNotice(r);
  assert.match(n.message, / · MACs −11 % · 1\.7× faster$/);
  assert.equal(reportView(r).headline, n.message);
  // Without a latency measurement: MACs only.
  assert.match(fuseNotice(withBenefit(fused)).message, / · MACs −11 %$/);
});

test('benefitView: MACs, per block rows, what is counted; latency only once measured', () => {
  const v = benefitView(withBenefit(fused))!;
  assert.equal(v.macs, '13.13G → 11.68G (−11 %)');
  assert.deepEqual(v.blocks, [{ name: 'stage1.0', before: '327.7k', after: '294.9k', change: '−10 %' }]);
  assert.match(v.scope, /every Conv, Gemm and MatMul at batch 1/);
  assert.equal(v.latency, null);
  assert.equal(v.canMeasure, true);
  // A checkpoint: blocks per position, and no whole model to time.
  const ck = benefitView({ ...withBenefit(fused), format: 'pytorch', benefit: { ...withBenefit(fused).benefit!, macsScope: 'blocks-per-position' } })!;
  assert.equal(ck.canMeasure, false);
  assert.match(ck.scope, /per output position/);
  // Nothing written: no benefit.
  assert.equal(benefitView({ ...fused, output: null }), null);
  assert.equal(changeText(100, 100), '±0.0 %');
  assert.equal(changeText(0, 5), '-');
});

test('withLatency: the latency line and the speed-up in the headline, replaced on a second measurement', () => {
  const v = reportView(withBenefit(fused));
  const once = withLatency(v, { before: 17, after: 10, runs: 20, threads: 0, scope: 'model' });
  assert.equal(once.benefit!.latency, '17 ms → 10 ms · 1.7× faster');
  assert.match(once.benefit!.latencyNote!, /median of 20 runs each after a warm-up/);
  assert.equal(once.headline, `${v.headline} · 1.7× faster`);
  const twice = withLatency(once, { before: 10, after: 12.5, runs: 20, threads: 0, scope: 'model' });
  assert.equal(twice.headline, `${v.headline} · 1.25× slower`);
  assert.deepEqual(JSON.parse(JSON.stringify(twice)), twice, 'the view survives setState');
});

// ----- the panel: ready → init, measureSpeedup → measuring → init with the latency --------------------

let stub: Stub;
let uninstall: () => void;

test('"Measure speed-up": the host measures in the onnxruntime child and sends the updated view', async () => {
  stub = createStub();
  uninstall = installStub(stub);
  try {
    const posted: ReportToWebview[] = [];
    let receive: ((m: ReportFromWebview) => void) | undefined;
    const window = (stub.module as { window: Record<string, unknown> }).window;
    (stub.module as { workspace: Record<string, unknown> }).workspace.getConfiguration = () => ({ get: () => undefined, inspect: () => undefined });
    window.createWebviewPanel = () => ({
      webview: {
        cspSource: 'https://webview.test',
        asWebviewUri: (u: { path: string }) => ({ toString: () => `https://webview.test${u.path}` }),
        options: {},
        html: '',
        postMessage: async (m: ReportToWebview) => void posted.push(m),
        onDidReceiveMessage: (fn: (m: ReportFromWebview) => void) => {
          receive = fn;
          return { dispose: () => undefined };
        },
      },
      onDidDispose: () => ({ dispose: () => undefined }),
      title: '',
      iconPath: undefined,
    });
    // eslint-disable-next-line @typescript-eslint/no-require-imports
    const { ReportPanel } = require('../src/extension/reportPanel') as typeof import('../src/extension/reportPanel');
    const { Uri } = stub.module as { Uri: { file(p: string): unknown } };
    const log = { info: () => undefined, error: (m: string) => posted.push({ type: 'measuring', running: false, error: `log: ${m}` }), show: () => undefined };
    ReportPanel.show(Uri.file('/ext') as never, fused, log as never);
    assert.ok(receive, 'the panel listens to its webview');
    receive({ type: 'ready' });
    const init = posted.find((m) => m.type === 'init');
    assert.ok(init && init.type === 'init');
    assert.equal(init.report.benefit!.latency, null);
    assert.equal(init.report.benefit!.canMeasure, true);
    // A file the report does not name is never opened; an unknown message type does nothing.
    receive({ type: 'measureSpeedup' });
    receive({ type: 'measureSpeedup' }); // a second click while running is ignored
    assert.deepEqual(posted.filter((m) => m.type === 'measuring'), [{ type: 'measuring', running: true }]);
    const deadline = Date.now() + 120_000;
    while (!posted.some((m, i) => i > 0 && m.type === 'init') && !posted.some((m) => m.type === 'measuring' && m.error) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
    const errors = posted.filter((m) => m.type === 'measuring' && m.error);
    assert.deepEqual(errors, []);
    const updated = posted.filter((m) => m.type === 'init').pop()!;
    assert.ok(updated.type === 'init');
    const b = updated.report.benefit!;
    assert.match(b.latency!, /^[\d.e-]+ ms → [\d.e-]+ ms · (\d+(\.\d+)?× (faster|slower)|same speed)$/);
    assert.match(b.latencyNote!, new RegExp(`median of ${SPEEDUP_RUNS} runs`));
    assert.match(updated.report.headline, /· MACs −8\.6 % · (\d+(\.\d+)?× (faster|slower)|same speed)$/);
  } finally {
    uninstall();
  }
});

// ----- Fuse on a multi-selection in the Explorer ----------------------------------------------------

test('Fuse with several files selected: each model in turn (non-models left out), then one summary', async () => {
  stub = createStub();
  uninstall = installStub(stub);
  try {
    const m = stub.module as { window: Record<string, unknown>; workspace: Record<string, unknown>; Uri: { file(p: string): { fsPath: string } } };
    m.workspace.getConfiguration = () => ({ get: () => undefined, inspect: () => undefined });
    // No fused output exists yet (so nothing asks to replace one).
    m.workspace.fs = { stat: async () => Promise.reject(new Error('ENOENT')) };
    const messages: string[] = [];
    m.window.showInformationMessage = async (msg: string) => void messages.push(msg);
    m.window.showWarningMessage = async (msg: string) => void messages.push(msg);
    m.window.showErrorMessage = async (msg: string) => void messages.push(msg);
    const order: string[] = [];
    const logLines: string[] = [];
    const service = {
      load: async () => fused.inspect,
      fuse: async (uri: { fsPath: string }, options: { output: string }) => {
        order.push(`${path.basename(uri.fsPath)} → ${path.basename(options.output)}`);
        if (uri.fsPath.endsWith('b.onnx')) throw new Error('b.onnx: not a valid ONNX model.');
        return { ...fused, input: uri.fsPath, output: options.output };
      },
    };
    // eslint-disable-next-line @typescript-eslint/no-require-imports
    const { registerCommands } = require('../src/extension/commands') as typeof import('../src/extension/commands');
    const log = { info: (l: string) => logLines.push(l), warn: (l: string) => logLines.push(l), error: (l: string) => logLines.push(l), show: () => undefined };
    registerCommands({ context: { extensionUri: m.Uri.file('/ext'), workspaceState: { get: () => undefined, update: async () => undefined } }, service, editors: { setBusy: () => undefined, activeUri: undefined }, tree: {}, log } as never);
    const uris = ['/w/a.onnx', '/w/notes.txt', '/w/b.onnx', '/w/c.onnx'].map((p) => m.Uri.file(p));
    await (stub.module as { commands: { executeCommand(id: string, ...a: unknown[]): Promise<unknown> } }).commands.executeCommand('repfuse.fuse', uris[0], uris);
    assert.deepEqual(order, ['a.onnx → a.fused.onnx', 'b.onnx → b.fused.onnx', 'c.onnx → c.fused.onnx']);
    const summary = logLines.find((l) => l.startsWith('fused 3 models:'));
    assert.ok(summary, logLines.join('\n'));
    assert.match(summary, /a\.onnx: Fused 3 blocks · not validated \(--no-validate\) · MACs −8\.6 %/);
    assert.match(summary, /b\.onnx: b\.onnx: not a valid ONNX model\./);
    assert.match(summary, /c\.onnx: Fused 3 blocks/);
    assert.ok(messages.includes('RepFuse: 3 models done; the summary is in the RepFuse log.'), messages.join('\n'));
  } finally {
    uninstall();
  }
});
