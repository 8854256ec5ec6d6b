// RepFuse's extension entry point. Activation only wires things up: it starts no worker, reads
// no file and never loads onnxruntime (that happens in the validation child process of a fuse).
import * as path from 'node:path';
import * as vscode from 'vscode';
import { BlocksTreeProvider } from './blocksTree';
import { BranchStatsPanel } from './branchStatsPanel';
import { registerCommands } from './commands';
import { ModelEditorProvider } from './modelEditor';
import { ModelService } from './modelService';
import { ReportPanel } from './reportPanel';
import { INSPECT_SETTINGS } from './settings';

let service: ModelService | undefined;

export function activate(context: vscode.ExtensionContext): void {
  const t0 = performance.now();
  const log = vscode.window.createOutputChannel('RepFuse', { log: true });
  service = new ModelService(path.join(context.extensionPath, 'dist', 'model-worker.js'), log);
  const editors = ModelEditorProvider.register(context, service);
  const tree = BlocksTreeProvider.register(service);

  context.subscriptions.push(
    log,
    service,
    tree,
    BranchStatsPanel.register(context, service),
    ReportPanel.register(context, log),
    ...registerCommands({ context, service, editors, tree, log }),
    // The tree follows the active model editor; it keeps the last model while other editors are active.
    editors.onDidChangeActive((uri) => {
      if (uri) tree.setRoot(uri);
    }),
    // Selection sync: editor list → tree, tree → editor list.
    editors.onDidSelectBlock(({ uri, block }) => void tree.revealBlock(uri, block)),
    tree.view.onDidChangeSelection((e) => {
      const n = e.selection[0];
      if (n && (n.type === 'block' || n.type === 'branch')) editors.selectBlock(n.uri, n.block);
    }),
    // When the tree's model is no longer open anywhere, show the welcome content again.
    vscode.window.tabGroups.onDidChangeTabs(() => {
      const root = tree.rootUri;
      if (root && !isOpen(root)) tree.setRoot(editors.activeUri);
    }),
    vscode.workspace.onDidChangeConfiguration((e) => {
      if (INSPECT_SETTINGS.some((s) => e.affectsConfiguration(s))) service?.reloadAll();
    }),
  );
  log.info(`activated in ${(performance.now() - t0).toFixed(1)} ms`);
}

function isOpen(uri: vscode.Uri): boolean {
  const key = uri.toString();
  return vscode.window.tabGroups.all.some((g) =>
    g.tabs.some((t) => t.input instanceof vscode.TabInputCustom && ModelEditorProvider.viewTypes.includes(t.input.viewType) && t.input.uri.toString() === key),
  );
}

/** Stops the model worker and any fuse job; cancelled jobs remove their outputs and temp files. */
export async function deactivate(): Promise<void> {
  const s = service;
  service = undefined;
  await s?.shutdown();
}
