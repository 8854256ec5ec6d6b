// The commands: Fuse, Inspect Model, Show Branch Statistics, Open Model. Each resolves its target
// from its argument (Explorer URI, tree node, editor message) or from the active model editor.
import * as vscode from 'vscode';
import type { BlockNode, BlocksTreeProvider } from './blocksTree';
import { BranchStatsPanel } from './branchStatsPanel';
import { ModelEditorProvider } from './modelEditor';
import { localPath, type ModelService } from './modelService';
import { ReportPanel } from './reportPanel';
import { readSettings } from './settings';
import { baseName } from './view/format';
import { fuseNotice } from './view/reportView';
import { fuseJobOptions, fusedOutputPath, isModelFile, MODEL_EXTENSIONS } from './view/settings';
import { WorkerRequestError } from './worker/client';
import { type FuseReport, renderFuse } from '../core/report';
import { blockDescription } from './view/treeItems';
import { isCheckpointPath } from '../core/formats';
import { decidePython, isFullModuleCheckpoint } from './pythonValidation';

export interface CommandDeps {
  context: vscode.ExtensionContext;
  service: ModelService;
  editors: ModelEditorProvider;
  tree: BlocksTreeProvider;
  log: vscode.LogOutputChannel;
}

const isUri = (x: unknown): x is vscode.Uri => x instanceof vscode.Uri;
const isNode = (x: unknown): x is BlockNode => !!x && typeof x === 'object' && 'type' in x && 'uri' in x && isUri((x as BlockNode).uri);

export function registerCommands(d: CommandDeps): vscode.Disposable[] {
  /** The model a command is about: its argument, else the active model editor, else the tree's root. */
  const target = (arg: unknown): vscode.Uri | undefined => {
    if (isUri(arg)) return arg;
    if (isNode(arg)) return arg.uri;
    return d.editors.activeUri ?? d.tree.rootUri;
  };

  const pickModel = async (): Promise<vscode.Uri | undefined> => {
    const picked = await vscode.window.showOpenDialog({
      canSelectMany: false,
      openLabel: 'Open Model',
      filters: { Models: MODEL_EXTENSIONS.map((e) => e.slice(1)) },
    });
    return picked?.[0];
  };

  const running = new Set<string>();
  /** The multi-selection being fused, if any: one line per model for the summary. */
  let batch: { lines: string[]; cancelled: boolean } | undefined;
  const DROP_AUX_YES = 'Remove Auxiliary Heads and Fuse';
  const DROP_AUX_NO = 'Fuse Only';
  const DROP_AUX_DETAIL =
    'The deploy model keeps only the main (lead) head: YOLOv9 DualDDetect and its CBLinear/CBFuse branch become the GELAN model with DDetect, ' +
    'YOLOv7 P6 IAuxDetect becomes Detect with the implicit knowledge folded; layers are renumbered as the official reparameterization notebook does. ' +
    'Set repfuse.checkpoint.dropAux to do this without asking.';

  async function fuseOne(uri: vscode.Uri): Promise<void> {
    let input: string;
    try {
      input = localPath(uri);
    } catch (err) {
      void vscode.window.showErrorMessage(`RepFuse: ${(err as Error).message}`);
      return;
    }
    if (!isModelFile(input)) {
      void vscode.window.showErrorMessage(`RepFuse: ${baseName(input)} is not a model file (${MODEL_EXTENSIONS.join(', ')}).`);
      return;
    }
    if (running.has(input)) {
      void vscode.window.showInformationMessage(`RepFuse is already fusing ${baseName(input)}.`);
      return;
    }
    const { settings, problems } = readSettings(uri);
    for (const p of problems) d.log.warn(p);
    if (problems.length) void vscode.window.showWarningMessage(`RepFuse: ${problems[0]}${problems.length > 1 ? ` (and ${problems.length - 1} more in the RepFuse log)` : ''}`);
    const output = fusedOutputPath(input, settings.fusedSuffix);
    if (output === input) {
      void vscode.window.showErrorMessage('RepFuse: the fused file would overwrite the input; set repfuse.fusedSuffix to a non-empty suffix.');
      return;
    }
    const outUri = vscode.Uri.file(output);
    let exists = false;
    try {
      await vscode.workspace.fs.stat(outUri);
      exists = true;
    } catch {
      exists = false;
    }
    if (exists) {
      const replace = await vscode.window.showWarningMessage(`${baseName(output)} already exists. Replace it with a new fused model?`, { modal: true, detail: `RepFuse never writes ${baseName(input)} itself.` }, 'Replace');
      if (replace !== 'Replace') return;
    }

    // A YOLO training model with auxiliary heads: remove them first when the setting says so, else ask.
    let dropAux = settings.dropAux;
    if (!dropAux) {
      const heads = (await d.service.load(uri).catch(() => undefined))?.model.auxHeads;
      if (heads?.length) {
        const choice = await vscode.window.showInformationMessage(
          `${baseName(input)} is a training model with auxiliary heads (${heads.join(', ')}). Also remove the auxiliary training heads?`,
          { modal: true, detail: DROP_AUX_DETAIL },
          DROP_AUX_YES,
          DROP_AUX_NO,
        );
        if (!choice) return;
        dropAux = choice === DROP_AUX_YES;
      }
    }

    // Full-module checkpoints may also run whole in the user's PyTorch: trusted workspace and consent first.
    let python: { interpreter: string; path: string[] } | undefined;
    if (settings.validate && isCheckpointPath(input)) {
      const inspected = await d.service.load(uri).catch(() => undefined);
      const decision = await decidePython(d.context.workspaceState, input, inspected, settings.python, uri);
      if (decision.run) python = { interpreter: decision.interpreter, path: decision.path };
      else if (isFullModuleCheckpoint(inspected)) d.log.info(`${baseName(input)}: checked block by block only, not end to end in PyTorch: ${decision.why}.`);
    }

    running.add(input);
    d.editors.setBusy(uri, true);
    const controller = new AbortController();
    let report: FuseReport;
    try {
      report = await vscode.window.withProgress(
        { location: vscode.ProgressLocation.Notification, title: `RepFuse: fusing ${baseName(input)}`, cancellable: true },
        (progress, token) => {
          token.onCancellationRequested(() => controller.abort());
          progress.report({ message: 'analyzing…' });
          return d.service.fuse(uri, { ...fuseJobOptions(settings, output, exists), python, dropAux }, {
            signal: controller.signal,
            onProgress: (m) => {
              d.log.info(m);
              progress.report({ message: `${m}…` });
            },
          });
        },
      );
    } catch (err) {
      failed(input, err);
      return;
    } finally {
      running.delete(input);
      d.editors.setBusy(uri, false);
    }
    d.log.info(`\n${renderFuse(report)}`);
    const notice = fuseNotice(report);
    batch?.lines.push(`${baseName(input)}: ${notice.message}`);
    if (notice.severity === 'warning') d.log.warn(notice.message);
    // The notification stays until the user acts on it; the command does not wait for that.
    const show = notice.severity === 'warning' ? vscode.window.showWarningMessage : vscode.window.showInformationMessage;
    void show(notice.message, ...notice.actions).then((action) => {
      if (action === 'Open Fused Model' && report.output) void openModel(vscode.Uri.file(report.output));
      else if (action === 'Show Report') ReportPanel.show(d.context.extensionUri, report, d.log);
    });
  }

  const openModel = (uri: vscode.Uri) => vscode.commands.executeCommand('vscode.openWith', uri, ModelEditorProvider.viewTypeFor(uri));

  /** Cancelled: a note; fused but not validated: a warning; anything else: an error. All one line. */
  function failed(input: string, err: unknown): void {
    batch?.lines.push(`${baseName(input)}: ${err instanceof WorkerRequestError && err.cancelled ? 'cancelled' : (err as Error).message}`);
    if (err instanceof WorkerRequestError && err.cancelled) {
      // Cancelling one model of a multi-selection stops the ones after it too.
      if (batch) batch.cancelled = true;
      d.log.info(`fusing ${input} cancelled; nothing was written.`);
      void vscode.window.showInformationMessage(`RepFuse: fusing ${baseName(input)} was cancelled; nothing was written.`);
      return;
    }
    const message = (err as Error).message;
    d.log.error(message);
    if (err instanceof WorkerRequestError && err.outputWritten) {
      // Fused, but the validation process crashed or timed out (the CLI's exit code 3).
      const written = err.outputWritten;
      void vscode.window.showWarningMessage(`RepFuse: ${message}`, 'Open Fused Model', 'Show Log').then((action) => {
        if (action === 'Open Fused Model') void openModel(vscode.Uri.file(written));
        else if (action === 'Show Log') d.log.show(true);
      });
      return;
    }
    void vscode.window.showErrorMessage(`RepFuse: ${message}`, 'Show Log').then((action) => {
      if (action === 'Show Log') d.log.show(true);
    });
  }

  const fuse = async (arg?: unknown, all?: unknown) => {
    // From the Explorer with several files selected, the second argument lists them all.
    const many = Array.isArray(all) ? all.filter(isUri).filter((u) => isModelFile(u.fsPath)) : [];
    const uris = many.length > 1 ? many : [target(arg) ?? (await pickModel())].filter(isUri);
    if (uris.length < 2) {
      for (const u of uris) await fuseOne(u);
      return;
    }
    // Each in turn (one fuse job at a time), then one summary in the log and a notification.
    const mine: { lines: string[]; cancelled: boolean } = { lines: [], cancelled: false };
    batch = mine;
    try {
      for (const u of uris) {
        if (mine.cancelled) {
          mine.lines.push(`${baseName(u.fsPath)}: not started (cancelled)`);
          continue;
        }
        const before = mine.lines.length;
        await fuseOne(u);
        if (mine.lines.length === before) mine.lines.push(`${baseName(u.fsPath)}: skipped`);
      }
    } finally {
      batch = undefined;
    }
    d.log.info(`fused ${uris.length} models:\n${mine.lines.map((l) => `  ${l}`).join('\n')}`);
    void vscode.window.showInformationMessage(`RepFuse: ${uris.length} models done${mine.cancelled ? ' (cancelled)' : ''}; the summary is in the RepFuse log.`, 'Show Log').then((a) => {
      if (a === 'Show Log') d.log.show(true);
    });
  };

  const inspect = async (arg?: unknown) => {
    const uri = target(arg) ?? (await pickModel());
    if (!uri) return;
    d.tree.setRoot(uri);
    await openModel(uri);
  };

  const showBranchStats = async (arg?: unknown) => {
    let uri: vscode.Uri | undefined;
    let block: string | undefined;
    if (isNode(arg) && arg.type === 'block') ({ uri, block } = arg);
    else if (isNode(arg) && arg.type === 'branch') ({ uri, block } = arg);
    else if (arg && typeof arg === 'object' && 'uri' in arg && 'block' in arg && isUri(arg.uri) && typeof arg.block === 'string') ({ uri, block } = arg as { uri: vscode.Uri; block: string });
    else uri = target(arg);
    if (!uri) {
      void vscode.window.showInformationMessage('RepFuse: open a model (.onnx) first, then choose a block.');
      return;
    }
    // From the editor title or the palette: the block selected in the editor or the tree, if any.
    if (!block && !isNode(arg)) block = d.editors.selectedBlock(uri);
    if (!block) {
      let report;
      try {
        report = await d.service.load(uri);
      } catch (err) {
        void vscode.window.showErrorMessage(`RepFuse: ${(err as Error).message}`);
        return;
      }
      if (!report.blocks.length) {
        void vscode.window.showInformationMessage(`RepFuse: ${baseName(uri.path)} has no re-parameterizable blocks.`);
        return;
      }
      const pick = await vscode.window.showQuickPick(
        report.blocks.map((b) => ({ label: b.name, description: blockDescription(b) })),
        { title: 'Branch statistics of which block?', matchOnDescription: true },
      );
      if (!pick) return;
      block = pick.label;
    }
    BranchStatsPanel.show(d.context.extensionUri, d.service, uri, block);
  };

  const openPicked = async () => {
    const uri = await pickModel();
    if (uri) await openModel(uri);
  };

  return [
    vscode.commands.registerCommand('repfuse.fuse', fuse),
    vscode.commands.registerCommand('repfuse.inspect', inspect),
    vscode.commands.registerCommand('repfuse.showBranchStats', showBranchStats),
    vscode.commands.registerCommand('repfuse.openModel', openPicked),
    vscode.commands.registerCommand('repfuse.showLog', () => d.log.show(true)),
  ];
}
