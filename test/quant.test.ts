// `repfuse quant` and `fuse --fp16`: the definitions on hand-computed values; every number on real
// PyTorch exports against an independent numpy/PyTorch computation (test/fixtures/quant/numpy_quant.py
// on the model `repfuse fuse` wrote; the output SQNR with the graph run by PyTorch ops, not
// onnxruntime); the planted outlier, FP16 hazards and QARepVGG branch-gain finding.
//
// Without Debian's python3 + numpy + onnx + torch the cross-check tests FAIL (they do not skip).
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import {
  channelLayout, fakeQuantInt8, fp16Hazards, int8SqnrDb, median, type QuantReport, rangeImbalance, roundHalfEven, sqnrDb,
} from '../src/core/quant';
import { blockQuantDetail, sortWorstFirst } from '../src/core/quant';
import { defaultFuseOptions, fuse, openModel } from '../src/engine';
import { quantView } from '../src/extension/view/quantView';
import { ModelWorkerClient } from '../src/extension/worker/client';
import type { InspectOptions } from '../src/extension/view/settings';
import { analyzeQuant, defaultQuantOptions } from '../src/validate/quantHost';
import { cliPath, makeTmp, repoRoot, rmTmp } from './helpers/paths';

const PYTHON = process.env.REPFUSE_TEST_PYTHON || '/usr/bin/python3';
const QDIR = path.join(repoRoot, 'test', 'fixtures', 'quant');
const ODIR = path.join(repoRoot, 'test', 'fixtures', 'onnx');
const REF = path.join(QDIR, 'numpy_quant.py');
const manifest = JSON.parse(fs.readFileSync(path.join(QDIR, 'manifest.json'), 'utf8'));

interface RefTensor { op: string; axis: number; perTensor: number | null; perChannel: number | null; rangeImbalance: number | null; overflow: number; subnormal: number }
interface RefOut { tensors: Record<string, RefTensor>; outputs: Record<string, { perTensor: number | null; perChannel: number | null }> }

function python(args: string[]): RefOut {
  const r = spawnSync(PYTHON, [REF, ...args], { encoding: 'utf8', timeout: 300_000, maxBuffer: 64 << 20 });
  if (r.error || r.status !== 0) {
    throw new Error(`the numpy reference failed (${PYTHON} ${REF}; needs Debian's python3-numpy, python3-onnx, python3-torch): ${r.error?.message ?? r.stderr.trim().split('\n').pop()}`);
  }
  return JSON.parse(r.stdout) as RefOut;
}

function cli(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(process.execPath, [cliPath, ...args], { cwd: repoRoot, maxBuffer: 64 << 20 }, (err, stdout, stderr) => {
      resolve({ code: err ? ((err as { code?: number }).code ?? 1) : 0, stdout, stderr });
    });
  });
}

const close = (a: number | null, b: number | null, tol: number, what: string) => {
  if (a === null || b === null) return assert.equal(a, b, what);
  assert.ok(Math.abs(a - b) <= tol, `${what}: ${a} vs ${b} (tolerance ${tol})`);
};

let tmp: string;
before(() => {
  tmp = makeTmp();
});
after(() => rmTmp(tmp));

describe('definitions', () => {
  test('round half to even, as numpy', () => {
    assert.deepEqual([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 2.4999, 2.5001, 3].map((x) => roundHalfEven(x) + 0), [0, 2, 2, 0, -2, -2, 2, 3, 3]);
  });

  test('INT8 fake quantization per tensor and per channel, hand-computed', () => {
    // Δ = 127/127 = 1 per tensor: values round half to even on the unit grid.
    assert.deepEqual(Array.from(fakeQuantInt8([127, 0.5, 1.5, -2.5])), [127, 0, 2, -2]);
    // Per channel (axis 0 of 2×2): channel 0 Δ = 254/127 = 2, channel 1 all zero → Δ = 1, stays 0.
    assert.deepEqual(Array.from(fakeQuantInt8([254, 3, 0, 0], channelLayout([2, 2], 0))), [254, 4, 0, 0]);
    // Per channel on axis 1 (Gemm without transB, MatMul): columns are channels.
    assert.deepEqual(Array.from(fakeQuantInt8([127, 254, 1.5, 3], channelLayout([2, 2], 1))), [127, 254, 2, 4]);
    // An all-zero tensor: Δ = 1, Q = 0, error 0 → SQNR null.
    assert.deepEqual(Array.from(fakeQuantInt8([0, 0, 0])), [0, 0, 0]);
    assert.equal(int8SqnrDb([0, 0, 0]), null);
    assert.equal(int8SqnrDb([127, -127, 0]), null); // exactly on the grid
    // [127, 0.5]: error 0.5 on one value: 10·log10((127² + 0.25)/0.25).
    close(int8SqnrDb([127, 0.5]), 10 * Math.log10((127 * 127 + 0.25) / 0.25), 1e-12, 'sqnr');
    assert.equal(sqnrDb(1, 0), null);
  });

  test('range imbalance and median as numpy', () => {
    assert.equal(median([3, 1, 2, 10]), 2.5);
    assert.equal(rangeImbalance([1, 2, 3, 10]), 10 / 2.5);
    assert.equal(rangeImbalance([0, 0, 1]), null); // median range 0
  });

  test('FP16 hazard boundaries', () => {
    assert.deepEqual(fp16Hazards([65504, -65504, 65504.5, -7e4, 2 ** -14, -(2 ** -14), 2 ** -15, -1e-7, 0, -0]), { overflow: 2, subnormal: 2 });
  });
});

describe('quant against an independent numpy / PyTorch computation (real exports)', () => {
  // [fixture, input .npy for the output SQNR check (PyTorch graph run), or undefined]
  const cases: [string, string | undefined][] = [
    [path.join(QDIR, 'blocks_bn.onnx'), path.join(QDIR, 'blocks.input.npy')],
    [path.join(QDIR, 'blocks_folded.onnx'), path.join(QDIR, 'blocks.input.npy')],
    [path.join(ODIR, 'repvgg_bn.onnx'), path.join(ODIR, 'repvgg.input.npy')],
    [path.join(ODIR, 'qarepvgg_folded.onnx'), path.join(ODIR, 'qarepvgg.input.npy')],
    [path.join(ODIR, 'yolov7dedup_folded.onnx'), undefined],
  ];
  for (const [file, npy] of cases) {
    test(path.basename(file), async () => {
      const input: Record<string, string> = npy ? { images: npy } : {};
      const q = await analyzeQuant(file, { ...defaultQuantOptions, inputNpy: input });
      // The numpy side reads the model exactly as `repfuse fuse` writes it.
      const fused = path.join(tmp, `${path.basename(file, '.onnx')}.fused.onnx`);
      await fuse(file, { ...defaultFuseOptions, output: fused, force: true, validate: false });
      const blocks = Object.fromEntries(q.blocks.map((b) => [b.name, b.weight]));
      const ref = python(['onnx', fused, ...(npy ? [npy, JSON.stringify(blocks)] : [])]);
      assert.ok(q.fusedInMemory);
      assert.deepEqual(q.tensors.map((t) => t.name).sort(), Object.keys(ref.tensors).sort(), 'the same Conv/Gemm/MatMul weights');
      for (const t of q.tensors) {
        const r = ref.tensors[t.name];
        assert.equal(t.op, r.op);
        assert.equal(t.axis, r.axis, `${t.name} axis`);
        close(t.int8.perTensorSqnrDb, r.perTensor, 1e-9, `${t.name} per-tensor SQNR`);
        close(t.int8.perChannelSqnrDb, r.perChannel, 1e-9, `${t.name} per-channel SQNR`);
        close(t.rangeImbalance, r.rangeImbalance, 1e-12, `${t.name} range imbalance`);
        assert.deepEqual(t.fp16, { overflow: r.overflow, subnormal: r.subnormal }, `${t.name} fp16`);
      }
      assert.ok(q.blocks.length > 0);
      for (const b of q.blocks) {
        assert.equal(q.tensors.find((t) => t.name === b.weight)?.block, b.name, 'the block weight is marked');
        assert.equal(b.outputSqnrDb.scope, 'model');
        assert.equal(b.outputSqnrDb.error, undefined);
        assert.ok(b.outputSqnrDb.perTensor !== null && b.outputSqnrDb.perTensor > 10 && b.outputSqnrDb.perTensor < 80, `${b.name}: ${b.outputSqnrDb.perTensor}`);
        if (!npy) continue;
        // onnxruntime float32 against PyTorch float32 ops: the same quantized weights, so the
        // SQNRs agree far inside 0.01 dB.
        close(b.outputSqnrDb.perTensor, ref.outputs[b.name].perTensor, 0.01, `${b.name} output SQNR per tensor`);
        close(b.outputSqnrDb.perChannel, ref.outputs[b.name].perChannel, 0.01, `${b.name} output SQNR per channel`);
      }
      assert.deepEqual(q.fallback, q.blocks.filter((b) => b.outputSqnrDb.perTensor! < q.thresholdDb).sort((a, b) => a.outputSqnrDb.perTensor! - b.outputSqnrDb.perTensor!).map((b) => b.name));
    });
  }

  for (const name of ['blocks_sd.pt', 'hazards_sd.pt']) {
    test(`${name} (checkpoint: fused state_dict)`, async () => {
      const file = path.join(QDIR, name);
      const q = await analyzeQuant(file, defaultQuantOptions);
      const fused = path.join(tmp, name.replace('.pt', '.fused.pt'));
      const written = await fuse(file, { ...defaultFuseOptions, output: fused, force: true, validate: false, keepModules: false });
      // Nothing to fuse (no blocks): the fused model is the input itself.
      const ref = python(['pt', written.output ?? file]);
      assert.deepEqual(q.tensors.map((t) => t.name).sort(), Object.keys(ref.tensors).sort());
      for (const t of q.tensors) {
        const r = ref.tensors[t.name];
        assert.equal(t.op, r.op);
        close(t.int8.perTensorSqnrDb, r.perTensor, 1e-9, `${t.name} per-tensor SQNR`);
        close(t.int8.perChannelSqnrDb, r.perChannel, 1e-9, `${t.name} per-channel SQNR`);
        close(t.rangeImbalance, r.rangeImbalance, 1e-12, `${t.name} range imbalance`);
        assert.deepEqual(t.fp16, { overflow: r.overflow, subnormal: r.subnormal });
      }
      for (const b of q.blocks) {
        assert.equal(b.outputSqnrDb.scope, 'block', 'checkpoints measure the block alone, and say so');
        assert.ok(b.outputSqnrDb.perTensor !== null && b.outputSqnrDb.perChannel !== null);
      }
      if (q.blocks.length) assert.ok(q.notes.some((n) => /measured on the block alone/.test(n)));
    });
  }
});

test('official RepVGG (DingXiaoH/RepVGG): train_sd.pt analysed as fused scores as the officially converted deploy_sd.pt', async () => {
  const dir = path.join(repoRoot, 'test', 'fixtures', 'official', 'repvgg');
  const train = await analyzeQuant(path.join(dir, 'train_sd.pt'), { ...defaultQuantOptions, measure: false });
  const deploy = await analyzeQuant(path.join(dir, 'deploy_sd.pt'), { ...defaultQuantOptions, measure: false });
  assert.equal(deploy.blocks.length, 0);
  assert.ok(train.blocks.length > 0);
  // Same names (the family's deploy keys), same shapes; values differ only by float32 rounding of
  // the official fusion, so the SQNRs agree to well under 1e-3 dB.
  assert.deepEqual(train.tensors.map((t) => [t.name, t.shape.join('x')]), deploy.tensors.map((t) => [t.name, t.shape.join('x')]));
  train.tensors.forEach((t, i) => {
    const d = deploy.tensors[i];
    close(t.int8.perTensorSqnrDb, d.int8.perTensorSqnrDb, 1e-3, `${t.name} per tensor`);
    close(t.int8.perChannelSqnrDb, d.int8.perChannelSqnrDb, 1e-3, `${t.name} per channel`);
    close(t.rangeImbalance, d.rangeImbalance, 1e-5, `${t.name} imbalance`);
  });
});

test('official RepViT: every block measured, the classifier one (fused into a Gemm) included', async () => {
  const q = await analyzeQuant(path.join(repoRoot, 'test', 'fixtures', 'official', 'repvit', 'train.onnx'), defaultQuantOptions);
  const cls = q.blocks.find((b) => b.name === 'classifier')!;
  assert.equal(q.tensors.find((t) => t.name === cls.weight)?.op, 'Gemm');
  for (const b of q.blocks) assert.equal(b.outputSqnrDb.error, undefined, `${b.name}: ${b.outputSqnrDb.error}`);
});

describe('planted findings', () => {
  let onnxQ: QuantReport;
  let ckptQ: QuantReport;
  before(async () => {
    onnxQ = await analyzeQuant(path.join(QDIR, 'blocks_bn.onnx'), { ...defaultQuantOptions, inputNpy: { images: path.join(QDIR, 'blocks.input.npy') } });
    ckptQ = await analyzeQuant(path.join(QDIR, 'blocks_sd.pt'), defaultQuantOptions);
  });

  test('the planted outlier: worst block, widest channel ranges, the only fallback', () => {
    for (const q of [onnxQ, ckptQ]) {
      const worst = [...q.blocks].sort((a, b) => a.outputSqnrDb.perTensor! - b.outputSqnrDb.perTensor!)[0];
      assert.equal(worst.name, manifest.blocks.outlierBlock);
      const t = q.tensors.find((x) => x.block === 'outl')!;
      assert.ok(t.rangeImbalance! > 20, `range imbalance ${t.rangeImbalance}`);
      for (const o of q.tensors.filter((x) => x !== t)) assert.ok(o.rangeImbalance! < 5, `${o.name}: ${o.rangeImbalance}`);
      // Per-channel scales absorb one channel's outlier: it recovers above the threshold.
      assert.ok(worst.outputSqnrDb.perTensor! < 30 && worst.outputSqnrDb.perChannel! > 30);
      assert.deepEqual(q.fallback, ['outl']);
      assert.match(worst.verdict, /needs per-channel INT8/);
    }
  });

  test('QARepVGG vs RepVGG with the same 3×3 weights: the branch-gain flag only on RepVGG', () => {
    assert.ok(manifest.blocks.sameDense);
    for (const q of [onnxQ, ckptQ]) {
      const rep = q.blocks.find((b) => b.name === 'rep')!;
      const qa = q.blocks.find((b) => b.name === 'qa')!;
      const dense = (b: typeof rep) => b.branchGains!.branches.find((x) => x.kernel?.join('x') === '3x3')!;
      // Same 3×3 conv+BN in both blocks: the same gains.
      close(dense(rep).median, dense(qa).median, 1e-6, '3×3 median gain');
      close(dense(rep).median, manifest.blocks.gainMedians['rep.3x3'], 1e-5, '3×3 median gain vs PyTorch');
      const id = rep.branchGains!.branches.find((x) => x.kind === 'bn_identity')!;
      close(id.median, manifest.blocks.gainMedians['rep.identity'], 1e-4, 'identity median gain vs PyTorch');
      assert.match(rep.branchGains!.flag ?? '', /bn\(x\) BN gain is \d+(\.\d+)?× the 3×3 branch's/);
      assert.equal(qa.branchGains!.flag, null);
      assert.equal(q.blocks.find((b) => b.name === 'outl')!.branchGains!.flag, null);
      // QARepVGG's identity is a bare x (gain 1) and its 1×1 has no BN; the post-add BN is reported.
      assert.deepEqual(qa.branchGains!.branches.filter((x) => !x.bn).map((x) => [x.kind, x.median]).sort(), [['conv', null], ['identity', 1]]);
      // ONNX folds the post-add BN into the fused conv (its gain is shown); a QARepVGG checkpoint keeps it in the deploy model.
      assert.equal(!!qa.branchGains!.postBN, q === onnxQ);
    }
  });

  test('planted FP16 hazards are counted per tensor and named', async () => {
    for (const f of ['hazards.onnx', 'hazards_sd.pt']) {
      const q = await analyzeQuant(path.join(QDIR, f), defaultQuantOptions);
      const conv = q.tensors.find((t) => t.name === 'conv.weight')!;
      const fc = q.tensors.find((t) => t.name === 'fc.weight')!;
      assert.deepEqual(conv.fp16, { overflow: manifest.hazards.overflow.conv, subnormal: manifest.hazards.subnormal.conv });
      assert.deepEqual(fc.fp16, { overflow: manifest.hazards.overflow.fc, subnormal: manifest.hazards.subnormal.fc });
      assert.deepEqual(q.fp16, { overflow: 2, subnormal: 5, tensors: ['conv.weight', 'fc.weight'] });
      assert.equal(q.blocks.length, 0);
    }
  });
});

describe('views', () => {
  test('model editor Quantization section: worst first, fallback marked and copyable, FP16 rows', async () => {
    const q = await analyzeQuant(path.join(QDIR, 'blocks_sd.pt'), defaultQuantOptions);
    const v = quantView(q);
    assert.deepEqual(v.rows.map((r) => r.name), ['outl', 'qa', 'rep']);
    assert.deepEqual(v.rows.map((r) => r.fallback), [true, false, false]);
    assert.equal(v.fallbackText, 'outl');
    assert.match(v.rows[2].gainFlag, /bn\(x\) BN gain/);
    assert.deepEqual(v.fp16.rows.map((r) => r.name).sort(), q.fp16.tensors.slice().sort());
    assert.match(v.measuredOn, /each block alone/);
    const h = quantView(await analyzeQuant(path.join(QDIR, 'hazards.onnx'), defaultQuantOptions));
    assert.deepEqual(h.fp16.rows, [{ name: 'conv.weight', overflow: 2, subnormal: 3 }, { name: 'fc.weight', overflow: 0, subnormal: 2 }]);
    assert.match(h.fp16.summary, /^2 value\(s\) overflow FP16/);
    // No blocks: the other weights are still listed, worst per-tensor weight SQNR first.
    assert.deepEqual(h.others.map((o) => [o.name, o.op]), [['fc.weight', 'Gemm'], ['conv.weight', 'Conv']]);
    assert.equal(h.rows.length, 0);
  });

  test('branch statistics detail: channel ranges before and after fusion, gains', () => {
    const m = openModel(path.join(QDIR, 'blocks_bn.onnx'), { foldBN: true });
    try {
      const data = m.blockData('rep');
      const d = blockQuantDetail(data);
      assert.deepEqual(d.branches.map((b) => b.label), data.branches.map((b) => b.label));
      // The identity branch's contribution is its BN gain on the kernel centre: its range is |γ/√(σ²+ε)|.
      const id = data.branches.findIndex((b) => b.kind === 'bn_identity');
      const bn = data.branches[id].bn!;
      d.branches[id].ranges.forEach((r, c) => close(r, Math.abs(bn.gamma[c] / Math.sqrt(bn.variance[c] + bn.eps)), 1e-12, `channel ${c}`));
      const layout = channelLayout(data.fused.shape, 0);
      for (let c = 0; c < layout.channels; c++) {
        let r = 0;
        for (let i = c * layout.inner; i < (c + 1) * layout.inner; i++) r = Math.max(r, Math.abs(data.fused.weight[i]));
        assert.equal(d.fused.ranges[c], r);
      }
      assert.ok(d.gains.flag);
      assert.equal(blockQuantDetail(m.blockData('qa')).gains.flag, null);
    } finally {
      m.close();
    }
  });
});

test('the extension model worker answers quant (with progress) and blockQuant, off the host thread', async () => {
  const client = new ModelWorkerClient(path.join(repoRoot, 'dist', 'model-worker.js'));
  try {
    const options: InspectOptions = { foldBN: true, checkpoint: { defaultEpsilon: 'auto', outputDtype: 'keep' } };
    const file = path.join(QDIR, 'blocks_bn.onnx');
    const progress: string[] = [];
    const q = await client.request('quant', { file, options, inputShapes: {}, timeoutMs: 120_000 }, { onProgress: (m) => progress.push(m) });
    assert.deepEqual(sortWorstFirst(q.blocks).map((b) => b.name), ['outl', 'qa', 'rep']);
    assert.ok(progress.some((m) => /measured block outl/.test(m)), progress.join(' | '));
    await client.request('open', { file, options });
    const d = await client.request('blockQuant', { file, block: 'rep', options });
    assert.ok(d.gains.flag);
    assert.equal(d.fused.ranges.length, 8);
    await assert.rejects(client.request('blockQuant', { file, block: 'nope', options }), /no block named 'nope'/);
  } finally {
    await client.dispose();
  }
});

describe('CLI', () => {
  test('quant --json: one object with tensors, blocks, fallback; --threshold-db moves the fallback', async () => {
    const npy = `images=${path.join(QDIR, 'blocks.input.npy')}`;
    const r = await cli(['quant', path.join(QDIR, 'blocks_bn.onnx'), '--json', '--input-npy', npy]);
    assert.equal(r.code, 0, r.stderr);
    const q = JSON.parse(r.stdout) as QuantReport;
    assert.deepEqual(Object.keys(q).filter((k) => ['tensors', 'blocks', 'fallback'].includes(k)).sort(), ['blocks', 'fallback', 'tensors']);
    for (const b of q.blocks) assert.deepEqual(Object.keys(b).sort(), ['branchGains', 'family', 'name', 'outputSqnrDb', 'verdict', 'weight']);
    for (const t of q.tensors) for (const k of ['name', 'op', 'block', 'shape', 'int8', 'rangeImbalance', 'fp16']) assert.ok(k in t, k);
    assert.deepEqual(q.fallback, ['outl']);
    const hi = JSON.parse((await cli(['quant', path.join(QDIR, 'blocks_bn.onnx'), '--json', '--input-npy', npy, '--threshold-db', '60'])).stdout) as QuantReport;
    assert.deepEqual(hi.fallback, [...hi.blocks].sort((a, b) => a.outputSqnrDb.perTensor! - b.outputSqnrDb.perTensor!).map((b) => b.name));
    assert.equal(hi.fallback.length, 3);
  });

  test('quant text: worst first, a verdict per block, the gain flag and the fallback line', async () => {
    const r = await cli(['quant', path.join(QDIR, 'blocks_bn.onnx'), '--input-npy', `images=${path.join(QDIR, 'blocks.input.npy')}`]);
    assert.equal(r.code, 0, r.stderr);
    const rows = r.stdout.split('\n').filter((l) => /^(rep|qa|outl) /.test(l));
    assert.deepEqual(rows.map((l) => l.split(/\s+/)[0]), ['outl', 'qa', 'rep']);
    assert.match(rows[0], /needs per-channel INT8/);
    assert.match(r.stdout, /branch gains: rep: bn\(x\) BN gain/);
    assert.match(r.stdout, /Fallback \(per-tensor output SQNR < 30 dB, worst first\): outl/);
  });

  test('quant: bad input is one line and exit 2', async () => {
    const r = await cli(['quant', path.join(QDIR, 'nope.onnx')]);
    assert.equal(r.code, 2);
    assert.match(r.stderr, /^repfuse: .*nope\.onnx.*no such file/);
    const t = await cli(['quant', path.join(QDIR, 'blocks_bn.onnx'), '--threshold-db', 'x']);
    assert.equal(t.code, 2);
    assert.match(t.stderr, /--threshold-db needs a number/);
  });

  test('fuse --fp16 refuses planted overflow (exit 2, names the tensor, writes nothing); --force-fp16 writes and reports', async () => {
    const out = path.join(tmp, 'hz.fp16.onnx');
    const r = await cli(['fuse', path.join(QDIR, 'hazards.onnx'), '-o', out, '--fp16']);
    assert.equal(r.code, 2);
    assert.match(r.stderr, /FP16 would overflow 2 value\(s\).*conv\.weight \(2\); nothing was written/);
    assert.equal(fs.existsSync(out), false);
    const f = await cli(['fuse', path.join(QDIR, 'hazards.onnx'), '-o', out, '--force-fp16', '--json', '--no-validate']);
    assert.equal(f.code, 0, f.stderr);
    const notes = (JSON.parse(f.stdout) as { inspect: { model: { notes: string[] } } }).inspect.model.notes;
    assert.ok(notes.some((n) => /FP16 OVERFLOW \(--force-fp16\): 2 value\(s\) written as ±inf in conv\.weight/.test(n)), notes.join('\n'));
    assert.ok(notes.some((n) => /5 value\(s\) are subnormal.*conv\.weight \(3\), fc\.weight \(2\)/.test(n)), notes.join('\n'));
    const ck = await cli(['fuse', path.join(QDIR, 'hazards_sd.pt'), '-o', path.join(tmp, 'hz.pt'), '--fp16']);
    assert.equal(ck.code, 2);
    assert.match(ck.stderr, /FP16 would overflow 2 value\(s\)/);
  });

  test('fuse --fp16 on a clean model: float16 weights behind Casts, validated within the FP16 rtol', async () => {
    const out = path.join(tmp, 'blocks.fp16.onnx');
    const r = await cli(['fuse', path.join(QDIR, 'blocks_bn.onnx'), '-o', out, '--fp16', '--json', '--input-npy', `images=${path.join(QDIR, 'blocks.input.npy')}`]);
    assert.equal(r.code, 0, r.stderr);
    const rep = JSON.parse(r.stdout) as { validation: { passed: boolean; rtol: number } };
    assert.equal(rep.validation.passed, true);
    assert.equal(rep.validation.rtol, 1e-2);
    const py = spawnSync(PYTHON, ['-c', 'import onnx,sys; m=onnx.load(sys.argv[1]); onnx.checker.check_model(m); print(sorted({t.data_type for t in m.graph.initializer}), sum(n.op_type=="Cast" for n in m.graph.node), len(m.graph.initializer))', out], { encoding: 'utf8' });
    assert.equal(py.status, 0, py.stderr);
    const [types, casts, inits] = py.stdout.trim().split(/ (?=\d)/);
    assert.equal(types, '[10]', 'every initializer is float16');
    assert.equal(Number(casts), Number(inits));
    const ck = path.join(tmp, 'blocks.fp16.pt');
    const c = await cli(['fuse', path.join(QDIR, 'blocks_sd.pt'), '-o', ck, '--fp16', '--json']);
    assert.equal(c.code, 0, c.stderr);
    const pt = spawnSync(PYTHON, ['-c', 'import torch,sys; sd=torch.load(sys.argv[1]); print(sorted({str(v.dtype) for v in sd.values() if v.is_floating_point()}))', ck], { encoding: 'utf8' });
    assert.equal(pt.stdout.trim(), "['torch.float16']");
  });
});
