// The short fuzz run inside `npm test`: 2,000 seeded mutations of the real fixtures per reader
// (ONNX/protobuf, zip, pickle, legacy torch, safetensors, .npy). Every input must parse or fail
// with RepFuse's own one-line FormatError/RepFuseError — no other exception, no hang, no memory
// growth far beyond the input's size, and what RepFuse writes from an accepted input must read
// back. `npm run fuzz` runs the same harness longer, with bigger hostile structures.
import * as assert from 'node:assert/strict';
import { test } from 'node:test';
import { READERS } from './fuzz/corpus';
import { formatFailure, formatTable, runFuzz } from './fuzz/harness';

const CASES = Number(process.env.REPFUSE_FUZZ_CASES ?? 2000);
const SEED = Number(process.env.REPFUSE_FUZZ_SEED ?? 20240611);

test(`fuzz: ${CASES} cases per reader (seed ${SEED}): every input parses or is a one-line RepFuse error`, { timeout: 300_000 }, async (t) => {
  const rep = await runFuzz({ cases: CASES, seed: SEED, workers: 2, budgetMs: 15_000, maxHostile: 12_000, deepEvery: 4 });
  t.diagnostic(`\n${formatTable(rep)}\n${(rep.durationMs / 1000).toFixed(1)} s`);
  assert.deepEqual(Object.keys(rep.readers), [...READERS]);
  for (const [reader, s] of Object.entries(rep.readers)) {
    assert.equal(s.cases, CASES, `${reader}: every case ran`);
    assert.ok(s.ok > 0 && s.format > 0, `${reader}: the mutations reach both outcomes (parsed ${s.ok}, FormatError ${s.format})`);
  }
  // Structure-aware mutations keep enough inputs valid to reach detection, writing and re-reading.
  for (const r of ['onnx', 'zip', 'pickle', 'legacy', 'safetensors']) assert.ok(rep.readers[r].deep > 0, `${r}: some accepted inputs were written and re-opened`);
  assert.equal(rep.failures.length, 0, `invariant violations:\n${rep.failures.map((f) => formatFailure(f, rep)).join('\n\n')}`);
});
