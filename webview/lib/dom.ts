// A tiny element builder. Text goes in through textContent only, so names from a model file can
// never become markup.
type Attr = string | number | boolean | undefined | null;
export type Child = Node | string | number | null | undefined | false;
/** Children may nest in arrays to any depth. */
export type Children = Child | Children[];

function flatten(children: Children[], out: Child[] = []): Child[] {
  for (const c of children) {
    if (Array.isArray(c)) flatten(c, out);
    else out.push(c);
  }
  return out;
}

export interface Props {
  [name: string]: Attr | ((e: Event) => void);
}

export function h<K extends keyof HTMLElementTagNameMap>(tag: K, props?: Props | null, ...children: Children[]): HTMLElementTagNameMap[K];
export function h(tag: string, props?: Props | null, ...children: Children[]): HTMLElement;
export function h(tag: string, props?: Props | null, ...children: Children[]): HTMLElement {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(props ?? {})) {
    if (v === undefined || v === null || v === false) continue;
    if (typeof v === 'function') el.addEventListener(k.replace(/^on/, '').toLowerCase(), v);
    else if (k === 'class') el.className = String(v);
    else if (v === true) el.setAttribute(k, '');
    else el.setAttribute(k, String(v));
  }
  for (const c of flatten(children)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

/** Replaces an element's children. */
export function mount(parent: HTMLElement, ...children: Children[]): void {
  parent.replaceChildren();
  for (const c of flatten(children)) {
    if (c === null || c === undefined || c === false) continue;
    parent.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

/** A plain table: header cells, then rows of cells (strings or nodes). */
export function table(head: string[], rows: Children[][], opts: { class?: string; numeric?: number[]; rowProps?: (i: number) => Props } = {}): HTMLTableElement {
  const numeric = new Set(opts.numeric ?? []);
  return h(
    'table',
    { class: `grid ${opts.class ?? ''}`.trim() },
    h('thead', null, h('tr', null, head.map((c, i) => h('th', { scope: 'col', class: numeric.has(i) ? 'num' : undefined }, c)))),
    h(
      'tbody',
      null,
      rows.map((r, ri) => h('tr', opts.rowProps?.(ri) ?? null, r.map((c, i) => h('td', { class: numeric.has(i) ? 'num' : undefined }, c)))),
    ),
  );
}
