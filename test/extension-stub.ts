// A minimal stand-in for the `vscode` module, injected through Node's module resolution, so the
// extension's activation and its tree provider run under node:test. It records every disposable
// it hands out, so tests can check that deactivation disposes them all. It proves nothing about
// the real UI: that is what scripts/screenshots.mjs (code-server + Chromium) is for.
import Module from 'node:module';
import * as path from 'node:path';

export interface Tracked {
  what: string;
  disposed: boolean;
}

export class StubDisposable {
  constructor(private readonly fn: () => void = () => undefined) {}
  static from(...items: { dispose(): unknown }[]): StubDisposable {
    return new StubDisposable(() => items.forEach((i) => i.dispose()));
  }
  dispose(): void {
    this.fn();
  }
}

class EventEmitter<T> {
  private listeners = new Set<(e: T) => void>();
  disposed = false;
  event = (listener: (e: T) => void) => {
    this.listeners.add(listener);
    return new StubDisposable(() => this.listeners.delete(listener));
  };
  fire(e: T): void {
    for (const l of [...this.listeners]) l(e);
  }
  dispose(): void {
    this.disposed = true;
    this.listeners.clear();
  }
}

class Uri {
  private constructor(
    readonly scheme: string,
    readonly path: string,
  ) {}
  static file(p: string): Uri {
    return new Uri('file', path.resolve(p));
  }
  static parse(s: string): Uri {
    const m = /^([a-z][\w+.-]*):\/\/(.*)$/i.exec(s);
    return m ? new Uri(m[1], decodeURIComponent(m[2])) : new Uri('file', s);
  }
  static joinPath(u: Uri, ...parts: string[]): Uri {
    return new Uri(u.scheme, path.posix.join(u.path, ...parts));
  }
  get fsPath(): string {
    return this.path;
  }
  toString(): string {
    return `${this.scheme}://${encodeURI(this.path)}`;
  }
}

class TreeItem {
  id?: string;
  description?: string;
  tooltip?: unknown;
  iconPath?: unknown;
  contextValue?: string;
  resourceUri?: Uri;
  command?: unknown;
  constructor(
    readonly label: string,
    readonly collapsibleState: number,
  ) {}
}

class ThemeIcon {
  constructor(
    readonly id: string,
    readonly color?: unknown,
  ) {}
}
class ThemeColor {
  constructor(readonly id: string) {}
}
class MarkdownString {
  supportThemeIcons = false;
  constructor(readonly value: string) {}
}
class TabInputCustom {
  constructor(
    readonly uri: Uri,
    readonly viewType: string,
  ) {}
}

export interface Stub {
  module: Record<string, unknown>;
  tracked: Tracked[];
  commands: Map<string, (...args: unknown[]) => unknown>;
  contextKeys: Map<string, unknown>;
  logLines: string[];
  /** Tree views created, to drive a provider in tests. */
  treeViews: { id: string; provider: unknown; view: { visible: boolean; message?: string; reveals: unknown[] } }[];
}

export function createStub(): Stub {
  const tracked: Tracked[] = [];
  const track = (what: string, extra: object = {}) => {
    const t: Tracked = { what, disposed: false };
    tracked.push(t);
    // defineProperties (not assign) keeps getters and setters live.
    return Object.defineProperties(new StubDisposable(() => (t.disposed = true)), Object.getOwnPropertyDescriptors(extra));
  };
  const commands = new Map<string, (...args: unknown[]) => unknown>();
  const contextKeys = new Map<string, unknown>();
  const logLines: string[] = [];
  const treeViews: Stub['treeViews'] = [];
  const log = (level: string) => (msg: string) => void logLines.push(`${level} ${msg}`);
  const module = {
    Disposable: StubDisposable,
    EventEmitter,
    Uri,
    TreeItem,
    ThemeIcon,
    ThemeColor,
    MarkdownString,
    TabInputCustom,
    TreeItemCollapsibleState: { None: 0, Collapsed: 1, Expanded: 2 },
    ProgressLocation: { SourceControl: 1, Window: 10, Notification: 15 },
    ViewColumn: { Active: -1, Beside: -2, One: 1 },
    window: {
      createOutputChannel: (name: string) =>
        track(`outputChannel:${name}`, { name, info: log('info'), warn: log('warn'), error: log('error'), debug: log('debug'), trace: log('trace'), show: () => undefined, appendLine: log('line') }),
      registerCustomEditorProvider: (viewType: string) => track(`customEditor:${viewType}`),
      registerWebviewPanelSerializer: (viewType: string) => track(`serializer:${viewType}`),
      createTreeView: (id: string, opts: { treeDataProvider: unknown }) => {
        const selection = new EventEmitter<unknown>();
        const view = { visible: true, message: undefined as string | undefined, reveals: [] as unknown[] };
        treeViews.push({ id, provider: opts.treeDataProvider, view });
        return track(`treeView:${id}`, {
          get visible() {
            return view.visible;
          },
          set message(m: string | undefined) {
            view.message = m;
          },
          get message() {
            return view.message;
          },
          onDidChangeSelection: selection.event,
          reveal: async (n: unknown) => void view.reveals.push(n),
        });
      },
      tabGroups: {
        all: [],
        onDidChangeTabs: () => track('onDidChangeTabs'),
      },
      showInformationMessage: async () => undefined,
      showWarningMessage: async () => undefined,
      showErrorMessage: async () => undefined,
      withProgress: async (_o: unknown, task: (p: unknown, t: unknown) => unknown) => task({ report: () => undefined }, { onCancellationRequested: () => new StubDisposable() }),
    },
    commands: {
      registerCommand: (id: string, fn: (...args: unknown[]) => unknown) => {
        commands.set(id, fn);
        return track(`command:${id}`);
      },
      executeCommand: async (id: string, ...args: unknown[]) => {
        if (id === 'setContext') contextKeys.set(args[0] as string, args[1]);
        return commands.get(id)?.(...args);
      },
    },
    workspace: {
      onDidChangeConfiguration: () => track('onDidChangeConfiguration'),
      getConfiguration: () => ({ get: () => undefined }),
      fs: { stat: async () => ({ size: 0 }) },
    },
  };
  return { module, tracked, commands, contextKeys, logLines, treeViews };
}

type Resolve = (request: string, parent: unknown, ...rest: unknown[]) => string;
const M = Module as unknown as { _resolveFilename: Resolve; _cache: Record<string, unknown> };

/** Makes `require('vscode')` return the stub (until `uninstall`). */
export function installStub(stub: Stub): () => void {
  const key = path.join(__dirname, '__vscode_stub__.js');
  const original = M._resolveFilename;
  M._resolveFilename = function (request, parent, ...rest) {
    if (request === 'vscode') return key;
    return original.call(this, request, parent, ...rest);
  };
  const mod = new Module(key);
  mod.exports = stub.module;
  mod.loaded = true;
  require.cache[key] = mod;
  return () => {
    M._resolveFilename = original;
    delete require.cache[key];
  };
}
