// Hostile pickle snippets, shared by the fuzzer (spliced into real checkpoints) and the hostile
// content tests. Each snippet pushes exactly one value, so it can stand wherever a value can.

/** Concatenates opcodes: numbers are bytes, strings latin-1 text, arrays/Uint8Arrays raw bytes. */
export function pk(...parts: (number | string | Uint8Array | number[])[]): Uint8Array {
  let n = 0;
  const bufs = parts.map((p) => {
    const b = typeof p === 'number' ? Uint8Array.of(p) : typeof p === 'string' ? Buffer.from(p, 'latin1') : Uint8Array.from(p);
    n += b.length;
    return b;
  });
  const out = new Uint8Array(n);
  let o = 0;
  for (const b of bufs) {
    out.set(b, o);
    o += b.length;
  }
  return out;
}

const u32 = (v: number) => [v & 0xff, (v >>> 8) & 0xff, (v >>> 16) & 0xff, (v >>> 24) & 0xff];

/** BINUNICODE of a string. */
export const X = (s: string): Uint8Array => {
  const b = Buffer.from(s, 'utf8');
  return pk(0x58, u32(b.length), b);
};

const repeat = (b: Uint8Array | string, n: number): Uint8Array => {
  const u = typeof b === 'string' ? Buffer.from(b, 'latin1') : b;
  const out = new Uint8Array(u.length * n);
  for (let i = 0; i < n; i++) out.set(u, i * u.length);
  return out;
};

/** GLOBAL module.name (protocol 0–2 spelling). */
export const glob = (module: string, name: string): Uint8Array => pk('c', `${module}\n${name}\n`);
/** The same global through STACK_GLOBAL (protocol 4). */
export const stackGlob = (module: string, name: string): Uint8Array => pk(X(module), X(name), 0x93);

/** callable(arg) by REDUCE. */
export const call = (callable: Uint8Array, ...args: Uint8Array[]): Uint8Array =>
  pk(callable, args.length === 1 ? pk(args[0], 0x85) : pk('(', ...args, 't'), 'R');

/** A chain of __reduce__ calls: each result is called again with `arg` (getattr(...)(...)…). */
export const reduceChain = (callable: Uint8Array, arg: string, n: number): Uint8Array => {
  let out = call(callable, X(arg));
  for (let i = 1; i < n; i++) out = pk(out, X(arg), 0x85, 'R');
  return out;
};

/** A list nested `n` deep: [[[…]]]. */
export const deepList = (n: number): Uint8Array => pk(repeat(']', n), repeat('a', n - 1));
/** A tuple nested `n` deep through MARK … TUPLE (needs n MARKs at once). */
export const deepMarks = (n: number): Uint8Array => pk(repeat('(', n), 'N', repeat('t', n));
/** A list holding `n` copies of one None pushed by DUP. */
export const dupFlood = (n: number): Uint8Array => pk('(', 'N', repeat('2', n), 'l');
/** A list that contains itself (through the memo). */
export const selfList = (): Uint8Array => pk(']', 'q', 250, 'h', 250, 'a');
/** A dict that holds itself under 'self' and as a key of a tuple. */
export const selfDict = (): Uint8Array => pk('}', 'q', 251, X('self'), 'h', 251, 's');
/** (x, x) nested `n` deep: 2^n leaves if expanded, n nodes in memory. */
export const tupleDag = (n: number): Uint8Array => pk('N', repeat(pk('2', 0x86), n));
/** `n` memo entries (MEMOIZE), then one value. */
export const memoFlood = (n: number): Uint8Array => pk('N', repeat(pk(0x94), n));
/** An inert object of an unknown class given `n` list items by one APPENDS. */
export const bigAppends = (n: number): Uint8Array => pk(glob('evil', 'Thing'), ')', 'R', '(', repeat('N', n), 'e');
/** The same through ADDITEMS. */
export const bigAdditems = (n: number): Uint8Array => pk(glob('evil', 'Thing'), ')', 'R', '(', repeat('N', n), 0x90);

/**
 * nn.Module objects nested `n` deep through `_modules` (each one built with NEWOBJ + BUILD and
 * memoized, so the file grows linearly): what a hostile full-module checkpoint can do to a
 * reader that walks the module tree recursively.
 */
export function deepModules(n: number, cls = 'torch.nn.modules.container\nSequential'): Uint8Array {
  const [mod, name] = cls.split('\n');
  const parts: Uint8Array[] = [pk(glob(mod, name), 'r', u32(0), '0')]; // class in memo 0
  for (let i = 1; i <= n; i++) {
    const inner = i > 1 ? pk(X('m'), 'j', u32(i - 1)) : pk();
    parts.push(
      pk('j', u32(0), ')', 0x81, '}', '(', X('_parameters'), '}', X('_buffers'), '}', X('_modules'), '}', '(', inner, 'u', 'u', 'b', 'r', u32(i)),
    );
    if (i < n) parts.push(pk('0'));
  }
  return pk(...parts);
}

/** A complete protocol-2 pickle whose value is `value`. */
export const pickleOf = (value: Uint8Array): Uint8Array => pk(0x80, 2, value, '.');
