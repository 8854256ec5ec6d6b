// MAC counts (the report's benefit): RepFuse's own shape inference against an independent count
// from onnx's shape inference in Python (test/helpers/count_macs.py), on every ONNX fixture,
// original and fused; per-block numbers against a hand count on a model of known geometry.
import * as assert from 'node:assert/strict';
import { execFileSync, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { checkpointBenefit, countMacs } from '../src/core/macs';
import { openOnnx } from '../src/core/onnx/reader';
import { benefitParts, renderBenefit, speedup } from '../src/core/report';
import { defaultFuseOptions, fuse } from '../src/engine';
import { ModelBuilder } from './helpers/onnx-builder';
import { fixturesDir, makeTmp, repoRoot, rmTmp } from './helpers/paths';

const PYTHON = '/usr/bin/python3';
const COUNTER = path.join(repoRoot, 'test', 'helpers', 'count_macs.py');
const havePython = spawnSync(PYTHON, ['-c', 'import onnx'], { stdio: 'ignore' }).status === 0;

interface PyCount {
  path: string;
  total: number;
  nodes: Record<string, number>;
  unknown: string[];
}

function pyCount(files: { path: string; inputs?: Record<string, number[]> }[]): PyCount[] {
  const out = execFileSync(PYTHON, [COUNTER, JSON.stringify({ files })], { encoding: 'utf8', maxBuffer: 64 << 20 });
  return out.trim().split('\n').map((l) => JSON.parse(l) as PyCount);
}

function tsCount(file: string, inputs: Record<string, number[]> = {}) {
  const m = openOnnx(file);
  try {
    return countMacs(m, inputs);
  } finally {
    m.close();
  }
}

const onnxFixtures = (): string[] => {
  const official = path.join(repoRoot, 'test', 'fixtures', 'official');
  const list = fs.readdirSync(fixturesDir).filter((f) => f.endsWith('.onnx')).map((f) => path.join(fixturesDir, f));
  if (fs.existsSync(official)) {
    for (const d of fs.readdirSync(official)) {
      const sub = path.join(official, d);
      // orepa/train_torchfold.onnx is kept as evidence of an invalid export (torch 1.13's constant
      // folding breaks an Einsum's ranks; onnxruntime refuses it): it has no shapes to agree on.
      if (fs.statSync(sub).isDirectory()) for (const f of fs.readdirSync(sub)) if (f.endsWith('.onnx') && f !== 'train_torchfold.onnx') list.push(path.join(sub, f));
    }
  }
  for (const f of fs.readdirSync(path.join(repoRoot, 'examples'))) if (f.endsWith('.onnx')) list.push(path.join(repoRoot, 'examples', f));
  return list.sort();
};

describe('MAC count agrees with onnx shape inference (Python), every Conv/Gemm/MatMul', { skip: !havePython && `${PYTHON} with onnx is not available` }, () => {
  let dir: string;
  before(() => {
    dir = makeTmp();
  });
  after(() => rmTmp(dir));

  it('every ONNX fixture: the same total and the same per-node counts; RepFuse leaves nothing uncounted', () => {
    const files = onnxFixtures();
    assert.ok(files.length >= 30, `found ${files.length} fixtures`);
    const py = pyCount(files.map((p) => ({ path: p })));
    let counted = 0;
    const partial: string[] = [];
    for (const [i, file] of files.entries()) {
      const ours = tsCount(file);
      const theirs = py[i];
      const rel = path.relative(repoRoot, file);
      assert.deepEqual(ours.uncounted, [], `${rel}: RepFuse inferred every shape`);
      const m = openOnnx(file);
      const byName: Record<string, number> = {};
      for (const [idx, macs] of ours.byNode) byName[m.graph.nodes[idx].name || m.graph.nodes[idx].outputs[0]] = macs;
      m.close();
      if (theirs.unknown.length) {
        // onnx's inference stops somewhere (e.g. DiverseBranchBlock's BN-and-pad chain: ScatterND over
        // a Pad whose pads come from Range/Where arithmetic); compare every node it could infer.
        partial.push(rel);
        for (const [name, macs] of Object.entries(theirs.nodes)) assert.equal(byName[name], macs, `${rel}: ${name}`);
        for (const name of theirs.unknown) assert.ok(byName[name] > 0, `${rel}: ${name} counted by RepFuse`);
      } else {
        assert.equal(ours.total, theirs.total, `${rel}: total MACs`);
        assert.deepEqual(byName, theirs.nodes, `${rel}: per-node MACs`);
      }
      // OREPA's convolutions take run-time weights (Einsum over branch tensors) onnx cannot shape:
      // every one of them is then among `unknown`, and RepFuse must have counted it (above).
      assert.ok(theirs.total > 0 || theirs.unknown.length > 0, `${rel}: has MACs`);
      counted += Object.keys(theirs.nodes).length;
    }
    assert.ok(counted > 300, `${counted} nodes compared`);
    // Where onnx gives up (DBB's BN-and-pad chains, attention reshapes built from Shape arithmetic),
    // RepFuse agreed on every node onnx could infer; most files are compared whole.
    assert.ok(files.length - partial.length >= 25, `${files.length - partial.length} files compared whole; partial: ${partial.join(', ')}`);
  });

  it("DBB: the fused training graph has exactly the MACs of the official deploy graph (diverse_branch_block's own switch_to_deploy)", async () => {
    const dbb = path.join(repoRoot, 'test', 'fixtures', 'official', 'dbb');
    if (!fs.existsSync(path.join(dbb, 'deploy.onnx'))) return;
    const r = await fuse(path.join(dbb, 'train.onnx'), { ...defaultFuseOptions, output: path.join(dir, 'dbb.fused.onnx'), validate: false });
    assert.equal(r.benefit!.macsAfter, tsCount(path.join(dbb, 'deploy.onnx')).total);
    assert.equal(r.benefit!.macsAfter, pyCount([{ path: path.join(dbb, 'deploy.onnx') }])[0].total);
    assert.ok(r.benefit!.macsBefore > r.benefit!.macsAfter);
  });

  it('--input shapes: a bigger input counts what onnx infers for it', () => {
    const cases = [
      { file: path.join(repoRoot, 'test', 'fixtures', 'official', 'yolov7', 'train.onnx') },
      { file: path.join(fixturesDir, 'yolov7_folded.onnx') },
    ].filter((c) => fs.existsSync(c.file));
    assert.ok(cases.length > 0);
    for (const c of cases) {
      const m = openOnnx(c.file);
      const input = m.graph.inputs.find((i) => !m.graph.initializers.has(i.name))!;
      m.close();
      const dims = input.shape!.map((d) => (typeof d === 'number' ? d : 1));
      const bigger = dims.map((d, k) => (k >= 2 ? d * 2 : d));
      const [py] = pyCount([{ path: c.file, inputs: { [input.name]: bigger } }]);
      const ours = tsCount(c.file, { [input.name]: bigger });
      assert.equal(ours.total, py.total, path.basename(c.file));
      // Fully convolutional: twice the side, four times the MACs.
      assert.equal(ours.total, 4 * tsCount(c.file).total, `${path.basename(c.file)}: 2× side → 4× MACs`);
    }
  });

  it('fuse: macsBefore/macsAfter equal the independent counts of the original and the fused file; blocks add up', async () => {
    const files = onnxFixtures().filter((f) => /_(folded|bn)\.onnx$|train(_bn)?\.onnx$/.test(f) && !/dropaux/.test(f));
    assert.ok(files.length >= 20, `${files.length} fixtures`);
    const pairs: { file: string; out: string; report: Awaited<ReturnType<typeof fuse>> }[] = [];
    for (const [i, file] of files.entries()) {
      const out = path.join(dir, `f${i}.onnx`);
      const report = await fuse(file, { ...defaultFuseOptions, output: out, validate: false });
      if (!report.output) continue;
      pairs.push({ file, out, report });
    }
    assert.ok(pairs.length >= 20);
    let whole = 0;
    const py = pyCount(pairs.flatMap((p) => [{ path: p.file }, { path: p.out }]));
    for (const [i, p] of pairs.entries()) {
      const b = p.report.benefit!;
      const rel = path.relative(repoRoot, p.file);
      assert.equal(b.macsScope, 'model');
      // Compared whole where onnx infers every shape (the other files are compared node by node above).
      if (!py[2 * i].unknown.length) assert.equal(b.macsBefore, py[2 * i].total, `${rel}: before`);
      else assert.equal(b.macsBefore, tsCount(p.file).total);
      if (!py[2 * i + 1].unknown.length) {
        assert.equal(b.macsAfter, py[2 * i + 1].total, `${rel}: after (the fused file)`);
        whole++;
      } else assert.equal(b.macsAfter, tsCount(p.out).total);
      assert.equal(b.uncounted, undefined, `${rel}: everything counted`);
      assert.equal(b.blocks.length, p.report.blocksFused, `${rel}: every block counted`);
      // What the blocks save is all that changes: BN folds cost no MACs.
      const saved = b.blocks.reduce((s, x) => s + x.macsBefore - x.macsAfter, 0);
      assert.equal(b.macsBefore - b.macsAfter, saved, `${rel}: blocks add up`);
      for (const x of b.blocks) assert.ok(x.macsAfter <= x.macsBefore, `${rel} ${x.block}: fusing never adds MACs`);
    }
    assert.ok(whole >= 15, `${whole} fused files compared whole`);
  });
});

describe('MACs by hand on known geometry', () => {
  let dir: string;
  before(() => {
    dir = makeTmp();
  });
  after(() => rmTmp(dir));

  it('a RepVGG-style block (3×3 + 1×1, stride 2, 3→8) on 1×3×32×32, then a grouped block and a Gemm head', async () => {
    const b = new ModelBuilder({ seed: 3 });
    const x = b.input('x', [1, 3, 32, 32]);
    // 3×3 s2 p1 and 1×1 s2: 16×16 out. 3×3: 8·16·16·3·9 = 55 296; 1×1: 8·16·16·3 = 6 144.
    const y1 = b.relu(b.add(b.conv(x, 8, 3, [3, 3], { stride: 2, bn: true }), b.conv(x, 8, 3, [1, 1], { stride: 2, bn: true })));
    // groups 2, 8→8, 16×16: 3×3: 8·256·4·9 = 73 728; 1×1: 8·256·4 = 8 192; identity BN: 0.
    const y2 = b.relu(b.add(b.add(b.conv(y1, 8, 8, [3, 3], { groups: 2, bn: true }), b.conv(y1, 8, 8, [1, 1], { groups: 2, bn: true })), b.bn(y1, 8)));
    const pooled = b.op('GlobalAveragePool', [y2]);
    const flat = b.op('Flatten', [pooled]);
    const w = b.randInit('fc.w', [10, 8]);
    const bias = b.randInit('fc.b', [10]);
    // Gemm 1×8 · 8×10 (transB): 80.
    b.output(b.op('Gemm', [flat, w, bias], { attrs: [{ name: 'transB', type: 2, i: 1 }] }));
    const file = path.join(dir, 'hand.onnx');
    fs.writeFileSync(file, b.encode());
    const count = tsCount(file);
    assert.equal(count.total, 55_296 + 6_144 + 73_728 + 8_192 + 80);
    const r = await fuse(file, { ...defaultFuseOptions, output: path.join(dir, 'hand.fused.onnx'), validate: false });
    assert.equal(r.blocksFused, 2);
    const bf = r.benefit!;
    assert.equal(bf.macsBefore, 143_440);
    assert.equal(bf.macsAfter, 55_296 + 73_728 + 80);
    assert.deepEqual(
      bf.blocks.map((x) => [x.macsBefore, x.macsAfter]),
      [
        [61_440, 55_296],
        [81_920, 73_728],
      ],
    );
    // −9.9 %: (129 104 − 143 440) / 143 440.
    assert.deepEqual(benefitParts(bf), ['MACs −10.0 %']);
    assert.match(renderBenefit(bf), /MACs \(batch 1, Conv\/Gemm\/MatMul at the input shapes\): 143\.4k → 129\.1k \(−10\.0 %\)/);
  });

  it('checkpoints: blocks per output position from their geometry; a sequential branch is named, not guessed', () => {
    const geometry = { kernel: [3, 3], groups: 1, inChannels: 16, outChannels: 32 };
    const b = checkpointBenefit([
      { name: 'a', ...geometry, branches: [{ kind: 'conv_bn', kernel: [3, 3] }, { kind: 'conv_bn', kernel: [1, 1] }, { kind: 'bn_identity' }] },
      { name: 'b', ...geometry, groups: 4, branches: [{ kind: 'conv_bn', kernel: [3, 3] }, { kind: 'avgpool' }] },
      { name: 'c', ...geometry, branches: [{ kind: 'conv_bn', kernel: [3, 3] }, { kind: 'sequential', kernel: [3, 3] }] },
    ]);
    assert.equal(b.macsScope, 'blocks-per-position');
    // a: 32·16·(9 + 1) = 5120 → 4608; b: 32·4·9 = 1152 → 1152.
    assert.deepEqual(b.blocks, [
      { block: 'a', macsBefore: 5120, macsAfter: 4608 },
      { block: 'b', macsBefore: 1152, macsAfter: 1152 },
    ]);
    assert.equal(b.macsBefore, 6272);
    assert.equal(b.macsAfter, 5760);
    assert.deepEqual(b.uncounted, ['block c']);
    assert.deepEqual(benefitParts(b), ['block MACs −8.2 %']);
  });

  it('speed-up wording', () => {
    assert.equal(speedup(17, 10), '1.7× faster');
    assert.equal(speedup(10, 10.01), 'same speed');
    assert.equal(speedup(10, 12.5), '1.25× slower');
    assert.equal(speedup(100, 5), '20× faster');
    assert.deepEqual(benefitParts({ macsScope: 'model', macsBefore: 100, macsAfter: 89, blocks: [], latencyMs: { before: 3.4, after: 2, runs: 5, threads: 0, scope: 'model' } }), ['MACs −11 %', '1.7× faster']);
  });
});
