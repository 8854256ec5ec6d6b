// RepFuse CLI benchmark on a RepVGG-B1-sized model (`npm run bench`): the ONNX export and the
// same net as an unfused PyTorch state_dict `.pt` (≈ 220 MB, RepVGG key names).
//
//   node out/bench/bench.js [--quick] [--check] [--profile] [--runs N] [--rss time|preload] [--keep]
//
//   --quick    skip the validated fuses (onnxruntime runs both models / every block; seconds to ~30 s)
//              and the validation-overhead rounds (fuse, bare onnxruntime, validated fuse, N+1 times)
//   --check    also load and run the generated ONNX model once in onnxruntime-node (slow), and load
//              the fused .pt with PyTorch (`torch.load(weights_only=True)`, /usr/bin/python3)
//   --profile  run `node --cpu-prof dist/cli.js fuse …` once per format and print the hottest functions
//   --runs N   timed runs per command (default 5, after 1 warm-up)
//   --rss M    how to read peak RSS: 'time' (/usr/bin/time, default when present) or 'preload'
//   --keep     keep the temp folder (prints its path)
//
// Every command is measured as a whole process, the way a user runs it.
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { parseArgs } from 'node:util';
import { generateRepVGG } from './gen-model';
import { generateRepVGGCheckpoint } from './gen-torch';
import { bench, type Command, CommandFailed, gnuTimeWorks, median, type RssMethod, runOnce, type Stats, TIME_BIN } from './measure';
import { renderProfile, summarizeProfile } from './profile';

const ROOT = path.resolve(__dirname, '..', '..');
const CLI = path.join(ROOT, 'dist', 'cli.js');
const PRELOAD = path.join(__dirname, 'rss-preload.js');
const ORT_CHECK = path.join(__dirname, 'ort-check.js');
const ORT_BARE = path.join(__dirname, 'ort-bare.js');

/** A minimal Node copy: what start-up plus streaming 200 MB through user space costs, no fsync. */
const NODE_COPY = `const fs = require('fs'); const [src, dst] = process.argv.slice(1);
const i = fs.openSync(src, 'r'), o = fs.openSync(dst, 'w'), b = Buffer.allocUnsafe(4 << 20);
for (let n; (n = fs.readSync(i, b, 0, b.length, null)) > 0; ) for (let off = 0; off < n; ) off += fs.writeSync(o, b, off, n - off);`;

const TARGETS = { inspectS: 0.25, fuseS: 0.45, fuseRssX: 1.5, ptInspectS: 0.25, ptFuseS: 0.5, ptFuseRssX: 1.5 };
const CHECK_FUSED = path.join(ROOT, 'test', 'interop', 'check_fused.py');
const PYTHON = '/usr/bin/python3';

const MiB = 1024 * 1024;
const mib = (bytes: number) => `${(bytes / MiB).toFixed(1)} MiB`;

function log(s = ''): void {
  process.stdout.write(s + '\n');
}

function table(rows: string[][], right: boolean[]): string {
  const w = rows[0].map((_, i) => Math.max(...rows.map((r) => r[i].length)));
  return rows
    .map((r, ri) => {
      const line = r.map((c, i) => (right[i] ? c.padStart(w[i]) : c.padEnd(w[i]))).join('  ').trimEnd();
      return ri === 0 ? `${line}\n${w.map((x) => '─'.repeat(x)).join('  ')}` : line;
    })
    .join('\n');
}

function runJson(args: string[]): { status: number | null; json: unknown; stderr: string; wallS: number } {
  const t0 = process.hrtime.bigint();
  const r = spawnSync(process.execPath, [CLI, ...args], { encoding: 'utf8', maxBuffer: 256 << 20 });
  const wallS = Number(process.hrtime.bigint() - t0) / 1e9;
  let json: unknown;
  try {
    json = JSON.parse(r.stdout);
  } catch {
    json = undefined;
  }
  return { status: r.status, json, stderr: r.stderr ?? '', wallS };
}

interface FuseJson {
  blocksFused: number;
  bnFolded: number;
  nodesBefore?: number;
  nodesAfter?: number;
  bytesWritten: number;
  timingsMs: Record<string, number>;
  validation: null | {
    passed: boolean;
    outputs: { name: string; maxAbsDiff: number; maxAbsRef: number; tolerance: number; passed: boolean }[];
    blocks: { block: string; maxAbsDiff: number; passed: boolean }[];
    durationMs: number;
  };
  validationSkipped?: string;
}

async function main(): Promise<number> {
  const { values } = parseArgs({
    options: {
      quick: { type: 'boolean', default: false },
      check: { type: 'boolean', default: false },
      profile: { type: 'boolean', default: false },
      keep: { type: 'boolean', default: false },
      runs: { type: 'string', default: '5' },
      rss: { type: 'string' },
    },
  });
  const runs = Number(values.runs);
  if (!Number.isInteger(runs) || runs < 1) throw new Error(`--runs needs a positive integer, got '${values.runs}'.`);
  if (!fs.existsSync(CLI)) throw new Error(`${CLI} is missing; run node scripts/build.mjs first (npm run bench does).`);
  const haveTime = gnuTimeWorks();
  let method: RssMethod;
  if (values.rss === 'time') {
    if (!haveTime) throw new Error('--rss time: /usr/bin/time (GNU time, Debian package `time`) is not available.');
    method = 'time';
  } else if (values.rss === 'preload') method = 'preload';
  else if (values.rss === undefined) method = haveTime ? 'time' : 'preload';
  else throw new Error(`--rss must be 'time' or 'preload', got '${values.rss}'.`);

  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'repfuse-bench-'));
  const cleanup = () => {
    if (values.keep) log(`(kept ${tmp})`);
    else fs.rmSync(tmp, { recursive: true, force: true });
  };
  const onSignal = (sig: NodeJS.Signals) => {
    cleanup();
    process.exit(sig === 'SIGINT' ? 130 : 143);
  };
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);
  try {
    const cpu = os.cpus();
    log(`RepFuse benchmark — node ${process.version}, ${cpu.length} × ${cpu[0]?.model.trim() ?? 'CPU'}, ${(os.totalmem() / 2 ** 30).toFixed(0)} GiB RAM, ${os.platform()} ${os.release()}`);
    log(`peak RSS via ${method === 'time' ? `${TIME_BIN} -f '%e %M' (ru_maxrss of the child from wait4)` : 'a -r preload that reports VmHWM at exit (no GNU time here)'}`);
    const load = () => os.loadavg().map((x) => x.toFixed(2)).join(' ');
    log(`temp folder ${tmp}; load average ${load()} (other work on this machine skews wall times)`);
    log();

    // ----- 1. the model -----------------------------------------------------------------------
    const model = path.join(tmp, 'repvgg_b1.onnx');
    await new Promise((r) => setImmediate(r));
    const gen = generateRepVGG(model);
    const genRss = process.resourceUsage().maxRSS * 1024;
    log(
      `generated ${path.basename(model)}: ${gen.bytes.toLocaleString('en-US')} bytes (${mib(gen.bytes)}), ${gen.blocks} blocks (${gen.identityBlocks} with a BN identity), ` +
        `${gen.nodes} nodes, ${gen.initializers} initializers, ${(gen.params / 1e6).toFixed(2)} M params in ${(gen.ms / 1000).toFixed(2)} s ` +
        `(bench process peak RSS so far ${mib(genRss)})`,
    );
    if (values.check) {
      const r = spawnSync(process.execPath, [ORT_CHECK, model], { encoding: 'utf8' });
      process.stdout.write(r.stdout);
      process.stderr.write(r.stderr);
      if (r.status !== 0) throw new Error('the generated model does not load in onnxruntime-node.');
    } else log('(onnxruntime-node load check skipped; pass --check to run it)');

    // Sanity: the CLI must find every block, or the timings mean nothing.
    const ins = runJson(['inspect', model, '--json']);
    const inspected = ins.json as { blocks?: unknown[]; rejected?: unknown[] } | undefined;
    if (ins.status !== 0 || !inspected?.blocks) throw new Error(`inspect failed (${ins.status}): ${ins.stderr.trim()}`);
    const out = path.join(tmp, 'out.onnx');
    const fz = runJson(['fuse', model, '-o', out, '--no-validate', '--force', '--json']);
    const fused = fz.json as FuseJson | undefined;
    if (fz.status !== 0 || !fused) throw new Error(`fuse failed (${fz.status}): ${fz.stderr.trim()}`);
    log(
      `inspect finds ${inspected.blocks.length} blocks (${inspected.rejected?.length ?? 0} rejected); fuse fuses ${fused.blocksFused} blocks + ${fused.bnFolded} BN folds, ` +
        `${fused.nodesBefore} → ${fused.nodesAfter} nodes, writes ${fused.bytesWritten.toLocaleString('en-US')} bytes ` +
        `(fuse's own timings: ${Object.entries(fused.timingsMs)
          .map(([k, v]) => `${k} ${v.toFixed(0)} ms`)
          .join(', ')})`,
    );
    if (inspected.blocks.length !== gen.blocks || fused.blocksFused !== gen.blocks) {
      log(`WARNING: expected ${gen.blocks} blocks; the numbers below are not comparable.`);
    }
    log();

    // ----- 1b. the same net as an unfused PyTorch state_dict ------------------------------------
    const ptModel = path.join(tmp, 'repvgg_b1_sd.pt');
    const genPt = await generateRepVGGCheckpoint(ptModel);
    log(
      `generated ${path.basename(ptModel)}: ${genPt.bytes.toLocaleString('en-US')} bytes (${mib(genPt.bytes)}), torch zip state_dict, ${genPt.tensors} tensors ` +
        `(RepVGG names: rbr_dense.conv/.bn, rbr_1x1.*, rbr_identity), ${genPt.blocks} blocks (${genPt.identityBlocks} with a BN identity), ` +
        `${(genPt.params / 1e6).toFixed(2)} M params, float32, in ${(genPt.ms / 1000).toFixed(2)} s`,
    );
    const ptIns = runJson(['inspect', ptModel, '--json']);
    const ptInspected = ptIns.json as { blocks?: unknown[]; rejected?: unknown[] } | undefined;
    if (ptIns.status !== 0 || !ptInspected?.blocks) throw new Error(`inspect .pt failed (${ptIns.status}): ${ptIns.stderr.trim()}`);
    const ptOut = path.join(tmp, 'out.pt');
    const ptFz = runJson(['fuse', ptModel, '-o', ptOut, '--no-validate', '--force', '--json']);
    const ptFused = ptFz.json as FuseJson | undefined;
    if (ptFz.status !== 0 || !ptFused) throw new Error(`fuse .pt failed (${ptFz.status}): ${ptFz.stderr.trim()}`);
    log(
      `inspect finds ${ptInspected.blocks.length} blocks (${ptInspected.rejected?.length ?? 0} rejected); fuse fuses ${ptFused.blocksFused} blocks, ` +
        `writes ${ptFused.bytesWritten.toLocaleString('en-US')} bytes (fuse's own timings: ${Object.entries(ptFused.timingsMs)
          .map(([k, v]) => `${k} ${v.toFixed(0)} ms`)
          .join(', ')})`,
    );
    if (ptInspected.blocks.length !== genPt.blocks || ptFused.blocksFused !== genPt.blocks) {
      log(`WARNING: expected ${genPt.blocks} blocks in the .pt; its numbers below are not comparable.`);
    }
    if (values.check) {
      // PyTorch itself must accept the fused state_dict (weights_only=True, zip CRCs, 64-byte alignment).
      const r = spawnSync(PYTHON, [CHECK_FUSED, 'load', ptOut], { encoding: 'utf8', maxBuffer: 64 << 20 });
      let res: { ok?: boolean; tensors?: Record<string, unknown>; records_not_64_aligned?: string[]; error?: string } = {};
      try {
        res = JSON.parse(r.stdout.trim().split('\n').pop() ?? '');
      } catch {
        /* reported below */
      }
      if (r.status !== 0 || !res.ok) throw new Error(`PyTorch does not load the fused .pt (exit ${r.status}): ${res.error ?? r.stderr.trim()}`);
      log(`PyTorch (${PYTHON}) loads out.pt with weights_only=True: ${Object.keys(res.tensors ?? {}).length} tensors, records not 64-byte aligned: ${res.records_not_64_aligned?.length ?? '?'}`);
    } else log('(PyTorch load check of the fused .pt skipped; pass --check to run it)');
    log();

    // ----- 2 + 3. timed commands --------------------------------------------------------------
    // Before each run (untimed): delete the previous output and `sync`, so every run writes a new
    // file onto a clean page cache. Otherwise a run pays for the previous run's writeback and for
    // unlinking its 200 MB output (this ext4 is mounted with `discard`): ±50 % noise.
    const fresh = (file: string) => () => {
      fs.rmSync(file, { force: true });
      spawnSync('sync');
    };
    const copy = path.join(tmp, 'copy.onnx');
    const commands: { cmd: Command; size: number; target?: { wallS: number; rssX?: number }; before?: () => void }[] = [
      { cmd: { label: 'cp (reference)', exe: 'cp', args: [model, copy], node: false }, size: gen.bytes, before: fresh(copy) },
      {
        // fuse fsyncs its output; cp does not. This row shows what durability costs on this disk.
        cmd: { label: 'cp + fsync (dd conv=fsync)', exe: 'dd', args: [`if=${model}`, `of=${copy}`, 'bs=4M', 'conv=fsync', 'status=none'], node: false },
        size: gen.bytes,
        before: fresh(copy),
      },
      {
        // The floor for any Node writer: start node, stream the file through 4 MiB read/write calls.
        cmd: { label: 'node stream copy (4 MiB chunks)', exe: process.execPath, args: ['-e', NODE_COPY, model, copy], node: true },
        size: gen.bytes,
        before: fresh(copy),
      },
      { cmd: { label: 'inspect .onnx', exe: process.execPath, args: [CLI, 'inspect', model], node: true }, size: gen.bytes, target: { wallS: TARGETS.inspectS }, before: fresh(copy) },
      {
        cmd: { label: 'fuse .onnx --no-validate', exe: process.execPath, args: [CLI, 'fuse', model, '-o', out, '--no-validate', '--force'], node: true },
        size: gen.bytes,
        target: { wallS: TARGETS.fuseS, rssX: TARGETS.fuseRssX },
        before: fresh(out),
      },
      { cmd: { label: 'inspect .pt', exe: process.execPath, args: [CLI, 'inspect', ptModel], node: true }, size: genPt.bytes, target: { wallS: TARGETS.ptInspectS }, before: fresh(ptOut) },
      {
        cmd: { label: 'fuse .pt --no-validate', exe: process.execPath, args: [CLI, 'fuse', ptModel, '-o', ptOut, '--no-validate', '--force'], node: true },
        size: genPt.bytes,
        target: { wallS: TARGETS.ptFuseS, rssX: TARGETS.ptFuseRssX },
        before: fresh(ptOut),
      },
    ];
    const results: { label: string; size: number; stats: Stats; target?: { wallS: number; rssX?: number } }[] = [];
    for (const c of commands) {
      process.stdout.write(`timing ${c.cmd.label} (1 warm-up + ${runs}) … `);
      const stats = await bench(c.cmd, { runs, warmup: 1, method, scratchDir: tmp, preload: PRELOAD, before: c.before });
      log(stats.samples.map((s) => s.wallS.toFixed(3)).join(' ') + ' s');
      results.push({ label: c.cmd.label, size: c.size, stats, target: c.target });
    }
    fs.rmSync(copy, { force: true });
    log();

    const rows: string[][] = [['command', 'median', 'min', 'peak RSS', 'RSS/file', 'target', 'verdict']];
    rows.push([`.onnx model file (${gen.bytes.toLocaleString('en-US')} B)`, '', '', mib(gen.bytes), '1.00×', '', '']);
    rows.push([`.pt state_dict file (${genPt.bytes.toLocaleString('en-US')} B)`, '', '', mib(genPt.bytes), '1.00×', '', '']);
    let misses = 0;
    let failures = 0;
    for (const r of results) {
      const s = r.stats;
      const rssB = s.peakRssKiB * 1024;
      const x = rssB / r.size;
      let target = '';
      let verdict = '';
      if (r.target) {
        const wallOk = s.medianS <= r.target.wallS;
        const parts = [`wall ≤ ${r.target.wallS.toFixed(2)} s`];
        const why: string[] = wallOk ? [] : ['wall'];
        if (r.target.rssX !== undefined) {
          parts.push(`RSS ≤ ${r.target.rssX.toFixed(1)}×`);
          if (!(x <= r.target.rssX)) why.push(Number.isFinite(x) ? 'RSS' : 'RSS unknown');
        }
        target = parts.join(', ');
        verdict = why.length ? `MISS (${why.join(', ')})` : 'PASS';
        if (why.length) misses++;
      }
      rows.push([
        r.label,
        `${s.medianS.toFixed(3)} s`,
        `${s.minS.toFixed(3)} s`,
        Number.isFinite(rssB) ? mib(rssB) : 'n/a',
        Number.isFinite(x) ? `${x.toFixed(2)}×` : 'n/a',
        target,
        verdict,
      ]);
    }
    log(table(rows, [false, true, true, true, true, false, false]));
    log();
    log(`wall = median / min of ${runs} runs after 1 warm-up; before each run the output is deleted and \`sync\` run (untimed), the input stays in the page cache.`);
    log('peak RSS = max over the runs; RSS/file against the row\'s own input. 1 MiB = 2^20 bytes.');
    log('Targets: .onnx inspect ≤ 0.25 s, fuse ≤ 0.45 s and peak RSS ≤ 1.5 × file size; .pt fuse ≤ 0.5 s and peak RSS ≤ 1.5 × file size (issue 3), .pt inspect ≤ 0.25 s (the .onnx target).');
    log(`load average now ${load()}.`);
    log(misses ? `${misses} of ${results.filter((r) => r.target).length} targets missed.` : 'all targets met.');

    // ----- validated fuse ---------------------------------------------------------------------
    if (!values.quick) {
      log();
      process.stdout.write('validating: fuse WITH onnxruntime validation on the big model … ');
      const vOut = path.join(tmp, 'validated.onnx');
      const v = runJson(['fuse', model, '-o', vOut, '--force', '--json']);
      const vr = v.json as FuseJson | undefined;
      if (!vr || !vr.validation || (v.status !== 0 && v.status !== 1)) {
        log(`could not validate (exit ${v.status}): ${v.stderr.trim().split('\n').pop() ?? ''}`);
        failures++;
      } else {
        const val = vr.validation;
        const maxOut = Math.max(0, ...val.outputs.map((o) => o.maxAbsDiff));
        const worstBlock = val.blocks.reduce((a, b) => (b.maxAbsDiff > (a?.maxAbsDiff ?? -1) ? b : a), undefined as (typeof val.blocks)[number] | undefined);
        log(`${v.wallS.toFixed(1)} s (validation itself ${(val.durationMs / 1000).toFixed(1)} s)`);
        for (const o of val.outputs) {
          log(`  output '${o.name}': max |Δ| ${o.maxAbsDiff.toExponential(3)}, max |y| ${o.maxAbsRef.toExponential(3)}, tolerance ${o.tolerance.toExponential(3)} → ${o.passed ? 'pass' : 'FAIL'}`);
        }
        if (worstBlock) log(`  ${val.blocks.length} block outputs compared; worst '${worstBlock.block}' max |Δ| ${worstBlock.maxAbsDiff.toExponential(3)}; ${val.blocks.filter((b) => !b.passed).length} over tolerance`);
        log(`  verdict: max |Δ| ${maxOut.toExponential(3)} — ${val.passed ? 'PASSED' : 'OVER TOLERANCE'}`);
        if (!val.passed) failures++;
      }
      process.stdout.write('validating: fuse WITH block-by-block onnxruntime validation on the .pt … ');
      const vPt = runJson(['fuse', ptModel, '-o', path.join(tmp, 'validated.pt'), '--force', '--json']);
      const vp = vPt.json as FuseJson | undefined;
      if (!vp || !vp.validation || (vPt.status !== 0 && vPt.status !== 1)) {
        log(`could not validate (exit ${vPt.status}): ${vPt.stderr.trim().split('\n').pop() ?? ''}`);
        failures++;
      } else {
        const val = vp.validation;
        const worst = val.blocks.reduce((a, b) => (b.maxAbsDiff > (a?.maxAbsDiff ?? -1) ? b : a), undefined as (typeof val.blocks)[number] | undefined);
        log(`${vPt.wallS.toFixed(1)} s (validation itself ${(val.durationMs / 1000).toFixed(1)} s)`);
        if (worst) log(`  ${val.blocks.length} blocks compared (no whole-network graph in a checkpoint); worst '${worst.block}' max |Δ| ${worst.maxAbsDiff.toExponential(3)}; ${val.blocks.filter((b) => !b.passed).length} over tolerance`);
        log(`  verdict: ${val.passed ? 'PASSED' : 'OVER TOLERANCE'}`);
        if (!val.passed) failures++;
      }
      fs.rmSync(path.join(tmp, 'validated.pt'), { force: true });

      // ----- validation overhead: validated fuse against fuse + two bare onnxruntime sessions ------
      // Each round runs the three commands back to back (1 warm-up round first), so load from
      // elsewhere on the machine falls on all three alike; the ratio is taken per round.
      log();
      const bareCmd: Command = { label: 'bare onnxruntime: create+run original, then fused', exe: process.execPath, args: [ORT_BARE, model, out], node: true };
      const fuseCmd: Command = { label: 'fuse .onnx --no-validate', exe: process.execPath, args: [CLI, 'fuse', model, '-o', out, '--no-validate', '--force'], node: true };
      const valCmd: Command = { label: 'fuse .onnx (validated)', exe: process.execPath, args: [CLI, 'fuse', model, '-o', vOut, '--force'], node: true };
      const rounds: { fuse: number; bare: number; validated: number; ratio: number; load: string }[] = [];
      for (let i = 0; i <= runs; i++) {
        process.stdout.write(i === 0 ? 'validation overhead: warm-up round … ' : `validation overhead: round ${i}/${runs} … `);
        await new Promise((r) => setImmediate(r));
        fresh(out)();
        const f = runOnce(fuseCmd, method, tmp, PRELOAD).wallS;
        spawnSync('sync');
        const b = runOnce(bareCmd, method, tmp, PRELOAD).wallS;
        fresh(vOut)();
        const v = runOnce(valCmd, method, tmp, PRELOAD).wallS;
        const r = { fuse: f, bare: b, validated: v, ratio: v / (f + b), load: load() };
        log(`fuse ${f.toFixed(2)} s, bare ${b.toFixed(2)} s, validated ${v.toFixed(2)} s → ratio ${r.ratio.toFixed(2)} (load ${r.load})`);
        if (i > 0) rounds.push(r);
      }
      fs.rmSync(vOut, { force: true });
      const med = (k: 'fuse' | 'bare' | 'validated' | 'ratio') => median(rounds.map((r) => r[k]));
      const ratio = med('ratio');
      log();
      log(
        table(
          [
            ['command', `median of ${runs}`, 'min', 'target', 'verdict'],
            [fuseCmd.label, `${med('fuse').toFixed(3)} s`, `${Math.min(...rounds.map((r) => r.fuse)).toFixed(3)} s`, '', ''],
            [bareCmd.label, `${med('bare').toFixed(3)} s`, `${Math.min(...rounds.map((r) => r.bare)).toFixed(3)} s`, '', ''],
            [valCmd.label, `${med('validated').toFixed(3)} s`, `${Math.min(...rounds.map((r) => r.validated)).toFixed(3)} s`, '', ''],
            ['ratio validated / (fuse + bare), per round', ratio.toFixed(2), Math.min(...rounds.map((r) => r.ratio)).toFixed(2), '≤ 1.00', ratio <= 1 ? 'PASS' : 'MISS'],
          ],
          [false, true, true, false, false],
        ),
      );
      log(`(the validated fuse also counts MACs of both graphs and compares ${'every output and block output'}; load average now ${load()})`);
    } else log('(validated fuses skipped: --quick)');

    // ----- optional CPU profile ---------------------------------------------------------------
    if (values.profile) {
      for (const [what, input, output] of [
        ['.onnx', model, out],
        ['.pt', ptModel, ptOut],
      ] as const) {
        const dir = path.join(tmp, `prof${what}`);
        fresh(output)();
        const r = spawnSync(process.execPath, ['--cpu-prof', `--cpu-prof-dir=${dir}`, CLI, 'fuse', input, '-o', output, '--no-validate', '--force'], { encoding: 'utf8' });
        if (r.status !== 0) throw new Error(`profiled fuse failed: ${r.stderr}`);
        const prof = fs.readdirSync(dir).find((f) => f.endsWith('.cpuprofile'));
        if (!prof) throw new Error('node --cpu-prof wrote no profile.');
        log();
        log(`CPU profile of \`node --cpu-prof dist/cli.js fuse <${what}> … --no-validate\`:`);
        log(renderProfile(summarizeProfile(path.join(dir, prof), ROOT), 20));
      }
    }
    // A missed target is a finding, not an error; a wrong fused model is.
    return failures ? 1 : 0;
  } finally {
    cleanup();
  }
}

main().then(
  (code) => {
    process.exitCode = code;
  },
  (err) => {
    process.stderr.write(`bench: ${err instanceof CommandFailed ? err.message : ((err as Error).stack ?? String(err))}\n`);
    process.exitCode = 2;
  },
);
