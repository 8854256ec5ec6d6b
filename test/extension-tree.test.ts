// The RepConv Blocks tree provider under the `vscode` stub, on a real inspect report: lazy
// children, getParent for every element (what reveal needs), stable handles, tree items.
import assert from 'node:assert/strict';
import * as path from 'node:path';
import { after, before, test } from 'node:test';
import type { InspectReport } from '../src/core/model';
import { inspectOnnxFile } from '../src/core/onnx';
import type { BlockNode, BlocksTreeProvider as Provider } from '../src/extension/blocksTree';
import type { ModelState } from '../src/extension/view/treeItems';
import { createStub, installStub, type Stub } from './extension-stub';
import { repoRoot } from './helpers/paths';

let stub: Stub;
let uninstall: () => void;
let BlocksTreeProvider: typeof Provider;

before(() => {
  stub = createStub();
  uninstall = installStub(stub);
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  ({ BlocksTreeProvider } = require('../src/extension/blocksTree') as { BlocksTreeProvider: typeof Provider });
});
after(() => uninstall());

/** Just enough of ModelService for the tree: states, a change event, retain/release. */
function fakeService(states: Map<string, ModelState>) {
  const listeners = new Set<(u: unknown) => void>();
  const refs = new Map<string, number>();
  return {
    refs,
    fire: (u: unknown) => listeners.forEach((l) => l(u)),
    service: {
      state: (u: { toString(): string }) => states.get(u.toString()),
      onDidChange: (l: (u: unknown) => void) => {
        listeners.add(l);
        return { dispose: () => listeners.delete(l) };
      },
      retain: (u: { toString(): string }) => refs.set(u.toString(), (refs.get(u.toString()) ?? 0) + 1),
      release: (u: { toString(): string }) => refs.set(u.toString(), (refs.get(u.toString()) ?? 0) - 1),
      load: async () => undefined,
    },
  };
}

test('children are lazy, getParent inverts getChildren, handles are stable', async () => {
  const file = path.join(repoRoot, 'examples', 'yolov7_repconv_tiny.onnx');
  const report: InspectReport = inspectOnnxFile(file, { foldBN: true });
  // Add a rejected candidate so the "Not fused" group shows.
  report.rejected = [{ name: '/odd/Add', reason: 'branches read different tensors', parts: ['/odd/Add'] }];
  const vscode = stub.module as { Uri: { file(p: string): { toString(): string } } };
  const uri = vscode.Uri.file(file);
  const states = new Map<string, ModelState>([[uri.toString(), { status: 'loading', path: file }]]);
  const fake = fakeService(states);
  const tree = BlocksTreeProvider.register(fake.service as never);

  assert.deepEqual(tree.getChildren(), [], 'empty until a model is shown: the welcome content');
  tree.setRoot(uri as never);
  assert.equal(stub.contextKeys.get('repfuse.hasModel'), true);
  assert.equal(fake.refs.get(uri.toString()), 1);
  const [root] = tree.getChildren();
  assert.equal(root.type, 'model');
  // While parsing: a spinner and no children.
  assert.equal((tree.getTreeItem(root).iconPath as { id: string }).id, 'loading~spin');
  const loadingId = tree.getTreeItem(root).id;
  assert.deepEqual(tree.getChildren(root), []);

  states.set(uri.toString(), { status: 'ready', path: file, report });
  fake.fire(uri);
  const [root2] = tree.getChildren();
  const kids = tree.getChildren(root2);
  assert.deepEqual(
    kids.map((k) => (k.type === 'block' ? k.block : k.type)),
    ['model.2', 'model.3', 'model.4', 'model.5', 'rejectedGroup'],
  );
  const walk = (n: BlockNode, depth: number): number => {
    let count = 1;
    for (const c of tree.getChildren(n)) {
      assert.equal(tree.getParent(c), n, 'getParent returns the very handle getChildren gave');
      count += walk(c, depth + 1);
    }
    return count;
  };
  // 1 model + 4 blocks + 11 branches + group + 1 rejected.
  assert.equal(walk(root2, 0), 1 + 4 + report.blocks.reduce((a, b) => a + b.branches.length, 0) + 1 + 1);

  const item = tree.getTreeItem(kids[1]);
  assert.equal(item.label, 'model.3');
  assert.equal(item.description, 'YOLOv7 RepConv · 3×3 · 32→64 · s2');
  assert.equal(item.contextValue, 'repfuse.block');
  assert.equal(item.id, `${uri.toString()}#block/model.3`);
  const branch = tree.getChildren(kids[0])[2];
  assert.equal(tree.getTreeItem(branch).label, 'bn(x)');
  assert.equal(tree.getTreeItem(root2).contextValue, 'repfuse.model');
  // A new id once parsed, so VS Code shows the model expanded rather than as it was while parsing.
  assert.notEqual(tree.getTreeItem(root2).id, loadingId);
  assert.equal(tree.getTreeItem(root2).id, uri.toString());

  // Reveal a block selected in the editor.
  await tree.revealBlock(uri as never, 'model.4');
  const reveals = stub.treeViews.at(-1)!.view.reveals;
  assert.equal(reveals.length, 1);
  assert.equal(reveals[0], tree.blockNode(uri as never, 'model.4'));
  await tree.revealBlock(uri as never, 'model.404');
  assert.equal(reveals.length, 1, 'unknown blocks are not revealed');

  tree.setRoot(undefined);
  assert.equal(fake.refs.get(uri.toString()), 0, 'the model is released');
  assert.equal(stub.contextKeys.get('repfuse.hasModel'), false);
  assert.deepEqual(tree.getChildren(), []);
  tree.dispose();
});

test('a model that cannot be read shows the one-line error on the model node', () => {
  const vscode = stub.module as { Uri: { file(p: string): { toString(): string } } };
  const uri = vscode.Uri.file('/models/weights.pt');
  const states = new Map<string, ModelState>([[uri.toString(), { status: 'error', path: '/models/weights.pt', message: "unsupported file type '.pt'; RepFuse reads .onnx models." }]]);
  const tree = BlocksTreeProvider.register(fakeService(states).service as never);
  tree.setRoot(uri as never);
  const [root] = tree.getChildren();
  const item = tree.getTreeItem(root);
  assert.equal(item.label, 'weights.pt');
  assert.match(String(item.description), /unsupported file type/);
  assert.equal(item.contextValue, 'repfuse.model.error');
  assert.deepEqual(tree.getChildren(root), []);
  tree.dispose();
});
