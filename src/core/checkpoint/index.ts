// The checkpoint engine: open a .pt/.pth/.ckpt (zip, legacy, full-module pickles) or .safetensors,
// find where the weights are, detect blocks, and write what the deploy model loads: a fused
// state_dict (.pt / .safetensors), or the checkpoint itself with its blocks switched to deploy form.
import * as path from 'node:path';
import { blockDataFromSpec } from '../blockdata';
import { FileSource, readInto } from '../bytes';
import { DType, decodeNumbers, dtypeName, dtypeSize, encodeFloats, isFloatType, type NumArray } from '../dtype';
import { FormatError, RepFuseError } from '../errors';
import { prepareFusion, type PreparedFusion } from '../fusion';
import { checkFinite, streamFusedWeight } from '../fusestream';
import type { BlockData, FoldInfo, InspectReport, ModelSummary, RejectedCandidate } from '../model';
import { looksLikeSafetensors, readSafetensors, type SafetensorsFile, writeSafetensors } from '../safetensors';
import { openTorch, type TorchFile } from '../torch/load';
import { isContiguous, NewStorage, NewTensor, readTensor, TorchTensor } from '../torch/tensor';
import { PyDict, PyObject, PyTuple, type PyValue, pyNumber } from '../torch/values';
import { writeTorchZip } from '../torch/save';
import { type CkptBlock, type CkptDetection, detectCheckpoint } from './detect';
import { dropAux, type DropAuxResult, findAuxHeads } from './dropaux';
import { deployBlockObject, deployStateDict, foldObject, foldParamsDelta, type FoldPlan, type PlannedFold, planFolds } from './deploy';
import { ckptBlockSpec } from './fuse';
import { type CkptTensor, child, isModuleObject, MAX_MODULE_DEPTH, type ModuleNode, newNode, numelOf, treeFromStateDict } from './tree';

export { FAMILIES } from './detect';

export interface CheckpointOptions {
  /** Overrides every BN epsilon (bare state_dicts whose family default does not apply). */
  eps?: number;
  /** Tensors come in module order (false for safetensors, which sorts names). */
  moduleOrder?: boolean;
  /** `--family`: the variant to assume where a state_dict cannot tell (qarepvgg / qarepvggv2). */
  family?: string;
  /** YOLO training checkpoints: convert to the deploy architecture first (see dropaux.ts). */
  dropAux?: boolean;
}

/** One set of weights found in the file: a state_dict or an nn.Module object. */
export interface WeightSet {
  /** Where it was found: '' (the root), 'model', 'ema', 'state_dict', … */
  entry: string;
  kind: 'state_dict' | 'module';
  /** Prefix stripped from the keys (`module.` from DataParallel), or ''. */
  prefix: string;
  /** Keys (after stripping) → tensors, in the file's order. */
  tensors: Map<string, TorchTensor>;
  tree: ModuleNode;
  detection: CkptDetection;
  /** The module object (kind 'module'). */
  module?: PyObject;
  className?: string;
}

export interface CheckpointAnalysis {
  path: string;
  format: 'pytorch' | 'safetensors';
  torch?: TorchFile;
  safetensors?: SafetensorsFile;
  /** The weights RepFuse inspects and validates (EMA preferred, as YOLO loaders do). */
  primary: WeightSet;
  /** Every module object in the checkpoint (model and ema): all are rewritten with --keep-modules. */
  modules: WeightSet[];
  report: InspectReport;
  /** What --drop-aux did to each model object (absent without the option). */
  dropAux?: DropAuxResult[];
  close(): void;
}

const ENTRY_ORDER = ['ema', 'model', 'state_dict', 'model_state_dict', 'module', 'net', 'params', 'weights'];

const isModule = isModuleObject;

function tensorDict(v: PyValue | undefined): PyDict | undefined {
  if (!(v instanceof PyDict) || v.size === 0) return undefined;
  let tensors = 0;
  for (const [k, x] of v) {
    if (typeof k !== 'string') return undefined;
    if (x instanceof TorchTensor) tensors++;
  }
  return tensors > 0 && tensors >= v.size / 2 ? v : undefined;
}

/** A module attribute as plain data: numbers (incl. integral floats, numpy scalars), tuples as arrays. */
function plainAttr(v: PyValue): unknown {
  if (v instanceof PyTuple) return v.items.map((x) => pyNumber(x) ?? x);
  return pyNumber(v) ?? v;
}

function ckptTensor(key: string, t: TorchTensor): CkptTensor {
  const ct: CkptTensor = { key, dtype: t.dtype, shape: t.shape, read: () => readTensor(t) };
  const es = dtypeSize(t.dtype);
  if (es && isContiguous(t) && t.shape.length >= 2 && isFloatType(t.dtype)) {
    // Weights are read slice by slice (rows of output channels) into one reused buffer.
    const per = numelOf(t.shape.slice(1));
    let buf: Uint8Array | undefined;
    ct.rows = (o0, o1) => {
      const len = (o1 - o0) * per * es;
      if (!buf || buf.length < len) buf = new Uint8Array(len);
      const b = buf.subarray(0, len);
      readInto(t.storage.source, b, t.storage.offset + (t.storageOffset + o0 * per) * es);
      return decodeNumbers(b, t.dtype, t.storage.source.name);
    };
  }
  return ct;
}

/** Walks an nn.Module object like state_dict(): parameters, persistent buffers, then children. */
function moduleTree(obj: PyObject, tensors: Map<string, TorchTensor>): ModuleNode {
  const root = newNode('', '');
  const seen = new Set<PyObject>();
  const visit = (o: PyObject, node: ModuleNode, depth: number) => {
    if (seen.has(o)) return;
    if (depth > MAX_MODULE_DEPTH) throw new FormatError(`the pickled modules nest more than ${MAX_MODULE_DEPTH} levels deep (at '${node.path.slice(0, 60)}…'); refusing the file.`);
    seen.add(o);
    node.className = o.className;
    const st = o.state as PyDict;
    const nonPersistent = new Set<string>();
    const np = st.get('_non_persistent_buffers_set');
    if (np && typeof np === 'object' && 'items' in np) for (const x of (np as { items: PyValue[] }).items) if (typeof x === 'string') nonPersistent.add(x);
    for (const field of ['_parameters', '_buffers']) {
      const d = st.get(field);
      if (!(d instanceof PyDict)) continue;
      for (const [k, v] of d) {
        if (typeof k !== 'string' || !(v instanceof TorchTensor) || (field === '_buffers' && nonPersistent.has(k))) continue;
        const key = node.path ? `${node.path}.${k}` : k;
        tensors.set(key, v);
        node.tensors.set(k, ckptTensor(key, v));
      }
    }
    for (const [k, v] of st) {
      if (typeof k !== 'string' || k.startsWith('_')) continue;
      if (v === null || typeof v === 'boolean' || typeof v === 'string' || v instanceof PyTuple || pyNumber(v) !== undefined) {
        node.attrs.set(k, typeof v === 'boolean' ? v : plainAttr(v));
      }
    }
    const mods = st.get('_modules');
    if (mods instanceof PyDict) {
      for (const [k, v] of mods) {
        if (typeof k === 'string' && isModule(v)) visit(v, child(node, k), depth + 1);
      }
    }
  };
  visit(obj, root, 0);
  return root;
}

function fromStateDict(entry: string, d: PyDict | Map<string, TorchTensor>, opts: CheckpointOptions): WeightSet {
  const all = new Map<string, TorchTensor>();
  for (const [k, v] of d) if (typeof k === 'string' && v instanceof TorchTensor) all.set(k, v);
  const keys = [...all.keys()];
  const prefix = keys.length && keys.every((k) => k.startsWith('module.')) ? 'module.' : '';
  const tensors = new Map<string, TorchTensor>();
  for (const [k, v] of all) tensors.set(k.slice(prefix.length), v);
  const tree = treeFromStateDict([...tensors].map(([k, t]) => ckptTensor(k, t)));
  return { entry, kind: 'state_dict', prefix, tensors, tree, detection: detectCheckpoint(tree, opts) };
}

function fromModule(entry: string, obj: PyObject, opts: CheckpointOptions): WeightSet {
  const tensors = new Map<string, TorchTensor>();
  const tree = moduleTree(obj, tensors);
  return { entry, kind: 'module', prefix: '', tensors, tree, detection: detectCheckpoint(tree, opts), module: obj, className: obj.className };
}

/** Finds the weights in a torch.load result. */
function locate(root: PyValue, file: string, opts: CheckpointOptions): { primary: WeightSet; modules: WeightSet[] } {
  if (isModule(root)) {
    const w = fromModule('', root, opts);
    return { primary: w, modules: [w] };
  }
  const sd = tensorDict(root);
  if (sd) {
    const w = fromStateDict('', sd, opts);
    return { primary: w, modules: [] };
  }
  if (root instanceof PyDict) {
    const modules: WeightSet[] = [];
    let primary: WeightSet | undefined;
    for (const name of ENTRY_ORDER) {
      const v = root.get(name);
      if (isModule(v)) {
        const w = fromModule(name, v, opts);
        modules.push(w);
        primary ??= w;
      }
    }
    if (!primary) {
      for (const name of ENTRY_ORDER) {
        const d = tensorDict(root.get(name));
        if (d) {
          primary = fromStateDict(name, d, opts);
          break;
        }
      }
    }
    if (primary) return { primary, modules };
    const keys = root.keys().filter((k): k is string => typeof k === 'string');
    throw new RepFuseError(`found no weights: the checkpoint is a dict with keys ${keys.slice(0, 12).map((k) => `'${k}'`).join(', ')}${keys.length > 12 ? ', …' : ''} but none of ${ENTRY_ORDER.map((k) => `'${k}'`).join(', ')} holds a module or a state_dict.`, file);
  }
  throw new RepFuseError(`found no weights: the file holds ${root instanceof PyObject ? `a ${root.className} object` : typeof root}, not a module, a state_dict or a checkpoint dict.`, file);
}

function summarize(a: Omit<CheckpointAnalysis, 'report' | 'close'>, fileSize: number): ModelSummary {
  const w = a.primary;
  const dtypes: Record<string, number> = {};
  let params = 0;
  let bytes = 0;
  for (const t of w.tensors.values()) {
    const n = numelOf(t.shape);
    params += n;
    bytes += n * (dtypeSize(t.dtype) ?? 0);
    dtypes[dtypeName(t.dtype)] = (dtypes[dtypeName(t.dtype)] ?? 0) + n;
  }
  const where = w.entry ? `'${w.entry}' entry` : 'the root';
  const what = w.kind === 'module' ? `full-module pickle (${w.className})` : 'state_dict';
  const fmt = a.format === 'safetensors' ? 'safetensors' : `torch ${a.torch!.format}${a.torch!.format === 'zip' ? '' : ' format'}`;
  const notes: string[] = [];
  if (w.prefix) notes.push(`keys carry the '${w.prefix}' prefix (DataParallel); it is stripped in the output`);
  if (a.modules.length > 1) notes.push(`${a.modules.map((m) => `'${m.entry}'`).join(' and ')} hold modules; inspected: '${w.entry}' (as YOLO loaders prefer EMA weights)`);
  if (w.kind === 'state_dict') notes.push('a state_dict has no graph: families are recognised by module names; stride, padding and groups are inferred (see each block)');
  for (const x of a.torch?.warnings ?? []) notes.push(x);
  return {
    format: a.format,
    path: a.path,
    fileSize,
    layout: `${fmt} · ${what} in ${where}`,
    paramCount: params,
    paramBytes: bytes,
    dtypes,
    notes,
  };
}

/** Kept for callers of the checkpoint module; the format registry (../formats) decides. */
export { isCheckpointPath } from '../formats';

/** Opens and analyzes a checkpoint. The caller must close() it. */
export function analyzeCheckpoint(file: string, opts: CheckpointOptions = {}): CheckpointAnalysis {
  const src = new FileSource(file);
  let torch: TorchFile | undefined;
  let st: SafetensorsFile | undefined;
  try {
    let located: { primary: WeightSet; modules: WeightSet[] };
    let dropped: DropAuxResult[] | undefined;
    // By content, or by name: a .safetensors file with a broken header gets the safetensors reader's error.
    if (looksLikeSafetensors(src) || path.extname(file).toLowerCase() === '.safetensors') {
      st = readSafetensors(src);
      located = { primary: fromStateDict('', st.tensors, { ...opts, moduleOrder: false }), modules: [] };
    } else {
      torch = openTorch(src);
      if (opts.dropAux) dropped = dropAux(torch.root);
      located = locate(torch.root, file, opts);
    }
    const base = { path: file, format: st ? ('safetensors' as const) : ('pytorch' as const), torch, safetensors: st, ...located };
    const w = located.primary;
    const paramsRemoved = w.detection.blocks.reduce((acc, b) => acc + b.info.paramsBefore - b.info.paramsAfter, 0);
    const summary = summarize(base, src.size);
    const report: InspectReport = {
      model: summary,
      blocks: w.detection.blocks.map((b) => b.info),
      rejected: w.detection.rejected,
      folds: [],
      notFolded: [],
      paramCountAfter: summary.paramCount - paramsRemoved,
    };
    const aux = torch && !opts.dropAux ? findAuxHeads(torch.root) : [];
    if (aux.length) {
      summary.auxHeads = aux;
      summary.notes.push(`auxiliary training head${aux.length === 1 ? '' : 's'} ${aux.join(', ')}: \`repfuse fuse --drop-aux\` converts this training checkpoint to the deploy architecture`);
    }
    if (opts.dropAux && !dropped) throw new RepFuseError('--drop-aux needs a full-module YOLO checkpoint; a safetensors file holds only tensors.', file);
    for (const d of dropped ?? []) summary.notes.push(`--drop-aux: ${d.note}`);
    return { ...base, report, dropAux: dropped, close: () => src.close() };
  } catch (err) {
    src.close();
    throw err;
  }
}

/** Branch numbers of one block, for the statistics view. */
export function checkpointBlockData(a: CheckpointAnalysis, blockName: string): BlockData {
  const b = a.primary.detection.blocks.find((x) => x.info.name === blockName);
  if (!b) throw new RepFuseError(`no block named '${blockName}'.`, a.path);
  return blockDataFromSpec(b.info, ckptBlockSpec(b));
}

// ----- writing ----------------------------------------------------------------------------------

export interface CheckpointWriteOptions {
  /** Convert every float tensor to this dtype (default: keep each tensor's own). */
  dtype?: DType;
  /** Rewrite the checkpoint with its module objects in deploy form instead of writing a state_dict. */
  keepModules?: boolean;
  /**
   * Fold every plain Conv+BN (and RepViT's BN+Linear, distillation head) as the family's official
   * whole-model fuse does; undefined = the default (full-module YOLO checkpoints and RepViT).
   */
  foldBN?: boolean;
  /** BN epsilon override (as CheckpointOptions.eps), for the folds of a state_dict. */
  eps?: number;
  signal?: AbortSignal;
}

export interface CheckpointWriteResult {
  path: string;
  bytes: number;
  /** What was written, in words. */
  layout: string;
  /** Plain Conv+BN (BN+Linear, heads) folded by --fold-bn, in the model RepFuse inspects. */
  folds: FoldInfo[];
  /** Modules the fold recognised but could not fold, with the reason. */
  notFolded: RejectedCandidate[];
  /** One line per fold plan (what was folded, as which official function does it). */
  foldNotes: string[];
  /** Elements the folds add minus those they remove, in the weights RepFuse inspects. */
  paramsDelta: number;
}

/** The fused weight and bias of a block as lazily produced tensors in `dtype`. */
export function fusedTensors(block: CkptBlock, dtype: DType, asParameter = false, requiresGrad = asParameter): { weight: NewTensor; bias: NewTensor } {
  let prep: PreparedFusion | undefined;
  const prepared = () => (prep ??= prepareFusion(ckptBlockSpec(block)));
  const shape = [block.outChannels, block.inPerGroup, ...block.kernel];
  const storage = new NewStorage(dtype, numelOf(shape), () => {
    const out = new Uint8Array(numelOf(shape) * dtypeSize(dtype)!);
    let pos = 0;
    streamFusedWeight(prepared(), dtype, (c) => {
      out.set(c, pos);
      pos += c.length;
    });
    return out;
  });
  // Writers that can stream take the weight slice by slice, never whole.
  storage.stream = (emit) => streamFusedWeight(prepared(), dtype, emit);
  const weight = new NewTensor(dtype, shape, storage, requiresGrad, asParameter);
  const bias = new NewTensor(dtype, [block.outChannels], () => {
    const p = prepared();
    checkFinite(p.bias, `${p.spec.name}: the fused bias`);
    const b = encodeFloats(p.bias, dtype);
    prep = undefined;
    return b;
  }, requiresGrad, asParameter);
  return { weight, bias };
}

function convertDtype(t: TorchTensor, dtype: DType | undefined): TorchTensor | NewTensor {
  if (dtype === undefined || t.dtype === dtype || !isFloatType(t.dtype)) return t;
  return new NewTensor(dtype, t.shape, () => encodeFloats(Float64Array.from(readTensor(t) as ArrayLike<number>), dtype));
}

/**
 * The fused state_dict: each block's keys replaced by its family's deploy keys, and each planned
 * fold's (see deploy.ts) by the folded layer's, in place.
 */
export function fusedStateDict(w: WeightSet, dtype?: DType, folds: PlannedFold[] = []): Map<string, TorchTensor | NewTensor> {
  return deployStateDict(w.tensors, w.detection.blocks, folds, (b, dt) => fusedTensors(b, dt), (t) => convertDtype(t, dtype), dtype);
}

/** The whole-model folds of a weight set for `--fold-bn` (undefined = the family's default). */
export function checkpointFolds(w: WeightSet, foldBN: boolean | undefined, eps?: number, writesModules = false): FoldPlan {
  return planFolds(w.tree, w.detection.blocks, w.kind, foldBN, eps, writesModules, w.detection.rejected.map((r) => r.name));
}

/** Converts every float parameter and buffer of a module tree to `dtype`, in place. */
function convertModuleTensors(root: PyObject, dtype: DType): void {
  const seen = new Set<PyObject>();
  const visit = (o: PyObject) => {
    if (seen.has(o)) return;
    seen.add(o);
    const st = o.state as PyDict;
    for (const field of ['_parameters', '_buffers']) {
      const d = st.get(field);
      if (!(d instanceof PyDict)) continue;
      for (const [k, v] of d) {
        if (v instanceof TorchTensor && isFloatType(v.dtype) && v.dtype !== dtype) {
          const t = v;
          d.set(k, new NewTensor(dtype, t.shape, () => encodeFloats(Float64Array.from(readTensor(t) as ArrayLike<number>), dtype), t.requiresGrad, t.isParameter));
        }
      }
    }
    const mods = st.get('_modules');
    if (mods instanceof PyDict) for (const [, v] of mods) if (isModule(v)) visit(v);
  };
  visit(root);
}

export async function writeCheckpoint(a: CheckpointAnalysis, out: string, opts: CheckpointWriteOptions = {}): Promise<CheckpointWriteResult> {
  const ext = path.extname(out).toLowerCase();
  if (path.resolve(out) === path.resolve(a.path)) throw new RepFuseError('refusing to overwrite the input checkpoint.', out);
  const folded = (plans: FoldPlan[]) => ({
    folds: plans.flatMap((p) => p.folds.flatMap((f) => (f.info ? [f.info] : []))),
    notFolded: plans.flatMap((p) => p.notFolded),
    foldNotes: plans.map((p) => p.note).filter((n): n is string => !!n),
    paramsDelta: (plans[0]?.folds ?? []).reduce((acc, f) => acc + foldParamsDelta(f), 0),
  });
  if (ext === '.safetensors') {
    if (opts.keepModules) throw new RepFuseError('--keep-modules writes a .pt checkpoint, not .safetensors.', out);
    const plan = checkpointFolds(a.primary, opts.foldBN, opts.eps);
    const sd = fusedStateDict(a.primary, opts.dtype, plan.folds);
    const res = await writeSafetensors(out, sd, { metadata: { format: 'pt', producer: 'repfuse' }, signal: opts.signal });
    return { path: res.path, bytes: res.bytes, layout: `safetensors, ${sd.size} tensors`, ...folded([plan]) };
  }
  if (!['.pt', '.pth', '.ckpt', '.bin'].includes(ext)) throw new RepFuseError(`cannot write '${ext || '(no extension)'}'; use .pt, .pth or .safetensors.`, out);
  if (opts.keepModules) {
    if (!a.modules.length || !a.torch) throw new RepFuseError('--keep-modules needs a checkpoint that holds module objects (a full-module pickle); this one holds a state_dict.', a.path);
    const plans: FoldPlan[] = [];
    for (const w of a.modules) {
      const plan = checkpointFolds(w, opts.foldBN, opts.eps, true);
      plans.push(plan);
      // A dtype applies to the whole module, not just the fused convs: no mixed precision.
      if (opts.dtype !== undefined) convertModuleTensors(w.module!, opts.dtype);
      for (const b of w.detection.blocks) deployBlockObject(b, w.module!, (blk, dt, rg) => fusedTensors(blk, dt, true, rg), opts.dtype);
      for (const f of plan.folds) foldObject(f, w.module!, opts.dtype);
    }
    const res = await writeTorchZip(out, a.torch.root, { archiveName: a.torch.archiveRoot, signal: opts.signal });
    return { path: res.path, bytes: res.bytes, layout: `checkpoint with ${a.modules.map((m) => `'${m.entry || 'root'}'`).join(', ')} in deploy form`, ...folded(plans.slice(0, 1)) };
  }
  const plan = checkpointFolds(a.primary, opts.foldBN, opts.eps);
  const sd = fusedStateDict(a.primary, opts.dtype, plan.folds);
  const root = new PyDict(true);
  for (const [k, v] of sd) root.set(k, v);
  const res = await writeTorchZip(out, root, { archiveName: path.basename(out, ext).replace(/[^A-Za-z0-9_.-]/g, '_') || 'archive', signal: opts.signal });
  return { path: res.path, bytes: res.bytes, layout: `state_dict, ${sd.size} tensors`, ...folded([plan]) };
}

/** Values of a fused block as written (rounded to the file's dtype), for validation. */
export function writtenValues(values: Float64Array, dtype: DType): NumArray {
  return dtype === DType.float64 ? values : decodeNumbers(encodeFloats(values, dtype), dtype);
}
