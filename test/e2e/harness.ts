// The machinery of the end-to-end tests: a fresh code-server with the VSIX installed, a headless
// Chromium on it, helpers that wait on VS Code's UI state, and the checks of its logs.
// Knowledge taken over from scripts/screenshots.mjs: the selectors, the command center as the way
// into the command palette while a webview has focus, the context-menu click fallback, and the
// rule that a model file may only be opened once the extension's view is registered.
import { type ChildProcess, execFile, spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import type { Browser, BrowserContext, Frame, Locator, Page } from 'playwright-core';
import { repoRoot } from '../helpers/paths';

export const E2E_ENV = {
  node: process.env.REPFUSE_E2E_NODE,
  codeServer: process.env.REPFUSE_E2E_CODE_SERVER,
  chromium: process.env.REPFUSE_E2E_CHROMIUM ?? '/usr/bin/chromium',
  vsix: process.env.REPFUSE_E2E_VSIX,
  artifacts: process.env.REPFUSE_E2E_ARTIFACTS,
  updateScreenshots: process.env.REPFUSE_E2E_UPDATE_SCREENSHOTS === '1',
};

export function log(msg: string): void {
  process.stderr.write(`[e2e] ${msg}\n`);
}

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.on('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address() as net.AddressInfo;
      s.close(() => resolve(port));
    });
  });
}

/** Polls `fn` until it returns a truthy value (for state outside the page: files, HTTP). */
export async function until<T>(what: string, fn: () => T | Promise<T>, timeoutMs: number, everyMs = 200): Promise<NonNullable<T>> {
  const t0 = Date.now();
  let last: unknown;
  for (;;) {
    try {
      const v = await fn();
      if (v) return v as NonNullable<T>;
    } catch (err) {
      last = err;
    }
    if (Date.now() - t0 > timeoutMs) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}${last ? ` (last error: ${(last as Error).message})` : ''}`);
    await new Promise((r) => setTimeout(r, everyMs));
  }
}

function run(cmd: string, args: string[], env: NodeJS.ProcessEnv, timeoutMs: number): Promise<string> {
  return new Promise((resolve, reject) => {
    execFile(cmd, args, { env, timeout: timeoutMs, maxBuffer: 16 << 20 }, (err, stdout, stderr) => {
      if (err) reject(new Error(`${path.basename(args[0] ?? cmd)} ${args.slice(1).join(' ')} failed: ${err.message}\n${stdout}\n${stderr}`));
      else resolve(`${stdout}${stderr}`);
    });
  });
}

/**
 * User settings of the fresh profile (nothing phones home, nothing pops up uninvited), shared with
 * scripts/screenshots.mjs.
 */
const SETTINGS_FILE = path.join(repoRoot, 'scripts', 'e2e', 'code-server-settings.json');

export interface ServerOptions {
  node: string;
  entry: string;
  vsix: string;
  /** Files copied into the workspace folder: [source, name]. */
  files: [string, string][];
}

/** A code-server of its own: fresh user-data, extensions and workspace folders in a temp folder. */
export class CodeServer {
  readonly base: string;
  readonly userData: string;
  readonly extensions: string;
  readonly workspace: string;
  readonly logFile: string;
  port = 0;
  installedExtension = '';
  private proc: ChildProcess | undefined;
  private exited: Promise<void> | undefined;
  private readonly onExit = () => this.killNow();
  /** Ctrl+C or a CI timeout: code-server runs in its own process group and would not see it. */
  private readonly onSignal = (sig: NodeJS.Signals) => {
    this.killNow();
    this.remove();
    process.exit(sig === 'SIGINT' ? 130 : 143);
  };

  constructor(private readonly opts: ServerOptions) {
    this.base = fs.mkdtempSync(path.join(os.tmpdir(), 'repfuse-e2e-'));
    this.userData = path.join(this.base, 'user-data');
    this.extensions = path.join(this.base, 'extensions');
    this.workspace = path.join(this.base, 'workspace');
    this.logFile = path.join(this.base, 'code-server.log');
  }

  get url(): string {
    return `http://127.0.0.1:${this.port}/?folder=${encodeURIComponent(this.workspace)}`;
  }

  private env(): NodeJS.ProcessEnv {
    // No extension gallery: nothing outside this machine is contacted.
    return { ...process.env, EXTENSIONS_GALLERY: '{}', ONNXRUNTIME_NODE_INSTALL: 'skip' };
  }

  private common(): string[] {
    return ['--user-data-dir', this.userData, '--extensions-dir', this.extensions];
  }

  /** Installs the VSIX with code-server's own --install-extension; returns the installed folder. */
  async install(): Promise<string> {
    fs.mkdirSync(path.join(this.userData, 'User'), { recursive: true });
    fs.mkdirSync(this.extensions, { recursive: true });
    fs.copyFileSync(SETTINGS_FILE, path.join(this.userData, 'User', 'settings.json'));
    const out = await run(this.opts.node, [this.opts.entry, ...this.common(), '--install-extension', this.opts.vsix], this.env(), 120_000);
    if (!/successfully installed/i.test(out)) throw new Error(`code-server --install-extension did not report success:\n${out}`);
    const dirs = fs.readdirSync(this.extensions).filter((d) => d.startsWith('repfuse.repfuse-'));
    if (dirs.length !== 1) throw new Error(`expected one installed repfuse extension in ${this.extensions}, found: ${fs.readdirSync(this.extensions).join(', ')}`);
    this.installedExtension = path.join(this.extensions, dirs[0]);
    return this.installedExtension;
  }

  async start(): Promise<void> {
    fs.mkdirSync(this.workspace, { recursive: true });
    for (const [src, name] of this.opts.files) fs.copyFileSync(src, path.join(this.workspace, name));
    const config = path.join(this.base, 'config.yaml');
    fs.writeFileSync(config, 'auth: none\n');
    this.port = await freePort();
    const out = fs.openSync(this.logFile, 'a');
    const args = [
      this.opts.entry,
      '--config', config,
      '--auth', 'none',
      '--bind-addr', `127.0.0.1:${this.port}`,
      '--disable-telemetry',
      '--disable-update-check',
      '--disable-workspace-trust',
      '--disable-getting-started-override',
      ...this.common(),
      this.workspace,
    ];
    // Its own process group, so stop() ends code-server with its extension host, file watcher,
    // pty host and RepFuse's worker and onnxruntime children in one go.
    const proc = spawn(this.opts.node, args, { cwd: this.base, stdio: ['ignore', out, out], env: this.env(), detached: true });
    fs.closeSync(out);
    this.proc = proc;
    this.exited = new Promise((resolve) => proc.once('exit', () => resolve()));
    process.once('exit', this.onExit);
    process.once('SIGINT', this.onSignal);
    process.once('SIGTERM', this.onSignal);
    await until(
      'code-server to answer /healthz',
      async () => {
        if (proc.exitCode !== null) throw new Error(`code-server exited with code ${proc.exitCode}:\n${this.serverLog().slice(-3000)}`);
        return (await fetch(`http://127.0.0.1:${this.port}/healthz`)).ok;
      },
      60_000,
    );
  }

  serverLog(): string {
    return fs.existsSync(this.logFile) ? fs.readFileSync(this.logFile, 'utf8') : '';
  }

  private killNow(): void {
    const pid = this.proc?.pid;
    if (!pid) return;
    try {
      process.kill(-pid, 'SIGKILL');
    } catch {
      // gone already
    }
  }

  /** Ends code-server and everything it started (SIGTERM, then SIGKILL after 5 s); true when the whole group is gone. */
  async stop(): Promise<boolean> {
    const proc = this.proc;
    if (!proc?.pid) return true;
    const pid = proc.pid;
    const signal = (s: NodeJS.Signals) => {
      try {
        process.kill(-pid, s);
      } catch {
        // no such group any more
      }
    };
    signal('SIGTERM');
    const timedOut = await Promise.race([this.exited!.then(() => false), new Promise<boolean>((r) => setTimeout(() => r(true), 5000))]);
    if (timedOut) log('code-server did not stop on SIGTERM within 5 s; SIGKILL');
    // Children (extension host, onnxruntime) may outlive the main process: the whole group goes.
    signal('SIGKILL');
    process.removeListener('exit', this.onExit);
    process.removeListener('SIGINT', this.onSignal);
    process.removeListener('SIGTERM', this.onSignal);
    this.proc = undefined;
    return until(
      `code-server's process group ${pid} to be gone`,
      () => {
        try {
          process.kill(-pid, 0);
          return false;
        } catch {
          return true;
        }
      },
      5000,
    ).catch(() => false);
  }

  /** Log files of the extension host(s) and of RepFuse's output channel. */
  logFiles(): { exthost: string[]; repfuse: string[]; all: string[] } {
    const all: string[] = [];
    const walk = (d: string) => {
      if (!fs.existsSync(d)) return;
      for (const e of fs.readdirSync(d, { withFileTypes: true })) {
        const p = path.join(d, e.name);
        if (e.isDirectory()) walk(p);
        else if (e.name.endsWith('.log')) all.push(p);
      }
    };
    walk(path.join(this.userData, 'logs'));
    return {
      all,
      exthost: all.filter((f) => /[/\\]exthost\d+[/\\]remoteexthost\.log$/.test(f)),
      repfuse: all.filter((f) => /[/\\]repfuse\.repfuse[/\\]RepFuse\.log$/.test(f)),
    };
  }

  /** Copies the logs (server, extension hosts, output channels) into `dir`. */
  saveLogs(dir: string): void {
    fs.mkdirSync(dir, { recursive: true });
    if (fs.existsSync(this.logFile)) fs.copyFileSync(this.logFile, path.join(dir, 'code-server.log'));
    const logs = path.join(this.userData, 'logs');
    for (const f of this.logFiles().all) {
      const rel = path.relative(logs, f).split(path.sep).slice(1).join('__'); // drop the timestamp folder
      fs.copyFileSync(f, path.join(dir, rel));
    }
  }

  remove(): void {
    fs.rmSync(this.base, { recursive: true, force: true });
  }
}

// ----- the browser ---------------------------------------------------------------------------

export interface Problems {
  console: string[];
}

export async function launchBrowser(chromiumPath: string): Promise<Browser> {
  const { chromium } = await import('playwright-core');
  return chromium.launch({
    executablePath: chromiumPath,
    headless: true,
    // --no-sandbox: root in a container; the rest keeps Chromium off the (closed) network.
    args: ['--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update', '--disable-sync', '--no-first-run', '--disable-quic', '--disable-dev-shm-usage'],
  });
}

/**
 * Records every error or warning notification VS Code shows, also ones that vanish before anyone
 * looks: a MutationObserver in the workbench page (not in the webview frames).
 */
const NOTICE_WATCH = `(() => {
  if (window.top !== window || window.__repfuseNotices) return;
  window.__repfuseNotices = [];
  const seen = new Set();
  const scan = () => {
    for (const item of document.querySelectorAll('.notification-list-item')) {
      const icon = item.querySelector('.notification-list-item-icon');
      const sev = icon?.classList.contains('codicon-error') ? 'error' : icon?.classList.contains('codicon-warning') ? 'warning' : '';
      if (!sev) continue;
      const text = (item.querySelector('.notification-list-item-message')?.textContent ?? '').trim();
      const source = (item.querySelector('.notification-list-item-source')?.textContent ?? '').trim();
      const key = sev + '|' + text;
      if (!text || seen.has(key)) continue;
      seen.add(key);
      window.__repfuseNotices.push({ severity: sev, text, source });
    }
  };
  const start = () => new MutationObserver(scan).observe(document.body, { subtree: true, childList: true, attributes: true, attributeFilter: ['class'] });
  if (document.body) start(); else document.addEventListener('DOMContentLoaded', start);
})();`;

export interface Notice {
  severity: 'error' | 'warning';
  text: string;
  source: string;
}

export async function newPage(browser: Browser, problems: Problems): Promise<{ context: BrowserContext; page: Page }> {
  const context = await browser.newContext({ viewport: { width: 1440, height: 900 }, deviceScaleFactor: 1 });
  await context.addInitScript(NOTICE_WATCH);
  const page = await context.newPage();
  page.setDefaultTimeout(30_000);
  page.on('console', (m) => {
    const text = m.text();
    if (m.type() === 'error' || /Content Security Policy|Refused to/.test(text)) problems.console.push(`${m.type()}: ${text}${m.location()?.url ? ` (${m.location().url})` : ''}`);
  });
  page.on('pageerror', (e) => problems.console.push(`pageerror: ${e.message}`));
  return { context, page };
}

export async function notices(page: Page): Promise<Notice[]> {
  return page.evaluate('window.__repfuseNotices ?? []') as Promise<Notice[]>;
}

/** The webview frame whose page shows `selector` (with `hasText`): webviews are nested iframes. */
export async function webviewFrame(page: Page, selector: string, hasText?: string | RegExp, timeoutMs = 60_000): Promise<Frame> {
  return until(
    `a webview showing ${selector}${hasText ? ` with ${hasText}` : ''}`,
    async () => {
      for (const f of page.frames()) {
        if (f === page.mainFrame() || f.isDetached()) continue;
        const loc = f.locator(selector);
        if ((await (hasText ? loc.filter({ hasText }) : loc).count().catch(() => 0)) > 0) return f;
      }
      return null;
    },
    timeoutMs,
    250,
  );
}

/** A row of the Explorer's file tree. */
export function explorerRow(page: Page, name: string): Locator {
  return page.locator('.explorer-folders-view .monaco-list-row', { has: page.locator('.label-name', { hasText: new RegExp(`^${escapeRe(name)}$`) }) });
}

/** The pane (view) in the side bar whose header says `title`. */
export function pane(page: Page, title: string): { header: Locator; body: Locator } {
  const p = page.locator('.pane', { has: page.locator('.pane-header', { hasText: title }) });
  return { header: p.locator('.pane-header').first(), body: p.locator('.pane-body') };
}

export async function expandPane(page: Page, title: string): Promise<Locator> {
  const { header, body } = pane(page, title);
  await header.waitFor();
  if ((await header.getAttribute('aria-expanded')) !== 'true') await header.click();
  await page.waitForFunction((el) => el?.getAttribute('aria-expanded') === 'true', await header.elementHandle());
  return body;
}

export function escapeRe(s: string): string {
  return s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
}

/** Picks `name` from the context menu that is open; a click that misses (the pointer had not entered the menu yet) is retried by keyboard. */
export async function clickMenuItem(page: Page, name: string | RegExp): Promise<void> {
  const item = page.getByRole('menuitem', { name, exact: typeof name === 'string' });
  await item.waitFor();
  await item.hover();
  await item.click();
  const closed = await item.waitFor({ state: 'detached', timeout: 2000 }).then(
    () => true,
    () => false,
  );
  if (!closed && (await item.isVisible().catch(() => false))) {
    await item.focus();
    await page.keyboard.press('Enter');
    await item.waitFor({ state: 'detached', timeout: 5000 });
  }
}

/** Runs a command by its title from the command center (F1 would go to a focused webview). */
export async function runCommand(page: Page, title: string): Promise<void> {
  await page.locator('.command-center-center').click();
  const input = page.locator('.quick-input-widget input');
  await input.waitFor({ state: 'visible' });
  await input.fill(`>${title}`);
  const row = page.locator('.quick-input-list .monaco-list-row', { hasText: title }).first();
  await row.waitFor({ timeout: 10_000 });
  await row.click();
  await page.locator('.quick-input-widget').waitFor({ state: 'hidden', timeout: 10_000 });
}

/** Text of each cell of a table row, trimmed. */
export async function cells(row: Locator): Promise<string[]> {
  return (await row.locator('td').allTextContents()).map((s) => s.replace(/\s+/g, ' ').trim());
}

export function numberCell(text: string, what: string): number {
  const v = Number(text.replace(/−/g, '-'));
  if (!Number.isFinite(v)) throw new Error(`${what}: "${text}" is not a number`);
  return v;
}
