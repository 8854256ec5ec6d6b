// The module tree of a checkpoint: built from a pickled nn.Module hierarchy (class names and
// attributes known) or from the dotted keys of a bare state_dict (structure only).
import type { NumArray } from '../dtype';
import { FormatError } from '../errors';
import { PyDict, PyObject, type PyValue } from '../torch/values';

/**
 * Deepest module nesting accepted. Real models nest a few levels (PyTorch's pickler could not
 * save more than a few hundred); a hostile `a.a.a.…` key or module chain would otherwise cost
 * time and memory quadratic in its depth.
 */
export const MAX_MODULE_DEPTH = 256;

/** An unpickled nn.Module object: its state is a dict with `_modules` and `_parameters` dicts. */
export function isModuleObject(v: PyValue | undefined): v is PyObject {
  return v instanceof PyObject && v.state instanceof PyDict && v.state.get('_modules') instanceof PyDict && v.state.get('_parameters') instanceof PyDict;
}

/** The `__dict__` of a module object (checked by isModuleObject). */
export const moduleStateOf = (o: PyObject): PyDict => o.state as PyDict;

/** The `_modules` dict of a module object (checked by isModuleObject). */
export const modulesOf = (o: PyObject): PyDict => moduleStateOf(o).get('_modules') as PyDict;

/** A tensor of a checkpoint, read lazily. */
export interface CkptTensor {
  /** Full state_dict key. */
  key: string;
  dtype: number;
  shape: number[];
  read(): NumArray;
  /** Rows of output channels [o0, o1) of a contiguous float weight, read lazily (buffer reused). */
  rows?(o0: number, o1: number): NumArray;
}

export interface ModuleNode {
  /** Dotted module path from the root ('' for the root). */
  path: string;
  name: string;
  /** Qualified class name when the module itself was pickled (`models.common.RepConv`). */
  className?: string;
  children: Map<string, ModuleNode>;
  /** Parameters and buffers by local name (`weight`, `running_mean`, …). */
  tensors: Map<string, CkptTensor>;
  /** Plain attributes of a pickled module (`eps`, `stride`, `padding`, `groups`, `deploy`, …). */
  attrs: Map<string, unknown>;
  parent?: ModuleNode;
}

export function newNode(path: string, name: string, parent?: ModuleNode): ModuleNode {
  return { path, name, children: new Map(), tensors: new Map(), attrs: new Map(), parent };
}

export function child(parent: ModuleNode, name: string): ModuleNode {
  let c = parent.children.get(name);
  if (!c) {
    c = newNode(parent.path ? `${parent.path}.${name}` : name, name, parent);
    parent.children.set(name, c);
  }
  return c;
}

/** Builds a tree from state_dict entries (`a.b.weight` → module a.b, tensor weight). */
export function treeFromStateDict(entries: CkptTensor[], stripPrefix = ''): ModuleNode {
  const root = newNode('', '');
  for (const t of entries) {
    const key = stripPrefix && t.key.startsWith(stripPrefix) ? t.key.slice(stripPrefix.length) : t.key;
    const parts = key.split('.');
    if (parts.length > MAX_MODULE_DEPTH) {
      throw new FormatError(`state_dict key '${key.slice(0, 60)}…' nests ${parts.length - 1} modules deep, more than ${MAX_MODULE_DEPTH}; refusing the file.`);
    }
    const leaf = parts.pop()!;
    let node = root;
    for (const p of parts) node = child(node, p);
    node.tensors.set(leaf, t);
  }
  return root;
}

export function* walk(node: ModuleNode): Generator<ModuleNode> {
  yield node;
  for (const c of node.children.values()) yield* walk(c);
}

export function get(node: ModuleNode | undefined, ...names: string[]): ModuleNode | undefined {
  let n = node;
  for (const name of names) n = n?.children.get(name);
  return n;
}

/** Every tensor key under a node. */
export function keysUnder(node: ModuleNode): string[] {
  const out: string[] = [];
  for (const n of walk(node)) for (const t of n.tensors.values()) out.push(t.key);
  return out;
}

export function numelOf(shape: number[]): number {
  return shape.reduce((a, b) => a * b, 1);
}
