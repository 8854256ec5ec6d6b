// Indexes over an ONNX graph: who produces and who reads each tensor, and which tensors are
// constants (initializers or Constant nodes, possibly behind Identity nodes).
import { DType } from '../dtype';
import { attrFloat, attrInts, type OnnxGraph, type OnnxModel, type OnnxNode, type OnnxTensor, tensorFromProto } from './reader';

/** A constant tensor and the nodes (Constant, Identity) that carry it to where it is used. */
export interface ConstRef {
  tensor: OnnxTensor;
  /** The initializer name, when the constant is one. */
  initializer?: string;
  /** Constant/Identity nodes between the constant's origin and its use. */
  via: OnnxNode[];
}

/** Identity nodes followed from a constant to its use (exporters insert one or two). */
export const MAX_IDENTITY_HOPS = 64;

export class GraphIndex {
  readonly producer = new Map<string, OnnxNode>();
  readonly consumers = new Map<string, OnnxNode[]>();
  readonly graphOutputs = new Set<string>();
  readonly graphInputs = new Set<string>();
  /** Tensors read by subgraphs of If/Loop/Scan: never removed. */
  readonly outerRefs = new Set<string>();
  private constCache = new Map<string, ConstRef | null>();

  constructor(
    readonly model: OnnxModel,
    readonly graph: OnnxGraph = model.graph,
  ) {
    for (const n of graph.nodes) {
      for (const o of n.outputs) if (o) this.producer.set(o, n);
      for (const i of n.inputs) {
        if (!i) continue;
        const list = this.consumers.get(i);
        if (list) list.push(n);
        else this.consumers.set(i, [n]);
      }
      for (const r of n.outerRefs) this.outerRefs.add(r);
    }
    for (const o of graph.outputs) this.graphOutputs.add(o.name);
    for (const i of graph.inputs) this.graphInputs.add(i.name);
  }

  consumersOf(name: string): OnnxNode[] {
    return this.consumers.get(name) ?? [];
  }

  /** True when `name` is read only by `node` (once) and is neither a graph output nor read by a subgraph. */
  usedOnlyBy(name: string, node: OnnxNode): boolean {
    const c = this.consumersOf(name);
    if (this.graphOutputs.has(name) || this.outerRefs.has(name)) return false;
    return c.length === 1 && c[0] === node && node.inputs.filter((i) => i === name).length === 1;
  }

  /** Describes the other users of `name` besides `node`, for rejection reasons. */
  otherUses(name: string, node: OnnxNode): string {
    const parts = this.consumersOf(name)
      .filter((c) => c !== node)
      .map((c) => `${c.opType} '${c.name || c.outputs[0]}'`);
    if (this.graphOutputs.has(name)) parts.push('a graph output');
    if (this.outerRefs.has(name)) parts.push('a subgraph');
    return parts.join(', ') || `${node.opType} '${node.name}' (twice)`;
  }

  /** Resolves `name` to a constant tensor, following Identity nodes; undefined if computed at run time. */
  constant(name: string): ConstRef | undefined {
    const cached = this.constCache.get(name);
    if (cached !== undefined) return cached ?? undefined;
    this.constCache.set(name, null); // guards against cycles in corrupt graphs
    const res = this.resolve(name);
    this.constCache.set(name, res ?? null);
    return res;
  }

  /** Follows Identity nodes back to an initializer or Constant: iteratively, at most MAX_IDENTITY_HOPS. */
  private resolve(name: string): ConstRef | undefined {
    const identities: OnnxNode[] = [];
    let t = name;
    for (;;) {
      const init = this.graph.initializers.get(t);
      const p = this.producer.get(t);
      const via = () => identities.reverse();
      if (init && !p) return { tensor: init, initializer: t, via: via() };
      if (!p) return undefined;
      if (p.opType === 'Identity' && (p.domain === '' || p.domain === 'ai.onnx')) {
        // A cycle (corrupt graph) or an absurdly long chain: not a constant.
        if (identities.length >= MAX_IDENTITY_HOPS || identities.includes(p)) return undefined;
        identities.push(p);
        t = p.inputs[0];
        continue;
      }
      if (p.opType === 'Constant' && (p.domain === '' || p.domain === 'ai.onnx')) {
        const c = constantNodeTensor(p, t, this.model.path);
        return c ? { tensor: c, via: [p, ...via()] } : undefined;
      }
      return undefined;
    }
  }
}

function constantNodeTensor(node: OnnxNode, name: string, file: string): OnnxTensor | undefined {
  const v = node.attrs.get('value');
  if (v?.t) return tensorFromProto(v.t, name, file);
  if (node.attrs.has('value_float')) return { name, dtype: DType.float32, dims: [], storage: { kind: 'values', values: [attrFloat(node, 'value_float', 0)] } };
  const fl = node.attrs.get('value_floats');
  if (fl?.floats) return { name, dtype: DType.float32, dims: [fl.floats.length], storage: { kind: 'values', values: Float32Array.from(fl.floats) } };
  const ints = attrInts(node, 'value_ints');
  if (ints) return { name, dtype: DType.int64, dims: [ints.length], storage: { kind: 'values', values: ints } };
  return undefined;
}

/** Node name scope → module path: `/model.102/rbr_dense/Conv` → [`model.102`, `rbr_dense`]. */
export function scopeOf(nodeName: string): string[] {
  if (!nodeName.startsWith('/')) return [];
  const parts = nodeName.split('/').filter(Boolean);
  return parts.slice(0, -1);
}

/** Module path for a set of nodes: the longest common name scope, as a dotted path. */
export function commonScopeName(names: string[]): string | undefined {
  const scopes = names.map(scopeOf).filter((s) => s.length > 0);
  if (scopes.length === 0 || scopes.length < names.filter(Boolean).length) return undefined;
  let common = scopes[0];
  for (const s of scopes.slice(1)) {
    let i = 0;
    while (i < common.length && i < s.length && common[i] === s[i]) i++;
    common = common.slice(0, i);
  }
  if (common.length === 0) return undefined;
  return joinScope(common);
}

/**
 * torch writes each scope level as the module path starting at its last non-numeric atom
 * (`/model/model.1/rbr_dense/rbr_dense.0/Conv`, `/features/features.0/features.0.2/c/Conv`):
 * a level that restates the tail of the path so far replaces that tail instead of repeating it.
 */
export function joinScope(parts: string[]): string {
  let atoms: string[] = [];
  for (const p of parts) {
    const pa = p.split('.');
    let at = -1;
    for (let i = atoms.length - 1; i >= 0; i--) {
      if (atoms[i] !== pa[0]) continue;
      const tail = atoms.slice(i);
      if (tail.length <= pa.length && tail.every((a, j) => a === pa[j])) at = i;
      break;
    }
    atoms = at >= 0 ? [...atoms.slice(0, at), ...pa] : [...atoms, ...pa];
  }
  return atoms.join('.');
}
