// Checkpoint detection and fusion against the OFFICIAL conversions (test/fixtures/official, made by
// each family's own code): every fused weight and bias RepFuse computes (float64, as the writers
// round it) equals the official deploy state_dict's tensor at the family's deploy name, within
// float32 rounding of the official float32 math. Also: variants a state_dict cannot show
// (--family), and blocks with children RepFuse does not understand are rejected by name.
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { analyzeCheckpoint, type CheckpointAnalysis } from '../src/core/checkpoint';
import { detectCheckpoint } from '../src/core/checkpoint/detect';
import { ckptBlockSpec } from '../src/core/checkpoint/fuse';
import { newNode, walk } from '../src/core/checkpoint/tree';
import { FAMILIES } from '../src/core/families';
import { fuseBlock } from '../src/core/fusion';
import { readAllTensors } from './helpers/ckpt-fixtures';
import { repoRoot } from './helpers/paths';

const officialDir = path.join(repoRoot, 'test', 'fixtures', 'official');
const fx = (family: string, file: string) => path.join(officialDir, family, file);
const have = (family: string, file: string) => fs.existsSync(fx(family, file));


interface Compared {
  blocks: number;
  /** max |fused − official| / max |official| over every fused weight and bias. */
  worstRel: number;
  worstAbs: number;
}

/**
 * Fuses every block in float64 and compares with the official deploy tensors at
 * `<block>.<deploy module>.weight/.bias` (keys as `keyOf` maps them into the official file).
 */
function compareWithOfficial(a: CheckpointAnalysis, official: Map<string, { shape: number[]; values: Float64Array }>, keyOf: (k: string) => string = (k) => k): Compared {
  let worstRel = 0;
  let worstAbs = 0;
  for (const b of a.primary.detection.blocks) {
    const fused = fuseBlock(ckptBlockSpec(b));
    const dl = FAMILIES[b.family].deploy as { module: string; replaceBlock?: boolean };
    // RepViT: the official replace_batchnorm puts the fused conv in the block's place.
    const base = dl.replaceBlock ? b.node.path : `${b.node.path}.${dl.module}`;
    for (const [what, mine, shape] of [['weight', fused.weight, fused.shape], ['bias', fused.bias, [b.outChannels]]] as const) {
      const key = keyOf(`${base}.${what}`);
      const off = official.get(key);
      assert.ok(off, `official deploy tensor '${key}' exists`);
      assert.deepEqual(off.shape, shape, `${key}: shape`);
      let maxAbs = 0;
      let maxDiff = 0;
      for (let i = 0; i < mine.length; i++) {
        maxAbs = Math.max(maxAbs, Math.abs(off.values[i]));
        maxDiff = Math.max(maxDiff, Math.abs(mine[i] - off.values[i]));
      }
      worstAbs = Math.max(worstAbs, maxDiff);
      worstRel = Math.max(worstRel, maxDiff / (maxAbs || 1));
    }
  }
  return { blocks: a.primary.detection.blocks.length, worstRel, worstAbs };
}

describe('YOLOv6 QARepVGGBlockV2 (official meituan/YOLOv6 fixture)', { skip: have('yolov6_qarepvggv2', 'train_sd.pt') ? false : 'fixture missing' }, () => {
  const dir = 'yolov6_qarepvggv2';

  test('full-module pickle: every block is QARepVGG V2, rbr_avg read as a 3×3 avg-pool branch, post-add BN kept and said so', () => {
    const a = analyzeCheckpoint(fx(dir, 'train_full.pt'));
    try {
      const blocks = a.report.blocks;
      assert.equal(blocks.length, 20);
      assert.deepEqual(a.report.rejected, []);
      assert.ok(blocks.every((b) => b.family === 'QARepVGG V2'), blocks.map((b) => b.family).join(', '));
      const withAvg = blocks.filter((b) => b.branches.some((x) => x.kind === 'avgpool'));
      assert.equal(withAvg.length, 14, 'meta: 14 blocks have rbr_avg');
      for (const b of withAvg) {
        const avg = b.branches.find((x) => x.kind === 'avgpool')!;
        assert.deepEqual(avg.kernel, [3, 3]);
        assert.deepEqual(avg.parts, [`${b.name}.rbr_avg`]);
        assert.ok(b.branches.some((x) => x.kind === 'identity'), `${b.name}: identity beside the avg-pool`);
      }
      for (const b of blocks) {
        assert.ok(b.postBN, `${b.name}: post-add BN`);
        // The review bug: the note must survive in a full-module pickle (no other assumption there).
        assert.ok((b.assumptions ?? []).some((x) => /post-add BN '.*\.bn' stays in the deploy model/.test(x)), `${b.name}: ${JSON.stringify(b.assumptions)}`);
        assert.ok(!(b.assumptions ?? []).some((x) => /assumed/.test(x)), `${b.name}: nothing assumed in a pickle: ${JSON.stringify(b.assumptions)}`);
      }
    } finally {
      a.close();
    }
  });

  test('state_dict with --family qarepvggv2: fused rbr_reparam equals the official switch_to_deploy output', (t) => {
    const a = analyzeCheckpoint(fx(dir, 'train_sd.pt'), { family: 'qarepvggv2' });
    try {
      assert.equal(a.report.blocks.length, 20);
      assert.ok(a.report.blocks.every((b) => b.family === 'QARepVGG V2'));
      assert.equal(a.report.blocks.filter((b) => b.branches.some((x) => x.kind === 'avgpool')).length, 14, 'avg-pool inferred exactly where the block keeps its width');
      for (const b of a.report.blocks) assert.ok((b.assumptions ?? []).some((x) => /QARepVGGBlockV2 chosen with --family qarepvggv2/.test(x)), b.name);
      const c = compareWithOfficial(a, readAllTensors(fx(dir, 'deploy_sd.pt')));
      t.diagnostic(`${c.blocks} blocks: max |Δ| ${c.worstAbs.toExponential(2)}, max |Δ|/max|w| ${c.worstRel.toExponential(2)}`);
      assert.ok(c.worstRel < 2e-6, `within float32 rounding: ${c.worstRel}`);
    } finally {
      a.close();
    }
  });

  test('state_dict without --family: QARepVGGBlock assumed, the report says so, why, and how to choose V2', () => {
    const a = analyzeCheckpoint(fx(dir, 'train_sd.pt'));
    try {
      assert.ok(a.report.blocks.length > 0);
      for (const b of a.report.blocks) {
        assert.equal(b.family, 'QARepVGG');
        assert.ok(!b.branches.some((x) => x.kind === 'avgpool'));
        const note = (b.assumptions ?? []).find((x) => /QARepVGGBlock assumed/.test(x));
        assert.ok(note && /cannot tell it from QARepVGGBlockV2/.test(note) && /--family qarepvggv2/.test(note) && /YOLOv6's QA configs/.test(note), `${b.name}: ${note}`);
      }
      // And it is really the V1 fusion: without the avg-pool the weights differ from the official V2 ones.
      const official = readAllTensors(fx(dir, 'deploy_sd.pt'));
      const b = a.primary.detection.blocks.find((x) => x.branches.some((br) => br.kind === 'identity'))!;
      const fused = fuseBlock(ckptBlockSpec(b));
      const off = official.get(`${b.node.path}.rbr_reparam.weight`)!;
      const diff = Math.max(...fused.weight.map((v, i) => Math.abs(v - off.values[i])));
      assert.ok(diff > 1e-3, `V1 differs from V2 by the missing 1/9 kernel (${diff})`);
    } finally {
      a.close();
    }
  });

  test('full-module pickle fused (fp16 weights widened) matches the official conversion of the same pickle', (t) => {
    const a = analyzeCheckpoint(fx(dir, 'train_full.pt'));
    try {
      const c = compareWithOfficial(a, readAllTensors(fx(dir, 'deploy_full.pt')), (k) => `model.${k}`);
      t.diagnostic(`${c.blocks} blocks: max |Δ| ${c.worstAbs.toExponential(2)}, max |Δ|/max|w| ${c.worstRel.toExponential(2)} (official saved fp16)`);
      assert.ok(c.worstRel < 2e-3, `within float16 rounding of the official fp16 output: ${c.worstRel}`);
    } finally {
      a.close();
    }
  });

  test('nothing unexplained passes: an unknown child or a non-avg pooling rejects the block by name and class', () => {
    const a = analyzeCheckpoint(fx(dir, 'train_full.pt'));
    try {
      const root = a.primary.tree;
      const blk = [...walk(root)].find((n) => n.children.has('rbr_avg'))!;
      // 1. An extra child with tensors the family does not know.
      const extra = newNode(`${blk.path}.extra`, 'extra', blk);
      extra.className = 'torch.nn.modules.conv.Conv2d';
      extra.tensors.set('weight', { ...blk.children.get('rbr_1x1')!.tensors.get('weight')!, key: `${blk.path}.extra.weight` });
      blk.children.set('extra', extra);
      let det = detectCheckpoint(root);
      let rej = det.rejected.find((r) => r.name === blk.path);
      assert.ok(rej, 'the block is rejected');
      assert.match(rej.reason, /^QARepVGG V2: not understood: extra \(torch\.nn\.modules\.conv\.Conv2d\)/);
      assert.ok(!det.blocks.some((b) => b.node === blk), 'and not fused');
      assert.equal(det.blocks.length, 19, 'the other blocks still fuse');
      blk.children.delete('extra');
      // 2. rbr_avg that is not an average pooling.
      const avg = blk.children.get('rbr_avg')!;
      const cls = avg.className;
      avg.className = 'torch.nn.modules.pooling.MaxPool2d';
      det = detectCheckpoint(root);
      rej = det.rejected.find((r) => r.name === blk.path);
      assert.match(rej?.reason ?? '', /'rbr_avg' \(torch\.nn\.modules\.pooling\.MaxPool2d\) is not an average pooling/);
      // 3. An avg-pool whose border values are not a fixed kernel.
      avg.className = cls;
      avg.attrs.set('count_include_pad', false);
      det = detectCheckpoint(root);
      rej = det.rejected.find((r) => r.name === blk.path);
      assert.match(rej?.reason ?? '', /rbr_avg' \(torch\.nn\.modules\.pooling\.AvgPool2d\) has count_include_pad=False/);
      avg.attrs.set('count_include_pad', true);
      avg.attrs.set('padding', 0);
      det = detectCheckpoint(root);
      assert.match(det.rejected.find((r) => r.name === blk.path)?.reason ?? '', /pads 0×0 for a 3×3 window/);
    } finally {
      a.close();
    }
  });
});

describe('--family', () => {
  test('an unknown family name is a one-line error listing the known ones', () => {
    assert.throws(() => detectCheckpoint(newNode('', ''), { family: 'nope' }), /--family: unknown family 'nope'; known: .*qarepvggv2/);
  });
});

describe('state_dicts of the classification families: fused = the official conversion', () => {
  // family folder, expected family label, block count (meta.json blockClasses)
  const cases: [string, string, number][] = [
    ['replknet', 'ReparamLargeKernelConv', 2],
    ['dbb', 'DBB', 6],
    ['fastvit', 'FastViT RepMixer', 3],
    ['fastvit', 'FastViT RepCPE', 2],
    ['fastvit', 'ReparamLargeKernelConv', 3],
    ['unireplknet', 'UniRepLKNet DilatedReparamBlock', 4],
    ['repvit', 'RepViT RepVGGDW', 4],
    ['yolov7', 'YOLOv7 RepConv', 3],
    ['ultralytics_v10', 'Ultralytics RepVGGDW', 1],
    ['ultralytics_rtdetr', 'Ultralytics RepConv', 4],
    ['repvgg', 'RepVGG', -1],
    ['mobileone', 'MobileOne', -1],
  ];
  for (const [dir, label, count] of cases) {
    test(`${dir}: ${label} blocks found; every block fused equals deploy_sd.pt`, { skip: have(dir, 'train_sd.pt') ? false : 'fixture missing' }, (t) => {
      const a = analyzeCheckpoint(fx(dir, 'train_sd.pt'));
      try {
        const mine = a.report.blocks.filter((b) => b.family === label);
        assert.ok(mine.length > 0, `${label} blocks found: ${a.report.blocks.map((b) => b.family).join(', ')}`);
        if (count >= 0) assert.equal(mine.length, count);
        assert.deepEqual(a.report.rejected, []);
        const c = compareWithOfficial(a, readAllTensors(fx(dir, 'deploy_sd.pt')));
        t.diagnostic(`${c.blocks} blocks: max |Δ| ${c.worstAbs.toExponential(2)}, max |Δ|/max|w| ${c.worstRel.toExponential(2)}`);
        assert.ok(c.worstRel < 2e-6, `within float32 rounding: ${c.worstRel}`);
      } finally {
        a.close();
      }
    });
  }
});

describe('DBB full-module pickles (official DingXiaoH/DiverseBranchBlock fixture)', { skip: have('dbb', 'train_full.pt') ? false : 'fixture missing' }, () => {
  test('all four branch kinds read from the modules; fused = what the official switch_to_deploy left in deploy_full.pt', (t) => {
    const a = analyzeCheckpoint(fx('dbb', 'train_full.pt'));
    try {
      assert.deepEqual(a.report.rejected, []);
      const dbb = a.report.blocks.filter((b) => b.family === 'DBB');
      assert.equal(dbb.length, 6);
      const kinds = new Set(dbb.flatMap((b) => b.branches.map((x) => x.kind)));
      assert.deepEqual([...kinds].sort(), ['avgpool', 'conv_bn', 'sequential']);
      for (const b of dbb) assert.ok(!(b.assumptions ?? []).some((x) => /assumed/.test(x)), `${b.name}: ${JSON.stringify(b.assumptions)}`);
      const c = compareWithOfficial(a, readAllTensors(fx('dbb', 'deploy_full.pt')));
      t.diagnostic(`${c.blocks} blocks: max |Δ| ${c.worstAbs.toExponential(2)}, max |Δ|/max|w| ${c.worstRel.toExponential(2)}`);
      assert.ok(c.worstRel < 2e-6, `within float32 rounding: ${c.worstRel}`);
    } finally {
      a.close();
    }
  });

  test('a block with a child the official forward never calls is rejected by name and class, the others fuse', () => {
    const a = analyzeCheckpoint(fx('dbb', 'train_full_unknown_child.pt'));
    try {
      const rej = a.report.rejected.find((r) => r.name === 'g4');
      assert.ok(rej, JSON.stringify(a.report.rejected));
      assert.equal(rej.reason, "DBB: not understood: dbb_extra (torch.nn.modules.pooling.AvgPool2d); the block is left as it is (a branch RepFuse cannot read would make the fused conv wrong).");
      assert.ok(!a.report.blocks.some((b) => b.name === 'g4'));
      assert.equal(a.report.blocks.filter((b) => b.family === 'DBB').length, 5);
    } finally {
      a.close();
    }
  });
});

describe('RepGhost (official ChengpengChen/RepGhost fixture)', { skip: have('repghost', 'train_full.pt') ? false : 'fixture missing' }, () => {
  test('full-module pickle: every RepGhostModule fused equals the official switch_to_deploy (bare identity pair included)', (t) => {
    const a = analyzeCheckpoint(fx('repghost', 'train_full.pt'));
    try {
      assert.deepEqual(a.report.rejected, []);
      const rg = a.report.blocks.filter((b) => b.family === 'RepGhost');
      assert.equal(rg.length, 6);
      assert.equal(rg.filter((b) => b.branches.some((x) => x.kind === 'identity')).length, 2, 'the reparam_identity block has its (Identity, Identity) pair in ghost1 and ghost2');
      const c = compareWithOfficial(a, readAllTensors(fx('repghost', 'deploy_sd.pt')));
      t.diagnostic(`${c.blocks} blocks: max |Δ| ${c.worstAbs.toExponential(2)}, max |Δ|/max|w| ${c.worstRel.toExponential(2)}`);
      assert.ok(c.worstRel < 2e-6, `within float32 rounding: ${c.worstRel}`);
    } finally {
      a.close();
    }
  });

  test('state_dict: the parameterless identity pair cannot show; the report says so, and the other blocks equal the official ones', () => {
    const a = analyzeCheckpoint(fx('repghost', 'train_sd.pt'));
    try {
      const rg = a.report.blocks.filter((b) => b.family === 'RepGhost');
      assert.equal(rg.length, 6);
      for (const b of rg) assert.ok((b.assumptions ?? []).some((x) => /reparam_identity=False/.test(x)), b.name);
      const official = readAllTensors(fx('repghost', 'deploy_sd.pt'));
      for (const b of a.primary.detection.blocks) {
        const fused = fuseBlock(ckptBlockSpec(b));
        const off = official.get(`${b.node.path}.cheap_operation.weight`)!;
        const diff = Math.max(...fused.weight.map((v, i) => Math.abs(v - off.values[i])));
        if (b.node.path.startsWith('5.')) assert.ok(diff > 0.5, `${b.node.path}: without its identity the block differs (${diff})`);
        else assert.ok(diff < 1e-6, `${b.node.path}: ${diff}`);
      }
    } finally {
      a.close();
    }
  });
});

describe('YOLOv6 RepVGGBlock and QARepVGGBlock state_dicts (official meituan/YOLOv6 fixtures)', () => {
  for (const dir of ['yolov6_repvgg', 'yolov6_qarepvgg']) {
    test(`${dir}: fused = the official switch_to_deploy; stride-2 positions say so`, { skip: have(dir, 'train_sd.pt') ? false : 'fixture missing' }, (t) => {
      const a = analyzeCheckpoint(fx(dir, 'train_sd.pt'));
      try {
        assert.deepEqual(a.report.rejected, []);
        const c = compareWithOfficial(a, readAllTensors(fx(dir, 'deploy_sd.pt')));
        t.diagnostic(`${c.blocks} blocks: max |Δ| ${c.worstAbs.toExponential(2)}, max |Δ|/max|w| ${c.worstRel.toExponential(2)}`);
        assert.ok(c.worstRel < 2e-6, `within float32 rounding: ${c.worstRel}`);
        const s2 = a.report.blocks.find((b) => b.name === 'backbone.ERBlock_2.0')!;
        if (dir === 'yolov6_qarepvgg') assert.deepEqual(s2.stride, [2, 2]);
      } finally {
        a.close();
      }
    });
  }
});
