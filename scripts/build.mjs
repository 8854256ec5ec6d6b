// Bundles the CLI, the validation worker, the VS Code extension, its model worker and its
// webviews with esbuild. onnxruntime-node stays external: it is a native module loaded from
// node_modules (only by the validation child process); `vscode` is provided by the editor.
import { build } from 'esbuild';
import { chmodSync, copyFileSync, mkdirSync, readdirSync } from 'node:fs';

const common = {
  bundle: true,
  platform: 'node',
  target: 'node20',
  format: 'cjs',
  sourcemap: true,
  external: ['onnxruntime-node', 'vscode'],
  logLevel: 'warning',
};

// Webviews: one browser bundle per page (webview/*.ts; shared code lives in webview/lib/).
const webviewEntries = readdirSync('webview')
  .filter((f) => f.endsWith('.ts') && !f.endsWith('.d.ts'))
  .map((f) => `webview/${f}`);

mkdirSync('dist/webview', { recursive: true });
await Promise.all([
  build({ ...common, entryPoints: ['src/cli.ts'], outfile: 'dist/cli.js', banner: { js: '#!/usr/bin/env node' } }),
  build({ ...common, entryPoints: ['src/validate/worker.ts'], outfile: 'dist/validate-worker.js' }),
  build({ ...common, entryPoints: ['src/extension/extension.ts'], outfile: 'dist/extension.js' }),
  build({ ...common, entryPoints: ['src/extension/worker/modelWorker.ts'], outfile: 'dist/model-worker.js' }),
  build({
    bundle: true,
    platform: 'browser',
    format: 'iife',
    target: ['chrome114'],
    minify: true,
    sourcemap: false,
    entryPoints: webviewEntries,
    outdir: 'dist/webview',
    logLevel: 'warning',
  }),
]);
// The codicon font, for <vscode-icon> and codicon classes inside the webviews.
for (const f of ['codicon.css', 'codicon.ttf']) copyFileSync(`node_modules/@vscode/codicons/dist/${f}`, `dist/webview/${f}`);
// The end-to-end check that runs in the user's own Python (repfuse fuse --python): shipped as is.
copyFileSync('src/validate/pyval.py', 'dist/pyval.py');
chmodSync('dist/cli.js', 0o755);
