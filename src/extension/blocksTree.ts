// The RepConv Blocks view (Explorer): the model of the active model editor, its blocks, their
// branches. Elements are light handles (URI + block name); children are computed lazily from
// the cached inspect report; getParent makes reveal work.
import * as vscode from 'vscode';
import type { InspectReport } from '../core/model';
import type { ModelService } from './modelService';
import { blockItem, branchItem, CONTEXT, type ItemView, modelItem, rejectedGroupItem, rejectedItem } from './view/treeItems';

export type BlockNode =
  | { type: 'model'; uri: vscode.Uri }
  | { type: 'block'; uri: vscode.Uri; block: string }
  | { type: 'branch'; uri: vscode.Uri; block: string; index: number }
  | { type: 'rejectedGroup'; uri: vscode.Uri }
  | { type: 'rejected'; uri: vscode.Uri; index: number };

const COLLAPSE: Record<ItemView['collapsible'], vscode.TreeItemCollapsibleState> = {
  none: vscode.TreeItemCollapsibleState.None,
  collapsed: vscode.TreeItemCollapsibleState.Collapsed,
  expanded: vscode.TreeItemCollapsibleState.Expanded,
};

export class BlocksTreeProvider implements vscode.TreeDataProvider<BlockNode>, vscode.Disposable {
  static readonly viewId = 'repfuse.blocks';

  private root: vscode.Uri | undefined;
  /** One handle per element id, so reveal and refresh see the same objects. */
  private readonly nodes = new Map<string, BlockNode>();
  private readonly changed = new vscode.EventEmitter<BlockNode | undefined>();
  readonly onDidChangeTreeData = this.changed.event;
  private readonly rootChanged = new vscode.EventEmitter<vscode.Uri | undefined>();
  readonly onDidChangeRoot = this.rootChanged.event;
  private readonly disposables: vscode.Disposable[] = [];
  readonly view: vscode.TreeView<BlockNode>;

  static register(service: ModelService): BlocksTreeProvider {
    return new BlocksTreeProvider(service);
  }

  private constructor(private readonly service: ModelService) {
    this.view = vscode.window.createTreeView(BlocksTreeProvider.viewId, { treeDataProvider: this, showCollapseAll: true });
    this.disposables.push(
      this.view,
      this.changed,
      this.rootChanged,
      service.onDidChange((uri) => {
        if (this.root && uri.toString() === this.root.toString()) {
          this.nodes.clear();
          this.changed.fire(undefined);
          this.updateMessage();
        }
      }),
    );
  }

  get rootUri(): vscode.Uri | undefined {
    return this.root;
  }

  /** Shows a model (or nothing: the welcome content). */
  setRoot(uri: vscode.Uri | undefined): void {
    if (uri?.toString() === this.root?.toString()) return;
    if (this.root) this.service.release(this.root);
    this.root = uri;
    if (uri) {
      this.service.retain(uri);
      void this.service.load(uri).catch(() => undefined);
    }
    this.nodes.clear();
    void vscode.commands.executeCommand('setContext', 'repfuse.hasModel', !!uri);
    this.changed.fire(undefined);
    this.updateMessage();
    this.rootChanged.fire(uri);
  }

  private updateMessage(): void {
    const s = this.root && this.service.state(this.root);
    this.view.message = s?.status === 'ready' && !s.report.blocks.length && !s.report.rejected.length ? 'No re-parameterizable blocks in this model.' : undefined;
  }

  private node<T extends BlockNode>(n: T): T {
    const id = this.id(n);
    const hit = this.nodes.get(id);
    if (hit) return hit as T;
    this.nodes.set(id, n);
    return n;
  }

  private id(n: BlockNode): string {
    const u = n.uri.toString();
    switch (n.type) {
      case 'model':
        return u;
      case 'block':
        return `${u}#block/${n.block}`;
      case 'branch':
        return `${u}#block/${n.block}/${n.index}`;
      case 'rejectedGroup':
        return `${u}#rejected`;
      case 'rejected':
        return `${u}#rejected/${n.index}`;
    }
  }

  private report(uri: vscode.Uri): InspectReport | undefined {
    const s = this.service.state(uri);
    return s?.status === 'ready' ? s.report : undefined;
  }

  /** The handle of a block of the current root, for reveal. */
  blockNode(uri: vscode.Uri, block: string): BlockNode | undefined {
    if (!this.root || uri.toString() !== this.root.toString()) return undefined;
    if (!this.report(uri)?.blocks.some((b) => b.name === block)) return undefined;
    return this.node({ type: 'block', uri, block });
  }

  getTreeItem(n: BlockNode): vscode.TreeItem {
    const v = this.view_(n);
    const item = new vscode.TreeItem(v.label, COLLAPSE[v.collapsible]);
    item.id = this.id(n);
    // VS Code keeps an item's collapse state by id: a model node first shown while parsing (no
    // children) would stay collapsed once its blocks arrive. A different id per state avoids that.
    if (n.type === 'model' && v.contextValue !== CONTEXT.model) item.id += `#${v.contextValue}`;
    item.description = v.description;
    const md = new vscode.MarkdownString(v.tooltip);
    md.supportThemeIcons = false;
    item.tooltip = md;
    item.iconPath = new vscode.ThemeIcon(v.icon.id, v.icon.color ? new vscode.ThemeColor(v.icon.color) : undefined);
    item.contextValue = v.contextValue;
    if (n.type === 'model') item.resourceUri = n.uri;
    return item;
  }

  private view_(n: BlockNode): ItemView {
    if (n.type === 'model') {
      return modelItem(this.service.state(n.uri) ?? { status: 'loading', path: n.uri.fsPath });
    }
    const r = this.report(n.uri);
    if (!r) return { label: '…', tooltip: '', icon: { id: 'loading~spin' }, contextValue: '', collapsible: 'none' };
    switch (n.type) {
      case 'block':
        return blockItem(r.blocks.find((b) => b.name === n.block)!);
      case 'branch':
        return branchItem(r.blocks.find((b) => b.name === n.block)!.branches[n.index]);
      case 'rejectedGroup':
        return rejectedGroupItem(r.rejected.length);
      case 'rejected':
        return rejectedItem(r.rejected[n.index]);
    }
  }

  getChildren(n?: BlockNode): BlockNode[] {
    if (!n) return this.root ? [this.node({ type: 'model', uri: this.root })] : [];
    const r = this.report(n.uri);
    if (!r) return [];
    switch (n.type) {
      case 'model': {
        const blocks: BlockNode[] = r.blocks.map((b) => this.node({ type: 'block', uri: n.uri, block: b.name }));
        if (r.rejected.length) blocks.push(this.node({ type: 'rejectedGroup', uri: n.uri }));
        return blocks;
      }
      case 'block': {
        const b = r.blocks.find((x) => x.name === n.block);
        return b ? b.branches.map((_, index) => this.node({ type: 'branch', uri: n.uri, block: n.block, index })) : [];
      }
      case 'rejectedGroup':
        return r.rejected.map((_, index) => this.node({ type: 'rejected', uri: n.uri, index }));
      default:
        return [];
    }
  }

  getParent(n: BlockNode): BlockNode | undefined {
    switch (n.type) {
      case 'model':
        return undefined;
      case 'block':
      case 'rejectedGroup':
        return this.node({ type: 'model', uri: n.uri });
      case 'branch':
        return this.node({ type: 'block', uri: n.uri, block: n.block });
      case 'rejected':
        return this.node({ type: 'rejectedGroup', uri: n.uri });
    }
  }

  /** Selects a block in the tree without taking focus (only while the view is visible). */
  async revealBlock(uri: vscode.Uri, block: string): Promise<void> {
    const node = this.blockNode(uri, block);
    if (!node || !this.view.visible) return;
    await this.view.reveal(node, { select: true, focus: false, expand: false });
  }

  dispose(): void {
    if (this.root) this.service.release(this.root);
    this.root = undefined;
    for (const d of this.disposables) d.dispose();
  }
}
