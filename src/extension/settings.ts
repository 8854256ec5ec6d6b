// Reads the `repfuse.*` configuration (scoped to a model file's folder) into engine options.
import * as vscode from 'vscode';
import { parseSettings, type Settings } from './view/settings';

export const SECTION = 'repfuse';

/** Settings that change what inspecting a model reports: changing one re-parses open models. */
export const INSPECT_SETTINGS = ['repfuse.foldStandaloneBatchNorm', 'repfuse.checkpoint.defaultEpsilon'];

export function readSettings(scope?: vscode.Uri): { settings: Settings; problems: string[] } {
  const c = vscode.workspace.getConfiguration(SECTION, scope);
  return parseSettings({
    validationEnabled: c.get('validation.enabled'),
    atol: c.get('validation.atol'),
    rtol: c.get('validation.rtol'),
    inputShapes: c.get('validation.inputShapes'),
    timeoutSeconds: c.get('validation.timeoutSeconds'),
    fusedSuffix: c.get('fusedSuffix'),
    foldStandaloneBatchNorm: c.get('foldStandaloneBatchNorm'),
    defaultEpsilon: c.get('checkpoint.defaultEpsilon'),
    outputDtype: c.get('checkpoint.outputDtype'),
  });
}
