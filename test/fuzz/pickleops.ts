// A pickle disassembler for the fuzzer: where each opcode and its argument are, so mutations can
// hit length fields (BINUNICODE, LONG4, FRAME, …), memo indexes and integers precisely.

/** Argument layout: fixed byte count, a length-prefixed payload (prefix width), or text lines. */
type Arg = { fixed: number } | { lenPrefix: 1 | 4 | 8 } | { lines: 1 | 2 };

export const OPS: Record<number, { name: string; arg?: Arg }> = {
  0x28: { name: 'MARK' }, 0x2e: { name: 'STOP' }, 0x30: { name: 'POP' }, 0x31: { name: 'POP_MARK' }, 0x32: { name: 'DUP' },
  0x46: { name: 'FLOAT', arg: { lines: 1 } }, 0x49: { name: 'INT', arg: { lines: 1 } }, 0x4a: { name: 'BININT', arg: { fixed: 4 } },
  0x4b: { name: 'BININT1', arg: { fixed: 1 } }, 0x4c: { name: 'LONG', arg: { lines: 1 } }, 0x4d: { name: 'BININT2', arg: { fixed: 2 } },
  0x4e: { name: 'NONE' }, 0x50: { name: 'PERSID', arg: { lines: 1 } }, 0x51: { name: 'BINPERSID' }, 0x52: { name: 'REDUCE' },
  0x53: { name: 'STRING', arg: { lines: 1 } }, 0x54: { name: 'BINSTRING', arg: { lenPrefix: 4 } }, 0x55: { name: 'SHORT_BINSTRING', arg: { lenPrefix: 1 } },
  0x56: { name: 'UNICODE', arg: { lines: 1 } }, 0x58: { name: 'BINUNICODE', arg: { lenPrefix: 4 } }, 0x61: { name: 'APPEND' },
  0x62: { name: 'BUILD' }, 0x63: { name: 'GLOBAL', arg: { lines: 2 } }, 0x64: { name: 'DICT' }, 0x7d: { name: 'EMPTY_DICT' },
  0x65: { name: 'APPENDS' }, 0x67: { name: 'GET', arg: { lines: 1 } }, 0x68: { name: 'BINGET', arg: { fixed: 1 } },
  0x69: { name: 'INST', arg: { lines: 2 } }, 0x6a: { name: 'LONG_BINGET', arg: { fixed: 4 } }, 0x6c: { name: 'LIST' },
  0x5d: { name: 'EMPTY_LIST' }, 0x6f: { name: 'OBJ' }, 0x70: { name: 'PUT', arg: { lines: 1 } }, 0x71: { name: 'BINPUT', arg: { fixed: 1 } },
  0x72: { name: 'LONG_BINPUT', arg: { fixed: 4 } }, 0x73: { name: 'SETITEM' }, 0x74: { name: 'TUPLE' }, 0x29: { name: 'EMPTY_TUPLE' },
  0x75: { name: 'SETITEMS' }, 0x47: { name: 'BINFLOAT', arg: { fixed: 8 } }, 0x80: { name: 'PROTO', arg: { fixed: 1 } },
  0x81: { name: 'NEWOBJ' }, 0x82: { name: 'EXT1', arg: { fixed: 1 } }, 0x83: { name: 'EXT2', arg: { fixed: 2 } }, 0x84: { name: 'EXT4', arg: { fixed: 4 } },
  0x85: { name: 'TUPLE1' }, 0x86: { name: 'TUPLE2' }, 0x87: { name: 'TUPLE3' }, 0x88: { name: 'NEWTRUE' }, 0x89: { name: 'NEWFALSE' },
  0x8a: { name: 'LONG1', arg: { lenPrefix: 1 } }, 0x8b: { name: 'LONG4', arg: { lenPrefix: 4 } }, 0x42: { name: 'BINBYTES', arg: { lenPrefix: 4 } },
  0x43: { name: 'SHORT_BINBYTES', arg: { lenPrefix: 1 } }, 0x8c: { name: 'SHORT_BINUNICODE', arg: { lenPrefix: 1 } },
  0x8d: { name: 'BINUNICODE8', arg: { lenPrefix: 8 } }, 0x8e: { name: 'BINBYTES8', arg: { lenPrefix: 8 } }, 0x8f: { name: 'EMPTY_SET' },
  0x90: { name: 'ADDITEMS' }, 0x91: { name: 'FROZENSET' }, 0x92: { name: 'NEWOBJ_EX' }, 0x93: { name: 'STACK_GLOBAL' },
  0x94: { name: 'MEMOIZE' }, 0x95: { name: 'FRAME', arg: { fixed: 8 } }, 0x96: { name: 'BYTEARRAY8', arg: { lenPrefix: 8 } },
  0x97: { name: 'NEXT_BUFFER' }, 0x98: { name: 'READONLY_BUFFER' },
};

export const OPCODES = Object.keys(OPS).map(Number);

export interface Instr {
  op: number;
  /** Offset of the opcode byte; the instruction is [at, end). */
  at: number;
  end: number;
  /** Offset and width of the argument's length prefix or fixed-width value, if any. */
  argAt: number;
  argWidth: number;
  /** Length-prefixed: the argument is a length. */
  isLength: boolean;
}

/** Disassembles one pickle from `start`; stops after STOP or at the first thing it cannot read. */
export function disassemble(b: Uint8Array, start = 0): { instrs: Instr[]; end: number } {
  const instrs: Instr[] = [];
  let pos = start;
  while (pos < b.length) {
    const op = b[pos];
    const def = OPS[op];
    if (!def) break;
    const at = pos;
    pos++;
    let argAt = pos;
    let argWidth = 0;
    let isLength = false;
    const arg = def.arg;
    if (arg && 'fixed' in arg) {
      argWidth = arg.fixed;
      pos += arg.fixed;
      if (op === 0x95) isLength = true;
    } else if (arg && 'lenPrefix' in arg) {
      argWidth = arg.lenPrefix;
      isLength = true;
      if (pos + argWidth > b.length) break;
      let n = 0;
      for (let i = argWidth - 1; i >= 0; i--) n = n * 256 + b[pos + i];
      if (argWidth === 4 && op === 0x8b && b[pos + 3] & 0x80) n = 0; // negative LONG4: malformed anyway
      pos += argWidth + n;
    } else if (arg && 'lines' in arg) {
      for (let l = 0; l < arg.lines; l++) {
        const nl = b.indexOf(0x0a, pos);
        if (nl < 0) {
          pos = b.length + 1;
          break;
        }
        pos = nl + 1;
      }
      argAt = at + 1;
    }
    if (pos > b.length) break;
    instrs.push({ op, at, end: pos, argAt, argWidth, isLength });
    if (op === 0x2e) break;
  }
  return { instrs, end: pos };
}
