// The one place webview HTML is built: strict CSP (default-src 'none', scripts by nonce),
// every asset through asWebviewUri, local resources limited to dist/webview and media.
import { randomBytes } from 'node:crypto';
import * as vscode from 'vscode';

/** Options for every RepFuse webview: scripts on, resources only from the built webview and media. */
export function webviewOptions(extensionUri: vscode.Uri): vscode.WebviewOptions & vscode.WebviewPanelOptions {
  return {
    enableScripts: true,
    localResourceRoots: [vscode.Uri.joinPath(extensionUri, 'dist', 'webview'), vscode.Uri.joinPath(extensionUri, 'media')],
  };
}

/**
 * The page for one webview: `script` is the bundle name in dist/webview (`branchStats` →
 * dist/webview/branchStats.js). User data never goes in here: it arrives by postMessage.
 */
export function webviewHtml(webview: vscode.Webview, extensionUri: vscode.Uri, script: string, title: string): string {
  const nonce = randomBytes(16).toString('base64');
  const asset = (...p: string[]) => webview.asWebviewUri(vscode.Uri.joinPath(extensionUri, ...p)).toString();
  const csp = [
    "default-src 'none'",
    `img-src ${webview.cspSource} data:`,
    `font-src ${webview.cspSource}`,
    `style-src ${webview.cspSource} 'nonce-${nonce}'`,
    `script-src 'nonce-${nonce}'`,
  ].join('; ');
  return `<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="UTF-8">
<meta http-equiv="Content-Security-Policy" content="${csp}">
<meta name="viewport" content="width=device-width, initial-scale=1.0">
<link rel="stylesheet" href="${asset('dist', 'webview', 'codicon.css')}" id="vscode-codicon-stylesheet">
<link rel="stylesheet" href="${asset('media', 'webview.css')}">
<title>${escapeHtml(title)}</title>
</head>
<body>
<div id="app" role="main"></div>
<script nonce="${nonce}">window.litNonce = ${JSON.stringify(nonce)};</script>
<script nonce="${nonce}" src="${asset('dist', 'webview', `${script}.js`)}"></script>
</body>
</html>`;
}

export function escapeHtml(s: string): string {
  return s.replace(/[&<>"']/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' })[c]!);
}
