// Deploy forms against the official code: every fixture in test/fixtures/official/ (made by each
// family's own repo, see /work/coord/FIXTURES.md) is fused by RepFuse and judged by PyTorch
// (test/interop/deploy_check.py, Debian's python3-torch):
//  * the state_dict output has exactly the keys, shapes and dtypes of the official deploy_sd.pt and
//    its values (fp32, ≤ 1e-5·max|w| per tensor); where the official deploy model exists as a full
//    module (deploy_full.pt), it loads the output with strict=True and reproduces deploy_out_*.npy
//    (≤ 1e-5·max|y|);
//  * the rewritten full-module checkpoint unpickles with only the stand-ins on sys.path, every module
//    ends exactly as the official conversion leaves it (class, children, parameters with dtype and
//    requires_grad, buffers, flags, None slots, `forward` bound to forward_fuse/fuseforward), and
//    torch.load(out)['model'].float().eval()(x) reproduces deploy_full_out_*.npy (fp16 checkpoints:
//    ≤ 2e-3·max|y|, fp16 rounding);
//  * --no-fold-bn keeps the plain Conv+BN of a YOLO checkpoint, and the output still runs.
// Without PyTorch these tests FAIL (they do not skip).
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { analyzeCheckpoint } from '../src/core/checkpoint';
import { walk } from '../src/core/checkpoint/tree';
import { defaultFuseOptions, fuse, type FuseOptions } from '../src/engine';
import { makeTmp, repoRoot, rmTmp } from './helpers/paths';

const PYTHON = process.env.REPFUSE_TEST_PYTHON || '/usr/bin/python3';
const CHECK = path.join(repoRoot, 'test', 'interop', 'deploy_check.py');
const OFFICIAL = path.join(repoRoot, 'test', 'fixtures', 'official');

interface Meta {
  family: string;
  repo: string;
  convert: string;
  fullModule?: string | null;
  deployFullModule?: string | null;
  /**
   * Whether the official conversion also folds plain Conv+BN outside the blocks (YOLO's Model.fuse(),
   * DBB's ConvBN.switch_to_deploy, RepViT's replace_batchnorm: yes). Absent means yes; the
   * classification fixtures whose conversion touches the re-parameterization blocks only
   * (repvgg_model_convert, reparameterize_model, structural_reparam) say false.
   */
  officialFoldsConvBN?: boolean;
}

/** Every official-code fixture folder with a deploy_sd.pt (the official conversion's state_dict). */
const families = fs.existsSync(OFFICIAL)
  ? fs
      .readdirSync(OFFICIAL)
      .filter((d) => fs.existsSync(path.join(OFFICIAL, d, 'meta.json')) && fs.existsSync(path.join(OFFICIAL, d, 'deploy_sd.pt')) && fs.existsSync(path.join(OFFICIAL, d, 'train_sd.pt')))
      .sort()
  : [];
const meta = (d: string): Meta => JSON.parse(fs.readFileSync(path.join(OFFICIAL, d, 'meta.json'), 'utf8'));
/**
 * What a user must say for a state_dict that cannot show it (README: "Variants a state_dict cannot
 * show"): the avg-pool branch of QARepVGGBlockV2 has no tensors.
 */
const STATE_DICT_OPTIONS: Record<string, Partial<FuseOptions>> = { yolov6_qarepvggv2: { family: 'qarepvggv2' } };

/**
 * State_dicts that cannot determine their deploy weights: RepGhost's optional bare identity pair
 * (reparam_identity) has no tensors, so its state_dict cannot show it. The report says which
 * variant it assumed, and test/checkpoint-official.test.ts checks exactly that (and that every
 * other block equals the official fusion); the full-module RepGhost fixture fuses exactly.
 */
const STATE_DICT_UNDETERMINED = new Set(['repghost']);

const hasFull = (d: string) => fs.existsSync(path.join(OFFICIAL, d, 'train_full.pt')) && fs.existsSync(path.join(OFFICIAL, d, 'deploy_full.pt'));

let tmp: string;
before(() => {
  tmp = makeTmp();
});
after(() => rmTmp(tmp));

interface Check {
  code: number;
  json: Record<string, unknown>;
  stderr: string;
}

function check(...args: string[]): Promise<Check> {
  return new Promise((resolve) => {
    execFile(PYTHON, [CHECK, ...args], { cwd: repoRoot, maxBuffer: 64 << 20, timeout: 300_000 }, (err, stdout, stderr) => {
      const code = err ? ((err as { code?: number }).code ?? -1) : 0;
      let json: Record<string, unknown>;
      try {
        json = JSON.parse(stdout.trim().split('\n').pop() ?? '');
      } catch {
        json = { ok: false, error: `no JSON on stdout (${String(err?.message ?? '')}): ${stdout.slice(0, 400)} ${stderr.slice(-800)}` };
      }
      resolve({ code: typeof code === 'number' ? code : -1, json, stderr });
    });
  });
}

function passed(r: Check, what: string): Record<string, unknown> {
  const j = r.json;
  const detail = [j.missing, j.unexpected, j.wrong, j.diffs].filter((x) => Array.isArray(x) && x.length).map((x) => JSON.stringify((x as unknown[]).slice(0, 8)));
  assert.equal(r.code, 0, `${what}: deploy_check.py exit ${r.code} at stage '${String(j.stage)}': ${String(j.error ?? '')} ${detail.join(' ')}`);
  assert.equal(j.ok, true);
  return j;
}

async function fuseTo(input: string, output: string, opts: Partial<FuseOptions>): Promise<void> {
  const r = await fuse(input, { ...defaultFuseOptions, validate: false, output, ...opts });
  assert.ok(r.output, `nothing written (${r.validationSkipped})`);
}

test('the official-code fixtures and PyTorch are there (/usr/bin/python3 with torch)', () => {
  assert.ok(fs.existsSync(CHECK));
  for (const f of ['repvgg', 'mobileone', 'repvit', 'yolov6_repvgg', 'yolov7', 'yolov9_gelan', 'ultralytics_rtdetr']) assert.ok(families.includes(f), `fixture ${f}`);
});

describe('state_dict outputs = the official deploy state_dict (keys, shapes, values), strict load where the deploy model exists', { concurrency: 2 }, () => {
  for (const fam of families.filter((f) => !STATE_DICT_UNDETERMINED.has(f))) {
    test(`${fam} (${meta(fam).repo}: ${meta(fam).convert.slice(0, 90)})`, async () => {
      const out = path.join(tmp, `${fam}.sd.pt`);
      // The official deploy state_dicts of YOLO repos come after their whole-model fuse: --fold-bn.
      await fuseTo(path.join(OFFICIAL, fam, 'train_sd.pt'), out, { checkpointFoldBN: true, ...STATE_DICT_OPTIONS[fam] });
      const j = passed(await check('state_dict', out, path.join(OFFICIAL, fam)), fam);
      assert.ok((j.worst_rel as number) <= 1e-5);
      if (hasFull(fam)) assert.equal(j.strict, true, 'loaded strict into the official deploy model');
    });
  }
});

describe('full-module checkpoints: the module objects end as the official conversion leaves them, and run', { concurrency: 2 }, () => {
  for (const fam of families.filter(hasFull)) {
    test(`${fam}: torch.load(out)['model'].float().eval()(x) with only the stand-ins on sys.path`, async () => {
      const out = path.join(tmp, `${fam}.full.pt`);
      // Defaults: module objects kept, Conv+BN folded (a full-module YOLO checkpoint).
      const r = await fuse(path.join(OFFICIAL, fam, 'train_full.pt'), { ...defaultFuseOptions, validate: false, output: out });
      assert.ok(r.output);
      if (meta(fam).officialFoldsConvBN === false) {
        assert.equal(r.bnFolded, 0, `the official ${meta(fam).convert.split(' ')[0]} folds no plain Conv+BN; neither does the default`);
        assert.deepEqual(r.inspect.folds, []);
      } else {
        assert.ok(r.bnFolded > 0, 'the official Model.fuse() folds plain Conv+BN; so does the default');
        assert.equal(r.inspect.folds.length, r.bnFolded);
        assert.ok(r.inspect.model.notes.some((n) => /folded/.test(n)), 'the report says what was folded');
      }
      const j = passed(await check('full_module', out, path.join(OFFICIAL, fam)), fam);
      assert.equal(j.ndiffs, 0);
    });
  }
});

describe('--no-fold-bn keeps plain Conv+BN', () => {
  test('yolov7 full module: blocks in deploy form, every Conv keeps conv+bn and its class forward', async () => {
    const fam = 'yolov7';
    const out = path.join(tmp, 'yolov7.nofold.pt');
    const r = await fuse(path.join(OFFICIAL, fam, 'train_full.pt'), { ...defaultFuseOptions, validate: false, output: out, checkpointFoldBN: false });
    assert.equal(r.bnFolded, 0);
    assert.deepEqual(r.inspect.folds, []);
    const a = analyzeCheckpoint(out);
    try {
      assert.equal(a.report.blocks.length, 0, 'no block left in training form');
      const convs = [...walk(a.primary.tree)].filter((n) => n.className === 'models.common.Conv');
      assert.ok(convs.length > 10);
      for (const n of convs) assert.ok(n.children.has('bn'), `${n.path} keeps its bn`);
      const forwardAttrs = (a.primary.module!.state as { get(k: string): unknown }).get('forward');
      assert.equal(forwardAttrs, undefined);
    } finally {
      a.close();
    }
    // And it runs, equal to the official deploy model (Conv+BN unfolded computes the same).
    const j = passed(await check('run_only', out, path.join(OFFICIAL, fam)), 'yolov7 --no-fold-bn');
    assert.ok((j.outputs as unknown[]).length >= 1);
  });

  test('a state_dict of a YOLO family is not folded by default (its deploy model has Conv+BN until Model.fuse())', async () => {
    const out = path.join(tmp, 'yolov6.default.pt');
    const r = await fuse(path.join(OFFICIAL, 'yolov6_repvgg', 'train_sd.pt'), { ...defaultFuseOptions, validate: false, output: out });
    assert.equal(r.bnFolded, 0);
    const a = analyzeCheckpoint(out);
    try {
      assert.ok([...a.primary.tensors.keys()].some((k) => /\.block\.bn\.running_var$/.test(k)), 'ConvModule BNs kept');
    } finally {
      a.close();
    }
  });

  test('--fold-bn and --no-fold-bn are one-line usage errors together', async () => {
    const { spawnSync } = await import('node:child_process');
    const cli = path.join(repoRoot, 'dist', 'cli.js');
    if (!fs.existsSync(cli)) assert.fail('dist/cli.js is missing: run node scripts/build.mjs');
    const r = spawnSync(process.execPath, [cli, 'fuse', path.join(OFFICIAL, 'yolov7', 'train_sd.pt'), '--fold-bn', '--no-fold-bn', '-o', path.join(tmp, 'x.pt')], { encoding: 'utf8' });
    assert.equal(r.status, 2);
    assert.match(r.stderr, /--fold-bn and --no-fold-bn exclude each other/);
  });
});

describe('RepViT full modules (THU-MIG/RepViT: a user\'s torch.save(model); utils.replace_batchnorm)', { skip: hasFull('repvit') ? false : 'fixture missing' }, () => {
  const fx = (f: string) => path.join(OFFICIAL, 'repvit', f);
  const classesOf = (file: string): Map<string, string> => {
    const a = analyzeCheckpoint(file);
    try {
      return new Map([...walk(a.primary.tree)].map((n) => [n.path, n.className ?? '']));
    } finally {
      a.close();
    }
  };

  test('the default leaves what replace_batchnorm leaves: nn.Conv2d / nn.Linear for every RepVGGDW, Conv2d_BN, BN_Linear and the Classfier', async () => {
    const out = path.join(tmp, 'repvit.classes.pt');
    const r = await fuse(fx('train_full.pt'), { ...defaultFuseOptions, validate: false, output: out });
    assert.equal(r.blocksFused, 4, 'the four RepVGGDW');
    // 22 Conv2d_BN − 4 inside the RepVGGDW (fused with the block) + 1 Classfier (two BN_Linear heads averaged).
    assert.equal(r.bnFolded, 19);
    assert.deepEqual(r.inspect.rejected, []);
    assert.deepEqual(r.inspect.notFolded, []);
    const cls = classesOf(out);
    const left = [...cls].filter(([, c]) => /^model\.repvit\.(Conv2d_BN|RepVGGDW|BN_Linear|Classfier)$/.test(c));
    assert.deepEqual(left, []);
    assert.equal(cls.get('classifier'), 'torch.nn.modules.linear.Linear');
    assert.equal(cls.get('features.1.token_mixer.0'), 'torch.nn.modules.conv.Conv2d');
    assert.equal(cls.get('features.1.channel_mixer'), 'model.repvit.Residual', 'Residual(Sequential) stays, as Residual.fuse returns self');
  });

  test('a RepVGGDW with a child it never calls is rejected and left whole; a Conv2d_BN whose Sequential runs an extra ReLU is not folded; the output runs equal', async () => {
    const out = path.join(tmp, 'repvit.unknown.pt');
    const r = await fuse(fx('train_full_unknown_child.pt'), { ...defaultFuseOptions, validate: false, output: out });
    const rej = r.inspect.rejected.find((x) => x.name === 'features.2.token_mixer.0');
    assert.ok(rej, JSON.stringify(r.inspect.rejected));
    assert.match(rej.reason, /not understood: extra \(torch\.nn\.modules\.pooling\.AvgPool2d\)/);
    const nf = r.inspect.notFolded.find((x) => x.name === 'features.6.channel_mixer.m.2');
    assert.ok(nf, JSON.stringify(r.inspect.notFolded));
    assert.match(nf.reason, /not understood: 'act' \(torch\.nn\.modules\.activation\.ReLU\) beside 'c' and 'bn'/);
    assert.equal(r.blocksFused, 3);
    assert.equal(r.bnFolded, 18, 'the Conv2d_BN of the rejected block and the one with the ReLU are left alone');
    const cls = classesOf(out);
    assert.equal(cls.get('features.2.token_mixer.0'), 'model.repvit.RepVGGDW');
    assert.equal(cls.get('features.2.token_mixer.0.conv'), 'model.repvit.Conv2d_BN', 'the rejected block is left as it is, its Conv2d_BN included');
    assert.equal(cls.get('features.6.channel_mixer.m.2.act'), 'torch.nn.modules.activation.ReLU');
    // The ReLU changes the output by ~11 % of max|y|: had it been folded away, this would fail.
    const j = passed(await check('run_only', out, path.join(OFFICIAL, 'repvit'), 'unknown_child_out'), 'repvit unknown child');
    assert.ok((j.outputs as unknown[]).length === 1);
  });

  test('Classfier.distillation = False on the instance: only `classifier` is folded (as Classfier.fuse does), the output runs equal', async () => {
    const out = path.join(tmp, 'repvit.distill_off.pt');
    const r = await fuse(fx('train_full_distill_off.pt'), { ...defaultFuseOptions, validate: false, output: out });
    assert.equal(r.bnFolded, 19);
    const head = r.inspect.folds.find((f) => f.name === 'classifier');
    assert.ok(head, JSON.stringify(r.inspect.folds.map((f) => f.name)));
    assert.equal(head.bn, 'classifier.classifier.bn', 'classifier_dist is not averaged in');
    // Averaging classifier_dist in would move the output by > 1e-3 (checked by the generator).
    passed(await check('run_only', out, path.join(OFFICIAL, 'repvit'), 'distill_off_out'), 'repvit distillation off');
  });

  test('--no-fold-bn: Conv2d_BN / BN_Linear / Classfier kept (the report says so and what the output loads into); the module output runs', async () => {
    const out = path.join(tmp, 'repvit.nofold.pt');
    const r = await fuse(fx('train_full.pt'), { ...defaultFuseOptions, validate: false, output: out, checkpointFoldBN: false });
    assert.equal(r.blocksFused, 4);
    assert.equal(r.bnFolded, 0);
    assert.ok(r.inspect.model.notes.some((n) => /^--no-fold-bn: 19 RepViT modules \(Conv2d_BN, Classfier\) kept in training form.*utils\.replace_batchnorm folds the rest/.test(n)), JSON.stringify(r.inspect.model.notes));
    const cls = classesOf(out);
    assert.equal(cls.get('classifier'), 'model.repvit.Classfier');
    assert.equal(cls.get('features.0.0'), 'model.repvit.Conv2d_BN');
    assert.equal(cls.get('features.1.token_mixer.0'), 'torch.nn.modules.conv.Conv2d');
    passed(await check('run_only', out, path.join(OFFICIAL, 'repvit')), 'repvit --no-fold-bn');

    const sd = path.join(tmp, 'repvit.nofold.sd.pt');
    const s = await fuse(fx('train_sd.pt'), { ...defaultFuseOptions, validate: false, output: sd, checkpointFoldBN: false });
    assert.equal(s.bnFolded, 0);
    assert.ok(s.inspect.model.notes.some((n) => /^--no-fold-bn: 19 RepViT modules .*not into the officially converted RepViT/.test(n)), JSON.stringify(s.inspect.model.notes));
    const a = analyzeCheckpoint(sd);
    try {
      const keys = [...a.primary.tensors.keys()];
      assert.ok(keys.includes('features.0.0.c.weight') && keys.includes('classifier.classifier_dist.l.weight'), 'Conv2d_BN and the heads kept');
      assert.ok(keys.includes('features.1.token_mixer.0.weight'), 'RepVGGDW replaced by its conv');
    } finally {
      a.close();
    }
  });
});
