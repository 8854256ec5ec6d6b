// Summarizes a V8 .cpuprofile (from `node --cpu-prof`): self and inclusive time per function,
// mapped back through the bundle's source map to src/ file:line. Also usable on its own:
//   node out/bench/profile.js <file.cpuprofile> [top=20]
import * as fs from 'node:fs';
import { SourceMap } from 'node:module';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';

interface CallFrame {
  functionName: string;
  url: string;
  lineNumber: number;
  columnNumber: number;
}

interface ProfileNode {
  id: number;
  callFrame: CallFrame;
  children?: number[];
  /** Samples per source line (1-based) of this node's function. */
  positionTicks?: { line: number; ticks: number }[];
}

interface CpuProfile {
  nodes: ProfileNode[];
  startTime: number;
  endTime: number;
  samples: number[];
  timeDeltas: number[];
}

export interface FunctionTime {
  name: string;
  where: string;
  selfMs: number;
  totalMs: number;
}

export interface LineTime {
  name: string;
  where: string;
  ms: number;
}

export interface ProfileSummary {
  totalMs: number;
  functions: FunctionTime[];
  /** Self time per source line (from positionTicks), hottest first. */
  lines: LineTime[];
}

const maps = new Map<string, SourceMap | null>();

function sourceMapFor(file: string): SourceMap | null {
  if (maps.has(file)) return maps.get(file)!;
  let sm: SourceMap | null = null;
  try {
    const payload = JSON.parse(fs.readFileSync(`${file}.map`, 'utf8'));
    sm = new SourceMap(payload);
  } catch {
    sm = null;
  }
  maps.set(file, sm);
  return sm;
}

/** `src/core/onnx/writer.ts:123` for bundled code, `node:fs` style for built-ins, else `file:line`. */
function locate(cf: CallFrame, root: string): string {
  if (!cf.url) return '';
  if (!cf.url.startsWith('file://')) return cf.url;
  const file = fileURLToPath(cf.url);
  const sm = sourceMapFor(file);
  if (sm) {
    const e = sm.findEntry(cf.lineNumber, cf.columnNumber) as { originalSource?: string; originalLine?: number };
    if (e && e.originalSource !== undefined && e.originalLine !== undefined) {
      const src = e.originalSource.startsWith('file://') ? fileURLToPath(e.originalSource) : path.resolve(path.dirname(file), e.originalSource);
      return `${path.relative(root, src)}:${e.originalLine + 1}`;
    }
  }
  return `${path.relative(root, file)}:${cf.lineNumber + 1}`;
}

const generated = new Map<string, string[]>();

/** Maps a 1-based generated line to `src/…:line` (first statement on the line), or undefined. */
function locateLine(url: string, line: number, root: string): string | undefined {
  if (!url.startsWith('file://')) return undefined;
  const file = fileURLToPath(url);
  const sm = sourceMapFor(file);
  let text = generated.get(file);
  if (!text) {
    try {
      text = fs.readFileSync(file, 'utf8').split('\n');
    } catch {
      text = [];
    }
    generated.set(file, text);
  }
  if (!sm) return `${path.relative(root, file)}:${line}`;
  // The first non-blank column: a column-0 lookup on an indented line would return the
  // previous line's last mapping.
  const col = Math.max(0, (text[line - 1] ?? '').search(/\S/));
  const e = sm.findEntry(line - 1, col) as { originalSource?: string; originalLine?: number; generatedLine?: number };
  if (!e || e.originalSource === undefined || e.originalLine === undefined || e.generatedLine !== line - 1) return undefined;
  const src = e.originalSource.startsWith('file://') ? fileURLToPath(e.originalSource) : path.resolve(path.dirname(file), e.originalSource);
  return `${path.relative(root, src)}:${e.originalLine + 1}`;
}

export function summarizeProfile(file: string, root = process.cwd()): ProfileSummary {
  const prof = JSON.parse(fs.readFileSync(file, 'utf8')) as CpuProfile;
  const byId = new Map<number, ProfileNode>();
  const parent = new Map<number, number>();
  for (const n of prof.nodes) {
    byId.set(n.id, n);
    for (const c of n.children ?? []) parent.set(c, n.id);
  }
  const keyOf = new Map<number, string>();
  const info = new Map<string, FunctionTime>();
  for (const n of prof.nodes) {
    const cf = n.callFrame;
    const name = cf.functionName || (cf.url ? '(anonymous)' : '(root)');
    const where = locate(cf, root);
    const key = `${name}@${where}`;
    keyOf.set(n.id, key);
    if (!info.has(key)) info.set(key, { name, where, selfMs: 0, totalMs: 0 });
  }
  let totalMs = 0;
  for (let i = 0; i < prof.samples.length; i++) {
    // timeDeltas[i] is the time since the previous sample: charge it to sample i.
    const ms = (prof.timeDeltas[i] ?? 0) / 1000;
    totalMs += ms;
    const id = prof.samples[i];
    info.get(keyOf.get(id)!)!.selfMs += ms;
    const seen = new Set<string>();
    for (let p: number | undefined = id; p !== undefined; p = parent.get(p)) {
      const k = keyOf.get(p)!;
      if (seen.has(k)) continue; // recursion: count once per sample
      seen.add(k);
      info.get(k)!.totalMs += ms;
    }
  }
  const functions = [...info.values()].filter((f) => f.name !== '(root)');
  // positionTicks count samples per line; share each node's self time out in those proportions
  // (samples are not evenly spaced, so ticks × average interval would not add up).
  const selfById = new Map<number, number>();
  for (let i = 0; i < prof.samples.length; i++) selfById.set(prof.samples[i], (selfById.get(prof.samples[i]) ?? 0) + (prof.timeDeltas[i] ?? 0) / 1000);
  const lines = new Map<string, LineTime>();
  for (const n of prof.nodes) {
    const ticks = (n.positionTicks ?? []).reduce((a, t) => a + t.ticks, 0);
    if (!ticks || !n.callFrame.url.startsWith('file://')) continue;
    for (const t of n.positionTicks!) {
      const where = locateLine(n.callFrame.url, t.line, root) ?? `${path.relative(root, fileURLToPath(n.callFrame.url))}:${t.line}`;
      const name = n.callFrame.functionName || '(anonymous)';
      const key = `${name}@${where}`;
      const l = lines.get(key) ?? { name, where, ms: 0 };
      l.ms += ((selfById.get(n.id) ?? 0) * t.ticks) / ticks;
      lines.set(key, l);
    }
  }
  return { totalMs, functions, lines: [...lines.values()].sort((a, b) => b.ms - a.ms) };
}

export function renderProfile(s: ProfileSummary, top = 20): string {
  const pct = (ms: number) => `${((100 * ms) / s.totalMs).toFixed(1).padStart(5)} %`;
  const fmt = (f: FunctionTime, ms: number) => `  ${ms.toFixed(1).padStart(8)} ms ${pct(ms)}  ${f.name.slice(0, 40).padEnd(40)} ${f.where}`;
  const out = [`sampled ${s.totalMs.toFixed(0)} ms`, '', 'top self time:'];
  for (const f of [...s.functions].sort((a, b) => b.selfMs - a.selfMs).slice(0, top)) out.push(fmt(f, f.selfMs));
  out.push('', 'hottest lines (self time):');
  for (const l of s.lines.slice(0, Math.min(top, 12))) out.push(`  ${l.ms.toFixed(1).padStart(8)} ms ${pct(l.ms)}  ${l.name.slice(0, 40).padEnd(40)} ${l.where}`);
  out.push('', 'top inclusive time (src/ only):');
  const ours = s.functions.filter((f) => f.where.startsWith('src/'));
  for (const f of ours.sort((a, b) => b.totalMs - a.totalMs).slice(0, top)) out.push(fmt(f, f.totalMs));
  return out.join('\n');
}

if (require.main === module) {
  const [file, top] = process.argv.slice(2);
  if (!file) {
    process.stderr.write('usage: node out/bench/profile.js <file.cpuprofile> [top]\n');
    process.exit(2);
  }
  process.stdout.write(renderProfile(summarizeProfile(file), top ? Number(top) : 20) + '\n');
}
