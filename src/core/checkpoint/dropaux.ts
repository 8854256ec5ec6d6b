// Training checkpoint → deploy architecture for YOLO models trained with auxiliary heads
// (`repfuse fuse --drop-aux`). The official way is a notebook per repository that builds the deploy
// model from a deploy yaml and copies weights by hard-coded layer indices; this does the same from
// the pickled model alone, for any variant: it keeps the layers the main (lead) head needs, drops
// the auxiliary branch, renumbers the layers ('i', 'f', the model's 'save' list and its 'yaml'),
// and turns the head into the deploy class with the main-branch weights. Operates on the unpickled
// values in place, before the checkpoint is analysed, so fusion and writing see the deploy model.
import { DType, encodeFloats, isFloatType } from '../dtype';
import { RepFuseError } from '../errors';
import { NewTensor, readTensor, TorchTensor } from '../torch/tensor';
import type { DropAuxLayer, DropAuxResult } from '../model';
import { PyDict, PyGlobal, PyObject, type PyValue, pyNumber } from '../torch/values';
import { isModuleObject, moduleStateOf, modulesOf } from './tree';

/** How one auxiliary-head class becomes its deploy class. */
interface HeadRule {
  /** The deploy class (same module as the training class). */
  deployClass: string;
  /** Which half of the head's inputs feeds the kept (main / lead) head. */
  keepInputs: 'first' | 'second';
  /** Deploy child name ← training child name; children not listed are dropped. */
  children: Record<string, string>;
  /** The official conversion this mirrors. */
  mirrors: string;
  /** YOLOv7's implicit knowledge (ImplicitA before, ImplicitM after each lead conv) folded into `m`. */
  foldImplicit?: boolean;
}

/** Auxiliary heads by class name (module `models.yolo` in both repositories). */
const HEADS: Record<string, HeadRule> = {
  'models.yolo.DualDDetect': {
    deployClass: 'DDetect',
    keepInputs: 'second',
    children: { cv2: 'cv4', cv3: 'cv5', dfl: 'dfl2' },
    mirrors: 'WongKinYiu/yolov9 tools/reparameterization.ipynb (yolov9-* → gelan-*: cv4/cv5/dfl2 → cv2/cv3/dfl)',
  },
  'models.yolo.DualDetect': {
    deployClass: 'Detect',
    keepInputs: 'second',
    children: { cv2: 'cv4', cv3: 'cv5', dfl: 'dfl2' },
    mirrors: 'WongKinYiu/yolov9 tools/reparameterization.ipynb (dual-head models → single head)',
  },
  'models.yolo.IAuxDetect': {
    deployClass: 'Detect',
    keepInputs: 'first',
    children: { m: 'm' },
    foldImplicit: true,
    mirrors: 'WongKinYiu/yolov7 tools/reparameterization.ipynb (yolov7-w6/e6/d6/e6e training → cfg/deploy: lead head with implicit knowledge folded)',
  },
};

/** Heads RepFuse knows but cannot convert: named, never half-converted. */
const UNSUPPORTED_HEADS = ['models.yolo.TripleDDetect', 'models.yolo.TripleDetect', 'models.yolo.DualDSegment', 'models.yolo.TripleDSegment'];

/** Layers that only pass their input through (YOLOv9's Silence at index 0). */
const PASS_THROUGH = new Set(['models.common.Silence']);

/** Layers that only the auxiliary branch uses; one needed by the main branch means an entangled model. */
const AUX_ONLY = new Set(['models.common.CBLinear', 'models.common.CBFuse']);

export type { DropAuxLayer, DropAuxResult } from '../model';

const isModule = isModuleObject;
const stateOf = moduleStateOf;

function intOf(v: PyValue | undefined, what: string): number {
  const n = v === undefined ? undefined : pyNumber(v);
  if (n === undefined || !Number.isInteger(n)) throw new RepFuseError(`--drop-aux: ${what} is not an integer.`);
  return n;
}

/** A layer's `f` as a list of numbers and whether it was a single int. */
function fromList(v: PyValue | undefined, where: string): { refs: number[]; single: boolean } {
  if (Array.isArray(v)) return { refs: v.map((x, k) => intOf(x, `${where}.f[${k}]`)), single: false };
  return { refs: [intOf(v, `${where}.f`)], single: true };
}

/** Replaces an object's class (NEWOBJ class or copyreg._reconstructor's first argument). */
function setClass(o: PyObject, qualname: string): void {
  const dot = qualname.lastIndexOf('.');
  const mod = qualname.slice(0, dot);
  const name = qualname.slice(dot + 1);
  if (o.module === 'copyreg' && o.name === '_reconstructor' && o.args[0] instanceof PyGlobal) o.args[0] = new PyGlobal(mod, name);
  else {
    o.module = mod;
    o.name = name;
  }
}

function paramCount(o: PyObject, seen = new Set<PyObject>()): number {
  if (seen.has(o)) return 0;
  seen.add(o);
  let n = 0;
  const ps = stateOf(o).get('_parameters');
  if (ps instanceof PyDict) for (const [, t] of ps) if (t instanceof TorchTensor || t instanceof NewTensor) n += t.shape.reduce((a, b) => a * b, 1);
  for (const [, c] of modulesOf(o)) if (isModule(c)) n += paramCount(c, seen);
  return n;
}

const pyMod = (x: number, i: number): number => ((x % i) + i) % i;

/** Reads a float tensor as float64 values. */
function values(t: PyValue | undefined, what: string): { data: Float64Array; shape: number[]; dtype: DType; tensor: TorchTensor } {
  if (!(t instanceof TorchTensor) || !isFloatType(t.dtype)) throw new RepFuseError(`--drop-aux: ${what} is not a float tensor.`);
  return { data: Float64Array.from(readTensor(t) as ArrayLike<number>), shape: t.shape, dtype: t.dtype, tensor: t };
}

function param(o: PyObject, name: string): PyValue | undefined {
  const ps = stateOf(o).get('_parameters');
  return ps instanceof PyDict ? ps.get(name) : undefined;
}

/**
 * YOLOv7 implicit knowledge folded into the lead convs, in float64 and rounded once:
 * conv(x + a)·m = (W·m) x + (b + W a)·m per output channel.
 */
function foldImplicit(head: PyObject, where: string): number {
  const mods = modulesOf(head);
  const m = mods.get('m');
  const ia = mods.get('ia');
  const im = mods.get('im');
  if (!isModule(m) || !isModule(ia) || !isModule(im)) throw new RepFuseError(`--drop-aux: ${where} has no m / ia / im module lists to fold.`);
  const convs = modulesOf(m);
  let n = 0;
  for (const [k, conv] of convs) {
    const a = modulesOf(ia).get(k);
    const mm = modulesOf(im).get(k);
    if (!isModule(conv) || !isModule(a) || !isModule(mm)) throw new RepFuseError(`--drop-aux: ${where}.m.${String(k)} has no matching ia/im entry.`);
    const W = values(param(conv, 'weight'), `${where}.m.${String(k)}.weight`);
    const B = values(param(conv, 'bias'), `${where}.m.${String(k)}.bias`);
    const A = values(param(a, 'implicit'), `${where}.ia.${String(k)}.implicit`);
    const M = values(param(mm, 'implicit'), `${where}.im.${String(k)}.implicit`);
    const [cout, cin] = W.shape;
    const per = W.data.length / cout;
    if (per !== cin || B.data.length !== cout || A.data.length !== cin || M.data.length !== cout) {
      throw new RepFuseError(`--drop-aux: ${where}.m.${String(k)} is not a 1×1 conv matching its implicit knowledge (weight ${W.shape.join('×')}, ia ${A.data.length}, im ${M.data.length}).`);
    }
    const w2 = new Float64Array(W.data.length);
    const b2 = new Float64Array(cout);
    for (let o = 0; o < cout; o++) {
      let s = B.data[o];
      for (let c = 0; c < cin; c++) {
        s += W.data[o * cin + c] * A.data[c];
        w2[o * cin + c] = W.data[o * cin + c] * M.data[o];
      }
      b2[o] = s * M.data[o];
    }
    const ps = stateOf(conv).get('_parameters') as PyDict;
    ps.set('weight', new NewTensor(W.dtype, W.shape, () => encodeFloats(w2, W.dtype), W.tensor.requiresGrad, true));
    ps.set('bias', new NewTensor(B.dtype, B.shape, () => encodeFloats(b2, B.dtype), B.tensor.requiresGrad, true));
    n++;
  }
  return n;
}

/** Converts one YOLO model object in place; returns what it did (converted false = nothing to do). */
export function dropAuxModel(model: PyObject, entry: string): DropAuxResult {
  const where = entry || 'the model';
  const none = (note: string): DropAuxResult => ({ entry, converted: false, note, layers: [], removed: [], renumbered: [], implicitFolded: 0 });
  const seq = modulesOf(model).get('model');
  if (!isModule(seq)) return none(`${where} (${model.className}) has no 'model' layer list: not a YOLO model; left as it is.`);
  const layerKeys = modulesOf(seq).keys();
  const layers = layerKeys.map((k) => modulesOf(seq).get(k)).filter(isModule);
  if (layers.length !== layerKeys.length || !layers.length) return none(`${where}: its layer list holds something other than modules; left as it is.`);
  const head = layers[layers.length - 1];
  const headClass = head.className;
  if (UNSUPPORTED_HEADS.includes(headClass)) throw new RepFuseError(`--drop-aux: ${where}'s head is ${headClass}, which RepFuse does not convert (supported: ${Object.keys(HEADS).join(', ')}).`);
  const rule = HEADS[headClass];
  if (!rule) return none(`${where} has no auxiliary head (its head is ${headClass}); left as it is.`);

  // Indices and inputs of every layer, as the official parse_model recorded them.
  const info = layers.map((l, k) => {
    const st = stateOf(l);
    const i = intOf(st.get('i'), `${where}.model.${k}.i`);
    if (i !== k) throw new RepFuseError(`--drop-aux: ${where}.model.${k} says it is layer ${i}; the layer list is not in parse_model order.`);
    return { i, ...fromList(st.get('f'), `${where}.model.${k}`), type: l.className };
  });
  const n = layers.length;
  const H = n - 1;
  const abs = (i: number, r: number): number => (r < 0 ? i + r : r);
  /** A layer index with pass-through layers skipped; -1 = the model input. */
  const resolve = (j: number): number => {
    let k = j;
    while (k >= 0 && PASS_THROUGH.has(info[k].type)) {
      if (info[k].refs.length !== 1) throw new RepFuseError(`--drop-aux: ${where}.model.${k} (${info[k].type}) has several inputs.`);
      k = abs(k, info[k].refs[0]);
    }
    return k;
  };
  const headRefs = info[H].refs.map((r) => abs(H, r));
  if (headRefs.length % 2 !== 0) throw new RepFuseError(`--drop-aux: ${where}'s ${headClass} has ${headRefs.length} inputs; expected main and auxiliary halves.`);
  const half = headRefs.length / 2;
  const keptInputs = rule.keepInputs === 'first' ? headRefs.slice(0, half) : headRefs.slice(half);

  // The layers the kept head needs, through their inputs.
  const needed = new Set<number>();
  const work = keptInputs.map(resolve);
  while (work.length) {
    const j = work.pop()!;
    if (j < 0 || needed.has(j)) continue;
    if (j >= H) throw new RepFuseError(`--drop-aux: ${where}.model.${j} feeds the main head but comes after it.`);
    needed.add(j);
    if (AUX_ONLY.has(info[j].type)) throw new RepFuseError(`--drop-aux: the main branch of ${where} uses layer ${j} (${info[j].type}), an auxiliary-branch module; the auxiliary part cannot be removed.`);
    for (const r of info[j].refs) work.push(resolve(abs(j, r)));
  }
  const kept = [...needed].sort((a, b) => a - b);
  kept.push(H);
  const newIndex = new Map<number, number>(kept.map((old, k) => [old, k]));

  // New inputs: a reference keeps its relative form when the distance is unchanged (as a yaml
  // written for the deploy model says it), else becomes absolute; the model input stays -1.
  const newRefs = new Map<number, { refs: number[]; single: boolean }>();
  for (const old of kept) {
    const me = newIndex.get(old)!;
    const srcRefs = old === H ? keptInputs : info[old].refs.map((r) => abs(old, r));
    const orig = old === H ? keptInputs : info[old].refs;
    const refs = srcRefs.map((a, k) => {
      const target = resolve(a);
      if (target < 0) {
        if (me !== 0) throw new RepFuseError(`--drop-aux: ${where}.model.${old} reads the model input but would not be the first layer.`);
        return -1;
      }
      const t = newIndex.get(target)!;
      const r = orig[k];
      if (r < 0 && me + r === t) return r;
      return t;
    });
    newRefs.set(old, { refs, single: old === H ? false : info[old].single });
  }

  // The head: deploy class, main-branch children, implicit knowledge folded.
  let implicitFolded = 0;
  const headWhere = `${where}.model.${H}`;
  if (rule.foldImplicit) implicitFolded = foldImplicit(head, headWhere);
  const hmods = modulesOf(head);
  const newMods = new PyDict(hmods.ordered);
  for (const [to, from] of Object.entries(rule.children)) {
    const c = hmods.get(from);
    if (!isModule(c)) throw new RepFuseError(`--drop-aux: ${headWhere} (${headClass}) has no '${from}' module.`);
    newMods.set(to, c);
  }
  stateOf(head).set('_modules', newMods);
  const headModule = headClass.slice(0, headClass.lastIndexOf('.'));
  const deployQual = `${headModule}.${rule.deployClass}`;
  setClass(head, deployQual);
  // Anchors cached by the training head's last forward belong to its old inputs: dropped, the
  // deploy head computes its own on first use, as a freshly built one does.
  for (const k of ['anchors', 'strides', 'shape']) stateOf(head).delete(k);

  // Layers renumbered, the rest removed.
  const newSeq = new PyDict(modulesOf(seq).ordered);
  const save: number[] = [];
  for (const old of kept) {
    const me = newIndex.get(old)!;
    const l = layers[old];
    const st = stateOf(l);
    const { refs, single } = newRefs.get(old)!;
    st.set('i', me);
    st.set('f', single ? refs[0] : refs);
    if (old === H) {
      st.set('type', deployQual);
      st.set('np', paramCount(l));
    }
    for (const x of refs) if (x !== -1) save.push(pyMod(x, me));
    newSeq.set(String(me), l);
  }
  stateOf(seq).set('_modules', newSeq);
  stateOf(model).set('save', save.sort((a, b) => a - b));

  // The yaml the model was built from, rewritten to the deploy architecture.
  const yaml = stateOf(model).get('yaml');
  if (yaml instanceof PyDict) {
    const bb = yaml.get('backbone');
    const hd = yaml.get('head');
    if (Array.isArray(bb) && Array.isArray(hd) && bb.length + hd.length === n) {
      const all = [...bb, ...hd];
      const nb: PyValue[] = [];
      const nh: PyValue[] = [];
      for (const old of kept) {
        const e = all[old];
        if (!Array.isArray(e) || e.length < 4) throw new RepFuseError(`--drop-aux: ${where}.yaml entry ${old} is not [from, number, module, args].`);
        const { refs, single } = newRefs.get(old)!;
        const copy: PyValue[] = [single ? refs[0] : refs, ...e.slice(1)];
        if (old === H) copy[2] = rule.deployClass;
        (old < bb.length ? nb : nh).push(copy);
      }
      yaml.set('backbone', nb);
      yaml.set('head', nh);
    } else {
      throw new RepFuseError(`--drop-aux: ${where}.yaml has ${Array.isArray(bb) ? bb.length : '?'} + ${Array.isArray(hd) ? hd.length : '?'} entries for ${n} layers; cannot rewrite it.`);
    }
  }

  const table: DropAuxLayer[] = info.map((x, k) => ({ from: k, to: newIndex.get(k) ?? null, type: k === H ? `${x.type} → ${deployQual}` : x.type }));
  return {
    entry,
    converted: true,
    note: `${where}: ${headClass} → ${deployQual}; ${n - kept.length} auxiliary layers removed, ${kept.length} kept${implicitFolded ? `, implicit knowledge folded into ${implicitFolded} lead convs` : ''}.`,
    head: { from: headClass, to: deployQual, index: H, newIndex: kept.length - 1, mirrors: rule.mirrors },
    layers: table,
    removed: table.filter((l) => l.to === null),
    renumbered: table.filter((l) => l.to !== null && l.to !== l.from),
    implicitFolded,
  };
}

/**
 * The auxiliary heads (class names) of the model objects in a checkpoint root, without changing
 * anything: lets the inspector and the Fuse flow offer --drop-aux where it applies.
 */
export function findAuxHeads(root: PyValue): string[] {
  const models = isModule(root) ? [root] : root instanceof PyDict ? ['model', 'ema'].map((k) => root.get(k)).filter(isModule) : [];
  const heads = new Set<string>();
  for (const m of models) {
    const seq = modulesOf(m).get('model');
    if (!isModule(seq)) continue;
    const layers = modulesOf(seq).values();
    const last = layers[layers.length - 1];
    if (isModule(last) && (HEADS[last.className] || UNSUPPORTED_HEADS.includes(last.className))) heads.add(last.className);
  }
  return [...heads];
}

/** Converts every YOLO model object of a checkpoint root ('model' and 'ema' entries, or a bare module). */
export function dropAux(root: PyValue): DropAuxResult[] {
  if (isModule(root)) return [dropAuxModel(root, '')];
  const out: DropAuxResult[] = [];
  const seen = new Set<PyObject>();
  if (root instanceof PyDict) {
    for (const name of ['model', 'ema']) {
      const v = root.get(name);
      // The same object under both names (a memoised pickle) is converted once.
      if (isModule(v) && !seen.has(v)) {
        seen.add(v);
        out.push(dropAuxModel(v, name));
      }
    }
  }
  if (!out.length) throw new RepFuseError('--drop-aux needs a full-module YOLO checkpoint (a model object in \'model\' or \'ema\'); this file holds a state_dict or other data.');
  return out;
}
