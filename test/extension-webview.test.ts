// The webview HTML helper under the `vscode` stub: strict CSP with a fresh nonce, every asset
// through asWebviewUri, resources limited to dist/webview and media.
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { createStub, installStub, type Stub } from './extension-stub';

let stub: Stub;
let uninstall: () => void;
let mod: typeof import('../src/extension/webviewHtml');

before(() => {
  stub = createStub();
  uninstall = installStub(stub);
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  mod = require('../src/extension/webviewHtml');
});
after(() => uninstall());

function webview() {
  return {
    cspSource: 'https://webview.test',
    asWebviewUri: (u: { path: string }) => ({ toString: () => `https://webview.test${u.path}` }),
  };
}

test('CSP: default-src none, scripts only by nonce, styles and fonts from the webview source', () => {
  const { Uri } = stub.module as { Uri: { file(p: string): unknown } };
  const ext = Uri.file('/ext');
  const html = mod.webviewHtml(webview() as never, ext as never, 'branchStats', 'Branch <statistics>');
  const csp = /http-equiv="Content-Security-Policy" content="([^"]+)"/.exec(html)![1];
  const directives = Object.fromEntries(csp.split(';').map((d) => d.trim().split(/\s+/)).map(([k, ...v]) => [k, v]));
  assert.deepEqual(directives['default-src'], ["'none'"]);
  const nonce = /'nonce-([^']+)'/.exec(directives['script-src'].join(' '))![1];
  assert.deepEqual(directives['script-src'], [`'nonce-${nonce}'`]);
  assert.ok(directives['style-src'].includes('https://webview.test'));
  assert.deepEqual(directives['font-src'], ['https://webview.test']);
  assert.doesNotMatch(csp, /unsafe-inline|unsafe-eval/);
  // Every script carries the nonce; the bundle comes from dist/webview.
  const scripts = [...html.matchAll(/<script([^>]*)>/g)].map((m) => m[1]);
  assert.equal(scripts.length, 2);
  for (const s of scripts) assert.match(s, new RegExp(`nonce="${nonce.replace(/[+/=]/g, '\\$&')}"`));
  assert.match(html, /src="https:\/\/webview\.test\/ext\/dist\/webview\/branchStats\.js"/);
  assert.match(html, /id="vscode-codicon-stylesheet"/);
  // The title is escaped; no user data is interpolated anywhere else.
  assert.match(html, /<title>Branch &lt;statistics&gt;<\/title>/);
  // A new nonce each time.
  const again = mod.webviewHtml(webview() as never, ext as never, 'branchStats', 'x');
  assert.ok(!again.includes(nonce));
});

test('local resources: only dist/webview and media, scripts enabled', () => {
  const { Uri } = stub.module as { Uri: { file(p: string): unknown } };
  const o = mod.webviewOptions(Uri.file('/ext') as never);
  assert.equal(o.enableScripts, true);
  assert.deepEqual(
    o.localResourceRoots!.map((u) => (u as unknown as { path: string }).path),
    ['/ext/dist/webview', '/ext/media'],
  );
});
