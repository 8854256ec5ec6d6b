// The branch statistics panel: one block of one model at a time. The webview asks for a block's
// statistics (computed in the model worker from BlockData); its state (model, block, raw/folded)
// survives reloads through getState/setState and the panel serializer.
import * as vscode from 'vscode';
import { answer, type BranchStatsFromWebview, type BranchStatsState, type BranchStatsToWebview, type WeightMode } from './protocol';
import type { ModelService } from './modelService';
import { baseName } from './view/format';
import { blockDescription } from './view/treeItems';
import { webviewHtml, webviewOptions } from './webviewHtml';

export class BranchStatsPanel {
  static readonly viewType = 'repfuse.branchStats';
  private static current: BranchStatsPanel | undefined;

  private readonly disposables: vscode.Disposable[] = [];

  /** Registers the serializer that restores a panel after a window reload. */
  static register(context: vscode.ExtensionContext, service: ModelService): vscode.Disposable {
    const serializer: vscode.WebviewPanelSerializer<BranchStatsState> = {
      deserializeWebviewPanel: async (panel, state) => {
        if (!state?.uri || !state.block) {
          panel.dispose();
          return;
        }
        BranchStatsPanel.current?.panel.dispose();
        BranchStatsPanel.current = new BranchStatsPanel(panel, context.extensionUri, service, vscode.Uri.parse(state.uri), state.block, state.mode ?? 'folded');
      },
    };
    return vscode.Disposable.from(vscode.window.registerWebviewPanelSerializer(BranchStatsPanel.viewType, serializer), { dispose: () => BranchStatsPanel.current?.panel.dispose() });
  }

  /** Shows a block, reusing the open panel (switching its model if needed). */
  static show(extensionUri: vscode.Uri, service: ModelService, uri: vscode.Uri, block: string): void {
    const cur = BranchStatsPanel.current;
    if (cur && cur.uri.toString() === uri.toString()) {
      cur.showBlock(block);
      cur.panel.reveal(undefined, false);
      return;
    }
    cur?.panel.dispose();
    const panel = vscode.window.createWebviewPanel(BranchStatsPanel.viewType, BranchStatsPanel.title(block), { viewColumn: vscode.ViewColumn.Beside, preserveFocus: false }, webviewOptions(extensionUri));
    BranchStatsPanel.current = new BranchStatsPanel(panel, extensionUri, service, uri, block, 'folded');
  }

  private static title(block: string): string {
    return `Branches · ${block}`;
  }

  private constructor(
    readonly panel: vscode.WebviewPanel,
    extensionUri: vscode.Uri,
    private readonly service: ModelService,
    readonly uri: vscode.Uri,
    private block: string,
    private readonly mode: WeightMode,
  ) {
    panel.webview.options = webviewOptions(extensionUri);
    panel.webview.html = webviewHtml(panel.webview, extensionUri, 'branchStats', 'Branch statistics');
    panel.title = BranchStatsPanel.title(block);
    panel.iconPath = { light: vscode.Uri.joinPath(extensionUri, 'media', 'stats-light.svg'), dark: vscode.Uri.joinPath(extensionUri, 'media', 'stats-dark.svg') };
    service.retain(uri);
    this.disposables.push(
      panel.webview.onDidReceiveMessage((m: BranchStatsFromWebview) => void this.onMessage(m)),
      panel.onDidDispose(() => this.dispose()),
    );
  }

  private post(m: BranchStatsToWebview): void {
    void this.panel.webview.postMessage(m);
  }

  private showBlock(block: string): void {
    this.block = block;
    this.panel.title = BranchStatsPanel.title(block);
    this.post({ type: 'show', block });
  }

  private async onMessage(m: BranchStatsFromWebview): Promise<void> {
    switch (m.type) {
      case 'ready': {
        let blocks: { name: string; description: string }[] = [];
        try {
          const report = await this.service.load(this.uri);
          blocks = report.blocks.map((b) => ({ name: b.name, description: blockDescription(b) }));
        } catch {
          // The stats request reports the problem in the panel.
        }
        this.post({ type: 'init', uri: this.uri.toString(), fileName: baseName(this.uri.path), blocks, block: this.block, mode: this.mode });
        break;
      }
      case 'showing':
        this.block = m.block;
        this.panel.title = BranchStatsPanel.title(m.block);
        break;
      case 'request':
        if (m.kind === 'blockStats') this.post(await answer(m, (p) => this.service.blockStats(this.uri, p.block)));
        else if (m.kind === 'blockQuant') this.post(await answer(m, (p) => this.service.blockQuant(this.uri, p.block)));
        break;
    }
  }

  private dispose(): void {
    if (BranchStatsPanel.current === this) BranchStatsPanel.current = undefined;
    this.service.release(this.uri);
    for (const d of this.disposables) d.dispose();
  }
}
