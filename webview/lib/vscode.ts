// The webview's side of the host connection: the VS Code API (acquired once), typed messages,
// and the request helper from the shared protocol.
import { PendingRequests, type RequestMessage, type ResponseMessage } from '../../src/extension/protocol';

interface VsCodeApi<S, M> {
  postMessage(message: M): void;
  getState(): S | undefined;
  setState(state: S): S;
}

declare function acquireVsCodeApi<S, M>(): VsCodeApi<S, M>;

/** Typed access to the host for one webview: `S` its saved state, `In`/`Out` its messages. */
export interface Host<S, In, Out> {
  post(m: Out): void;
  state(): S | undefined;
  saveState(s: S): void;
  /** Typed requests answered by id (only for views whose `Out` includes RequestMessage). */
  requests: PendingRequests;
  onMessage(handler: (m: In) => void): void;
}

export function connect<S, In extends { type: string }, Out>(): Host<S, In, Out> {
  const api = acquireVsCodeApi<S, Out | RequestMessage>();
  const requests = new PendingRequests((m) => api.postMessage(m));
  return {
    post: (m) => api.postMessage(m),
    state: () => api.getState(),
    saveState: (s) => void api.setState(s),
    requests,
    onMessage(handler) {
      window.addEventListener('message', (e: MessageEvent<In | ResponseMessage>) => {
        const m = e.data;
        if (!m || typeof m !== 'object' || typeof m.type !== 'string') return;
        if (m.type === 'response') requests.settle(m as ResponseMessage);
        else handler(m as In);
      });
    },
  };
}
