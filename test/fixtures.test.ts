// The real PyTorch exports in test/fixtures/onnx, driven by manifest.json: detection finds exactly
// the manifest's blocks, fusion validates, and the fused model reproduces PyTorch's output.
import * as assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { DType } from '../src/core/dtype';
import { readNpy } from '../src/core/npy';
import { inspect } from '../src/engine';
import { fuseAndValidate } from './helpers/fuse';
import { maxAbsDiff, ort, runOrt } from './helpers/ort';
import { fixturesDir, makeTmp, rmTmp } from './helpers/paths';

interface ManifestBlock {
  name: string;
  type: string;
  branches: number;
  kernel: number[];
  stride: number;
  groups: number;
  in: number;
  out: number;
  identity: null | 'bn' | 'plain';
  post_bn: boolean;
  alpha: number | null;
  eps: number;
}
interface ManifestEntry {
  file: string;
  family: string;
  mode: 'folded' | 'nofold' | 'bn';
  input: string;
  output: string;
  input_shape: number[];
  output_shape: number[];
  blocks: ManifestBlock[];
  graph: { batchnorm_nodes: number; op_counts: Record<string, number>; graph_outputs: string[] };
}

/** The family RepFuse should name for each PyTorch module type. */
const FAMILY: Record<string, string> = {
  RepVGGBlock: 'RepVGG',
  RepConv: 'YOLOv7 RepConv',
  MobileOneBlock: 'MobileOne',
  UltralyticsRepConv: 'Ultralytics RepConv',
  UltralyticsRepVGGDW: 'Ultralytics RepVGGDW',
  ACBlock: 'ACNet',
  QARepVGGBlock: 'QARepVGG',
  RepViTRepVGGDW: 'RepViT RepVGGDW',
  RepVggBlock: 'PP-YOLOE RepVgg',
};

const manifest: ManifestEntry[] = JSON.parse(fs.readFileSync(path.join(fixturesDir, 'manifest.json'), 'utf8'));

let dir: string;
before(() => {
  dir = makeTmp();
});
after(() => rmTmp(dir));

describe('manifest', () => {
  it('lists 27 exports: 9 families × folded / nofold / bn', () => {
    assert.equal(manifest.length, 27);
    const families = new Set(manifest.map((e) => e.family));
    assert.equal(families.size, 9);
    for (const f of families) assert.deepEqual(manifest.filter((e) => e.family === f).map((e) => e.mode).sort(), ['bn', 'folded', 'nofold']);
    for (const e of manifest) {
      assert.ok(fs.existsSync(path.join(fixturesDir, e.file)), e.file);
      assert.ok(fs.existsSync(path.join(fixturesDir, e.input)), e.input);
      assert.ok(fs.existsSync(path.join(fixturesDir, e.output)), e.output);
    }
  });
});

describe('PyTorch fixtures', { concurrency: 3 }, () => {
  for (const e of manifest) {
    it(`${e.file} (${e.family}, ${e.mode})`, async () => {
      const src = path.join(fixturesDir, e.file);
      // inspect: exactly the manifest's blocks, nothing rejected.
      const r = inspect(src, { foldBN: true });
      assert.deepEqual(r.rejected, [], `rejected: ${JSON.stringify(r.rejected)}`);
      assert.deepEqual(r.blocks.map((b) => b.name).sort(), e.blocks.map((b) => b.name).sort());
      for (const mb of e.blocks) {
        const b = r.blocks.find((x) => x.name === mb.name)!;
        const where = `${e.file} ${mb.name}`;
        assert.deepEqual(b.kernel, mb.kernel, `${where} kernel`);
        assert.deepEqual(b.stride, [mb.stride, mb.stride], `${where} stride`);
        assert.equal(b.groups, mb.groups, `${where} groups`);
        assert.equal(b.inChannels, mb.in, `${where} in`);
        assert.equal(b.outChannels, mb.out, `${where} out`);
        assert.equal(b.branches.length, mb.branches, `${where} branches`);
        // PP-YOLOE's RepVggBlock without alpha has the same names and structure as Ultralytics' RepConv
        // without its identity; only the scaled one can be told apart.
        if (!(mb.type === 'RepVggBlock' && mb.alpha === null)) assert.equal(b.family, FAMILY[mb.type], `${where} family`);
        assert.equal(!!b.postBN, mb.post_bn, `${where} post BN`);
        const ids = b.branches.filter((br) => br.kind === 'identity' || br.kind === 'bn_identity');
        if (mb.identity === null) assert.equal(ids.length, 0, `${where}: no identity branch`);
        else assert.deepEqual(ids.map((br) => br.kind), [mb.identity === 'bn' ? 'bn_identity' : 'identity'], `${where} identity`);
        assert.equal(b.branches.some((br) => br.scaled), mb.alpha !== null, `${where} alpha`);
        for (const br of b.branches) if (br.epsilon !== undefined) assert.ok(Math.abs(br.epsilon - mb.eps) <= mb.eps * 1e-6, `${where} eps ${br.epsilon}`);
        if (e.mode === 'bn') assert.ok(b.branches.some((br) => br.kind === 'conv_bn'), `${where}: BN kept in the branches`);
        else assert.ok(b.branches.every((br) => br.kind !== 'conv_bn'), `${where}: exporter folded the branch BNs`);
      }
      assert.equal(r.model.opCounts?.BatchNormalization ?? 0, e.graph.batchnorm_nodes);

      // fuse: validates on the PyTorch input; one Conv per block; no BatchNormalization left.
      const model = path.join(dir, e.file);
      fs.copyFileSync(src, model);
      const input = path.join(fixturesDir, e.input);
      const f = await fuseAndValidate(model, { dir, inputNpy: { images: input }, expectBlocks: e.blocks.length, expectOps: { BatchNormalization: 0 } });
      assert.equal(f.report.validation!.inputs[0].source, input);
      const convsBefore = f.original.opCounts.Conv;
      const branchConvs = r.blocks.reduce((a, b) => a + b.branches.filter((br) => br.kernel).length, 0);
      assert.equal(f.out.opCounts.Conv, convsBefore - branchConvs + r.blocks.length, 'one Conv per block, other Convs kept');

      // The fused model reproduces PyTorch's output.
      const x = readNpy(input);
      assert.equal(x.dtype, DType.float32);
      assert.deepEqual(x.shape, e.input_shape);
      const want = readNpy(path.join(fixturesDir, e.output));
      const xs = x.values() as Float32Array;
      const res = await runOrt(f.output, { images: new ort.Tensor('float32', Float32Array.from(xs), x.shape) });
      const got = res[e.graph.graph_outputs[0]];
      assert.deepEqual(got.dims, want.shape);
      const d = maxAbsDiff(got.data, want.values());
      assert.ok(d <= 1e-4, `${e.file}: fused vs PyTorch max |Δ| ${d}`);
    });
  }
});
