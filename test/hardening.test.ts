// Hostile and broken files, cancellation, crashes and big models (issue 6): nothing a file names
// is ever executed, every reader refuses what it cannot trust with one line, the input is never
// touched, an output is either complete or absent, and a dying validation process takes nothing
// down with it. Fuzzing lives in test/fuzz.test.ts; zip/pickle unit cases in torch-io.test.ts.
import * as assert from 'node:assert/strict';
import { type ChildProcess, execFileSync, spawn } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { onnx } from 'onnx-proto';
import { generateRepVGG } from '../bench/gen-model';
import { BufferSource } from '../src/core/bytes';
import { analyzeCheckpoint, checkpointBlockData } from '../src/core/checkpoint';
import { DType, encodeFloats } from '../src/core/dtype';
import { FormatError, FusionError, oneLineError, RepFuseError } from '../src/core/errors';
import { analyzeOnnx, onnxBlockData, openOnnx } from '../src/core/onnx';
import { readTensorValues } from '../src/core/onnx/reader';
import { readSafetensors } from '../src/core/safetensors';
import { blockStats } from '../src/core/stats';
import { openTorch } from '../src/core/torch/load';
import { encodeTorchZip } from '../src/core/torch/save';
import { NewTensor, readTensorBytes, TorchTensor } from '../src/core/torch/tensor';
import { PyDict } from '../src/core/torch/values';
import { crc32, ZipArchive, ZipWriter } from '../src/core/torch/zip';
import { defaultFuseOptions, fuse, type FuseOptions, inspect } from '../src/engine';
import { ValidationError, validateInChild } from '../src/validate';
import * as H from './fuzz/hostile';
import { disassemble } from './fuzz/pickleops';
import { externalize, makeTensor, ModelBuilder } from './helpers/onnx-builder';
import { cliPath, makeTmp, repoRoot, rmTmp } from './helpers/paths';

const TORCH = path.join(repoRoot, 'test', 'fixtures', 'torch');
const { X, pk, call, glob, stackGlob } = H;

let tmp: string;
/** Where a payload would prove it ran: it must never exist. */
const MARKER = `/tmp/repfuse-marker-${randomBytes(8).toString('hex')}`;
/** The fixed marker the committed hostile_*.pt fixtures touch. */
const FIXTURE_MARKER = '/tmp/repfuse_pwned_marker';

before(() => {
  tmp = makeTmp();
  assert.ok(fs.existsSync(cliPath), 'dist/cli.js is built (npm run pretest)');
  fs.rmSync(FIXTURE_MARKER, { force: true });
});
after(() => {
  rmTmp(tmp);
  assert.equal(fs.existsSync(MARKER), false, `a payload ran: ${MARKER} exists`);
  assert.equal(fs.existsSync(FIXTURE_MARKER), false, `a fixture payload ran: ${FIXTURE_MARKER} exists`);
});

let dirCount = 0;
const freshDir = (name = 'd'): string => {
  const d = path.join(tmp, `${name}-${++dirCount}`);
  fs.mkdirSync(d);
  return d;
};
const sha = (f: string): string => createHash('sha256').update(fs.readFileSync(f)).digest('hex');
const ls = (d: string): string[] => fs.readdirSync(d).sort();

// ----- the CLI as a child process ------------------------------------------------------------

interface Run {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
  ms: number;
  timedOut: boolean;
}

interface CliOptions {
  timeoutMs?: number;
  /** Called with the child once it is spawned and with each stderr chunk (all of stderr so far). */
  onStart?: (child: ChildProcess) => void;
  onStderr?: (all: string, child: ChildProcess) => void;
  env?: NodeJS.ProcessEnv;
  /** Run under /usr/bin/time -f %M (peak RSS in KiB on the last stderr line). */
  time?: boolean;
}

function cli(args: string[], opts: CliOptions = {}): Promise<Run> {
  return new Promise((resolve) => {
    const t0 = Date.now();
    const argv = [process.execPath, cliPath, ...args];
    const child = opts.time ? spawn('/usr/bin/time', ['-f', 'maxrss_kib=%M', ...argv], { env: opts.env }) : spawn(argv[0], argv.slice(1), { env: opts.env });
    let stdout = '';
    let stderr = '';
    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      child.kill('SIGKILL');
    }, opts.timeoutMs ?? 120_000);
    child.stdout!.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr!.on('data', (d: Buffer) => {
      stderr += d.toString();
      opts.onStderr?.(stderr, child);
    });
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal, stdout, stderr, ms: Date.now() - t0, timedOut });
    });
    opts.onStart?.(child);
  });
}

/** Exit `code`, exactly one line on stderr (progress lines aside), `repfuse: …`, no stack trace. */
function errorLine(r: Run, code: number, ...mentions: (string | RegExp)[]): string {
  assert.equal(r.timedOut, false, `the CLI hung (${r.ms} ms): ${r.stderr}`);
  assert.equal(r.code, code, `exit code ${r.code} (signal ${r.signal}); stderr: ${r.stderr}`);
  const lines = r.stderr.split('\n').filter((l) => l.length > 0 && !l.startsWith('… ') && !l.startsWith('maxrss_kib=') && !l.startsWith('Command exited with'));
  assert.equal(lines.length, 1, `one line on stderr, got:\n${r.stderr}`);
  const line = lines[0];
  assert.ok(line.startsWith('repfuse: '), line);
  assert.doesNotMatch(r.stderr, /\n\s+at |internal error/, 'no stack trace, no internal error');
  // eslint-disable-next-line no-control-regex
  assert.doesNotMatch(line, /[\x00-\x08\x0b-\x1f\x7f]/, 'no control characters');
  for (const m of mentions) assert.ok(typeof m === 'string' ? line.includes(m) : m.test(line), `'${line}' mentions ${m}`);
  return line;
}

/** Processes whose parent is `pid` (from /proc). */
function childrenOf(pid: number): { pid: number; cmd: string }[] {
  const out: { pid: number; cmd: string }[] = [];
  for (const d of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(d)) continue;
    try {
      const stat = fs.readFileSync(`/proc/${d}/stat`, 'utf8');
      const ppid = Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]);
      if (ppid === pid) out.push({ pid: Number(d), cmd: fs.readFileSync(`/proc/${d}/cmdline`, 'utf8').replace(/\0/g, ' ') });
    } catch {
      /* gone */
    }
  }
  return out;
}

const alive = (pid: number): boolean => {
  try {
    const st = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    return !/^\S+ \(.*\) Z/.test(st);
  } catch {
    return false;
  }
};

async function waitFor(cond: () => boolean, ms: number, what: string, step = 5): Promise<void> {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, step));
  }
}

// ----- checkpoints with hostile content ------------------------------------------------------

interface Entry {
  name: string;
  data: Uint8Array;
}

function zipEntries(file: string): Entry[] {
  const zip = ZipArchive.open(new BufferSource(fs.readFileSync(file), file));
  return zip.entries.map((e) => ({ name: e.name, data: new Uint8Array(zip.read(e)) }));
}

async function rezip(entries: Entry[]): Promise<Uint8Array> {
  const chunks: Uint8Array[] = [];
  const zw = new ZipWriter((c) => chunks.push(c.slice()));
  for (const e of entries) await zw.addBytes(e.name, e.data);
  zw.finish();
  return Buffer.concat(chunks);
}

/** A real state_dict checkpoint (repvgg_sd.pt) with `key: value` added to its root dict, optionally as protocol 4. */
async function hostileCheckpoint(name: string, value: Uint8Array, opts: { key?: Uint8Array; proto?: number; fixture?: string } = {}): Promise<string> {
  const entries = zipEntries(path.join(TORCH, opts.fixture ?? 'repvgg_sd.pt'));
  const e = entries.find((x) => x.name.endsWith('/data.pkl'))!;
  const p = e.data;
  assert.equal(p[p.length - 1], 0x2e, 'data.pkl ends with STOP');
  e.data = pk(0x80, opts.proto ?? p[1], p.subarray(2, p.length - 1), opts.key ?? X('_extra_state'), value, 's', '.');
  const file = path.join(freshDir('ckpt'), name);
  fs.writeFileSync(file, await rezip(entries));
  return file;
}

const CMD = `touch ${MARKER}`;
const PY = `__import__('os').system('touch ${MARKER}')`;
const ARGV = pk(']', '(', X('touch'), X(MARKER), 'e');

/** Pickled payloads that run `touch MARKER` when unpickled by Python; `globals` as the file spells them. */
const PAYLOADS: { name: string; value: Uint8Array; globals: string[]; proto?: number }[] = [
  { name: 'os.system', value: call(glob('os', 'system'), X(CMD)), globals: ['os.system'] },
  { name: 'posix.system (protocol 2 spelling of os.system on Linux)', value: call(glob('posix', 'system'), X(CMD)), globals: ['posix.system'] },
  { name: 'nt.system', value: call(glob('nt', 'system'), X(CMD)), globals: ['nt.system'] },
  { name: 'subprocess.Popen', value: call(glob('subprocess', 'Popen'), ARGV), globals: ['subprocess.Popen'] },
  { name: 'commands.Popen (Python 2 spelling)', value: call(glob('commands', 'Popen'), ARGV), globals: ['commands.Popen'] },
  { name: 'builtins.eval', value: call(glob('builtins', 'eval'), X(PY)), globals: ['builtins.eval'] },
  { name: 'builtins.exec', value: call(glob('builtins', 'exec'), X(PY)), globals: ['builtins.exec'] },
  { name: '__builtin__.eval (protocol 2)', value: call(glob('__builtin__', 'eval'), X(PY)), globals: ['__builtin__.eval'] },
  { name: '__builtin__.exec (protocol 2)', value: call(glob('__builtin__', 'exec'), X(PY)), globals: ['__builtin__.exec'] },
  { name: 'STACK_GLOBAL os.system (protocol 4)', value: call(stackGlob('os', 'system'), X(CMD)), globals: ['os.system'], proto: 4 },
  { name: 'STACK_GLOBAL posix.system (protocol 4)', value: call(stackGlob('posix', 'system'), X(CMD)), globals: ['posix.system'], proto: 4 },
  { name: 'STACK_GLOBAL builtins.exec (protocol 4)', value: call(stackGlob('builtins', 'exec'), X(PY)), globals: ['builtins.exec'], proto: 4 },
  { name: 'STACK_GLOBAL subprocess.Popen (protocol 4)', value: call(stackGlob('subprocess', 'Popen'), ARGV), globals: ['subprocess.Popen'], proto: 4 },
  {
    name: '__reduce__ chain getattr(__import__("os"), "system")(cmd)',
    value: pk(call(glob('builtins', 'getattr'), call(glob('builtins', '__import__'), X('os')), X('system')), X(CMD), 0x85, 'R'),
    globals: ['builtins.getattr', 'builtins.__import__'],
  },
  { name: '__reduce__ chain of 200 calls', value: H.reduceChain(glob('posix', 'system'), CMD, 200), globals: ['posix.system'] },
  { name: 'INST os.system', value: pk('(', X(CMD), 'i', 'os\nsystem\n'), globals: ['os.system'] },
  { name: 'OBJ subprocess.Popen', value: pk('(', glob('subprocess', 'Popen'), ARGV, 'o'), globals: ['subprocess.Popen'] },
  { name: 'NEWOBJ subprocess.Popen', value: pk(glob('subprocess', 'Popen'), ARGV, 0x85, 0x81), globals: ['subprocess.Popen'] },
  { name: 'NEWOBJ_EX posix.system', value: pk(glob('posix', 'system'), X(CMD), 0x85, '}', 0x92), globals: ['posix.system'] },
  { name: 'BUILD with os.system as the state setter', value: pk(glob('collections', 'OrderedDict'), ')', 'R', call(glob('os', 'system'), X(CMD)), 'b'), globals: ['os.system'] },
];

describe('hostile pickles: nothing is executed', { concurrency: 2 }, () => {
  const files = new Map<string, string>();
  before(async () => {
    for (const [i, p] of PAYLOADS.entries()) files.set(p.name, await hostileCheckpoint(`hostile-${i}.pt`, p.value, { proto: p.proto }));
  });

  test('each payload is read as inert data and reported under the name the file uses; the model is still found', () => {
    for (const p of PAYLOADS) {
      const file = files.get(p.name)!;
      const t = openTorch(file);
      try {
        for (const g of p.globals) assert.ok(t.dangerousGlobals.includes(g), `${p.name}: ${g} in ${JSON.stringify(t.dangerousGlobals)}`);
        assert.ok(t.warnings.some((w) => /not executed/.test(w)), `${p.name}: ${t.warnings.join('; ')}`);
      } finally {
        t.close();
      }
      const a = analyzeCheckpoint(file);
      try {
        assert.ok(a.report.blocks.length > 0, `${p.name}: the RepVGG blocks are still detected`);
        assert.match(a.report.model.notes.join('\n'), /not executed/);
      } finally {
        a.close();
      }
      // Refusing is an option of the reader: with dangerous: 'refuse' the file is a FormatError.
      assert.throws(() => openTorch(file, { dangerous: 'refuse' }), (e: unknown) => e instanceof FormatError && /nothing was executed/.test(e.message));
    }
    assert.equal(fs.existsSync(MARKER), false);
  });

  test('repfuse inspect (CLI) on every payload: exit 0, the danger named, nothing run', async () => {
    const runs = await Promise.all(PAYLOADS.map((p) => cli(['inspect', files.get(p.name)!, '--json'])));
    runs.forEach((r, i) => {
      assert.equal(r.code, 0, `${PAYLOADS[i].name}: ${r.stderr}`);
      const notes = (JSON.parse(r.stdout) as { model: { notes: string[] } }).model.notes.join('\n');
      assert.match(notes, /not executed/, PAYLOADS[i].name);
    });
    assert.equal(fs.existsSync(MARKER), false);
  });

  test('repfuse fuse (CLI, with validation): the fused state_dict carries none of it, nothing run', async () => {
    for (const p of PAYLOADS.filter((x) => /^(posix\.system|STACK_GLOBAL builtins\.exec|__reduce__ chain get|NEWOBJ subprocess)/.test(x.name))) {
      const file = files.get(p.name)!;
      const before = sha(file);
      const out = path.join(path.dirname(file), 'fused.pt');
      const r = await cli(['fuse', file, '-o', out, '--json']);
      assert.equal(r.code, 0, `${p.name}: ${r.stderr}`);
      assert.equal(JSON.parse(r.stdout).validation.passed, true);
      const t = openTorch(out);
      assert.deepEqual(t.dangerousGlobals, [], `${p.name}: the output names no dangerous global`);
      t.close();
      assert.equal(sha(file), before);
    }
    // The rest through the engine, to safetensors and .pt, without validation.
    for (const p of PAYLOADS) {
      const file = files.get(p.name)!;
      for (const ext of ['.safetensors', '.pt']) {
        const out = path.join(path.dirname(file), `api${ext}`);
        const rep = await fuse(file, { ...defaultFuseOptions, output: out, validate: false, force: true });
        assert.ok(rep.output, p.name);
      }
    }
    assert.equal(fs.existsSync(MARKER), false);
  });

  test('the committed hostile_*.pt fixtures through the CLI: inspect and fuse run nothing', async () => {
    const fixtures = fs.readdirSync(TORCH).filter((f) => /^hostile_.*\.pt$/.test(f));
    assert.ok(fixtures.length >= 5);
    const dir = freshDir('fx');
    for (const f of fixtures) {
      const r = await cli(['inspect', path.join(TORCH, f)]);
      assert.equal(r.code, 0, r.stderr);
      assert.match(r.stdout, /not executed/);
      const fr = await cli(['fuse', path.join(TORCH, f), '-o', path.join(dir, `${f}.out.pt`), '--json']);
      assert.equal(fr.code, 0, fr.stderr);
    }
    assert.equal(fs.existsSync(FIXTURE_MARKER), false);
  });

  test('a full-module checkpoint with a payload: keep-modules refuses to pickle it again, one line, nothing written', async () => {
    const file = await hostileCheckpoint('evil_full.pt', call(stackGlob('posix', 'system'), X(CMD)), { fixture: 'yolov7_full.pt', proto: 4 });
    const dir = path.dirname(file);
    const r = await cli(['fuse', file, '-o', path.join(dir, 'out.pt')]);
    errorLine(r, 2, 'posix.system', /refusing/);
    assert.deepEqual(ls(dir), ['evil_full.pt']);
    const sd = await cli(['fuse', file, '-o', path.join(dir, 'sd.pt'), '--state-dict', '--no-validate']);
    assert.equal(sd.code, 0, sd.stderr);
    assert.equal(fs.existsSync(MARKER), false);
  });

  test('a persistent id built from calls is refused with a FormatError; nothing run', async () => {
    const file = await hostileCheckpoint('pid.pt', pk('(', X('storage'), call(glob('os', 'system'), X(CMD)), X('0'), X('cpu'), 'K', 1, 't', 'Q'));
    errorLine(await cli(['inspect', file]), 2, file, /persistent id|storage type/);
    assert.equal(fs.existsSync(MARKER), false);
  });
});

describe('hostile structures: deep, self-referencing, memo abuse — bounded, no crash', () => {
  /** value bytes → what analyzing must do: 'ok' (blocks found) or a FormatError message. */
  const cases: { name: string; value: () => Uint8Array; expect: 'ok' | RegExp }[] = [
    { name: 'a list nested 100,000 deep', value: () => H.deepList(100_000), expect: 'ok' },
    { name: '20,000 nested MARKs', value: () => H.deepMarks(20_000), expect: /MARKs nest deeper than 10000/ },
    { name: 'a list that contains itself', value: () => H.selfList(), expect: 'ok' },
    { name: 'a dict that contains itself', value: () => H.selfDict(), expect: 'ok' },
    { name: 'a tuple DAG of 2^5000 leaves, as a dict key', value: () => pk('}', H.tupleDag(5000), 'N', 's'), expect: 'ok' },
    { name: '1,000,000 memo entries', value: () => H.memoFlood(1_000_000), expect: 'ok' },
    { name: 'a memo GET of a key never PUT', value: () => pk('j', [0x39, 0x30, 0, 0]), expect: /memo key 12345 is not defined/ },
    { name: 'a memo PUT at index 2^32-1', value: () => pk('N', 'r', [0xff, 0xff, 0xff, 0xff]), expect: 'ok' },
    { name: 'a list of 1,000,000 DUPs of one object', value: () => H.dupFlood(1_000_000), expect: 'ok' },
    { name: '300,000 APPENDS items on an object (was a RangeError)', value: () => H.bigAppends(300_000), expect: 'ok' },
    { name: '300,000 ADDITEMS items on an object', value: () => H.bigAdditems(300_000), expect: 'ok' },
    { name: 'modules nested 20,000 deep, inside the state_dict', value: () => H.deepModules(20_000), expect: 'ok' },
    { name: 'a 64 KiB LONG4 integer', value: () => pk(0x8b, [0, 0, 1, 0], new Uint8Array(65536).fill(0x41)), expect: 'ok' },
    { name: 'a LONG4 integer over the limit', value: () => pk(0x8b, [1, 0, 1, 0], new Uint8Array(65537)), expect: /too large/ },
    { name: 'a BINUNICODE claiming 4 GiB', value: () => pk(0x58, [0xff, 0xff, 0xff, 0xff], 'x'), expect: /runs past the end of the pickle/ },
    { name: 'a FRAME claiming 2^52 bytes', value: () => pk(0x95, [0, 0, 0, 0, 0, 0, 0x10, 0], 'N'), expect: /runs past the end of the pickle/ },
  ];

  for (const c of cases) {
    test(c.name, { timeout: 60_000 }, async () => {
      const file = await hostileCheckpoint('deep.pt', c.value());
      const t0 = Date.now();
      const m0 = process.memoryUsage().arrayBuffers;
      let err: unknown;
      try {
        const a = analyzeCheckpoint(file);
        assert.ok(a.report.blocks.length > 0);
        a.close();
      } catch (e) {
        err = e;
      }
      const ms = Date.now() - t0;
      assert.ok(ms < 20_000, `${c.name}: ${ms} ms`);
      assert.ok(process.memoryUsage().arrayBuffers - m0 < 64 << 20, 'no large buffer allocated');
      if (c.expect === 'ok') assert.equal(err, undefined, `${c.name}: ${oneLineError(err)}`);
      else {
        assert.ok(err instanceof FormatError, `${c.name}: expected a FormatError, got ${String(err)}`);
        assert.match(err.message, c.expect);
        assert.doesNotMatch(oneLineError(err), /\n/);
      }
    });
  }

  test('a full-module checkpoint whose modules nest 3,000 deep: a FormatError naming the file, not a stack overflow', async () => {
    const dir = freshDir('mods');
    const file = path.join(dir, 'deep_modules.pt');
    fs.writeFileSync(file, await rezip([{ name: 'deep_modules/data.pkl', data: H.pickleOf(H.deepModules(3000)) }]));
    assert.throws(() => inspect(file, { foldBN: true }), (e: unknown) => e instanceof FormatError && /nest more than 256 levels/.test(e.message) && e.file === file);
    errorLine(await cli(['inspect', file]), 2, file, 'nest more than 256 levels');
  });

  test('a state_dict key nested 5,000 modules deep: a FormatError, in milliseconds', async () => {
    const entries = zipEntries(path.join(TORCH, 'repvgg_sd.pt'));
    const e = entries.find((x) => x.name.endsWith('/data.pkl'))!;
    const first = disassemble(e.data).instrs.find((i) => i.op === 0x58)!; // the first key
    e.data = pk(e.data.subarray(0, first.at), X(`${'a.'.repeat(5000)}weight`), e.data.subarray(first.end));
    const file = path.join(freshDir('key'), 'deep_key.pt');
    fs.writeFileSync(file, await rezip(entries));
    const t0 = Date.now();
    errorLine(await cli(['inspect', file]), 2, file, /nests 5000 modules deep/);
    assert.ok(Date.now() - t0 < 10_000);
  });

  test('a broadcast (stride-0) conv weight of 288M elements over 1 stored: fuse refuses it at once, in little memory', async () => {
    const t = openTorch(path.join(TORCH, 'repvgg_sd.pt'));
    const root = t.root as PyDict;
    for (const k of root.keys() as string[]) {
      const v = root.get(k);
      if (!k.startsWith('stage0.') || !(v instanceof TorchTensor) || v.shape.length === 0) continue;
      const shape = v.shape.map((d, i) => (i === 0 ? 4_000_000 : d));
      root.set(k, new TorchTensor(v.storage, 0, shape, shape.map(() => 0)));
    }
    const dir = freshDir('bcast');
    const file = path.join(dir, 'bcast.pt');
    fs.writeFileSync(file, await encodeTorchZip(root, { archiveName: 'bcast' }));
    t.close();
    assert.ok(fs.statSync(file).size < 100_000);
    const r = await cli(['fuse', file, '--no-validate', '-o', path.join(dir, 'out.pt')], { time: fs.existsSync('/usr/bin/time') });
    errorLine(r, 2, file, /broadcast view of 288000000 elements over 1 stored ones; refusing to expand it/);
    const kib = Number(/maxrss_kib=(\d+)/.exec(r.stderr)?.[1] ?? 0);
    assert.ok(kib < 200 * 1024, `peak RSS ${kib} KiB`);
    assert.deepEqual(ls(dir), ['bcast.pt']);
  });

  test('through the CLI: a 100,000-deep list and a 300,000-item APPENDS inspect fine', async () => {
    for (const v of [H.deepList(100_000), H.bigAppends(300_000)]) {
      const r = await cli(['inspect', await hostileCheckpoint('big.pt', v)]);
      assert.equal(r.code, 0, r.stderr);
    }
  });
});

// ----- hostile zip archives ------------------------------------------------------------------

/** A zip built by hand: entries at given offsets, central records that may lie. */
function handZip(locals: { name: string; data: Uint8Array }[], central: { name: string; local: number; size?: number }[]): Buffer {
  const parts: Buffer[] = [];
  const crcs = locals.map((l) => crc32(l.data));
  const offsets: number[] = [];
  let pos = 0;
  for (const l of locals) {
    const name = Buffer.from(l.name);
    const h = Buffer.alloc(30);
    h.writeUInt32LE(0x04034b50, 0);
    h.writeUInt16LE(20, 4);
    h.writeUInt16LE(0x800, 6);
    h.writeUInt32LE(crcs[offsets.length], 14);
    h.writeUInt32LE(l.data.length, 18);
    h.writeUInt32LE(l.data.length, 22);
    h.writeUInt16LE(name.length, 26);
    offsets.push(pos);
    parts.push(h, name, Buffer.from(l.data));
    pos += 30 + name.length + l.data.length;
  }
  const cdOffset = pos;
  for (const c of central) {
    const name = Buffer.from(c.name);
    const l = locals[c.local];
    const r = Buffer.alloc(46);
    r.writeUInt32LE(0x02014b50, 0);
    r.writeUInt16LE(20, 4);
    r.writeUInt16LE(20, 6);
    r.writeUInt16LE(0x800, 8);
    r.writeUInt32LE(crcs[c.local], 16);
    r.writeUInt32LE(c.size ?? l.data.length, 20);
    r.writeUInt32LE(c.size ?? l.data.length, 24);
    r.writeUInt16LE(name.length, 28);
    r.writeUInt32LE(offsets[c.local], 42);
    parts.push(r, name);
    pos += 46 + name.length;
  }
  const e = Buffer.alloc(22);
  e.writeUInt32LE(0x06054b50, 0);
  e.writeUInt16LE(central.length, 8);
  e.writeUInt16LE(central.length, 10);
  e.writeUInt32LE(pos - cdOffset, 12);
  e.writeUInt32LE(cdOffset, 16);
  parts.push(e);
  return Buffer.concat(parts);
}

describe('hostile zip archives through openTorch and the CLI', () => {
  const pkl = () => zipEntries(path.join(TORCH, 'repvgg_sd.pt')).find((x) => x.name.endsWith('/data.pkl'))!.data;

  test('entry names with "..", absolute paths or drive letters: refused, nothing is ever extracted', async () => {
    const dir = freshDir('zipnames');
    const outside = path.join(os.tmpdir(), `repfuse-evil-${randomBytes(4).toString('hex')}`);
    for (const [i, name] of ['archive/../../evil', '../evil', outside, 'C:\\evil', 'archive/data/..'].entries()) {
      const file = path.join(dir, `names-${i}.pt`);
      fs.writeFileSync(file, handZip([{ name: 'archive/data.pkl', data: pkl() }, { name, data: Uint8Array.of(1, 2, 3) }], [{ name: 'archive/data.pkl', local: 0 }, { name, local: 1 }]));
      errorLine(await cli(['inspect', file]), 2, file, /"\.\." segment|absolute path/);
    }
    assert.equal(fs.existsSync(outside), false);
    assert.equal(fs.existsSync(path.join(dir, '..', 'evil')), false);
    assert.deepEqual(ls(dir), [0, 1, 2, 3, 4].map((i) => `names-${i}.pt`));
  });

  test('overlapping entries (the bytes of one entry hold the header of another) are refused', async () => {
    const innerName = 'archive/data/0';
    const inner = Buffer.alloc(30 + innerName.length + 4);
    inner.writeUInt32LE(0x04034b50, 0);
    inner.writeUInt32LE(4, 18);
    inner.writeUInt32LE(4, 22);
    inner.writeUInt16LE(innerName.length, 26);
    inner.write(innerName, 30);
    const zip = handZip([{ name: 'archive/data.pkl', data: pkl() }, { name: 'archive/outer', data: inner }], [{ name: 'archive/data.pkl', local: 0 }, { name: 'archive/outer', local: 1 }]);
    // A third central record pointing into the middle of 'archive/outer'.
    const file = path.join(freshDir('overlap'), 'overlap.pt');
    const cdOffset = zip.readUInt32LE(zip.length - 6);
    const outerLocal = zip.indexOf(Buffer.from('archive/outer')) - 30;
    const innerAt = outerLocal + 30 + 'archive/outer'.length;
    const rec = Buffer.alloc(46 + innerName.length);
    rec.writeUInt32LE(0x02014b50, 0);
    rec.writeUInt32LE(4, 20);
    rec.writeUInt32LE(4, 24);
    rec.writeUInt16LE(innerName.length, 28);
    rec.writeUInt32LE(innerAt, 42);
    rec.write(innerName, 46);
    const eocd = Buffer.from(zip.subarray(zip.length - 22));
    eocd.writeUInt16LE(3, 8);
    eocd.writeUInt16LE(3, 10);
    eocd.writeUInt32LE(eocd.readUInt32LE(12) + rec.length, 12);
    fs.writeFileSync(file, Buffer.concat([zip.subarray(0, zip.length - 22), rec, eocd]));
    assert.ok(cdOffset > innerAt);
    errorLine(await cli(['inspect', file]), 2, file, 'overlap');
  });

  test('lying sizes: a storage record claiming 2 GiB is refused before anything is allocated', async () => {
    const entries = zipEntries(path.join(TORCH, 'repvgg_sd.pt'));
    const file = path.join(freshDir('lie'), 'lie.pt');
    const zip = handZip(entries, entries.map((e, i) => ({ name: e.name, local: i, size: e.name.endsWith('/data/0') ? 0x7fffffff : undefined })));
    fs.writeFileSync(file, zip);
    const m0 = process.memoryUsage().arrayBuffers;
    assert.throws(() => openTorch(file), (e: unknown) => e instanceof FormatError && /declares 2147483647 bytes/.test(e.message));
    assert.ok(process.memoryUsage().arrayBuffers - m0 < 8 << 20);
    errorLine(await cli(['inspect', file]), 2, file, '2147483647');
    // A size smaller than the storage needs: the storage is refused (it would read past its record).
    const small = handZip(entries, entries.map((e, i) => ({ name: e.name, local: i, size: e.name.endsWith('/data/0') ? 4 : undefined })));
    fs.writeFileSync(file, small);
    errorLine(await cli(['inspect', file]), 2, file, /holds only 4 bytes/);
  });
});

// ----- ONNX external data that points where it must not --------------------------------------

describe('ONNX external data outside the folder, devices, FIFOs, links: refused without hanging', () => {
  let dir: string;
  const model = (location: string) => {
    const b = new ModelBuilder({ seed: 3 });
    const x = b.input('x', [1, 4, 6, 6]);
    b.output(b.relu(b.add(b.add(b.conv(x, 4, 4, [3, 3], { bn: true }), b.conv(x, 4, 4, [1, 1], { bn: true })), b.bn(x, 4))));
    return externalize(b.model(), location, 100);
  };
  const write = (name: string, location: string) => {
    const { model: m, data } = model(location);
    const file = path.join(dir, `${name}.onnx`);
    fs.writeFileSync(file, onnx.ModelProto.encode(m).finish());
    return { file, data };
  };

  before(() => {
    dir = freshDir('ext');
    fs.writeFileSync(path.join(path.dirname(dir), 'outside.bin'), new Uint8Array(4096));
    fs.symlinkSync('/dev/urandom', path.join(dir, 'urandom.bin'));
    fs.symlinkSync('/dev/zero', path.join(dir, 'zero.bin'));
    fs.symlinkSync(path.join(path.dirname(dir), 'outside.bin'), path.join(dir, 'link-out.bin'));
    execFileSync('mkfifo', [path.join(dir, 'fifo.bin')]);
    fs.symlinkSync('fifo.bin', path.join(dir, 'link-fifo.bin'));
    fs.mkdirSync(path.join(dir, 'folder.bin'));
  });

  const escaping: [string, string, RegExp][] = [
    ['dotdot', '../outside.bin', /escapes the model's folder/],
    ['deep-dotdot', 'sub/../../outside.bin', /escapes the model's folder/],
    ['absolute-device', '/dev/zero', /absolute path/],
    ['absolute-urandom', '/dev/urandom', /absolute path/],
    ['windows', 'C:\\weights.bin', /absolute path/],
    ['link-urandom', 'urandom.bin', /link to a file outside/],
    ['link-zero', 'zero.bin', /link to a file outside/],
    ['link-outside', 'link-out.bin', /link to a file outside/],
  ];
  for (const [name, location, re] of escaping) {
    test(`location ${JSON.stringify(location)}: inspect and fuse refuse it, one line, nothing written`, async () => {
      const { file } = write(name, location);
      errorLine(await cli(['inspect', file], { timeoutMs: 30_000 }), 2, file, re);
      errorLine(await cli(['fuse', file, '--no-validate', '-o', path.join(dir, `${name}.out.onnx`)], { timeoutMs: 30_000 }), 2, file, re);
      assert.ok(!fs.existsSync(path.join(dir, `${name}.out.onnx`)));
    });
  }

  for (const [name, location] of [['fifo', 'fifo.bin'], ['link-fifo', 'link-fifo.bin'], ['folder', 'folder.bin']]) {
    test(`a ${name === 'folder' ? 'folder' : 'FIFO'} as external data (${location}): a FormatError, no hang`, async () => {
      const { file } = write(name, location);
      // Reading the data needs the file: a FIFO would block forever on open().
      const m = openOnnx(file);
      try {
        const t = [...m.graph.initializers.values()].find((x) => x.storage.kind === 'external')!;
        const t0 = Date.now();
        assert.throws(() => readTensorValues(m, t), (e: unknown) => e instanceof FormatError && /not a regular file/.test(e.message));
        assert.ok(Date.now() - t0 < 2000);
      } finally {
        m.close();
      }
      const r = await cli(['fuse', file, '--no-validate', '-o', path.join(dir, `${name}.out.onnx`)], { timeoutMs: 30_000 });
      errorLine(r, 2, 'not a regular file', name === 'folder' ? 'folder.bin' : 'fifo.bin');
      assert.ok(!fs.existsSync(path.join(dir, `${name}.out.onnx`)));
    });
  }
});

// ----- safetensors headers that lie ------------------------------------------------------------

describe('safetensors headers that lie', () => {
  const st = () => fs.readFileSync(path.join(TORCH, 'repvgg_sd.safetensors'));
  const withHeader = (header: Record<string, unknown> | string, length?: bigint) => {
    const json = Buffer.from(typeof header === 'string' ? header : JSON.stringify(header));
    const b = st();
    const n = Number(b.readBigUInt64LE(0));
    const len = Buffer.alloc(8);
    len.writeBigUInt64LE(length ?? BigInt(json.length));
    return Buffer.concat([len, json, b.subarray(8 + n)]);
  };
  const header = () => {
    const b = st();
    return JSON.parse(b.subarray(8, 8 + Number(b.readBigUInt64LE(0))).toString()) as Record<string, { data_offsets: number[]; shape: number[] }>;
  };

  const cases: [string, () => Buffer, RegExp][] = [
    ['a header length larger than the file', () => withHeader(header(), BigInt(st().length)), /runs past the end of the file/],
    ['a header length of 2^63', () => withHeader(header(), 2n ** 63n), /over the 100000000-byte limit/],
    [
      'data_offsets past the data area',
      () => {
        const h = header();
        const k = Object.keys(h).find((x) => x !== '__metadata__')!;
        h[k].data_offsets = [0, 2 ** 40];
        return withHeader(h);
      },
      /spans bytes \[0, 1099511627776\)/,
    ],
    [
      'overlapping data_offsets',
      () => {
        const h = header();
        const ks = Object.keys(h).filter((x) => x !== '__metadata__' && h[x].shape.length === 1 && h[x].shape[0] > 1);
        const [a, b] = [h[ks[0]], h[ks[1]]];
        b.shape = a.shape;
        b.data_offsets = [a.data_offsets[0] + 4, a.data_offsets[1] + 4];
        return withHeader(h);
      },
      /overlap/,
    ],
    ['a shape of 2^60 elements', () => {
      const h = header();
      const k = Object.keys(h).find((x) => x !== '__metadata__')!;
      h[k].shape = [2 ** 40, 2 ** 20];
      return withHeader(h);
    }, /needs .* bytes, but its data_offsets span/],
  ];

  for (const [name, make, re] of cases) {
    test(`${name}: a FormatError before any allocation; the CLI prints one line`, async () => {
      const bytes = make();
      const m0 = process.memoryUsage().arrayBuffers;
      assert.throws(() => readSafetensors(new BufferSource(bytes, 'x.safetensors')), (e: unknown) => e instanceof FormatError && re.test(e.message));
      assert.ok(process.memoryUsage().arrayBuffers - m0 < 8 << 20);
      const file = path.join(freshDir('st'), 'lie.safetensors');
      fs.writeFileSync(file, bytes);
      errorLine(await cli(['inspect', file]), 2, file, re);
    });
  }
});

// ----- non-finite weights and impossible BatchNorms ---------------------------------------------

describe('NaN/Inf weights and zero or negative BN variance: reported in statistics, fusion refuses naming the block', () => {
  type Poison = 'nan' | 'inf' | 'negvar' | 'zerovar';
  /** A RepVGG block (3×3+BN, 1×1+BN, BN identity) with one poisoned parameter. */
  function onnxModel(poison: Poison): Uint8Array {
    const b = new ModelBuilder({ seed: 11 });
    const x = b.input('x', [1, 4, 8, 8]);
    const dense = b.conv(x, 4, 4, [3, 3], { bn: poison === 'zerovar' ? { eps: 0 } : true, name: '/stage0/rbr_dense/conv/Conv' });
    const info = b.last;
    const one = b.conv(x, 4, 4, [1, 1], { bn: true, name: '/stage0/rbr_1x1/conv/Conv' });
    b.output(b.relu(b.add(b.add(dense, one, '/stage0/Add'), b.bn(x, 4, { name: '/stage0/rbr_identity/BatchNormalization' }), '/stage0/Add_1')));
    const replace = (name: string, f: (v: number[]) => void) => {
      const i = b.initializers.findIndex((t) => t.name === name);
      const t = b.initializers[i];
      const v = Array.from(new Float32Array(Uint8Array.from(t.rawData!).buffer));
      f(v);
      b.initializers[i] = makeTensor(name, t.dims as number[], v);
    };
    if (poison === 'nan') replace(info.weightSource, (v) => (v[5] = NaN));
    if (poison === 'inf') replace(info.weightSource, (v) => (v[7] = -Infinity));
    if (poison === 'negvar') replace(info.bnNode!.input![4], (v) => (v[2] = -1));
    if (poison === 'zerovar') replace(info.bnNode!.input![4], (v) => (v[1] = 0));
    return b.encode();
  }

  for (const poison of ['nan', 'inf', 'negvar', 'zerovar'] as Poison[]) {
    test(`ONNX, ${poison}: inspect lists the block, statistics count it, fuse refuses (API and CLI), nothing written`, async () => {
      const dir = freshDir(`poison-${poison}`);
      const file = path.join(dir, `${poison}.onnx`);
      fs.writeFileSync(file, onnxModel(poison));
      const before = sha(file);
      const r = inspect(file, { foldBN: true });
      assert.equal(r.blocks.length, 1);
      const name = r.blocks[0].name;
      assert.equal(name, 'stage0');
      const m = openOnnx(file);
      try {
        const s = blockStats(onnxBlockData(analyzeOnnx(m, { foldBN: true }), name));
        const dense = s.branches.find((b) => b.label.startsWith('3×3'))!;
        if (poison === 'nan') assert.ok(dense.raw!.nan >= 1 && s.fused.weight.nan >= 1);
        if (poison === 'inf') assert.ok(dense.raw!.inf >= 1 && s.fused.weight.nan + s.fused.weight.inf >= 1);
        if (poison === 'negvar') assert.equal(dense.bn!.variance[2], -1);
        if (poison === 'zerovar') assert.ok(dense.bn!.variance[1] === 0 && dense.epsilon === 0);
        if (poison === 'negvar' || poison === 'zerovar') assert.ok(dense.folded.nan >= 1 && s.fused.weight.nan >= 1, 'the impossible channel shows as NaN');
        assert.doesNotMatch(JSON.stringify(s), /NaN|Infinity/, 'the statistics stay JSON-safe');
      } finally {
        m.close();
      }
      await assert.rejects(fuse(file, { ...defaultFuseOptions, validate: false }), (e: unknown) => e instanceof FusionError && e.file === file && /block 'stage0'/.test(e.message));
      errorLine(await cli(['fuse', file]), 2, file, "block 'stage0'", poison === 'negvar' || poison === 'zerovar' ? /variance/ : /not finite/);
      assert.deepEqual(ls(dir), [`${poison}.onnx`], 'nothing written, no temp file');
      assert.equal(sha(file), before);
    });
  }

  test('a standalone Conv → BN fold with negative variance is refused the same way', async () => {
    const b = new ModelBuilder({ seed: 2 });
    const x = b.input('x', [1, 3, 8, 8]);
    b.output(b.relu(b.conv(x, 4, 3, [3, 3], { bn: { variance: [-2, -1] }, name: '/stem/conv/Conv' })));
    const dir = freshDir('fold');
    const file = path.join(dir, 'fold.onnx');
    fs.writeFileSync(file, b.encode());
    assert.equal(inspect(file, { foldBN: true }).folds.length, 1);
    errorLine(await cli(['fuse', file, '--no-validate']), 2, file, /variance/);
    assert.deepEqual(ls(dir), ['fold.onnx']);
  });

  test('a checkpoint with a NaN weight and one with a negative running_var: statistics report them, .pt and .safetensors refused', async () => {
    for (const poison of ['nan', 'negvar'] as const) {
      const t = openTorch(path.join(TORCH, 'repvgg_sd.pt'));
      const root = t.root as PyDict;
      const key = poison === 'nan' ? 'stage1.0.rbr_dense.conv.weight' : 'stage1.0.rbr_dense.bn.running_var';
      const orig = root.get(key) as TorchTensor;
      assert.ok(orig instanceof TorchTensor, key);
      const bytes = readTensorBytes(orig);
      const v = new Float32Array(bytes.buffer, bytes.byteOffset, bytes.length / 4);
      v[3] = poison === 'nan' ? NaN : -0.5;
      const patched = new Uint8Array(bytes);
      root.set(key, new NewTensor(DType.float32, orig.shape, () => patched));
      const dir = freshDir(`ck-${poison}`);
      const file = path.join(dir, `${poison}.pt`);
      fs.writeFileSync(file, await encodeTorchZip(root, { archiveName: poison }));
      t.close();
      const a = analyzeCheckpoint(file);
      try {
        const block = a.report.blocks.find((x) => x.name === 'stage1.0')!;
        assert.ok(block, 'the block is listed');
        const s = blockStats(checkpointBlockData(a, 'stage1.0'));
        const dense = s.branches.find((x) => x.label.startsWith('3×3'))!;
        if (poison === 'nan') assert.ok(dense.raw!.nan >= 1);
        else assert.equal(dense.bn!.variance[3], -0.5);
        assert.ok(s.fused.weight.nan >= 1);
      } finally {
        a.close();
      }
      for (const ext of ['.pt', '.safetensors']) {
        errorLine(await cli(['fuse', file, '-o', path.join(dir, `out${ext}`)]), 2, file, "block 'stage1.0'");
      }
      assert.deepEqual(ls(dir), [`${poison}.pt`]);
    }
  });
});

// ----- the input never changes; outputs appear whole or not at all --------------------------------

describe('the input never changes; outputs are written to a temp file beside them and renamed', { concurrency: 2 }, () => {
  const onnxModel = () => {
    const b = new ModelBuilder({ seed: 5 });
    const x = b.input('x', [1, 8, 8, 8]);
    b.output(b.relu(b.add(b.add(b.conv(x, 8, 8, [3, 3], { bn: true }), b.conv(x, 8, 8, [1, 1], { bn: true })), b.bn(x, 8))));
    return b;
  };
  const copy = (fixture: string, dir: string) => {
    const f = path.join(dir, path.basename(fixture));
    fs.copyFileSync(fixture, f);
    return f;
  };
  /** Runs `fn`, then checks every input hash and that the folder holds exactly `expect`. */
  async function unchanged(inputs: string[], dir: string, expect: string[], fn: () => Promise<unknown>): Promise<void> {
    const before = inputs.map(sha);
    await fn();
    assert.deepEqual(inputs.map(sha), before, 'the input files are byte-identical');
    assert.deepEqual(ls(dir), [...expect].sort(), 'exactly the expected files, no temp file');
  }

  test('ONNX: inspect; fuse with and without validation (CLI)', async () => {
    const dir = freshDir('u-onnx');
    const f = path.join(dir, 'm.onnx');
    fs.writeFileSync(f, onnxModel().encode());
    await unchanged([f], dir, ['m.onnx'], async () => assert.equal((await cli(['inspect', f])).code, 0));
    await unchanged([f], dir, ['m.onnx', 'm.fused.onnx'], async () => assert.equal((await cli(['fuse', f, '--json'])).code, 0));
    await unchanged([f], dir, ['m.onnx', 'm.fused.onnx', 'nv.onnx'], async () => assert.equal((await cli(['fuse', f, '--no-validate', '-o', path.join(dir, 'nv.onnx')])).code, 0));
  });

  test('ONNX with external data: model and data file unchanged, the output gets its own data file', async () => {
    const dir = freshDir('u-ext');
    const { model, data } = externalize(onnxModel().model(), 'm.onnx.data', 64);
    const f = path.join(dir, 'm.onnx');
    fs.writeFileSync(f, onnx.ModelProto.encode(model).finish());
    fs.writeFileSync(path.join(dir, 'm.onnx.data'), data);
    const inputs = [f, path.join(dir, 'm.onnx.data')];
    await unchanged(inputs, dir, ['m.onnx', 'm.onnx.data'], async () => assert.equal((await cli(['inspect', f])).code, 0));
    await unchanged(inputs, dir, ['m.onnx', 'm.onnx.data', 'm.fused.onnx', 'm.fused.onnx.data'], async () => {
      const rep = await fuse(f, { ...defaultFuseOptions });
      assert.equal(rep.validation?.passed, true);
    });
  });

  test('checkpoints: inspect; fuse to .pt, .safetensors and keep-modules, with and without validation', async () => {
    const dir = freshDir('u-ckpt');
    const sd = copy(path.join(TORCH, 'repvgg_sd.pt'), dir);
    const st = copy(path.join(TORCH, 'mobileone_sd.safetensors'), dir);
    const legacy = copy(path.join(TORCH, 'acnet_legacy.pt'), dir);
    const full = copy(path.join(TORCH, 'yolov7_full.pt'), dir);
    const inputs = [sd, st, legacy, full];
    const names = inputs.map((i) => path.basename(i));
    const outs: string[] = [];
    const step = async (args: string[], out?: string) => {
      if (out) outs.push(out);
      await unchanged(inputs, dir, [...names, ...outs], async () => {
        const r = await cli(out ? [...args, '-o', path.join(dir, out)] : args);
        assert.equal(r.code, 0, `${args.join(' ')}: ${r.stderr}`);
      });
    };
    for (const i of inputs) await step(['inspect', i]);
    await step(['fuse', sd], 'sd.pt');
    await step(['fuse', sd, '--no-validate'], 'sd.safetensors');
    await step(['fuse', st, '--no-validate'], 'st.pt');
    await step(['fuse', legacy], 'legacy.pt');
    await step(['fuse', full], 'full-keep.pt');
    await step(['fuse', full, '--no-validate', '--state-dict'], 'full-sd.pt');
    await step(['fuse', full, '--no-validate', '--keep-modules', '--dtype', 'float32'], 'full-keep32.pt');
  });

  test('the writer works in a temp file beside the output, renamed into place when complete', async () => {
    const dir = freshDir('u-watch');
    const f = path.join(dir, 'y.onnx');
    fs.copyFileSync(path.join(repoRoot, 'examples', 'yolov7_repconv_tiny.onnx'), f);
    const seen = new Set<string>();
    const w = fs.watch(dir, (_e, name) => name && seen.add(name.toString()));
    try {
      await unchanged([f], dir, ['y.onnx', 'y.fused.onnx'], () => fuse(f, { ...defaultFuseOptions, validate: false }));
      await new Promise((r) => setTimeout(r, 100));
    } finally {
      w.close();
    }
    const temps = [...seen].filter((n) => n.endsWith('.tmp'));
    assert.ok(temps.length >= 1 && temps.every((n) => /^\.y\.fused\.onnx\.\d+\.[a-z0-9]+\.tmp$/.test(n)), `temp files seen: ${[...seen].join(', ')}`);
    assert.ok(seen.has('y.fused.onnx'));
  });

  test('a write that fails part-way (a FusionError in the second block) leaves neither output nor temp file', async () => {
    const dir = freshDir('u-fail');
    const b = onnxModel();
    const bn = b.initializers.find((t) => /running_var/.test(t.name ?? ''))!;
    bn.rawData = encodeFloats(new Float64Array(8).fill(-1), DType.float32);
    const f = path.join(dir, 'bad.onnx');
    fs.writeFileSync(f, b.encode());
    await unchanged([f], dir, ['bad.onnx'], async () => errorLine(await cli(['fuse', f]), 2, f));
  });
});

// ----- cancellation --------------------------------------------------------------------------------

describe('cancelling: SIGINT (CLI) and AbortSignal (engine) leave no output and no temp file', () => {
  let dir: string;
  let model: string;
  let hash: string;
  before(() => {
    dir = freshDir('cancel');
    model = path.join(dir, 'big.onnx');
    // ≈ 160 MB: long enough to write and to validate that a signal lands inside each phase.
    generateRepVGG(model, { input: [1, 3, 160, 160], stem: 64, stages: [[128, 4], [256, 6], [512, 10], [2048, 1]], classes: 1000 }, 1);
    hash = sha(model);
  });
  const clean = () => {
    assert.deepEqual(ls(dir), ['big.onnx'], 'no output file, no temp file');
    assert.equal(sha(model), hash, 'the input is unchanged');
  };
  /** Whether process `pid` holds `file` open (/proc/<pid>/fd). */
  const opened = (pid: number, file: string) => {
    try {
      return fs.readdirSync(`/proc/${pid}/fd`).some((fd) => {
        try {
          return fs.readlinkSync(`/proc/${pid}/fd/${fd}`) === file;
        } catch {
          return false;
        }
      });
    } catch {
      return false;
    }
  };
  const points: { name: string; when: (child: ChildProcess, stderr: () => string) => Promise<void> }[] = [
    // Node itself catches SIGINT from its first milliseconds (to reset the terminal), so /proc's
    // SigCgt cannot tell when the CLI's own handler is in place. It is before the model is opened.
    { name: 'early (once it has opened the model, before anything is written)', when: (c) => waitFor(() => opened(c.pid!, model), 20_000, 'the model to be opened', 1) },
    {
      name: 'mid-write (a temp file exists)',
      when: () =>
        waitFor(() => ls(dir).some((f) => /^\.big\.fused\.onnx\.\d+\.[a-z0-9]+\.tmp$/.test(f)), 60_000, 'the temp file beside the output', 2),
    },
    { name: 'during validation (the onnxruntime child runs)', when: (_c, err) => waitFor(() => /running the original model/.test(err()), 60_000, 'validation') },
  ];
  for (const p of points) {
    test(`CLI, SIGINT ${p.name}: exit 130, one line, nothing left behind`, { timeout: 120_000 }, async () => {
      let stderr = '';
      const kids = new Set<number>();
      let watcher: NodeJS.Timeout | undefined;
      const r = await cli(['fuse', model], {
        onStderr: (all) => (stderr = all),
        onStart: (child) => {
          watcher = setInterval(() => childrenOf(child.pid!).forEach((k) => kids.add(k.pid)), 20);
          void p.when(child, () => stderr).then(() => child.kill('SIGINT'), () => child.kill('SIGKILL'));
        },
      });
      clearInterval(watcher);
      errorLine(r, 130, 'interrupted; nothing was written');
      clean();
      await waitFor(() => [...kids].every((k) => !alive(k)), 5000, 'the validation child to be gone');
    });
  }

  const apiPoints: { name: string; when: (abort: () => void, timers: NodeJS.Timeout[]) => Partial<FuseOptions> }[] = [
    { name: 'when writing starts', when: (abort) => ({ onProgress: (m) => m.startsWith('writing') && abort() }) },
    {
      name: 'mid-write (a temp file exists)',
      when: (abort, timers) => {
        // Polled between the writer's chunks (it yields to the event loop every 16 MiB).
        timers.push(setInterval(() => ls(dir).some((f) => f.endsWith('.tmp')) && abort(), 1));
        return {};
      },
    },
    { name: 'during validation', when: (abort) => ({ onProgress: (m) => m === 'running the original model' && abort() }) },
  ];
  for (const p of apiPoints) {
    test(`engine API, abort ${p.name}: rejects with the reason, nothing left behind`, { timeout: 120_000 }, async () => {
      const ctl = new AbortController();
      const reason = new RepFuseError('cancelled by the test.');
      const timers: NodeJS.Timeout[] = [];
      let aborted = false;
      const extra = p.when(() => {
        aborted = true;
        ctl.abort(reason);
      }, timers);
      try {
        await assert.rejects(fuse(model, { ...defaultFuseOptions, ...extra, signal: ctl.signal }), (e: unknown) => e === reason);
      } finally {
        timers.forEach(clearInterval);
      }
      assert.ok(aborted);
      clean();
    });
  }
});

// ----- validation process faults -------------------------------------------------------------------

describe('validation process faults: crash, hang, out of memory — one clear error, the caller stays up', () => {
  let dir: string;
  let model: string;
  // Big enough that a run takes a while: the child is still working when the test kills it.
  const request = () => ({ type: 'validate' as const, original: model, fused: model, blocks: [], inputs: [{ name: 'x', dtype: DType.float32, shape: [1, 32, 160, 160] }], seed: 0, atol: 1e-4, rtol: 1e-3, threads: 0 });
  const script = (name: string, code: string) => {
    const f = path.join(dir, name);
    fs.writeFileSync(f, code);
    return f;
  };
  const workerKids = () => childrenOf(process.pid).filter((c) => /validate-worker|worker\.js|hang\.js|oom\.js/.test(c.cmd));
  before(() => {
    dir = freshDir('faults');
    model = path.join(dir, 'm.onnx');
    const b = new ModelBuilder({ seed: 9 });
    const x = b.input('x', [1, 32, 160, 160]);
    let y = x;
    for (let i = 0; i < 4; i++) y = b.relu(b.add(b.conv(y, 32, 32, [3, 3], { bn: true }), b.conv(y, 32, 32, [1, 1], { bn: true })));
    b.output(y);
    fs.writeFileSync(model, b.encode());
  });
  const oneLineValidationError = (e: unknown, re: RegExp) => e instanceof ValidationError && !/\n/.test(oneLineError(e)) && re.test(oneLineError(e));
  /** The host is fine afterwards: a normal validation still passes. */
  const stillWorks = async () => {
    const r = await validateInChild(request(), { timeoutMs: 60_000 });
    assert.equal(r.passed, true);
  };

  test('the child is killed (SIGKILL) mid-run: a ValidationError saying so; the next validation works', async () => {
    let killed = 0;
    await assert.rejects(
      validateInChild(request(), {
        timeoutMs: 60_000,
        onProgress: (m) => {
          if (m !== 'running the original model') return;
          for (const k of workerKids()) {
            process.kill(k.pid, 'SIGKILL');
            killed = k.pid;
          }
        },
      }),
      (e: unknown) => oneLineValidationError(e, /killed by SIGKILL/),
    );
    assert.ok(killed > 0, 'the child was found and killed');
    await stillWorks();
  });

  test('a child that never answers is stopped at the timeout, and really gone', async () => {
    const hang = script('hang.js', "process.on('message', () => {}); setInterval(() => {}, 1000);\n");
    const t0 = Date.now();
    let pid = 0;
    const watch = setInterval(() => workerKids().forEach((k) => (pid = k.pid)), 20);
    await assert.rejects(validateInChild(request(), { timeoutMs: 500, script: hang }), (e: unknown) => oneLineValidationError(e, /did not finish within 0\.5 s/));
    clearInterval(watch);
    assert.ok(Date.now() - t0 < 10_000);
    assert.ok(pid > 0);
    await waitFor(() => !alive(pid), 5000, 'the hung child to be killed');
    await stillWorks();
  });

  test('a child that runs out of memory (--max-old-space-size=16): "out of memory?" in one line', async () => {
    const oom = script('oom.js', "process.on('message', () => { const a = []; for (;;) a.push(new Array(1e5).fill({ x: a.length })); });\n");
    await assert.rejects(validateInChild(request(), { timeoutMs: 60_000, script: oom, execArgv: ['--max-old-space-size=16'] }), (e: unknown) => oneLineValidationError(e, /out of memory\?.*heap out of memory/));
    // The real worker with too small a heap to even load onnxruntime: the same clear error.
    await assert.rejects(validateInChild(request(), { timeoutMs: 60_000, execArgv: ['--max-old-space-size=4'] }), (e: unknown) => oneLineValidationError(e, /out of memory/));
    await stillWorks();
  });

  test('CLI: the child killed mid-run → exit 3, one line; a tiny --timeout → exit 3, one line', async () => {
    let victim = 0;
    const r = await cli(['fuse', model, '-o', path.join(dir, 'k.onnx')], {
      onStderr: (all, child) => {
        if (victim || !/running the original model/.test(all)) return;
        const k = childrenOf(child.pid!)[0];
        if (k) {
          victim = k.pid;
          process.kill(k.pid, 'SIGKILL');
        }
      },
    });
    assert.ok(victim > 0);
    errorLine(r, 3, /killed by SIGKILL/, /written but not validated/);
    const t = await cli(['fuse', model, '-o', path.join(dir, 't.onnx'), '--timeout', '0.05']);
    errorLine(t, 3, /did not finish within 0\.05 s/);
  });
});

// ----- a model above 2 GB ----------------------------------------------------------------------------

describe('a model above 2 GB with external data', () => {
  const GB2 = 2 ** 31;
  test('inspect stays far below the model size; fuse --no-validate writes external data; the output re-opens fused', { timeout: 240_000 }, async (t) => {
    const dir = freshDir('big');
    const free = fs.statfsSync(dir);
    const avail = free.bavail * free.bsize;
    assert.ok(avail >= 6 * 2 ** 30, `this test needs 6 GiB free in ${dir} (a 2.1 GB model and its fused copy); only ${(avail / 2 ** 30).toFixed(1)} GiB are free`);
    const t0 = Date.now();

    // Two RepVGG blocks (64 channels) and a classifier whose weight alone is over 2 GiB. The data
    // file is written streaming: the big weight first (so the blocks' weights lie past 2 GiB), in
    // 4 MiB chunks of one repeated pattern.
    const C = 64;
    const classes = 8_400_000; // × 64 × 4 bytes = 2.15 GB
    const b = new ModelBuilder({ seed: 4 });
    const x = b.input('x', [1, C, 8, 8]);
    let y = x;
    for (let i = 0; i < 2; i++) {
      y = b.relu(b.add(b.add(b.conv(y, C, C, [3, 3], { bn: true, name: `/b${i}/rbr_dense/conv/Conv` }), b.conv(y, C, C, [1, 1], { bn: true, name: `/b${i}/rbr_1x1/conv/Conv` })), b.bn(y, C, { name: `/b${i}/rbr_identity/BatchNormalization` })));
    }
    const pooled = b.op('GlobalAveragePool', [y]);
    const flat = b.op('Flatten', [pooled], { attrs: [{ name: 'axis', type: onnx.AttributeProto.AttributeType.INT, i: 1 }] });
    const m = b.model();
    const dataName = 'big.onnx.data';
    const dataPath = path.join(dir, dataName);
    const fd = fs.openSync(dataPath, 'w');
    let offset = 0;
    const ext = (name: string, dims: number[], length: number, at: number): onnx.ITensorProto => ({
      name, dims, dataType: 1, dataLocation: onnx.TensorProto.DataLocation.EXTERNAL,
      externalData: [{ key: 'location', value: dataName }, { key: 'offset', value: String(at) }, { key: 'length', value: String(length) }],
    });
    const bigLen = classes * C * 4;
    const chunk = new Float32Array(1 << 20);
    for (let i = 0; i < chunk.length; i++) chunk[i] = ((i * 2654435761) % 1000) / 1e6 - 5e-4;
    const cb = new Uint8Array(chunk.buffer);
    for (let done = 0; done < bigLen; ) {
      const n = Math.min(cb.length, bigLen - done);
      for (let w = 0; w < n; ) w += fs.writeSync(fd, cb, w, n - w, done + w);
      done += n;
    }
    offset = bigLen;
    const inits: onnx.ITensorProto[] = [ext('classifier.weight', [classes, C], bigLen, 0)];
    for (const init of m.graph!.initializer!) {
      const raw = init.rawData!;
      const pad = (4096 - (offset % 4096)) % 4096;
      offset += pad;
      fs.writeSync(fd, raw, 0, raw.length, offset);
      inits.push(ext(init.name!, init.dims as number[], raw.length, offset));
      offset += raw.length;
    }
    fs.closeSync(fd);
    m.graph!.initializer = inits;
    m.graph!.node!.push({ opType: 'Gemm', input: [flat, 'classifier.weight'], output: ['logits'], attribute: [{ name: 'transB', type: onnx.AttributeProto.AttributeType.INT, i: 1 }] });
    m.graph!.output = [{ name: 'logits', type: { tensorType: { elemType: 1, shape: { dim: [{ dimValue: 1 }, { dimValue: classes }] } } } }];
    const file = path.join(dir, 'big.onnx');
    fs.writeFileSync(file, onnx.ModelProto.encode(m).finish());
    const modelBytes = fs.statSync(file).size + fs.statSync(dataPath).size;
    assert.ok(modelBytes > GB2, `the model is ${modelBytes} bytes`);
    t.diagnostic(`generated ${(modelBytes / 1e9).toFixed(2)} GB in ${((Date.now() - t0) / 1000).toFixed(1)} s`);

    const peak = (r: Run) => Number(/maxrss_kib=(\d+)/.exec(r.stderr)?.[1]) * 1024;
    const haveTime = fs.existsSync('/usr/bin/time');
    const run = (args: string[]) =>
      haveTime
        ? cli(args, { time: true, timeoutMs: 200_000 })
        : cli(args, { timeoutMs: 200_000, env: { ...process.env, NODE_OPTIONS: `-r ${path.join(repoRoot, 'out', 'bench', 'rss-preload.js')}`, REPFUSE_BENCH_RSS_FILE: path.join(dir, 'rss') } });
    const peakOf = (r: Run) => (haveTime ? peak(r) : Number(fs.readFileSync(path.join(dir, 'rss'), 'utf8').split(' ')[0]) * 1024);

    const t1 = Date.now();
    const ins = await run(['inspect', file, '--json']);
    assert.equal(ins.code, 0, ins.stderr);
    const report = JSON.parse(ins.stdout) as { blocks: unknown[]; model: { paramCount: number } };
    assert.equal(report.blocks.length, 2);
    assert.ok(report.model.paramCount > classes * C);
    const inspectPeak = peakOf(ins);
    t.diagnostic(`inspect: ${((Date.now() - t1) / 1000).toFixed(1)} s, peak RSS ${(inspectPeak / 2 ** 20).toFixed(0)} MiB`);
    assert.ok(inspectPeak < 200 * 2 ** 20, `inspect peaked at ${(inspectPeak / 2 ** 20).toFixed(0)} MiB for a ${(modelBytes / 1e9).toFixed(2)} GB model`);

    const t2 = Date.now();
    const out = path.join(dir, 'big.fused.onnx');
    const fr = await run(['fuse', file, '--no-validate', '--json']);
    assert.equal(fr.code, 0, fr.stderr);
    const fusePeak = peakOf(fr);
    t.diagnostic(`fuse: ${((Date.now() - t2) / 1000).toFixed(1)} s, peak RSS ${(fusePeak / 2 ** 20).toFixed(0)} MiB`);
    assert.ok(fusePeak < 512 * 2 ** 20, `fuse streamed the weights (peak ${(fusePeak / 2 ** 20).toFixed(0)} MiB)`);
    assert.deepEqual(ls(dir), ['big.fused.onnx', 'big.fused.onnx.data', 'big.onnx', 'big.onnx.data', ...(haveTime ? [] : ['rss'])]);
    assert.ok(fs.statSync(out + '.data').size > GB2);

    const fused = openOnnx(out);
    try {
      assert.ok(fused.usesExternalData);
      const a = analyzeOnnx(fused, { foldBN: true });
      assert.equal(a.detection.blocks.length, 0, 'no block left to fuse');
      const convs = fused.graph.nodes.filter((n) => n.opType === 'Conv');
      assert.equal(convs.length, 2);
      for (const c of convs) assert.deepEqual(fused.graph.initializers.get(c.inputs[1])!.dims, [C, C, 3, 3]);
      const w = fused.graph.initializers.get('classifier.weight')!;
      assert.equal(w.storage.kind, 'external');
      // A slice of the big weight past 2 GiB reads back as written.
      if (w.storage.kind === 'external') {
        const src = fused.external.source(w.storage.file);
        const at = w.storage.offset + 2 ** 31 + 4096;
        const got = new Float32Array(src.readOwned(at, 16).buffer);
        const idx = ((2 ** 31 + 4096) / 4) % chunk.length;
        assert.deepEqual(Array.from(got), Array.from(chunk.subarray(idx, idx + 4)));
      }
    } finally {
      fused.close();
    }
    t.diagnostic(`total ${((Date.now() - t0) / 1000).toFixed(1)} s`);
    fs.rmSync(dir, { recursive: true, force: true });
  });
});
