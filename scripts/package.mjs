// Builds one VSIX per platform with @vscode/vsce: each carries the esbuild bundles (dist/), media,
// the manifest and docs, and onnxruntime-node with only its own platform's native binaries.
//
//   node scripts/package.mjs [--target linux-x64]... [--out .artifacts/vsix] [--no-build]
//
// Why a staging folder per target: vsce packs a folder's files plus the production dependencies
// that `npm ls` reports. Packing the checkout itself would ship every platform's onnxruntime
// binaries (~340 MB) and needs the checkout's whole dependency tree to satisfy `npm ls`
// (onnxruntime-node's install-time dependencies adm-zip and global-agent included). So each target
// gets .cache/vsix-stage/<target>/ holding exactly what the VSIX needs:
//   package.json   the manifest without scripts (no vscode:prepublish or prepare runs inside vsce),
//                  devDependencies and `files`; dependencies = { onnxruntime-node } only, because
//                  everything else is bundled into dist/ by esbuild
//   dist/          cli.js, validate-worker.js, extension.js, model-worker.js, pyval.py, webview/ (no maps:
//                  they embed the sources)
//   media/         icons and CSS (not media/screenshots/)
//   README.md, CHANGELOG.md, LICENSE, .vscodeignore (the allow-list; a second fence)
//   node_modules/onnxruntime-node/   package.json (dependencies cut to onnxruntime-common, no
//                  install script), dist/*.js, bin/napi-v6/<os>/<arch>/ of this target only
//   node_modules/onnxruntime-common/ package.json, dist/cjs/
// and vsce runs there with dependency detection on, so `npm ls` sees a consistent tree and the two
// packages land in extension/node_modules/, where require('onnxruntime-node') from
// extension/dist/validate-worker.js finds them.
//
// onnxruntime-node 1.30 ships binaries for linux-x64, linux-arm64, win32-x64, win32-arm64 and
// darwin-arm64 — none for darwin-x64 (Intel Macs), so there is no darwin-x64 VSIX.
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');

/**
 * Per target: the onnxruntime-node binary folder, the files that must be there (the binding and the
 * shared library it links: readelf/otool/objdump of onnxruntime_binding.node), and files left out.
 */
export const TARGETS = {
  'linux-x64': { dir: 'linux/x64', required: ['onnxruntime_binding.node', 'libonnxruntime.so.1'] },
  'linux-arm64': { dir: 'linux/arm64', required: ['onnxruntime_binding.node', 'libonnxruntime.so.1'] },
  // DirectML.dll, dxcompiler.dll and dxil.dll are delay-loaded by onnxruntime.dll for the DirectML
  // execution provider. RepFuse asks for the CPU provider only, but they are kept: they are part of
  // ORT's own win32 set and nothing here can test a Windows load without them.
  'win32-x64': { dir: 'win32/x64', required: ['onnxruntime_binding.node', 'onnxruntime.dll'] },
  // npm has no symlinks: libonnxruntime.1.30.0.dylib is a byte-identical copy of
  // libonnxruntime.1.dylib, which is the name the binding links (@rpath/libonnxruntime.1.dylib) and
  // the library's own install name. The copy is left out (44 MB).
  'darwin-arm64': { dir: 'darwin/arm64', required: ['onnxruntime_binding.node', 'libonnxruntime.1.dylib'], dropIdentical: { 'libonnxruntime.1.dylib': /^libonnxruntime\.\d+\.\d+\.\d+\.dylib$/ } },
};

const DIST_FILES = ['cli.js', 'validate-worker.js', 'extension.js', 'model-worker.js', 'pyval.py'];

function log(msg) {
  process.stderr.write(`[package] ${msg}\n`);
}

function fail(msg) {
  log(`error: ${msg}`);
  process.exit(1);
}

function parseArgs(argv) {
  const opts = { targets: [], out: path.join(root, '.artifacts', 'vsix'), build: true };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === '--target' || a === '-t') opts.targets.push(argv[++i]);
    else if (a === '--out') opts.out = path.resolve(argv[++i]);
    else if (a === '--no-build') opts.build = false;
    else fail(`unknown argument ${a} (use --target <t>, --out <dir>, --no-build)`);
  }
  if (!opts.targets.length) opts.targets = Object.keys(TARGETS);
  for (const t of opts.targets) if (!TARGETS[t]) fail(`unknown target ${t}; one of ${Object.keys(TARGETS).join(', ')} (onnxruntime-node ships no darwin-x64 binary)`);
  return opts;
}

/** A hard link where possible (same file system, no copy of 45 MB), else a copy. */
function place(src, dst) {
  fs.mkdirSync(path.dirname(dst), { recursive: true });
  try {
    fs.linkSync(src, dst);
  } catch {
    fs.copyFileSync(src, dst);
  }
}

function writeJson(file, value) {
  fs.mkdirSync(path.dirname(file), { recursive: true });
  fs.writeFileSync(file, `${JSON.stringify(value, null, 2)}\n`);
}

function readJson(file) {
  return JSON.parse(fs.readFileSync(file, 'utf8'));
}

function filesIn(dir, keep) {
  return fs.existsSync(dir) ? fs.readdirSync(dir, { withFileTypes: true }).filter((e) => e.isFile() && keep(e.name)).map((e) => e.name) : [];
}

function stage(target, stageDir) {
  const spec = TARGETS[target];
  fs.rmSync(stageDir, { recursive: true, force: true });
  fs.mkdirSync(stageDir, { recursive: true });

  const pkg = readJson(path.join(root, 'package.json'));
  const ortDir = path.join(root, 'node_modules', 'onnxruntime-node');
  const commonDir = path.join(root, 'node_modules', 'onnxruntime-common');
  const ortPkg = readJson(path.join(ortDir, 'package.json'));
  const commonPkg = readJson(path.join(commonDir, 'package.json'));

  // The manifest: what VS Code reads. No scripts: vsce would run vscode:prepublish, and npm would
  // run prepare/postinstall if anyone installed the staged folder.
  const manifest = { ...pkg };
  delete manifest.scripts;
  delete manifest.devDependencies;
  delete manifest.files;
  manifest.dependencies = { 'onnxruntime-node': ortPkg.version };
  writeJson(path.join(stageDir, 'package.json'), manifest);
  for (const f of ['README.md', 'CHANGELOG.md', 'LICENSE', '.vscodeignore']) place(path.join(root, f), path.join(stageDir, f));

  for (const f of DIST_FILES) {
    const src = path.join(root, 'dist', f);
    if (!fs.existsSync(src)) fail(`dist/${f} is missing; the build did not produce it.`);
    place(src, path.join(stageDir, 'dist', f));
  }
  const webview = filesIn(path.join(root, 'dist', 'webview'), (n) => /\.(js|css|ttf)$/.test(n));
  if (!webview.some((n) => n.endsWith('.js'))) fail('dist/webview/ has no bundles; the build did not produce them.');
  for (const f of webview) place(path.join(root, 'dist', 'webview', f), path.join(stageDir, 'dist', 'webview', f));
  for (const f of filesIn(path.join(root, 'media'), (n) => /\.(png|svg|css)$/.test(n))) place(path.join(root, 'media', f), path.join(stageDir, 'media', f));

  // onnxruntime-node: its runtime JS and this target's binaries. Its dependencies adm-zip and
  // global-agent serve only its install script (which fetches optional CUDA files), so the staged
  // package.json depends on onnxruntime-common alone and has no install script.
  const ortStage = path.join(stageDir, 'node_modules', 'onnxruntime-node');
  const ortManifest = { ...ortPkg, dependencies: { 'onnxruntime-common': ortPkg.dependencies['onnxruntime-common'] } };
  delete ortManifest.scripts;
  delete ortManifest.devDependencies;
  writeJson(path.join(ortStage, 'package.json'), ortManifest);
  for (const f of filesIn(path.join(ortDir, 'dist'), (n) => n.endsWith('.js'))) place(path.join(ortDir, 'dist', f), path.join(ortStage, 'dist', f));
  const binDir = path.join(ortDir, 'bin', 'napi-v6', spec.dir);
  const binaries = filesIn(binDir, () => true);
  for (const r of spec.required) if (!binaries.includes(r)) fail(`onnxruntime-node ${ortPkg.version} has no ${spec.dir}/${r}; cannot package ${target}.`);
  const dropped = [];
  for (const f of binaries) {
    const [keep, pattern] = Object.entries(spec.dropIdentical ?? {}).find(([, re]) => re.test(f)) ?? [];
    if (keep && fs.readFileSync(path.join(binDir, f)).equals(fs.readFileSync(path.join(binDir, keep)))) {
      dropped.push(`${f} (= ${keep}; ${pattern})`);
      continue;
    }
    place(path.join(binDir, f), path.join(ortStage, 'bin', 'napi-v6', spec.dir, f));
  }

  const commonStage = path.join(stageDir, 'node_modules', 'onnxruntime-common');
  const commonManifest = { ...commonPkg };
  delete commonManifest.scripts;
  delete commonManifest.devDependencies;
  writeJson(path.join(commonStage, 'package.json'), commonManifest);
  const cjs = path.join(commonDir, 'dist', 'cjs');
  for (const f of filesIn(cjs, (n) => n.endsWith('.js') || n === 'package.json')) place(path.join(cjs, f), path.join(commonStage, 'dist', 'cjs', f));
  return { dropped };
}

function vsce(stageDir, target, outFile) {
  const bin = path.join(root, 'node_modules', '@vscode', 'vsce', 'vsce');
  if (!fs.existsSync(bin)) fail('@vscode/vsce is not installed; run npm ci.');
  // --allow-missing-repository: the manifest names no repository (vsce would ask interactively).
  // --no-rewrite-relative-links: without a repository vsce cannot make README links absolute; the
  // README's screenshot (media/screenshots/) is not shipped, so it does not show inside VS Code.
  const args = [bin, 'package', '--target', target, '--out', outFile, '--allow-missing-repository', '--no-rewrite-relative-links', '--dependencies', '--no-yarn'];
  execFileSync(process.execPath, args, {
    cwd: stageDir,
    stdio: ['ignore', 'inherit', 'inherit'],
    env: { ...process.env, npm_config_update_notifier: 'false', npm_config_fund: 'false', npm_config_audit: 'false' },
  });
}

function mib(bytes) {
  return `${(bytes / 1048576).toFixed(1)} MiB`;
}

function main() {
  const opts = parseArgs(process.argv.slice(2));
  const t0 = Date.now();
  if (opts.build) {
    log('bundling with esbuild (scripts/build.mjs)…');
    execFileSync(process.execPath, [path.join(root, 'scripts', 'build.mjs')], { cwd: root, stdio: 'inherit' });
  }
  const { name, version } = readJson(path.join(root, 'package.json'));
  fs.mkdirSync(opts.out, { recursive: true });
  const made = [];
  for (const target of opts.targets) {
    const t1 = Date.now();
    const stageDir = path.join(root, '.cache', 'vsix-stage', target);
    const { dropped } = stage(target, stageDir);
    for (const d of dropped) log(`${target}: left out ${d}`);
    const file = path.join(opts.out, `${name}-${target}-${version}.vsix`);
    // Written in a temporary folder and renamed: a reader never sees half a VSIX.
    const tmpDir = path.join(opts.out, `.tmp-${process.pid}`);
    const tmp = path.join(tmpDir, path.basename(file));
    fs.mkdirSync(tmpDir, { recursive: true });
    log(`${target}: vsce package…`);
    try {
      vsce(stageDir, target, tmp);
      fs.renameSync(tmp, file);
    } finally {
      fs.rmSync(tmpDir, { recursive: true, force: true });
      fs.rmSync(stageDir, { recursive: true, force: true });
    }
    // Older versions' VSIX files for this target would only confuse whoever picks one up.
    for (const f of fs.readdirSync(opts.out)) if (f.startsWith(`${name}-${target}-`) && f.endsWith('.vsix') && f !== path.basename(file)) fs.rmSync(path.join(opts.out, f));
    made.push({ target, file, size: fs.statSync(file).size, seconds: (Date.now() - t1) / 1000 });
  }
  fs.rmSync(path.join(root, '.cache', 'vsix-stage'), { recursive: true, force: true });
  const w = Math.max(...made.map((m) => path.relative(root, m.file).length));
  console.log(`\n${'VSIX'.padEnd(w)}  ${'size'.padStart(10)}  time`);
  for (const m of made) console.log(`${path.relative(root, m.file).padEnd(w)}  ${mib(m.size).padStart(10)}  ${m.seconds.toFixed(1)} s`);
  console.log(`${made.length} VSIX file(s) in ${((Date.now() - t0) / 1000).toFixed(1)} s (no darwin-x64: onnxruntime-node ships no binary for it)`);
}

if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) main();
