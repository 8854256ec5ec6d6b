// The one message protocol between the extension host and RepFuse's webviews, imported by both
// sides. Pure types plus a small request/response helper: no `vscode`, no DOM, no Node modules.
//
// Every webview starts with a handshake (webview → `ready`, host → `init`), then asks for what
// it shows with typed requests answered by id (the statistics view asks for one block at a time,
// so a model with a thousand blocks is never serialised at once).
import type { BlockStats } from '../core/stats';
import type { BlockQuantDetail } from '../core/quant';
import type { QuantView } from './view/quantView';
import type { ModelView } from './view/modelView';
import type { ReportView } from './view/reportView';

// ----- requests (webview → host, answered by id) ---------------------------------------------

/** Requests a webview may send, with their parameters and results. */
export interface WebviewRequests {
  /** Branch statistics of one block of the panel's model. */
  blockStats: { params: { block: string }; result: BlockStats };
  /** INT8/FP16 detail of one block: per-channel ranges before and after fusion, branch BN gains. */
  blockQuant: { params: { block: string }; result: BlockQuantDetail };
}

export type RequestKind = keyof WebviewRequests;

/** A request: answered by exactly one `ResponseMessage` with the same id. */
export type RequestMessage = {
  [K in RequestKind]: { type: 'request'; id: number; kind: K; params: WebviewRequests[K]['params'] };
}[RequestKind];

/** The answer to request `id`: its result, or a one-line error. */
export type ResponseMessage<R = unknown> = { type: 'response'; id: number; ok: true; result: R } | { type: 'response'; id: number; ok: false; error: string };

// ----- model editor ----------------------------------------------------------------------------

/** Kept by the model editor webview with setState: what the user had selected. */
export interface ModelEditorState {
  selectedBlock?: string;
}

export type ModelEditorToWebview =
  /** Handshake answer: which file this editor shows; the model follows once parsed. */
  | { type: 'init'; fileName: string; fileSize: number; supportsFuse: boolean }
  /** The model is being parsed (off the UI thread): show progress. */
  | { type: 'loading'; message: string }
  /** The parsed model, as a display-ready view model. */
  | { type: 'model'; model: ModelView }
  /** The model could not be read: a one-line message. */
  | { type: 'loadError'; message: string }
  /** Select (and scroll to) a block, e.g. because it was selected in the tree. */
  | { type: 'select'; block: string }
  /** A fuse job for this file started or ended. */
  | { type: 'busy'; busy: boolean }
  /** The Quantization section: analysis running (with progress), done, or failed. */
  | { type: 'quant'; quant: QuantState };

/** What the model editor's Quantization section shows. */
export type QuantState = { status: 'running'; message: string } | { status: 'done'; view: QuantView } | { status: 'error'; message: string };

export type ModelEditorFromWebview =
  /** Handshake: the webview's script is running and listening. */
  | { type: 'ready' }
  /** Fuse this model (the Fuse button). */
  | { type: 'fuse' }
  /** Open the branch statistics of a block. */
  | { type: 'showBranchStats'; block: string }
  /** The user selected a block in the editor's list: sync the tree. */
  | { type: 'selectBlock'; block: string }
  /** Parse the file again. */
  | { type: 'reload' }
  /** Run the quantization analysis (lazily: it fuses in memory and runs onnxruntime). */
  | { type: 'analyzeQuant' }
  /** Copy text (the fallback list) to the clipboard. */
  | { type: 'copy'; text: string; what: string };

// ----- branch statistics -----------------------------------------------------------------------

/** Which numbers the statistics view shows: raw stored weights, or with BN (and α) folded in. */
export type WeightMode = 'raw' | 'folded';

/** Kept with setState, and by the panel serializer to restore the panel after a reload. */
export interface BranchStatsState {
  /** URI (string) of the model file. */
  uri: string;
  block: string;
  mode: WeightMode;
}

export interface BlockChoice {
  name: string;
  description: string;
}

export type BranchStatsToWebview =
  /** Handshake answer: the model, its blocks (names only) and the block to show first. */
  | { type: 'init'; uri: string; fileName: string; blocks: BlockChoice[]; block: string; mode: WeightMode }
  /** Show another block (chosen in the tree or the model editor). */
  | { type: 'show'; block: string }
  | ResponseMessage;

export type BranchStatsFromWebview =
  | { type: 'ready' }
  /** The block on screen changed (for the panel title). */
  | { type: 'showing'; block: string }
  | RequestMessage;

// ----- fuse report -----------------------------------------------------------------------------

/** Kept with setState: the whole (small) report view, so a restored panel needs no host state. */
export interface ReportState {
  report: ReportView;
}

export type ReportToWebview =
  | { type: 'init'; report: ReportView }
  /** "Measure speed-up" is running (or ended with `error`); a result comes as a new `init`. */
  | { type: 'measuring'; running: boolean; error?: string };

export type ReportFromWebview =
  | { type: 'ready' }
  /** Open the fused model in the model editor. */
  | { type: 'openModel'; path: string }
  /** Reveal a file in the Explorer. */
  | { type: 'reveal'; path: string }
  /** Show the RepFuse output channel. */
  | { type: 'showLog' }
  /** Measure the latency of the original and the fused model (onnxruntime, in a child process). */
  | { type: 'measureSpeedup' };

// ----- request/response helper (both sides) ---------------------------------------------------

/**
 * Tracks requests in flight and settles them when their response arrives. `send` posts a
 * message; the caller routes incoming `response` messages to `settle`.
 */
export class PendingRequests {
  private next = 1;
  private readonly waiting = new Map<number, { resolve: (v: unknown) => void; reject: (e: Error) => void }>();

  constructor(private readonly send: (m: RequestMessage) => void) {}

  request<K extends RequestKind>(kind: K, params: WebviewRequests[K]['params']): Promise<WebviewRequests[K]['result']> {
    const id = this.next++;
    return new Promise((resolve, reject) => {
      this.waiting.set(id, { resolve: resolve as (v: unknown) => void, reject });
      this.send({ type: 'request', id, kind, params } as RequestMessage);
    });
  }

  /** Settles the request a response answers; returns false for an unknown id. */
  settle(m: ResponseMessage): boolean {
    const w = this.waiting.get(m.id);
    if (!w) return false;
    this.waiting.delete(m.id);
    if (m.ok) w.resolve(m.result);
    else w.reject(new Error(m.error));
    return true;
  }

  /** Rejects everything still waiting (the other side went away). */
  rejectAll(reason: string): void {
    for (const w of this.waiting.values()) w.reject(new Error(reason));
    this.waiting.clear();
  }

  get size(): number {
    return this.waiting.size;
  }
}

/** Host side: runs the handler for a request and builds its response (errors become one line). */
export async function answer<K extends RequestKind>(
  m: Extract<RequestMessage, { kind: K }>,
  handler: (params: WebviewRequests[K]['params']) => Promise<WebviewRequests[K]['result']> | WebviewRequests[K]['result'],
): Promise<ResponseMessage<WebviewRequests[K]['result']>> {
  try {
    return { type: 'response', id: m.id, ok: true, result: await handler(m.params) };
  } catch (err) {
    const msg = err instanceof Error ? err.message : String(err);
    return { type: 'response', id: m.id, ok: false, error: msg.replace(/\s*\n\s*/g, ' ') };
  }
}
