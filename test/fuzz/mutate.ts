// Seeded mutations. Every case is a pure function of (seed, reader, case index): the harness can
// regenerate any case to reproduce it. Generic byte-level mutations apply to every format; the
// structure-aware ones target what readers must distrust: length and size fields set to huge or
// lying values, duplicated / reordered / overlapping entries, hostile pickle content.
import { onnx } from 'onnx-proto';
import { Rng } from '../../src/core/random';
import { ZipWriter } from '../../src/core/torch/zip';
import type { Reader, Seed } from './corpus';
import * as H from './hostile';
import { OPCODES, type Instr } from './pickleops';
import { allFields, cloneFields, type PField, serialize } from './proto';

export class FuzzRng extends Rng {
  int(n: number): number {
    return Math.floor(this.next() * n);
  }
  pick<T>(a: readonly T[]): T {
    return a[this.int(a.length)];
  }
  chance(p: number): boolean {
    return this.next() < p;
  }
}

/** FNV-1a of the case coordinates: one independent stream per case. */
export function caseSeed(seed: number, reader: string, index: number): number {
  let h = 0x811c9dc5 ^ seed;
  for (const c of `${reader}:${index}`) h = Math.imul(h ^ c.charCodeAt(0), 0x01000193);
  return h >>> 0;
}

/** Values that break length and size arithmetic, for a field of `width` bytes. */
function interesting(r: FuzzRng, width: number, size: number, orig?: number): bigint {
  const v = r.pick<number | bigint | 'size' | 'orig'>([
    0, 1, 2, 7, 0x7f, 0x80, 0xff, 0x100, 0x7fff, 0x8000, 0xffff, 0x10000, 0x7fffffff, 0x80000000, 0xffffffff, 2 ** 32,
    2 ** 53 - 1, 2 ** 53, 2n ** 63n - 1n, 2n ** 64n - 1n, 'size', 'size', 'orig', 'orig', 'orig',
  ]);
  let x: bigint;
  if (v === 'size') x = BigInt(size + r.int(17) - 8);
  else if (v === 'orig') x = BigInt((orig ?? size) + r.pick([-64, -8, -1, 1, 2, 8, 64, 4096, 1 << 20, 1 << 30]));
  else x = BigInt(v);
  return BigInt.asUintN(width * 8, x);
}

function writeUint(b: Uint8Array, at: number, width: number, v: bigint): void {
  for (let i = 0; i < width && at + i < b.length; i++) b[at + i] = Number((v >> BigInt(8 * i)) & 0xffn);
}

function readUint(b: Uint8Array, at: number, width: number): number {
  let n = 0;
  for (let i = width - 1; i >= 0; i--) n = n * 256 + (b[at + i] ?? 0);
  return n;
}

/** Always a plain Uint8Array: Buffer#slice would be a view, not a copy. */
const concat = (...parts: Uint8Array[]): Uint8Array => {
  const out = new Uint8Array(parts.reduce((a, p) => a + p.length, 0));
  let o = 0;
  for (const p of parts) {
    out.set(p, o);
    o += p.length;
  }
  return out;
};
const splice = (b: Uint8Array, start: number, del: number, ins: Uint8Array = new Uint8Array(0)) =>
  concat(b.subarray(0, start), ins, b.subarray(start + del));

// ----- generic -----------------------------------------------------------------------------------

function generic(r: FuzzRng, b: Uint8Array, others: Seed[]): [Uint8Array, string] {
  const n = b.length;
  const pos = () => r.int(Math.max(1, n));
  switch (r.int(9)) {
    case 0: {
      const at = r.chance(0.5) ? pos() : Math.max(0, n - 1 - r.int(64));
      return [b.slice(0, at), `truncate at ${at}`];
    }
    case 1: {
      const c = b.slice();
      const k = 1 + r.int(8);
      for (let i = 0; i < k; i++) c[pos()] ^= 1 << r.int(8);
      return [c, `flip ${k} bits`];
    }
    case 2: {
      const c = b.slice();
      const k = 1 + r.int(4);
      for (let i = 0; i < k; i++) c[pos()] = r.pick([0, 0xff, 0x7f, 0x80, 0x0a, 0x2e, 0x28]);
      return [c, `set ${k} bytes`];
    }
    case 3: {
      const c = b.slice();
      const w = r.pick([2, 4, 8]);
      const at = pos();
      writeUint(c, at, w, interesting(r, w, n, readUint(c, at, w)));
      return [c, `int${w * 8} at ${at}`];
    }
    case 4: {
      const ins = new Uint8Array(1 + r.int(64)).map(() => r.int(256));
      const at = pos();
      return [splice(b, at, 0, ins), `insert ${ins.length} bytes at ${at}`];
    }
    case 5: {
      const at = pos();
      const len = 1 + r.int(256);
      return [splice(b, at, len), `delete ${len} bytes at ${at}`];
    }
    case 6: {
      const from = pos();
      const len = 1 + r.int(1024);
      const at = pos();
      return [splice(b, at, 0, b.slice(from, from + len)), `duplicate [${from}, +${len}) at ${at}`];
    }
    case 7: {
      const o = r.pick(others).bytes;
      const at = pos();
      const from = r.int(Math.max(1, o.length));
      return [concat(b.subarray(0, at), o.subarray(from)), `crossover at ${at}`];
    }
    default: {
      // Zero a range (sizes read as 0, names empty).
      const c = b.slice();
      const at = pos();
      c.fill(0, at, at + 1 + r.int(32));
      return [c, `zero at ${at}`];
    }
  }
}

// ----- protobuf (ONNX) ---------------------------------------------------------------------------

const NAME_FIELDS: Record<string, number[]> = { node: [1, 2, 3], tensor: [8], valueinfo: [1], graph: [2] };

function onnxMutation(r: FuzzRng, seed: Seed): [Uint8Array, string] {
  const tree = cloneFields(seed.tree!);
  const all = allFields(tree);
  const { f, list, depth } = r.pick(all);
  const where = `field ${f.field} (depth ${depth})`;
  let desc: string;
  switch (r.int(8)) {
    case 0:
      list.splice(list.indexOf(f) + (r.chance(0.5) ? 1 : 0), 0, cloneFields([f])[0]);
      desc = `duplicate ${where}`;
      break;
    case 1:
      list.splice(list.indexOf(f), 1);
      desc = `delete ${where}`;
      break;
    case 2: {
      const i = list.indexOf(f);
      const j = r.int(list.length);
      [list[i], list[j]] = [list[j], list[i]];
      desc = `swap ${where} with sibling ${j}`;
      break;
    }
    case 3: {
      // A varint (dims, data_type, ir_version, attribute ints…) set to a hostile value.
      const vs = all.filter((x) => x.f.wireType === 0);
      if (!vs.length) return generic(r, serialize(tree), []);
      const v = r.pick(vs).f;
      v.varint = r.pick([0n, 1n, 2n ** 31n, 2n ** 32n, 2n ** 53n, 2n ** 62n, 2n ** 64n - 1n, 2n ** 64n - 2n, BigInt(r.int(1000)), (v.varint ?? 0n) + 1n]);
      desc = `varint field ${v.field} := ${v.varint}`;
      break;
    }
    case 4: {
      // A lying length prefix (huge, or a little too long).
      const lens = all.filter((x) => x.f.wireType === 2);
      const v = r.pick(lens).f;
      const real = BigInt(v.children ? serialize(v.children).length : (v.bytes?.length ?? 0));
      v.lieLength = r.pick([2n ** 31n - 1n, 2n ** 32n, 2n ** 53n, 2n ** 63n, 2n ** 64n - 1n, real + 1n, real + 100n, real + 65536n]);
      desc = `length of field ${v.field} := ${v.lieLength} (real ${real})`;
      break;
    }
    case 5: {
      // Name collisions: a node's input/output or a tensor's name copied from elsewhere.
      const named = all.filter((x) => x.f.wireType === 2 && x.f.bytes && x.f.bytes.length < 256 && NAME_FIELDS[x.kind]?.includes(x.f.field));
      if (named.length < 2) return generic(r, serialize(tree), []);
      const a = r.pick(named).f;
      const b = r.pick(named).f;
      a.bytes = b.bytes;
      desc = `string field ${a.field} := field ${b.field}'s`;
      break;
    }
    case 6: {
      // Wire type confusion.
      f.wireType = r.pick([0, 1, 2, 5].filter((w) => w !== f.wireType));
      if (f.wireType === 0) f.varint = BigInt(r.int(1 << 20));
      else if (f.wireType !== 2) f.bytes = new Uint8Array(f.wireType === 1 ? 8 : 4).map(() => r.int(256));
      else if (!f.children && !f.bytes) f.bytes = new Uint8Array(r.int(16));
      desc = `wire type of ${where} := ${f.wireType}`;
      break;
    }
    default: {
      // An opaque payload (raw_data, a name, packed dims) resized or replaced.
      const ops = all.filter((x) => x.f.wireType === 2 && x.f.bytes);
      if (!ops.length) return generic(r, serialize(tree), []);
      const v = r.pick(ops).f;
      const old = v.bytes!;
      v.bytes = r.chance(0.5) ? old.subarray(0, r.int(old.length + 1)) : concat(old, new Uint8Array(1 + r.int(64)).map(() => r.int(256)));
      desc = `payload of field ${v.field}: ${old.length} → ${v.bytes.length} bytes`;
    }
  }
  return [serialize(tree), desc];
}

/**
 * An If node whose then_branch holds an If node whose then_branch… `depth` levels, the innermost
 * reading a tensor of the outer graph. Encoded by hand, outside in (protobufjs would recurse).
 */
export function nestedIf(depth: number): Uint8Array {
  const bytes = (fields: PField[]) => serialize(fields);
  const strf = (field: number, v: string): PField => ({ field, wireType: 2, bytes: Buffer.from(v) });
  const leaf = bytes([{ field: 1, wireType: 2, bytes: bytes([strf(1, 'fuzz_outer'), strf(2, 'y'), strf(4, 'Identity')]) }, strf(2, 'leaf')]);
  // Each level: node {input, output, op_type, attribute {name, type, g: graph {name, node: <next level>}}}.
  const nodeHead = bytes([strf(1, 'cond'), strf(2, 'y'), strf(4, 'If')]);
  const attrHead = bytes([strf(1, 'then_branch'), { field: 20, wireType: 0, varint: 5n }]);
  const graphHead = bytes([strf(2, 'g')]);
  const vlen = (v: number) => (v < 128 ? 1 : v < 16384 ? 2 : v < 2097152 ? 3 : v < 268435456 ? 4 : 5);
  // Sizes inside out: node_i contains attr_i contains graph_{i-1} contains node_{i-1}.
  const nodeSize: number[] = [];
  let graphSize = leaf.length; // graph_0
  for (let i = 1; i <= depth; i++) {
    const attr = attrHead.length + 1 + vlen(graphSize) + graphSize;
    nodeSize[i] = nodeHead.length + 1 + vlen(attr) + attr;
    graphSize = graphHead.length + 1 + vlen(nodeSize[i]) + nodeSize[i];
  }
  const out: number[] = [];
  const varint = (v: number) => {
    while (v >= 128) {
      out.push((v % 128) | 0x80);
      v = Math.floor(v / 128);
    }
    out.push(v);
  };
  const put = (b: Uint8Array) => {
    for (const x of b) out.push(x);
  };
  for (let i = depth; i >= 1; i--) {
    const inner = i > 1 ? graphHead.length + 1 + vlen(nodeSize[i - 1]) + nodeSize[i - 1] : leaf.length;
    const attr = attrHead.length + 1 + vlen(inner) + inner;
    put(nodeHead);
    out.push(5 * 8 + 2);
    varint(attr);
    put(attrHead);
    out.push(6 * 8 + 2);
    varint(inner);
    if (i > 1) {
      put(graphHead);
      out.push(1 * 8 + 2);
      varint(nodeSize[i - 1]);
    }
  }
  put(leaf);
  return Uint8Array.from(out);
}

/** Hostile graphs grafted onto a real model: long Identity and Add chains, huge Sums, deep subgraphs, cycles. */
function onnxHostile(r: FuzzRng, seed: Seed, max: number): [Uint8Array, string] {
  const tree = cloneFields(seed.tree!);
  const graph = tree.find((f) => f.field === 7 && f.children)?.children;
  if (!graph) return [serialize(tree), 'no graph'];
  const str = (f: PField | undefined) => (f?.bytes ? Buffer.from(f.bytes).toString('utf8') : '');
  const nodes = graph.filter((f) => f.field === 1 && f.children);
  const convs = nodes.filter((n) => str(n.children!.find((c) => c.field === 4)) === 'Conv');
  const conv = convs.length ? r.pick(convs) : undefined;
  const ins = (n: PField) => n.children!.filter((c) => c.field === 1).map(str);
  const outs = (n: PField) => n.children!.filter((c) => c.field === 2).map(str);
  const node = (op: string, input: string[], output: string[], extra: onnx.INodeProto = {}): PField => ({ field: 1, wireType: 2, bytes: onnx.NodeProto.encode({ opType: op, input, output, name: `/fuzz/${op}_${r.int(1e9)}`, ...extra }).finish() });
  /** Inserts at `at` without spreading (tens of thousands of fields would overflow the stack). */
  const insertAt = (at: number, fs: PField[]) => {
    const rest = graph.splice(at);
    for (const f of fs) graph.push(f);
    for (const f of rest) graph.push(f);
  };
  const add = (fs: PField[]) => insertAt(graph.indexOf(nodes[nodes.length - 1] ?? graph[0]) + 1, fs);
  const n = (lo: number, hi: number) => Math.min(max, lo + r.int(hi - lo));
  switch (r.int(6)) {
    case 0: {
      if (!conv) return [serialize(tree), 'no conv'];
      const k = r.pick([3, 300, n(5000, 60000)]);
      const w = ins(conv)[1];
      const chain: PField[] = [];
      let prev = w;
      for (let i = 0; i < k; i++) {
        const out = `fuzz_id_${i}`;
        chain.push(node('Identity', [prev], [out]));
        prev = out;
      }
      const wf = conv.children!.filter((c) => c.field === 1)[1];
      if (wf) wf.bytes = Buffer.from(prev);
      insertAt(graph.indexOf(conv), chain);
      return [serialize(tree), `conv weight behind ${k} Identity nodes`];
    }
    case 1: {
      if (!conv) return [serialize(tree), 'no conv'];
      const k = r.pick([10, 1000, n(5000, 60000)]);
      const y = outs(conv)[0];
      const chain: PField[] = [node('Add', [y, y], ['fuzz_sum_0'])];
      for (let i = 1; i < k; i++) chain.push(node('Add', [`fuzz_sum_${i - 1}`, y], [`fuzz_sum_${i}`]));
      add(chain);
      return [serialize(tree), `chain of ${k} Adds`];
    }
    case 2: {
      if (!conv) return [serialize(tree), 'no conv'];
      const k = r.pick([50, 2000, n(20000, 150000)]);
      const [x, w] = ins(conv);
      const many: PField[] = [];
      const terms: string[] = [];
      for (let i = 0; i < k; i++) {
        terms.push(`fuzz_c${i}`);
        many.push(node('Conv', [x, w], [`fuzz_c${i}`]));
      }
      many.push(node('Sum', terms, ['fuzz_sum']));
      add(many);
      return [serialize(tree), `Sum of ${k} convolutions`];
    }
    case 3: {
      const k = r.pick([10, 200, n(1000, 20000)]);
      add([{ field: 1, wireType: 2, bytes: nestedIf(k) }]);
      return [serialize(tree), `subgraphs nested ${k} deep`];
    }
    case 4: {
      // Cycles: an Add reading its own output, an Identity loop feeding a conv weight.
      add([node('Add', ['fuzz_loop', 'fuzz_loop'], ['fuzz_loop']), node('Identity', ['fuzz_b'], ['fuzz_a']), node('Identity', ['fuzz_a'], ['fuzz_b'])]);
      if (conv) {
        const wf = conv.children!.filter((c) => c.field === 1)[1];
        if (wf) wf.bytes = Buffer.from('fuzz_a');
      }
      return [serialize(tree), 'graph cycles'];
    }
    default: {
      const k = r.pick([1000, n(50000, 200000)]);
      const chain: PField[] = [];
      for (let i = 0; i < k; i++) chain.push(node('Relu', [i ? `fuzz_r${i - 1}` : 'fuzz_in'], [`fuzz_r${i}`]));
      add(chain);
      return [serialize(tree), `${k} extra nodes`];
    }
  }
}

// ----- zip ---------------------------------------------------------------------------------------

/** Rewrites the central directory from `records` (bytes), with consistent end records. */
function rebuildZip(b: Uint8Array, seed: Seed, records: Uint8Array[]): Uint8Array {
  const z = seed.zip!;
  const cd = concat(...records);
  const head = b.subarray(0, z.cdOffset);
  const cdSize = cd.length;
  const n = records.length;
  const tail: Uint8Array[] = [];
  if (z.z64Record !== undefined) {
    const rec = b.slice(z.z64Record, z.z64Locator!);
    const rv = new DataView(rec.buffer, rec.byteOffset, rec.length);
    rv.setBigUint64(24, BigInt(n), true);
    rv.setBigUint64(32, BigInt(n), true);
    rv.setBigUint64(40, BigInt(cdSize), true);
    const loc = b.slice(z.z64Locator!, z.eocd);
    new DataView(loc.buffer, loc.byteOffset, loc.length).setBigUint64(8, BigInt(z.cdOffset + cdSize), true);
    tail.push(rec, loc);
  }
  const eocd = b.slice(z.eocd);
  const ev = new DataView(eocd.buffer, eocd.byteOffset, eocd.length);
  ev.setUint16(8, Math.min(n, 0xffff), true);
  ev.setUint16(10, Math.min(n, 0xffff), true);
  ev.setUint32(12, cdSize, true);
  tail.push(eocd);
  return concat(head, cd, ...tail);
}

function zipMutation(r: FuzzRng, seed: Seed): [Uint8Array, string] {
  const b = seed.bytes.slice();
  const z = seed.zip!;
  const dv = new DataView(b.buffer, b.byteOffset, b.length);
  const recs = z.records;
  const ri = r.int(recs.length);
  const rec = recs[ri];
  const recBytes = (): Uint8Array[] => recs.map((x) => b.slice(x.start, x.end));
  switch (r.int(8)) {
    case 0: {
      // A central directory field: sizes, offset, lengths, method, flags.
      const [off, w, what] = r.pick([[20, 4, 'compressed size'], [24, 4, 'size'], [42, 4, 'local offset'], [28, 2, 'name length'], [30, 2, 'extra length'], [32, 2, 'comment length'], [10, 2, 'method'], [8, 2, 'flags'], [34, 2, 'disk']] as const);
      const v = interesting(r, w, b.length, readUint(b, rec.start + off, w));
      writeUint(b, rec.start + off, w, v);
      return [b, `entry ${ri} ${what} := ${v}`];
    }
    case 1: {
      // A local header field.
      const lo = rec.localOffset;
      const [off, w, what] = r.pick([[26, 2, 'local name length'], [28, 2, 'local extra length'], [18, 4, 'local compressed size'], [22, 4, 'local size'], [8, 2, 'local method'], [0, 4, 'local signature']] as const);
      const v = interesting(r, w, b.length, readUint(b, lo + off, w));
      writeUint(b, lo + off, w, v);
      return [b, `entry ${ri} ${what} := ${v}`];
    }
    case 2: {
      // End records: entry counts, directory size and offset (classic and ZIP64).
      const fields: [number, number, string][] = [[z.eocd + 8, 2, 'EOCD count'], [z.eocd + 10, 2, 'EOCD total'], [z.eocd + 12, 4, 'EOCD cd size'], [z.eocd + 16, 4, 'EOCD cd offset'], [z.eocd + 20, 2, 'EOCD comment length']];
      if (z.z64Record !== undefined) {
        fields.push([z.z64Record + 24, 8, 'ZIP64 count'], [z.z64Record + 32, 8, 'ZIP64 total'], [z.z64Record + 40, 8, 'ZIP64 cd size'], [z.z64Record + 48, 8, 'ZIP64 cd offset'], [z.z64Record + 4, 8, 'ZIP64 record size'], [z.z64Locator! + 8, 8, 'ZIP64 locator offset'], [z.z64Locator! + 16, 4, 'ZIP64 disks']);
      }
      const [at, w, what] = r.pick(fields);
      const v = interesting(r, w, b.length, readUint(b, at, w));
      writeUint(b, at, w, v);
      return [b, `${what} := ${v}`];
    }
    case 3: {
      // Duplicate a central record (same name twice, or the copy renamed: two entries, one local header).
      const rs = recBytes();
      const copy = rs[ri].slice();
      const renamed = r.chance(0.5);
      if (renamed && copy.length > 46) copy[46 + (dv.getUint16(rec.start + 28, true) - 1)] ^= 0x01;
      rs.splice(ri + 1, 0, copy);
      return [rebuildZip(b, seed, rs), `duplicate central record ${ri}${renamed ? ' (renamed: overlapping entries)' : ''}`];
    }
    case 4: {
      // Reorder or drop central records.
      const rs = recBytes();
      if (r.chance(0.3)) {
        rs.splice(ri, 1);
        return [rebuildZip(b, seed, rs), `drop central record ${ri}`];
      }
      for (let i = rs.length - 1; i > 0; i--) {
        const j = r.int(i + 1);
        [rs[i], rs[j]] = [rs[j], rs[i]];
      }
      return [rebuildZip(b, seed, rs), 'shuffle central records'];
    }
    case 5: {
      // Rename an entry: traversal, absolute, drive, another entry's name.
      const rs = recBytes();
      const nameLen = dv.getUint16(rec.start + 28, true);
      const oldName = Buffer.from(b.subarray(rec.start + 46, rec.start + 46 + nameLen)).toString('utf8');
      const o = recs[r.int(recs.length)];
      const other = Buffer.from(b.subarray(o.start + 46, o.start + 46 + dv.getUint16(o.start + 28, true))).toString('utf8');
      const name = r.pick(['../evil', `${oldName.split('/')[0]}/../../etc/passwd`, '/etc/passwd', 'C:\\evil', '', 'a\0b', other || 'x/data.pkl', `other/${oldName.split('/').slice(1).join('/')}`, `${oldName}/`]);
      const nb = Buffer.from(name, 'utf8');
      const head = rs[ri].slice(0, 46);
      new DataView(head.buffer).setUint16(28, nb.length, true);
      rs[ri] = concat(head, nb, rs[ri].subarray(46 + nameLen));
      return [rebuildZip(b, seed, rs), `rename entry ${ri} to ${JSON.stringify(name)}`];
    }
    case 6: {
      // Point an entry's local offset at another entry's header (overlap), or between entries.
      const other = recs[r.int(recs.length)];
      const v = r.chance(0.6) ? other.localOffset : other.localOffset + 1 + r.int(64);
      dv.setUint32(rec.start + 42, v >>> 0, true);
      return [b, `entry ${ri} local offset := ${v} (overlap)`];
    }
    default: {
      // Saturated (ZIP64-style) central fields without the extra field that should follow.
      const off = r.pick([20, 24, 42]);
      dv.setUint32(rec.start + off, 0xffffffff, true);
      return [b, `entry ${ri} field ${off} := 0xffffffff (ZIP64 marker)`];
    }
  }
}

// ----- pickles -----------------------------------------------------------------------------------

/** The snippets spliced in as values: hostile globals, deep and self-referencing structures. */
function hostileValue(r: FuzzRng, max: number): [Uint8Array, string] {
  const n = (lo: number, hi: number) => Math.min(max, lo + r.int(hi - lo));
  switch (r.int(14)) {
    case 0:
      return [H.call(H.glob(r.pick(['os', 'posix', 'nt']), 'system'), H.X('touch /tmp/repfuse-fuzz-marker')), 'os.system call'];
    case 1:
      return [H.call(H.glob(r.pick(['builtins', '__builtin__']), r.pick(['eval', 'exec', 'getattr', '__import__'])), H.X('1+1')), 'builtins eval/exec call'];
    case 2:
      return [H.call(H.stackGlob(r.pick(['subprocess', 'posix', 'builtins']), r.pick(['Popen', 'system', 'exec'])), H.X('id')), 'STACK_GLOBAL dangerous call'];
    case 3:
      return [H.reduceChain(H.glob('builtins', 'getattr'), 'system', n(2, 50)), '__reduce__ chain'];
    case 4: {
      const k = r.pick([10, 1000, n(20000, 60000)]);
      return [H.deepList(k), `list nested ${k} deep`];
    }
    case 5: {
      const k = r.pick([100, 9999, 10001, 50000]);
      return [H.deepMarks(k), `${k} nested MARKs`];
    }
    case 6: {
      const k = n(1000, 300000);
      return [H.dupFlood(k), `DUP flood ${k}`];
    }
    case 7:
      return [r.chance(0.5) ? H.selfList() : H.selfDict(), 'self-referencing container'];
    case 8: {
      const k = n(20, 200);
      return [H.tupleDag(k), `tuple DAG 2^${k}`];
    }
    case 9: {
      const k = n(1000, 200000);
      return [H.memoFlood(k), `memo flood ${k}`];
    }
    case 10: {
      const k = r.pick([10, 70000, n(130000, 250000)]);
      return [r.chance(0.5) ? H.bigAppends(k) : H.bigAdditems(k), `APPENDS/ADDITEMS of ${k} on an object`];
    }
    case 11: {
      const k = r.pick([3, 200, n(2000, 30000)]);
      return [H.deepModules(k), `modules nested ${k} deep`];
    }
    case 12: {
      // A long LONG4 integer (the reader's limit is 65536 bytes).
      const len = r.pick([8, 65536, 65537]);
      return [H.pk(0x8b, [len & 0xff, (len >> 8) & 0xff, (len >> 16) & 0xff, 0], new Uint8Array(len).fill(0x41)), `LONG4 of ${len} bytes`];
    }
    default: {
      const s = r.pick(['__proto__', 'constructor', 'a.'.repeat(n(10, 40000)) + 'weight', 'x'.repeat(n(1, 100000)), '\u202e\x1b[2J', 'model.0.rbr_dense.conv.weight']);
      return [H.X(s), `string of ${s.length} chars`];
    }
  }
}

function pickleMutation(r: FuzzRng, b: Uint8Array, instrs: Instr[], base: number, max: number): [Uint8Array, string] {
  if (!instrs.length) return [b, 'no instructions'];
  const ins = r.pick(instrs);
  const rel = `op 0x${ins.op.toString(16)} at ${ins.at - base}`;
  switch (r.int(10)) {
    case 0: {
      // Length prefixes (BINUNICODE, BINBYTES, LONG4, FRAME, …) to huge or slightly wrong values.
      const ls = instrs.filter((x) => x.isLength);
      if (!ls.length) return [b, 'no length fields'];
      const x = r.pick(ls);
      const c = b.slice();
      const v = interesting(r, x.argWidth, b.length - x.end, readUint(b, x.argAt, x.argWidth));
      writeUint(c, x.argAt, x.argWidth, v);
      return [c, `length of op 0x${x.op.toString(16)} at ${x.at - base} := ${v}`];
    }
    case 1: {
      // Memo indexes and integers (shapes, strides, offsets, element counts).
      const ns = instrs.filter((x) => !x.isLength && x.argWidth > 0 && x.op !== 0x80 && x.op !== 0x47);
      if (!ns.length) return [b, 'no integers'];
      const x = r.pick(ns);
      const c = b.slice();
      const v = interesting(r, x.argWidth, 1 << 20, readUint(b, x.argAt, x.argWidth));
      writeUint(c, x.argAt, x.argWidth, v);
      return [c, `argument of op 0x${x.op.toString(16)} at ${x.at - base} := ${v}`];
    }
    case 2: {
      const c = b.slice();
      c[ins.at] = r.pick(OPCODES);
      return [c, `${rel} := op 0x${c[ins.at].toString(16)}`];
    }
    case 3:
      return [splice(b, ins.at, ins.end - ins.at), `delete ${rel}`];
    case 4: {
      const j = Math.min(instrs.length - 1, instrs.indexOf(ins) + r.int(8));
      const seg = b.slice(ins.at, instrs[j].end);
      return [splice(b, r.chance(0.5) ? ins.at : instrs[j].end, 0, seg), `duplicate ops ${rel}..+${j - instrs.indexOf(ins)}`];
    }
    case 5: {
      const i = instrs.indexOf(ins);
      if (i + 1 >= instrs.length) return [b, 'no swap'];
      const nx = instrs[i + 1];
      return [concat(b.subarray(0, ins.at), b.subarray(nx.at, nx.end), b.subarray(ins.at, ins.end), b.subarray(nx.end)), `swap ${rel} with the next op`];
    }
    case 6:
    case 7: {
      // A hostile value stored in the root dict (key, value, SETITEM before STOP), or pushed and popped anywhere.
      const [v, what] = hostileValue(r, max);
      const stop = instrs[instrs.length - 1];
      if (stop.op === 0x2e && r.chance(0.7)) {
        const key = r.chance(0.5) ? H.X('model.0.extra') : v;
        return [splice(b, stop.at, 0, H.pk(key, key === v ? H.pk('N') : v, 's')), `${what} set in the root`];
      }
      return [splice(b, ins.at, 0, H.pk(v, '0')), `${what} pushed and popped at ${ins.at - base}`];
    }
    case 8: {
      // A string (a state_dict key, a class name) replaced.
      const ss = instrs.filter((x) => x.op === 0x58 || x.op === 0x8c);
      if (!ss.length) return [b, 'no strings'];
      const x = r.pick(ss);
      const [v, what] = hostileValue(r, max);
      const s = v[0] === 0x58 ? v : H.X('a.'.repeat(1 + r.int(3000)) + 'weight');
      return [splice(b, x.at, x.end - x.at, s), `string at ${x.at - base} := ${what}`];
    }
    default:
      return [b.slice(0, ins.at + r.int(ins.end - ins.at + 1)), `truncate inside ${rel}`];
  }
}

async function rewrapPickle(seed: Seed, pkl: Uint8Array): Promise<Uint8Array> {
  const chunks: Uint8Array[] = [];
  const zw = new ZipWriter((c) => chunks.push(c.slice()));
  for (let i = 0; i < seed.entries!.length; i++) {
    const e = seed.entries![i];
    await zw.addBytes(e.name, i === seed.pklIndex ? pkl : e.data);
  }
  zw.finish();
  return concat(...chunks);
}

// ----- safetensors ---------------------------------------------------------------------------------

function safetensorsMutation(r: FuzzRng, seed: Seed): [Uint8Array, string] {
  const b = seed.bytes;
  const n = Number(Buffer.from(b.buffer, b.byteOffset, 8).readBigUInt64LE(0));
  const data = b.subarray(8 + n);
  const header = JSON.parse(JSON.stringify(seed.header)) as Record<string, unknown>;
  const names = Object.keys(header).filter((k) => k !== '__metadata__');
  const name = r.pick(names);
  const e = header[name] as { dtype: unknown; shape: unknown; data_offsets: unknown };
  const [b0, e0] = e.data_offsets as number[];
  let desc: string;
  let text: string | undefined;
  switch (r.int(9)) {
    case 0: {
      // The header length itself.
      const c = b.slice();
      const v = interesting(r, 8, b.length - 8, n);
      writeUint(c, 0, 8, v);
      return [c, `header length := ${v} (real ${n})`];
    }
    case 1: {
      const huge = r.pick([2 ** 53, 2 ** 53 + 2, 2 ** 64, 1e300, 0xffffffff, data.length + 1, data.length + 1000]);
      e.data_offsets = r.pick([[b0, huge], [huge, huge], [huge - 8, huge]]);
      desc = `${name} data_offsets := ${JSON.stringify(e.data_offsets)}`;
      break;
    }
    case 2: {
      // Overlapping or swapped offsets.
      const other = header[r.pick(names)] as { data_offsets: number[] };
      e.data_offsets = r.pick([other.data_offsets, [e0, b0], [b0 - 1, e0 - 1], [other.data_offsets[0] + 1, other.data_offsets[0] + 1 + (e0 - b0)], [-1, e0 - b0 - 1], [b0 + 0.5, e0 + 0.5], [String(b0), e0], [b0], [b0, e0, 0]]);
      desc = `${name} data_offsets := ${JSON.stringify(e.data_offsets)}`;
      break;
    }
    case 3: {
      const s = e.shape as number[];
      e.shape = r.pick([[2 ** 53], [2 ** 31, 2 ** 31], [-1, ...s.slice(1)], [1e20], [...s, 0], [...s, 1], [0.5], ['3'], [[3]], null, [], s.map((d) => d * 2), new Array(10000).fill(1)]);
      desc = `${name} shape := ${JSON.stringify(e.shape).slice(0, 60)}`;
      break;
    }
    case 4:
      e.dtype = r.pick(['F32', 'F16', 'I64', 'U8', 'BOOL', 'F8_E4M3', 'C64', 'f32', '', 7, null, '__proto__', 'constructor', 'toString']);
      desc = `${name} dtype := ${JSON.stringify(e.dtype)}`;
      break;
    case 5: {
      const md = r.pick<unknown>([{ a: 1 }, { __proto__: 'x' }, [], 'x', null, { k: 'x'.repeat(1 << 16) }, { ['x'.repeat(1000)]: 'y' }]);
      header.__metadata__ = md;
      desc = `__metadata__ := ${JSON.stringify(md).slice(0, 40)}`;
      break;
    }
    case 6: {
      // Raw JSON tricks: a tensor declared twice, deep nesting, trailing garbage, many entries.
      const base = JSON.stringify(header);
      const which = r.int(5);
      if (which === 0) text = `{${JSON.stringify(name)}:${JSON.stringify(e)},${base.slice(1)}`;
      else if (which === 1) text = `{"deep":${'['.repeat(100000)}${']'.repeat(100000)},${base.slice(1)}`;
      else if (which === 2) text = `${base}x`;
      else if (which === 3) text = `\ufeff${base}`;
      else {
        const extra = Array.from({ length: 20000 }, (_, i) => `"t${i}":{"dtype":"U8","shape":[1],"data_offsets":[${i % 8},${(i % 8) + 1}]}`).join(',');
        text = `{${extra},${base.slice(1)}`;
      }
      desc = `header JSON trick ${which}`;
      break;
    }
    case 7:
      header[name] = r.pick<unknown>([null, 1, 'x', [], { dtype: 'F32' }, { ...e, data_offsets: undefined }]);
      desc = `${name} entry := ${JSON.stringify(header[name])}`;
      break;
    default:
      return [b.slice(0, 8 + n + r.int(data.length)), 'truncate the data area'];
  }
  text ??= JSON.stringify(header);
  let json = Buffer.from(text, 'utf8');
  const pad = (8 - ((8 + json.length) % 8)) % 8;
  if (pad) json = Buffer.concat([json, Buffer.alloc(pad, 0x20)]);
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(json.length));
  return [concat(len, json, data), desc];
}

// ----- npy ---------------------------------------------------------------------------------------

function npyMutation(r: FuzzRng, seed: Seed): [Uint8Array, string] {
  const b = seed.bytes;
  const hl = b[8] | (b[9] << 8);
  const header = Buffer.from(b.subarray(10, 10 + hl)).toString('latin1');
  const data = b.subarray(10 + hl);
  let h = header;
  let version = 1;
  let desc: string;
  switch (r.int(6)) {
    case 0: {
      const c = b.slice();
      const v = interesting(r, 2, b.length, hl);
      writeUint(c, 8, 2, v);
      return [c, `header length := ${v}`];
    }
    case 1: {
      const shape = r.pick(['(99999999999,)', '(9007199254740993,)', '(-1,)', '(1e3,)', "('a',)", '((1,),)', '(2**62,)', '(0x10,)', '(1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33)', '()', '(4294967296, 4294967296)']);
      h = header.replace(/'shape':\s*\([^)]*\)/, `'shape': ${shape}`);
      desc = `shape := ${shape}`;
      break;
    }
    case 2: {
      const d = r.pick(['>f4', '|O', '<c8', '<U10', '<f4', '|u1', '<i8', "<f4', 'x': '", 'V8']);
      h = header.replace(/'descr':\s*'[^']*'/, `'descr': '${d}'`);
      desc = `descr := ${d}`;
      break;
    }
    case 3:
      h = header.replace('False', 'True');
      desc = 'fortran_order := True';
      break;
    case 4:
      version = r.pick([2, 3, 4, 0]);
      desc = `version ${version}`;
      break;
    default:
      h = header + ' '.repeat(r.pick([0, 70000, 1 << 20]));
      version = 2;
      desc = `header padded to ${h.length}`;
  }
  const hb = Buffer.from(h, version === 3 ? 'utf8' : 'latin1');
  const pre = version === 1 ? Buffer.from([0x93, ...Buffer.from('NUMPY'), 1, 0, hb.length & 0xff, (hb.length >> 8) & 0xff]) : Buffer.concat([Buffer.from([0x93, ...Buffer.from('NUMPY'), version, 0]), (() => {
    const l = Buffer.alloc(4);
    l.writeUInt32LE(hb.length);
    return l;
  })()]);
  return [concat(pre, hb, data), desc];
}

// ----- entry point -------------------------------------------------------------------------------

export interface Mutant {
  seed: string;
  bytes: Uint8Array;
  desc: string;
}

/** Default cap on the size of hostile structures (nodes, items, nesting). */
export const MAX_HOSTILE = 200_000;

/**
 * One fuzz case: a seed, then 1–4 stacked mutations (structure-aware ones first). Hostile
 * structures (chains, floods, nesting) are at most `maxHostile` long.
 */
export async function makeCase(reader: Reader, seeds: Seed[], rngSeed: number, maxHostile = MAX_HOSTILE): Promise<Mutant> {
  const r = new FuzzRng(rngSeed);
  const seed = r.pick(seeds);
  const steps = r.chance(0.6) ? 1 : 2 + r.int(3);
  const descs: string[] = [];
  let bytes = seed.bytes;
  for (let s = 0; s < steps; s++) {
    const structured = s === 0 && r.chance(0.75);
    let d: string;
    if (!structured) [bytes, d] = generic(r, bytes, seeds);
    else if (reader === 'onnx') [bytes, d] = r.chance(0.15) ? onnxHostile(r, seed, maxHostile) : onnxMutation(r, seed);
    else if (reader === 'zip') [bytes, d] = zipMutation(r, seed);
    else if (reader === 'pickle') {
      const p = seed.pickles![0];
      [bytes, d] = pickleMutation(r, bytes, p.instrs, 0, maxHostile);
    } else if (reader === 'legacy') {
      if (r.chance(0.2) && seed.counts!.length) {
        const at = r.pick(seed.counts!);
        const c = bytes.slice();
        const v = interesting(r, 8, bytes.length, readUint(bytes, at, 8));
        writeUint(c, at, 8, v);
        [bytes, d] = [c, `storage element count at ${at} := ${v}`];
      } else {
        const p = seed.pickles![r.chance(0.7) ? 3 : r.int(seed.pickles!.length)];
        [bytes, d] = pickleMutation(r, bytes, p.instrs, 0, maxHostile);
      }
    } else if (reader === 'safetensors') [bytes, d] = safetensorsMutation(r, seed);
    else [bytes, d] = npyMutation(r, seed);
    descs.push(d);
  }
  if (reader === 'pickle') bytes = await rewrapPickle(seed, bytes);
  return { seed: seed.name, bytes, desc: descs.join('; ') };
}
