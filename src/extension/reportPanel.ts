// The fuse report panel: per output and per block differences, as the CLI prints them. The
// webview keeps the (small) report view in its state, so the serializer restores it as it was.
import * as vscode from 'vscode';
import type { FuseReport } from '../core/report';
import type { ReportFromWebview, ReportState, ReportToWebview } from './protocol';
import { type ReportView, reportView, SPEEDUP_RUNS, withLatency } from './view/reportView';
import { oneLineError } from '../core/errors';
import { readSettings } from './settings';
import { webviewHtml, webviewOptions } from './webviewHtml';
import { ModelEditorProvider } from './modelEditor';

export class ReportPanel {
  static readonly viewType = 'repfuse.fuseReport';

  static register(context: vscode.ExtensionContext, log: vscode.LogOutputChannel): vscode.Disposable {
    return vscode.window.registerWebviewPanelSerializer(ReportPanel.viewType, {
      deserializeWebviewPanel: async (panel: vscode.WebviewPanel, state: ReportState | undefined) => {
        if (!state?.report) {
          panel.dispose();
          return;
        }
        ReportPanel.wire(panel, context.extensionUri, state.report, log);
      },
    });
  }

  static show(extensionUri: vscode.Uri, report: FuseReport, log: vscode.LogOutputChannel): void {
    const view = reportView(report);
    const panel = vscode.window.createWebviewPanel(ReportPanel.viewType, `Fuse report · ${view.inputName}`, vscode.ViewColumn.Active, webviewOptions(extensionUri));
    ReportPanel.wire(panel, extensionUri, view, log);
  }

  private static wire(panel: vscode.WebviewPanel, extensionUri: vscode.Uri, initial: ReportView, log: vscode.LogOutputChannel): void {
    let view = initial;
    let measuring: AbortController | undefined;
    panel.webview.options = webviewOptions(extensionUri);
    panel.webview.html = webviewHtml(panel.webview, extensionUri, 'report', 'Fuse report');
    panel.title = `Fuse report · ${view.inputName}`;
    panel.iconPath = { light: vscode.Uri.joinPath(extensionUri, 'media', 'report-light.svg'), dark: vscode.Uri.joinPath(extensionUri, 'media', 'report-dark.svg') };
    const post = (m: ReportToWebview) => void panel.webview.postMessage(m);
    // Only the report's own files may be opened from the webview.
    const known = (p: string) => p === view.input || p === view.output;
    const sub = panel.webview.onDidReceiveMessage((m: ReportFromWebview) => {
      if ((m.type === 'openModel' || m.type === 'reveal') && !known(m.path)) return;
      switch (m.type) {
        case 'ready':
          post({ type: 'init', report: view });
          break;
        case 'openModel':
          void vscode.commands.executeCommand('vscode.openWith', vscode.Uri.file(m.path), ModelEditorProvider.viewTypeFor(vscode.Uri.file(m.path)));
          break;
        case 'reveal':
          void vscode.commands.executeCommand('revealInExplorer', vscode.Uri.file(m.path));
          break;
        case 'showLog':
          log.show(true);
          break;
        case 'measureSpeedup': {
          if (measuring || !view.output || !view.benefit?.canMeasure) return;
          const output = view.output;
          const ctl = (measuring = new AbortController());
          post({ type: 'measuring', running: true });
          const { settings } = readSettings(vscode.Uri.file(view.input));
          log.info(`measuring the latency of ${view.input} and ${output} (${SPEEDUP_RUNS} runs each)`);
          // Loaded on first use: activation stays free of child_process and the validation host.
          import('../validate/session')
            .then(({ measureSpeedup }) => measureSpeedup({ original: view.input, fused: output, runs: SPEEDUP_RUNS, inputShapes: settings.inputShapes, seed: 0 }, { timeoutMs: settings.timeoutMs, signal: ctl.signal, onProgress: (p) => log.info(p) }))
            .then(
            (l) => {
              measuring = undefined;
              view = withLatency(view, { before: l.before, after: l.after, runs: l.runs, threads: l.threads, scope: l.scope });
              log.info(`latency: ${view.benefit?.latency ?? ''}`);
              post({ type: 'init', report: view });
            },
            (err: unknown) => {
              measuring = undefined;
              const message = oneLineError(err);
              log.error(message);
              post({ type: 'measuring', running: false, error: message });
            },
          );
          break;
        }
      }
    });
    panel.onDidDispose(() => {
      measuring?.abort();
      sub.dispose();
    });
  }
}
