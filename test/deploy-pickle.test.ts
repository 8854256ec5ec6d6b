// Bound methods in pickles: YOLO repos' Model.fuse() leaves `m.forward = m.forward_fuse` on the
// instance, and torch.save pickles it as getattr(m, 'forward_fuse') with `m` taken from the memo.
// The emulating reader accepts exactly that shape (inert, no warning) and flags every other use of
// builtins.getattr; the writer emits the same opcodes PyTorch does. The fixture was made by torch
// 1.13 (test/fixtures/deploy/make_deploy_fixtures.py); PyTorch itself loads and runs the rewrite.
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { BufferSource, FileSource } from '../src/core/bytes';
import { openTorch } from '../src/core/torch/load';
import { pickle, unpickle } from '../src/core/torch/pickle';
import { encodeTorchZip, writeTorchZip } from '../src/core/torch/save';
import { PyBoundMethod, PyDict, PyObject, type PyValue } from '../src/core/torch/values';
import { ZipArchive } from '../src/core/torch/zip';
import { disassemble, OPS } from './fuzz/pickleops';
import { makeTmp, repoRoot, rmTmp } from './helpers/paths';
import { pk, u32le } from './helpers/torch-bytes';

const PYTHON = process.env.REPFUSE_TEST_PYTHON || '/usr/bin/python3';
const DIR = path.join(repoRoot, 'test', 'fixtures', 'deploy');
const FIXTURE = path.join(DIR, 'bound_method.pt');
const X = (s: string): Uint8Array => pk('X', u32le(Buffer.byteLength(s)), Buffer.from(s, 'utf8'));

let tmp: string;
before(() => {
  tmp = makeTmp();
});
after(() => rmTmp(tmp));

/** data.pkl of a torch zip. */
function dataPkl(bytes: Uint8Array): Uint8Array {
  const src = new BufferSource(bytes, 'mem.pt');
  const z = ZipArchive.open(src);
  const e = z.entries.find((x) => x.name.endsWith('/data.pkl'));
  assert.ok(e, 'data.pkl');
  return z.read(e);
}

/**
 * The pickle as tokens with memo indexes resolved: BINPUT → 'PUT', BINGET n → 'GET(<what was put
 * at n>)', strings and globals with their text. Two writers that memoize differently compare equal.
 */
function tokens(b: Uint8Array): string[] {
  const { instrs } = disassemble(b);
  const memo = new Map<number, string>();
  const out: string[] = [];
  for (const ins of instrs) {
    const name = OPS[ins.op].name;
    const arg = b.subarray(ins.argAt + ins.argWidth, ins.end);
    const idx = ins.argWidth === 1 ? b[ins.argAt] : ins.argWidth === 4 ? Buffer.from(b.buffer, b.byteOffset, b.length).readUInt32LE(ins.argAt) : -1;
    if (name === 'BINPUT' || name === 'LONG_BINPUT') {
      memo.set(idx, out[out.length - 1]);
      out.push('PUT');
    } else if (name === 'BINGET' || name === 'LONG_BINGET') out.push(`GET(${memo.get(idx)})`);
    else if (name === 'BINUNICODE') out.push(`STR ${Buffer.from(arg).toString('utf8')}`);
    else if (name === 'GLOBAL') out.push(`GLOBAL ${Buffer.from(b.subarray(ins.at + 1, ins.end)).toString('utf8').trim().replace('\n', ' ')}`);
    else out.push(name);
  }
  return out;
}

/** The tokens from the `forward` key to the REDUCE (and its PUT) that builds the bound method. */
function boundMethodRegion(t: string[]): string[] {
  const i = t.indexOf('STR forward');
  assert.ok(i >= 0, "a 'forward' key");
  const r = t.indexOf('REDUCE', i);
  return t.slice(i, r + 2);
}

function forwardOf(root: PyValue): { obj: PyObject; bm: PyValue | undefined } {
  const model = (root as PyDict).get('model') as PyObject;
  const first = ((model.state as PyDict).get('_modules') as PyDict).get('0') as PyObject;
  return { obj: first, bm: (first.state as PyDict).get('forward') };
}

describe('bound methods (`forward = forward_fuse`) in pickles', () => {
  test("torch 1.13's pickle of a fused YOLO-style Conv reads as an inert bound method, with no warning", () => {
    const src = new FileSource(FIXTURE);
    try {
      const t = openTorch(src);
      assert.deepEqual(t.warnings, []);
      assert.deepEqual(t.dangerousGlobals, []);
      assert.ok(t.globals.includes('__builtin__.getattr'), 'the file does name getattr');
      const { obj, bm } = forwardOf(t.root);
      assert.ok(bm instanceof PyBoundMethod, 'forward is a PyBoundMethod');
      assert.equal(bm.self, obj, 'bound to the module that holds it (the memo self-reference)');
      assert.equal(bm.name, 'forward_fuse');
      assert.equal(obj.className, 'deploy_models.Conv');
      assert.equal(((obj.state as PyDict).get('_modules') as PyDict).has('bn'), false);
    } finally {
      src.close();
    }
  });

  test('the writer emits the opcodes PyTorch wrote: GLOBAL getattr, the module from the memo, the name, TUPLE2, REDUCE', async () => {
    const original = fs.readFileSync(FIXTURE);
    const src = new FileSource(FIXTURE);
    let out: Uint8Array;
    try {
      out = await encodeTorchZip(openTorch(src).root, { archiveName: 'bound_method' });
    } finally {
      src.close();
    }
    const theirs = boundMethodRegion(tokens(dataPkl(original)));
    const ours = boundMethodRegion(tokens(dataPkl(out)));
    assert.deepEqual(theirs, ['STR forward', 'PUT', 'GLOBAL __builtin__ getattr', 'PUT', 'GET(NEWOBJ)', 'STR forward_fuse', 'PUT', 'TUPLE2', 'PUT', 'REDUCE', 'PUT']);
    assert.deepEqual(ours, theirs);
    // Read back: the same inert value, still no warning.
    const again = openTorch(new BufferSource(out, 'out.pt'));
    assert.deepEqual(again.warnings, []);
    assert.deepEqual(again.dangerousGlobals, []);
    const { obj, bm } = forwardOf(again.root);
    assert.ok(bm instanceof PyBoundMethod && bm.self === obj && bm.name === 'forward_fuse');
  });

  test('PyTorch loads the rewritten checkpoint and runs forward_fuse (output equal to the original)', async () => {
    const src = new FileSource(FIXTURE);
    const out = path.join(tmp, 'bm_out.pt');
    try {
      await writeTorchZip(out, openTorch(src).root, { archiveName: 'bm_out' });
    } finally {
      src.close();
    }
    const script = [
      'import sys, json, numpy as np, torch',
      `sys.path.insert(0, ${JSON.stringify(path.join(DIR, 'python'))})`,
      'from deploy_models import Conv',
      `ck = torch.load(${JSON.stringify(out)}, map_location="cpu")`,
      'm = ck["model"].float().eval()',
      `x = torch.from_numpy(np.load(${JSON.stringify(path.join(DIR, 'bound_method.input.npy'))}))`,
      `y = np.load(${JSON.stringify(path.join(DIR, 'bound_method.output.npy'))})`,
      'f = m[0].__dict__.get("forward")',
      'with torch.no_grad(): out = m(x).numpy()',
      'print(json.dumps({"bound": f is not None and f.__func__ is Conv.forward_fuse and f.__self__ is m[0], "second": "forward" in m[1].__dict__, "diff": float(np.abs(out - y).max()), "epoch": ck["epoch"]}))',
    ].join('\n');
    const r = spawnSync(PYTHON, ['-c', script], { encoding: 'utf8', timeout: 120_000 });
    assert.equal(r.status, 0, `PyTorch could not load or run the output (needs Debian's python3-torch): ${r.error?.message ?? r.stderr.slice(-1500)}`);
    const j = JSON.parse(r.stdout.trim().split('\n').pop()!);
    assert.equal(j.bound, true, 'forward is forward_fuse bound to the same module');
    assert.equal(j.second, false, 'the unfused Conv has no instance forward');
    assert.equal(j.epoch, -1);
    assert.equal(j.diff, 0);
  });
});

describe('every other use of builtins.getattr stays flagged', () => {
  // An object built by NEWOBJ whose state dict holds `key` → getattr(<target>, name).
  const P2 = [0x80, 2];
  const obj = (key: string, target: Uint8Array, name: string, tail: Uint8Array = pk()) =>
    pk(
      P2, 'c', 'm\nConv\n', ')', 0x81, 'q', 1,
      '}', X(key), 'c', '__builtin__\ngetattr\n', target, X(name), 0x86, 'R', tail, 's', 'b', '.',
    );
  const self = pk('h', 1);
  const flagged = (b: Uint8Array) => {
    const r = unpickle(b);
    assert.ok(r.dangerous.includes('__builtin__.getattr'), `flagged: ${r.dangerous.join(', ')}`);
    assert.ok(r.warnings.includes('the file references builtins.getattr (pickled as __builtin__.getattr): not executed'));
    return r.value;
  };

  test('the accepted shape itself', () => {
    const r = unpickle(obj('forward', self, 'forward_fuse'));
    assert.deepEqual(r.dangerous, []);
    assert.deepEqual(r.warnings, []);
    const o = r.value as PyObject;
    const bm = (o.state as PyDict).get('forward') as PyBoundMethod;
    assert.ok(bm instanceof PyBoundMethod && bm.self === o);
    // And written back (the writer allows it in this shape only).
    const again = unpickle(pickle(o));
    assert.deepEqual(again.dangerous, []);
  });

  test('a private or dunder method name', () => {
    flagged(obj('forward', self, '__reduce__'));
    flagged(obj('forward', self, '_private'));
  });

  test("stored under another key than 'forward'", () => {
    const v = flagged(obj('backward', self, 'forward_fuse')) as PyObject;
    assert.throws(() => pickle(v), /anywhere but as its own module's 'forward' attribute/);
  });

  test('bound to another object than the one that stores it', () => {
    const other = pk('c', 'm\nConv\n', ')', 0x81);
    const v = flagged(obj('forward', other, 'forward_fuse')) as PyObject;
    assert.throws(() => pickle(v), /anywhere but as its own module's 'forward' attribute/);
  });

  test('on a global (getattr(os.path, "system")) or on the result of a call', () => {
    flagged(obj('forward', pk('c', 'os\npath\n'), 'system'));
    const called = pk('c', 'm\nfactory\n', ')', 'R');
    flagged(obj('forward', called, 'forward_fuse'));
  });

  test('the bound method called (it would run when loaded): flagged, and the writer refuses it', () => {
    // forward = getattr(self, 'forward_fuse'), then the same method called with one argument.
    const b = pk(
      P2, 'c', 'm\nConv\n', ')', 0x81, 'q', 1,
      '}', X('forward'), 'c', '__builtin__\ngetattr\n', 'h', 1, X('forward_fuse'), 0x86, 'R', 'q', 2, 's',
      X('y'), 'h', 2, 'K', 1, 0x85, 'R', 's', 'b', '.',
    );
    const v = flagged(b) as PyObject;
    assert.throws(() => pickle(v), /refusing to pickle a call of the bound method/);
  });

  test('getattr left on the stack, used as a value, or called through OBJ', () => {
    flagged(pk(P2, ']', 'c', '__builtin__\ngetattr\n', 'a', '.'));
    flagged(pk(P2, '(', 'c', '__builtin__\ngetattr\n', 'c', 'os\npath\n', X('system'), 'o', '.'));
  });
});
