// The extension's side of the end-to-end validation and of repfuse.validation.rtol: the gate
// (full-module checkpoint, trusted workspace, an interpreter, consent asked once per workspace and
// interpreter) under the `vscode` stub; readSettings telling a set rtol from the default through
// WorkspaceConfiguration.inspect; and the real model worker passing both to the engine.
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { after, before, describe, test } from 'node:test';
import type { InspectReport } from '../src/core/model';
import type { FuseReport, ValidationReport } from '../src/core/report';
import { fuseNotice } from '../src/extension/view/reportView';
import type * as Gate from '../src/extension/pythonValidation';
import type * as SettingsModule from '../src/extension/settings';
import type { FuseJobOptions } from '../src/extension/view/settings';
import { ModelWorkerClient } from '../src/extension/worker/client';
import { createStub, installStub, type Stub } from './extension-stub';
import { makeTmp, repoRoot, rmTmp } from './helpers/paths';

const PYTHON = process.env.REPFUSE_TEST_PYTHON || '/usr/bin/python3';
const YOLO16 = path.join(repoRoot, 'test', 'fixtures', 'pyval', 'yolo_full_fp16.pt');

let stub: Stub;
let uninstall: () => void;
let gate: typeof Gate;
let settingsModule: typeof SettingsModule;
let tmp: string;

/** What the stub's showWarningMessage was asked, and what it answers next. */
const asked: { message: string; options: { modal?: boolean; detail?: string }; items: string[] }[] = [];
let answer: string | undefined;

before(() => {
  tmp = makeTmp();
  stub = createStub();
  const window = stub.module.window as Record<string, unknown>;
  window.showWarningMessage = async (message: string, options: { modal?: boolean; detail?: string }, ...items: string[]) => {
    asked.push({ message, options, items });
    return answer;
  };
  // No Python extension unless a test installs one (present before the require: the compiled
  // `import * as vscode` binds the stub's keys as they are then).
  (stub.module as Record<string, unknown>).extensions = { getExtension: (): unknown => undefined };
  uninstall = installStub(stub);
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  gate = require('../src/extension/pythonValidation') as typeof Gate;
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  settingsModule = require('../src/extension/settings') as typeof SettingsModule;
});
after(() => {
  uninstall();
  rmTmp(tmp);
});

function workspace(): Record<string, unknown> {
  return stub.module.workspace as Record<string, unknown>;
}

/** A Memento like workspaceState. */
function memento(): { get<T>(k: string): T | undefined; update(k: string, v: unknown): Promise<void>; keys(): readonly string[]; data: Map<string, unknown> } {
  const data = new Map<string, unknown>();
  return { data, get: <T>(k: string) => data.get(k) as T | undefined, update: async (k, v) => void data.set(k, v), keys: () => [...data.keys()] };
}

const report = (layout: string, format: 'pytorch' | 'safetensors' | 'onnx' = 'pytorch') => ({ model: { format, layout } }) as unknown as InspectReport;
const FULL = report("torch zip · full-module pickle (models.yolo.Model) in 'model' entry");
const SD = report('torch zip · state_dict in the root');

describe('the end-to-end gate', () => {
  test('only full-module PyTorch checkpoints, only in trusted workspaces, only with an interpreter', async () => {
    const state = memento();
    workspace().isTrusted = true;
    asked.length = 0;
    assert.deepEqual(await gate.decidePython(state as never, '/m/sd.pt', SD, { interpreter: PYTHON, path: [] }), { run: false, why: 'not a full-module checkpoint' });
    assert.equal((await gate.decidePython(state as never, '/m/x.pt', undefined, { interpreter: PYTHON, path: [] })).run, false, 'not parsed: no run');
    assert.equal(gate.isFullModuleCheckpoint(report('safetensors · full-module', 'safetensors')), false);

    workspace().isTrusted = false;
    const untrusted = await gate.decidePython(state as never, '/m/best.pt', FULL, { interpreter: PYTHON, path: [] });
    assert.equal(untrusted.run, false);
    assert.match((untrusted as { why: string }).why, /not trusted/);

    workspace().isTrusted = true;
    // No setting and no Python extension (the stub has none): nothing to run, nothing asked.
    const none = await gate.decidePython(state as never, '/m/best.pt', FULL, { interpreter: '', path: [] });
    assert.equal(none.run, false);
    assert.match((none as { why: string }).why, /set repfuse\.python\.interpreter/);
    assert.equal(asked.length, 0, 'no question without a trusted workspace, a full module and an interpreter');
    assert.equal(state.data.size, 0);
  });

  test('consent: asked once (modal, saying it runs pickled code), remembered per workspace and interpreter', async () => {
    const state = memento();
    workspace().isTrusted = true;
    asked.length = 0;
    answer = gate.RUN;
    const first = await gate.decidePython(state as never, '/m/best.pt', FULL, { interpreter: PYTHON, path: ['/repo'] });
    assert.deepEqual(first, { run: true, interpreter: PYTHON, path: ['/repo'] });
    assert.equal(asked.length, 1);
    assert.equal(asked[0].options.modal, true);
    assert.match(asked[0].message, /best\.pt end to end in your own PyTorch/);
    assert.match(asked[0].options.detail!, /weights_only=False.*runs code stored in the checkpoint/);
    assert.deepEqual(asked[0].items, [gate.RUN, gate.BLOCKS_ONLY]);
    assert.deepEqual(state.data.get(gate.CONSENT_KEY), { interpreter: PYTHON, allowed: true });
    // Remembered: no second question.
    answer = undefined;
    assert.equal((await gate.decidePython(state as never, '/m/other.pt', FULL, { interpreter: PYTHON, path: [] })).run, true);
    assert.equal(asked.length, 1);
    // Another interpreter is asked about again; dismissing the question remembers nothing.
    const dismissed = await gate.decidePython(state as never, '/m/best.pt', FULL, { interpreter: '/opt/venv/bin/python', path: [] });
    assert.deepEqual(dismissed, { run: false, why: 'the question was dismissed' });
    assert.equal(asked.length, 2);
    assert.deepEqual(state.data.get(gate.CONSENT_KEY), { interpreter: PYTHON, allowed: true });
    // "Block by Block Only" is remembered too.
    answer = gate.BLOCKS_ONLY;
    assert.equal((await gate.decidePython(state as never, '/m/best.pt', FULL, { interpreter: '/opt/venv/bin/python', path: [] })).run, false);
    answer = gate.RUN;
    const refused = await gate.decidePython(state as never, '/m/best.pt', FULL, { interpreter: '/opt/venv/bin/python', path: [] });
    assert.match((refused as { why: string }).why, /you chose block-by-block validation only/);
    assert.equal(asked.length, 3);
    // Untrusted again: consent given earlier does not count.
    state.data.set(gate.CONSENT_KEY, { interpreter: PYTHON, allowed: true });
    workspace().isTrusted = false;
    assert.equal((await gate.decidePython(state as never, '/m/best.pt', FULL, { interpreter: PYTHON, path: [] })).run, false);
    workspace().isTrusted = true;
  });

  test("the default interpreter is the Python extension's selected environment", async () => {
    const calls: string[] = [];
    const extensions = stub.module.extensions as { getExtension: (id: string) => unknown };
    extensions.getExtension = (id: string) =>
        id === 'ms-python.python'
          ? {
              isActive: false,
              activate: async () => {
                calls.push('activate');
                return {
                  environments: {
                    getActiveEnvironmentPath: () => ({ id: 'venv', path: '/proj/.venv' }),
                    resolveEnvironment: async (e: { path: string }) => ({ executable: { uri: { fsPath: `${e.path}/bin/python` } } }),
                  },
                };
              },
            }
          : undefined;
    try {
      assert.equal(await gate.pythonExtensionInterpreter(undefined), '/proj/.venv/bin/python');
      assert.deepEqual(calls, ['activate']);
      const state = memento();
      asked.length = 0;
      answer = gate.RUN;
      const d = await gate.decidePython(state as never, '/m/best.pt', FULL, { interpreter: '', path: [] });
      assert.deepEqual(d, { run: true, interpreter: '/proj/.venv/bin/python', path: [] });
      assert.match(asked[0].options.detail!, /\/proj\/\.venv\/bin\/python/);
      // The setting wins over the extension.
      asked.length = 0;
      assert.deepEqual(await gate.decidePython(state as never, '/m/best.pt', FULL, { interpreter: PYTHON, path: [] }), { run: true, interpreter: PYTHON, path: [] });
      assert.equal(asked.length, 1, 'a different interpreter: asked again');
      // An extension whose API throws is no interpreter, not a crash.
      extensions.getExtension = () => ({ isActive: false, activate: async () => Promise.reject(new Error('boom')) });
      assert.equal(await gate.pythonExtensionInterpreter(undefined), undefined);
    } finally {
      extensions.getExtension = () => undefined;
    }
  });
});

describe('settings', () => {
  /** A WorkspaceConfiguration whose values come from `user` (inspect's globalValue) over the defaults. */
  function config(user: Record<string, unknown>) {
    return () => ({
      get: (k: string) => user[k],
      inspect: (k: string) => ({ key: `repfuse.${k}`, defaultValue: undefined, globalValue: user[k] }),
    });
  }

  test('rtolExplicit: a value the user set, from WorkspaceConfiguration.inspect; the defaults are not', () => {
    const ws = workspace();
    const original = ws.getConfiguration;
    try {
      ws.getConfiguration = config({});
      let s = settingsModule.readSettings().settings;
      assert.equal(s.rtolExplicit, false);
      assert.equal(s.rtol, 1e-3);
      ws.getConfiguration = config({ 'validation.rtol': 1e-3 });
      s = settingsModule.readSettings().settings;
      assert.equal(s.rtolExplicit, true, 'set to the default value is still set');
      ws.getConfiguration = config({ 'validation.rtol': 'x' });
      const bad = settingsModule.readSettings();
      assert.equal(bad.settings.rtolExplicit, false, 'an invalid value falls back to the default, which is not explicit');
      assert.equal(bad.problems.length, 1);
      ws.getConfiguration = config({ 'python.interpreter': ' /usr/bin/python3 ', 'python.path': ['/repo', '/repo/src'] });
      s = settingsModule.readSettings().settings;
      assert.deepEqual(s.python, { interpreter: '/usr/bin/python3', path: ['/repo', '/repo/src'] });
      ws.getConfiguration = config({ 'python.interpreter': 3, 'python.path': 'x' });
      const p = settingsModule.readSettings();
      assert.deepEqual(p.settings.python, { interpreter: '', path: [] });
      assert.equal(p.problems.length, 2);
      assert.match(p.problems.join(' '), /repfuse\.python\.interpreter.*repfuse\.python\.path/);
    } finally {
      ws.getConfiguration = original;
    }
  });
});

describe('the model worker passes both to the engine', () => {
  const script = path.join(repoRoot, 'dist', 'model-worker.js');
  let client: ModelWorkerClient;
  before(() => {
    client = new ModelWorkerClient(script);
  });
  after(async () => client.dispose());

  const opts = (output: string, over: Partial<FuseJobOptions> = {}): FuseJobOptions => ({
    foldBN: true,
    checkpoint: { defaultEpsilon: 'auto', outputDtype: 'keep' },
    output,
    force: false,
    validate: true,
    atol: 1e-4,
    rtol: 1e-3,
    timeoutMs: 300_000,
    inputShapes: {},
    ...over,
  });

  test('fp16 checkpoint: the float16-sized rtol by default, the user\'s repfuse.validation.rtol when set', async () => {
    const dflt = await client.request('fuse', { file: YOLO16, options: opts(path.join(tmp, 'a.pt')) });
    assert.equal(dflt.validation!.rtol, 5e-3);
    assert.match(dflt.inspect.model.notes.join('\n'), /validation uses rtol 0\.005/);
    const set = await client.request('fuse', { file: YOLO16, options: opts(path.join(tmp, 'b.pt'), { rtol: 1e-3, rtolExplicit: true }) });
    assert.equal(set.validation!.rtol, 1e-3);
    assert.ok(set.validation!.blocks.every((b) => b.tolerance === 1e-4 + 1e-3 * b.maxAbsRef));
    assert.doesNotMatch(set.inspect.model.notes.join('\n'), /validation uses rtol/);
  });

  test('python: the whole model runs in that interpreter', async () => {
    const r = await client.request('fuse', { file: YOLO16, options: opts(path.join(tmp, 'c.pt'), { python: { interpreter: PYTHON, path: [] } }) });
    assert.ok(fs.existsSync(path.join(tmp, 'c.pt')));
    assert.equal(r.validation!.endToEnd?.interpreter, PYTHON);
    assert.deepEqual(r.validation!.outputs.map((o) => o.name), ['model[0]', 'model[1][0]', 'model[1][1]']);
    assert.ok(r.validation!.passed);
  });
});

describe('the notification says what was checked', () => {
  const diff = (name: string, passed: boolean) => ({ name, shape: [1], maxAbsDiff: passed ? 1e-7 : 0.1, maxRelDiff: 0, meanAbsDiff: 0, worstIndex: [0], maxAbsRef: 1, tolerance: 1e-3, passed, nonFinite: 0 });
  const base = (v: Partial<ValidationReport>): FuseReport => ({
    input: '/m/best.pt',
    format: 'pytorch',
    output: '/m/best.fused.pt',
    bytesWritten: 1,
    blocksFused: 2,
    bnFolded: 0,
    paramsBefore: 1,
    paramsAfter: 1,
    inspect: { model: { notes: [] } } as unknown as InspectReport,
    validation: { passed: true, atol: 1e-4, rtol: 1e-3, seed: 0, runtime: 'ort', inputs: [], outputs: [], blocks: [], durationMs: 1, ...v },
    timingsMs: {},
  });

  test('block by block only: said plainly; a failing block is named', () => {
    const ok = fuseNotice(base({ blocks: [{ block: 'model.1', ...diff('model.1', true) }] }));
    assert.equal(ok.message, 'Fused 2 blocks · max |Δ| 1.0e-7 (worst block; checked block by block, as read by RepFuse) · passed');
    const bad = fuseNotice(base({ passed: false, blocks: [{ block: 'model.1', ...diff('model.1', true) }, { block: 'model.2', ...diff('model.2', false) }] }));
    assert.equal(bad.severity, 'warning');
    assert.match(bad.message, /OVER TOLERANCE: block model\.2 differs by more than the tolerance/);
  });

  test('end to end: the whole model, and the failing outputs named', () => {
    const e2e = { interpreter: '/usr/bin/python3', python: '3.11.2', torch: '1.13.0', pythonPath: [], models: [{ entry: 'model', className: 'models.yolo.Model' }] };
    const ok = fuseNotice(base({ endToEnd: e2e, outputs: [diff('model[0]', true)], blocks: [{ block: 'model.1', ...diff('model.1', true) }] }));
    assert.equal(ok.message, 'Fused 2 blocks · max |Δ| 1.0e-7 (whole model, in PyTorch 1.13.0) · passed');
    const bad = fuseNotice(base({ passed: false, endToEnd: e2e, outputs: [diff('model[0]', false), diff('model[1][0]', false)], blocks: [{ block: 'model.1', ...diff('model.1', true) }] }));
    assert.match(bad.message, /\(whole model, in PyTorch 1\.13\.0\) · OVER TOLERANCE: outputs model\[0\], model\[1\]\[0\] differ by more/);
  });
});
