// Where things are, for tests compiled to out/test/ (or run from test/ directly).
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

/** The repository root: the nearest folder above this file that holds package.json. */
export const repoRoot: string = (() => {
  let dir = __dirname;
  for (;;) {
    if (fs.existsSync(path.join(dir, 'package.json'))) return dir;
    const up = path.dirname(dir);
    if (up === dir) throw new Error(`no package.json above ${__dirname}`);
    dir = up;
  }
})();

export const fixturesDir = path.join(repoRoot, 'test', 'fixtures', 'onnx');
export const cliPath = path.join(repoRoot, 'dist', 'cli.js');

/** A fresh temp folder `repfuse-XXXX`; remove it with rmTmp() in after(). */
export function makeTmp(): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), 'repfuse-'));
}

export function rmTmp(dir: string | undefined): void {
  if (dir) fs.rmSync(dir, { recursive: true, force: true });
}
