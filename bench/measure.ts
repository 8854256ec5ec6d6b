// Times whole processes and reads their peak RSS.
//
// Wall time: high-resolution clock around spawnSync (includes process start-up and exit, which is
// what a user waits for). Peak RSS, by one of two methods:
//  * 'time': GNU `/usr/bin/time -f '%e %M' -o FILE cmd …`. %M is ru_maxrss (KiB) from wait4() of
//    the one child it forked from its own small image, so it is the command's own peak. Its %e has
//    only 10 ms resolution, so it is used as a cross-check, not as the wall time.
//  * 'preload': `node -r rss-preload.js …` reports VmHWM at exit (see rss-preload.ts for why not
//    ru_maxrss / RUSAGE_CHILDREN). Works only for node commands; `cp` gets no RSS then.
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

export type RssMethod = 'time' | 'preload';

export const TIME_BIN = '/usr/bin/time';

/** True when /usr/bin/time exists and understands GNU's -f/-o with %M. */
export function gnuTimeWorks(): boolean {
  try {
    fs.accessSync(TIME_BIN, fs.constants.X_OK);
  } catch {
    return false;
  }
  const tmp = path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'repfuse-time-')), 'o');
  try {
    const r = spawnSync(TIME_BIN, ['-o', tmp, '-f', '%e %M', 'true'], { stdio: 'ignore' });
    if (r.status !== 0) return false;
    return /^\d+(\.\d+)? \d+$/m.test(fs.readFileSync(tmp, 'utf8'));
  } catch {
    return false;
  } finally {
    fs.rmSync(path.dirname(tmp), { recursive: true, force: true });
  }
}

export interface Sample {
  wallS: number;
  /** Peak RSS in KiB, NaN when unknown. */
  rssKiB: number;
  /** /usr/bin/time's own %e, when used. */
  timeE?: number;
}

export interface Command {
  label: string;
  exe: string;
  args: string[];
  /** True when exe is node (the preload method can then measure it). */
  node: boolean;
}

export class CommandFailed extends Error {}

export function runOnce(cmd: Command, method: RssMethod, scratchDir: string, preload: string): Sample {
  const rssFile = path.join(scratchDir, `rss-${process.pid}.txt`);
  fs.rmSync(rssFile, { force: true });
  let exe = cmd.exe;
  let args = cmd.args;
  const env = { ...process.env };
  if (method === 'time') {
    exe = TIME_BIN;
    args = ['-o', rssFile, '-f', '%e %M', cmd.exe, ...cmd.args];
  } else if (cmd.node) {
    args = ['-r', preload, ...cmd.args];
    env.REPFUSE_BENCH_RSS_FILE = rssFile;
  }
  const t0 = process.hrtime.bigint();
  const r = spawnSync(exe, args, { stdio: ['ignore', 'pipe', 'pipe'], env, maxBuffer: 64 << 20 });
  const wallS = Number(process.hrtime.bigint() - t0) / 1e9;
  if (r.error) throw new CommandFailed(`${cmd.label}: cannot run ${exe}: ${r.error.message}`);
  if (r.status !== 0) {
    const tail = `${r.stderr?.toString() ?? ''}`.trim().split('\n').slice(-5).join('\n');
    throw new CommandFailed(`${cmd.label}: exited with ${r.status ?? r.signal}${tail ? `:\n${tail}` : ''}`);
  }
  let rssKiB = NaN;
  let timeE: number | undefined;
  if (fs.existsSync(rssFile)) {
    const lines = fs.readFileSync(rssFile, 'utf8').trim().split('\n');
    const last = lines[lines.length - 1].split(' ');
    if (method === 'time') {
      timeE = Number(last[0]);
      rssKiB = Number(last[1]);
    } else rssKiB = Number(last[0]);
  }
  return { wallS, rssKiB, timeE };
}

export interface Stats {
  samples: Sample[];
  medianS: number;
  minS: number;
  /** Max over the runs of each run's peak RSS (KiB). */
  peakRssKiB: number;
}

export function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}

/** Lets the event loop run, so a SIGINT/SIGTERM handler gets to clean up between runs. */
const tick = () => new Promise<void>((r) => setImmediate(r));

/** `warmup` untimed runs, then `runs` timed ones. */
export async function bench(cmd: Command, opts: { runs: number; warmup: number; method: RssMethod; scratchDir: string; preload: string; before?: () => void }): Promise<Stats> {
  for (let i = 0; i < opts.warmup; i++) {
    await tick();
    opts.before?.();
    runOnce(cmd, opts.method, opts.scratchDir, opts.preload);
  }
  const samples: Sample[] = [];
  for (let i = 0; i < opts.runs; i++) {
    await tick();
    opts.before?.();
    samples.push(runOnce(cmd, opts.method, opts.scratchDir, opts.preload));
  }
  const walls = samples.map((s) => s.wallS);
  const rss = samples.map((s) => s.rssKiB).filter((x) => Number.isFinite(x));
  return { samples, medianS: median(walls), minS: Math.min(...walls), peakRssKiB: rss.length ? Math.max(...rss) : NaN };
}
