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
    rtolExplicit: isSet(c, 'validation.rtol'),
    inputShapes: c.get('validation.inputShapes'),
    timeoutSeconds: c.get('validation.timeoutSeconds'),
    fusedSuffix: c.get('fusedSuffix'),
    foldStandaloneBatchNorm: c.get('foldStandaloneBatchNorm'),
    defaultEpsilon: c.get('checkpoint.defaultEpsilon'),
    outputDtype: c.get('checkpoint.outputDtype'),
    checkpointFoldBN: c.get('checkpoint.foldBN'),
    dropAux: c.get('checkpoint.dropAux'),
    pythonInterpreter: c.get('python.interpreter'),
    pythonPath: c.get('python.path'),
  });
}

/** A value the user set (user, workspace or folder settings, language-specific too), not the default. */
export function isSet(c: vscode.WorkspaceConfiguration, key: string): boolean {
  const i = c.inspect(key);
  if (!i) return false;
  return [i.globalValue, i.workspaceValue, i.workspaceFolderValue, i.globalLanguageValue, i.workspaceLanguageValue, i.workspaceFolderLanguageValue].some((v) => v !== undefined);
}
