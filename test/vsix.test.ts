// The platform VSIX files that `npm run package` writes to .artifacts/vsix/: each one holds its own
// platform's onnxruntime binaries (of the right CPU architecture) and no other platform's, the
// bundle's entry points, a node_modules/ that require('onnxruntime-node') resolves in, and nothing
// from src/, tests, fixtures or bench; the linux-x64 one, unzipped, fuses and validates a model
// with nothing but its own files.
//
// Part of `npm test` without needing a package step: with no VSIX files it skips (say
// `npm run package` to make them). `npm run test:e2e` and .ci/run package first and set
// REPFUSE_REQUIRE_VSIX=1, which turns a missing VSIX into a failure.
import * as assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import * as fs from 'node:fs';
import { createRequire } from 'node:module';
import * as path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { FileSource } from '../src/core/bytes';
import { ZipArchive, type ZipEntry } from '../src/core/torch/zip';
import { makeTmp, repoRoot, rmTmp } from './helpers/paths';

const VSIX_DIR = process.env.REPFUSE_VSIX_DIR ? path.resolve(process.env.REPFUSE_VSIX_DIR) : path.join(repoRoot, '.artifacts', 'vsix');
const REQUIRED = process.env.REPFUSE_REQUIRE_VSIX === '1';

/** What each target must carry: its onnxruntime-node binary folder, the shared library the binding links, the binary format. */
const TARGETS = {
  'linux-x64': { dir: 'linux/x64', lib: 'libonnxruntime.so.1', format: 'elf', machine: 0x3e /* EM_X86_64 */ },
  'linux-arm64': { dir: 'linux/arm64', lib: 'libonnxruntime.so.1', format: 'elf', machine: 0xb7 /* EM_AARCH64 */ },
  'win32-x64': { dir: 'win32/x64', lib: 'onnxruntime.dll', format: 'pe', machine: 0x8664 /* IMAGE_FILE_MACHINE_AMD64 */ },
  'darwin-arm64': { dir: 'darwin/arm64', lib: 'libonnxruntime.1.dylib', format: 'macho', machine: 0x0100000c /* CPU_TYPE_ARM64 */ },
} as const;
type Target = keyof typeof TARGETS;

const BIN_ROOT = 'extension/node_modules/onnxruntime-node/bin/napi-v6/';
/** The whole VSIX, apart from the two files vsce adds at its root, lives under extension/. */
const ALLOWED = [
  /^\[Content_Types\]\.xml$/,
  /^extension\.vsixmanifest$/,
  /^extension\/(package\.json|readme\.md|changelog\.md|LICENSE\.txt)$/,
  /^extension\/dist\/(cli|validate-worker|extension|model-worker)\.js$/,
  // The opt-in whole-model check runs this with the user's own Python (src/validate/python.ts).
  /^extension\/dist\/pyval\.py$/,
  /^extension\/dist\/webview\/[^/]+\.(js|css|ttf)$/,
  /^extension\/media\/[^/]+\.(png|svg|css)$/,
  /^extension\/node_modules\/onnxruntime-node\/(package\.json|dist\/[^/]+\.js|bin\/napi-v6\/[^/]+\/[^/]+\/[^/]+)$/,
  /^extension\/node_modules\/onnxruntime-common\/(package\.json|dist\/cjs\/[^/]+\.js|dist\/cjs\/package\.json)$/,
];
/** Never in a VSIX, whatever the allow-list above says (belt and braces). */
const FORBIDDEN = /(^|\/)(src|test|tests|fixtures|bench|examples|scripts|out|\.cache|\.artifacts|\.git|screenshots)\/|\.(ts|map|onnx|pt|pth|npy|safetensors|py)$/;

interface Vsix {
  target: Target;
  file: string;
  zip: ZipArchive;
  names: Set<string>;
}

const opened: Vsix[] = [];
after(() => {
  for (const v of opened) v.zip.source.close();
});

const PKG = JSON.parse(fs.readFileSync(path.join(repoRoot, 'package.json'), 'utf8')) as { name: string; version: string };

/** The VSIX of this version for `target`, as scripts/package.mjs names it. */
function findVsix(target: Target): string | undefined {
  const f = path.join(VSIX_DIR, `${PKG.name}-${target}-${PKG.version}.vsix`);
  return fs.existsSync(f) ? f : undefined;
}

function open(target: Target, file: string): Vsix {
  const zip = ZipArchive.open(new FileSource(file));
  const v = { target, file, zip, names: new Set(zip.entries.map((e) => e.name)) };
  opened.push(v);
  return v;
}

function entry(v: Vsix, name: string): ZipEntry {
  const e = v.zip.get(name);
  assert.ok(e, `${path.basename(v.file)} has ${name}`);
  return e;
}

function readText(v: Vsix, name: string): string {
  return Buffer.from(v.zip.read(entry(v, name))).toString('utf8');
}

/** Checks a native binary's format and CPU type from its header. */
function assertBinary(bytes: Uint8Array, spec: (typeof TARGETS)[Target], what: string): void {
  const b = Buffer.from(bytes.buffer, bytes.byteOffset, bytes.length);
  if (spec.format === 'elf') {
    assert.equal(b.readUInt32BE(0), 0x7f454c46, `${what} is an ELF file`);
    assert.equal(b[4], 2, `${what} is 64-bit`);
    assert.equal(b.readUInt16LE(18), spec.machine, `${what}: e_machine 0x${b.readUInt16LE(18).toString(16)}`);
  } else if (spec.format === 'pe') {
    assert.equal(b.toString('latin1', 0, 2), 'MZ', `${what} is a PE file`);
    const pe = b.readUInt32LE(0x3c);
    assert.equal(b.toString('latin1', pe, pe + 4), 'PE\0\0', `${what} has a PE header`);
    assert.equal(b.readUInt16LE(pe + 4), spec.machine, `${what}: machine 0x${b.readUInt16LE(pe + 4).toString(16)}`);
  } else {
    assert.equal(b.readUInt32LE(0), 0xfeedfacf, `${what} is a 64-bit Mach-O file`);
    assert.equal(b.readUInt32LE(4), spec.machine, `${what}: cputype 0x${b.readUInt32LE(4).toString(16)}`);
  }
}

/** Node's resolution of require(id) from `fromFile`, done on the VSIX's file list (package.json main/exports). */
function resolveInVsix(v: Vsix, fromFile: string, id: string): string {
  for (let dir = path.posix.dirname(fromFile); dir !== '.' && dir !== ''; dir = path.posix.dirname(dir)) {
    const pkgFile = `${dir}/node_modules/${id}/package.json`;
    if (!v.names.has(pkgFile)) continue;
    const pkg = JSON.parse(readText(v, pkgFile)) as { main?: string; exports?: { require?: string } };
    const main = pkg.exports?.require ?? pkg.main ?? 'index.js';
    const target = path.posix.normalize(`${dir}/node_modules/${id}/${main}`);
    assert.ok(v.names.has(target), `${id} resolves to ${target}, which is in the VSIX`);
    return target;
  }
  assert.fail(`require('${id}') from ${fromFile} does not resolve inside the VSIX`);
}

const present = (Object.keys(TARGETS) as Target[]).map((t) => ({ target: t, file: findVsix(t) }));
const none = present.every((p) => !p.file);

describe('VSIX packages', { skip: none && !REQUIRED ? `no VSIX files in ${path.relative(repoRoot, VSIX_DIR)}/ (npm run package makes them)` : false }, () => {
  for (const { target, file } of present) {
    const spec = TARGETS[target];
    describe(target, { skip: !file && !REQUIRED ? `no ${target} VSIX` : false }, () => {
      let v: Vsix;
      before(() => {
        assert.ok(file, `no ${target} VSIX in ${VSIX_DIR}; run npm run package`);
        v = open(target, file);
      });

      it('is a zip for its target platform; its size', (t) => {
        const size = fs.statSync(v.file).size;
        const unpacked = v.zip.entries.reduce((s, e) => s + e.size, 0);
        t.diagnostic(`${path.basename(v.file)}: ${(size / 1048576).toFixed(1)} MiB (${v.zip.entries.length} files, ${(unpacked / 1048576).toFixed(1)} MiB unpacked)`);
        assert.match(readText(v, 'extension.vsixmanifest'), new RegExp(`TargetPlatform="${target}"`));
        // Loose ceiling: one platform's onnxruntime is 10–30 MiB packed; two would blow it.
        assert.ok(size < 40 * 1048576, `${(size / 1048576).toFixed(1)} MiB is more than one platform's worth`);
      });

      it("carries its own platform's onnxruntime binding and shared library, of the right CPU type", () => {
        for (const f of ['onnxruntime_binding.node', spec.lib]) {
          const name = `${BIN_ROOT}${spec.dir}/${f}`;
          const e = entry(v, name);
          assert.ok(e.size > 100_000, `${name} is ${e.size} bytes`);
          assertBinary(v.zip.read(e, 256 << 20).subarray(0, 4096), spec, name);
        }
      });

      it("carries no other platform's binaries", () => {
        const bins = [...v.names].filter((n) => n.startsWith(BIN_ROOT));
        const foreign = bins.filter((n) => !n.startsWith(`${BIN_ROOT}${spec.dir}/`));
        assert.deepEqual(foreign, [], `other platforms' files in the ${target} VSIX`);
        for (const [other, o] of Object.entries(TARGETS)) {
          if (o.dir !== spec.dir) assert.ok(!bins.some((n) => n.startsWith(`${BIN_ROOT}${o.dir}/`)), `no ${other} binaries`);
        }
      });

      it('has the bundle entry point from package.json main, the workers and the webviews', () => {
        const pkg = JSON.parse(readText(v, 'extension/package.json')) as { main: string; scripts?: unknown; devDependencies?: unknown; dependencies?: Record<string, string> };
        const main = path.posix.normalize(`extension/${pkg.main}`);
        assert.equal(main, 'extension/dist/extension.js');
        for (const f of [main, 'extension/dist/cli.js', 'extension/dist/validate-worker.js', 'extension/dist/model-worker.js', 'extension/dist/pyval.py', 'extension/dist/webview/modelEditor.js', 'extension/dist/webview/branchStats.js', 'extension/dist/webview/report.js', 'extension/dist/webview/codicon.css']) {
          assert.ok(entry(v, f).size > 0, `${f} is not empty`);
        }
        assert.equal(pkg.scripts, undefined, 'no scripts in the packaged manifest');
        assert.equal(pkg.devDependencies, undefined, 'no devDependencies in the packaged manifest');
        assert.deepEqual(Object.keys(pkg.dependencies ?? {}), ['onnxruntime-node']);
      });

      it("resolves require('onnxruntime-node') from dist/validate-worker.js inside the VSIX", () => {
        const ort = resolveInVsix(v, 'extension/dist/validate-worker.js', 'onnxruntime-node');
        assert.equal(ort, 'extension/node_modules/onnxruntime-node/dist/index.js');
        const common = resolveInVsix(v, ort, 'onnxruntime-common');
        assert.equal(common, 'extension/node_modules/onnxruntime-common/dist/cjs/index.js');
        // binding.js loads ../bin/napi-v6/${process.platform}/${process.arch}/onnxruntime_binding.node
        assert.match(readText(v, 'extension/node_modules/onnxruntime-node/dist/binding.js'), /bin\/napi-v6\/\$\{process\.platform\}\/\$\{process\.arch\}\/onnxruntime_binding\.node/);
      });

      it('holds nothing from src/, tests, fixtures, bench, examples or source maps', () => {
        const forbidden = [...v.names].filter((n) => FORBIDDEN.test(n) && n !== 'extension/dist/pyval.py');
        assert.deepEqual(forbidden, []);
        const unexpected = [...v.names].filter((n) => !ALLOWED.some((re) => re.test(n)));
        assert.deepEqual(unexpected, [], 'files outside the VSIX allow-list');
      });
    });
  }
});

// The packaged runtime loads: the linux-x64 VSIX, unzipped, fuses and validates with its own code
// and its own onnxruntime (the validation child process is forked from the unzipped dist/).
const linux = present.find((p) => p.target === 'linux-x64')!;
const host = process.platform === 'linux' && process.arch === 'x64';
describe('linux-x64 VSIX, unzipped', { skip: !host ? 'not a linux-x64 host' : !linux.file && !REQUIRED ? 'no linux-x64 VSIX' : false }, () => {
  let dir: string | undefined;
  after(() => rmTmp(dir));

  it('fuses examples/yolov7_repconv_tiny.onnx through the bundled CLI, and validation passes', async (t) => {
    assert.ok(linux.file, 'no linux-x64 VSIX; run npm run package');
    dir = makeTmp();
    const zip = ZipArchive.open(new FileSource(linux.file));
    try {
      for (const e of zip.entries) {
        const out = path.join(dir, ...e.name.split('/'));
        fs.mkdirSync(path.dirname(out), { recursive: true });
        fs.writeFileSync(out, zip.read(e, 256 << 20));
      }
    } finally {
      zip.source.close();
    }
    const ext = path.join(dir, 'extension');
    // Resolved from the unzipped worker, onnxruntime-node is the VSIX's own copy.
    const ortMain = createRequire(path.join(ext, 'dist', 'validate-worker.js')).resolve('onnxruntime-node');
    assert.equal(ortMain, path.join(ext, 'node_modules', 'onnxruntime-node', 'dist', 'index.js'));

    const model = path.join(repoRoot, 'examples', 'yolov7_repconv_tiny.onnx');
    const out = path.join(dir, 'fused.onnx');
    const env = { ...process.env };
    delete env.NODE_PATH; // nothing from outside the unzipped folder
    const r = await new Promise<{ code: number; stdout: string; stderr: string }>((resolve) => {
      execFile(process.execPath, [path.join(ext, 'dist', 'cli.js'), 'fuse', model, '-o', out, '--json'], { cwd: dir, env, maxBuffer: 64 << 20 }, (err, stdout, stderr) => {
        resolve({ code: err ? Number((err as { code?: number }).code ?? -1) : 0, stdout, stderr });
      });
    });
    assert.equal(r.code, 0, `exit code ${r.code}; stderr: ${r.stderr}`);
    const report = JSON.parse(r.stdout) as { blocksFused: number; validation: { passed: boolean; runtime: string; outputs: { maxAbsDiff: number }[] } };
    assert.equal(report.blocksFused, 4);
    assert.equal(report.validation.passed, true);
    assert.match(report.validation.runtime, /onnxruntime-node/);
    const maxDiff = Math.max(...report.validation.outputs.map((o) => o.maxAbsDiff));
    assert.ok(maxDiff < 1e-4, `max |Δ| ${maxDiff}`);
    assert.ok(fs.statSync(out).size > 100_000);
    t.diagnostic(`fused with the unzipped VSIX: ${report.blocksFused} blocks, max |Δ| ${maxDiff.toExponential(1)}, ${report.validation.runtime}`);
  });
});
