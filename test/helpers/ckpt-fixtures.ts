// The PyTorch checkpoint fixtures (test/fixtures/torch) and their manifest, plus small readers the
// checkpoint and interop tests share: every tensor of a .pt/.pth/.safetensors file by state_dict
// key, file hashes, and the output name a fuse of each fixture is written to.
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { FAMILIES, isFamilyId } from '../../src/core/families';
import { readSafetensors } from '../../src/core/safetensors';
import { namedTensors, openTorch } from '../../src/core/torch/load';
import { readTensor, type TorchTensor } from '../../src/core/torch/tensor';
import { repoRoot } from './paths';

export const torchFixtureDir = path.join(repoRoot, 'test', 'fixtures', 'torch');
export const manifestPath = path.join(torchFixtureDir, 'manifest.json');

export type Form = 'state_dict' | 'state_dict_fp16' | 'legacy' | 'module_prefix' | 'safetensors' | 'full_module' | 'full_module_ema' | 'hostile';

export interface ManifestBlock {
  name: string;
  family: string;
  class: string;
  class_path: string;
  fixture_class: string;
  pickled_class?: string;
  kernel: number[];
  stride: number;
  padding: number[];
  groups: number;
  in: number;
  out: number;
  branches: number;
  conv_branch_kernels: number[][];
  identity: 'bn' | 'plain' | null;
  post_bn: boolean;
  act: string | null;
  alpha: number | null;
  eps: number;
  deploy_name: string;
  deploy_flag: Record<string, unknown> | null;
  removed_children: string[];
  deploy_keys: string[];
  removed_keys: string[];
  kept_keys: string[];
}

export interface ManifestFile {
  file: string;
  family: string | null;
  form: Form;
  dtype: 'float32' | 'float16' | null;
  entry: string | null;
  prefix: string;
  format: 'zip' | 'legacy' | 'safetensors';
  bytes: number;
  sha256: string;
  tensors: number;
  blocks?: ManifestBlock[];
  deploy_state_dict_keys: string[];
  model_class?: string;
  entries?: Record<string, unknown>;
  payload?: { callable: string; args: unknown[]; marker: string; payload_key: string };
}

export interface Manifest {
  hostile_marker: string;
  families: Record<string, { state_dict_keys: string[]; deploy_state_dict_keys: string[] }>;
  files: ManifestFile[];
}

export const haveTorchFixtures = fs.existsSync(manifestPath);

export function loadManifest(): Manifest {
  return JSON.parse(fs.readFileSync(manifestPath, 'utf8')) as Manifest;
}

/** The manifest (an empty one when the fixtures are missing), split into normal and hostile files. */
export function manifestParts() {
  const manifest: Manifest = haveTorchFixtures ? loadManifest() : { hostile_marker: '/tmp/repfuse_pwned_marker', families: {}, files: [] };
  const byName = (name: string): ManifestFile => {
    const fx = manifest.files.find((f) => f.file === name);
    if (!fx) throw new Error(`${name} is not in the manifest`);
    return fx;
  };
  return {
    manifest,
    fixtures: manifest.files.filter((f) => f.form !== 'hostile'),
    hostile: manifest.files.filter((f) => f.form === 'hostile'),
    marker: manifest.hostile_marker,
    byName,
  };
}

/** Hands out a fresh, empty sub-folder of `root()` per call, so "no temp files left" can be checked exactly. */
export function freshDirs(root: () => string): () => string {
  let counter = 0;
  return () => {
    const d = path.join(root(), `d${++counter}`);
    fs.mkdirSync(d);
    return d;
  };
}

export const fixturePath = (fx: ManifestFile | string): string => path.join(torchFixtureDir, typeof fx === 'string' ? fx : fx.file);

export const isFullModule = (fx: ManifestFile): boolean => fx.form === 'full_module' || fx.form === 'full_module_ema';

/** The registry family of a fixture block (Ultralytics: by class). */
export function familyOf(b: ManifestBlock) {
  const id = b.family === 'ultralytics' ? (b.class === 'RepVGGDW' ? 'ultralytics_repvggdw' : 'ultralytics_repconv') : b.family;
  if (!isFamilyId(id)) throw new Error(`no family '${b.family}' in the registry`);
  return FAMILIES[id];
}

/** The label RepFuse gives each fixture family (and, for Ultralytics, class): from the family registry. */
export function familyLabel(b: ManifestBlock): string {
  return familyOf(b).label;
}

/**
 * Where a block's fused conv lives in the state_dict: `<block>.<deploy_name>`, or `<block>` itself
 * when the official conversion replaces the block by its conv (RepViT's replace_batchnorm; the
 * self-written fixture modules keep a `conv` child, so the manifest names that).
 */
const deployBase = (b: ManifestBlock): string => (familyOf(b).deploy.replaceBlock ? b.name : `${b.name}.${b.deploy_name}`);

/** The keys RepFuse writes when fusing `fx` into a state_dict: the manifest's deploy keys, `module.` stripped. */
export function expectedStateDictKeys(fx: ManifestFile): string[] {
  const keys = fx.deploy_state_dict_keys.map((k) => (fx.prefix && k.startsWith(fx.prefix) ? k.slice(fx.prefix.length) : k));
  const moved = new Map<string, string>();
  for (const b of fx.blocks ?? []) {
    if (!familyOf(b).deploy.replaceBlock) continue;
    for (const t of ['weight', 'bias']) moved.set(`${b.name}.${b.deploy_name}.${t}`, `${deployBase(b)}.${t}`);
  }
  return keys.map((k) => moved.get(k) ?? k);
}

/** The fused conv's `[weight, bias]` keys of a block (the manifest's deploy keys may also list kept ones, e.g. QARepVGG's bn). */
export function blockDeployKeys(_fx: ManifestFile, b: ManifestBlock): [string, string] {
  return [`${deployBase(b)}.weight`, `${deployBase(b)}.bias`];
}

/** Where the fuse of `fx` goes in `dir`: `<stem>.fused.pt`, or `.safetensors` for a safetensors input. */
export function fusedName(fx: ManifestFile, dir: string, ext?: string): string {
  const e = ext ?? (fx.format === 'safetensors' ? '.safetensors' : '.pt');
  return path.join(dir, `${path.basename(fx.file, path.extname(fx.file))}.fused${e}`);
}

export interface OpenedTensors {
  tensors: Map<string, TorchTensor>;
  close(): void;
}

/** Every tensor of a checkpoint by state_dict-style key (`model.model.0.conv.weight` inside a full module). */
export function openTensors(file: string): OpenedTensors {
  if (file.endsWith('.safetensors')) {
    const s = readSafetensors(file);
    return { tensors: s.tensors, close: () => s.close() };
  }
  const f = openTorch(file);
  return { tensors: namedTensors(f.root), close: () => f.close() };
}

/** Every tensor of a checkpoint by state_dict-style key, with its shape and its values as float64. */
export function readAllTensors(file: string): Map<string, { shape: number[]; values: Float64Array }> {
  const t = openTensors(file);
  try {
    const out = new Map<string, { shape: number[]; values: Float64Array }>();
    for (const [k, v] of t.tensors) out.set(k, { shape: v.shape, values: Float64Array.from(readTensor(v) as ArrayLike<number>) });
    return out;
  } finally {
    t.close();
  }
}

export function sha256(file: string): string {
  return crypto.createHash('sha256').update(fs.readFileSync(file)).digest('hex');
}

/** `[out, in/groups, ...kernel]` of a block's fused weight, from the manifest. */
export const fusedWeightShape = (b: ManifestBlock): number[] => [b.out, b.in / b.groups, ...b.kernel];
