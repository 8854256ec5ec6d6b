// Whether a fuse job may run the checkpoint whole in the user's own PyTorch: only for full-module
// checkpoints, only in a trusted workspace, only with an interpreter (repfuse.python.interpreter,
// else the one selected in the Python extension), and only after the user said yes once for that
// interpreter in this workspace — because torch.load(weights_only=False) runs the checkpoint's
// pickled code.
import * as path from 'node:path';
import * as vscode from 'vscode';
import type { InspectReport } from '../core/model';

/** workspaceState key of the remembered answer: { interpreter, allowed }. */
export const CONSENT_KEY = 'repfuse.python.consent';

export const RUN = 'Run in PyTorch';
export const BLOCKS_ONLY = 'Block by Block Only';

interface Consent {
  interpreter: string;
  allowed: boolean;
}

export type PythonDecision =
  | { run: true; interpreter: string; path: string[] }
  | { run: false; why: string };

/** True for a PyTorch checkpoint that pickles module objects (the only kind run end to end). */
export function isFullModuleCheckpoint(report: InspectReport | undefined): boolean {
  return !!report && report.model.format === 'pytorch' && /full-module/.test(report.model.layout ?? '');
}

/** The interpreter selected in the Python extension (ms-python.python), if it is installed and says. */
export async function pythonExtensionInterpreter(resource: vscode.Uri | undefined, timeoutMs = 10_000): Promise<string | undefined> {
  const ext = vscode.extensions?.getExtension('ms-python.python');
  if (!ext) return undefined;
  const lookup = async (): Promise<string | undefined> => {
    const api = (ext.isActive ? ext.exports : await ext.activate()) as PythonExtensionApi | undefined;
    const envs = api?.environments;
    if (envs?.getActiveEnvironmentPath) {
      const active = envs.getActiveEnvironmentPath(resource);
      const resolved = envs.resolveEnvironment ? await envs.resolveEnvironment(active) : undefined;
      return resolved?.executable?.uri?.fsPath ?? active?.path;
    }
    // The older API (before `environments`).
    return api?.settings?.getExecutionDetails?.(resource)?.execCommand?.[0];
  };
  try {
    return await Promise.race([lookup(), new Promise<undefined>((r) => setTimeout(() => r(undefined), timeoutMs))]);
  } catch {
    return undefined;
  }
}

/** The parts of the Python extension's API used here. */
interface PythonExtensionApi {
  environments?: {
    getActiveEnvironmentPath?(resource?: vscode.Uri): { id: string; path: string };
    resolveEnvironment?(env: { id: string; path: string } | string): Promise<{ executable?: { uri?: vscode.Uri } } | undefined>;
  };
  settings?: { getExecutionDetails?(resource?: vscode.Uri): { execCommand?: string[] } | undefined };
}

/**
 * Decides whether this fuse runs end to end in PyTorch, asking the user once (a modal warning) per
 * workspace and interpreter. A dismissed question is not remembered: it is asked again next time.
 */
export async function decidePython(
  state: vscode.Memento,
  input: string,
  report: InspectReport | undefined,
  settings: { interpreter: string; path: string[] },
  resource?: vscode.Uri,
): Promise<PythonDecision> {
  if (!isFullModuleCheckpoint(report)) return { run: false, why: 'not a full-module checkpoint' };
  if (!vscode.workspace.isTrusted) return { run: false, why: 'the workspace is not trusted; end-to-end validation runs the checkpoint\'s pickled code, so it needs a trusted workspace' };
  const interpreter = settings.interpreter || (await pythonExtensionInterpreter(resource));
  if (!interpreter) return { run: false, why: 'no Python interpreter: set repfuse.python.interpreter or select one with the Python extension' };
  const remembered = state.get<Consent>(CONSENT_KEY);
  if (remembered && remembered.interpreter === interpreter) {
    return remembered.allowed ? { run: true, interpreter, path: settings.path } : { run: false, why: `you chose block-by-block validation only for ${interpreter} in this workspace` };
  }
  const answer = await vscode.window.showWarningMessage(
    `Also validate ${path.basename(input)} end to end in your own PyTorch?`,
    {
      modal: true,
      detail:
        `RepFuse would load the original and the fused checkpoint with ${interpreter} (torch.load with weights_only=False). ` +
        'That runs code stored in the checkpoint and imports your model classes: only do it for checkpoints you trust. ' +
        'Without it, the checkpoint is checked block by block, as read by RepFuse. Your answer is remembered for this workspace and interpreter.',
    },
    RUN,
    BLOCKS_ONLY,
  );
  if (answer === RUN || answer === BLOCKS_ONLY) await state.update(CONSENT_KEY, { interpreter, allowed: answer === RUN } satisfies Consent);
  if (answer === RUN) return { run: true, interpreter, path: settings.path };
  return { run: false, why: answer === BLOCKS_ONLY ? `you chose block-by-block validation only for ${interpreter} in this workspace` : 'the question was dismissed' };
}
