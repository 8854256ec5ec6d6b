// Reader for NumPy .npy files (format versions 1–3), for feeding real data to validation.
import { type ByteSource, FileSource } from './bytes';
import { DType, decodeNumbers, dtypeSize, type NumArray } from './dtype';
import { FormatError } from './errors';

export interface NpyArray {
  dtype: DType;
  shape: number[];
  /** Raw little-endian bytes of the data, C order. */
  bytes: Uint8Array;
  values(): NumArray;
}

const DESCR: Record<string, DType> = {
  '<f4': DType.float32, '<f8': DType.float64, '<f2': DType.float16,
  '<i8': DType.int64, '<i4': DType.int32, '<i2': DType.int16, '|i1': DType.int8,
  '|u1': DType.uint8, '<u2': DType.uint16, '<u4': DType.uint32, '<u8': DType.uint64, '|b1': DType.bool,
};

export function readNpy(file: string | ByteSource): NpyArray {
  const src = typeof file === 'string' ? new FileSource(file) : file;
  try {
    return parseNpy(src);
  } finally {
    if (typeof file === 'string') src.close();
  }
}

function parseNpy(src: ByteSource): NpyArray {
  const name = src.name;
  if (src.size < 10) throw new FormatError('not a .npy file: too short.', name);
  const head = src.read(0, 10);
  if (head[0] !== 0x93 || Buffer.from(head.subarray(1, 6)).toString('latin1') !== 'NUMPY') throw new FormatError('not a .npy file: missing the \\x93NUMPY magic.', name);
  const major = head[6];
  let headerLen: number;
  let start: number;
  if (major === 1) {
    headerLen = head[8] | (head[9] << 8);
    start = 10;
  } else if (major === 2 || major === 3) {
    if (src.size < 12) throw new FormatError('truncated .npy header.', name);
    const b = src.read(8, 4);
    headerLen = new DataView(b.buffer, b.byteOffset, 4).getUint32(0, true);
    start = 12;
  } else throw new FormatError(`unsupported .npy format version ${major}.`, name);
  if (headerLen > 1 << 20 || start + headerLen > src.size) throw new FormatError(`.npy header of ${headerLen} bytes does not fit in the file.`, name);
  const header = Buffer.from(src.read(start, headerLen)).toString(major === 3 ? 'utf8' : 'latin1');
  const descr = /'descr'\s*:\s*'([^']+)'/.exec(header)?.[1];
  const fortran = /'fortran_order'\s*:\s*(True|False)/.exec(header)?.[1];
  const shapeText = /'shape'\s*:\s*\(([^)]*)\)/.exec(header)?.[1];
  if (!descr || !fortran || shapeText === undefined) throw new FormatError(`cannot parse the .npy header ${JSON.stringify(header.trim())}.`, name);
  if (fortran === 'True') throw new FormatError('Fortran-ordered .npy arrays are not supported; save with np.ascontiguousarray.', name);
  const dtype = DESCR[descr];
  if (!dtype) throw new FormatError(`unsupported .npy dtype '${descr}' (little-endian numbers only).`, name);
  const shape = shapeText.split(',').map((s) => s.trim()).filter(Boolean).map(Number);
  if (shape.some((d) => !Number.isSafeInteger(d) || d < 0)) throw new FormatError(`invalid .npy shape (${shapeText}).`, name);
  const numel = shape.reduce((a, b) => a * b, 1);
  const nbytes = numel * dtypeSize(dtype)!;
  const dataStart = start + headerLen;
  if (dataStart + nbytes > src.size) {
    throw new FormatError(`.npy data is truncated: shape (${shape.join(', ')}) needs ${nbytes} bytes, the file has ${src.size - dataStart}.`, name);
  }
  const bytes = src.readOwned(dataStart, nbytes);
  return { dtype, shape, bytes, values: () => decodeNumbers(bytes, dtype, name) };
}

/** Writes a little-endian .npy (version 1) — used by tests and to dump validation inputs. */
export function encodeNpy(dtype: DType, shape: number[], bytes: Uint8Array): Uint8Array {
  const descr = Object.entries(DESCR).find(([, v]) => v === dtype)?.[0];
  if (!descr) throw new Error(`cannot write ${DType[dtype]} as .npy`);
  const shapeText = shape.length === 1 ? `${shape[0]},` : shape.join(', ');
  let header = `{'descr': '${descr}', 'fortran_order': False, 'shape': (${shapeText}), }`;
  const total = 10 + header.length + 1;
  header += ' '.repeat((64 - (total % 64)) % 64) + '\n';
  const out = new Uint8Array(10 + header.length + bytes.length);
  out.set([0x93, ...Buffer.from('NUMPY', 'latin1'), 1, 0, header.length & 0xff, header.length >> 8]);
  out.set(Buffer.from(header, 'latin1'), 10);
  out.set(bytes, 10 + header.length);
  return out;
}
