// Writes an *unfused* RepVGG ONNX model the way `torch.onnx.export(..., do_constant_folding=True)`
// lays it out: every branch's BN already folded into its Conv (weight + bias initializers named
// `onnx::Conv_N`), the identity branch left as a BatchNormalization node with its parameters under
// their module names, raw_data float32 initializers, fields in field-number order.
//
// The file is streamed: all small messages (nodes, value infos, tensor headers) are encoded first
// so every length prefix is known, then the file is written front to back, generating each
// tensor's values into one reused scratch buffer just before it is written. The generator's memory
// is therefore about the largest single tensor (≈ 38 MB for RepVGG-B1), not the file size.
import * as fs from 'node:fs';
import { onnx } from 'onnx-proto';

export interface RepVGGConfig {
  /** Input [N, C, H, W]. */
  input: [number, number, number, number];
  /** Stem block width (3×3 + 1×1 branches, stride 2, no identity). */
  stem: number;
  /** [width, blocks] per stage; the first block of each stage has stride 2 and no identity. */
  stages: [number, number][];
  classes: number;
}

/** RepVGG-B1: ~57 M parameters (train-time form), 28 blocks, ≈ 228 MB of float32. */
export const REPVGG_B1: RepVGGConfig = {
  input: [1, 3, 224, 224],
  stem: 64,
  stages: [
    [128, 4],
    [256, 6],
    [512, 16],
    [2048, 1],
  ],
  classes: 1000,
};

export interface GeneratedModel {
  path: string;
  bytes: number;
  blocks: number;
  /** Blocks with an identity (BatchNormalization) branch. */
  identityBlocks: number;
  nodes: number;
  initializers: number;
  params: number;
  ms: number;
}

// ----- a few protobuf wire helpers (kept local: bench/ does not depend on src/ internals) -----

function varintSize(v: number): number {
  let n = 1;
  while (v >= 128) {
    v = Math.floor(v / 128);
    n++;
  }
  return n;
}

function varint(v: number): number[] {
  const out: number[] = [];
  while (v >= 128) {
    out.push((v % 128) | 0x80);
    v = Math.floor(v / 128);
  }
  out.push(v);
  return out;
}

const WT_VARINT = 0;
const WT_LEN = 2;
const tag = (field: number, wt: number) => varint(field * 8 + wt);

function lenField(field: number, payload: Uint8Array): Uint8Array {
  const head = [...tag(field, WT_LEN), ...varint(payload.length)];
  const out = new Uint8Array(head.length + payload.length);
  out.set(head, 0);
  out.set(payload, head.length);
  return out;
}

// ----- seeded random numbers -------------------------------------------------------------------

/** mulberry32: small, fast, good enough for weights; one stream per tensor so order never matters. */
export function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

export function hashSeed(seed: number, name: string): number {
  let h = (seed ^ 0x9e3779b9) >>> 0;
  for (let i = 0; i < name.length; i++) h = Math.imul(h ^ name.charCodeAt(i), 0x01000193) >>> 0;
  return h;
}

// ----- the model -------------------------------------------------------------------------------

interface TensorPart {
  name: string;
  dims: number[];
  /** Uniform in [lo, hi). */
  lo: number;
  hi: number;
}

/** One field of GraphProto: an encoded message, or an initializer whose data is generated late. */
type GraphPart = { field: number; bytes: Uint8Array } | { field: 5; tensor: TensorPart; header: Uint8Array; dataLen: number };

const FLOAT = onnx.TensorProto.DataType.FLOAT;
const A = onnx.AttributeProto.AttributeType;

/** TensorProto without data, fields 1 (dims, unpacked as the C++ runtime writes proto2), 2, 8. */
function tensorHeader(t: TensorPart): Uint8Array {
  const b: number[] = [];
  for (const d of t.dims) b.push(...tag(1, WT_VARINT), ...varint(d));
  b.push(...tag(2, WT_VARINT), ...varint(FLOAT));
  const name = Buffer.from(t.name, 'utf8');
  b.push(...tag(8, WT_LEN), ...varint(name.length), ...name);
  return Uint8Array.from(b);
}

function partLength(p: GraphPart): number {
  const payload = 'bytes' in p ? p.bytes.length : tensorPayloadLength(p.header, p.dataLen);
  return varintSize(p.field * 8 + WT_LEN) + varintSize(payload) + payload;
}

function tensorPayloadLength(header: Uint8Array, dataLen: number): number {
  return header.length + varintSize(9 * 8 + WT_LEN) + varintSize(dataLen) + dataLen;
}

function valueInfo(name: string, dims: number[]): onnx.IValueInfoProto {
  return { name, type: { tensorType: { elemType: FLOAT, shape: { dim: dims.map((d) => ({ dimValue: d })) } } } };
}

/** Buffers small writes; big ones go straight to the file. */
class Sink {
  private buf = Buffer.allocUnsafe(1 << 20);
  private used = 0;
  written = 0;
  constructor(private fd: number) {}
  write(b: Uint8Array): void {
    if (b.length > this.buf.length / 2) {
      this.flush();
      this.writeAll(b);
      return;
    }
    if (this.used + b.length > this.buf.length) this.flush();
    this.buf.set(b, this.used);
    this.used += b.length;
  }
  bytes(b: number[]): void {
    this.write(Uint8Array.from(b));
  }
  flush(): void {
    if (this.used) this.writeAll(this.buf.subarray(0, this.used));
    this.used = 0;
  }
  private writeAll(b: Uint8Array): void {
    for (let off = 0; off < b.length; ) off += fs.writeSync(this.fd, b, off, b.length - off);
    this.written += b.length;
  }
}

export function generateRepVGG(file: string, cfg: RepVGGConfig = REPVGG_B1, seed = 0): GeneratedModel {
  const t0 = performance.now();
  const nodes: onnx.INodeProto[] = [];
  /** Initializers that keep their module names (listed first by torch), then folded constants. */
  const named: TensorPart[] = [];
  const folded: TensorPart[] = [];
  let constId = 84; // torch numbers folded constants onnx::Conv_84, _85, (skip), _87, …
  let blocks = 0;
  let identityBlocks = 0;

  const conv = (scope: string, x: string, cin: number, cout: number, k: number, stride: number): string => {
    const w = `onnx::Conv_${constId}`;
    const b = `onnx::Conv_${constId + 1}`;
    constId += 3;
    // Fan-in scaled so activations stay in a sane range through 28 blocks.
    const a = (k === 3 ? 1 : 0.5) * Math.sqrt(3 / (cin * k * k));
    folded.push({ name: w, dims: [cout, cin, k, k], lo: -a, hi: a }, { name: b, dims: [cout], lo: -0.05, hi: 0.05 });
    const name = `${scope}/conv/Conv`;
    const out = `${name}_output_0`;
    const p = (k - 1) / 2;
    nodes.push({
      name,
      opType: 'Conv',
      input: [x, w, b],
      output: [out],
      attribute: [
        { name: 'dilations', type: A.INTS, ints: [1, 1] },
        { name: 'group', type: A.INT, i: 1 },
        { name: 'kernel_shape', type: A.INTS, ints: [k, k] },
        { name: 'pads', type: A.INTS, ints: [p, p, p, p] },
        { name: 'strides', type: A.INTS, ints: [stride, stride] },
      ],
    });
    return out;
  };

  /** One RepVGGBlock. `scope` is the node-name scope (`/stage2/stage2.3`), `mod` the module path. */
  const block = (scope: string, mod: string, x: string, cin: number, cout: number, stride: number): string => {
    blocks++;
    const identity = cin === cout && stride === 1;
    let id: string | undefined;
    if (identity) {
      identityBlocks++;
      // RepVGGBlock.forward computes rbr_identity(x) first, so torch emits it first.
      const p = `${mod}.rbr_identity`;
      named.push(
        { name: `${p}.weight`, dims: [cout], lo: 0.3, hi: 0.7 },
        { name: `${p}.bias`, dims: [cout], lo: -0.05, hi: 0.05 },
        { name: `${p}.running_mean`, dims: [cout], lo: -0.05, hi: 0.05 },
        { name: `${p}.running_var`, dims: [cout], lo: 0.5, hi: 1.5 },
      );
      const name = `${scope}/rbr_identity/BatchNormalization`;
      id = `${name}_output_0`;
      nodes.push({
        name,
        opType: 'BatchNormalization',
        input: [x, `${p}.weight`, `${p}.bias`, `${p}.running_mean`, `${p}.running_var`],
        output: [id],
        attribute: [
          { name: 'epsilon', type: A.FLOAT, f: 1e-5 },
          { name: 'momentum', type: A.FLOAT, f: 0.9 },
        ],
      });
    }
    const dense = conv(`${scope}/rbr_dense`, x, cin, cout, 3, stride);
    const one = conv(`${scope}/rbr_1x1`, x, cin, cout, 1, stride);
    let sum = `${scope}/Add_output_0`;
    nodes.push({ name: `${scope}/Add`, opType: 'Add', input: [dense, one], output: [sum] });
    if (id) {
      const s2 = `${scope}/Add_1_output_0`;
      nodes.push({ name: `${scope}/Add_1`, opType: 'Add', input: [sum, id], output: [s2] });
      sum = s2;
    }
    const relu = `${scope}/nonlinearity/Relu`;
    nodes.push({ name: relu, opType: 'Relu', input: [sum], output: [`${relu}_output_0`] });
    return `${relu}_output_0`;
  };

  const [n, c, h, w] = cfg.input;
  let x = block('/stage0', 'stage0', 'images', c, cfg.stem, 2);
  let cin = cfg.stem;
  cfg.stages.forEach(([width, count], si) => {
    const s = `stage${si + 1}`;
    for (let i = 0; i < count; i++) {
      x = block(`/${s}/${s}.${i}`, `${s}.${i}`, x, cin, width, i === 0 ? 2 : 1);
      cin = width;
    }
  });
  nodes.push({ name: '/gap/GlobalAveragePool', opType: 'GlobalAveragePool', input: [x], output: ['/gap/GlobalAveragePool_output_0'] });
  nodes.push({ name: '/Flatten', opType: 'Flatten', input: ['/gap/GlobalAveragePool_output_0'], output: ['/Flatten_output_0'], attribute: [{ name: 'axis', type: A.INT, i: 1 }] });
  const lin = 1 / Math.sqrt(cin);
  named.push({ name: 'linear.weight', dims: [cfg.classes, cin], lo: -lin, hi: lin }, { name: 'linear.bias', dims: [cfg.classes], lo: -lin, hi: lin });
  nodes.push({
    name: '/linear/Gemm',
    opType: 'Gemm',
    input: ['/Flatten_output_0', 'linear.weight', 'linear.bias'],
    output: ['output'],
    attribute: [
      { name: 'alpha', type: A.FLOAT, f: 1 },
      { name: 'beta', type: A.FLOAT, f: 1 },
      { name: 'transB', type: A.INT, i: 1 },
    ],
  });

  // GraphProto fields in field-number order: node (1), name (2), initializer (5), input (11), output (12).
  const parts: GraphPart[] = [];
  for (const nd of nodes) parts.push({ field: 1, bytes: onnx.NodeProto.encode(nd).finish() });
  parts.push({ field: 2, bytes: Buffer.from('main_graph', 'utf8') });
  let params = 0;
  let maxNumel = 0;
  for (const t of [...named, ...folded]) {
    const numel = t.dims.reduce((a, b) => a * b, 1);
    params += numel;
    maxNumel = Math.max(maxNumel, numel);
    parts.push({ field: 5, tensor: t, header: tensorHeader(t), dataLen: numel * 4 });
  }
  parts.push({ field: 11, bytes: onnx.ValueInfoProto.encode(valueInfo('images', [n, c, h, w])).finish() });
  parts.push({ field: 12, bytes: onnx.ValueInfoProto.encode(valueInfo('output', [n, cfg.classes])).finish() });
  const graphLen = parts.reduce((a, p) => a + partLength(p), 0);
  if (graphLen > 2 ** 31 - 1) throw new Error(`the graph would be ${graphLen} bytes, over protobuf's 2 GB limit.`);

  const fd = fs.openSync(file, 'w');
  const scratch = new Float32Array(maxNumel);
  let bytes: number;
  try {
    const out = new Sink(fd);
    // ModelProto: ir_version (1), producer_name (2), producer_version (3), graph (7), opset_import (8).
    out.bytes([...tag(1, WT_VARINT), ...varint(8)]);
    out.write(lenField(2, Buffer.from('pytorch')));
    out.write(lenField(3, Buffer.from('2.1.0')));
    out.bytes([...tag(7, WT_LEN), ...varint(graphLen)]);
    for (const p of parts) {
      if ('bytes' in p) {
        out.write(lenField(p.field, p.bytes));
        continue;
      }
      out.bytes([...tag(5, WT_LEN), ...varint(tensorPayloadLength(p.header, p.dataLen))]);
      out.write(p.header);
      out.bytes([...tag(9, WT_LEN), ...varint(p.dataLen)]);
      const numel = p.dataLen / 4;
      const data = scratch.subarray(0, numel);
      const r = rng(hashSeed(seed, p.tensor.name));
      const { lo, hi } = p.tensor;
      const span = hi - lo;
      for (let i = 0; i < numel; i++) data[i] = lo + span * r();
      out.write(new Uint8Array(data.buffer, 0, p.dataLen));
    }
    out.write(lenField(8, onnx.OperatorSetIdProto.encode({ domain: '', version: 17 }).finish()));
    out.flush();
    bytes = out.written;
  } finally {
    fs.closeSync(fd);
  }
  const size = fs.statSync(file).size;
  if (size !== bytes) throw new Error(`internal error: wrote ${bytes} bytes but the file has ${size}.`);
  return { path: file, bytes, blocks, identityBlocks, nodes: nodes.length, initializers: named.length + folded.length, params, ms: performance.now() - t0 };
}
