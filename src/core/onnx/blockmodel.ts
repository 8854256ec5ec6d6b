// Tiny ONNX models of one block — its branches as separate Conv/BatchNormalization nodes summed by
// Add, and the single fused Conv — so a block from a checkpoint (which has no graph) can be
// validated in onnxruntime exactly like an ONNX block.
import { onnx } from 'onnx-proto';
import { DType } from '../dtype';
import { type BNParams, type FusedConv, type FuseSpec, wholeWeight } from '../fusion';

const INTS = onnx.AttributeProto.AttributeType.INTS;
const INT = onnx.AttributeProto.AttributeType.INT;
const FLOAT = onnx.AttributeProto.AttributeType.FLOAT;

class Graph {
  nodes: onnx.INodeProto[] = [];
  inits: onnx.ITensorProto[] = [];
  private n = 0;
  tensor(name: string, dims: number[], values: ArrayLike<number>): string {
    const f = Float32Array.from(values as ArrayLike<number>);
    this.inits.push({ name, dims, dataType: DType.float32, rawData: new Uint8Array(f.buffer) });
    return name;
  }
  node(opType: string, input: string[], attribute: onnx.IAttributeProto[] = []): string {
    const out = `t${this.n++}`;
    this.nodes.push({ name: `${opType}_${this.n}`, opType, input, output: [out], attribute });
    return out;
  }
  conv(x: string, weight: ArrayLike<number>, shape: number[], bias: ArrayLike<number> | undefined, stride: number[], groups: number): string {
    const k = shape.slice(2);
    const w = this.tensor(`w${this.n}`, shape, weight);
    const inputs = [x, w];
    if (bias) inputs.push(this.tensor(`b${this.n}`, [shape[0]], bias));
    return this.node('Conv', inputs, [
      { name: 'kernel_shape', type: INTS, ints: k },
      { name: 'strides', type: INTS, ints: stride },
      { name: 'pads', type: INTS, ints: [...k, ...k].map((v) => (v - 1) / 2) },
      { name: 'group', type: INT, i: groups },
    ]);
  }
  bn(x: string, bn: BNParams): string {
    const c = bn.gamma.length;
    const p = `bn${this.n}`;
    return this.node(
      'BatchNormalization',
      [x, this.tensor(`${p}.g`, [c], bn.gamma), this.tensor(`${p}.b`, [c], bn.beta), this.tensor(`${p}.m`, [c], bn.mean), this.tensor(`${p}.v`, [c], bn.variance)],
      [{ name: 'epsilon', type: FLOAT, f: bn.eps }],
    );
  }
  encode(inputShape: number[], output: string): Uint8Array {
    return onnx.ModelProto.encode({
      irVersion: 7,
      producerName: 'repfuse-block-check',
      opsetImport: [{ domain: '', version: 13 }],
      graph: {
        name: 'block',
        node: this.nodes,
        initializer: this.inits,
        input: [{ name: 'x', type: { tensorType: { elemType: DType.float32, shape: { dim: inputShape.map((d) => ({ dimValue: d })) } } } }],
        output: [{ name: output, type: { tensorType: { elemType: DType.float32 } } }],
      },
    }).finish();
  }
}

export interface BlockModels {
  unfused: Uint8Array;
  fused: Uint8Array;
  inputShape: number[];
}

/**
 * Builds the unfused block (as the module defines it) and the fused conv as float32 models.
 * BatchNormalization epsilon is an ONNX float attribute, i.e. float32: the check is exact only up
 * to that rounding of eps, which is far below the tolerance.
 */
export function buildBlockModels(spec: FuseSpec, fused: FusedConv, stride: number[], spatial = 12): BlockModels {
  const cin = spec.inPerGroup * spec.groups;
  const inputShape = [1, cin, ...spec.kernel.map((k) => Math.max(spatial, k + 2))];
  const g = new Graph();
  const terms: string[] = [];
  for (const t of spec.terms) {
    if (t.kind === 'identity') {
      let y = t.bn ? g.bn('x', t.bn) : 'x';
      if (t.scale !== undefined) {
        const s = typeof t.scale === 'number' ? [t.scale] : Array.from(t.scale);
        y = g.node('Mul', [y, g.tensor(`alpha${terms.length}`, s.length === 1 ? [] : [s.length, ...spec.kernel.map(() => 1)], s)]);
      }
      terms.push(y);
      continue;
    }
    let y = g.conv('x', wholeWeight(t.weight, spec.outChannels), [spec.outChannels, spec.inPerGroup, ...t.kernel], t.bias, stride, spec.groups);
    if (t.bn) y = g.bn(y, t.bn);
    if (t.scale !== undefined) {
      const s = typeof t.scale === 'number' ? [t.scale] : Array.from(t.scale);
      const dims = s.length === 1 ? [] : [s.length, ...spec.kernel.map(() => 1)];
      y = g.node('Mul', [y, g.tensor(`alpha${terms.length}`, dims, s)]);
    }
    terms.push(y);
  }
  let sum = terms.length === 1 ? g.node('Identity', [terms[0]]) : g.node('Sum', terms);
  if (spec.postBN) sum = g.bn(sum, spec.postBN);
  const unfused = g.encode(inputShape, sum);

  const f = new Graph();
  const y = f.conv('x', fused.weight, fused.shape, fused.bias, stride, spec.groups);
  return { unfused, fused: f.encode(inputShape, y), inputShape };
}
