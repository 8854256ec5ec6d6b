// Runs the real fuse job on a model and checks the file it writes: validation by onnxruntime
// (original vs fused) plus structural invariants of the output graph.
import * as assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { onnx } from 'onnx-proto';
import type { NumArray } from '../../src/core/dtype';
import type { InspectReport } from '../../src/core/model';
import { openOnnx, readTensorValues, type OnnxNode, type OnnxValueInfo } from '../../src/core/onnx/reader';
import type { FuseReport } from '../../src/core/report';
import { defaultFuseOptions, fuse, inspect, type FuseOptions } from '../../src/engine';

let counter = 0;

/** Writes `bytes` as `<dir>/<name>-<n>.onnx` and returns the path. */
export function writeModel(dir: string, bytes: Uint8Array, name = 'model'): string {
  const file = path.join(dir, `${name}-${++counter}.onnx`);
  fs.writeFileSync(file, bytes);
  return file;
}

export function inspectBytes(dir: string, bytes: Uint8Array, opts: { foldBN?: boolean; name?: string } = {}): InspectReport {
  return inspect(writeModel(dir, bytes, opts.name), { foldBN: opts.foldBN ?? true });
}

/** Everything a test needs to know about a written model, read eagerly through openOnnx. */
export interface ModelView {
  path: string;
  nodes: OnnxNode[];
  inputs: OnnxValueInfo[];
  outputs: OnnxValueInfo[];
  valueInfo: OnnxValueInfo[];
  initializers: Map<string, { dims: number[]; dtype: number; storage: string; location?: string; values: NumArray }>;
  opCounts: Record<string, number>;
  /** The decoded ModelProto (onnx-proto), for metadata comparisons. */
  proto: onnx.ModelProto;
  bytes: Uint8Array;
}

export function viewModel(file: string): ModelView {
  const m = openOnnx(file);
  try {
    const initializers: ModelView['initializers'] = new Map();
    for (const [name, t] of m.graph.initializers) {
      initializers.set(name, {
        dims: t.dims,
        dtype: t.dtype,
        storage: t.storage.kind,
        location: t.storage.kind === 'external' ? t.storage.location : undefined,
        values: readTensorValues(m, t),
      });
    }
    const opCounts: Record<string, number> = {};
    for (const n of m.graph.nodes) opCounts[n.opType] = (opCounts[n.opType] ?? 0) + 1;
    const bytes = fs.readFileSync(file);
    return {
      path: file,
      nodes: m.graph.nodes,
      inputs: m.graph.inputs,
      outputs: m.graph.outputs,
      valueInfo: m.graph.valueInfo,
      initializers,
      opCounts,
      proto: onnx.ModelProto.decode(bytes),
      bytes,
    };
  } finally {
    m.close();
  }
}

const sortKeys = (o: Record<string, number>) => Object.fromEntries(Object.entries(o).filter(([, v]) => v > 0).sort(([a], [b]) => a.localeCompare(b)));

export const nodeProducing = (v: ModelView, tensor: string): OnnxNode[] => v.nodes.filter((n) => n.outputs.includes(tensor));

/** Graph-level invariants every written model must satisfy. */
export function checkWellFormed(v: ModelView): void {
  const avail = new Set<string>([...v.inputs.map((i) => i.name), ...v.initializers.keys()]);
  const produced = new Set<string>();
  for (const n of v.nodes) {
    for (const i of n.inputs) assert.ok(!i || avail.has(i), `${v.path}: node ${n.opType} '${n.name}' reads '${i}', which nothing produces before it`);
    for (const o of n.outputs) {
      if (!o) continue;
      assert.ok(!produced.has(o), `${v.path}: tensor '${o}' is produced twice`);
      produced.add(o);
      avail.add(o);
    }
  }
  for (const o of v.outputs) assert.ok(avail.has(o.name), `${v.path}: graph output '${o.name}' is not produced`);
  // Initializers nothing reads are gone.
  const read = new Set<string>(v.outputs.map((o) => o.name));
  for (const n of v.nodes) {
    for (const i of n.inputs) read.add(i);
    for (const r of n.outerRefs) read.add(r);
  }
  for (const name of v.initializers.keys()) assert.ok(read.has(name), `${v.path}: initializer '${name}' is not used by anything`);
  // value_info describes only tensors that still exist.
  for (const vi of v.valueInfo) assert.ok(avail.has(vi.name), `${v.path}: value_info for '${vi.name}', which no longer exists`);
}

export interface FuseAndValidateOpts extends Partial<FuseOptions> {
  dir: string;
  name?: string;
  /** Max |Δ| allowed per block and per output (default 1e-5). */
  maxDiff?: number;
  /** Exact op counts the written model must have (only the ops listed). */
  expectOps?: Record<string, number>;
  /** Number of blocks that must be fused (default: at least one). */
  expectBlocks?: number;
}

export interface Fused {
  report: FuseReport;
  input: string;
  output: string;
  out: ModelView;
  original: ModelView;
}

/** Writes the model, runs fuse() (which validates with onnxruntime in a child), and checks the result. */
export async function fuseAndValidate(bytes: Uint8Array | string, opts: FuseAndValidateOpts): Promise<Fused> {
  const input = typeof bytes === 'string' ? bytes : writeModel(opts.dir, bytes, opts.name);
  const { maxDiff = 1e-5, expectOps, expectBlocks } = opts;
  const fuseOpts: Partial<FuseOptions> = { ...opts };
  for (const k of ['dir', 'name', 'maxDiff', 'expectOps', 'expectBlocks']) delete (fuseOpts as Record<string, unknown>)[k];
  const report = await fuse(input, { ...defaultFuseOptions, ...fuseOpts });
  if (expectBlocks !== undefined) assert.equal(report.blocksFused, expectBlocks, `blocks fused: ${JSON.stringify(report.inspect.rejected)}`);
  assert.ok(report.output, `nothing was written (${report.validationSkipped}); rejected: ${JSON.stringify(report.inspect.rejected)}`);
  const v = report.validation;
  assert.ok(v, 'validation did not run');
  assert.equal(v.passed, true, `validation failed: ${JSON.stringify(v.outputs.concat(v.blocks).map((d) => [d.name, d.maxAbsDiff, d.tolerance]))}`);
  assert.equal(v.blocks.length, report.blocksFused);
  if (process.env.REPFUSE_TEST_LOG) console.log(`[diff] ${path.basename(input)} max ${Math.max(...[...v.outputs, ...v.blocks].map((d) => d.maxAbsDiff))} limit ${maxDiff}`);
  for (const d of [...v.outputs, ...v.blocks]) {
    assert.ok(d.maxAbsDiff <= maxDiff, `${d.name}: max |Δ| ${d.maxAbsDiff} > ${maxDiff}`);
    assert.equal(d.nonFinite, 0);
  }
  const out = viewModel(report.output);
  const original = viewModel(input);
  checkWellFormed(out);
  // Each fused block is exactly one Conv that keeps the replaced tensor's name.
  for (const b of report.inspect.blocks) {
    const prod = nodeProducing(out, b.output);
    assert.equal(prod.length, 1, `block ${b.name}: ${prod.length} producers of '${b.output}'`);
    // A BN → Linear fold (no kernel) is one Gemm.
    assert.equal(prod[0].opType, b.kernel.length ? 'Conv' : 'Gemm', `block ${b.name}: '${b.output}' is produced by ${prod[0].opType}`);
    const w = out.initializers.get(prod[0].inputs[1]);
    assert.ok(w, `block ${b.name}: fused weight '${prod[0].inputs[1]}' is not an initializer`);
    if (b.kernel.length) assert.deepEqual(w.dims, [b.outChannels, b.inChannels / b.groups, ...b.kernel]);
    assert.ok(out.initializers.has(prod[0].inputs[2]), `block ${b.name}: fused Conv has no bias initializer`);
  }
  // Graph outputs are unchanged.
  assert.deepEqual(
    out.proto.graph!.output!.map((o) => onnx.ValueInfoProto.toObject(o as onnx.ValueInfoProto)),
    original.proto.graph!.output!.map((o) => onnx.ValueInfoProto.toObject(o as onnx.ValueInfoProto)),
  );
  // The report's numbers describe the file that was written.
  assert.equal(report.nodesAfter, out.nodes.length, 'report.nodesAfter');
  assert.equal(report.nodesBefore, original.nodes.length, 'report.nodesBefore');
  const numel = (vw: ModelView) => [...vw.initializers.values()].reduce((a, t) => a + t.dims.reduce((x, y) => x * y, 1), 0);
  assert.equal(report.paramsAfter, numel(out), 'report.paramsAfter');
  assert.equal(report.paramsBefore, numel(original), 'report.paramsBefore');
  assert.deepEqual(sortKeys(report.inspect.opCountsAfter ?? {}), sortKeys(out.opCounts), 'report.inspect.opCountsAfter');
  assert.equal(report.bytesWritten, out.bytes.length, 'report.bytesWritten');
  if (expectOps) {
    for (const [op, n] of Object.entries(expectOps)) assert.equal(out.opCounts[op] ?? 0, n, `${op} count: ${JSON.stringify(out.opCounts)}`);
  }
  return { report, input, output: report.output, out, original };
}
