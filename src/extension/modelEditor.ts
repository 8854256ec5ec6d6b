// The read-only model editor (repfuse.modelEditor): opens instantly, parses in the model worker
// with a progress indicator, then shows the model's facts, blocks, rejected candidates and ops.
import * as vscode from 'vscode';
import type { ModelEditorFromWebview, ModelEditorToWebview, QuantState } from './protocol';
import { quantView } from './view/quantView';
import type { ModelService } from './modelService';
import { modelView } from './view/modelView';
import { baseName, fmtBytes } from './view/format';
import { webviewHtml, webviewOptions } from './webviewHtml';

class ModelDocument implements vscode.CustomDocument {
  constructor(
    readonly uri: vscode.Uri,
    private readonly onDispose: () => void,
  ) {}
  dispose(): void {
    this.onDispose();
  }
}

interface EditorEntry {
  uri: vscode.Uri;
  panel: vscode.WebviewPanel;
  post(m: ModelEditorToWebview): void;
}

export class ModelEditorProvider implements vscode.CustomReadonlyEditorProvider<ModelDocument>, vscode.Disposable {
  /** ONNX models (priority default). */
  static readonly viewType = 'repfuse.modelEditor';
  /**
   * The same editor for PyTorch checkpoints and safetensors (priority option: "Open With…").
   * A second view type, because VS Code keeps one priority per view type.
   */
  static readonly checkpointViewType = 'repfuse.checkpointEditor';
  static readonly viewTypes = [ModelEditorProvider.viewType, ModelEditorProvider.checkpointViewType];

  /** The view type that opens a file: the ONNX one for .onnx, the checkpoint one otherwise. */
  static viewTypeFor(uri: vscode.Uri): string {
    return uri.path.toLowerCase().endsWith('.onnx') ? ModelEditorProvider.viewType : ModelEditorProvider.checkpointViewType;
  }

  private readonly editors = new Set<EditorEntry>();
  private active: EditorEntry | undefined;
  private readonly activeChanged = new vscode.EventEmitter<vscode.Uri | undefined>();
  /** The URI of the model editor that is active now (undefined when none is). */
  readonly onDidChangeActive = this.activeChanged.event;
  private readonly blockSelected = new vscode.EventEmitter<{ uri: vscode.Uri; block: string }>();
  /** The user selected a block in an editor's list. */
  readonly onDidSelectBlock = this.blockSelected.event;
  private readonly disposables: vscode.Disposable[] = [this.activeChanged, this.blockSelected];
  private readonly busy = new Set<string>();
  /** The Quantization section's state per model (asked for lazily: it runs onnxruntime). */
  private readonly quants = new Map<string, QuantState>();
  /** The block last selected per model (editor list or tree), for commands without a block. */
  private readonly selected = new Map<string, string>();

  static register(context: vscode.ExtensionContext, service: ModelService): ModelEditorProvider {
    const provider = new ModelEditorProvider(context.extensionUri, service);
    context.subscriptions.push(
      provider,
      ...ModelEditorProvider.viewTypes.map((viewType) =>
        vscode.window.registerCustomEditorProvider(viewType, provider, {
          // Webview state (selection) is kept with getState/setState, not by keeping hidden webviews alive.
          webviewOptions: { retainContextWhenHidden: false },
          supportsMultipleEditorsPerDocument: true,
        }),
      ),
    );
    return provider;
  }

  private constructor(
    private readonly extensionUri: vscode.Uri,
    private readonly service: ModelService,
  ) {
    this.disposables.push(
      service.onDidChange((uri) => {
        for (const e of this.editors) if (e.uri.toString() === uri.toString()) this.postState(e);
      }),
    );
  }

  /** The URI of the active model editor, if a model editor is active. */
  get activeUri(): vscode.Uri | undefined {
    return this.active?.uri;
  }

  openCustomDocument(uri: vscode.Uri): ModelDocument {
    // Parsing starts when the editor is shown, so the editor opens at once with a progress view.
    this.service.retain(uri);
    // A model rewritten on disk (re-exported, re-trained) is parsed again.
    const folder = vscode.Uri.joinPath(uri, '..');
    const watcher = vscode.workspace.createFileSystemWatcher(new vscode.RelativePattern(folder, baseName(uri.path)), true, false, true);
    const onChange = watcher.onDidChange(() => void this.service.load(uri, true).catch(() => undefined));
    return new ModelDocument(uri, () => {
      onChange.dispose();
      watcher.dispose();
      this.service.release(uri);
    });
  }

  resolveCustomEditor(document: ModelDocument, panel: vscode.WebviewPanel): void {
    const webview = panel.webview;
    webview.options = webviewOptions(this.extensionUri);
    webview.html = webviewHtml(webview, this.extensionUri, 'modelEditor', baseName(document.uri.path));
    const entry: EditorEntry = {
      uri: document.uri,
      panel,
      post: (m) => void webview.postMessage(m),
    };
    this.editors.add(entry);
    const subs: vscode.Disposable[] = [
      webview.onDidReceiveMessage((m: ModelEditorFromWebview) => this.onMessage(entry, m)),
      panel.onDidChangeViewState(() => {
        if (panel.active) this.setActive(entry);
        else if (this.active === entry) this.setActive(undefined);
      }),
      panel.onDidDispose(() => {
        this.editors.delete(entry);
        if (this.active === entry) this.setActive(undefined);
        for (const d of subs) d.dispose();
      }),
    ];
    if (panel.active) this.setActive(entry);
  }

  private setActive(e: EditorEntry | undefined): void {
    if (this.active === e) return;
    this.active = e;
    this.activeChanged.fire(e?.uri);
  }

  private onMessage(e: EditorEntry, m: ModelEditorFromWebview): void {
    switch (m.type) {
      case 'ready':
        void this.start(e);
        break;
      case 'reload':
        void this.service.load(e.uri, true).catch(() => undefined);
        break;
      case 'fuse':
        void vscode.commands.executeCommand('repfuse.fuse', e.uri);
        break;
      case 'showBranchStats':
        void vscode.commands.executeCommand('repfuse.showBranchStats', { uri: e.uri, block: m.block });
        break;
      case 'selectBlock':
        this.selected.set(e.uri.toString(), m.block);
        this.blockSelected.fire({ uri: e.uri, block: m.block });
        break;
      case 'analyzeQuant':
        void this.analyzeQuant(e.uri);
        break;
      case 'copy':
        void vscode.env.clipboard.writeText(m.text).then(() => vscode.window.setStatusBarMessage(`RepFuse: copied ${m.what}`, 3000));
        break;
    }
  }

  /** Runs the quantization analysis of a model once at a time; every editor of it shows the result. */
  private async analyzeQuant(uri: vscode.Uri): Promise<void> {
    const k = uri.toString();
    if (this.quants.get(k)?.status === 'running') return;
    const set = (quant: QuantState) => {
      this.quants.set(k, quant);
      for (const e of this.editors) if (e.uri.toString() === k) e.post({ type: 'quant', quant });
    };
    set({ status: 'running', message: 'Fusing in memory…' });
    try {
      const report = await this.service.quant(uri, { onProgress: (message) => set({ status: 'running', message }) });
      set({ status: 'done', view: quantView(report) });
    } catch (err) {
      set({ status: 'error', message: (err as Error).message });
    }
  }

  private async start(e: EditorEntry): Promise<void> {
    let size = 0;
    try {
      size = (await vscode.workspace.fs.stat(e.uri)).size;
    } catch {
      // The parse reports a missing file in full.
    }
    e.post({ type: 'init', fileName: baseName(e.uri.path), fileSize: size, supportsFuse: true });
    if (this.busy.has(e.uri.toString())) e.post({ type: 'busy', busy: true });
    const q = this.quants.get(e.uri.toString());
    if (q) e.post({ type: 'quant', quant: q });
    const s = this.service.state(e.uri);
    if (s && s.status !== 'loading') {
      this.postState(e);
      return;
    }
    e.post({ type: 'loading', message: `Parsing ${baseName(e.uri.path)}${size ? ` (${fmtBytes(size)})` : ''}…` });
    // Also in the window's status bar, for a model that takes a while.
    await vscode.window.withProgress({ location: vscode.ProgressLocation.Window, title: `RepFuse: parsing ${baseName(e.uri.path)}` }, () =>
      this.service.load(e.uri).catch(() => undefined),
    );
  }

  private postState(e: EditorEntry): void {
    const s = this.service.state(e.uri);
    if (!s) return;
    if (s.status === 'loading') e.post({ type: 'loading', message: `Parsing ${baseName(s.path)}…` });
    else if (s.status === 'error') e.post({ type: 'loadError', message: s.message });
    else e.post({ type: 'model', model: modelView(s.report) });
  }

  /** The block last selected in this model's editor or in the tree. */
  selectedBlock(uri: vscode.Uri): string | undefined {
    return this.selected.get(uri.toString());
  }

  /** Selects a block in every editor of that model (the tree's selection changed). */
  selectBlock(uri: vscode.Uri, block: string): void {
    this.selected.set(uri.toString(), block);
    for (const e of this.editors) if (e.uri.toString() === uri.toString()) e.post({ type: 'select', block });
  }

  /** Marks a fuse job for a model as running or done (the Fuse button is disabled meanwhile). */
  setBusy(uri: vscode.Uri, busy: boolean): void {
    const k = uri.toString();
    if (busy) this.busy.add(k);
    else this.busy.delete(k);
    for (const e of this.editors) if (e.uri.toString() === k) e.post({ type: 'busy', busy });
  }

  dispose(): void {
    for (const d of this.disposables) d.dispose();
  }
}
