// The staged validation session: the header model that points onnxruntime at the model file's own
// bytes, the buffer fallback, block outputs added without re-encoding, and the host removing a
// header a killed child left behind.
import * as assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { DType } from '../src/core/dtype';
import { resolveInputs } from '../src/core/onnx/inputs';
import { openOnnx } from '../src/core/onnx/reader';
import { defaultFuseOptions, fuse } from '../src/engine';
import { ValidationError } from '../src/validate';
import { ValidationSession } from '../src/validate/session';
import { externalHeader, extraOutputsSuffix } from '../src/validate/staged';
import { validationHeaderName } from '../src/validate/stagedProtocol';
import { onnx } from 'onnx-proto';
import { ModelBuilder } from './helpers/onnx-builder';
import { fixturesDir, makeTmp, rmTmp } from './helpers/paths';
import { execFileSync, spawnSync } from 'node:child_process';

const havePython = spawnSync('/usr/bin/python3', ['-c', 'import onnx'], { stdio: 'ignore' }).status === 0;

let dir: string;
before(() => {
  dir = makeTmp();
});
after(() => rmTmp(dir));

const strayHeaders = (folder: string) => fs.readdirSync(folder).filter((f) => f.endsWith('.validate.onnx') || f.endsWith('.validate.onnx.copy'));

describe('models as onnxruntime sees them in validation', () => {
  it('externalHeader: the same graph, big initializers as references into the model file, extra outputs last', () => {
    const file = path.join(fixturesDir, 'repvgg_bn.onnx');
    const m = openOnnx(file);
    const header = externalHeader(m, 'repvgg_bn.onnx', [{ name: 'extra_out', elemType: DType.float32 }], 256);
    const orig = onnx.ModelProto.decode(fs.readFileSync(file));
    const h = onnx.ModelProto.decode(header);
    assert.ok(header.length < m.source.size / 2, `header ${header.length} B of ${m.source.size}`);
    assert.deepEqual(h.graph!.node!.map((n) => n.name), orig.graph!.node!.map((n) => n.name));
    assert.deepEqual(h.graph!.output!.map((o) => o.name), [...orig.graph!.output!.map((o) => o.name), 'extra_out']);
    let external = 0;
    const bytes = fs.readFileSync(file);
    for (const [i, t] of h.graph!.initializer!.entries()) {
      const o = orig.graph!.initializer![i];
      assert.equal(t.name, o.name);
      assert.deepEqual(t.dims!.map(Number), o.dims!.map(Number));
      if (t.dataLocation !== onnx.TensorProto.DataLocation.EXTERNAL) continue;
      external++;
      const kv = Object.fromEntries(t.externalData!.map((e) => [e.key, e.value]));
      assert.equal(kv.location, 'repvgg_bn.onnx');
      // The reference points at exactly the raw bytes the original stores.
      assert.deepEqual(bytes.subarray(Number(kv.offset), Number(kv.offset) + Number(kv.length)), Buffer.from(o.rawData!));
    }
    m.close();
    assert.ok(external >= 5, `${external} tensors referenced`);
  });

  it('extraOutputsSuffix: appended to the file, protobuf (C++, as onnxruntime parses) merges it into the graph', { skip: !havePython && 'needs /usr/bin/python3 with onnx' }, () => {
    // protobufjs replaces a repeated embedded message instead of merging it; the reference
    // implementation (onnx's C++-backed protobuf, like onnxruntime's) merges, as the spec says.
    const file = path.join(fixturesDir, 'acnet_folded.onnx');
    const merged = path.join(dir, 'merged.onnx');
    fs.writeFileSync(merged, Buffer.concat([fs.readFileSync(file), extraOutputsSuffix([{ name: 'a', elemType: 1 }, { name: 'b', elemType: 10 }])]));
    const show = (f: string) =>
      JSON.parse(
        execFileSync('/usr/bin/python3', ['-c', 'import onnx, json, sys; m = onnx.load(sys.argv[1]); print(json.dumps([[o.name, o.type.tensor_type.elem_type] for o in m.graph.output] + [len(m.graph.node), len(m.graph.initializer), m.graph.name]))', f], { encoding: 'utf8' }),
      ) as unknown[];
    const before = show(file);
    const after = show(merged);
    assert.deepEqual(after, [...before.slice(0, -3), ['a', 1], ['b', 10], ...before.slice(-3)]);
    assert.deepEqual(extraOutputsSuffix([]), new Uint8Array(0));
  });

  it('a model reached through a link (the header cannot point at it): the buffer fallback validates the same', async () => {
    const real = path.join(dir, 'real');
    const linked = path.join(dir, 'linked');
    fs.mkdirSync(real);
    fs.mkdirSync(linked);
    fs.copyFileSync(path.join(fixturesDir, 'yolov7_bn.onnx'), path.join(real, 'y.onnx'));
    fs.symlinkSync(path.join(real, 'y.onnx'), path.join(linked, 'y.onnx'));
    const viaLink = await fuse(path.join(linked, 'y.onnx'), { ...defaultFuseOptions, output: path.join(linked, 'y.fused.onnx') });
    const direct = await fuse(path.join(real, 'y.onnx'), { ...defaultFuseOptions, output: path.join(real, 'y.fused.onnx') });
    assert.equal(viaLink.validation!.passed, true);
    assert.equal(viaLink.validation!.blocks.length, direct.validation!.blocks.length);
    assert.ok(viaLink.validation!.blocks.length > 0);
    // Same inputs, same models: the very same differences either way.
    assert.deepEqual(
      viaLink.validation!.outputs.map((d) => d.maxAbsDiff),
      direct.validation!.outputs.map((d) => d.maxAbsDiff),
    );
    assert.deepEqual(strayHeaders(real), []);
    assert.deepEqual(strayHeaders(linked), []);
  });
});

describe('the session around the child', () => {
  it('the child killed while its header lies beside the model: a ValidationError, and the host removes the header', async () => {
    const folder = path.join(dir, 'killed');
    fs.mkdirSync(folder);
    const model = path.join(folder, 'm.onnx');
    const b = new ModelBuilder({ seed: 5 });
    const x = b.input('x', [1, 16, 96, 96]);
    let y = x;
    for (let i = 0; i < 3; i++) y = b.relu(b.add(b.conv(y, 16, 16, [3, 3], { bn: true }), b.conv(y, 16, 16, [1, 1], { bn: true })));
    b.output(y);
    fs.writeFileSync(model, b.encode());
    let pid = 0;
    const s = new ValidationSession({
      timeoutMs: 60_000,
      onProgress: (m) => {
        if (m !== 'running the original model' || pid) return;
        pid = (s as unknown as { child: { pid: number } }).child.pid;
        // What a child killed at the wrong moment leaves: its header beside the model.
        fs.writeFileSync(path.join(folder, validationHeaderName(model, pid)), 'stale');
        process.kill(pid, 'SIGKILL');
      },
    });
    s.begin({ type: 'validate-begin', original: model, outputs: [y], blocks: [], inputs: [{ name: 'x', dtype: DType.float32, shape: [1, 16, 96, 96] }], seed: 0, threads: 0, latencyRuns: 0 });
    await assert.rejects(s.result(), (e: unknown) => e instanceof ValidationError && /killed by SIGKILL/.test(e.message));
    assert.ok(pid > 0);
    assert.deepEqual(strayHeaders(folder), []);
  });

  it('cancelled before the fused model is ready: "validation cancelled.", nothing left beside the model', async () => {
    const folder = path.join(dir, 'cancel');
    fs.mkdirSync(folder);
    const model = path.join(folder, 'm.onnx');
    fs.copyFileSync(path.join(fixturesDir, 'repvgg_bn.onnx'), model);
    const ctl = new AbortController();
    const s = new ValidationSession({ timeoutMs: 60_000, signal: ctl.signal, onProgress: (m) => /waiting for the fused model/.test(m) && ctl.abort() });
    const m = openOnnx(model);
    const inputs = resolveInputs(m, {});
    const outputs = m.graph.outputs.map((o) => o.name);
    m.close();
    s.begin({ type: 'validate-begin', original: model, outputs, blocks: [], inputs, seed: 0, threads: 0, latencyRuns: 0 });
    await assert.rejects(s.result(), (e: unknown) => e instanceof ValidationError && e.message === 'validation cancelled.');
    assert.deepEqual(strayHeaders(folder), []);
  });
});
