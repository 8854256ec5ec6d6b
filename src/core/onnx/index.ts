// The ONNX engine's entry points: inspect a model, and fuse it into a new file.
import * as fs from 'node:fs';
import { dtypeName, dtypeSize } from '../dtype';
import type { BlockData, InspectReport, ModelSummary } from '../model';
import { blockDataFromSpec } from '../blockdata';
import { RepFuseError } from '../errors';
import { type Detection, detect } from './detect';
import { numelOf, type OnnxModel, openOnnx, tensorByteLength } from './reader';
import { blockSpec, planRewrite, type RewriteResult } from './rewrite';
import { regionBlockData } from './regionstats';
import { writeOnnx, type WriteResult } from './writer';

export { openOnnx } from './reader';
export type { OnnxModel } from './reader';

export interface EngineOptions {
  foldBN: boolean;
}

export interface Analysis {
  model: OnnxModel;
  detection: Detection;
  rewrite: RewriteResult;
  report: InspectReport;
}

function summarize(model: OnnxModel): ModelSummary {
  const dtypes: Record<string, number> = {};
  let params = 0;
  let bytes = 0;
  for (const t of model.graph.initializers.values()) {
    const n = numelOf(t.dims);
    params += n;
    bytes += tensorByteLength(t) || n * (dtypeSize(t.dtype) ?? 0);
    const k = dtypeName(t.dtype);
    dtypes[k] = (dtypes[k] ?? 0) + n;
  }
  const notes: string[] = [];
  if (model.usesExternalData) notes.push('weights are stored as ONNX external data');
  const asInputs = model.graph.inputs.filter((i) => model.graph.initializers.has(i.name)).length;
  if (asInputs) notes.push(`${asInputs} initializers are also listed as graph inputs (treated as constants)`);
  return {
    format: 'onnx',
    path: model.path,
    fileSize: model.source.size,
    producer: [model.producerName, model.producerVersion].filter(Boolean).join(' ') || undefined,
    irVersion: model.irVersion,
    opsets: model.opsets,
    nodeCount: model.graph.nodes.length,
    paramCount: params,
    paramBytes: bytes,
    dtypes,
    notes,
  };
}

/** Detects blocks and plans the rewrite; reads no weight data (only tiny constants). */
export function analyzeOnnx(model: OnnxModel, opts: EngineOptions): Analysis {
  const detection = detect(model, { foldBN: opts.foldBN });
  const rewrite = planRewrite(model, detection);
  const summary = summarize(model);
  summary.opCounts = rewrite.summary.opCountsBefore;
  if (detection.residuals) summary.notes.push(`${detection.residuals} residual Add${detection.residuals === 1 ? '' : 's'} (one branch plus a shortcut) left as they are: not re-parameterization blocks`);
  const report: InspectReport = {
    model: summary,
    blocks: detection.blocks.map((b) => b.info),
    rejected: detection.rejected,
    folds: detection.folds.map((f) => f.info),
    notFolded: detection.notFolded,
    opCountsAfter: rewrite.summary.opCountsAfter,
    nodeCountAfter: rewrite.summary.nodesAfter,
    paramCountAfter: rewrite.summary.paramsAfter,
  };
  return { model, detection, rewrite, report };
}

export function inspectOnnxFile(file: string, opts: EngineOptions): InspectReport {
  const model = openOnnx(file);
  try {
    return analyzeOnnx(model, opts).report;
  } finally {
    model.close();
  }
}

/** Writes the fused model of an analysis to `out`. */
export function writeFused(a: Analysis, out: string, signal?: AbortSignal): Promise<WriteResult> {
  return writeOnnx(a.model, a.rewrite.plan, out, { signal });
}

export function fileExists(p: string): boolean {
  try {
    fs.accessSync(p);
    return true;
  } catch {
    return false;
  }
}

/** Branch numbers of one detected block (by name), for the statistics view. */
export function onnxBlockData(a: Analysis, blockName: string): BlockData {
  const b = a.detection.blocks.find((x) => x.info.name === blockName);
  if (!b) throw new RepFuseError(`no block named '${blockName}'.`, a.model.path);
  if (!b.fused) return blockDataFromSpec(b.info, blockSpec(a.model, b));
  // A linear region: each term of its last sum with its exact share of the fused kernel.
  if (b.region) return regionBlockData(a.model, a.detection.index, b);
  // A BN → Gemm fold: the one matrix it equals.
  const whole = { kind: 'conv' as const, kernel: b.kernel, hasBias: true, hasBN: false, params: b.info.paramsBefore, dtype: dtypeName(b.dtype), parts: b.info.branches.flatMap((br) => br.parts) };
  return blockDataFromSpec({ ...b.info, branches: [whole] }, blockSpec(a.model, b));
}
