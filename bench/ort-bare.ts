// The floor for validation (`npm run bench`'s ratio row): one node process that creates a bare
// onnxruntime InferenceSession for each model given (graph optimizations disabled, as validation
// runs them), runs it once on seeded random input and releases it. Nothing is compared.
//
//   node out/bench/ort-bare.js original.onnx fused.onnx
import type * as Ort from 'onnxruntime-node';

async function main(files: string[]): Promise<void> {
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  const ort = require('onnxruntime-node') as typeof Ort;
  for (const file of files) {
    const session = await ort.InferenceSession.create(file, { graphOptimizationLevel: 'disabled', executionProviders: ['cpu'], logSeverityLevel: 3 });
    const feeds: Record<string, Ort.Tensor> = {};
    for (const meta of session.inputMetadata) {
      const shape = meta.isTensor ? meta.shape.map((d) => (typeof d === 'number' && d > 0 ? d : 1)) : [1, 3, 224, 224];
      const data = new Float32Array(shape.reduce((a, b) => a * b, 1));
      let s = 12345;
      for (let i = 0; i < data.length; i++) {
        s = (Math.imul(s, 1103515245) + 12345) >>> 0;
        data[i] = s / 2 ** 32 - 0.5;
      }
      feeds[meta.name] = new ort.Tensor('float32', data, shape);
    }
    await session.run(feeds);
    await session.release();
  }
}

main(process.argv.slice(2)).catch((err) => {
  process.stderr.write(`ort-bare: ${(err as Error).message}\n`);
  process.exit(1);
});
