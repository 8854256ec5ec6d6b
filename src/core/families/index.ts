// The registry of re-parameterization families: ONE list, read by the checkpoint detector, the
// ONNX detector's family guess, the tree's icons, the report and the tests. Adding a family that
// reuses known branch kinds = one new file in this folder + one line in FAMILY_LIST.
// Order matters: the first family whose matcher accepts a module wins (variants before the
// general case: YOLOv7 before QARepVGG before YOLOv6 before RepVGG).
import acnet from './acnet';
import dbb from './dbb';
import fastvit_repcpe from './fastvit_repcpe';
import fastvit_repmixer from './fastvit_repmixer';
import mobileone from './mobileone';
import orepa from './orepa';
import ppyoloe from './ppyoloe';
import qarepvgg from './qarepvgg';
import qarepvggv2 from './qarepvggv2';
import repghost from './repghost';
import repvgg from './repvgg';
import replknet from './replknet';
import repvit from './repvit';
import type { FamilyDef, OnnxFacts } from './types';
import ultralytics_repconv from './ultralytics_repconv';
import unireplknet from './unireplknet';
import ultralytics_repvggdw from './ultralytics_repvggdw';
import yolov6 from './yolov6';
import yolov7 from './yolov7';
import yolov9 from './yolov9';

export type { DeployLayout, FamilyDef, OfficialRef, OnnxFacts } from './types';

export const FAMILY_LIST = [
  ...orepa, // OREPA's three block classes (their matchers look for its own tensor names)
  fastvit_repmixer,
  fastvit_repcpe,
  yolov7,
  qarepvggv2,
  qarepvgg,
  yolov6,
  repvgg,
  mobileone,
  replknet,
  unireplknet,
  repghost,
  dbb,
  acnet,
  ppyoloe,
  yolov9,
  ultralytics_repconv,
  repvit,
  ultralytics_repvggdw,
] as const;

export type FamilyId = (typeof FAMILY_LIST)[number]['id'];

/** Families by id. */
export const FAMILIES = Object.fromEntries(FAMILY_LIST.map((f) => [f.id, f])) as { [K in FamilyId]: FamilyDef<K> };

export const isFamilyId = (s: string): s is FamilyId => Object.prototype.hasOwnProperty.call(FAMILIES, s);

/** The family with this label (as a report or the tree shows it), if any. */
export function familyByLabel(label: string): FamilyDef | undefined {
  return FAMILY_LIST.find((f) => f.label === label);
}

/** Labels of ONNX blocks no family claims, from the structure alone. */
const STYLE_FALLBACKS: [(f: OnnxFacts) => boolean, string, FamilyId | undefined][] = [
  [(f) => f.scaled, 'PP-YOLOE-style', 'ppyoloe'],
  [(f) => f.asym, 'ACNet-style', 'acnet'],
  [(f) => f.postBN, 'QARepVGG-style', 'qarepvgg'],
  [(f) => f.depthwise, 'depthwise rep block', 'ultralytics_repvggdw'],
  [() => true, 'RepVGG-style', 'repvgg'],
];

/** The family label of an ONNX block: the first family whose `onnx` test accepts it, else a "-style" guess. */
export function guessOnnxFamily(f: OnnxFacts): string {
  for (const fam of FAMILY_LIST) if ((fam as FamilyDef).onnx?.(f)) return fam.label;
  return STYLE_FALLBACKS.find(([t]) => t(f))![1];
}

/** Codicon of a family label (registry labels, then the "-style" guesses), for the tree. */
export function familyIcon(label: string): { id: string; color?: string } {
  const fam = familyByLabel(label);
  if (fam) return fam.icon;
  const fb = STYLE_FALLBACKS.find(([, l]) => l === label);
  if (fb && fb[2]) return FAMILIES[fb[2]].icon;
  return { id: 'layers' };
}
