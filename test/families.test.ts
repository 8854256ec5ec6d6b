// The family registry (src/core/families): one definition per family, read by both detectors.
// The same official model gets the same family labels from its ONNX export and its checkpoint.
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { FAMILIES, FAMILY_LIST, familyByLabel, familyIcon, guessOnnxFamily } from '../src/core/families';
import type { FamilyDef } from '../src/core/families';
import { inspect } from '../src/engine';
import { repoRoot } from './helpers/paths';

describe('registry', () => {
  test('ids and labels are unique; every family has an icon, ε, official reference, deploy layout and a checkpoint matcher', () => {
    const ids = FAMILY_LIST.map((f) => f.id);
    assert.equal(new Set(ids).size, ids.length);
    const labels = FAMILY_LIST.map((f) => f.label);
    assert.equal(new Set(labels).size, labels.length);
    for (const f of FAMILY_LIST as readonly FamilyDef[]) {
      assert.ok(f.icon.id, f.id);
      assert.ok(f.eps > 0 && f.eps < 1e-2, f.id);
      assert.match(f.official.repo, /^[\w-]+\/[\w.-]+$/, f.id);
      assert.ok(f.official.path && f.official.fn, f.id);
      assert.ok(f.deploy.module && f.deploy.remove.length, f.id);
      assert.ok(f.match, `${f.id}: checkpoint matcher`);
      assert.equal(FAMILIES[f.id as keyof typeof FAMILIES], f);
      assert.equal(familyByLabel(f.label), f);
      assert.deepEqual(familyIcon(f.label), f.icon);
    }
    assert.deepEqual(familyIcon('something new'), { id: 'layers' });
  });

  test('ONNX guess: names, then structure; "-style" fallbacks', () => {
    const base = { kinds: ['conv_bn', 'conv_bn'] as const, postBN: false, scaled: false, asym: false, depthwise: false };
    const g = (names: string, extra: Partial<Parameters<typeof guessOnnxFamily>[0]> = {}) => guessOnnxFamily({ ...base, kinds: [...base.kinds], names, ...extra });
    assert.equal(g('/model.1/rbr_dense/rbr_dense.0/Conv'), 'YOLOv7 RepConv');
    assert.equal(g('/backbone/stem/rbr_dense/conv/Conv'), 'RepVGG');
    assert.equal(g('/backbone/stem/rbr_dense/conv/Conv', { modelNames: '/backbone/ERBlock_2/ERBlock_2.0/rbr_dense/conv/Conv' }), 'YOLOv6 RepVGGBlock', 'a YOLOv6 stem is YOLOv6 from ONNX too');
    assert.equal(g('/a/rbr_dense/conv/Conv', { postBN: true }), 'QARepVGG');
    assert.equal(g('/a/rbr_dense/conv/Conv', { postBN: true, kinds: ['conv_bn', 'conv', 'identity', 'avgpool'] }), 'QARepVGG V2');
    assert.equal(g('/x/Conv', { scaled: true }), 'PP-YOLOE-style');
    assert.equal(g('/x/Conv'), 'RepVGG-style');
  });
});

const official = path.join(repoRoot, 'test', 'fixtures', 'official');
const cases: [string, string | undefined][] = [
  ['yolov6_repvgg', undefined],
  ['yolov6_qarepvgg', undefined],
  ['yolov6_qarepvggv2', 'qarepvggv2'],
  ['dbb', undefined],
  ['fastvit', undefined],
  ['replknet', undefined],
  ['unireplknet', undefined],
  ['repghost', undefined],
  ['mobileone', undefined],
  ['repvgg', undefined],
];

describe('one model, one family: ONNX export and checkpoint of the same official model get the same labels', () => {
  for (const [dir, family] of cases) {
    const onnx = path.join(official, dir, 'train_bn.onnx');
    const sd = path.join(official, dir, 'train_sd.pt');
    test(dir, { skip: fs.existsSync(onnx) && fs.existsSync(sd) ? false : 'fixture missing' }, () => {
      const count = (labels: string[]) => labels.reduce<Record<string, number>>((m, l) => ((m[l] = (m[l] ?? 0) + 1), m), {});
      const a = count(inspect(onnx, { foldBN: true }).blocks.map((b) => b.family));
      const b = count(inspect(sd, { foldBN: true, family }).blocks.map((b) => b.family));
      assert.deepEqual(a, b);
      for (const l of Object.keys(b)) assert.ok(familyByLabel(l), `'${l}' is a registry label`);
    });
  }
});
