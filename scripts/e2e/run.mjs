// `npm run test:e2e`: everything the end-to-end tests need, then the tests, under node:test.
//   1. setup.mjs: Debian chromium + libkrb5-dev, Node 24, code-server 4.139.1 (cached in .cache/);
//   2. the linux-x64 VSIX: .artifacts/vsix/repfuse-linux-x64-<version>.vsix, packaged again when
//      anything that goes into it is newer (or REPFUSE_E2E_VSIX names one to use as it is);
//   3. tsc of the e2e suite and the VSIX check (test/e2e/tsconfig.json) into out/;
//   4. node --test out/test/vsix.test.js out/test/e2e/vscode.test.js: the VSIX check (every VSIX
//      present; REPFUSE_REQUIRE_VSIX=1, as .ci/run sets it, makes all four targets required),
//      then the browser session. Its summary is the last thing printed.
//
//   node scripts/e2e/run.mjs [--update-screenshots]
//     --update-screenshots   copy the README's screenshots from this run into media/screenshots/
//
// Timings of each phase go to stderr (before the tests) and to .artifacts/e2e-timings.json.
import { execFileSync, spawn, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { root, setup } from './setup.mjs';

const args = process.argv.slice(2);
for (const a of args) if (a !== '--update-screenshots') fail(`unknown argument ${a} (only --update-screenshots)`);
const updateScreenshots = args.includes('--update-screenshots');

function log(msg) {
  process.stderr.write(`[e2e] ${msg}\n`);
}

function fail(msg) {
  log(`error: ${msg}`);
  process.exit(1);
}

const t0 = Date.now();
const timings = {};
const since = (t) => Math.round((Date.now() - t) / 100) / 10;

// 1. Tools.
let tools;
try {
  tools = setup();
} catch (err) {
  fail(err.message);
}
timings.setup = tools.timings;

// 2. The VSIX under test.
function newestMtime(p) {
  if (!fs.existsSync(p)) return 0;
  const st = fs.statSync(p);
  if (!st.isDirectory()) return st.mtimeMs;
  let m = 0;
  for (const e of fs.readdirSync(p)) m = Math.max(m, newestMtime(path.join(p, e)));
  return m;
}
const { name, version } = JSON.parse(fs.readFileSync(path.join(root, 'package.json'), 'utf8'));
let vsix = process.env.REPFUSE_E2E_VSIX ? path.resolve(process.env.REPFUSE_E2E_VSIX) : path.join(root, '.artifacts', 'vsix', `${name}-linux-x64-${version}.vsix`);
if (!process.env.REPFUSE_E2E_VSIX) {
  const inputs = ['src', 'webview', 'media', 'package.json', 'package-lock.json', 'README.md', 'CHANGELOG.md', 'LICENSE', '.vscodeignore', 'scripts/build.mjs', 'scripts/package.mjs'];
  const newest = Math.max(...inputs.map((p) => newestMtime(path.join(root, p))));
  const have = fs.existsSync(vsix) ? fs.statSync(vsix).mtimeMs : 0;
  if (have > newest) {
    log(`using ${path.relative(root, vsix)} (newer than its sources)`);
    timings.package = 0;
  } else {
    log(`packaging ${path.relative(root, vsix)} (${have ? 'sources changed since' : 'missing'})…`);
    const t = Date.now();
    execFileSync(process.execPath, [path.join(root, 'scripts', 'package.mjs'), '--target', 'linux-x64'], { cwd: root, stdio: ['ignore', 'ignore', 'inherit'] });
    timings.package = since(t);
    log(`packaged in ${timings.package} s`);
  }
}
if (!fs.existsSync(vsix)) fail(`no VSIX at ${vsix}`);

// 3. Compile the suite.
{
  const t = Date.now();
  const tsc = path.join(root, 'node_modules', 'typescript', 'bin', 'tsc');
  const r = spawnSync(process.execPath, [tsc, '-p', path.join(root, 'test', 'e2e', 'tsconfig.json')], { cwd: root, stdio: 'inherit' });
  if (r.status !== 0) fail('tsc failed on the e2e suite');
  timings.compile = since(t);
}

// 4. The tests. Their node:test summary (with its duration_ms) is the last thing printed, so the
// timings of the phases before it are printed now, and the whole lot goes to a file afterwards.
log(`before the tests (s): setup ${tools.timings.total} · package ${timings.package ?? 0} · compile ${timings.compile} · elapsed ${since(t0)}`);
const artifacts = path.join(root, '.artifacts', 'e2e');
const t4 = Date.now();
const child = spawn(
  process.execPath,
  ['--test', '--test-reporter=spec', '--test-concurrency=1', path.join('out', 'test', 'vsix.test.js'), path.join('out', 'test', 'e2e', 'vscode.test.js')],
  {
    cwd: root,
    stdio: 'inherit',
    env: {
      ...process.env,
      REPFUSE_E2E_NODE: tools.node24,
      REPFUSE_E2E_CODE_SERVER: tools.codeServer,
      REPFUSE_E2E_CHROMIUM: tools.chromium,
      REPFUSE_E2E_VSIX: vsix,
      REPFUSE_E2E_ARTIFACTS: artifacts,
      REPFUSE_E2E_UPDATE_SCREENSHOTS: updateScreenshots ? '1' : '0',
    },
  },
);
// Passed on to the test runner, which passes them to the test file's process, whose handler stops
// code-server (it runs in its own process group, out of reach of a terminal's Ctrl+C).
for (const sig of ['SIGINT', 'SIGTERM']) process.on(sig, () => child.kill(sig));
const r = await new Promise((resolve) => child.on('exit', (status, signal) => resolve({ status: status ?? (signal ? 1 : 0) })));
timings.tests = since(t4);
timings.total = since(t0);
fs.mkdirSync(path.join(root, '.artifacts'), { recursive: true });
fs.writeFileSync(path.join(root, '.artifacts', 'e2e-timings.json'), `${JSON.stringify(timings, null, 2)}\n`);
process.exit(r.status ?? 1);
