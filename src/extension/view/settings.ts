// The `repfuse.*` settings turned into engine options, with problems stated in full sentences.
// Pure: the caller passes the raw values it read from the configuration.
import * as path from 'node:path';

/** Extensions the model editor and the commands accept: the core's format registry decides. */
export { MODEL_EXTENSIONS, isModelPath as isModelFile } from '../../core/formats';

/** `<dir>/<name><suffix><ext>` beside the input: the same rule as the engine's defaultOutput. */
export function fusedOutputPath(input: string, suffix: string): string {
  const ext = path.extname(input);
  return path.join(path.dirname(input), `${path.basename(input, ext)}${suffix}${ext}`);
}

export interface CheckpointOptions {
  /** BN epsilon for bare state_dicts that do not store it; 'auto' guesses from the family. */
  defaultEpsilon: number | 'auto';
  outputDtype: 'keep' | 'float32' | 'float16';
  /** repfuse.checkpoint.foldBN: fold plain Conv+BN as the official whole-model fuse ('auto': full-module YOLO and RepViT). */
  foldBN?: 'auto' | 'on' | 'off';
}

/** What inspecting a model depends on (a change re-parses open models). */
export interface InspectOptions {
  foldBN: boolean;
  checkpoint: CheckpointOptions;
}

export interface FuseJobOptions extends InspectOptions {
  output: string;
  force: boolean;
  validate: boolean;
  atol: number;
  rtol: number;
  /** repfuse.validation.rtol is set somewhere (else fp16/bf16 checkpoints get a float16-sized rtol). */
  rtolExplicit?: boolean;
  timeoutMs: number;
  inputShapes: Record<string, number[]>;
  /** Run full-module checkpoints whole in this Python (only after the trust and consent checks). */
  python?: { interpreter: string; path: string[] };
  /** Remove YOLO auxiliary training heads first (fuse --drop-aux). */
  dropAux?: boolean;
}

/** The raw configuration values, as `WorkspaceConfiguration.get` returns them. */
export interface RawSettings {
  validationEnabled?: unknown;
  atol?: unknown;
  rtol?: unknown;
  /** Whether repfuse.validation.rtol has a value set by the user (WorkspaceConfiguration.inspect). */
  rtolExplicit?: unknown;
  inputShapes?: unknown;
  timeoutSeconds?: unknown;
  fusedSuffix?: unknown;
  foldStandaloneBatchNorm?: unknown;
  defaultEpsilon?: unknown;
  outputDtype?: unknown;
  checkpointFoldBN?: unknown;
  dropAux?: unknown;
  pythonInterpreter?: unknown;
  pythonPath?: unknown;
}

export interface Settings {
  validate: boolean;
  atol: number;
  rtol: number;
  rtolExplicit: boolean;
  timeoutMs: number;
  inputShapes: Record<string, number[]>;
  fusedSuffix: string;
  inspect: InspectOptions;
  /** repfuse.checkpoint.dropAux: remove auxiliary training heads without asking. */
  dropAux: boolean;
  /** repfuse.python.*: interpreter '' = the Python extension's; path [] = the checkpoint's folders. */
  python: { interpreter: string; path: string[] };
}

export const DEFAULTS = { atol: 1e-4, rtol: 1e-3, timeoutSeconds: 300, fusedSuffix: '.fused' } as const;

/** Parses `1x3x640x640` (also `1,3,640,640` and `×`); null when it is not a list of positive integers. */
export function parseShapeText(text: string): number[] | null {
  const parts = text.split(/[x×,]/).map((s) => s.trim());
  if (!parts.length || parts.some((p) => !/^\d+$/.test(p))) return null;
  const dims = parts.map(Number);
  return dims.every((d) => d >= 1) ? dims : null;
}

const nonNegative = (v: unknown): v is number => typeof v === 'number' && Number.isFinite(v) && v >= 0;

/** Reads the settings; anything invalid falls back to its default and is named in `problems`. */
export function parseSettings(raw: RawSettings): { settings: Settings; problems: string[] } {
  const problems: string[] = [];
  const num = (v: unknown, name: string, dflt: number): number => {
    if (v === undefined || v === null) return dflt;
    if (nonNegative(v)) return v;
    problems.push(`repfuse.${name} must be a non-negative number (got ${JSON.stringify(v)}); using ${dflt}.`);
    return dflt;
  };
  const inputShapes: Record<string, number[]> = {};
  if (raw.inputShapes !== undefined && raw.inputShapes !== null) {
    if (typeof raw.inputShapes !== 'object' || Array.isArray(raw.inputShapes)) {
      problems.push('repfuse.validation.inputShapes must be an object mapping input names to shapes like "1x3x640x640".');
    } else {
      for (const [name, v] of Object.entries(raw.inputShapes as Record<string, unknown>)) {
        const dims = typeof v === 'string' ? parseShapeText(v) : Array.isArray(v) && v.every((d) => Number.isInteger(d) && d >= 1) ? (v as number[]) : null;
        if (dims) inputShapes[name] = dims;
        else problems.push(`repfuse.validation.inputShapes: the shape of '${name}' must look like "1x3x640x640" (got ${JSON.stringify(v)}).`);
      }
    }
  }
  let fusedSuffix: string = DEFAULTS.fusedSuffix;
  if (raw.fusedSuffix !== undefined && raw.fusedSuffix !== null) {
    const s = raw.fusedSuffix;
    if (typeof s !== 'string' || !s.trim() || /[\\/]/.test(s) || s === '.' || s === '..') {
      problems.push(`repfuse.fusedSuffix must be a non-empty file-name part without slashes (got ${JSON.stringify(s)}); using "${DEFAULTS.fusedSuffix}".`);
    } else fusedSuffix = s;
  }
  let defaultEpsilon: number | 'auto' = 'auto';
  const e = raw.defaultEpsilon;
  if (e !== undefined && e !== null && e !== 'auto') {
    const n = typeof e === 'number' ? e : typeof e === 'string' ? Number(e) : NaN;
    if (Number.isFinite(n) && n > 0 && n < 1) defaultEpsilon = n;
    else problems.push(`repfuse.checkpoint.defaultEpsilon must be "auto" or a number between 0 and 1 (got ${JSON.stringify(e)}); using "auto".`);
  }
  let outputDtype: CheckpointOptions['outputDtype'] = 'keep';
  if (raw.outputDtype !== undefined && raw.outputDtype !== null) {
    if (raw.outputDtype === 'keep' || raw.outputDtype === 'float32' || raw.outputDtype === 'float16') outputDtype = raw.outputDtype;
    else problems.push(`repfuse.checkpoint.outputDtype must be keep, float32 or float16 (got ${JSON.stringify(raw.outputDtype)}); using keep.`);
  }
  if (raw.dropAux !== undefined && raw.dropAux !== null && typeof raw.dropAux !== 'boolean') problems.push(`repfuse.checkpoint.dropAux must be true or false (got ${JSON.stringify(raw.dropAux)}); asking each time.`);
  let ckptFold: NonNullable<CheckpointOptions['foldBN']> = 'auto';
  if (raw.checkpointFoldBN !== undefined && raw.checkpointFoldBN !== null) {
    if (raw.checkpointFoldBN === 'auto' || raw.checkpointFoldBN === 'on' || raw.checkpointFoldBN === 'off') ckptFold = raw.checkpointFoldBN;
    else problems.push(`repfuse.checkpoint.foldBN must be auto, on or off (got ${JSON.stringify(raw.checkpointFoldBN)}); using auto.`);
  }
  const timeoutSeconds = num(raw.timeoutSeconds, 'validation.timeoutSeconds', DEFAULTS.timeoutSeconds);
  let interpreter = '';
  if (raw.pythonInterpreter !== undefined && raw.pythonInterpreter !== null) {
    if (typeof raw.pythonInterpreter === 'string') interpreter = raw.pythonInterpreter.trim();
    else problems.push(`repfuse.python.interpreter must be the path of a Python interpreter (got ${JSON.stringify(raw.pythonInterpreter)}); using the Python extension's.`);
  }
  let pythonPath: string[] = [];
  if (raw.pythonPath !== undefined && raw.pythonPath !== null) {
    if (Array.isArray(raw.pythonPath) && raw.pythonPath.every((p) => typeof p === 'string' && p.trim())) pythonPath = (raw.pythonPath as string[]).map((p) => p.trim());
    else problems.push(`repfuse.python.path must be a list of folders (got ${JSON.stringify(raw.pythonPath)}); using the checkpoint's folder and its parents.`);
  }
  return {
    settings: {
      validate: raw.validationEnabled === undefined ? true : raw.validationEnabled !== false,
      atol: num(raw.atol, 'validation.atol', DEFAULTS.atol),
      rtol: num(raw.rtol, 'validation.rtol', DEFAULTS.rtol),
      rtolExplicit: raw.rtolExplicit === true && nonNegative(raw.rtol),
      timeoutMs: Math.max(1, timeoutSeconds) * 1000,
      inputShapes,
      fusedSuffix,
      inspect: { foldBN: raw.foldStandaloneBatchNorm === undefined ? true : raw.foldStandaloneBatchNorm !== false, checkpoint: { defaultEpsilon, outputDtype, foldBN: ckptFold } },
      python: { interpreter, path: pythonPath },
      dropAux: raw.dropAux === true,
    },
    problems,
  };
}

/** The options of one fuse job. */
export function fuseJobOptions(s: Settings, output: string, force: boolean): FuseJobOptions {
  return { ...s.inspect, output, force, validate: s.validate, atol: s.atol, rtol: s.rtol, rtolExplicit: s.rtolExplicit, timeoutMs: s.timeoutMs, inputShapes: s.inputShapes, dropAux: s.dropAux };
}

/** A stable key of the options that change what inspecting a file reports (not the output dtype). */
export function inspectKey(o: InspectOptions): string {
  return JSON.stringify([o.foldBN, o.checkpoint.defaultEpsilon]);
}
