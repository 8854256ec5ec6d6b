// `--drop-aux` for ONNX exports of YOLO training models: the graph outputs that only auxiliary
// heads compute are removed, with the nodes and initializers only they use. Auxiliary heads are
// recognised by the module scopes PyTorch's exporter writes into node names: a YOLOv9
// DualDDetect / DualDetect (`/model.N/cv2…` beside `/model.N/cv4…`: cv2/cv3/dfl auxiliary,
// cv4/cv5/dfl2 main) and a YOLOv7 IAuxDetect exported in training form (`/model.N/m2…` auxiliary,
// `/model.N/m…` lead). An output that needs no auxiliary node, or any main-head node, stays.
import { RepFuseError } from '../errors';
import type { OnnxDropAuxInfo } from '../model';
import { GraphIndex } from './graph';
import type { OnnxModel, OnnxNode } from './reader';
import { emptyPlan, type Plan } from './writer';

interface HeadScope {
  scope: string;
  kind: 'dual' | 'iaux';
  aux: string[];
  main: string[];
}

export interface OnnxDropAux extends OnnxDropAuxInfo {
  plan: Plan;
}

/** `/model.38/cv4.0/…` → ['model.38', 'cv4']; names without scopes give undefined. */
function scopeOf(n: OnnxNode): [string, string] | undefined {
  const m = /(?:^|\/)(model\.\d+)\/(cv[2-5]|dfl2?|m2?|ia|im)(?=[./]|$)/.exec(n.name);
  return m ? [m[1], m[2]] : undefined;
}

function findHeads(nodes: OnnxNode[]): HeadScope[] {
  const subs = new Map<string, Set<string>>();
  for (const n of nodes) {
    const s = scopeOf(n);
    if (!s) continue;
    const set = subs.get(s[0]) ?? new Set<string>();
    set.add(s[1]);
    subs.set(s[0], set);
  }
  const heads: HeadScope[] = [];
  for (const [scope, set] of subs) {
    // Both halves of a dual head and its distribution-focal layer (GELAN blocks also have cv1–cv5
    // children, but no dfl); a training-form IAuxDetect has lead convs, implicit knowledge and m2.
    if (['cv2', 'cv3', 'cv4', 'cv5'].every((c) => set.has(c)) && (set.has('dfl') || set.has('dfl2'))) heads.push({ scope, kind: 'dual', aux: ['cv2', 'cv3', 'dfl'], main: ['cv4', 'cv5', 'dfl2'] });
    else if (set.has('m2') && set.has('m') && (set.has('ia') || set.has('im'))) heads.push({ scope, kind: 'iaux', aux: ['m2'], main: ['m', 'ia', 'im'] });
  }
  return heads;
}

/** Module scopes of auxiliary heads in the graph (e.g. 'model.38 (DualDDetect/DualDetect)'), for the inspector. */
export function findOnnxAuxHeads(model: OnnxModel): string[] {
  return findHeads(model.graph.nodes).map((h) => `${h.scope} (${h.kind === 'dual' ? 'DualDDetect/DualDetect' : 'IAuxDetect'})`);
}

/** What --drop-aux removes from an ONNX graph, as a writer plan (empty when there is nothing auxiliary). */
export function planDropAux(model: OnnxModel): OnnxDropAux {
  const g = model.graph;
  const heads = findHeads(g.nodes);
  const plan = emptyPlan();
  const result = (note: string, removedOutputs: string[] = []): OnnxDropAux => ({
    heads: heads.map((h) => ({ scope: h.scope, kind: h.kind === 'dual' ? 'DualDDetect/DualDetect' : 'IAuxDetect' })),
    removedOutputs,
    keptOutputs: g.outputs.map((o) => o.name).filter((o) => !removedOutputs.includes(o)),
    removedNodes: plan.removeNodes.size,
    removedInitializers: plan.removeInitializers.size,
    note,
    plan,
  });
  if (!heads.length) {
    // PyTorch's exporter names nodes by module scope (/model.38/cv4.0/…); without any scope the
    // heads cannot be told apart, and "no auxiliary head" would be a guess.
    const scoped = g.nodes.some((n) => n.name.includes('/'));
    if (!scoped && g.nodes.length) throw new RepFuseError('--drop-aux: the node names carry no module scopes (/model.N/…), so auxiliary heads cannot be told from main ones; export with the node names PyTorch writes by default.', model.path);
    return result('no auxiliary head (DualDDetect, DualDetect or IAuxDetect in training form) in the graph; left as it is.');
  }
  const { producer } = new GraphIndex(model);
  const role = (n: OnnxNode): 'aux' | 'main' | undefined => {
    const s = scopeOf(n);
    const h = s && heads.find((x) => x.scope === s[0]);
    if (!s || !h) return undefined;
    return h.aux.includes(s[1]) ? 'aux' : h.main.includes(s[1]) ? 'main' : undefined;
  };
  /** Nodes an output depends on (iteratively; graphs can be deep). */
  const cone = (out: string): Set<OnnxNode> => {
    const seen = new Set<OnnxNode>();
    const work = [out];
    while (work.length) {
      const t = work.pop()!;
      const n = producer.get(t);
      if (!n || seen.has(n)) continue;
      seen.add(n);
      for (const i of n.inputs) if (i) work.push(i);
      for (const r of n.outerRefs) work.push(r);
    }
    return seen;
  };
  const cones = new Map(g.outputs.map((o) => [o.name, cone(o.name)]));
  const auxOutputs = g.outputs
    .map((o) => o.name)
    .filter((o) => {
      const roles = new Set([...cones.get(o)!].map(role));
      return roles.has('aux') && !roles.has('main');
    });
  if (!auxOutputs.length) return result(`${heads.map((h) => h.scope).join(', ')}: no graph output comes only from an auxiliary head (an eval-mode export already leaves them out); left as it is.`);
  if (auxOutputs.length === g.outputs.length) throw new RepFuseError(`--drop-aux: every graph output (${auxOutputs.join(', ')}) comes from an auxiliary head; nothing would be left.`, model.path);
  const keep = new Set<OnnxNode>();
  for (const o of g.outputs) if (!auxOutputs.includes(o.name)) for (const n of cones.get(o.name)!) keep.add(n);
  for (const o of auxOutputs) for (const n of cones.get(o)!) if (!keep.has(n)) plan.removeNodes.add(n.index);
  const usedByKept = new Set<string>();
  for (const n of keep) {
    for (const i of n.inputs) if (i) usedByKept.add(i);
    for (const r of n.outerRefs) usedByKept.add(r);
  }
  for (const i of plan.removeNodes) {
    const n = g.nodes[i];
    for (const o of n.outputs) if (o) plan.removedTensors.add(o);
    for (const x of n.inputs) if (x && g.initializers.has(x) && !usedByKept.has(x)) plan.removeInitializers.add(x);
  }
  for (const x of plan.removeInitializers) plan.removedTensors.add(x);
  for (const o of auxOutputs) plan.removedTensors.add(o);
  return result(`${heads.map((h) => `${h.scope} (${h.kind === 'dual' ? 'dual head: cv2/cv3/dfl auxiliary' : 'IAuxDetect: m2 auxiliary'})`).join(', ')}: removed ${auxOutputs.length} auxiliary output${auxOutputs.length === 1 ? '' : 's'} (${auxOutputs.join(', ')}) and ${plan.removeNodes.size} nodes only they use.`, auxOutputs);
}
