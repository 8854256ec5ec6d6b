// Preloaded (`node -r out/bench/rss-preload.js dist/cli.js …`) when /usr/bin/time is missing: at
// exit, writes this process's peak resident set size in KiB to $REPFUSE_BENCH_RSS_FILE.
//
// Why not simply `process.resourceUsage().maxRSS` here, or getrusage(RUSAGE_CHILDREN) in a wrapper:
//  * process.resourceUsage() is getrusage(RUSAGE_SELF). On Linux, exec() folds the *pre-exec*
//    image's high-water RSS into the process's ru_maxrss (signal->maxrss). libuv spawns with
//    fork(), and a forked child maps — and counts as resident — every page of its parent until it
//    execs. So a CLI spawned from a 600 MB parent reports maxRSS ≥ 600 MB even when it never
//    uses more than 40 MB (measured here: maxRSS 618 368 KiB vs VmHWM 40 448 KiB).
//  * getrusage(RUSAGE_CHILDREN) (what /usr/bin/time's wait4() rusage is for one child) reports the
//    ru_maxrss of the *largest* terminated-and-waited-for descendant, not a sum, accumulated over
//    the caller's whole life: a long-lived wrapper would report the biggest of all runs so far, and
//    it carries the same fork taint. Node has no API for it anyway.
//  * /proc/self/status VmHWM is the peak RSS of the current address space only, i.e. since exec:
//    exactly "what the CLI needed". We read that, and fall back to resourceUsage() (possibly
//    inflated by the spawner's size, see above) only where /proc is not available.
// /usr/bin/time is fine because it forks from its own tiny image before exec'ing the command.
import * as fs from 'node:fs';

const out = process.env.REPFUSE_BENCH_RSS_FILE;
if (out) {
  process.on('exit', () => {
    let kib: number | undefined;
    let how = 'VmHWM';
    try {
      const m = /^VmHWM:\s+(\d+)\s+kB/m.exec(fs.readFileSync('/proc/self/status', 'utf8'));
      if (m) kib = Number(m[1]);
    } catch {
      /* no /proc */
    }
    if (kib === undefined) {
      kib = process.resourceUsage().maxRSS; // KiB on Linux and macOS (Node normalizes)
      how = 'ru_maxrss';
    }
    fs.writeFileSync(out, `${kib} ${how}\n`);
  });
}
