// What every driver script here shares: a bounded run, bounded waits, and Chromium launched the
// way this machine needs it (CHROMIUM overrides the binary; default /usr/bin/chromium, Debian's).

import { chromium } from 'playwright-core';

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** Exits with 1 (saying so on stderr) if the script is still running after `ms`. */
export function hardStop(script, ms) {
  const timer = setTimeout(() => {
    console.error(`${script}: gave up after ${ms} ms`);
    process.exit(1);
  }, ms);
  timer.unref();
  return timer;
}

/** Polls `check` until it returns a truthy value; throws `what` after `ms`. */
export async function waitUntil(what, check, ms = 30_000) {
  const deadline = Date.now() + ms;
  for (;;) {
    const value = await check();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await sleep(25);
  }
}

/** Headless Chromium, as root, with the background networking this machine refuses turned off. */
export function launch(timeout = 30_000) {
  return chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    chromiumSandbox: false,
    timeout,
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
      '--disable-dev-shm-usage'],
  });
}

/** The script's `n` arguments; with fewer, says how to call it and exits with 2. */
export function args(script, usage, n) {
  const given = process.argv.slice(2);
  if (given.length < n) {
    console.error(`usage: node ${script} ${usage}`);
    process.exit(2);
  }
  return given;
}

/** A page in a new context that accepts the test's throw-away certificate, with the page's
 * console and errors copied to stderr. */
export async function newPage(browser, timeout = 30_000) {
  const context = await browser.newContext({ ignoreHTTPSErrors: true });
  const page = await context.newPage();
  page.setDefaultTimeout(timeout);
  page.on('console', (m) => console.error(`[page ${m.type()}] ${m.text()}`));
  page.on('pageerror', (e) => console.error(`[page error] ${e}`));
  return { context, page };
}
