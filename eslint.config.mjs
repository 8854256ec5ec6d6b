// ESLint flat config. The restricted-import rules make the layout mechanical:
// src/core is pure TypeScript (no vscode, no native modules), and only
// src/validate may load onnxruntime-node.
import js from '@eslint/js';
import tseslint from 'typescript-eslint';

export default tseslint.config(
  { ignores: ['node_modules/**', 'dist/**', 'out/**', 'out-*/**', 'examples/**', 'test/fixtures/**'] },
  js.configs.recommended,
  ...tseslint.configs.recommended,
  {
    rules: {
      '@typescript-eslint/no-unused-vars': ['error', { argsIgnorePattern: '^_' }],
    },
  },
  {
    files: ['src/core/**/*.ts'],
    rules: {
      'no-restricted-imports': ['error', {
        paths: [
          { name: 'vscode', message: 'src/core must not depend on the VS Code API.' },
          { name: 'onnxruntime-node', message: 'src/core must not load native modules; use src/validate.' },
          { name: 'child_process', message: 'src/core does no process management.' },
          { name: 'node:child_process', message: 'src/core does no process management.' },
        ],
      }],
    },
  },
  {
    files: ['src/cli.ts', 'src/extension/**/*.ts'],
    rules: {
      'no-restricted-imports': ['error', {
        paths: [{ name: 'onnxruntime-node', message: 'Load onnxruntime only in the validation child process (src/validate/worker.ts).' }],
      }],
    },
  },
  {
    // Webviews run in a browser sandbox: no Node modules, no VS Code API (only acquireVsCodeApi).
    files: ['webview/**/*.ts'],
    rules: {
      'no-restricted-imports': ['error', {
        paths: [
          { name: 'vscode', message: 'The webview talks to the host through the typed protocol only.' },
          { name: 'onnxruntime-node', message: 'Not available in a webview.' },
          ...['fs', 'path', 'os', 'child_process', 'worker_threads', 'crypto'].map((name) => ({ name, message: 'Node modules do not exist in a webview.' })),
        ],
        patterns: [{ group: ['node:*'], message: 'Node modules do not exist in a webview.' }, { group: ['**/core/onnx/**', '**/core/torch/**', '**/core/checkpoint/**', '**/engine', '**/validate/**'], message: 'The webview gets data from the host (types from core/stats and the protocol only).' }],
      }],
    },
  },
  {
    files: ['scripts/**/*.mjs'],
    languageOptions: { globals: { console: 'readonly', process: 'readonly' } },
  },
);
