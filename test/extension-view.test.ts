// The extension's pure view models: tree items, the model editor's view, the fuse report view and
// notification, settings parsing, and the shared webview protocol helper.
import assert from 'node:assert/strict';
import * as path from 'node:path';
import { test } from 'node:test';
import type { BlockInfo, BranchInfo, InspectReport } from '../src/core/model';
import { inspectOnnxFile } from '../src/core/onnx';
import type { FuseReport, TensorDiff } from '../src/core/report';
import { defaultOutput } from '../src/engine';
import { answer, PendingRequests, type RequestMessage, type ResponseMessage } from '../src/extension/protocol';
import { branchLabel, epsilons, pct, strideText } from '../src/extension/view/format';
import { modelView } from '../src/extension/view/modelView';
import { fuseNotice, reportView, verdictOf } from '../src/extension/view/reportView';
import { fusedOutputPath, isModelFile, parseSettings, parseShapeText } from '../src/extension/view/settings';
import { blockDescription, blockItem, branchDescription, branchItem, CONTEXT, familyIcon, modelItem, rejectedGroupItem, rejectedItem } from '../src/extension/view/treeItems';
import { repoRoot } from './helpers/paths';

const yolo = (): InspectReport => inspectOnnxFile(path.join(repoRoot, 'examples', 'yolov7_repconv_tiny.onnx'), { foldBN: true });

const branch = (over: Partial<BranchInfo>): BranchInfo => ({ kind: 'conv_bn', kernel: [3, 3], hasBias: false, hasBN: true, epsilon: 1e-3, epsilonSource: 'model', params: 9344, parts: ['/m/conv/Conv'], ...over });
const block = (over: Partial<BlockInfo> = {}): BlockInfo => ({
  name: 'model.3',
  family: 'YOLOv7 RepConv',
  kernel: [3, 3],
  stride: [2, 2],
  groups: 1,
  inChannels: 32,
  outChannels: 64,
  branches: [branch({}), branch({ kernel: [1, 1], params: 2304 })],
  output: '/model.3/act/Mul_output_0',
  paramsBefore: 20_000,
  paramsAfter: 18_496,
  ...over,
});

// ----- format ----------------------------------------------------------------------------------

test('format helpers', () => {
  assert.equal(branchLabel(branch({})), '3×3 conv+bn');
  assert.equal(branchLabel(branch({ kind: 'bn_identity', kernel: undefined })), 'bn(x)');
  assert.equal(branchLabel(branch({ kind: 'conv', kernel: [1, 1], scaled: true })), '1×1 conv·α');
  assert.equal(strideText([2, 2]), '2');
  assert.equal(strideText([2, 1]), '2×1');
  assert.equal(pct(0.375), '37.5%');
  assert.equal(pct(0.0004), '0.04%');
  assert.equal(pct(0), '0%');
  assert.equal(epsilons(block({ branches: [branch({ epsilon: 1e-5, epsilonSource: 'assumed' })] })), '1.0e-5*');
});

// ----- tree items --------------------------------------------------------------------------------

test('block items: label is the name, description is family · k×k · Cin→Cout · stride', () => {
  const b = block();
  assert.equal(blockDescription(b), 'YOLOv7 RepConv · 3×3 · 32→64 · s2');
  const item = blockItem(b);
  assert.equal(item.label, 'model.3');
  assert.equal(item.contextValue, CONTEXT.block);
  assert.equal(item.collapsible, 'collapsed');
  assert.match(item.tooltip, /\| groups \| 1 \|/);
  assert.match(item.tooltip, /3×3 conv\+bn \+ 1×1 conv\+bn/);
  assert.deepEqual(item.icon, familyIcon('YOLOv7 RepConv'));
});

test('an assumed epsilon turns the block icon into a warning colour and says so', () => {
  const item = blockItem(block({ branches: [branch({ epsilonSource: 'assumed', epsilon: 1e-5 })] }));
  assert.equal(item.icon.color, 'list.warningForeground');
  assert.match(item.tooltip, /assumed/);
});

test('families get distinct icons; unknown families a default', () => {
  const ids = ['YOLOv7 RepConv', 'RepVGG', 'MobileOne', 'ACNet', 'PP-YOLOE RepVgg', 'QARepVGG'].map((f) => JSON.stringify(familyIcon(f)));
  assert.equal(new Set(ids).size, ids.length);
  assert.deepEqual(familyIcon('something new'), { id: 'layers' });
});

test('branch items: kind, kernel, BN epsilon, parameter count', () => {
  const it = branchItem(branch({}));
  assert.equal(it.label, '3×3 conv+bn');
  assert.equal(it.description, 'ε 0.001 · 9.3k params');
  assert.equal(it.contextValue, CONTEXT.branch);
  assert.equal(branchDescription(branch({ kind: 'conv', hasBN: false, hasBias: true, epsilon: undefined, params: 1056, dtype: 'float16' })), 'bias · float16 · 1.1k params');
  assert.equal(branchItem(branch({ kind: 'identity', kernel: undefined, hasBN: false, epsilon: undefined, params: 0, parts: [] })).icon.id, 'arrow-right');
});

test('model item: loading, error and ready states', () => {
  const loading = modelItem({ status: 'loading', path: '/m/a.onnx' });
  assert.equal(loading.label, 'a.onnx');
  assert.equal(loading.icon.id, 'loading~spin');
  assert.equal(loading.contextValue, CONTEXT.modelLoading);
  const err = modelItem({ status: 'error', path: '/m/a.pt', message: "unsupported file type '.pt'" });
  assert.equal(err.icon.id, 'error');
  assert.equal(err.contextValue, CONTEXT.modelError);
  assert.match(err.description!, /unsupported/);
  // The tree's label already names the file: the description drops the path prefix.
  const named = modelItem({ status: 'error', path: '/m/w.pt', message: '/m/w.pt: not a PyTorch file: neither a zip archive nor a pickle.' });
  assert.equal(named.description, 'not a PyTorch file: neither a zip archive nor a pickle.');
  assert.match(named.tooltip, /not a PyTorch file/);
  const ready = modelItem({ status: 'ready', path: '/m/yolo.onnx', report: yolo() });
  assert.equal(ready.description, '4 blocks');
  assert.equal(ready.contextValue, CONTEXT.model);
  assert.equal(ready.collapsible, 'expanded');
  assert.match(ready.tooltip, /4 re-parameterizable blocks/);
});

test('rejected candidates', () => {
  assert.equal(rejectedGroupItem(2).description, '2 rejected candidates');
  const r = rejectedItem({ name: 'x', reason: 'dilation 2 is not supported', parts: ['/a/Conv'] });
  assert.equal(r.description, 'dilation 2 is not supported');
  assert.equal(r.contextValue, CONTEXT.rejected);
});

// ----- model editor view -----------------------------------------------------------------------

test('modelView of the YOLOv7 example: facts, blocks, ops before/after', () => {
  const r = yolo();
  const v = modelView(r);
  assert.equal(v.fileName, 'yolov7_repconv_tiny.onnx');
  assert.equal(v.formatLabel, 'ONNX');
  assert.equal(v.headline.split(' · ')[0], '4 re-parameterizable blocks');
  const facts = Object.fromEntries(v.facts.map((f) => [f.label, f.value]));
  assert.equal(facts.Format, 'ONNX');
  assert.match(facts['Opsets'], /ai\.onnx 13/);
  assert.equal(facts['IR version'], '7');
  assert.deepEqual(
    v.blocks.map((b) => b.name),
    ['model.2', 'model.3', 'model.4', 'model.5'],
  );
  const b2 = v.blocks[0];
  assert.equal(b2.family, 'YOLOv7 RepConv');
  assert.equal(b2.kernel, '3×3');
  assert.equal(b2.channels, '32→32');
  assert.deepEqual(b2.branchKinds, ['3×3 conv', '1×1 conv', 'bn(x)']);
  assert.equal(v.blocks[1].stride, '2');
  // Fusion removes Adds (and BNs) and never adds ops.
  const add = v.ops.find((o) => o.op === 'Add')!;
  assert.ok(add.after < add.before);
  assert.match(add.delta, /^−\d+$/);
  assert.ok(v.ops.every((o) => o.after <= o.before));
  assert.equal(v.opsTotal!.before, r.model.nodeCount);
  assert.equal(v.opsTotal!.after, r.nodeCountAfter);
});

test('modelView of a model without blocks', () => {
  const r = yolo();
  const v = modelView({ ...r, blocks: [], folds: [], rejected: [] });
  assert.equal(v.headline, 'No re-parameterizable blocks found');
  assert.deepEqual(v.blocks, []);
});

// ----- fuse report ---------------------------------------------------------------------------

const diff = (name: string, maxAbsDiff: number, passed: boolean): TensorDiff => ({
  name,
  shape: [1, 64, 8, 8],
  maxAbsDiff,
  maxRelDiff: maxAbsDiff / 0.6,
  meanAbsDiff: maxAbsDiff / 10,
  worstIndex: [0, 7, 3, 3],
  maxAbsRef: 0.634,
  tolerance: 7.3e-4,
  passed,
  nonFinite: 0,
});

function fuseReport(passed: boolean | null): FuseReport {
  const r = yolo();
  return {
    input: '/w/yolo.onnx',
    format: 'onnx',
    output: '/w/yolo.fused.onnx',
    bytesWritten: 400_000,
    blocksFused: 27,
    bnFolded: 0,
    nodesBefore: 100,
    nodesAfter: 80,
    paramsBefore: 120_000,
    paramsAfter: 110_000,
    inspect: r,
    validation:
      passed === null
        ? null
        : {
            passed,
            atol: 1e-4,
            rtol: 1e-3,
            seed: 0,
            runtime: 'onnxruntime-node 1.30.0 (CPU)',
            inputs: [{ name: 'images', shape: [1, 3, 64, 64], dtype: 'float32', source: 'random' }],
            outputs: [diff('output', passed ? 2.1e-6 : 3e-3, passed)],
            blocks: [{ ...diff('model.2', 1e-6, true), block: 'model.2' }],
            durationMs: 1234,
          },
    validationSkipped: passed === null ? '--no-validate' : undefined,
    timingsMs: { analyze: 12, write: 30, validate: 1234 },
  };
}

test('a passing fuse: "Fused 27 blocks · max |Δ| 2.1e-6 · passed", with both actions', () => {
  const n = fuseNotice(fuseReport(true));
  assert.equal(n.severity, 'info');
  assert.equal(n.message, 'Fused 27 blocks · max |Δ| 2.1e-6 · passed');
  assert.deepEqual(n.actions, ['Open Fused Model', 'Show Report']);
});

test('over tolerance is a warning naming the outputs, never a silent pass', () => {
  const r = fuseReport(false);
  assert.equal(verdictOf(r), 'failed');
  const n = fuseNotice(r);
  assert.equal(n.severity, 'warning');
  assert.match(n.message, /OVER TOLERANCE/);
  assert.match(n.message, /output output differs by more/);
});

test('not validated and nothing to fuse', () => {
  const r = fuseReport(null);
  assert.equal(verdictOf(r), 'unvalidated');
  assert.match(fuseNotice(r).message, /not validated \(--no-validate\)/);
  const none = { ...r, output: null };
  assert.equal(verdictOf(none), 'nothing');
  assert.deepEqual(fuseNotice(none).actions, ['Show Report']);
});

test('reportView: per output and per block rows as the CLI prints them', () => {
  const v = reportView(fuseReport(true));
  assert.equal(v.outputName, 'yolo.fused.onnx');
  assert.equal(v.verdict, 'passed');
  assert.equal(v.validation!.outputs[0].maxAbs, '2.1e-6');
  assert.equal(v.validation!.outputs[0].worstAt, '[0,7,3,3]');
  assert.equal(v.validation!.outputs[0].shape, '1×64×8×8');
  assert.equal(v.validation!.blocks[0].name, 'model.2');
  assert.equal(v.validation!.duration, '1.23 s');
  assert.deepEqual(v.facts.find((f) => f.label === 'Nodes'), { label: 'Nodes', value: '100 → 80' });
  // The view is what the panel keeps with setState: it must survive JSON.
  assert.deepEqual(JSON.parse(JSON.stringify(v)), v);
});

// ----- settings --------------------------------------------------------------------------------

test('settings: defaults', () => {
  const { settings, problems } = parseSettings({});
  assert.deepEqual(problems, []);
  assert.equal(settings.validate, true);
  assert.equal(settings.atol, 1e-4);
  assert.equal(settings.rtol, 1e-3);
  assert.equal(settings.timeoutMs, 300_000);
  assert.equal(settings.fusedSuffix, '.fused');
  assert.deepEqual(settings.inspect, { foldBN: true, checkpoint: { defaultEpsilon: 'auto', outputDtype: 'keep', foldBN: 'auto' } });
  assert.equal(settings.dropAux, false);
});

test('settings: values and input shapes', () => {
  const { settings, problems } = parseSettings({
    validationEnabled: false,
    atol: 1e-5,
    rtol: 0,
    inputShapes: { images: '1x3x640x640', mask: '2, 1, 8' },
    timeoutSeconds: 30,
    fusedSuffix: '-rep',
    foldStandaloneBatchNorm: false,
    defaultEpsilon: 1e-5,
    outputDtype: 'float16',
    checkpointFoldBN: 'off',
  });
  assert.deepEqual(problems, []);
  assert.equal(settings.validate, false);
  assert.deepEqual(settings.inputShapes, { images: [1, 3, 640, 640], mask: [2, 1, 8] });
  assert.equal(settings.timeoutMs, 30_000);
  assert.equal(settings.fusedSuffix, '-rep');
  assert.deepEqual(settings.inspect, { foldBN: false, checkpoint: { defaultEpsilon: 1e-5, outputDtype: 'float16', foldBN: 'off' } });
});

test('settings: invalid values fall back to defaults with a sentence each', () => {
  const { settings, problems } = parseSettings({ atol: -1, inputShapes: { images: '1x3xHxW' }, fusedSuffix: '../x', defaultEpsilon: 'big', outputDtype: 'int8' });
  assert.equal(settings.atol, 1e-4);
  assert.equal(settings.fusedSuffix, '.fused');
  assert.deepEqual(settings.inputShapes, {});
  assert.equal(problems.length, 5);
  assert.ok(problems.every((p) => p.startsWith('repfuse.')));
  assert.match(problems.join('\n'), /images/);
});

test('shapes, model files, output paths', () => {
  assert.deepEqual(parseShapeText('1×3×224×224'), [1, 3, 224, 224]);
  assert.equal(parseShapeText('0x3'), null);
  assert.equal(parseShapeText(''), null);
  assert.ok(isModelFile('/a/b.ONNX'));
  assert.ok(isModelFile('w.safetensors'));
  assert.ok(!isModelFile('w.json'));
  for (const f of ['/m/yolo.onnx', '/m/model.v2.pt', '/m/noext']) {
    assert.equal(fusedOutputPath(f, '.fused'), defaultOutput(f, '.fused'), 'same rule as the engine');
  }
  assert.equal(fusedOutputPath('/m/model.v2.pt', '.fused'), '/m/model.v2.fused.pt');
});

// ----- protocol --------------------------------------------------------------------------------

test('protocol: requests are answered by id, errors become one line', async () => {
  const sent: RequestMessage[] = [];
  const pending = new PendingRequests((m) => sent.push(m));
  const a = pending.request('blockStats', { block: 'model.2' });
  const b = pending.request('blockStats', { block: 'nope' });
  assert.equal(sent.length, 2);
  assert.notEqual(sent[0].id, sent[1].id);
  const ok = await answer(sent[0], async (p) => ({ block: { name: p.block } }) as never);
  const bad: ResponseMessage = await answer(sent[1], () => {
    throw new Error("no block named 'nope'.\nsecond line");
  });
  // Answer out of order: ids match them up.
  assert.equal(pending.settle(bad), true);
  assert.equal(pending.settle(ok), true);
  assert.equal(pending.settle(ok), false, 'a response settles once');
  assert.deepEqual(await a, { block: { name: 'model.2' } });
  await assert.rejects(b, /no block named 'nope'\. second line/);
  assert.equal(pending.size, 0);
  const c = pending.request('blockStats', { block: 'x' });
  pending.rejectAll('panel closed');
  await assert.rejects(c, /panel closed/);
});
