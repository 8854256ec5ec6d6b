// Loads a model in onnxruntime-node and runs it once on seeded random input; prints one line.
// Run as its own process (bench.ts spawns it) so onnxruntime's memory and threads never sit in the
// benchmark process that spawns the timed commands.
import type * as Ort from 'onnxruntime-node';

async function main(file: string): Promise<void> {
  const t0 = performance.now();
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  const ort = require('onnxruntime-node') as typeof Ort;
  const session = await ort.InferenceSession.create(file);
  const loadMs = performance.now() - t0;
  const feeds: Record<string, Ort.Tensor> = {};
  for (const name of session.inputNames) {
    const meta = session.inputMetadata.find((m) => m.name === name);
    const shape = meta && meta.isTensor ? meta.shape.map((d) => (typeof d === 'number' && d > 0 ? d : 1)) : [1, 3, 224, 224];
    const n = shape.reduce((a, b) => a * b, 1);
    const data = new Float32Array(n);
    let s = 12345;
    for (let i = 0; i < n; i++) {
      s = (Math.imul(s, 1103515245) + 12345) >>> 0;
      data[i] = s / 2 ** 32 - 0.5;
    }
    feeds[name] = new ort.Tensor('float32', data, shape);
  }
  const t1 = performance.now();
  const res = await session.run(feeds);
  const runMs = performance.now() - t1;
  const outs = Object.entries(res).map(([k, v]) => {
    const d = v.data as Float32Array;
    let finite = true;
    for (let i = 0; i < d.length; i++) if (!Number.isFinite(d[i])) finite = false;
    return `${k} [${v.dims.join('×')}]${finite ? '' : ' (NOT FINITE)'}`;
  });
  await session.release();
  process.stdout.write(`onnxruntime-node loaded it in ${(loadMs / 1000).toFixed(2)} s (inputs ${session.inputNames.join(', ')}); one run ${(runMs / 1000).toFixed(2)} s → ${outs.join(', ')}\n`);
}

main(process.argv[2]).catch((err) => {
  process.stderr.write(`onnxruntime-node could not load/run the model: ${(err as Error).message}\n`);
  process.exit(1);
});
