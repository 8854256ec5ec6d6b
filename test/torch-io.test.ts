// PyTorch / safetensors I/O without Python: the emulating unpickler (opcode by opcode), hostile
// pickles, the zip reader's defences, ZIP64, the writers' round trips, the legacy format, lazy
// tensors, and every real fixture in test/fixtures/torch against its manifest.
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import * as zlib from 'node:zlib';
import { BufferSource, FileSource } from '../src/core/bytes';
import { DType, encodeFloats, floatToBfloat16, floatToHalf } from '../src/core/dtype';
import { FormatError, RepFuseError } from '../src/core/errors';
import { encodeSafetensors, readSafetensors, type SafetensorsInput, writeSafetensors } from '../src/core/safetensors';
import { readLegacyTorch } from '../src/core/torch/legacy';
import { namedTensors, openTorch } from '../src/core/torch/load';
import { decodeLong, encodeLong, pickle, unpickle } from '../src/core/torch/pickle';
import { encodeTorchZip, writeTorchZip } from '../src/core/torch/save';
import { NewTensor, newTensor, readTensor, readTensorBytes, TorchStorage, TorchTensor } from '../src/core/torch/tensor';
import {
  NdArray,
  NumpyScalar,
  NumpyDType,
  PyComplex,
  PyDict,
  PyFloat,
  PyGlobal,
  PyObject,
  PySet,
  PySlice,
  PyTuple,
  type PyValue,
  pyNumber,
} from '../src/core/torch/values';
import { crc32, crc32Table, ZipArchive, ZipWriter } from '../src/core/torch/zip';
import { makeTmp, repoRoot, rmTmp } from './helpers/paths';
import { pk, pyDiff, rawZip, u32le, u64le, utf8 } from './helpers/torch-bytes';

const load = (b: Uint8Array, opts = {}): PyValue => unpickle(b, opts).value;
const P2 = [0x80, 2];
/** BINUNICODE of a string. */
const X = (s: string): Uint8Array => pk('X', u32le(Buffer.byteLength(s)), Buffer.from(s, 'utf8'));

function throwsFormat(fn: () => unknown, re: RegExp): void {
  assert.throws(fn, (err: unknown) => {
    assert.ok(err instanceof FormatError, `expected a FormatError, got ${String(err)}`);
    assert.match((err as Error).message, re);
    return true;
  });
}

let tmp: string;
before(() => {
  tmp = makeTmp();
});
after(() => rmTmp(tmp));

// ---------------------------------------------------------------------------------------------
describe('pickle opcodes', () => {
  test('PROTO, FRAME, STOP and small ints (BININT1/BININT2/BININT)', () => {
    assert.equal(load(pk(P2, 'K', 7, '.')), 7);
    assert.equal(load(pk(P2, 'M', [0x2c, 0x01], '.')), 300);
    assert.equal(load(pk(P2, 'J', u32le(-5 >>> 0), '.')), -5);
    const body = pk('K', 9, '.');
    assert.equal(load(pk(0x80, 4, 0x95, u64le(body.length), body)), 9);
    throwsFormat(() => load(pk(0x80, 9, 'N.')), /unsupported pickle protocol 9/);
  });

  test('LONG1 / LONG4 give exact BigInts beyond 2^53, numbers below', () => {
    assert.equal(load(pk(P2, 0x8a, 9, [1, 0, 0, 0, 0, 0, 0, 0, 1], '.')), 2n ** 64n + 1n);
    assert.equal(load(pk(P2, 0x8a, 8, [0, 0, 0, 0, 0, 0, 0, 0x80], '.')), -(2n ** 63n));
    assert.equal(load(pk(P2, 0x8a, 7, [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x1f], '.')), 2 ** 53 - 1);
    assert.equal(load(pk(P2, 0x8a, 7, [0, 0, 0, 0, 0, 0, 0x20], '.')), 2n ** 53n);
    assert.equal(load(pk(P2, 0x8a, 0, '.')), 0);
    assert.equal(load(pk(P2, 0x8a, 1, [0xff], '.')), -1);
    assert.equal(load(pk(P2, 0x8b, u32le(2), [0x00, 0x80], '.')), -32768);
    for (const v of [0n, 1n, -1n, 127n, 128n, -128n, -129n, 255n, 2n ** 64n + 1n, -(2n ** 63n), 12345678901234567890123n]) {
      const d = decodeLong(encodeLong(v));
      assert.equal(BigInt(d), v, `LONG round trip of ${v}`);
    }
  });

  test('protocol-0 text forms: INT (incl. booleans), LONG, FLOAT, STRING, UNICODE', () => {
    const v = load(
      pk('(', 'I42\n', 'I01\n', 'I00\n', 'L12345678901234567890L\n', 'F0.25\n', 'F3.0\n', "S'a\\nb\\x41\\'c'\n", 'Vh\\u00e9llo\\U0001f600\n', 'l', '.'),
    ) as PyValue[];
    assert.equal(v[0], 42);
    assert.equal(v[1], true);
    assert.equal(v[2], false);
    assert.equal(v[3], 12345678901234567890n);
    assert.equal(v[4], 0.25);
    assert.ok(v[5] instanceof PyFloat && v[5].value === 3);
    assert.equal(v[6], "a\nbA'c");
    assert.equal(v[7], 'héllo😀');
  });

  test('BINFLOAT: fractional floats are numbers, integral floats PyFloat', () => {
    const f = (x: number): number[] => {
      const b = Buffer.alloc(8);
      b.writeDoubleBE(x);
      return [...b];
    };
    assert.equal(load(pk(P2, 'G', f(1.5), '.')), 1.5);
    const two = load(pk(P2, 'G', f(2), '.'));
    assert.ok(two instanceof PyFloat && two.value === 2);
    assert.equal(pyNumber(two), 2);
    assert.ok(Object.is((load(pk(P2, 'G', f(-0), '.')) as PyFloat).value, -0));
    assert.ok(Number.isNaN(load(pk(P2, 'G', f(NaN), '.')) as number));
  });

  test('strings and bytes: BINUNICODE, SHORT_BINUNICODE, BINUNICODE8, BIN/SHORT_BINSTRING, BINBYTES(8), BYTEARRAY8', () => {
    const s = utf8('héllo');
    assert.equal(load(pk(P2, 'X', u32le(s.length), s, '.')), 'héllo');
    assert.equal(load(pk(0x80, 4, 0x8c, s.length, s, '.')), 'héllo');
    assert.equal(load(pk(0x80, 4, 0x8d, u64le(s.length), s, '.')), 'héllo');
    assert.equal(load(pk(P2, 'T', u32le(3), 'abc', '.')), 'abc');
    assert.equal(load(pk(P2, 'U', 3, 'abc', '.')), 'abc');
    assert.deepEqual(load(pk(P2, 'U', 2, [0xff, 0xfe], '.')), Uint8Array.of(0xff, 0xfe)); // a Python 2 str that is not text
    assert.deepEqual(load(pk(0x80, 3, 'C', 3, 'abc', '.')), Uint8Array.from(Buffer.from('abc')));
    assert.deepEqual(load(pk(0x80, 3, 'B', u32le(2), [1, 2], '.')), Uint8Array.of(1, 2));
    assert.deepEqual(load(pk(0x80, 4, 0x8e, u64le(2), [3, 4], '.')), Uint8Array.of(3, 4));
    assert.deepEqual(load(pk(0x80, 5, 0x96, u64le(1), [5], '.')), Uint8Array.of(5));
  });

  test('NONE, NEWTRUE, NEWFALSE, tuples (EMPTY_TUPLE, TUPLE1-3, TUPLE)', () => {
    const t = load(pk(P2, '(', 'N', 0x88, 0x89, ')', 'K', 1, 0x85, 'K', 1, 'K', 2, 0x86, 'K', 1, 'K', 2, 'K', 3, 0x87, 't', '.')) as PyTuple;
    assert.ok(t instanceof PyTuple);
    assert.equal(t.items[0], null);
    assert.equal(t.items[1], true);
    assert.equal(t.items[2], false);
    assert.deepEqual((t.items[3] as PyTuple).items, []);
    assert.deepEqual((t.items[4] as PyTuple).items, [1]);
    assert.deepEqual((t.items[5] as PyTuple).items, [1, 2]);
    assert.deepEqual((t.items[6] as PyTuple).items, [1, 2, 3]);
  });

  test('lists: EMPTY_LIST, APPEND, APPENDS, LIST', () => {
    assert.deepEqual(load(pk(P2, ']', 'K', 1, 'a', '(', 'K', 2, 'K', 3, 'e', '.')), [1, 2, 3]);
    assert.deepEqual(load(pk('(', 'K', 4, 'K', 5, 'l', '.')), [4, 5]);
  });

  test('dicts: EMPTY_DICT, SETITEM, SETITEMS, DICT; keys compare like Python (1 == 1.0 == True)', () => {
    const d = load(pk(P2, '}', 'X', u32le(1), 'a', 'K', 1, 's', '(', 'K', 1, 'X', u32le(1), 'b', 0x88, 'X', u32le(1), 'c', 'u', '.')) as PyDict;
    assert.ok(d instanceof PyDict && !d.ordered);
    assert.deepEqual(d.keys(), ['a', 1]);
    assert.equal(d.get('a'), 1);
    assert.equal(d.get(1), 'c'); // True replaced key 1's value, keeping its position
    const d2 = load(pk('(', 'K', 1, 'K', 2, 'd', '.')) as PyDict;
    assert.equal(d2.get(1), 2);
    const tk = load(pk(P2, '}', 'K', 1, 'K', 2, 0x86, 'K', 9, 's', '.')) as PyDict;
    assert.equal(tk.get(new PyTuple([1, 2])), 9);
  });

  test('sets: EMPTY_SET, ADDITEMS, FROZENSET', () => {
    const s = load(pk(0x80, 4, 0x8f, '(', 'K', 1, 'K', 2, 'K', 1, 0x90, '.')) as PySet;
    assert.ok(s instanceof PySet && !s.frozen);
    assert.deepEqual(s.items, [1, 2]);
    const f = load(pk(0x80, 4, '(', 'K', 3, 'K', 3, 0x91, '.')) as PySet;
    assert.ok(f.frozen);
    assert.deepEqual(f.items, [3]);
  });

  test('MARK, POP, POP_MARK, DUP', () => {
    assert.equal(load(pk(P2, 'K', 1, 'K', 2, '0', '.')), 1);
    assert.equal(load(pk(P2, 'K', 7, '(', 'K', 1, 'K', 2, '1', '.')), 7);
    assert.deepEqual((load(pk(P2, 'K', 5, '2', 0x86, '.')) as PyTuple).items, [5, 5]);
    assert.equal(load(pk(P2, 'K', 7, '(', '0', '.')), 7); // POP on an empty frame pops the MARK, like Python
  });

  test('memo: BINPUT/BINGET, LONG_BINPUT/LONG_BINGET, PUT/GET, MEMOIZE share objects', () => {
    const a = load(pk(P2, ']', 'q', 0, 'h', 0, 0x86, '.')) as PyTuple;
    assert.equal(a.items[0], a.items[1]);
    const b = load(pk(P2, ']', 'r', u32le(70000), 'j', u32le(70000), 0x86, '.')) as PyTuple;
    assert.equal(b.items[0], b.items[1]);
    const c = load(pk(']', 'p3\n', 'g3\n', 0x86, '.')) as PyTuple;
    assert.equal(c.items[0], c.items[1]);
    const d = load(pk(0x80, 4, ']', 0x94, 'h', 0, 0x86, '.')) as PyTuple;
    assert.equal(d.items[0], d.items[1]);
    throwsFormat(() => load(pk(P2, 'h', 5, '.')), /memo key 5 is not defined/);
    throwsFormat(() => load(pk(P2, ']', 'q', 0, ']', 'q', 1, '.'), { maxMemo: 1 }), /memo grows past 1/);
  });

  test('a self-referencing list loads, and pickles back with its cycle', () => {
    const v = load(pk(P2, ']', 'q', 0, 'h', 0, 'a', '.')) as PyValue[];
    assert.equal(v.length, 1);
    assert.equal(v[0], v);
    const again = load(pickle(v)) as PyValue[];
    assert.equal(again[0], again);
    // A tuple reached through its own list (Python writes POP + GET for the inner copy).
    const l: PyValue[] = [];
    const t = new PyTuple([l]);
    l.push(t);
    const back = load(pickle(t)) as PyTuple;
    assert.equal(((back.items[0] as PyValue[])[0] as PyTuple).items[0], back.items[0]);
  });

  test('deep nesting: MARK depth is bounded; deep values load, and consumers stay iterative', () => {
    throwsFormat(() => load(pk(P2, new Array(20000).fill(0x28), '.')), /MARKs nest deeper than 10000/);
    const n = 100000;
    const bytes = pk(P2, new Array(n).fill(0x5d), new Array(n - 1).fill(0x61), '.');
    let v = load(bytes) as PyValue[];
    let depth = 1;
    while (v.length) {
      v = v[0] as PyValue[];
      depth++;
    }
    assert.equal(depth, n);
    const deep = load(bytes);
    assert.equal(namedTensors(deep).size, 0);
    assert.throws(() => pickle(deep), (e: unknown) => e instanceof RepFuseError && /nests deeper than 1000/.test((e as Error).message));
    throwsFormat(() => load(pk(P2, 'K', 1, 'K', 1), { maxStack: 1 }), /stack grows past 1/);
  });

  test('globals and objects are emulated: GLOBAL, STACK_GLOBAL, REDUCE, NEWOBJ, NEWOBJ_EX, INST, OBJ, BUILD', () => {
    const r = load(pk(P2, 'c', 'mymod\nThing\n', '(', 'K', 1, 'K', 2, 't', 'R', '}', 'X', u32le(1), 'k', 'K', 3, 's', 'b', '.')) as PyObject;
    assert.ok(r instanceof PyObject);
    assert.equal(r.qualname, 'mymod.Thing');
    assert.equal(r.how, 'reduce');
    assert.deepEqual(r.args, [1, 2]);
    assert.equal((r.state as PyDict).get('k'), 3);

    const n = load(pk(0x80, 4, 0x8c, 5, 'mymod', 0x8c, 5, 'Thing', 0x93, ')', 0x81, '(', 'K', 1, 'e', '(', 'K', 2, 'K', 3, 'u', '.')) as PyObject;
    assert.equal(n.how, 'newobj');
    assert.deepEqual(n.listItems, [1]);
    assert.deepEqual(n.dictItems, [[2, 3]]);

    const x = load(pk(0x80, 4, 'c', 'mymod\nThing\n', 'K', 1, 0x85, '}', 'X', u32le(2), 'kw', 'N', 's', 0x92, '.')) as PyObject;
    assert.equal(x.how, 'newobj_ex');
    assert.deepEqual(x.args, [1]);
    assert.equal((x.kwargs as PyDict).get('kw'), null);

    const i = load(pk('(', 'K', 1, 'i', 'mymod\nThing\n', '.')) as PyObject;
    assert.equal(i.how, 'inst');
    assert.deepEqual(i.args, [1]);
    const o = load(pk('(', 'c', 'mymod\nThing\n', 'K', 2, 'o', '.')) as PyObject;
    assert.equal(o.how, 'obj');
    assert.deepEqual(o.args, [2]);

    // A GLOBAL that is not called stays a reference.
    const g = load(pk(P2, 'c', 'torch\nfloat16\n', '.'));
    assert.ok(g instanceof PyGlobal && g.qualname === 'torch.float16');
    // Python 2 module names are mapped like Python 3 does.
    const s = load(pk(P2, 'c', '__builtin__\nset\n', ']', '(', 'K', 1, 'K', 2, 'e', 0x85, 'R', '.'));
    assert.ok(s instanceof PySet && s.size === 2);
    // BUILD on an object already being built (its state refers to itself) is fine.
    const selfState = load(pk(P2, 'c', 'm\nC\n', ')', 0x81, 'q', 0, '}', 'X', u32le(2), 'me', 'h', 0, 's', 'b', '.')) as PyObject;
    assert.equal((selfState.state as PyDict).get('me'), selfState);
  });

  test('allow-listed globals become data', () => {
    const od = load(pk(P2, 'c', 'collections\nOrderedDict\n', ')', 'R', '.'));
    assert.ok(od instanceof PyDict && od.ordered);
    const sz = load(pk(P2, 'c', 'torch\nSize\n', 'K', 2, 'K', 3, 0x86, 0x85, 'R', '.')) as PyTuple;
    assert.equal(sz.tag, 'torch.Size');
    assert.deepEqual(sz.items, [2, 3]);
    const bytes = load(pk(P2, 'c', '_codecs\nencode\n', 'X', u32le(4), [0x61, 0xc3, 0xbf, 0x00], 'X', u32le(6), 'latin1', 0x86, 'R', '.'));
    assert.deepEqual(bytes, Uint8Array.of(0x61, 0xff, 0x00));
    const sl = load(pk(P2, 'c', '__builtin__\nslice\n', 'K', 1, 'K', 5, 'N', 0x87, 'R', '.')) as PySlice;
    assert.ok(sl instanceof PySlice && sl.start === 1 && sl.stop === 5 && sl.step === null);
    const cx = load(pk(P2, 'c', '__builtin__\ncomplex\n', 'K', 1, 'K', 2, 0x86, 'R', '.')) as PyComplex;
    assert.ok(cx instanceof PyComplex && cx.re === 1 && cx.im === 2);
    // numpy.float64(0.5) as torch checkpoints pickle it: scalar(dtype('f8') + BUILD state, _codecs bytes).
    const half = Buffer.alloc(8);
    half.writeDoubleLE(0.5);
    const sc = load(
      pk(P2, 'c', 'numpy.core.multiarray\nscalar\n', 'c', 'numpy\ndtype\n', 'X', u32le(2), 'f8', 0x89, 0x88, 0x87, 'R',
        '(', 'K', 3, 'X', u32le(1), '<', 'N', 'N', 'N', 'J', u32le(0xffffffff), 'J', u32le(0xffffffff), 'K', 0, 't', 'b',
        'c', '_codecs\nencode\n', 'X', u32le(Buffer.from(half.toString('latin1'), 'utf8').length), Buffer.from(half.toString('latin1'), 'utf8'),
        'X', u32le(6), 'latin1', 0x86, 'R', 0x86, 'R', '.'),
    );
    // Kept as a numpy scalar (so a rewritten checkpoint still holds one), with its value readable.
    assert.ok(sc instanceof NumpyScalar && sc.dtype.descr === 'f8' && sc.module === 'numpy.core.multiarray');
    assert.equal(pyNumber(sc), 0.5);
    assert.equal(Buffer.from(pickle(sc)).indexOf('numpy.core.multiarray\nscalar'), 3);
    assert.deepEqual(unpickle(pickle(sc)).value, sc);
    // torch.device stays an inert object and is not reported.
    const r = unpickle(pk(P2, 'c', 'torch\ndevice\n', 'X', u32le(3), 'cpu', 0x85, 'R', '.'));
    assert.ok(r.value instanceof PyObject && r.value.qualname === 'torch.device');
    assert.deepEqual(r.warnings, []);
  });

  test('persistent ids resolve through the callback (PERSID, BINPERSID); without one they are an error', () => {
    const seen: PyValue[] = [];
    const v = load(pk(P2, '(', 'P', 'abc\n', 'X', u32le(1), 'k', 'Q', 'l', '.'), { persistentLoad: (pid: PyValue) => (seen.push(pid), `<${String(pid)}>`) });
    assert.deepEqual(v, ['<abc>', '<k>']);
    throwsFormat(() => load(pk(P2, 'N', 'Q', '.')), /persistent id/);
  });

  test('errors name the opcode and offset: unknown opcode, underflow, truncation, lying lengths, buffers, extensions', () => {
    throwsFormat(() => load(pk(P2, 0xff, '.')), /^unknown pickle opcode 0xff at offset 2\.$/);
    throwsFormat(() => load(pk(P2, 'a', '.')), /stack underflow \(pickle opcode 0x61 at offset 2\)/);
    throwsFormat(() => load(pk(P2, 'K')), /ends unexpectedly/);
    throwsFormat(() => load(pk(P2, 'N')), /without a STOP/);
    throwsFormat(() => load(pk(P2, 'X', u32le(0xfffffff0), 'abc.')), /string of 4294967280 bytes runs past the end/);
    throwsFormat(() => load(pk(0x80, 4, 0x8e, u64le(2 ** 40), '.')), /runs past the end/);
    throwsFormat(() => load(pk(0x80, 5, 0x97, '.')), /out-of-band/);
    throwsFormat(() => load(pk(P2, 0x82, 1, '.')), /extension-registry/);
    throwsFormat(() => load(pk(P2, ']', 'K', 1, 'K', 1, 's', '.')), /SETITEM on a list/);
    throwsFormat(() => load(pk(P2, 'K', 1, '}', 'b', '.')), /BUILD on a int/);
  });
});

// ---------------------------------------------------------------------------------------------
describe('hostile pickles', () => {
  test('os.system / eval / subprocess.Popen become inert objects, are reported, and nothing runs', () => {
    const marker = path.join(tmp, 'pwned-marker');
    const cmd = `touch ${marker}`;
    const b = pk(
      P2, '}', 'q', 0, '(',
      X('sys'), 'c', 'posix\nsystem\n', X(cmd), 0x85, 'R',
      X('eval'), 'c', '__builtin__\neval\n', X(`__import__('os').system('${cmd}')`), 0x85, 'R',
      X('popen'), 'c', 'commands\nPopen\n', ']', '(', X('touch'), X(marker), 'e', 0x85, 'R',
      // getattr(os.path, 'system')(cmd): the result of a dangerous call used as a callable
      X('getattr'), 'c', '__builtin__\ngetattr\n', 'c', 'os\npath\n', X('system'), 0x86, 'R', X(cmd), 0x85, 'R',
      'u', '.',
    );
    const r = unpickle(b);
    const d = r.value as PyDict;
    const sys = d.get('sys') as PyObject;
    assert.ok(sys instanceof PyObject && sys.qualname === 'posix.system' && sys.args[0] === cmd);
    assert.equal((d.get('eval') as PyObject).qualname, 'builtins.eval');
    assert.equal((d.get('popen') as PyObject).qualname, 'subprocess.Popen');
    const ga = d.get('getattr') as PyObject;
    assert.ok(ga.callee instanceof PyObject && ga.callee.qualname === 'builtins.getattr');
    assert.ok(r.warnings.includes('the file references os.system (pickled as posix.system): not executed'));
    assert.ok(r.warnings.includes('the file references builtins.eval (pickled as __builtin__.eval): not executed'));
    assert.ok(r.warnings.includes('the file references subprocess.Popen (pickled as commands.Popen): not executed'));
    assert.ok(r.warnings.includes('the file references builtins.getattr (pickled as __builtin__.getattr): not executed'));
    assert.deepEqual(r.dangerous.sort(), ['__builtin__.eval', '__builtin__.getattr', 'commands.Popen', 'os.path', 'posix.system']);
    assert.equal(fs.existsSync(marker), false);
    // The writer refuses to re-emit them.
    assert.throws(() => pickle(d), /refusing to write a reference to/);
  });

  test('names that collide with JavaScript internals stay inert data', async () => {
    const v = load(pk(P2, 'c', '__proto__\nconstructor\n', ')', 'R', 'c', 'numpy\ndtype\n', X('constructor'), 0x85, 'R', 0x86, '.')) as PyTuple;
    const o = v.items[0] as PyObject;
    assert.ok(o instanceof PyObject && o.module === '__proto__' && o.name === 'constructor');
    assert.equal(({} as Record<string, unknown>).constructor, Object);
    const st = new Map<string, SafetensorsInput>([['__proto__', { dtype: DType.uint8, shape: [1], produce: () => Uint8Array.of(7) }]]);
    const back = readSafetensors(new BufferSource(await encodeSafetensors(st, { metadata: { __proto__: 'x', constructor: 'y' } as Record<string, string> }), 'p.safetensors'));
    assert.deepEqual([...back.tensors.keys()], ['__proto__']);
    assert.equal(Object.getPrototypeOf(back.metadata), Object.prototype);
  });

  test('openTorch reports them, or refuses them with dangerous: "refuse"', async () => {
    const marker = path.join(tmp, 'pwned-marker-2');
    const sd = new PyDict(true);
    sd.set('w', newTensor({ dtype: DType.float32, shape: [1], produce: () => encodeFloats([1], DType.float32) }));
    sd.set('_extra_state', new PyObject('posix', 'system', 'reduce', [`touch ${marker}`]));
    const bytes = await encodeTorchZip(sd, { allowDangerousGlobals: true });
    const f = openTorch(new BufferSource(bytes, 'hostile.pt'));
    assert.deepEqual(f.dangerousGlobals, ['posix.system']);
    assert.match(f.warnings.join('\n'), /os\.system/);
    assert.equal(fs.existsSync(marker), false);
    throwsFormat(() => openTorch(new BufferSource(bytes, 'hostile.pt'), { dangerous: 'refuse' }), /posix\.system.*refusing to load it \(nothing was executed\)/);
  });
});

// ---------------------------------------------------------------------------------------------
describe('zip', () => {
  const files = [
    { name: 'root/a.bin', data: Uint8Array.from({ length: 100 }, (_, i) => i) },
    { name: 'root/b', data: Uint8Array.of(9, 8, 7) },
    { name: 'root/empty', data: new Uint8Array(0) },
  ];

  async function written(opts = {}): Promise<Uint8Array> {
    const chunks: Uint8Array[] = [];
    const zw = new ZipWriter((c) => chunks.push(c.slice()), opts);
    for (const f of files) await zw.add(f.name, f.data.length, (emit) => {
      emit(f.data.subarray(0, 10));
      emit(f.data.subarray(10));
    });
    zw.finish();
    return Buffer.concat(chunks);
  }

  test('CRC-32 matches the reference', () => {
    assert.equal(crc32(Buffer.from('123456789')), 0xcbf43926);
    assert.equal(crc32(new Uint8Array(0)), 0);
    const big = Uint8Array.from({ length: 100003 }, (_, i) => (i * 7919) & 0xff);
    assert.equal(crc32(big.subarray(50000), crc32(big.subarray(0, 50000))), crc32(big));
    assert.equal(crc32Table(Buffer.from('123456789')), 0xcbf43926);
    for (const [a, b] of [[0, 100003], [1, 99999], [3, 17], [5, 5]]) {
      assert.equal(crc32Table(big.subarray(a, b)), zlibCrc(big.subarray(a, b)), `table CRC of [${a}, ${b})`);
    }
    assert.equal(crc32Table(big.subarray(7), crc32Table(big.subarray(0, 7))), crc32Table(big));
    assert.equal(crc32(big), crc32Table(big));
  });

  test('writer → reader: 64-byte aligned stored payloads as views, FB padding, data descriptors, CRCs', async () => {
    const bytes = await written();
    const zip = ZipArchive.open(new BufferSource(bytes, 'w.zip'));
    assert.deepEqual(zip.entries.map((e) => e.name), files.map((f) => f.name));
    for (const f of files) {
      const e = zip.get(f.name)!;
      assert.equal(e.dataOffset % 64, 0);
      assert.equal(e.method, 0);
      assert.equal(e.flags & 0x8, 0x8);
      const v = zip.view(e);
      assert.ok(Buffer.from(v.source.read(v.offset, v.length)).equals(f.data));
      assert.ok(Buffer.from(zip.read(e)).equals(f.data));
      assert.ok(zip.verify(e));
      // the local header's extra field starts with 'FB' + the padding length
      const lh = bytes.subarray(e.localHeaderOffset);
      const nameLen = lh[26] | (lh[27] << 8);
      assert.equal(Buffer.from(lh.subarray(30 + nameLen, 32 + nameLen)).toString('latin1'), 'FB');
    }
    assert.equal(zip.zip64, true); // like PyTorch, the writer always ends with a ZIP64 end record
  });

  test('writer with ZIP64 fields everywhere reads back', async () => {
    const bytes = await written({ zip64: 'always' });
    const zip = ZipArchive.open(new BufferSource(bytes, 'w64.zip'));
    for (const f of files) {
      const e = zip.get(f.name)!;
      assert.equal(e.size, f.data.length);
      assert.equal(e.dataOffset % 64, 0);
      assert.ok(Buffer.from(zip.read(e)).equals(f.data));
    }
  });

  test('hand-built ZIP64: saturated central fields, ZIP64 extra, ZIP64 end record and locator', () => {
    const bytes = rawZip(files, { zip64: true, comment: 'a comment PK\x05\x06 inside' });
    const zip = ZipArchive.open(new BufferSource(bytes, 'h64.zip'));
    assert.ok(zip.zip64);
    assert.equal(zip.entries.length, 3);
    for (const f of files) assert.ok(Buffer.from(zip.read(zip.get(f.name)!)).equals(f.data));
    // A ZIP64 extra field that lacks the value its saturated field needs is an error.
    const cut = Buffer.from(bytes);
    const at = cut.indexOf(Buffer.from([1, 0, 24, 0]));
    cut.writeUInt16LE(8, at + 2);
    throwsFormat(() => ZipArchive.open(new BufferSource(cut, 'bad64.zip')), /short ZIP64 extra field|corrupt extra field/);
    // Lying ZIP64 counts/offsets.
    const lie = Buffer.from(bytes);
    const rec = lie.lastIndexOf(Buffer.from([0x50, 0x4b, 0x06, 0x06]));
    lie.writeBigUInt64LE(10n ** 9n, rec + 32);
    lie.writeBigUInt64LE(10n ** 9n, rec + 24);
    throwsFormat(() => ZipArchive.open(new BufferSource(lie, 'lie64.zip')), /claims 1000000000 entries/);
    const far = Buffer.from(bytes);
    far.writeBigUInt64LE(2n ** 60n, rec + 48);
    throwsFormat(() => ZipArchive.open(new BufferSource(far, 'far64.zip')), /out of range|runs past/);
  });

  test('ZIP64 for real: an entry over 4 GiB and one past the 4 GiB offset (virtual file, zeros not stored)', async () => {
    // The sink keeps headers and records where the (all-zero) payloads went; a virtual source serves them back.
    const pieces: { at: number; bytes?: Uint8Array; zeros?: number }[] = [];
    let pos = 0;
    const zw = new ZipWriter((c) => {
      const zero = c.length >= 1 << 20;
      pieces.push(zero ? { at: pos, zeros: c.length } : { at: pos, bytes: c.slice() });
      pos += c.length;
    });
    const big = 2 ** 32 + 100;
    const chunk = new Uint8Array(64 << 20);
    await zw.add('r/big', big, (emit) => {
      for (let done = 0; done < big; done += chunk.length) emit(chunk.subarray(0, Math.min(chunk.length, big - done)));
    });
    await zw.addBytes('r/small', Uint8Array.of(1, 2, 3));
    zw.finish();
    const size = pos;
    const src = {
      name: 'virtual.zip',
      size,
      read(offset: number, length: number): Uint8Array {
        const out = new Uint8Array(length);
        for (const p of pieces) {
          const end = p.at + (p.bytes ? p.bytes.length : (p.zeros as number));
          if (end <= offset || p.at >= offset + length || !p.bytes) continue;
          const from = Math.max(offset, p.at);
          const to = Math.min(offset + length, end);
          out.set(p.bytes.subarray(from - p.at, to - p.at), from - offset);
        }
        return out;
      },
      readOwned(offset: number, length: number): Uint8Array {
        return this.read(offset, length);
      },
      close(): void {},
    };
    const zip = ZipArchive.open(src);
    const b = zip.get('r/big')!;
    const s = zip.get('r/small')!;
    assert.equal(b.size, big);
    assert.equal(b.dataOffset % 64, 0);
    assert.ok(s.localHeaderOffset > 2 ** 32);
    assert.equal(s.dataOffset % 64, 0);
    assert.deepEqual(Array.from(zip.read(s)), [1, 2, 3]);
  });

  test('unsafe names are refused: "..", absolute paths, duplicates', async () => {
    throwsFormat(() => ZipArchive.open(new BufferSource(rawZip([{ name: 'x/../../evil', data: Uint8Array.of(1) }]), 'dots.zip')), /"\.\." segment/);
    throwsFormat(() => ZipArchive.open(new BufferSource(rawZip([{ name: '../evil', data: Uint8Array.of(1) }]), 'dots.zip')), /"\.\." segment/);
    throwsFormat(() => ZipArchive.open(new BufferSource(rawZip([{ name: '/etc/passwd', data: Uint8Array.of(1) }]), 'abs.zip')), /absolute path/);
    throwsFormat(() => ZipArchive.open(new BufferSource(rawZip([{ name: 'C:\\evil', data: Uint8Array.of(1) }]), 'drive.zip')), /absolute path/);
    const dup = rawZip([{ name: 'a/x', data: Uint8Array.of(1) }, { name: 'a/x', data: Uint8Array.of(2) }]);
    throwsFormat(() => ZipArchive.open(new BufferSource(dup, 'dup.zip')), /appears twice/);
    // the writer refuses them too
    const zw = new ZipWriter(() => undefined);
    await assert.rejects(zw.addBytes('../x', new Uint8Array(0)), /"\.\." segment/);
  });

  test('overlapping entries, lying sizes and counts, truncation and corruption are FormatErrors', () => {
    const a = Uint8Array.from({ length: 40 }, (_, i) => i);
    const b = Uint8Array.of(1, 2, 3);
    // A's declared size runs into B's local header.
    throwsFormat(() => ZipArchive.open(new BufferSource(rawZip([{ name: 'r/a', data: a, size: 60 }, { name: 'r/b', data: b }]), 'ov.zip')), /overlap/);
    // A size far beyond the file: refused before anything is allocated.
    throwsFormat(
      () => ZipArchive.open(new BufferSource(rawZip([{ name: 'r/a', data: a, size: 0x7fffffff }]), 'big.zip')),
      /declares 2147483647 bytes .* past the start of the central directory/,
    );
    // An entry count the central directory cannot hold.
    const ok = rawZip([{ name: 'r/a', data: a }]);
    const counted = Buffer.from(ok);
    counted.writeUInt16LE(60000, counted.length - 12);
    counted.writeUInt16LE(60000, counted.length - 14);
    throwsFormat(() => ZipArchive.open(new BufferSource(counted, 'count.zip')), /claims 60000 entries/);
    // A central directory offset past the end record.
    const off = Buffer.from(ok);
    off.writeUInt32LE(0x7ffffff0, off.length - 6);
    throwsFormat(() => ZipArchive.open(new BufferSource(off, 'off.zip')), /runs past its end record/);
    // Truncated: no end record.
    throwsFormat(() => ZipArchive.open(new BufferSource(ok.subarray(0, ok.length - 10), 'cut.zip')), /no end-of-central-directory/);
    // A local header that names another file.
    const lh = Buffer.from(ok);
    lh[32] = 0x5a; // the local header's copy of the name
    throwsFormat(() => ZipArchive.open(new BufferSource(lh, 'lh.zip')), /local header names a different file/);
    // Corrupt data: the CRC check catches it.
    const bad = Buffer.from(ok);
    bad[30 + 3 + 5] ^= 0xff;
    const zip = ZipArchive.open(new BufferSource(bad, 'crc.zip'));
    throwsFormat(() => zip.read(zip.get('r/a')!), /CRC-32/);
    assert.equal(zip.verify(zip.get('r/a')!), false);
  });

  test('deflate: small entries inflate; bombs and oversized entries are refused', () => {
    const data = Buffer.from('hello '.repeat(1000));
    const z = ZipArchive.open(new BufferSource(rawZip([{ name: 'r/d', data, method: 8 }]), 'd.zip'));
    assert.deepEqual(Buffer.from(z.read(z.get('r/d')!)), data);
    throwsFormat(() => z.view(z.get('r/d')!), /compressed/);
    const bomb = ZipArchive.open(new BufferSource(rawZip([{ name: 'r/d', data, method: 8, size: 10 }]), 'bomb.zip'));
    throwsFormat(() => bomb.read(bomb.get('r/d')!), /inflates to more than its declared 10 bytes/);
    const huge = ZipArchive.open(new BufferSource(rawZip([{ name: 'r/d', data, method: 8, size: 100 << 20 }]), 'huge.zip'));
    throwsFormat(() => huge.read(huge.get('r/d')!), /over the 67108864-byte limit/);
  });
});

// ---------------------------------------------------------------------------------------------
describe('pickle writer', () => {
  test('writes the same bytes as Python 3 pickle.dumps(protocol=2)', () => {
    const v = PyDict.from(
      [
        ['a', 1],
        ['b', [1.5, null, true, false, -7, 300, 70000, 2n ** 64n + 1n, -(2 ** 40)]],
        ['c', new PyTuple([1, 'x', Uint8Array.of(0, 0xff)])],
        ['d', PyDict.from([[3, 'e']])],
        ['f', new PySet([1, 2])],
        ['g', new PyTuple([])],
        ['h', new PyTuple([1, 2, 3, 4])],
        ['i', new PyFloat(2)],
      ],
      true,
    );
    const py =
      '800263636f6c6c656374696f6e730a4f726465726564446963740a7100295271012858010000006171024b0158010000006271035d710428473ff80000000000004e88894af9ffffff4d2c014a701101008a090100000000000000018a060000000000ff6558010000006371054b015801000000787106635f636f646563730a656e636f64650a7107580300000000c3bf710858060000006c6174696e31710986710a52710b87710c580100000064710d7d710e4b03580100000065710f735801000000667110635f5f6275696c74696e5f5f0a7365740a71115d7112284b014b02658571135271145801000000677115295801000000687116284b014b024b034b047471175801000000697118474000000000000000752e';
    assert.equal(Buffer.from(pickle(v)).toString('hex'), py);
    const l: PyValue[] = [1];
    l.push(l);
    const shared = PyDict.from([['self', l], ['again', l]]);
    assert.equal(Buffer.from(pickle(shared)).toString('hex'), '80027d710028580400000073656c6671015d7102284b016802655805000000616761696e71036802752e');
  });

  test('round trip: read → write → read gives the same structure, sharing and cycles included', () => {
    const shared = [1, 2];
    const obj = new PyObject('models.common', 'RepConv', 'newobj', []);
    const state = PyDict.from([['training', true], ['eps', 0.001], ['k', new PyFloat(3)], ['me', obj], ['shared', shared]]);
    obj.state = state;
    const od = PyDict.from([['x', 1]], true);
    od.state = PyDict.from([['_metadata', PyDict.from([['', PyDict.from([['version', 1]])]], true)]]);
    const arr = new NdArray(new PyGlobal('numpy', 'ndarray'));
    arr.shape = [2];
    arr.dtype = new NumpyDType('f8');
    arr.data = new Uint8Array(new Float64Array([0.5, -1]).buffer);
    const root = PyDict.from(
      [
        ['obj', obj],
        ['again', obj],
        ['shared', shared],
        ['od', od],
        ['big', -(2n ** 100n)],
        ['bytes', Uint8Array.of(0, 1, 255)],
        ['empty', new Uint8Array(0)],
        ['set', new PySet(['a'], true)],
        ['slice', new PySlice(1, null, 2)],
        ['complex', new PyComplex(1, -2)],
        ['size', Object.assign(new PyTuple([1, 2]), { tag: 'torch.Size' as const })],
        ['dtype', new PyGlobal('torch', 'float16')],
        ['inst', new PyObject('m', 'I', 'inst', [1])],
        ['objop', new PyObject('m', 'O', 'obj', [2])],
        ['ex', Object.assign(new PyObject('m', 'E', 'newobj_ex', [3], PyDict.from([['k', 4]])), { listItems: [5], dictItems: [[6, 7]] as [PyValue, PyValue][] })],
        ['arr', arr],
      ],
      false,
    );
    const first = load(pickle(root));
    // An ndarray as numpy pickles it (built by the reader, since NdArray state comes from BUILD).
    assert.equal(pyDiff(first, load(pickle(first))), undefined);
    const f = first as PyDict;
    assert.equal(f.get('obj'), f.get('again'));
    const o = f.get('obj') as PyObject;
    assert.equal((o.state as PyDict).get('me'), o);
    assert.equal((o.state as PyDict).get('shared'), f.get('shared'));
    assert.ok((f.get('od') as PyDict).state instanceof PyDict);
    assert.equal(f.get('big'), -(2n ** 100n));
    assert.ok(f.get('k') === undefined && (o.state as PyDict).get('k') instanceof PyFloat);
    const b = unpickle(pickle(root, { binbytes: true })).value as PyDict;
    assert.deepEqual(b.get('bytes'), Uint8Array.of(0, 1, 255));
  });
});

// ---------------------------------------------------------------------------------------------
describe('tensors', () => {
  function storageOf(values: number[], dtype = DType.float32): TorchStorage {
    const bytes = encodeFloats(values, dtype);
    return new TorchStorage('0', dtype, values.length, 'cpu', new BufferSource(bytes, 'mem'), 0, bytes.length);
  }

  test('contiguous, strided (gather), offset, and stride-0 views read exactly', () => {
    const st = storageOf(Array.from({ length: 24 }, (_, i) => i));
    assert.deepEqual(Array.from(readTensor(new TorchTensor(st, 0, [2, 3], [3, 1]))), [0, 1, 2, 3, 4, 5]);
    assert.deepEqual(Array.from(readTensor(new TorchTensor(st, 1, [3, 2], [1, 3]))), [1, 4, 2, 5, 3, 6]);
    assert.deepEqual(Array.from(readTensor(new TorchTensor(st, 2, [2, 2, 2], [12, 1, 4]))), [2, 6, 3, 7, 14, 18, 15, 19]);
    assert.deepEqual(Array.from(readTensor(new TorchTensor(st, 5, [3, 2], [0, 1]))), [5, 6, 5, 6, 5, 6]);
    assert.deepEqual(Array.from(readTensor(new TorchTensor(st, 7, [], []))), [7]);
    assert.deepEqual(Array.from(readTensor(new TorchTensor(st, 0, [0, 4], [4, 1]))), []);
    throwsFormat(() => readTensorBytes(new TorchTensor(st, 20, [2, 3], [3, 1])), /needs element 25, but the storage has 24 elements/);
  });

  test('float16 and bfloat16 widen exactly', () => {
    const vals = [1, -2.5, 65504, 2 ** -24, 0.1];
    const h = storageOf(vals, DType.float16);
    assert.deepEqual(Array.from(readTensor(new TorchTensor(h, 0, [5], [1]))), vals.map((v) => {
      const bits = floatToHalf(v);
      return Math.fround(decodeHalfRef(bits));
    }));
    const bf = storageOf(vals, DType.bfloat16);
    const got = Array.from(readTensor(new TorchTensor(bf, 0, [5], [1])));
    const bits = new Uint16Array(encodeFloats(vals, DType.bfloat16).buffer);
    got.forEach((g, i) => {
      const u = new Uint32Array([bits[i] << 16]);
      assert.equal(g, new Float32Array(u.buffer)[0]);
      assert.equal(floatToBfloat16(g), bits[i]);
    });
  });
});

/** CRC-32 via zlib's deflate framing-free gzip trailer (works on every Node 20). */
function zlibCrc(b: Uint8Array): number {
  const gz = zlib.gzipSync(b);
  return gz.readUInt32LE(gz.length - 8);
}

function decodeHalfRef(h: number): number {
  const s = h & 0x8000 ? -1 : 1;
  const e = (h >> 10) & 0x1f;
  const m = h & 0x3ff;
  if (e === 0) return s * m * 2 ** -24;
  return s * (1 + m / 1024) * 2 ** (e - 15);
}

// ---------------------------------------------------------------------------------------------
describe('torch zip checkpoints', () => {
  const f32 = (v: number[]): Uint8Array => encodeFloats(v, DType.float32);

  test('layout: archive/data.pkl, byteorder, data/<key> aligned to 64, version "3\\n"', async () => {
    const sd = PyDict.from([['w', newTensor({ dtype: DType.float32, shape: [2], produce: () => f32([1, 2]) })]], true);
    const bytes = await encodeTorchZip(sd);
    const zip = ZipArchive.open(new BufferSource(bytes, 'x.pt'));
    assert.deepEqual(zip.entries.map((e) => e.name), ['archive/data.pkl', 'archive/byteorder', 'archive/data/0', 'archive/version']);
    assert.equal(Buffer.from(zip.read(zip.get('archive/version')!)).toString(), '3\n');
    assert.equal(Buffer.from(zip.read(zip.get('archive/byteorder')!)).toString(), 'little');
    for (const e of zip.entries) assert.equal(e.dataOffset % 64, 0, e.name);
  });

  test('write → read: new tensors (fp16 kept), parameters, views, shared storages written once', async () => {
    const base = new TorchStorage('7', DType.float32, 6, 'cpu', new BufferSource(f32([0, 1, 2, 3, 4, 5]), 'src.pt'), 0, 24);
    const w = new TorchTensor(base, 0, [2, 3], [3, 1]);
    const wt = new TorchTensor(base, 1, [2, 2], [1, 3]); // a strided view of the same storage
    const half = newTensor({ dtype: DType.float16, shape: [2], produce: () => encodeFloats([1.5, -2], DType.float16) });
    const param = new NewTensor(DType.float32, [3], () => f32([7, 8, 9]), true, true);
    const idx = newTensor({ dtype: DType.int64, shape: [], produce: () => new Uint8Array(new BigInt64Array([5n]).buffer) });
    const sd = PyDict.from([['w', w], ['wt', wt], ['half', half], ['p', param], ['n', idx], ['w_again', w]], true);
    sd.state = PyDict.from([['_metadata', PyDict.from([['', PyDict.from([['version', 1]])]], true)]]);
    const bytes = await encodeTorchZip(sd, { archiveName: 'mymodel' });
    const f = openTorch(new BufferSource(bytes, 'rt.pt'));
    assert.equal(f.format, 'zip');
    assert.equal(f.archiveRoot, 'mymodel');
    assert.equal(f.storages.length, 4); // w and wt share one storage
    const r = f.root as PyDict;
    const rw = r.get('w') as TorchTensor;
    const rwt = r.get('wt') as TorchTensor;
    assert.equal(rw.storage, rwt.storage);
    assert.equal(r.get('w_again'), rw);
    assert.deepEqual(Array.from(readTensor(rwt)), [1, 4, 2, 5]);
    assert.deepEqual([rwt.storageOffset, ...rwt.stride], [1, 1, 3]);
    const rh = r.get('half') as TorchTensor;
    assert.equal(rh.dtype, DType.float16);
    assert.deepEqual(Array.from(readTensor(rh)), [1.5, -2]);
    const rp = r.get('p') as TorchTensor;
    assert.ok(rp.isParameter && rp.requiresGrad);
    assert.deepEqual(Array.from(readTensor(rp)), [7, 8, 9]);
    assert.deepEqual(Array.from(readTensor(r.get('n') as TorchTensor)), [5]);
    assert.ok(r.state instanceof PyDict);
    assert.deepEqual([...namedTensors(r).keys()], ['w', 'wt', 'half', 'p', 'n', 'w_again']);
  });

  test('writeTorchZip is atomic, streams from the source file, and will not overwrite its input', async () => {
    const sd = PyDict.from([['w', newTensor({ dtype: DType.float32, shape: [3], produce: () => f32([1, 2, 3]) })]], true);
    const first = path.join(tmp, 'first.pt');
    const res = await writeTorchZip(first, sd);
    assert.equal(res.storages, 1);
    const f = openTorch(first);
    const second = path.join(tmp, 'second.pt');
    await writeTorchZip(second, f.root);
    await assert.rejects(writeTorchZip(first, f.root), /refusing to overwrite the input/);
    f.close();
    const g = openTorch(second);
    assert.deepEqual(Array.from(readTensor((g.root as PyDict).get('w') as TorchTensor)), [1, 2, 3]);
    g.close();
    assert.deepEqual(fs.readdirSync(tmp).filter((n) => n.endsWith('.tmp')), []);
    // A producer that fails leaves no file and no temp file behind.
    const broken = PyDict.from([['w', newTensor({ dtype: DType.float32, shape: [3], produce: () => f32([1]) })]], true);
    await assert.rejects(writeTorchZip(path.join(tmp, 'broken.pt'), broken), /produced 4 bytes; 12 expected/);
    assert.equal(fs.existsSync(path.join(tmp, 'broken.pt')), false);
    assert.deepEqual(fs.readdirSync(tmp).filter((n) => n.endsWith('.tmp')), []);
  });

  test('a checkpoint with compressed records (re-zipped) is read; storage sizes are checked', () => {
    const pkl = pickle(PyDict.from([['w', newTensor({ dtype: DType.float32, shape: [2], produce: () => f32([3, 4]) })]], true), {
      persistentId: (v) => (v instanceof Object && 'produce' in v ? new PyTuple(['storage', new PyGlobal('torch', 'FloatStorage'), '0', 'cpu', 2]) : undefined),
    });
    const ok = rawZip([{ name: 'z/data.pkl', data: pkl, method: 8 }, { name: 'z/data/0', data: f32([3, 4]), method: 8 }]);
    const f = openTorch(new BufferSource(ok, 'deflated.pt'));
    assert.deepEqual(Array.from(readTensor((f.root as PyDict).get('w') as TorchTensor)), [3, 4]);
    const short = rawZip([{ name: 'z/data.pkl', data: pkl }, { name: 'z/data/0', data: f32([3]) }]);
    throwsFormat(() => openTorch(new BufferSource(short, 'short.pt')), /declares 2 elements \(8 bytes\), but its record z\/data\/0 holds only 4 bytes/);
    const missing = rawZip([{ name: 'z/data.pkl', data: pkl }]);
    throwsFormat(() => openTorch(new BufferSource(missing, 'missing.pt')), /no record z\/data\/0/);
    throwsFormat(() => openTorch(new BufferSource(rawZip([{ name: 'z/other', data: pkl }]), 'nopkl.pt')), /without <root>\/data\.pkl/);
  });

  test('sniffing: legacy, plain pickle, safetensors, garbage', () => {
    const plain = openTorch(new BufferSource(pickle(PyDict.from([['a', 1]])), 'plain.pkl'));
    assert.equal(plain.format, 'pickle');
    assert.equal((plain.root as PyDict).get('a'), 1);
    throwsFormat(() => openTorch(new BufferSource(Buffer.from('hello world, not a model'), 'x.txt')), /neither a zip archive nor a pickle/);
    throwsFormat(() => openTorch(new BufferSource(new Uint8Array(0), 'e.pt')), /empty/);
  });
});

// ---------------------------------------------------------------------------------------------
describe('legacy format', () => {
  /** A legacy file as torch.save(_use_new_zipfile_serialization=False) lays it out. */
  function legacyFile(opts: { count?: bigint; truncate?: number; proto4?: boolean } = {}): Uint8Array {
    const s1 = new NewTensor(DType.float32, [2, 2], () => new Uint8Array(0));
    const s2 = new NewTensor(DType.int64, [], () => new Uint8Array(0));
    const s3 = new NewTensor(DType.float32, [2], () => new Uint8Array(0)); // on a view of s1's storage
    const keys = new Map<object, string>([[s1.storage, '94011'], [s2.storage, '94002'], [s3.storage, '94011']]);
    const sd = PyDict.from([['w', s1], ['n', s2], ['v', s3]], true);
    const main = pickle(sd, {
      persistentId: (v) => {
        const k = keys.get(v as object);
        if (k === undefined) return undefined;
        const st = v as { dtype: DType; numel: number };
        const view = v === s3.storage ? new PyTuple(['94099', 1, 2]) : null;
        const numel = v === s3.storage ? 4 : st.numel;
        return new PyTuple(['storage', new PyGlobal('torch', st.dtype === DType.float32 ? 'FloatStorage' : 'LongStorage'), k, 'cpu', numel, view]);
      },
    });
    const magic = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];
    const parts: Uint8Array[] = [
      opts.proto4 ? pk(0x80, 4, 0x95, u64le(13), 0x8a, 10, magic, '.') : pickle(0x1950a86a20f9469cfc6cn),
      pickle(1001),
      pickle(PyDict.from([['protocol_version', 1001], ['little_endian', true], ['type_sizes', PyDict.from([['short', 2], ['int', 4], ['long', 4]])]])),
      main,
      pickle(['94002', '94011']),
      new Uint8Array(new BigInt64Array([opts.count ?? 1n]).buffer),
      new Uint8Array(new BigInt64Array([42n]).buffer),
      new Uint8Array(new BigInt64Array([4n]).buffer),
      f32s([1, 2, 3, 4]),
    ];
    const all = Buffer.concat(parts);
    return opts.truncate ? all.subarray(0, all.length - opts.truncate) : all;
  }
  const f32s = (v: number[]): Uint8Array => encodeFloats(v, DType.float32);

  test('storages are located from the element counts, in key-list order, without reading them', () => {
    const f = openTorch(new BufferSource(legacyFile(), 'legacy.pt'));
    assert.equal(f.format, 'legacy');
    const r = f.root as PyDict;
    assert.deepEqual(Array.from(readTensor(r.get('w') as TorchTensor)), [1, 2, 3, 4]);
    assert.deepEqual(Array.from(readTensor(r.get('n') as TorchTensor)), [42]);
    assert.deepEqual(Array.from(readTensor(r.get('v') as TorchTensor)), [2, 3]); // a storage view (view_metadata)
    const p4 = openTorch(new BufferSource(legacyFile({ proto4: true }), 'legacy4.pt'));
    assert.equal(p4.format, 'legacy');
    assert.deepEqual(Array.from(readTensor((p4.root as PyDict).get('w') as TorchTensor)), [1, 2, 3, 4]);
    const l = readLegacyTorch(new BufferSource(legacyFile(), 'legacy.pt'));
    assert.deepEqual(l.storages.map((s) => s.key), ['94002', '94011']);
    assert.equal((l.sysInfo as PyDict).get('little_endian'), true);
  });

  test('count mismatches and truncation are FormatErrors', () => {
    throwsFormat(() => openTorch(new BufferSource(legacyFile({ count: 7n }), 'bad.pt')), /holds 7 elements, but the pickle declares 1/);
    throwsFormat(() => openTorch(new BufferSource(legacyFile({ truncate: 3 }), 'cut.pt')), /past the end of the file/);
  });
});

// ---------------------------------------------------------------------------------------------
describe('safetensors', () => {
  function hdr(obj: unknown, data: Uint8Array = new Uint8Array(0), lenOverride?: number): Uint8Array {
    const json = Buffer.from(JSON.stringify(obj));
    const len = Buffer.alloc(8);
    len.writeBigUInt64LE(BigInt(lenOverride ?? json.length));
    return Buffer.concat([len, json, data]);
  }

  test('write → read: sorted names, 8-byte aligned header, metadata, lazy views, gathered non-contiguous input', async () => {
    const st = new TorchStorage('0', DType.float32, 6, 'cpu', new BufferSource(encodeFloats([0, 1, 2, 3, 4, 5], DType.float32), 'm'), 0, 24);
    const tensors = new Map<string, SafetensorsInput>([
      ['z.weight', new TorchTensor(st, 0, [3, 2], [1, 3])],
      ['a.half', { dtype: DType.float16, shape: [2], produce: () => encodeFloats([0.5, 2], DType.float16) }],
      ['m.n', newTensor({ dtype: DType.int64, shape: [], produce: () => new Uint8Array(new BigInt64Array([3n]).buffer) })],
    ]);
    const file = path.join(tmp, 'x.safetensors');
    await writeSafetensors(file, tensors, { metadata: { format: 'pt' } });
    const raw = fs.readFileSync(file);
    const hlen = Number(raw.readBigUInt64LE(0));
    assert.equal((8 + hlen) % 8, 0);
    const s = readSafetensors(file);
    assert.deepEqual([...s.tensors.keys()], ['a.half', 'm.n', 'z.weight']);
    assert.deepEqual(s.metadata, { format: 'pt' });
    assert.deepEqual(Array.from(readTensor(s.tensors.get('z.weight')!)), [0, 3, 1, 4, 2, 5]);
    assert.deepEqual(Array.from(readTensor(s.tensors.get('a.half')!)), [0.5, 2]);
    assert.equal(s.tensors.get('m.n')!.dtype, DType.int64);
    assert.deepEqual(s.tensors.get('m.n')!.shape, []);
    s.close();
    const mem = await encodeSafetensors(tensors, { metadata: { format: 'pt' } });
    assert.ok(Buffer.from(mem).equals(raw));
  });

  test('hostile headers are FormatErrors', () => {
    const d8 = new Uint8Array(8);
    const bad = (b: Uint8Array, re: RegExp): void => throwsFormat(() => readSafetensors(new BufferSource(b, 'h.safetensors')), re);
    bad(hdr({}, d8, 1e9), /runs past the end of the file|over the/);
    bad(hdr({}, d8, 2e8), /over the 100000000-byte limit/);
    bad(Buffer.concat([Buffer.from([4, 0, 0, 0, 0, 0, 0, 0]), Buffer.from('{no}')]), /not valid JSON/);
    bad(hdr([1, 2]), /not a JSON object/);
    bad(hdr({ a: { dtype: 'F32', shape: [2], data_offsets: [0, 8] }, b: { dtype: 'F32', shape: [1], data_offsets: [4, 8] } }, d8), /overlap/);
    bad(hdr({ a: { dtype: 'F32', shape: [3], data_offsets: [0, 8] } }, d8), /needs 12 bytes, but its data_offsets span 8/);
    bad(hdr({ a: { dtype: 'F32', shape: [4], data_offsets: [0, 16] } }, d8), /spans bytes \[0, 16\) of a 8-byte data area/);
    bad(hdr({ a: { dtype: 'F8_E4M3', shape: [1], data_offsets: [0, 1] } }, d8), /unsupported dtype/);
    bad(hdr({ a: { dtype: 'F32', shape: [-1], data_offsets: [0, 0] } }, d8), /invalid shape/);
    bad(hdr({ a: { dtype: 'F32', shape: [1], data_offsets: [8, 4] } }, d8), /spans bytes/);
    bad(hdr({ __metadata__: { k: 1 } }, d8), /not a string/);
  });
});

// ---------------------------------------------------------------------------------------------
// Real PyTorch files made by test/fixtures/torch/make_torch_fixtures.py (PyTorch 1.13).
const fixtureDir = path.join(repoRoot, 'test', 'fixtures', 'torch');
const manifestPath = path.join(fixtureDir, 'manifest.json');
const haveFixtures = fs.existsSync(manifestPath);

interface FixtureBlock {
  name: string;
  in: number;
  out: number;
  groups: number;
  conv_branch_kernels: number[][];
  removed_keys: string[];
}
interface FixtureFile {
  file: string;
  family: string | null;
  form: string;
  dtype: string | null;
  entry: string | null;
  prefix: string;
  format: string;
  archive_root?: string;
  records?: string[];
  pickle_protocol?: number;
  pickle_globals?: string[];
  tensors: number;
  blocks: FixtureBlock[];
  safetensors_dtypes?: string[];
  model_class?: string;
  model_training?: boolean;
  entries?: Record<string, unknown>;
  payload?: { args: PyValue[]; marker: string; payload_key: string };
}
interface Manifest {
  hostile_marker: string;
  families: Record<string, { state_dict_keys: string[] }>;
  files: FixtureFile[];
}

describe('real PyTorch fixtures', { skip: haveFixtures ? false : 'test/fixtures/torch/manifest.json not present' }, () => {
  const manifest: Manifest = haveFixtures ? JSON.parse(fs.readFileSync(manifestPath, 'utf8')) : { hostile_marker: '', families: {}, files: [] };
  const dtypeOf: Record<string, DType> = { float32: DType.float32, float16: DType.float16, int64: DType.int64 };

  function tensorsOf(file: string): { tensors: Map<string, TorchTensor>; close(): void } {
    const p = path.join(fixtureDir, file);
    if (file.endsWith('.safetensors')) {
      const s = readSafetensors(p);
      return { tensors: s.tensors, close: () => s.close() };
    }
    const f = openTorch(p);
    return { tensors: namedTensors(f.root), close: () => f.close() };
  }

  test('every .pt / .pth / .safetensors file in the folder is in the manifest', () => {
    const onDisk = fs.readdirSync(fixtureDir).filter((n) => /\.(pt|pth|safetensors)$/.test(n)).sort();
    assert.deepEqual(onDisk, manifest.files.map((f) => f.file).sort());
  });

  for (const fx of manifest.files.filter((f) => f.form !== 'hostile')) {
    test(`${fx.file}: ${fx.form}, ${fx.dtype}: keys, dtypes, shapes and bytes match the manifest and ${fx.family}_sd.pt`, () => {
      const fam = fx.family as string;
      const own = tensorsOf(fx.file);
      const ref = tensorsOf(`${fam}_sd.pt`);
      try {
        const keyOf = (k: string): string => `${fx.entry ? `${fx.entry}.` : ''}${fx.prefix}${k}`;
        const expected = manifest.families[fam].state_dict_keys.map(keyOf);
        assert.equal(own.tensors.size, fx.tensors);
        assert.deepEqual([...own.tensors.keys()].sort(), expected.slice().sort());
        for (const k of manifest.families[fam].state_dict_keys) {
          const t = own.tensors.get(keyOf(k))!;
          const r = ref.tensors.get(k)!;
          assert.deepEqual(t.shape, r.shape, k);
          if (k.endsWith('num_batches_tracked')) assert.equal(t.dtype, DType.int64, k);
          else assert.equal(t.dtype, dtypeOf[fx.dtype as string], k);
          const want = t.dtype === DType.float16 && r.dtype === DType.float32 ? encodeFloats(readTensor(r), DType.float16) : readTensorBytes(r);
          assert.ok(Buffer.from(readTensorBytes(t)).equals(Buffer.from(want)), `${k}: bytes differ from ${fam}_sd.pt`);
        }
        // Block geometry: every 4-D weight a block loses on fusion is [out, in/groups, kh, kw] with a branch kernel.
        for (const b of fx.blocks) {
          for (const k of b.removed_keys) {
            const t = own.tensors.get(fx.entry ? `${fx.entry}.${k}` : k)!;
            assert.ok(t, `${b.name}: ${k} missing`);
            if (t.shape.length === 4) {
              assert.equal(t.shape[0], b.out, k);
              assert.ok(b.conv_branch_kernels.some((kk) => kk.join() === t.shape.slice(2).join()), `${k}: kernel ${t.shape.slice(2)}`);
            } else if (k.endsWith('running_var') || k.endsWith('running_mean')) assert.deepEqual(t.shape, [b.out], k);
          }
        }
      } finally {
        own.close();
        ref.close();
      }
    });
  }

  for (const fx of manifest.files.filter((f) => f.format !== 'safetensors')) {
    test(`${fx.file}: format, archive layout, pickle protocol and globals`, () => {
      const f = openTorch(path.join(fixtureDir, fx.file));
      try {
        assert.equal(f.format, fx.format);
        if (fx.format === 'zip') {
          assert.equal(f.archiveRoot, fx.archive_root);
          const zip = ZipArchive.open(f.source);
          assert.deepEqual(zip.entries.map((e) => e.name).sort(), fx.records!.slice().sort());
          for (const e of zip.entries) assert.ok(zip.verify(e), `${e.name}: CRC`);
        }
        if (fx.pickle_protocol !== undefined) assert.equal(f.pickleProtocol, fx.pickle_protocol);
        assert.deepEqual(f.globals.slice().sort(), fx.pickle_globals!.slice().sort());
      } finally {
        f.close();
      }
    });
  }

  for (const fx of manifest.files.filter((f) => f.format === 'safetensors')) {
    test(`${fx.file}: safetensors dtypes and metadata`, () => {
      const s = readSafetensors(path.join(fixtureDir, fx.file));
      try {
        const names: Record<number, string> = { [DType.float32]: 'float32', [DType.int64]: 'int64', [DType.float16]: 'float16' };
        assert.deepEqual([...new Set([...s.tensors.values()].map((t) => names[t.dtype]))].sort(), fx.safetensors_dtypes!.slice().sort());
        assert.equal(s.metadata?.format, 'pt');
      } finally {
        s.close();
      }
    });
  }

  for (const fx of manifest.files.filter((f) => /^full_module/.test(f.form))) {
    test(`${fx.file}: the pickled module is inert data with its class, training flag and checkpoint entries`, async () => {
      const f = openTorch(path.join(fixtureDir, fx.file));
      try {
        const root = f.root as PyDict;
        const model = root.get(fx.entry as string) as PyObject;
        assert.ok(model instanceof PyObject);
        assert.equal(model.className, fx.model_class);
        assert.equal((model.state as PyDict).get('training'), fx.model_training);
        assert.deepEqual(f.dangerousGlobals, []);
        for (const [k, v] of Object.entries(fx.entries ?? {})) {
          const got = root.get(k);
          if (typeof v === 'number' || typeof v === 'string' || v === null) {
            if (typeof v === 'string' && v.startsWith('<')) continue;
            assert.equal(got, v, k);
          }
        }
        if (fx.entries && typeof fx.entries.best_fitness === 'string' && /numpy\.float64 ([\d.]+)/.test(fx.entries.best_fitness)) {
          assert.equal(pyNumber(root.get('best_fitness')), Number(/numpy\.float64 ([\d.]+)/.exec(fx.entries.best_fitness)![1]));
        }
        // Rewriting the whole checkpoint keeps every object, attribute and tensor.
        const out = path.join(tmp, `rt-${fx.file}`);
        await writeTorchZip(out, f.root, { archiveName: path.basename(fx.file, '.pt') });
        const g = openTorch(out);
        assert.equal(pyDiff(f.root, g.root), undefined);
        assert.deepEqual([...namedTensors(g.root).keys()], [...namedTensors(f.root).keys()]);
        g.close();
      } finally {
        f.close();
      }
    });
  }

  test('state_dict fixtures survive write → read unchanged (incl. _metadata)', async () => {
    for (const fx of manifest.files.filter((f) => ['state_dict', 'state_dict_fp16', 'legacy', 'module_prefix'].includes(f.form))) {
      const f = openTorch(path.join(fixtureDir, fx.file));
      const out = path.join(tmp, `rt-${fx.file}`);
      await writeTorchZip(out, f.root);
      const g = openTorch(out);
      assert.equal(pyDiff(f.root, g.root), undefined, fx.file);
      f.close();
      g.close();
    }
  });

  test('hostile files: the payload is an inert, reported object; nothing runs; "refuse" refuses', () => {
    const marker = manifest.hostile_marker;
    fs.rmSync(marker, { force: true });
    for (const fx of manifest.files.filter((f) => f.form === 'hostile')) {
      const f = openTorch(path.join(fixtureDir, fx.file));
      try {
        const payload = (f.root as PyDict).get(fx.payload!.payload_key);
        assert.ok(payload instanceof PyObject, fx.file);
        assert.equal(pyDiff(payload.args, fx.payload!.args), undefined, fx.file);
        assert.ok(f.dangerousGlobals.length > 0, fx.file);
        assert.match(f.warnings.join('\n'), /the file references .*: not executed/);
        assert.equal(namedTensors(f.root).size, fx.tensors);
      } finally {
        f.close();
      }
      throwsFormat(() => openTorch(path.join(fixtureDir, fx.file), { dangerous: 'refuse' }), /refusing to load it/);
      assert.equal(fs.existsSync(marker), false, `${fx.file} ran its payload`);
    }
  });

  test('FileSource reads stay lazy: opening a checkpoint reads far less than the file', () => {
    const p = path.join(fixtureDir, 'yolov7_full_ema.pt');
    const src = new FileSource(p);
    let bytes = 0;
    const counting = {
      name: src.name,
      size: src.size,
      read: (o: number, n: number) => ((bytes += n), src.read(o, n)),
      readOwned: (o: number, n: number) => ((bytes += n), src.readOwned(o, n)),
      close: () => src.close(),
    };
    const f = openTorch(counting);
    const weights = [...f.storages].reduce((a, s) => a + s.byteLength, 0);
    assert.ok(weights > 20000);
    assert.ok(bytes < src.size - weights / 2, `read ${bytes} of ${src.size} bytes while opening`);
    src.close();
  });
});
