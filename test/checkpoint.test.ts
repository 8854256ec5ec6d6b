// PyTorch checkpoints end to end, without Python: for every fixture in test/fixtures/torch (each
// family × state_dict fp32/fp16, legacy, module. prefix, safetensors, full module, full module with
// EMA), inspect() finds exactly the manifest's blocks and says where the weights were and where
// each epsilon came from; fuse() writes what the deploy model loads (the manifest's deploy keys,
// every other tensor byte-identical), validates block by block, never touches its input and leaves
// no temp files. Plus hostile pickles, corrupt files, output-path rules, --dtype / --eps /
// --keep-modules / --state-dict, and convs in series that must not be taken for a block.
// (The readers/writers themselves are covered by torch-io.test.ts; PyTorch loading RepFuse's
// outputs by interop.test.ts.)
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { analyzeCheckpoint } from '../src/core/checkpoint';
import { DType, dtypeName, encodeFloats, isFloatType } from '../src/core/dtype';
import { FormatError, oneLineError, RepFuseError } from '../src/core/errors';
import type { BlockInfo, InspectReport } from '../src/core/model';
import type { FuseReport } from '../src/core/report';
import { openTorch } from '../src/core/torch/load';
import { writeTorchZip } from '../src/core/torch/save';
import { NewTensor, readTensor, readTensorBytes, type TorchTensor } from '../src/core/torch/tensor';
import { PyBoundMethod, PyDict, PyObject, PyTuple, type PyValue, pyNumber } from '../src/core/torch/values';
import { defaultFuseOptions, fuse, type FuseOptions, inspect } from '../src/engine';
import {
  blockDeployKeys,
  expectedStateDictKeys,
  familyLabel,
  familyOf,
  fixturePath,
  fusedName,
  fusedWeightShape,
  haveTorchFixtures,
  isFullModule,
  type ManifestBlock,
  type ManifestFile,
  openTensors,
  sha256,
  freshDirs,
  manifestParts,
} from './helpers/ckpt-fixtures';
import { cliPath, makeTmp, repoRoot, rmTmp } from './helpers/paths';
import { pyDiff } from './helpers/torch-bytes';

const { fixtures, hostile, marker: MARKER, byName } = manifestParts();
const FLOAT: Record<string, DType> = { float32: DType.float32, float16: DType.float16 };

let tmp: string;
const freshDir = freshDirs(() => tmp);

before(() => {
  tmp = makeTmp();
});
after(() => rmTmp(tmp));

function fuseWith(input: string, opts: Partial<FuseOptions>): Promise<FuseReport> {
  return fuse(input, { ...defaultFuseOptions, ...opts });
}

/** Throws (sync or async) a RepFuseError whose one-line message matches `re`; returns it. */
async function rejectsRepFuse(fn: () => unknown, re: RegExp, cls: typeof RepFuseError = RepFuseError): Promise<RepFuseError> {
  let caught: unknown;
  try {
    await fn();
  } catch (err) {
    caught = err;
  }
  assert.ok(caught instanceof cls, `expected a ${cls.name}, got ${caught instanceof Error ? `${caught.constructor.name}: ${caught.message}` : String(caught)}`);
  const line = oneLineError(caught);
  assert.doesNotMatch(line, /\n/, 'one line');
  assert.match(line, re);
  return caught as RepFuseError;
}

interface CliRun {
  code: number;
  stdout: string;
  stderr: string;
}

function cli(...args: string[]): Promise<CliRun> {
  return new Promise((resolve) => {
    execFile(process.execPath, [cliPath, ...args], { cwd: repoRoot, maxBuffer: 64 << 20 }, (err, stdout, stderr) => {
      const code = err ? ((err as { code?: number }).code ?? -1) : 0;
      resolve({ code: typeof code === 'number' ? code : -1, stdout, stderr });
    });
  });
}

/** CLI exit 2 with exactly one `repfuse: …` line on stderr (no stack) that mentions every string. */
function cliUsageError(r: CliRun, ...mentions: string[]): string {
  assert.equal(r.code, 2, `exit code ${r.code}; stderr: ${r.stderr}`);
  const lines = r.stderr.split('\n').filter((l) => l.length > 0 && !l.startsWith('… '));
  assert.equal(lines.length, 1, `one error line on stderr, got:\n${r.stderr}`);
  assert.ok(lines[0].startsWith('repfuse: '), lines[0]);
  assert.doesNotMatch(r.stderr, /\n\s+at /, 'no stack trace');
  for (const m of mentions) assert.ok(lines[0].includes(m), `'${lines[0]}' mentions ${m}`);
  return lines[0];
}

const sameBytes = (a: TorchTensor | NewTensor, b: TorchTensor | NewTensor): boolean => Buffer.from(readTensorBytes(a)).equals(Buffer.from(readTensorBytes(b)));

/** The block in a report, by name. */
function blockOf(r: InspectReport, name: string): BlockInfo {
  const b = r.blocks.find((x) => x.name === name);
  assert.ok(b, `block '${name}' not found; found ${r.blocks.map((x) => x.name).join(', ')}`);
  return b;
}

/** Whether RepFuse can know in-channels/groups of this block: read from a pickled module, or implied by an identity branch. */
const geometryKnowable = (fx: ManifestFile, mb: ManifestBlock) => isFullModule(fx) || mb.identity !== null || mb.groups === 1;

// ---------------------------------------------------------------------------------------------
describe('inspect: every fixture file against the manifest', { skip: haveTorchFixtures ? false : 'test/fixtures/torch/manifest.json missing' }, () => {
  for (const fx of fixtures) {
    test(`${fx.file} (${fx.family}, ${fx.form}, ${fx.dtype}): blocks, families, geometry, layout, epsilon`, () => {
      const file = fixturePath(fx);
      const r = inspect(file, { foldBN: true });
      // Same report shape as ONNX.
      assert.equal(r.model.format, fx.format === 'safetensors' ? 'safetensors' : 'pytorch');
      assert.equal(r.model.fileSize, fx.bytes);
      assert.deepEqual(r.folds, []);
      assert.deepEqual(r.rejected, [], `no rejected candidates: ${JSON.stringify(r.rejected)}`);
      // Exactly the manifest's blocks, in file order.
      assert.deepEqual(
        r.blocks.map((b) => b.name),
        fx.blocks!.map((b) => b.name),
      );
      // Where the weights were found.
      const layout = r.model.layout ?? '';
      assert.match(layout, fx.format === 'safetensors' ? /^safetensors/ : fx.format === 'legacy' ? /^torch legacy/ : /^torch zip/);
      assert.ok(layout.includes(fx.entry ? `'${fx.entry}' entry` : 'the root'), `layout '${layout}' names ${fx.entry ? `the '${fx.entry}' entry` : 'the root'}`);
      if (isFullModule(fx)) assert.ok(layout.includes(`full-module pickle (${fx.model_class})`), layout);
      else assert.match(layout, /state_dict/);
      const notes = r.model.notes.join('\n');
      if (fx.prefix) assert.match(notes, /'module\.' prefix.*stripped/, 'the module. prefix is reported as stripped');
      else assert.doesNotMatch(notes, /prefix/);
      if (!isFullModule(fx)) assert.match(notes, /state_dict has no graph/);
      assert.doesNotMatch(notes, /not executed/, 'no dangerous globals in a fixture');
      // Parameter count = every tensor in the weights.
      const own = openTensors(file);
      try {
        const numel = [...own.tensors.values()].reduce((a, t) => a + t.numel, 0);
        assert.equal(r.model.paramCount, numel);
      } finally {
        own.close();
      }

      for (const mb of fx.blocks!) {
        const b = blockOf(r, mb.name);
        const at = `${fx.file} ${mb.name}`;
        assert.equal(b.family, familyLabel(mb), at);
        assert.deepEqual(b.kernel, mb.kernel, `${at}: kernel`);
        assert.equal(b.outChannels, mb.out, `${at}: out channels`);
        if (geometryKnowable(fx, mb)) {
          assert.equal(b.inChannels, mb.in, `${at}: in channels`);
          assert.equal(b.groups, mb.groups, `${at}: groups`);
        }
        assert.equal(b.branches.length, mb.branches, `${at}: branches ${JSON.stringify(b.branches.map((x) => x.kind))}`);
        const convKernels = b.branches.filter((x) => x.kernel).map((x) => x.kernel!.join('x')).sort();
        assert.deepEqual(convKernels, mb.conv_branch_kernels.map((k) => k.join('x')).sort(), `${at}: conv branch kernels`);
        const ids = b.branches.filter((x) => x.kind === 'identity' || x.kind === 'bn_identity').map((x) => x.kind);
        assert.deepEqual(ids, mb.identity === 'bn' ? ['bn_identity'] : mb.identity === 'plain' ? ['identity'] : [], `${at}: identity branch`);
        assert.equal(!!b.postBN, mb.post_bn, `${at}: post-add BN`);
        assert.equal(b.branches.some((x) => x.scaled), mb.alpha !== null, `${at}: PP-YOLOE alpha`);
        assert.equal(b.deployName, mb.deploy_name, `${at}: deploy name`);
        // Stride: from the module when pickled; a state_dict cannot know it and must say so.
        if (isFullModule(fx)) assert.deepEqual(b.stride, [mb.stride, mb.stride], `${at}: stride`);
        else if (mb.stride !== 1) assert.ok((b.assumptions ?? []).some((a) => /stride/.test(a)), `${at}: the stride assumption is stated`);
        // Epsilon: from the module (full pickles) or the family default, stated as assumed.
        const eps = [...b.branches.filter((x) => x.hasBN).map((x) => [x.epsilon, x.epsilonSource] as const), ...(b.postBN ? [[b.postBN.epsilon, b.postBN.epsilonSource] as const] : [])];
        assert.ok(eps.length > 0, `${at}: has BNs`);
        for (const [e, src] of eps) {
          assert.ok(Math.abs(e! - mb.eps) <= mb.eps * 1e-6, `${at}: epsilon ${e} vs ${mb.eps}`);
          assert.equal(src, isFullModule(fx) ? 'model' : 'assumed', `${at}: epsilon source`);
        }
        if (!isFullModule(fx)) assert.ok((b.assumptions ?? []).some((a) => /epsilon .* assumed .*--eps/.test(a)), `${at}: the epsilon assumption is stated`);
        else assert.ok(!(b.assumptions ?? []).some((a) => /epsilon/.test(a)), `${at}: nothing assumed about epsilon`);
      }
    });
  }

  test('state_dicts: in-channels and groups of grouped blocks without an identity branch are right (or not claimed)', () => {
    // A state_dict shows the weight [out, in/groups, k, k] only; without an identity branch the
    // groups must come from elsewhere (e.g. the layer before, as RepFuse already does for
    // QARepVGG's identity) — or the block must not claim a geometry it guessed.
    const wrong: string[] = [];
    for (const fx of fixtures.filter((f) => !isFullModule(f))) {
      const r = inspect(fixturePath(fx), { foldBN: true });
      for (const mb of fx.blocks!.filter((b) => !geometryKnowable(fx, b))) {
        const b = blockOf(r, mb.name);
        if (b.inChannels !== mb.in || b.groups !== mb.groups) {
          wrong.push(`${fx.file} ${mb.name}: reports ${b.inChannels}→${b.outChannels} groups ${b.groups}, is ${mb.in}→${mb.out} groups ${mb.groups} (assumptions: ${(b.assumptions ?? []).filter((a) => /groups/.test(a)).join('; ')})`);
        }
      }
    }
    assert.deepEqual(wrong, []);
  });

  test('--eps overrides every BN epsilon (state_dict and full module) and is reported as an override', async () => {
    for (const name of ['repvgg_sd.pt', 'yolov7_full.pt', 'qarepvgg_sd.pt']) {
      const r = inspect(fixturePath(name), { foldBN: true, eps: 2e-3 });
      for (const b of r.blocks) {
        for (const x of b.branches.filter((y) => y.hasBN)) {
          assert.equal(x.epsilon, 2e-3, `${name} ${b.name}`);
          assert.equal(x.epsilonSource, 'override', `${name} ${b.name}`);
        }
        if (b.postBN) assert.deepEqual(b.postBN, { epsilon: 2e-3, epsilonSource: 'override' });
        assert.ok(!(b.assumptions ?? []).some((a) => /epsilon .* assumed/.test(a)), `${name} ${b.name}: no 'assumed' epsilon`);
      }
    }
    // And it changes what is written: the fused bias depends on epsilon.
    const d = freshDir();
    const a = await fuseWith(fixturePath('repvgg_sd.pt'), { output: path.join(d, 'a.pt'), validate: false });
    const b = await fuseWith(fixturePath('repvgg_sd.pt'), { output: path.join(d, 'b.pt'), validate: false, eps: 1e-1 });
    const ta = openTensors(a.output!);
    const tb = openTensors(b.output!);
    try {
      assert.ok(!sameBytes(ta.tensors.get('stage0.rbr_reparam.weight')!, tb.tensors.get('stage0.rbr_reparam.weight')!), 'eps 1e-1 gives another fused weight');
      assert.ok(sameBytes(ta.tensors.get('stem.conv.weight')!, tb.tensors.get('stem.conv.weight')!), 'tensors outside blocks do not depend on eps');
    } finally {
      ta.close();
      tb.close();
    }
  });
});

// ---------------------------------------------------------------------------------------------
/** Checks a written state_dict (.pt or .safetensors) against the manifest and the input, tensor by tensor. */
function checkFusedStateDict(fx: ManifestFile, output: string, dtype?: DType): void {
  const input = openTensors(fixturePath(fx));
  const out = openTensors(output);
  try {
    // Input tensors are named as namedTensors() names them: '<entry>.' + '<prefix>' + state_dict key.
    const inKey = (k: string) => `${fx.entry ? `${fx.entry}.` : ''}${fx.prefix}${k}`;
    const keys = [...out.tensors.keys()];
    const sorted = (xs: string[]) => xs.slice().sort();
    assert.deepEqual(sorted(keys), sorted(expectedStateDictKeys(fx)), `${path.basename(output)}: exactly the deploy model's keys`);
    const fileDtype = FLOAT[fx.dtype!];
    const blockKeys = new Set(fx.blocks!.flatMap((b) => blockDeployKeys(fx, b)));
    if (!output.endsWith('.safetensors')) {
      // A .pt keeps the input's order for every key it does not replace (safetensors sorts its names).
      const kept = expectedStateDictKeys(fx).filter((k) => !blockKeys.has(k));
      assert.deepEqual(
        keys.filter((k) => !blockKeys.has(k)),
        kept,
        'order of the unchanged keys',
      );
    }
    // Every key that is not a fused conv: same dtype, shape and bytes as in the input (or converted exactly).
    for (const k of keys.filter((x) => !blockKeys.has(x))) {
      const t = out.tensors.get(k)!;
      const src = input.tensors.get(inKey(k));
      assert.ok(src, `${k}: not in the input (looked for ${inKey(k)})`);
      assert.deepEqual(t.shape, src.shape, `${k}: shape`);
      if (dtype === undefined || !isFloatType(src.dtype) || src.dtype === dtype) {
        assert.equal(t.dtype, src.dtype, `${k}: dtype`);
        assert.ok(sameBytes(t, src), `${k}: bytes changed`);
      } else {
        assert.equal(t.dtype, dtype, `${k}: converted to ${dtypeName(dtype)}`);
        assert.ok(Buffer.from(readTensorBytes(t)).equals(Buffer.from(encodeFloats(readTensor(src) as ArrayLike<number>, dtype))), `${k}: not converted exactly`);
      }
    }
    // The fused convs: shape from the manifest geometry, dtype kept (or the one asked for).
    for (const b of fx.blocks!) {
      const [wk, bk] = blockDeployKeys(fx, b);
      const w = out.tensors.get(wk)!;
      const bias = out.tensors.get(bk)!;
      assert.deepEqual(w.shape, fusedWeightShape(b), `${wk}: shape`);
      assert.deepEqual(bias.shape, [b.out], `${bk}: shape`);
      assert.equal(w.dtype, dtype ?? fileDtype, `${wk}: dtype`);
      assert.equal(bias.dtype, dtype ?? fileDtype, `${bk}: dtype`);
      for (const k of b.removed_keys) assert.ok(!out.tensors.has(k.startsWith(fx.prefix) ? k.slice(fx.prefix.length) : k), `${k} must be gone`);
      for (const k of b.kept_keys) {
        const kk = k.startsWith(fx.prefix) ? k.slice(fx.prefix.length) : k;
        assert.ok(out.tensors.has(kk), `${k} must stay (QARepVGG keeps its post-add BN)`);
        if (dtype === undefined) assert.ok(sameBytes(out.tensors.get(kk)!, input.tensors.get(inKey(kk))!), `${k}: kept BN unchanged`);
      }
      const deployKeys = new Set(expectedStateDictKeys({ ...fx, blocks: [b], deploy_state_dict_keys: b.deploy_keys }));
      assert.ok([...deployKeys].every((k) => out.tensors.has(k)), `${b.name}: every manifest deploy key present`);
    }
    assert.ok(!keys.some((k) => /(^|\.)alpha$/.test(k)), 'PP-YOLOE alpha is folded and dropped');
  } finally {
    input.close();
    out.close();
  }
}

/** The module object at a dotted path under `root`, walking `_modules`. */
function moduleAt(root: PyValue | undefined, p: string): PyObject | undefined {
  let o: PyValue | undefined = root;
  for (const name of p.split('.').filter(Boolean)) {
    if (!(o instanceof PyObject) || !(o.state instanceof PyDict)) return undefined;
    const mods = o.state.get('_modules');
    if (!(mods instanceof PyDict)) return undefined;
    o = mods.get(name);
  }
  return o instanceof PyObject ? o : undefined;
}

/** Every module path under `obj` ('' for itself), depth first, as state_dict() visits them. */
function modulePaths(obj: PyObject, prefix = ''): string[] {
  const out = [prefix];
  const mods = (obj.state as PyDict).get('_modules');
  if (mods instanceof PyDict) {
    for (const [k, v] of mods) if (v instanceof PyObject && v.state instanceof PyDict) out.push(...modulePaths(v, prefix ? `${prefix}.${k}` : String(k)));
  }
  return out;
}

/** A module's __dict__ without the listed keys, for structural comparison. */
function stateWithout(o: PyObject, drop: Iterable<string>): PyDict {
  const skip = new Set(drop);
  return PyDict.from([...(o.state as PyDict)].filter(([k]) => !(typeof k === 'string' && skip.has(k))), true);
}

/**
 * Differences between two module __dict__s, key by key (order is irrelevant to Python), ignoring
 * `drop`; an attribute that was None may be deleted (YOLOv7 deletes `rbr_identity`, Ultralytics `bn`).
 */
function attrDiffs(o: PyObject, n: PyObject, drop: Iterable<string>): string[] {
  const skip = new Set(drop);
  const os = o.state as PyDict;
  const ns = n.state as PyDict;
  const keys = new Set<PyValue>([...os.keys(), ...ns.keys()]);
  const out: string[] = [];
  for (const k of keys) {
    if (typeof k === 'string' && skip.has(k)) continue;
    const a = os.get(k);
    const b = ns.get(k);
    if (a === null && (b === undefined || b === null)) continue;
    if (a === undefined || b === undefined) out.push(`'${String(k)}' ${a === undefined ? 'added' : 'removed'}`);
    else {
      const d = pyDiff(a, b);
      if (d) out.push(`'${String(k)}': ${d}`);
    }
  }
  return out;
}

/** Checks a rewritten full-module checkpoint: same entries, blocks in deploy form, everything else intact. */
function checkDeployCheckpoint(fx: ManifestFile, output: string, dtype?: DType): void {
  const orig = openTorch(fixturePath(fx));
  const out = openTorch(output);
  try {
    assert.deepEqual(out.dangerousGlobals, []);
    const oroot = orig.root as PyDict;
    const nroot = out.root as PyDict;
    assert.ok(nroot instanceof PyDict, 'a checkpoint dict');
    assert.deepEqual(nroot.keys(), oroot.keys(), 'the same entries, in order');
    for (const k of oroot.keys()) {
      if (k === fx.entry) continue;
      assert.equal(pyDiff(oroot.get(k), nroot.get(k)), undefined, `entry '${String(k)}' changed`);
    }
    const om = oroot.get(fx.entry!) as PyObject;
    const nm = nroot.get(fx.entry!) as PyObject;
    assert.ok(nm instanceof PyObject, `'${fx.entry}' is still a module`);
    assert.equal(nm.className, om.className);
    // The tensors the deploy model's state_dict has, under the entry.
    const nt = openTensors(output);
    try {
      assert.deepEqual([...nt.tensors.keys()], fx.deploy_state_dict_keys.map((k) => `${fx.entry}.${k}`));
    } finally {
      nt.close();
    }
    const blocks = new Map(fx.blocks!.map((b) => [b.name, b]));
    const owner = (p: string) => fx.blocks!.find((b) => p.startsWith(`${b.name}.`));
    const fileDtype = FLOAT[fx.dtype!];
    for (const p of modulePaths(om)) {
      const o = moduleAt(om, p)!;
      const b = blocks.get(p);
      const ob = owner(p);
      if (ob) {
        // Inside a block: training branches are gone (the deploy conv may reuse a branch's name,
        // e.g. Ultralytics RepVGGDW's 'conv', and is checked with the block); kept children
        // (act, …) are compared through the block.
        const child = p.slice(ob.name.length + 1).split('.')[0];
        if (ob.removed_children.includes(child) && p !== `${ob.name}.${ob.deploy_name}`) assert.equal(moduleAt(nm, p), undefined, `${p}: a training branch must be gone`);
        continue;
      }
      const n = moduleAt(nm, p);
      assert.ok(n, `${p || '(root)'}: module missing in the output`);
      assert.equal(n.className, o.className, `${p}: class`);
      if (!b) {
        // Not a block: its whole state (attributes, parameters, buffers) is unchanged; children are compared on their own.
        assert.equal(pyDiff(stateWithout(o, ['_modules']), stateWithout(n, ['_modules'])), undefined, `${p || '(root)'}: state changed`);
        continue;
      }
      // A block: the family's deploy form.
      const st = n.state as PyDict;
      const mods = st.get('_modules') as PyDict;
      for (const c of b.removed_children.filter((x) => x !== b.deploy_name)) {
        assert.ok(!mods.has(c), `${p}: '${c}' must be removed`);
        const v = st.get(c);
        assert.ok(v === undefined || v === null, `${p}: attribute '${c}' must be gone or None`);
      }
      for (const [k, v] of Object.entries(b.deploy_flag ?? {})) assert.equal(st.get(k), v as PyValue, `${p}: ${k}`);
      const conv = mods.get(b.deploy_name);
      assert.ok(conv instanceof PyObject, `${p}: deploy conv '${b.deploy_name}' missing`);
      assert.equal(conv.className, 'torch.nn.modules.conv.Conv2d', `${p}.${b.deploy_name}: class`);
      const cst = conv.state as PyDict;
      const params = cst.get('_parameters') as PyDict;
      const w = params.get('weight') as TorchTensor;
      const bias = params.get('bias') as TorchTensor;
      assert.ok(w && bias, `${p}.${b.deploy_name}: weight and bias`);
      assert.deepEqual(w.shape, fusedWeightShape(b));
      assert.deepEqual(bias.shape, [b.out]);
      assert.equal(w.dtype, dtype ?? fileDtype, `${p}: fused weight dtype`);
      assert.ok(w.isParameter && bias.isParameter, `${p}: fused weight and bias are nn.Parameters`);
      const tup = (v: PyValue | undefined) => (v instanceof PyTuple ? v.items.map((x) => pyNumber(x)) : [pyNumber(v)]);
      assert.deepEqual(tup(cst.get('kernel_size')), b.kernel, `${p}: kernel_size`);
      assert.deepEqual(tup(cst.get('stride')), [b.stride, b.stride], `${p}: stride`);
      assert.deepEqual(tup(cst.get('padding')), b.padding, `${p}: padding`);
      assert.equal(pyNumber(cst.get('groups')), b.groups, `${p}: groups`);
      assert.equal(pyNumber(cst.get('in_channels')), b.in, `${p}: in_channels`);
      assert.equal(pyNumber(cst.get('out_channels')), b.out, `${p}: out_channels`);
      // Everything else in the block object is untouched.
      // The official conversions bind methods on the instance (Ultralytics: forward = forward_fuse).
      const bound = familyOf(b).deploy.bindMethods ?? {};
      for (const [k, m] of Object.entries(bound)) {
        const bm = st.get(k);
        assert.ok(bm instanceof PyBoundMethod && bm.self === n && bm.name === m, `${p}: ${k} bound to ${m}`);
      }
      const drop = ['_modules', b.deploy_name, ...b.removed_children, ...Object.keys(b.deploy_flag ?? {}), ...Object.keys(bound)];
      assert.deepEqual(attrDiffs(o, n, drop), [], `${p}: other block attributes changed`);
      for (const [k, v] of (o.state as PyDict).get('_modules') as PyDict) {
        if (typeof k === 'string' && !b.removed_children.includes(k)) assert.equal(pyDiff(v, mods.get(k)), undefined, `${p}.${k} changed`);
      }
    }
    // Reading the output back: no blocks left to fuse, nothing rejected.
    const again = analyzeCheckpoint(output);
    try {
      assert.deepEqual(again.report.blocks, [], 'the rewritten checkpoint has no unfused blocks');
      assert.deepEqual(again.report.rejected, []);
    } finally {
      again.close();
    }
  } finally {
    orig.close();
    out.close();
  }
}

describe('fuse: every fixture file', { concurrency: 2, skip: haveTorchFixtures ? false : 'test/fixtures/torch/manifest.json missing' }, () => {
  for (const fx of fixtures) {
    test(`${fx.file} (${fx.family}, ${fx.form}, ${fx.dtype}) → ${isFullModule(fx) ? 'checkpoint in deploy form' : fx.format === 'safetensors' ? '.safetensors' : 'state_dict .pt'}`, async () => {
      const input = fixturePath(fx);
      const hash = sha256(input);
      assert.equal(hash, fx.sha256, 'the fixture is the one the manifest describes');
      const dir = freshDir();
      const output = fusedName(fx, dir);
      // The manifest describes the blocks' deploy layout; the whole-model Conv+BN folds that are on by
      // default for YOLO module objects and RepViT are checked against the official code in
      // deploy-official.test.ts.
      const r = await fuseWith(input, { output, checkpointFoldBN: false });
      assert.equal(sha256(input), hash, 'the input is unchanged');
      assert.deepEqual(fs.readdirSync(dir), [path.basename(output)], 'only the output in the folder: no temp files');
      // The report.
      assert.equal(r.output, path.resolve(output));
      assert.equal(r.bytesWritten, fs.statSync(output).size);
      assert.equal(r.format, fx.format === 'safetensors' ? 'safetensors' : 'pytorch');
      assert.equal(r.blocksFused, fx.blocks!.length);
      assert.equal(r.bnFolded, 0);
      const notes = r.inspect.model.notes.join('\n');
      if (isFullModule(fx)) assert.match(notes, new RegExp(`wrote checkpoint with '${fx.entry}' in deploy form`));
      else assert.match(notes, /wrote (state_dict|safetensors), \d+ tensors/);
      if (fx.prefix) assert.match(notes, /'module\.' prefix.*stripped/);
      // Validation: block by block, no whole-network outputs.
      const v = r.validation;
      assert.ok(v, `validation ran (${r.validationSkipped})`);
      assert.equal(v.passed, true, JSON.stringify(v.blocks.map((d) => [d.block, d.maxAbsDiff, d.tolerance])));
      assert.deepEqual(v.outputs, [], 'a checkpoint has no graph: no whole-network outputs are invented');
      assert.deepEqual(
        v.blocks.map((d) => d.block),
        fx.blocks!.map((b) => b.name),
      );
      for (const d of v.blocks) {
        assert.equal(d.nonFinite, 0);
        // fp32: exact fusion, only float32 summation order differs. fp16: each fused weight is rounded once to half.
        const limit = fx.dtype === 'float16' ? 2e-3 * Math.max(1, d.maxAbsRef) : 1e-5;
        assert.ok(d.maxAbsDiff <= limit, `${d.block}: max |Δ| ${d.maxAbsDiff} > ${limit}`);
      }
      if (fx.dtype === 'float16') assert.match(notes, /stored as float16.*rtol/);
      // The file.
      if (isFullModule(fx)) checkDeployCheckpoint(fx, output);
      else checkFusedStateDict(fx, output);
    });
  }
});

// ---------------------------------------------------------------------------------------------
describe('fuse: options and output forms', { skip: haveTorchFixtures ? false : 'test/fixtures/torch/manifest.json missing' }, () => {
  test('dtype float32 on an fp16 state_dict: every float tensor float32, converted exactly; blocks validate to 1e-5', async () => {
    const fx = byName('yolov7_sd_fp16.pt');
    const out = path.join(freshDir(), 'f32.pt');
    const r = await fuseWith(fixturePath(fx), { output: out, dtype: DType.float32 });
    assert.equal(r.validation?.passed, true);
    for (const d of r.validation!.blocks) assert.ok(d.maxAbsDiff <= 1e-5, `${d.block}: ${d.maxAbsDiff}`);
    checkFusedStateDict(fx, out, DType.float32);
  });

  test('dtype float16 on an fp32 state_dict (and safetensors): every float tensor float16, int64 kept', async () => {
    for (const name of ['mobileone_sd.pt', 'repvgg_sd.safetensors']) {
      const fx = byName(name);
      const out = fusedName(fx, freshDir());
      const r = await fuseWith(fixturePath(fx), { output: out, dtype: DType.float16 });
      assert.equal(r.validation?.passed, true, name);
      assert.match(r.inspect.model.notes.join('\n'), /stored as float16/);
      checkFusedStateDict(fx, out, DType.float16);
    }
  });

  test('full-module checkpoints: keep-modules is the default; state_dict and safetensors on request', async () => {
    const fx = byName('yolov7_full.pt');
    // keepModules: false → a bare state_dict of the deploy model (no 'model.' prefix), dtype kept.
    const sdOut = path.join(freshDir(), 'sd.pt');
    const r1 = await fuseWith(fixturePath(fx), { output: sdOut, keepModules: false, validate: false });
    assert.match(r1.inspect.model.notes.join('\n'), /wrote state_dict, 14 tensors/);
    checkFusedStateDict(fx, sdOut);
    // .safetensors output: a state_dict without being asked.
    const stOut = path.join(freshDir(), 'sd.safetensors');
    const r2 = await fuseWith(fixturePath(fx), { output: stOut, validate: false });
    assert.match(r2.inspect.model.notes.join('\n'), /wrote safetensors, 14 tensors/);
    checkFusedStateDict(fx, stOut);
    // keepModules with a .safetensors output is an error, and writes nothing.
    const dir = freshDir();
    await rejectsRepFuse(() => fuseWith(fixturePath(fx), { output: path.join(dir, 'x.safetensors'), keepModules: true }), /--keep-modules writes a \.pt/);
    assert.deepEqual(fs.readdirSync(dir), []);
  });

  test('keep-modules on a state_dict: a clear error, nothing written', async () => {
    for (const name of ['repvgg_sd.pt', 'mobileone_module_prefix.pth', 'repvgg_legacy.pt']) {
      const dir = freshDir();
      await rejectsRepFuse(() => fuseWith(fixturePath(name), { output: path.join(dir, 'x.pt'), keepModules: true }), /--keep-modules needs a checkpoint that holds module objects .*state_dict/);
      assert.deepEqual(fs.readdirSync(dir), [], `${name}: nothing written`);
    }
  });

  test('a checkpoint holding both model and ema modules: both are switched to deploy form; EMA is inspected', async () => {
    // {'model': fp16 Model (yolov7_full.pt), 'ema': fp32 Model (yolov7_full_ema.pt), 'epoch': 7}, written by RepFuse.
    const a = openTorch(fixturePath('yolov7_full.pt'));
    const b = openTorch(fixturePath('yolov7_full_ema.pt'));
    const dir = freshDir();
    const both = path.join(dir, 'both.pt');
    try {
      const root = new PyDict(false);
      root.set('epoch', 7);
      root.set('model', (a.root as PyDict).get('model')!);
      root.set('ema', (b.root as PyDict).get('ema')!);
      await writeTorchZip(both, root, { archiveName: 'both' });
    } finally {
      a.close();
      b.close();
    }
    const ins = inspect(both, { foldBN: true });
    assert.match(ins.model.layout ?? '', /'ema' entry/);
    assert.match(ins.model.notes.join('\n'), /'ema' and 'model' hold modules; inspected: 'ema'|'model' and 'ema' hold modules; inspected: 'ema'/);
    const out = path.join(dir, 'both.fused.pt');
    // Blocks only (the manifest's deploy keys); the default Conv+BN fold is in deploy-official.test.ts.
    const r = await fuseWith(both, { output: out, checkpointFoldBN: false });
    assert.equal(r.validation?.passed, true);
    const t = openTensors(out);
    try {
      const keys = [...t.tensors.keys()];
      const deploy = byName('yolov7_full.pt').deploy_state_dict_keys;
      assert.deepEqual(keys.filter((k) => k.startsWith('model.')), deploy.map((k) => `model.${k}`));
      assert.deepEqual(keys.filter((k) => k.startsWith('ema.')), deploy.map((k) => `ema.${k}`));
      assert.equal(t.tensors.get('model.model.1.rbr_reparam.weight')!.dtype, DType.float16, 'model stays fp16');
      assert.equal(t.tensors.get('ema.model.1.rbr_reparam.weight')!.dtype, DType.float32, 'ema stays fp32');
    } finally {
      t.close();
    }
  });

  test('dtype on a full-module checkpoint does not leave a mixed-precision model', async () => {
    // yolov7_full.pt holds an fp16 Model. With dtype float32 (keep-modules, the default) RepFuse
    // must either convert every float tensor of the module (as it does for state_dicts) or refuse
    // the option — not write fp32 fused convs into an otherwise fp16 model, which PyTorch then
    // runs with mismatched input/weight types.
    const fx = byName('yolov7_full.pt');
    const out = path.join(freshDir(), 'f32.pt');
    let r: FuseReport | undefined;
    try {
      r = await fuseWith(fixturePath(fx), { output: out, dtype: DType.float32, validate: false });
    } catch (err) {
      assert.ok(err instanceof RepFuseError, String(err));
      return; // refusing is acceptable
    }
    assert.ok(r.output);
    const t = openTensors(out);
    try {
      const floats = [...t.tensors].filter(([, x]) => isFloatType(x.dtype));
      const kinds = [...new Set(floats.map(([, x]) => dtypeName(x.dtype)))];
      assert.deepEqual(kinds, ['float32'], `float dtypes in the rewritten model: ${floats.map(([k, x]) => `${k}:${dtypeName(x.dtype)}`).join(' ')}`);
    } finally {
      t.close();
    }
  });

  test('the report describes the files: paramsBefore / paramsAfter = elements of the input / written tensors', async () => {
    // Same contract as for ONNX (fuse.ts: report.paramsAfter === numel of the written model).
    const wrong: string[] = [];
    for (const name of ['repvgg_sd.pt', 'qarepvgg_sd.pt', 'ppyoloe_sd.pt', 'yolov7_full.pt', 'mobileone_sd.safetensors']) {
      const fx = byName(name);
      const out = fusedName(fx, freshDir());
      const r = await fuseWith(fixturePath(fx), { output: out, validate: false });
      const i = openTensors(fixturePath(fx));
      const o = openTensors(out);
      const numel = (m: Map<string, TorchTensor>) => [...m.values()].reduce((a, t) => a + t.numel, 0);
      if (r.paramsBefore !== numel(i.tensors)) wrong.push(`${name}: paramsBefore ${r.paramsBefore}, input has ${numel(i.tensors)}`);
      if (r.paramsAfter !== numel(o.tensors)) wrong.push(`${name}: paramsAfter ${r.paramsAfter}, output has ${numel(o.tensors)}`);
      i.close();
      o.close();
    }
    assert.deepEqual(wrong, []);
  });
});

// ---------------------------------------------------------------------------------------------
describe('output paths: never the input, never an existing file without force', { skip: haveTorchFixtures ? false : 'manifest missing' }, () => {
  test('-o the input itself is refused (also through another spelling of the path); the input is unchanged', async () => {
    const dir = freshDir();
    const input = path.join(dir, 'repvgg_sd.pt');
    fs.copyFileSync(fixturePath('repvgg_sd.pt'), input);
    const hash = sha256(input);
    for (const o of [input, path.join(dir, '.', 'sub', '..', 'repvgg_sd.pt')]) {
      fs.mkdirSync(path.join(dir, 'sub'), { recursive: true });
      await rejectsRepFuse(() => fuseWith(input, { output: o, force: true }), /overwrite the input/);
    }
    assert.equal(sha256(input), hash);
    assert.deepEqual(fs.readdirSync(dir).sort(), ['repvgg_sd.pt', 'sub']);
  });

  test('an existing output is refused without force and replaced with it; default output is <name>.fused.pt beside the input', async () => {
    const dir = freshDir();
    const input = path.join(dir, 'yolov7_sd.pt');
    fs.copyFileSync(fixturePath('yolov7_sd.pt'), input);
    const out = path.join(dir, 'yolov7_sd.fused.pt');
    fs.writeFileSync(out, 'precious');
    await rejectsRepFuse(() => fuseWith(input, { validate: false }), /already exists; use --force/);
    assert.equal(fs.readFileSync(out, 'utf8'), 'precious', 'the existing file is untouched');
    const r = await fuseWith(input, { validate: false, force: true });
    assert.equal(r.output, path.resolve(out));
    assert.notEqual(fs.readFileSync(out, 'latin1').slice(0, 2), 'pr');
    assert.deepEqual(fs.readdirSync(dir).sort(), ['yolov7_sd.fused.pt', 'yolov7_sd.pt'], 'no temp files');
  });

  test('an output folder that does not exist, and an output extension RepFuse cannot write, are errors that write nothing', async () => {
    const dir = freshDir();
    await rejectsRepFuse(() => fuseWith(fixturePath('repvgg_sd.pt'), { output: path.join(dir, 'nope', 'x.pt') }), /does not exist/);
    await rejectsRepFuse(() => fuseWith(fixturePath('repvgg_sd.pt'), { output: path.join(dir, 'x.onnx'), validate: false }), /cannot write '\.onnx'/);
    assert.deepEqual(fs.readdirSync(dir), []);
  });
});

// ---------------------------------------------------------------------------------------------
describe('hostile pickles: nothing runs, the danger is reported, no blocks', { skip: hostile.length ? false : 'no hostile fixtures' }, () => {
  for (const fx of hostile) {
    test(`${fx.file}: inspect and fuse (${fx.payload!.callable})`, async () => {
      fs.rmSync(MARKER, { force: true });
      const input = fixturePath(fx);
      const hash = sha256(input);
      const r = inspect(input, { foldBN: true });
      assert.deepEqual(r.blocks, []);
      assert.deepEqual(r.rejected, []);
      const notes = r.model.notes.join('\n');
      // What the global is (os.system, builtins.eval, subprocess.Popen), whatever name it was pickled under.
      const callable = fx.payload!.callable.split(' ')[0];
      assert.match(notes, /references .*: not executed/);
      assert.ok(notes.includes(callable), `notes name ${callable}: ${notes}`);
      const dir = freshDir();
      const f = await fuseWith(input, { output: path.join(dir, 'x.pt') });
      assert.equal(f.output, null);
      assert.equal(f.validationSkipped, 'nothing to fuse');
      assert.match(f.inspect.model.notes.join('\n'), /not executed/);
      assert.deepEqual(fs.readdirSync(dir), [], 'nothing written');
      // Also as a full-module candidate and with --eps: still inert.
      inspect(input, { foldBN: true, eps: 1e-3 });
      assert.equal(sha256(input), hash);
      assert.equal(fs.existsSync(MARKER), false, `${fx.file} ran its payload: ${MARKER} exists`);
    });
  }
});

describe('a full-module checkpoint that also carries a dangerous global', { skip: hostile.length ? false : 'no hostile fixtures' }, () => {
  test('keep-modules refuses to pickle it again (nothing written, nothing run); a state_dict output is fine', async () => {
    fs.rmSync(MARKER, { force: true });
    const a = openTorch(fixturePath('yolov7_full.pt'));
    const h = openTorch(fixturePath('hostile_reduce.pt'));
    const dir = freshDir();
    const input = path.join(dir, 'evil_full.pt');
    try {
      const root = a.root as PyDict;
      root.set('evil', (h.root as PyDict).get('_extra_state')!);
      await writeTorchZip(input, root, { archiveName: 'evil_full', allowDangerousGlobals: true });
    } finally {
      a.close();
      h.close();
    }
    const r = inspect(input, { foldBN: true });
    assert.equal(r.blocks.length, 3, 'the model is still found');
    assert.match(r.model.notes.join('\n'), /os\.system .*not executed/);
    await rejectsRepFuse(() => fuseWith(input, { output: path.join(dir, 'out.pt') }), /posix\.system/);
    assert.deepEqual(fs.readdirSync(dir), ['evil_full.pt'], 'nothing written, no temp file');
    const sd = await fuseWith(input, { output: path.join(dir, 'sd.pt'), keepModules: false });
    assert.equal(sd.validation?.passed, true);
    const written = openTorch(sd.output!);
    assert.deepEqual(written.dangerousGlobals, [], 'the state_dict carries no dangerous global');
    written.close();
    assert.equal(fs.existsSync(MARKER), false);
  });
});

// ---------------------------------------------------------------------------------------------
describe('corrupt files: one-line errors that name the file', { skip: haveTorchFixtures ? false : 'manifest missing' }, () => {
  /** name → bytes of a broken checkpoint. */
  const broken = (): [string, Uint8Array][] => {
    const zip = fs.readFileSync(fixturePath('repvgg_sd.pt'));
    const legacy = fs.readFileSync(fixturePath('repvgg_legacy.pt'));
    const full = fs.readFileSync(fixturePath('yolov7_full.pt'));
    const st = fs.readFileSync(fixturePath('repvgg_sd.safetensors'));
    let s = 12345;
    const rnd = () => ((s = (Math.imul(s, 1103515245) + 12345) >>> 0) >>> 16) & 0xff;
    const random = Uint8Array.from({ length: 8192 }, rnd);
    random[0] = 0x13; // not a pickle PROTO, not "PK"
    const randomPickle = Uint8Array.from({ length: 8192 }, rnd);
    randomPickle[0] = 0x80;
    randomPickle[1] = 0x02; // looks like a pickle, then garbage
    return [
      ['truncated_zip_half.pt', zip.subarray(0, zip.length >> 1)],
      ['truncated_zip_end.pt', zip.subarray(0, zip.length - 1)],
      ['truncated_zip_head.pt', zip.subarray(0, 100)],
      ['truncated_full.pt', full.subarray(0, Math.floor(full.length * 0.9))],
      ['truncated_legacy.pt', legacy.subarray(0, legacy.length - 100)],
      ['truncated_legacy_pickle.pt', legacy.subarray(0, 300)],
      ['truncated.safetensors', st.subarray(0, st.length - 8)],
      ['random.pt', random],
      ['random_pickle.pth', randomPickle],
      ['empty.pt', new Uint8Array(0)],
    ];
  };

  test('inspect and fuse throw a FormatError naming the file; fuse writes nothing', async () => {
    const dir = freshDir();
    const outDir = freshDir();
    for (const [name, bytes] of broken()) {
      const file = path.join(dir, name);
      fs.writeFileSync(file, bytes);
      const e1 = await rejectsRepFuse(() => inspect(file, { foldBN: true }), /: /, FormatError);
      assert.equal(e1.file, file, name);
      assert.ok(oneLineError(e1).startsWith(`${file}: `), `${name}: ${oneLineError(e1)}`);
      const e2 = await rejectsRepFuse(() => fuseWith(file, { output: path.join(outDir, `${name}.out${path.extname(name)}`) }), /: /, FormatError);
      assert.ok(oneLineError(e2).startsWith(`${file}: `), `${name}: ${oneLineError(e2)}`);
    }
    assert.deepEqual(fs.readdirSync(outDir), []);
  });

  test('the CLI: exit 2, one line on stderr naming the file, no stack trace', async () => {
    const dir = freshDir();
    const cases = broken().filter(([n]) => ['truncated_zip_half.pt', 'truncated_legacy.pt', 'random.pt', 'truncated.safetensors'].includes(n));
    for (const [name, bytes] of cases) {
      const file = path.join(dir, name);
      fs.writeFileSync(file, bytes);
      cliUsageError(await cli('inspect', file), file);
      cliUsageError(await cli('fuse', file, '-o', path.join(dir, `o-${name}`)), file);
    }
    assert.deepEqual(fs.readdirSync(dir).sort(), cases.map(([n]) => n).sort(), 'nothing written');
  });
});

// ---------------------------------------------------------------------------------------------
describe('convs in series are not blocks', () => {
  type Spec = [key: string, shape: number[]];
  /** Conv + BN entries as torch.save(state_dict) would hold them. */
  const convBN = (p: string, cout: number, cin: number, k: number, conv = 'conv', bn = 'bn'): Spec[] => [
    [`${p}.${conv}.weight`, [cout, cin, k, k]],
    [`${p}.${bn}.weight`, [cout]],
    [`${p}.${bn}.bias`, [cout]],
    [`${p}.${bn}.running_mean`, [cout]],
    [`${p}.${bn}.running_var`, [cout]],
    [`${p}.${bn}.num_batches_tracked`, []],
  ];
  const rawBN = (p: string, c: number): Spec[] => convBN(p, c, 1, 1).slice(1).map(([k, s]) => [k.replace(/\.bn\./, '.'), s]);

  async function writeStateDict(file: string, specs: Spec[]): Promise<void> {
    const sd = new PyDict(true);
    let seed = 1;
    for (const [k, shape] of specs) {
      const n = shape.reduce((a, b) => a * b, 1);
      if (k.endsWith('num_batches_tracked')) {
        sd.set(k, new NewTensor(DType.int64, shape, () => new Uint8Array(8)));
        continue;
      }
      const s0 = seed++;
      sd.set(
        k,
        new NewTensor(DType.float32, shape, () => {
          const v = new Float32Array(n);
          let x = s0;
          for (let i = 0; i < n; i++) {
            x = (Math.imul(x, 1103515245) + 12345) >>> 0;
            v[i] = k.endsWith('running_var') ? 0.5 + (x >>> 8) / 2 ** 24 : ((x >>> 8) / 2 ** 24 - 0.5) * 0.2;
          }
          return new Uint8Array(v.buffer);
        }),
      );
    }
    await writeTorchZip(file, sd, { archiveName: path.basename(file, '.pt') });
  }

  const series: [string, Spec[]][] = [
    // YOLOX / CSPDarknet Bottleneck: BaseConv 1×1 (in → hidden), then BaseConv 3×3 (hidden → out).
    ['yolox_bottleneck', [...convBN('backbone.dark2.1.m.0.conv1', 32, 64, 1), ...convBN('backbone.dark2.1.m.0.conv2', 64, 32, 3)]],
    // The same with equal widths (expansion 1.0): 1×1 then 3×3, 64 → 64 → 64.
    ['csp_bottleneck_equal', [...convBN('backbone.dark3.1.m.0.conv1', 64, 64, 1), ...convBN('backbone.dark3.1.m.0.conv2', 64, 64, 3)]],
    // A 3×3 that widens then a 1×1 that narrows (in series: conv2 reads conv1's 128 channels).
    ['widen_narrow', [...convBN('neck.0.conv1', 128, 64, 3), ...convBN('neck.0.conv2', 64, 128, 1)]],
    // YOLOX SPPBottleneck: 1×1 in → hidden, pools, 1×1 4·hidden → out.
    ['yolox_spp', [...convBN('backbone.dark5.1.conv1', 64, 128, 1), ...convBN('backbone.dark5.1.conv2', 128, 256, 1)]],
    // torchvision ResNet BasicBlock and Bottleneck: raw convs with bn1/bn2(/bn3) beside them.
    [
      'resnet_basic',
      [['layer1.0.conv1.weight', [64, 64, 3, 3]], ...rawBN('layer1.0.bn1', 64), ['layer1.0.conv2.weight', [64, 64, 3, 3]], ...rawBN('layer1.0.bn2', 64)],
    ],
    [
      'resnet_bottleneck',
      [
        ['layer1.0.conv1.weight', [64, 256, 1, 1]],
        ...rawBN('layer1.0.bn1', 64),
        ['layer1.0.conv2.weight', [64, 64, 3, 3]],
        ...rawBN('layer1.0.bn2', 64),
        ['layer1.0.conv3.weight', [256, 64, 1, 1]],
        ...rawBN('layer1.0.bn3', 256),
        ['layer1.0.downsample.0.weight', [256, 64, 1, 1]],
        ...rawBN('layer1.0.downsample.1', 256),
      ],
    ],
    // mmdet-style ConvModule names (conv1.conv / conv1.bn) in a ResNet bottleneck with different widths.
    ['convmodule_bottleneck', [...convBN('backbone.layer1.0.conv1', 64, 256, 1), ...convBN('backbone.layer1.0.conv2', 64, 64, 3), ...convBN('backbone.layer1.0.conv3', 256, 64, 1)]],
    // A `conv` then `conv1` in series (names RepVGGDW / RepViT use for parallel branches).
    ['conv_then_conv1', [...convBN('stage.0.conv', 64, 32, 3, 'c'), ...convBN('stage.0.conv1', 128, 64, 1)]],
  ];

  test('state_dicts written with writeTorchZip: no block detected, nothing to fuse', async () => {
    const dir = freshDir();
    const found: string[] = [];
    for (const [name, specs] of series) {
      const file = path.join(dir, `${name}.pt`);
      await writeStateDict(file, specs);
      const r = inspect(file, { foldBN: true });
      if (r.blocks.length) found.push(`${name}: ${r.blocks.map((b) => `${b.name} (${b.family}, ${b.branches.map((x) => x.parts.join('+')).join(' | ')})`).join('; ')}`);
      // Not even a candidate that was then rejected: plain convs in series are simply not rep blocks.
      if (r.rejected.length) found.push(`${name}: rejected candidates ${r.rejected.map((x) => `${x.name} (${x.reason})`).join('; ')}`);
      const f = await fuseWith(file, { output: path.join(dir, `${name}.fused.pt`) });
      assert.equal(f.blocksFused, r.blocks.length);
      if (!r.blocks.length) assert.equal(f.validationSkipped, 'nothing to fuse', name);
    }
    assert.deepEqual(found, [], 'convs in series taken for parallel branches');
    assert.deepEqual(fs.readdirSync(dir).filter((n) => n.includes('.fused.')), [], 'nothing written');
  });

  test('control: the same names in the parallel RepConv / RepVGGDW shapes are detected', async () => {
    const dir = freshDir();
    const file = path.join(dir, 'parallel.pt');
    await writeStateDict(file, [
      ...convBN('model.2', 64, 64, 3).map(([k, s]) => [k.replace('model.2.', 'model.2.conv1.'), s] as Spec),
      ...convBN('model.2', 64, 64, 1).map(([k, s]) => [k.replace('model.2.', 'model.2.conv2.'), s] as Spec),
      ...convBN('model.5', 32, 1, 7).map(([k, s]) => [k.replace('model.5.', 'model.5.conv.'), s] as Spec),
      ...convBN('model.5', 32, 1, 3).map(([k, s]) => [k.replace('model.5.', 'model.5.conv1.'), s] as Spec),
    ]);
    const r = inspect(file, { foldBN: true });
    assert.deepEqual(
      r.blocks.map((b) => [b.name, b.family]),
      [
        ['model.2', 'Ultralytics RepConv'],
        ['model.5', 'Ultralytics RepVGGDW'],
      ],
    );
    const f = await fuseWith(file, { output: path.join(dir, 'parallel.fused.pt') });
    assert.equal(f.validation?.passed, true);
  });
});

// ---------------------------------------------------------------------------------------------
describe('CLI on checkpoints', { concurrency: 2, skip: haveTorchFixtures ? false : 'manifest missing' }, () => {
  test('inspect --json: same report shape; --eps shows as override', async () => {
    const r = await cli('inspect', fixturePath('yolov7_sd.pt'), '--json', '--eps', '1e-4');
    assert.equal(r.code, 0, r.stderr);
    const j = JSON.parse(r.stdout) as InspectReport;
    assert.equal(j.blocks.length, 3);
    assert.ok(j.blocks.every((b) => b.branches.every((x) => !x.hasBN || (x.epsilon === 1e-4 && x.epsilonSource === 'override'))));
  });

  test('fuse --dtype float32 on an fp16 state_dict, --dtype float16 on an fp32 one', async () => {
    const dir = freshDir();
    for (const [name, dt, want] of [
      ['repvgg_sd_fp16.pt', 'float32', DType.float32],
      ['acnet_sd.pt', 'float16', DType.float16],
    ] as const) {
      const out = path.join(dir, `${name}.${dt}.pt`);
      const r = await cli('fuse', fixturePath(name), '-o', out, '--dtype', dt, '--json');
      assert.equal(r.code, 0, r.stderr);
      const j = JSON.parse(r.stdout) as FuseReport;
      assert.equal(j.validation?.passed, true);
      checkFusedStateDict(byName(name), out, want);
    }
  });

  test('fuse --keep-modules on a state_dict: exit 2 with a clear message; --state-dict on a full module: a state_dict', async () => {
    const dir = freshDir();
    cliUsageError(await cli('fuse', fixturePath('repvgg_sd.pt'), '-o', path.join(dir, 'x.pt'), '--keep-modules'), '--keep-modules', 'state_dict');
    assert.deepEqual(fs.readdirSync(dir), []);
    const out = path.join(dir, 'sd.pt');
    const r = await cli('fuse', fixturePath('ultralytics_full.pt'), '-o', out, '--state-dict', '--no-validate', '--json');
    assert.equal(r.code, 0, r.stderr);
    const t = openTensors(out);
    try {
      assert.deepEqual([...t.tensors.keys()], byName('ultralytics_full.pt').deploy_state_dict_keys);
    } finally {
      t.close();
    }
    cliUsageError(await cli('fuse', fixturePath('ultralytics_full.pt'), '-o', path.join(dir, 'y.pt'), '--state-dict', '--keep-modules'), 'exclude');
  });

  test('fuse on a full module writes a checkpoint by default; refuses to overwrite it without --force', async () => {
    const dir = freshDir();
    const out = path.join(dir, 'full.pt');
    // --no-fold-bn: the manifest describes the blocks only (the default fold is in deploy-official.test.ts).
    const r = await cli('fuse', fixturePath('ultralytics_full.pt'), '-o', out, '--json', '--no-fold-bn');
    assert.equal(r.code, 0, r.stderr);
    checkDeployCheckpoint(byName('ultralytics_full.pt'), out);
    cliUsageError(await cli('fuse', fixturePath('ultralytics_full.pt'), '-o', out), 'already exists');
    assert.deepEqual(fs.readdirSync(dir), ['full.pt']);
  });
});
