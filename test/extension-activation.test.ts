// Activation of the bundled extension (dist/extension.js) under a `vscode` stub: fast, no model
// worker, no onnxruntime, and every disposable it registers is disposed on deactivation.
import assert from 'node:assert/strict';
import * as path from 'node:path';
import { after, before, test } from 'node:test';
import { repoRoot } from './helpers/paths';
import { createStub, installStub, type Stub } from './extension-stub';

const bundle = path.join(repoRoot, 'dist', 'extension.js');

let stub: Stub;
let uninstall: () => void;
let workersStarted = 0;
// The real module object (an `import * as` namespace would be a copy), so patching reaches the bundle.
// eslint-disable-next-line @typescript-eslint/no-require-imports
const workerThreads = require('node:worker_threads') as typeof import('node:worker_threads');
const OriginalWorker = workerThreads.Worker;

before(() => {
  stub = createStub();
  uninstall = installStub(stub);
  // Count worker threads started while activating (there must be none).
  (workerThreads as { Worker: unknown }).Worker = class extends OriginalWorker {
    constructor(...args: ConstructorParameters<typeof OriginalWorker>) {
      workersStarted++;
      super(...args);
    }
  };
});

after(() => {
  (workerThreads as { Worker: unknown }).Worker = OriginalWorker;
  uninstall();
});

interface Ext {
  activate(ctx: unknown): void;
  deactivate(): Promise<void>;
}

test('activation takes well under 50 ms, starts no worker and does not load onnxruntime', async () => {
  const subscriptions: { dispose(): unknown }[] = [];
  const context = { subscriptions, extensionPath: repoRoot, extensionUri: { scheme: 'file', path: repoRoot, fsPath: repoRoot } };

  const t0 = performance.now();
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  const ext = require(bundle) as Ext;
  const t1 = performance.now();
  ext.activate(context);
  const t2 = performance.now();
  const load = t1 - t0;
  const activate = t2 - t1;
  console.log(`# activation: require(dist/extension.js) ${load.toFixed(1)} ms + activate() ${activate.toFixed(1)} ms = ${(load + activate).toFixed(1)} ms`);

  assert.ok(load + activate < 50, `activation took ${(load + activate).toFixed(1)} ms`);
  assert.equal(workersStarted, 0, 'activation must not start the model worker');
  assert.ok(!Object.keys(require.cache).some((k) => k.includes('onnxruntime')), 'activation must not load onnxruntime-node');

  // What activation registered: the editor, the tree, both serializers, the commands.
  const names = stub.tracked.map((t) => t.what);
  for (const want of [
    'customEditor:repfuse.modelEditor',
    'customEditor:repfuse.checkpointEditor',
    'treeView:repfuse.blocks',
    'serializer:repfuse.branchStats',
    'serializer:repfuse.fuseReport',
    'command:repfuse.fuse',
    'command:repfuse.inspect',
    'command:repfuse.showBranchStats',
    'command:repfuse.openModel',
    'outputChannel:RepFuse',
  ]) {
    assert.ok(names.includes(want), `missing ${want}`);
  }

  // Deactivate as VS Code does: deactivate(), then dispose the subscriptions.
  await ext.deactivate();
  for (const d of subscriptions) d.dispose();
  const leaked = stub.tracked.filter((t) => !t.disposed).map((t) => t.what);
  assert.deepEqual(leaked, [], 'every disposable is disposed');
});

test('the package.json contributions match what the code registers', async () => {
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  const pkg = require(path.join(repoRoot, 'package.json'));
  const contributed = new Set<string>(pkg.contributes.commands.map((c: { command: string }) => c.command));
  for (const id of stub.commands.keys()) assert.ok(contributed.has(id), `${id} is registered but not contributed`);
  for (const id of contributed) assert.ok(stub.commands.has(id), `${id} is contributed but not registered`);
  assert.ok(pkg.activationEvents.includes('onCustomEditor:repfuse.modelEditor'));
  assert.ok(!pkg.activationEvents.includes('*') && !pkg.activationEvents.includes('onStartupFinished'), 'no eager activation');
  const editors = pkg.contributes.customEditors;
  assert.equal(editors.find((e: { priority: string }) => e.priority === 'default').selector[0].filenamePattern, '*.onnx');
  assert.deepEqual(
    editors.find((e: { priority: string }) => e.priority === 'option').selector.map((s: { filenamePattern: string }) => s.filenamePattern),
    // Every checkpoint extension of the format registry (src/core/formats.ts; test/formats.test.ts checks the whole list).
    ['*.pt', '*.pth', '*.ckpt', '*.bin', '*.pkl', '*.tar', '*.safetensors'],
  );
  assert.equal(pkg.contributes.views.explorer[0].name, 'RepConv Blocks');
  const settings = Object.keys(pkg.contributes.configuration.properties);
  for (const s of ['validation.enabled', 'validation.atol', 'validation.rtol', 'validation.inputShapes', 'validation.timeoutSeconds', 'fusedSuffix', 'foldStandaloneBatchNorm', 'checkpoint.defaultEpsilon', 'checkpoint.outputDtype']) {
    assert.ok(settings.includes(`repfuse.${s}`), `setting repfuse.${s}`);
  }
  // Untrusted workspaces: everything but the end-to-end run in PyTorch, whose settings they cannot set.
  assert.equal(pkg.capabilities.untrustedWorkspaces.supported, 'limited');
  assert.deepEqual(pkg.capabilities.untrustedWorkspaces.restrictedConfigurations, ['repfuse.python.interpreter', 'repfuse.python.path']);
});
