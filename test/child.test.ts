// The shared lifecycle of short-lived child jobs (src/validate/child.ts): settles once, and a child
// still running when the job settles (timeout, cancellation, early result) is killed.
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { supervise } from '../src/validate/child';

const sleeper = () => spawn(process.execPath, ['-e', 'setInterval(() => {}, 1000)'], { stdio: 'ignore' });

function run(child: ReturnType<typeof sleeper>, timeoutMs: number, signal?: AbortSignal) {
  let job!: ReturnType<typeof supervise<string>>;
  const p = new Promise<string>((resolve, reject) => {
    job = supervise<string>(child, { timeoutMs, signal, timeoutError: () => new Error('timed out'), abortError: () => new Error('cancelled') }, resolve, reject);
  });
  return { p, job };
}

test('a job that runs past its timeout rejects with the timeout error and its child is killed', async () => {
  const child = sleeper();
  const exited = once(child, 'exit');
  const { p, job } = run(child, 150);
  await assert.rejects(p, /timed out/);
  assert.equal(job.settled, true);
  const [code, signal] = await exited;
  assert.equal(code, null);
  assert.equal(signal, 'SIGKILL');
});

test('cancelling rejects with the abort error and kills the child; an already aborted signal settles at once', async () => {
  const ac = new AbortController();
  const child = sleeper();
  const exited = once(child, 'exit');
  const { p } = run(child, 60_000, ac.signal);
  setTimeout(() => ac.abort(), 50);
  await assert.rejects(p, /cancelled/);
  assert.equal((await exited)[1], 'SIGKILL');

  const pre = new AbortController();
  pre.abort();
  const child2 = sleeper();
  const exited2 = once(child2, 'exit');
  const r = run(child2, 60_000, pre.signal);
  assert.equal(r.job.settled, true, 'settled before any event');
  await assert.rejects(r.p, /cancelled/);
  assert.equal((await exited2)[1], 'SIGKILL');
});

test('the first settle wins: a result, then an error and the timeout, change nothing; the timer is cleared', async () => {
  const child = sleeper();
  const exited = once(child, 'exit');
  const { p, job } = run(child, 100);
  job.finish(undefined, 'result');
  job.finish(new Error('late error'));
  assert.equal(await p, 'result');
  assert.equal((await exited)[1], 'SIGKILL', 'the child is stopped once the job has its result');
  await new Promise((r) => setTimeout(r, 200)); // past the timeout: nothing more happens (no unhandled rejection)
  assert.equal(job.settled, true);
});

test('a child that cannot be started does not raise an unhandled error event after an early settle', async () => {
  const pre = new AbortController();
  pre.abort();
  const child = spawn('/nonexistent/repfuse-no-such-interpreter', [], { stdio: 'ignore' });
  const { p } = run(child, 60_000, pre.signal);
  await assert.rejects(p, /cancelled/);
  await new Promise((r) => setTimeout(r, 100)); // the ENOENT 'error' event fires now and is handled
});
