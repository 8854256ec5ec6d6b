// The format registry is the one list of extensions: the engine, the extension's settings helpers
// and package.json's contributions (editor selectors, Explorer/editor menus) must all agree with it.
import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { BufferSource } from '../src/core/bytes';
import { checkOutputExtension, FORMATS, formatByExtension, MODEL_EXTENSIONS, modelKind, sniffFormat } from '../src/core/formats';
import { isModelFile, MODEL_EXTENSIONS as EXT_FROM_SETTINGS } from '../src/extension/view/settings';
import { RepFuseError } from '../src/core/errors';

const ROOT = path.join(__dirname, '..', '..');
const pkg = JSON.parse(fs.readFileSync(path.join(ROOT, 'package.json'), 'utf8'));

test('every extension belongs to exactly one format, except .safetensors, which only safetensors reads', () => {
  for (const ext of MODEL_EXTENSIONS) {
    const owners = FORMATS.filter((f) => f.extensions.includes(ext));
    assert.equal(owners.length, 1, `${ext} has ${owners.length} owners`);
  }
  assert.deepEqual([...MODEL_EXTENSIONS].sort(), ['.bin', '.ckpt', '.onnx', '.pkl', '.pt', '.pth', '.safetensors', '.tar']);
});

test("package.json's editor selectors cover exactly the registry's extensions", () => {
  const patterns: string[] = pkg.contributes.customEditors.flatMap((e: { selector: { filenamePattern: string }[] }) => e.selector.map((s) => s.filenamePattern));
  const exts = patterns.map((p) => p.replace(/^\*/, '').toLowerCase()).sort();
  assert.deepEqual(exts, [...MODEL_EXTENSIONS].sort());
});

test("package.json's menu conditions on resourceExtname accept exactly the registry's extensions", () => {
  const whens: string[] = [];
  for (const items of Object.values(pkg.contributes.menus as Record<string, { when?: string }[]>)) {
    for (const it of items) if (it.when?.includes('resourceExtname')) whens.push(it.when);
  }
  assert.ok(whens.length >= 2, 'the Explorer and editor menus gate on the extension');
  for (const w of whens) {
    const m = /resourceExtname =~ \/(.*)\/i/.exec(w);
    assert.ok(m, w);
    const re = new RegExp(m[1], 'i');
    for (const ext of MODEL_EXTENSIONS) assert.ok(re.test(ext), `${ext} is accepted by ${w}`);
    for (const ext of ['.json', '.onnx.data', '.npy', '.txt', '.pt2']) assert.ok(!re.test(ext), `${ext} is refused by ${w}`);
  }
});

test('the extension reads the same list', () => {
  assert.equal(EXT_FROM_SETTINGS, MODEL_EXTENSIONS);
  assert.ok(isModelFile('/a/pytorch_model.BIN'));
  assert.ok(isModelFile('/a/w.tar'));
  assert.ok(!isModelFile('/a/w.npy'));
});

test('modelKind: by extension, one-line error naming the file otherwise', () => {
  assert.equal(modelKind('m.onnx'), 'onnx');
  assert.equal(modelKind('m.PTH'), 'checkpoint');
  assert.equal(modelKind('m.safetensors'), 'checkpoint');
  assert.throws(
    () => modelKind('/x/notes.txt'),
    (e: unknown) => e instanceof RepFuseError && e.file === '/x/notes.txt' && /unsupported file type '\.txt'.*\.onnx.*\.pt.*\.safetensors/.test(e.message) && !e.message.includes('\n'),
  );
});

test('sniffing: the bytes decide when they say something', () => {
  const zip = new BufferSource(Uint8Array.from([0x50, 0x4b, 0x03, 0x04, 0, 0, 0, 0]), 'w.bin');
  assert.equal(sniffFormat(zip)?.id, 'pytorch');
  const header = Buffer.from('{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}');
  const st = Buffer.alloc(8 + header.length + 4);
  st.writeBigUInt64LE(BigInt(header.length), 0);
  header.copy(st, 8);
  assert.equal(sniffFormat(new BufferSource(st, 'named-wrongly.pt'))?.id, 'safetensors');
  const legacy = new BufferSource(Uint8Array.from([0x80, 0x02, 0x8a, 0x0a]), 'old.pth');
  assert.equal(sniffFormat(legacy)?.id, 'pytorch');
  const onnx = new BufferSource(Uint8Array.from([0x08, 0x07, 0x12, 0x07]), 'model.bin');
  assert.equal(sniffFormat(onnx)?.id, 'onnx');
  assert.equal(formatByExtension('x.onnx')?.id, 'onnx');
});

test('output extensions: what each format can be written as', () => {
  checkOutputExtension('a.onnx', 'b.onnx');
  checkOutputExtension('a.pt', 'b.safetensors');
  checkOutputExtension('a.safetensors', 'b.pt');
  assert.throws(() => checkOutputExtension('a.onnx', 'b.pt'), /cannot write '\.pt': a fused ONNX model is written as \.onnx/);
  assert.throws(() => checkOutputExtension('a.pt', 'b.txt'), /cannot write '\.txt': a fused PyTorch checkpoint/);
  assert.throws(() => checkOutputExtension('a.pt', 'b'), /'\(no extension\)'/);
});
