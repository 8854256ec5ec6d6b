// The writer: byte-exact preservation of what it does not change, value_info and graph-input
// clean-up, external data, subgraphs, and never touching the input.
import * as assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { onnx } from 'onnx-proto';
import { FormatError, RepFuseError } from '../src/core/errors';
import { defaultFuseOptions, fuse, inspect } from '../src/engine';
import { ValidationError } from '../src/validate';
import { fuseAndValidate, viewModel, writeModel } from './helpers/fuse';
import {
  attrGraph,
  concatBytes,
  encodeWithExtras,
  externalize,
  lenField,
  ModelBuilder,
  makeTensor,
  valueInfo,
} from './helpers/onnx-builder';
import { makeTmp, rmTmp } from './helpers/paths';

let dir: string;
before(() => {
  dir = makeTmp();
});
after(() => rmTmp(dir));

const C = 4;
const H = 6;
const sha256 = (file: string) => createHash('sha256').update(fs.readFileSync(file)).digest('hex');
const contains = (hay: Uint8Array, needle: Uint8Array) => Buffer.from(hay.buffer, hay.byteOffset, hay.length).indexOf(Buffer.from(needle)) >= 0;

/** x → RepVGG block → relu → Mul by a kept initializer → output. */
function blockModel(c = C, seed = 3) {
  const b = new ModelBuilder({ seed });
  const x = b.input('x', [1, c, H, H]);
  const dense = b.conv(x, c, c, [3, 3], { bn: true });
  const denseOut = b.last.convOut;
  const y = b.add(b.add(dense, b.conv(x, c, c, [1, 1], { bn: true })), b.bn(x, c));
  const r = b.relu(y, 'act');
  const keep = b.init('keep_scale', [1, c, 1, 1], (i) => 1 + i / 8);
  const out = b.mul(r, keep, 'final_mul');
  b.output(out, [1, c, H, H]);
  return { b, x, y, r, keep, out, denseOut };
}

describe('unknown fields and metadata survive byte for byte', () => {
  it('in ModelProto, GraphProto, a kept NodeProto and a kept TensorProto', async () => {
    const { b, keep } = blockModel();
    const m = b.model();
    m.docString = 'model doc string';
    m.domain = 'org.example';
    m.modelVersion = 42;
    m.metadataProps = [{ key: 'author', value: 'repfuse tests' }, { key: 'licence', value: 'MIT' }];
    m.opsetImport!.push({ domain: 'ai.onnx.ml', version: 3 });
    m.graph!.docString = 'graph doc string';
    const reluIndex = m.graph!.node!.findIndex((n) => n.opType === 'Relu');
    const extras = {
      model: lenField(999, Buffer.from('model-level unknown field')),
      graph: lenField(999, Buffer.from('graph-level unknown field')),
      nodes: { [reluIndex]: lenField(999, Buffer.from('node-level unknown field')) },
      initializers: { [keep]: lenField(999, Buffer.from('tensor-level unknown field')) },
    };
    const bytes = encodeWithExtras(m, extras);
    const f = await fuseAndValidate(bytes, { dir, expectBlocks: 1, expectOps: { Conv: 1, Relu: 1, Mul: 1 } });
    const out = f.out.bytes;
    for (const [where, extra] of [['model', extras.model], ['graph', extras.graph], ['node', extras.nodes[reluIndex]], ['tensor', extras.initializers[keep]]] as const) {
      assert.ok(contains(out, extra), `the ${where}-level unknown field is in the output`);
    }
    // The kept node and the kept tensor, unknown field included, are copied verbatim.
    const reluBytes = concatBytes(onnx.NodeProto.encode(m.graph!.node![reluIndex]).finish(), extras.nodes[reluIndex]);
    assert.ok(contains(out, lenField(1, reluBytes)), 'the Relu NodeProto is byte-identical');
    const keepProto = m.graph!.initializer!.find((t) => t.name === keep)!;
    assert.ok(contains(out, lenField(5, concatBytes(onnx.TensorProto.encode(keepProto).finish(), extras.initializers[keep]))), 'the kept TensorProto is byte-identical');
    // Decoded metadata is unchanged.
    const a = onnx.ModelProto.toObject(f.original.proto, { longs: Number });
    const o = onnx.ModelProto.toObject(f.out.proto, { longs: Number });
    for (const k of ['irVersion', 'producerName', 'producerVersion', 'domain', 'modelVersion', 'docString', 'metadataProps', 'opsetImport'] as const) {
      assert.deepEqual(o[k], a[k], k);
    }
    assert.equal(o.graph.docString, 'graph doc string');
    assert.equal(o.graph.name, a.graph.name);
    assert.deepEqual(o.graph.input, a.graph.input);
    assert.deepEqual(o.graph.output, a.graph.output);
  });

  it('the ModelProto fields keep their order (graph between the fields around it)', async () => {
    const { b } = blockModel();
    const m = b.model();
    m.docString = 'doc';
    const head = onnx.ModelProto.encode({ ...m, graph: null }).finish();
    const graph = onnx.GraphProto.encode(m.graph!).finish();
    const tail = concatBytes(lenField(14, onnx.StringStringEntryProto.encode({ key: 'k', value: 'v' }).finish()), lenField(999, Buffer.from('tail')));
    const bytes = concatBytes(head, lenField(7, graph), tail);
    const f = await fuseAndValidate(bytes, { dir, expectBlocks: 1 });
    const out = f.out.bytes;
    assert.deepEqual(Buffer.from(out.subarray(0, head.length)), Buffer.from(head), 'fields before the graph are copied first');
    assert.deepEqual(Buffer.from(out.subarray(out.length - tail.length)), Buffer.from(tail), 'fields after the graph are copied last');
  });
});

describe('value_info and graph inputs', () => {
  it('value_info of removed branch tensors is dropped; of kept tensors, kept', async () => {
    const { b, y, r, denseOut } = blockModel();
    const bnOut = b.nodes.find((n) => n.opType === 'BatchNormalization')!.output![0];
    for (const t of [denseOut, bnOut, y, r]) b.valueInfo(t, [1, C, H, H]);
    const f = await fuseAndValidate(b.encode(), { dir, expectBlocks: 1 });
    const names = f.out.valueInfo.map((v) => v.name);
    assert.deepEqual(names.sort(), [y, r].sort(), `value_info left: ${names}`);
    assert.deepEqual(f.out.valueInfo.find((v) => v.name === y)!.shape, [1, C, H, H]);
  });

  it('initializers listed as graph inputs: fused, and removed initializers leave the input list', async () => {
    const { b, keep } = blockModel();
    for (const t of b.initializers) b.inputs.push(valueInfo(t.name!, t.dataType!, t.dims as number[]));
    const bytes = b.encode();
    const f = await fuseAndValidate(bytes, { dir, expectBlocks: 1 });
    assert.ok(f.report.inspect.model.notes.some((n) => new RegExp(`^${b.initializers.length} initializers are also listed as graph inputs`).test(n)), JSON.stringify(f.report.inspect.model.notes));
    assert.deepEqual(f.out.inputs.map((i) => i.name), ['x', keep]);
    assert.deepEqual(f.report.validation!.inputs.map((i) => i.name), ['x']);
    assert.deepEqual([...f.out.initializers.keys()].filter((n) => !n.includes('.fused.')), [keep]);
  });
});

describe('external data', () => {
  const externalModel = (sub: string, location: string, dataFile = location) => {
    const d = path.join(dir, sub);
    fs.mkdirSync(d, { recursive: true });
    const { b } = blockModel(16, 9);
    const { model, data } = externalize(b.model(), location);
    const file = path.join(d, 'model.onnx');
    fs.writeFileSync(file, onnx.ModelProto.encode(model).finish());
    if (dataFile) {
      fs.mkdirSync(path.dirname(path.resolve(d, dataFile)), { recursive: true });
      fs.writeFileSync(path.resolve(d, dataFile), data);
    }
    return { d, file, data };
  };

  it('a model with external data is fused into a model with its own external data file', async () => {
    const { d, file } = externalModel('ext', 'weights.bin');
    const before = sha256(path.join(d, 'weights.bin'));
    const beforeModel = sha256(file);
    const f = await fuseAndValidate(file, { dir, expectBlocks: 1 });
    assert.ok(f.report.inspect.model.notes.includes('weights are stored as ONNX external data'));
    assert.equal(f.report.externalData, path.join(d, 'model.fused.onnx.data'));
    assert.ok(fs.existsSync(f.report.externalData!));
    const ext = [...f.out.initializers].filter(([, t]) => t.storage === 'external');
    assert.ok(ext.length >= 2, 'big tensors are external');
    for (const [name, t] of ext) assert.equal(t.location, 'model.fused.onnx.data', name);
    for (const [name, t] of f.out.initializers) {
      const bytes = t.values.length * 4;
      if (bytes >= 1024) assert.equal(t.storage, 'external', `${name} (${bytes} bytes) is external`);
    }
    // The kept initializer was external in the input: it moved to the new file.
    assert.equal(f.out.initializers.get('keep_scale')!.storage, 'external');
    assert.equal(sha256(path.join(d, 'weights.bin')), before, 'the input data file is unchanged');
    assert.equal(sha256(file), beforeModel, 'the input model is unchanged');
    assert.deepEqual(fs.readdirSync(d).sort(), ['model.fused.onnx', 'model.fused.onnx.data', 'model.onnx', 'weights.bin']);
  });

  it('an external-data model fused into another folder gets a self-contained data file there', async () => {
    const { d, file } = externalModel('ext-other', 'weights.bin');
    const outDir = path.join(dir, 'ext-other-out');
    fs.mkdirSync(outDir);
    const output = path.join(outDir, 'fused.onnx');
    const f = await fuseAndValidate(file, { dir, output, expectBlocks: 1 });
    assert.equal(f.report.externalData, path.join(outDir, 'fused.onnx.data'));
    for (const [name, t] of f.out.initializers) if (t.storage === 'external') assert.equal(t.location, 'fused.onnx.data', name);
    assert.deepEqual(fs.readdirSync(outDir).sort(), ['fused.onnx', 'fused.onnx.data']);
    // Moving the input away does not break the output.
    fs.renameSync(path.join(d, 'weights.bin'), path.join(d, 'weights.moved'));
    try {
      assert.equal(viewModel(output).initializers.size, f.out.initializers.size);
    } finally {
      fs.renameSync(path.join(d, 'weights.moved'), path.join(d, 'weights.bin'));
    }
  });

  it('external data declared with the wrong length is refused', () => {
    const d = path.join(dir, 'badlen');
    fs.mkdirSync(d);
    const { b } = blockModel(16, 9);
    const { model, data } = externalize(b.model(), 'w.bin');
    const t = model.graph!.initializer![0];
    t.externalData = t.externalData!.map((kv) => (kv.key === 'length' ? { key: 'length', value: String(Number(kv.value) - 4) } : kv));
    const file = path.join(d, 'model.onnx');
    fs.writeFileSync(file, onnx.ModelProto.encode(model).finish());
    fs.writeFileSync(path.join(d, 'w.bin'), data);
    assert.throws(() => inspect(file, { foldBN: true }), (err: unknown) => err instanceof FormatError && /declares \d+ bytes of external data but .* needs \d+/.test(err.message));
  });

  it('external data beyond the end of its file is a FormatError at fuse time, not a crash', async () => {
    const d = path.join(dir, 'shortdata');
    fs.mkdirSync(d);
    const { b } = blockModel(16, 9);
    const { model, data } = externalize(b.model(), 'w.bin');
    const file = path.join(d, 'model.onnx');
    fs.writeFileSync(file, onnx.ModelProto.encode(model).finish());
    fs.writeFileSync(path.join(d, 'w.bin'), data.subarray(0, data.length - 100));
    await assert.rejects(fuse(file, { ...defaultFuseOptions }), (err: unknown) => err instanceof FormatError && /truncated|end of file/.test(err.message));
    assert.deepEqual(fs.readdirSync(d).sort(), ['model.onnx', 'w.bin'], 'no output or temp file left');
  });

  for (const [label, location] of [
    ['escaping the folder (../x.bin)', '../x.bin'],
    ['absolute (/etc/passwd)', '/etc/passwd'],
    ['escaping through a subfolder (sub/../../x.bin)', 'sub/../../x.bin'],
  ]) {
    it(`a location ${label} is refused with a FormatError naming the file`, async () => {
      const { file } = externalModel(`bad${label.length}`, location, '');
      fs.writeFileSync(path.join(dir, 'x.bin'), new Uint8Array(1 << 16));
      const check = (err: unknown) => {
        assert.ok(err instanceof FormatError, String(err));
        assert.equal(err.file, file);
        assert.ok(err.oneLine().startsWith(`${file}: `), err.oneLine());
        assert.ok(err.message.includes(JSON.stringify(location)), err.message);
        assert.ok(!err.oneLine().includes('\n'));
        return true;
      };
      assert.throws(() => inspect(file, { foldBN: true }), check);
      await assert.rejects(fuse(file, { ...defaultFuseOptions }), check);
      assert.ok(!fs.existsSync(file.replace(/\.onnx$/, '.fused.onnx')));
    });
  }

  it('a location inside the folder whose name starts with ".." (..weights.bin) is accepted', async () => {
    const { file } = externalModel('dotdot', '..weights.bin');
    await fuseAndValidate(file, { dir, expectBlocks: 1 });
  });

  it('a location in a subfolder is accepted', async () => {
    const { file } = externalModel('subdir', 'data/weights.bin');
    await fuseAndValidate(file, { dir, expectBlocks: 1 });
  });

  it('a symlink inside the folder that points outside it is refused', () => {
    const outside = path.join(dir, 'outside-secret.bin');
    const { d, file, data } = externalModel('symlink', 'link.bin', '');
    fs.writeFileSync(outside, data);
    fs.symlinkSync(outside, path.join(d, 'link.bin'));
    assert.throws(() => inspect(file, { foldBN: true }), FormatError);
  });

  it('the output may not replace the input’s external data file, even with force', async () => {
    const { d, file } = externalModel('ownfile', 'weights.bin');
    const data = path.join(d, 'weights.bin');
    const before = sha256(data);
    await assert.rejects(fuse(file, { ...defaultFuseOptions, output: data, force: true }), (err: unknown) => {
      // Refused up front, not found out by a validation run on the destroyed input.
      assert.ok(err instanceof RepFuseError && !(err instanceof ValidationError), `${(err as Error).name}: ${(err as Error).message}`);
      return true;
    });
    assert.equal(sha256(data), before, 'the input’s weights are intact');
  });
});

describe('the input is never touched', () => {
  it('output == input is refused, also spelled differently', async () => {
    const file = writeModel(dir, blockModel().b.encode(), 'self');
    const before = sha256(file);
    for (const output of [file, path.join(path.dirname(file), '.', '..', path.basename(dir), path.basename(file))]) {
      await assert.rejects(fuse(file, { ...defaultFuseOptions, output, force: true }), (err: unknown) => {
        assert.ok(err instanceof RepFuseError);
        assert.match(err.message, /overwrite the input/);
        return true;
      });
    }
    assert.equal(sha256(file), before);
  });

  it('an existing output is refused unless force; no .tmp files are left; the input is unchanged', async () => {
    const sub = path.join(dir, 'force');
    fs.mkdirSync(sub);
    const file = writeModel(sub, blockModel().b.encode(), 'm');
    const before = sha256(file);
    const out = path.join(sub, 'out.onnx');
    fs.writeFileSync(out, 'not a model');
    await assert.rejects(fuse(file, { ...defaultFuseOptions, output: out }), (err: unknown) => {
      assert.ok(err instanceof RepFuseError);
      assert.match(err.message, /already exists; use --force/);
      return true;
    });
    assert.equal(fs.readFileSync(out, 'utf8'), 'not a model', 'the existing file is untouched');
    const r = await fuse(file, { ...defaultFuseOptions, output: out, force: true });
    assert.equal(r.validation?.passed, true);
    assert.equal(viewModel(out).opCounts.Conv, 1);
    assert.equal(sha256(file), before);
    assert.deepEqual(fs.readdirSync(sub).filter((n) => n.endsWith('.tmp') || n.startsWith('.')), []);
    assert.deepEqual(fs.readdirSync(sub).sort(), [path.basename(file), 'out.onnx'].sort());
  });
});

describe('subgraphs', () => {
  /** A block plus an If node whose branches read the block's 3×3 weight (or conv output) from the outer scope. */
  const withIf = (readConvOutput: boolean) => {
    const { b, x, denseOut } = blockModel();
    const w = b.initializers[0].name!; // the dense conv's weight
    const outer = readConvOutput ? denseOut : w;
    const shape = readConvOutput ? [1, C, H, H] : [C, C, 3, 3];
    const branch = (op: string, out: string): onnx.IGraphProto => ({
      name: `${op}_branch`,
      node: [{ opType: op, input: [outer], output: [out], name: `${op}_in_branch` }],
      output: [valueInfo(out, 'float32', shape)],
    });
    const cond = b.init('cond', [], [1], { dtype: 'bool' });
    b.node('If', [cond], { outputs: ['if_out'], attrs: [attrGraph('then_branch', branch('Identity', 'then_out')), attrGraph('else_branch', branch('Neg', 'else_out'))] });
    b.output('if_out', shape);
    return { bytes: b.encode(), w, x };
  };

  it('an initializer read by an If branch is kept although the fused conv no longer reads it', async () => {
    const { bytes, w } = withIf(false);
    const f = await fuseAndValidate(bytes, { dir, expectBlocks: 1, expectOps: { If: 1, Conv: 1 } });
    assert.ok(f.out.initializers.has(w), `${w} is kept`);
    assert.equal(f.report.inspect.blocks[0].branches.length, 3);
  });

  it('a branch output read by an If branch blocks the fusion', () => {
    const { bytes } = withIf(true);
    const file = writeModel(dir, bytes);
    const r = inspect(file, { foldBN: true });
    assert.equal(r.blocks.length, 0);
    assert.ok(r.rejected.length >= 1);
    for (const rej of r.rejected) assert.match(rej.reason, /output of Conv 'Conv_0' is also used by a subgraph/);
  });
});

describe('tensors the writer creates', () => {
  it('a model whose weights are all Constant nodes (no initializers at all)', async () => {
    const b = new ModelBuilder({ seed: 4 });
    const x = b.input('x', [1, C, H, H]);
    const y = b.add(b.conv(x, C, C, [3, 3], { weightVia: 'constant' }), b.conv(x, C, C, [1, 1], { weightVia: 'constant' }));
    b.output(b.relu(y));
    assert.equal(b.initializers.length, 0);
    const f = await fuseAndValidate(b.encode(), { dir, expectBlocks: 1, expectOps: { Constant: 0, Conv: 1 } });
    assert.equal(f.out.initializers.size, 2);
  });

  it('makeTensor round trip: a kept float_data tensor is copied as is', async () => {
    const { b } = blockModel();
    b.initializers.push(makeTensor('unused_typed', [2], [1.5, -2.5], 'float32', 'typed'));
    b.output(b.op('Identity', ['unused_typed']));
    const f = await fuseAndValidate(b.encode(), { dir, expectBlocks: 1 });
    assert.deepEqual(Array.from(f.out.initializers.get('unused_typed')!.values), [1.5, -2.5]);
    assert.equal(f.out.initializers.get('unused_typed')!.storage, 'values');
  });
});
