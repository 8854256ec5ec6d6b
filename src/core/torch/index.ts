// PyTorch checkpoints without Python: zip/legacy/pickle reading by emulation, lazy tensors, writing.
export * from './values';
export { unpickle, pickle, Unpickler, isDangerousGlobal, torchDTypeOf, TORCH_DTYPES, decodeLong, encodeLong } from './pickle';
export type { UnpickleOptions, UnpickleResult, PickleOptions } from './pickle';
export * from './tensor';
export * from './zip';
export * from './legacy';
export * from './load';
export * from './save';
