// Models the extension knows about (open editors, the tree's root): their parse state, loaded
// through the model worker, and the fuse jobs, each in a worker of its own.
import * as path from 'node:path';
import * as vscode from 'vscode';
import type { InspectReport } from '../core/model';
import type { FuseReport } from '../core/report';
import type { BlockStats } from '../core/stats';
import { readSettings } from './settings';
import type { ModelState } from './view/treeItems';
import type { FuseJobOptions } from './view/settings';
import { ModelWorkerClient, type RequestOptions } from './worker/client';
import type { BlockQuantDetail, QuantReport } from '../core/quant';

/** The local path of a model URI; RepFuse does random-access reads, so only file: URIs work. */
export function localPath(uri: vscode.Uri): string {
  if (uri.scheme !== 'file') {
    throw new Error(`RepFuse reads models from the local file system; ${uri.toString(true)} is on '${uri.scheme}:'. Copy it to a local folder first.`);
  }
  return uri.fsPath;
}

export class ModelService implements vscode.Disposable {
  private inspector: ModelWorkerClient | undefined;
  private readonly fuseJobs = new Set<ModelWorkerClient>();
  private readonly states = new Map<string, ModelState>();
  private readonly loads = new Map<string, Promise<InspectReport>>();
  private readonly refs = new Map<string, number>();
  private readonly changed = new vscode.EventEmitter<vscode.Uri>();
  /** Fires when a model's state changes (loading, ready, error). */
  readonly onDidChange = this.changed.event;

  constructor(
    private readonly workerScript: string,
    private readonly log: vscode.LogOutputChannel,
  ) {}

  /** The worker is started on first use, never at activation. */
  private worker(): ModelWorkerClient {
    this.inspector ??= new ModelWorkerClient(this.workerScript);
    return this.inspector;
  }

  get workerStarted(): boolean {
    return !!this.inspector?.started;
  }

  state(uri: vscode.Uri): ModelState | undefined {
    return this.states.get(uri.toString());
  }

  private setState(uri: vscode.Uri, s: ModelState): void {
    this.states.set(uri.toString(), s);
    this.changed.fire(uri);
  }

  /** The model's inspect report, parsed once in the worker (again with `reload`). */
  load(uri: vscode.Uri, reload = false): Promise<InspectReport> {
    const key = uri.toString();
    const pending = this.loads.get(key);
    if (pending && !reload) return pending;
    const p = this.parse(uri);
    this.loads.set(key, p);
    p.catch(() => undefined).finally(() => {
      // A failed parse is not cached: the next open tries again.
      if (this.loads.get(key) === p && this.states.get(key)?.status === 'error') this.loads.delete(key);
    });
    return p;
  }

  private async parse(uri: vscode.Uri): Promise<InspectReport> {
    let file: string;
    try {
      file = localPath(uri);
    } catch (err) {
      this.setState(uri, { status: 'error', path: uri.path, message: (err as Error).message });
      throw err;
    }
    this.setState(uri, { status: 'loading', path: file });
    const t0 = Date.now();
    try {
      const report = await this.worker().request('open', { file, options: readSettings(uri).settings.inspect });
      this.log.info(`parsed ${file} in ${Date.now() - t0} ms: ${report.blocks.length} blocks, ${report.rejected.length} rejected, ${report.folds.length} Conv→BN folds`);
      this.setState(uri, { status: 'ready', path: file, report });
      return report;
    } catch (err) {
      const message = (err as Error).message;
      this.log.warn(`cannot read ${file}: ${message}`);
      this.setState(uri, { status: 'error', path: file, message });
      throw err;
    }
  }

  /** Statistics of one block (the model is parsed first if needed). */
  async blockStats(uri: vscode.Uri, block: string): Promise<BlockStats> {
    await this.load(uri);
    const t0 = Date.now();
    const stats = await this.worker().request('blockStats', { file: localPath(uri), block, options: readSettings(uri).settings.inspect });
    this.log.debug(`branch statistics of ${block} in ${Date.now() - t0} ms`);
    return stats;
  }

  /** INT8/FP16 detail of one block for the branch statistics (the model is parsed first if needed). */
  async blockQuant(uri: vscode.Uri, block: string): Promise<BlockQuantDetail> {
    await this.load(uri);
    return this.worker().request('blockQuant', { file: localPath(uri), block, options: readSettings(uri).settings.inspect });
  }

  /**
   * The quantization report (`repfuse quant`), in a worker of its own like a fuse job: it fuses in
   * memory and runs onnxruntime in a child process, so parsing other models is not stuck behind it.
   */
  async quant(uri: vscode.Uri, opts: RequestOptions = {}): Promise<QuantReport> {
    const file = localPath(uri);
    const job = new ModelWorkerClient(this.workerScript);
    this.fuseJobs.add(job);
    this.log.info(`quantization analysis of ${file}`);
    try {
      const { settings } = readSettings(uri);
      // The validation settings say how to feed the model (dynamic input shapes) and how long to wait.
      return await job.request('quant', { file, options: settings.inspect, inputShapes: settings.inputShapes, timeoutMs: settings.timeoutMs }, opts);
    } finally {
      this.fuseJobs.delete(job);
      void job.dispose();
    }
  }

  /** An editor (or the tree) uses the model; `release` when done. */
  retain(uri: vscode.Uri): void {
    const k = uri.toString();
    this.refs.set(k, (this.refs.get(k) ?? 0) + 1);
  }

  release(uri: vscode.Uri): void {
    const k = uri.toString();
    const n = (this.refs.get(k) ?? 0) - 1;
    if (n > 0) {
      this.refs.set(k, n);
      return;
    }
    this.refs.delete(k);
    this.states.delete(k);
    this.loads.delete(k);
    if (uri.scheme === 'file' && this.inspector?.started) void this.inspector.request('close', { file: uri.fsPath }).catch(() => undefined);
  }

  /** Re-parses every model in use (a setting that changes detection changed). */
  reloadAll(): void {
    for (const k of this.refs.keys()) void this.load(vscode.Uri.parse(k), true).catch(() => undefined);
  }

  /** Runs one fuse job in a worker of its own, so parsing other models is never stuck behind it. */
  async fuse(uri: vscode.Uri, options: FuseJobOptions, opts: RequestOptions): Promise<FuseReport> {
    const file = localPath(uri);
    const job = new ModelWorkerClient(this.workerScript);
    this.fuseJobs.add(job);
    this.log.info(`fusing ${file} → ${path.basename(options.output)} (validation ${options.validate ? `on, atol ${options.atol}, rtol ${options.rtol}` : 'off'})`);
    try {
      return await job.request('fuse', { file, options }, opts);
    } finally {
      this.fuseJobs.delete(job);
      void job.dispose();
    }
  }

  /** Stops the workers; running fuse jobs are cancelled and clean up after themselves. */
  async shutdown(): Promise<void> {
    this.changed.dispose();
    const all = [this.inspector, ...this.fuseJobs].filter((w): w is ModelWorkerClient => !!w);
    this.fuseJobs.clear();
    await Promise.all(all.map((w) => w.dispose()));
  }

  dispose(): void {
    void this.shutdown();
  }
}
