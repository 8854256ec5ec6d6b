// The validation side: the comparison, the child process (timeout, cancel), and what a failed or
// cancelled fuse leaves behind.
import * as assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { RepFuseError } from '../src/core/errors';
import { defaultFuseOptions, fuse } from '../src/engine';
import { ValidationError } from '../src/validate';
import { compare } from '../src/validate/worker';
import { writeModel } from './helpers/fuse';
import { ModelBuilder } from './helpers/onnx-builder';
import { makeTmp, rmTmp } from './helpers/paths';

let dir: string;
before(() => {
  dir = makeTmp();
});
after(() => rmTmp(dir));

const t = (values: number[], shape = [values.length]) => ({ shape, values: Float64Array.from(values) });

describe('compare()', () => {
  it('identical tensors: zero differences, passed', () => {
    const d = compare('y', t([1, -2, 3]), t([1, -2, 3]), 1e-4, 1e-3);
    assert.equal(d.maxAbsDiff, 0);
    assert.equal(d.meanAbsDiff, 0);
    assert.equal(d.maxRelDiff, 0);
    assert.equal(d.passed, true);
    assert.equal(d.maxAbsRef, 3);
  });

  it('tolerance is atol + rtol·max|y|, inclusive; the worst element is located', () => {
    const ref = t([1, 2, 3, 4, 5, 10], [2, 3]);
    const tol = 1e-4 + 1e-3 * 10;
    const at = compare('y', ref, t([1, 2, 3, 4, 5 + tol, 10], [2, 3]), 1e-4, 1e-3);
    assert.equal(at.tolerance, tol);
    assert.ok(Math.abs(at.maxAbsDiff - tol) < 1e-12);
    assert.deepEqual(at.worstIndex, [1, 1]);
    const over = compare('y', ref, t([1, 2, 3, 4, 5 + 2 * tol, 10], [2, 3]), 1e-4, 1e-3);
    assert.equal(over.passed, false);
    assert.ok(Math.abs(over.maxRelDiff - (2 * tol) / 5) < 1e-12);
    assert.ok(Math.abs(over.meanAbsDiff - (2 * tol) / 6) < 1e-12);
  });

  it('NaN/Inf: equal non-finite values are fine, different ones fail', () => {
    assert.equal(compare('y', t([NaN, Infinity, 1]), t([NaN, Infinity, 1]), 0, 0).passed, true);
    const d = compare('y', t([NaN, Infinity, 1]), t([0, -Infinity, 1]), 1, 1);
    assert.equal(d.nonFinite, 2);
    assert.equal(d.passed, false);
  });

  it('a shape mismatch is an error naming the output', () => {
    assert.throws(() => compare('out0', t([1, 2], [1, 2]), t([1, 2], [2, 1]), 0, 0), (err: unknown) => err instanceof RepFuseError && /output 'out0' has shape 1×2 .* 2×1/.test(err.message));
  });

  it('with atol 0, a difference where the reference is 0 keeps maxRelDiff a JSON number', () => {
    const d = compare('y', t([0, 1]), t([1e-7, 1]), 0, 0);
    assert.equal(d.passed, false);
    const json = JSON.parse(JSON.stringify(d));
    assert.equal(typeof json.maxRelDiff, 'number', `maxRelDiff ${d.maxRelDiff} becomes ${json.maxRelDiff} in --json output`);
  });
});

describe('the validation child process', () => {
  const model = () => {
    const b = new ModelBuilder({ seed: 6 });
    const x = b.input('x', [1, 4, 8, 8]);
    b.output(b.relu(b.add(b.conv(x, 4, 4, [3, 3], { bn: true }), b.conv(x, 4, 4, [1, 1], { bn: true }))));
    return b.encode();
  };

  it('a timeout ends with a ValidationError; the fused model stays written', async () => {
    const file = writeModel(dir, model(), 'timeout');
    await assert.rejects(fuse(file, { ...defaultFuseOptions, timeoutMs: 1 }), (err: unknown) => err instanceof ValidationError && /did not finish within/.test(err.message));
    assert.ok(fs.existsSync(file.replace(/\.onnx$/, '.fused.onnx')));
  });

  it('a signal aborted before writing: nothing written, no temp file', async () => {
    const sub = path.join(dir, 'abort');
    fs.mkdirSync(sub);
    const file = writeModel(sub, model(), 'abort');
    const ctl = new AbortController();
    ctl.abort(new RepFuseError('cancelled by test.'));
    await assert.rejects(fuse(file, { ...defaultFuseOptions, signal: ctl.signal }), /cancelled by test/);
    assert.deepEqual(fs.readdirSync(sub), [path.basename(file)]);
  });

  it('the same seed gives the same validation numbers; another seed, other inputs', async () => {
    const file = writeModel(dir, model(), 'seed');
    const run = async (seed: number) => (await fuse(file, { ...defaultFuseOptions, seed, force: true })).validation!;
    const a = await run(3);
    const b = await run(3);
    const c = await run(4);
    assert.deepEqual(a.outputs.map((o) => [o.maxAbsDiff, o.maxAbsRef]), b.outputs.map((o) => [o.maxAbsDiff, o.maxAbsRef]));
    assert.notEqual(a.outputs[0].maxAbsRef, c.outputs[0].maxAbsRef);
    assert.equal(a.seed, 3);
    assert.match(a.inputs[0].source, /seed 3/);
  });
});
