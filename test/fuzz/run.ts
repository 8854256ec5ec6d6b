// npm run fuzz -- [--cases N] [--seed S] [--reader onnx,zip,…] [--workers W] [--budget-ms MS]
//                 [--deep-every K] [--max-hostile N] [--json report.json] [--save dir]
//                 [--case I --reader R --seed S]   (reproduce one case in-process, full stack)
// Seeded, mutation-based fuzzing of every RepFuse reader from the real fixtures. Every input must
// parse or fail with RepFuse's own one-line FormatError/RepFuseError: no other exception, no hang,
// no memory growth far beyond the input's size, and what RepFuse writes from it must read back.
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { parseArgs } from 'node:util';
import { READERS, type Reader } from './corpus';
import { type FuzzReport, formatFailure, formatTable, runFuzz } from './harness';
import { caseSeed, MAX_HOSTILE, makeCase } from './mutate';
import { loadCorpus } from './corpus';
import { oneCase } from './worker';

function readers(v: string | undefined): Reader[] {
  if (!v) return [...READERS];
  const list = v.split(',').map((s) => s.trim()).filter(Boolean);
  for (const r of list) if (!(READERS as readonly string[]).includes(r)) throw new Error(`unknown reader '${r}' (one of ${READERS.join(', ')})`);
  return list as Reader[];
}

async function reproduce(reader: Reader, seed: number, index: number, deepEvery: number, maxHostile: number, save?: string): Promise<number> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'repfuse-fuzz-'));
  try {
    const r = await oneCase(reader, seed, index, deepEvery, dir, maxHostile);
    console.log(`${reader} case ${index} (seed ${seed}) from ${r.seedFile}, ${r.size} bytes`);
    console.log(`mutations: ${r.desc}`);
    console.log(`outcome: ${r.kind} at ${r.stage} in ${r.ms.toFixed(1)} ms, memory Δ ${(r.mem / 1048576).toFixed(1)} MiB`);
    if (r.message) console.log(r.message);
    if (r.stack) console.log(r.stack);
    if (save) {
      fs.mkdirSync(save, { recursive: true });
      const f = path.join(save, `${reader}-${seed}-${index}.bin`);
      fs.writeFileSync(f, r.bytes);
      console.log(`input saved to ${f}`);
    }
    return ['ok', 'format', 'repfuse'].includes(r.kind) ? 0 : 1;
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

async function main(): Promise<number> {
  const { values } = parseArgs({
    options: {
      cases: { type: 'string', default: '10000' },
      seed: { type: 'string' },
      reader: { type: 'string' },
      workers: { type: 'string' },
      'budget-ms': { type: 'string', default: '30000' },
      'deep-every': { type: 'string', default: '4' },
      'max-hostile': { type: 'string', default: String(MAX_HOSTILE) },
      case: { type: 'string' },
      json: { type: 'string' },
      save: { type: 'string' },
      quiet: { type: 'boolean', default: false },
    },
  });
  const seed = values.seed !== undefined ? Number(values.seed) : Math.floor(Math.random() * 2 ** 31);
  const list = readers(values.reader);
  const deepEvery = Number(values['deep-every']);
  const maxHostile = Number(values['max-hostile']);
  if (values.case !== undefined) {
    if (list.length !== 1 || values.seed === undefined) throw new Error('--case needs exactly one --reader and the --seed');
    return reproduce(list[0], seed, Number(values.case), deepEvery, maxHostile, values.save);
  }
  const cases = Number(values.cases);
  const workers = values.workers ? Number(values.workers) : Math.max(1, Math.min(4, os.availableParallelism()));
  console.log(`fuzzing ${list.join(', ')}: ${cases} cases each, seed ${seed}, ${workers} workers`);
  let last = 0;
  const rep: FuzzReport = await runFuzz({
    cases,
    seed,
    readers: list,
    workers,
    budgetMs: Number(values['budget-ms']),
    deepEvery,
    maxHostile,
    onProgress: values.quiet
      ? undefined
      : (done, total) => {
          const now = Date.now();
          if (now - last > 2000 || done === total) {
            last = now;
            process.stderr.write(`\r${done}/${total} cases`);
            if (done === total) process.stderr.write('\n');
          }
        },
  });
  console.log(formatTable(rep));
  console.log(`${Object.values(rep.readers).reduce((a, s) => a + s.cases, 0)} cases in ${(rep.durationMs / 1000).toFixed(1)} s, seed ${seed}`);
  for (const f of rep.failures) console.log(`\n${formatFailure(f, rep)}`);
  if (values.save) {
    fs.mkdirSync(values.save, { recursive: true });
    for (const f of rep.failures) {
      const m = await makeCase(f.reader, await loadCorpus(f.reader), caseSeed(seed, f.reader, f.index), maxHostile);
      fs.writeFileSync(path.join(values.save, `${f.reader}-${seed}-${f.index}.bin`), m.bytes);
    }
  }
  if (values.json) fs.writeFileSync(values.json, JSON.stringify(rep, null, 2));
  console.log(rep.failures.length ? `\n${rep.failures.length} invariant violation(s)` : '\nno invariant violations');
  return rep.failures.length ? 1 : 0;
}

if (require.main === module) {
  main().then(
    (code) => process.exit(code),
    (err) => {
      console.error(`fuzz: ${(err as Error).stack ?? err}`);
      process.exit(2);
    },
  );
}
