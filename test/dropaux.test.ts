// `repfuse fuse --drop-aux`: YOLO training checkpoints made by the official YOLOv9 and YOLOv7 code
// (test/fixtures/official/make_dropaux.py) turned into the deploy architecture, checked against
// what the official tools/reparameterization.ipynb of each repository produces for the same
// checkpoint: layer table (i, f, type), save list, yaml, state_dict keys and shapes, and — in
// PyTorch with stand-in classes at the official import paths — the model's output.
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { dropAux } from '../src/core/checkpoint/dropaux';
import { namedTensors, openTorch } from '../src/core/torch/load';
import { PyDict, PyFloat, PyObject, PySet, type PyValue } from '../src/core/torch/values';
import { NewTensor, TorchTensor } from '../src/core/torch/tensor';
import { defaultFuseOptions, fuse, inspect } from '../src/engine';
import { RepFuseError } from '../src/core/errors';
import { cliPath, makeTmp, repoRoot, rmTmp } from './helpers/paths';

const OFFICIAL = path.join(repoRoot, 'test', 'fixtures', 'official');
const PYTHON = process.env.REPFUSE_TEST_PYTHON || '/usr/bin/python3';
const CASES = [
  { id: 'dropaux_yolov9', standins: 'yolov9', head: 'models.yolo.DDetect', trainHead: 'models.yolo.DualDDetect', removed: 16, kept: 23 },
  { id: 'dropaux_yolov7', standins: 'yolov7', head: 'models.yolo.Detect', trainHead: 'models.yolo.IAuxDetect', removed: 4, kept: 119 },
] as const;

interface DeployModel {
  yaml: Record<string, unknown>;
  layers: { i: number; f: number | number[]; type: string }[];
  save: number[];
  names: string[];
  nc: number;
}

const readJson = <T>(id: string, name: string): T => JSON.parse(fs.readFileSync(path.join(OFFICIAL, id, name), 'utf8')) as T;

/** Python-shaped plain data from unpickled values (dicts → objects, integral floats → numbers). */
function plain(v: PyValue | undefined): unknown {
  if (v instanceof PyDict) return Object.fromEntries(v.keys().map((k) => [String(k), plain(v.get(k))]));
  if (Array.isArray(v)) return v.map(plain);
  if (v instanceof PyFloat) return v.value;
  return v;
}

function modelOf(root: PyValue): PyObject {
  assert.ok(root instanceof PyDict);
  const m = root.get('model');
  assert.ok(m instanceof PyObject);
  return m;
}

const stateOf = (o: PyObject) => o.state as PyDict;

/** What module.state_dict() would list: parameters and persistent buffers (read or newly made), keys → shapes. */
function stateDictShapes(root: PyObject): Record<string, number[]> {
  const out: Record<string, number[]> = {};
  const visit = (o: PyObject, prefix: string) => {
    const st = stateOf(o);
    const np = st.get('_non_persistent_buffers_set');
    const skip = new Set(np instanceof PySet ? np.items.filter((x): x is string => typeof x === 'string') : []);
    for (const field of ['_parameters', '_buffers']) {
      for (const [k, v] of st.get(field) as PyDict) {
        if (field === '_buffers' && skip.has(String(k))) continue;
        if (v instanceof TorchTensor || v instanceof NewTensor) out[prefix + String(k)] = v.shape;
      }
    }
    for (const [k, v] of st.get('_modules') as PyDict) if (v instanceof PyObject) visit(v, `${prefix}${String(k)}.`);
  };
  visit(root, '');
  return out;
}

/**
 * The keys the notebook's model has once RepConvN is fused (what RepFuse writes with --no-fold-bn):
 * every RepConvN (a module with conv1.conv and conv2.conv) takes its keys from the model after the
 * official Model.fuse(), everything else from the notebook's model as converted.
 */
function keysWithRepConvFused(id: string): Record<string, number[]> {
  const plainKeys = readJson<Record<string, number[]>>(id, 'notebook_keys.json');
  const fusedKeys = readJson<Record<string, number[]>>(id, 'notebook_fused_keys.json');
  const reps = Object.keys(plainKeys)
    .filter((k) => k.endsWith('.conv1.conv.weight') && `${k.slice(0, -'.conv1.conv.weight'.length)}.conv2.conv.weight` in plainKeys)
    .map((k) => k.slice(0, -'.conv1.conv.weight'.length) + '.');
  const under = (k: string) => reps.some((p) => k.startsWith(p));
  const out: Record<string, number[]> = {};
  for (const [k, v] of Object.entries(plainKeys)) if (!under(k)) out[k] = v;
  for (const [k, v] of Object.entries(fusedKeys)) if (under(k)) out[k] = v;
  return out;
}

let tmp: string;
before(() => {
  tmp = makeTmp();
});
after(() => rmTmp(tmp));

describe('the conversion itself equals the official notebook', () => {
  for (const c of CASES) {
    test(`${c.id}: layers (i, f, type), save list, yaml, head class and state_dict keys/shapes`, () => {
      const t = openTorch(path.join(OFFICIAL, c.id, 'train.pt'));
      try {
        const before = modelOf(t.root).className;
        const [r] = dropAux(t.root);
        assert.equal(r.converted, true);
        assert.equal(r.head?.from, c.trainHead);
        assert.equal(r.head?.to, c.head);
        assert.equal(r.removed.length, c.removed);
        assert.equal(r.layers.length - r.removed.length, c.kept);
        const m = modelOf(t.root);
        assert.equal(m.className, before, 'the model class itself is unchanged');
        const exp = readJson<DeployModel>(c.id, 'deploy_model.json');
        const seq = (stateOf(m).get('_modules') as PyDict).get('model') as PyObject;
        const layers = (stateOf(seq).get('_modules') as PyDict).values() as PyObject[];
        assert.deepEqual(
          layers.map((l) => ({ i: plain(stateOf(l).get('i')), f: plain(stateOf(l).get('f')), type: plain(stateOf(l).get('type')) })),
          exp.layers,
        );
        assert.deepEqual((stateOf(seq).get('_modules') as PyDict).keys(), exp.layers.map((_, k) => String(k)), 'Sequential keys renumbered 0..n-1');
        assert.equal(layers[layers.length - 1].className, c.head);
        assert.deepEqual(stateOf(m).get('save'), exp.save);
        assert.deepEqual(plain(stateOf(m).get('yaml')), exp.yaml);
        assert.deepEqual(plain(stateOf(m).get('names')), exp.names, 'names come from the checkpoint');
        assert.equal(plain(stateOf(m).get('nc')), exp.nc, 'nc comes from the checkpoint');
        const keys = readJson<Record<string, number[]>>(c.id, 'notebook_keys.json');
        assert.deepEqual(stateDictShapes(m), keys);
      } finally {
        t.close();
      }
    });
  }

  test('a checkpoint without an auxiliary head is left as it is, with a note', () => {
    const t = openTorch(path.join(repoRoot, 'test', 'fixtures', 'torch', 'yolov7_full.pt'));
    try {
      const before = [...namedTensors(t.root).keys()];
      const r = dropAux(t.root);
      assert.ok(r.length >= 1);
      for (const x of r) {
        assert.equal(x.converted, false);
        assert.match(x.note, /no auxiliary head|not a YOLO model/);
      }
      assert.deepEqual([...namedTensors(t.root).keys()], before);
    } finally {
      t.source.close();
    }
  });

  test('a state_dict cannot be converted: a one-line error', () => {
    const t = openTorch(path.join(repoRoot, 'test', 'fixtures', 'torch', 'repvgg_sd.pt'));
    try {
      assert.throws(() => dropAux(t.root), (e: unknown) => e instanceof RepFuseError && /needs a full-module YOLO checkpoint/.test(e.message) && !e.message.includes('\n'));
    } finally {
      t.source.close();
    }
  });
});

describe('inspect names auxiliary heads, so --drop-aux can be offered', () => {
  test('checkpoints and ONNX exports with auxiliary heads; none on a model without them', () => {
    assert.deepEqual(inspect(path.join(OFFICIAL, 'dropaux_yolov9', 'train.pt'), { foldBN: true }).model.auxHeads, ['models.yolo.DualDDetect']);
    assert.deepEqual(inspect(path.join(OFFICIAL, 'dropaux_yolov7', 'train.pt'), { foldBN: true }).model.auxHeads, ['models.yolo.IAuxDetect']);
    assert.deepEqual(inspect(path.join(OFFICIAL, 'dropaux_yolov9_onnx', 'train.onnx'), { foldBN: true }).model.auxHeads, ['model.38 (DualDDetect/DualDetect)']);
    assert.equal(inspect(path.join(repoRoot, 'test', 'fixtures', 'torch', 'yolov7_full.pt'), { foldBN: true }).model.auxHeads, undefined);
  });
});

describe('repfuse fuse --drop-aux', () => {
  test('YOLOv7-W6: the report lists the head change, the removed and renumbered layers; the input is untouched', async () => {
    const input = path.join(OFFICIAL, 'dropaux_yolov7', 'train.pt');
    const before = fs.readFileSync(input);
    const out = path.join(tmp, 'w6.pt');
    const r = await fuse(input, { ...defaultFuseOptions, output: out, dropAux: true });
    assert.equal(r.output, path.resolve(out));
    assert.ok(r.dropAux && r.dropAux[0].converted);
    assert.deepEqual(r.dropAux[0].removed.map((l) => l.from), [118, 119, 120, 121]);
    assert.deepEqual(r.dropAux[0].renumbered.map((l) => [l.from, l.to]), [[122, 118]]);
    assert.equal(r.dropAux[0].implicitFolded, 4);
    assert.ok(r.validation === null && /end to end only by the Python validation/.test(r.validationSkipped ?? ''), 'no block-level verdict on a conversion blocks cannot check');
    assert.ok(before.equals(fs.readFileSync(input)));
  });

  test('the CLI: text and JSON', async () => {
    const input = path.join(OFFICIAL, 'dropaux_yolov9', 'train.pt');
    const out = path.join(tmp, 'gelan.pt');
    const text = await run(['fuse', input, '-o', out, '--drop-aux', '--no-validate']);
    assert.equal(text.code, 0, text.stderr);
    assert.match(text.stdout, /drop-aux: model: models\.yolo\.DualDDetect → models\.yolo\.DDetect; 16 auxiliary layers removed, 23 kept\./);
    assert.match(text.stdout, /removed 16 layers: Silence 0; CBLinear 23–25; Conv 26–27; .*CBFuse 30, 33, 36/);
    assert.match(text.stdout, /renumbered layers 1–22 → -1/);
    assert.match(text.stdout, /renumbered layers 38 → -16/);
    assert.match(text.stdout, /Converted to the deploy architecture \(DDetect head\)/);
    const json = await run(['fuse', input, '-o', out, '--force', '--drop-aux', '--no-validate', '--json']);
    assert.equal(json.code, 0, json.stderr);
    const rep = JSON.parse(json.stdout);
    assert.equal(rep.dropAux[0].head.to, 'models.yolo.DDetect');
    assert.equal(rep.dropAux[0].layers.length, 39);
  });

  test('--drop-aux with --state-dict or on a safetensors file: one-line errors, nothing written', async () => {
    const input = path.join(OFFICIAL, 'dropaux_yolov7', 'train.pt');
    const out = path.join(tmp, 'sd.pt');
    const r = await run(['fuse', input, '-o', out, '--drop-aux', '--state-dict']);
    assert.equal(r.code, 2);
    assert.match(r.stderr, /--drop-aux rewrites the model objects/);
    assert.equal(r.stderr.trim().split('\n').length, 1);
    assert.ok(!fs.existsSync(out));
    const st = path.join(repoRoot, 'test', 'fixtures', 'torch', 'mobileone_sd.safetensors');
    const s = await run(['fuse', st, '-o', path.join(tmp, 'x.safetensors'), '--drop-aux']);
    assert.equal(s.code, 2);
    assert.match(s.stderr, /--drop-aux needs a full-module YOLO checkpoint/);
  });
});

describe('ONNX: repfuse fuse --drop-aux on an export of the YOLOv9-C training model', () => {
  const FX = path.join(OFFICIAL, 'dropaux_yolov9_onnx');
  test('the auxiliary outputs and only their nodes go; the main output equals the notebook-converted GELAN', async () => {
    const out = path.join(tmp, 'gelan.onnx');
    const r = await fuse(path.join(FX, 'train.onnx'), { ...defaultFuseOptions, output: out, dropAux: true, inputNpy: { images: path.join(FX, 'input.npy') } });
    assert.ok(r.dropAuxOnnx);
    assert.deepEqual(r.dropAuxOnnx.removedOutputs, ['y_aux', 'd1_0', 'd1_1', 'd1_2']);
    assert.deepEqual(r.dropAuxOnnx.keptOutputs, ['y_main', 'd2_0', 'd2_1', 'd2_2']);
    assert.equal(r.input, path.join(FX, 'train.onnx'));
    assert.ok(r.validation?.passed, 'the pruned model and the fused one agree');
    assert.deepEqual(r.validation!.outputs.map((o) => o.name), ['y_main', 'd2_0', 'd2_1', 'd2_2']);
    // The aux branch (layers 23–37 and the head's cv2/cv3/dfl) is gone from the fused graph.
    const ort = await import('onnxruntime-node');
    const sess = await ort.InferenceSession.create(out);
    assert.deepEqual(sess.outputNames, ['y_main', 'd2_0', 'd2_1', 'd2_2']);
    const x = readNpyF32(path.join(FX, 'input.npy'));
    const y = (await sess.run({ images: new ort.Tensor('float32', x.data, x.shape) })).y_main.data as Float32Array;
    const ref = readNpyF32(path.join(FX, 'notebook_out_0.npy'));
    assert.equal(y.length, ref.data.length);
    let maxAbs = 0;
    let maxRef = 0;
    for (let k = 0; k < y.length; k++) {
      maxAbs = Math.max(maxAbs, Math.abs(y[k] - ref.data[k]));
      maxRef = Math.max(maxRef, Math.abs(ref.data[k]));
    }
    assert.ok(maxAbs <= 2e-4 * maxRef, `max |Δ| ${maxAbs} vs the notebook's GELAN (max |y| ${maxRef})`);
    const names = (await import('../src/core/onnx')).openOnnx(out);
    try {
      const aux = names.graph.nodes.filter((n) => /\/model\.(2[3-9]|3[0-7])\/|\/model\.38\/(cv2|cv3|dfl)[./]/.test(n.name));
      assert.deepEqual(aux.map((n) => n.name), [], 'no auxiliary node left');
    } finally {
      names.close();
    }
  });

  test('an ONNX model without auxiliary heads is fused as usual, with a note', async () => {
    const input = path.join(repoRoot, 'examples', 'repvgg_tiny.onnx');
    const r = await fuse(input, { ...defaultFuseOptions, output: path.join(tmp, 'rv.onnx'), dropAux: true, validate: false });
    assert.deepEqual(r.dropAuxOnnx?.removedOutputs, []);
    assert.match(r.inspect.model.notes.join('\n'), /--drop-aux: no auxiliary head/);
    assert.ok(r.blocksFused > 0);
  });
});

/** A float32 .npy (C order) as data + shape. */
function readNpyF32(file: string): { data: Float32Array; shape: number[] } {
  const b = fs.readFileSync(file);
  const hlen = b.readUInt16LE(8);
  const header = b.subarray(10, 10 + hlen).toString('latin1');
  assert.match(header, /'descr': '<f4'/);
  const shape = /'shape': \(([^)]*)\)/.exec(header)![1].split(',').filter((x) => x.trim()).map(Number);
  const off = 10 + hlen;
  return { data: new Float32Array(b.buffer.slice(b.byteOffset + off, b.byteOffset + b.length)), shape };
}

describe('the converted checkpoint runs in PyTorch and equals the notebook', () => {
  let torchProblem: string | undefined;
  before(() => {
    const r = spawnSync(PYTHON, ['-c', 'import torch, numpy'], { encoding: 'utf8', timeout: 120_000 });
    if (r.error || r.status !== 0) torchProblem = `needs Debian's PyTorch (${PYTHON} -c "import torch" failed); apt-get install python3-torch python3-numpy`;
  });
  for (const c of CASES) {
    for (const foldBN of [false, true]) {
      test(`${c.id}${foldBN ? ' (plain Conv+BN folded, as Model.fuse() does)' : ''}: loads with the stand-ins, runs, keys and outputs as the notebook's`, async () => {
        if (torchProblem) assert.fail(torchProblem);
        const standins = path.join(OFFICIAL, 'standins', c.standins);
        assert.ok(fs.existsSync(standins), `stand-ins ${standins}`);
        const out = path.join(tmp, `${c.id}-${foldBN}.pt`);
        const args = ['fuse', path.join(OFFICIAL, c.id, 'train.pt'), '-o', out, '--drop-aux', '--no-validate'];
        if (!foldBN) args.push('--no-fold-bn');
        const f = await run(args);
        if (f.code === 2 && /unknown option '--no-fold-bn'|Unknown option '--no-fold-bn'/i.test(f.stderr)) assert.fail('--no-fold-bn is not implemented');
        assert.equal(f.code, 0, f.stderr);
        const meta = readJson<{ maxAbsOutput: number }>(c.id, 'meta.json');
        const py = await runPython(standins, out, path.join(OFFICIAL, c.id));
        assert.equal(py.code, 0, py.stderr);
        const res = JSON.parse(py.stdout.trim().split('\n').pop()!);
        assert.deepEqual(res.headClass, c.head.split('.').pop());
        assert.ok(res.maxAbsDiff <= 2e-4 * meta.maxAbsOutput, `max |Δ| ${res.maxAbsDiff} vs the notebook's output (max |y| ${meta.maxAbsOutput})`);
        // Without the BN fold: the notebook's keys (RepConvN fused, as RepFuse always does); with
        // it: the keys of the notebook's model after the official Model.fuse().
        const expectKeys = foldBN ? readJson<Record<string, number[]>>(c.id, 'notebook_fused_keys.json') : keysWithRepConvFused(c.id);
        assert.deepEqual(res.keys, expectKeys);
      });
    }
  }
});

function run(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(process.execPath, [cliPath, ...args], { cwd: repoRoot, maxBuffer: 64 << 20, timeout: 300_000 }, (err, stdout, stderr) => {
      resolve({ code: err ? ((err as { code?: number }).code ?? -1) : 0, stdout, stderr });
    });
  });
}

/** Loads the output with only the stand-ins on sys.path, runs it, prints keys and the max |Δ| to the notebook's output. */
function runPython(standins: string, ckpt: string, fixture: string): Promise<{ code: number; stdout: string; stderr: string }> {
  const script = `
import json, sys, numpy as np, torch
sys.path.insert(0, ${JSON.stringify(standins)})
m = torch.load(${JSON.stringify(ckpt)}, map_location='cpu')['model'].float().eval()
x = torch.from_numpy(np.load(${JSON.stringify(path.join(fixture, 'input.npy'))}))
with torch.no_grad():
    y = m(x)[0]
ref = np.load(${JSON.stringify(path.join(fixture, 'notebook_out_0.npy'))})
print(json.dumps({'headClass': type(m.model[-1]).__name__, 'maxAbsDiff': float(np.abs(y.numpy() - ref).max()), 'keys': {k: list(v.shape) for k, v in m.state_dict().items()}}))
`;
  return new Promise((resolve) => {
    execFile(PYTHON, ['-c', script], { cwd: repoRoot, maxBuffer: 64 << 20, timeout: 300_000 }, (err, stdout, stderr) => {
      resolve({ code: err ? ((err as { code?: number }).code ?? -1) : 0, stdout, stderr });
    });
  });
}

describe('the setting repfuse.checkpoint.dropAux', () => {
  test('off by default (Fuse asks when the model has auxiliary heads), on when set, a problem when not a boolean', async () => {
    const { parseSettings, fuseJobOptions } = await import('../src/extension/view/settings');
    assert.equal(parseSettings({}).settings.dropAux, false);
    const on = parseSettings({ dropAux: true }).settings;
    assert.equal(on.dropAux, true);
    assert.equal(fuseJobOptions(on, '/o.pt', false).dropAux, true);
    const bad = parseSettings({ dropAux: 'yes' });
    assert.equal(bad.settings.dropAux, false);
    assert.match(bad.problems.join('\n'), /repfuse\.checkpoint\.dropAux must be true or false/);
    const pkg = JSON.parse(fs.readFileSync(path.join(repoRoot, 'package.json'), 'utf8'));
    assert.equal(pkg.contributes.configuration.properties['repfuse.checkpoint.dropAux'].default, false);
  });
});
