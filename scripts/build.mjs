// Bundles the CLI, the validation worker (and later the extension) with esbuild.
// onnxruntime-node stays external: it is a native module loaded from node_modules.
import { build } from 'esbuild';
import { chmodSync } from 'node:fs';

const common = {
  bundle: true,
  platform: 'node',
  target: 'node20',
  format: 'cjs',
  sourcemap: true,
  external: ['onnxruntime-node', 'vscode'],
  logLevel: 'warning',
};

await Promise.all([
  build({ ...common, entryPoints: ['src/cli.ts'], outfile: 'dist/cli.js', banner: { js: '#!/usr/bin/env node' } }),
  build({ ...common, entryPoints: ['src/validate/worker.ts'], outfile: 'dist/validate-worker.js' }),
]);
chmodSync('dist/cli.js', 0o755);
