// Writes an *unfused* RepVGG state_dict `.pt` the way `torch.save(model.state_dict(), f)` does for
// DingXiaoH's RepVGG (train-time form): per block `rbr_identity.*` (BatchNorm2d, only when the block
// keeps its width at stride 1), `rbr_dense.conv.weight` + `rbr_dense.bn.*`, `rbr_1x1.conv.weight` +
// `rbr_1x1.bn.*` (weight, bias, running_mean, running_var, num_batches_tracked as a 0-d int64),
// then `linear.weight` / `linear.bias`. Same net as the ONNX bench model (REPVGG_B1), float32,
// seeded: one random stream per tensor name.
//
// Written with RepFuse's own writer (`writeTorchZip`): each tensor is a NewTensor whose bytes are
// generated only when the writer streams it, so the generator holds about one tensor at a time
// (≈ 38 MB for the 2048-wide stage), not the file.
import { DType } from '../src/core/dtype';
import { writeTorchZip } from '../src/core/torch/save';
import { NewTensor } from '../src/core/torch/tensor';
import { PyDict } from '../src/core/torch/values';
import { hashSeed, REPVGG_B1, type RepVGGConfig, rng } from './gen-model';

export interface GeneratedCheckpoint {
  path: string;
  bytes: number;
  blocks: number;
  identityBlocks: number;
  tensors: number;
  params: number;
  ms: number;
}

/** Uniform [lo, hi) float32 values for `name`, produced when written. */
function uniform(seed: number, name: string, shape: number[], lo: number, hi: number): NewTensor {
  return new NewTensor(DType.float32, shape, () => {
    const n = shape.reduce((a, b) => a * b, 1);
    const data = new Float32Array(n);
    const r = rng(hashSeed(seed, name));
    const span = hi - lo;
    for (let i = 0; i < n; i++) data[i] = lo + span * r();
    return new Uint8Array(data.buffer, 0, n * 4);
  });
}

/** A 0-d int64 tensor (BatchNorm's num_batches_tracked). */
function int64Scalar(v: number): NewTensor {
  return new NewTensor(DType.int64, [], () => {
    const b = new Uint8Array(8);
    new DataView(b.buffer).setBigInt64(0, BigInt(v), true);
    return b;
  });
}

export async function generateRepVGGCheckpoint(file: string, cfg: RepVGGConfig = REPVGG_B1, seed = 0): Promise<GeneratedCheckpoint> {
  const t0 = performance.now();
  const sd = new PyDict(true); // torch.save(state_dict) pickles a collections.OrderedDict
  let blocks = 0;
  let identityBlocks = 0;
  let params = 0;
  const put = (name: string, t: NewTensor) => {
    sd.set(name, t);
    params += t.numel;
  };
  const bn = (p: string, c: number, gamma: [number, number]) => {
    put(`${p}.weight`, uniform(seed, `${p}.weight`, [c], gamma[0], gamma[1]));
    put(`${p}.bias`, uniform(seed, `${p}.bias`, [c], -0.05, 0.05));
    put(`${p}.running_mean`, uniform(seed, `${p}.running_mean`, [c], -0.05, 0.05));
    put(`${p}.running_var`, uniform(seed, `${p}.running_var`, [c], 0.5, 1.5));
    put(`${p}.num_batches_tracked`, int64Scalar(1000));
  };
  const convBN = (p: string, cin: number, cout: number, k: number) => {
    // Fan-in scaled, as in the ONNX bench model.
    const a = (k === 3 ? 1 : 0.5) * Math.sqrt(3 / (cin * k * k));
    put(`${p}.conv.weight`, uniform(seed, `${p}.conv.weight`, [cout, cin, k, k], -a, a));
    bn(`${p}.bn`, cout, [0.5, 1.0]);
  };
  const block = (mod: string, cin: number, cout: number, stride: number) => {
    blocks++;
    if (cin === cout && stride === 1) {
      identityBlocks++;
      bn(`${mod}.rbr_identity`, cout, [0.3, 0.7]);
    }
    convBN(`${mod}.rbr_dense`, cin, cout, 3);
    convBN(`${mod}.rbr_1x1`, cin, cout, 1);
  };

  block('stage0', cfg.input[1], cfg.stem, 2);
  let cin = cfg.stem;
  cfg.stages.forEach(([width, count], si) => {
    for (let i = 0; i < count; i++) {
      block(`stage${si + 1}.${i}`, cin, width, i === 0 ? 2 : 1);
      cin = width;
    }
  });
  const lin = 1 / Math.sqrt(cin);
  put('linear.weight', uniform(seed, 'linear.weight', [cfg.classes, cin], -lin, lin));
  put('linear.bias', uniform(seed, 'linear.bias', [cfg.classes], -lin, lin));

  // torch.save names the archive root after the file (`repvgg_b1_sd/data.pkl`, …).
  const archiveName = file.replace(/^.*[\\/]/, '').replace(/\.[^.]*$/, '').replace(/[^A-Za-z0-9_.-]/g, '_') || 'archive';
  const res = await writeTorchZip(file, sd, { archiveName });
  return { path: res.path, bytes: res.bytes, blocks, identityBlocks, tensors: sd.size, params, ms: performance.now() - t0 };
}
