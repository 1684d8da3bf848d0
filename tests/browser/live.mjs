// Drives headless Chromium for tests/live_view.rs:
//   node live.mjs <admin url> <postback url prefix> <write key> <screenshot path> <signal file>
//
// Opens the admin listener's live view, fires three pixels and one postback with a wrong key
// through the proxy, waits until the page shows them, then prints `stop the sink` and waits for
// the signal file to appear (the test stops the sink's peer, then creates it; stdin is left alone:
// the browser shares it), waits until the sink table says `down`,
// takes a screenshot and prints one JSON object: what the page showed. The Rust test makes the
// assertions. Every wait is bounded; on a timeout it says what it was waiting for on stderr.

import { args, hardStop, launch, waitUntil as waitFor } from './harness.mjs';
import { existsSync } from 'node:fs';

const STEP_MS = 20_000;
const [adminUrl, postbackUrl, key, screenshot, signal] = args('live.mjs',
  '<admin url> <postback url prefix> <write key> <screenshot path> <signal file>', 5);
const started = Date.now();
const note = (what) => console.error(`live.mjs: ${what} after ${Date.now() - started} ms`);
hardStop('live.mjs', 150_000);

const waitUntil = (what, check) => waitFor(what, check, STEP_MS);

const browser = await launch();
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 800 } });
  page.on('pageerror', (e) => console.error(`[page error] ${e}`));
  note('browser started');
  await page.goto(adminUrl);
  await waitUntil('the event stream', async () => (await page.textContent('#conn')) === 'live');

  const fired = Date.now();
  for (const n of [1, 2, 3]) {
    const r = await fetch(`${postbackUrl}?td_format=pixel&td_write_key=${encodeURIComponent(key)}&page=/live-${n}&td_ip=td_ip`);
    await r.arrayBuffer(); // an unread body holds its connection
    if (r.status !== 200) throw new Error(`pixel ${n}: ${r.status}`);
  }
  const bad = await fetch(`${postbackUrl}?td_write_key=not-the-key&page=/refused`);
  await bad.arrayBuffer();
  const rows = await waitUntil('three records on the page', async () => {
    const rows = await page.$$eval('#records tbody tr', (trs) => trs.map((tr) =>
      Array.from(tr.cells).map((td) => td.textContent)));
    return rows.length >= 3 ? rows : null;
  });
  const shownAfterMs = Date.now() - fired;
  const refused = await waitUntil('the refused postback', async () => {
    const rows = await page.$$eval('#refused tbody tr', (trs) => trs.map((tr) =>
      Array.from(tr.cells).map((td) => td.textContent)));
    return rows.length >= 1 ? rows : null;
  });
  const sinksBefore = await waitUntil('the sink table', async () => {
    const rows = await page.$$eval('#sinks tbody tr', (trs) => trs.map((tr) =>
      Array.from(tr.cells).map((td) => td.textContent)));
    return rows.length >= 1 ? rows : null;
  });
  // The table re-renders on the next animation frame: wait for the filtered rows (any count but
  // the full three is an answer the test then checks).
  const shownRows = () => page.$$eval('#records tbody tr', (trs) => trs.length);
  await page.fill('#f-text', '/live-2');
  const filtered = await waitUntil('the text filter', async () => {
    const n = await shownRows();
    return n < 3 ? { n } : null;
  }).then((r) => r.n).catch(() => 3);
  await page.fill('#f-text', '');
  await waitUntil('the filter cleared', async () => (await shownRows()) >= 3);

  note('records, refusal and sinks shown');
  console.log('stop the sink');
  await waitUntil('the test to stop the sink', async () => existsSync(signal));
  note('sink stopped');
  // A record that the stopped sink cannot take, so it fails and says so.
  await (await fetch(`${postbackUrl}?td_format=pixel&td_write_key=${encodeURIComponent(key)}&page=/live-4`)).arrayBuffer();
  note('a record for the stopped sink sent');
  const sinksAfter = await waitUntil('the sink to be down', async () => {
    const rows = await page.$$eval('#sinks tbody tr', (trs) => trs.map((tr) =>
      Array.from(tr.cells).map((td) => td.textContent)));
    return rows.some((r) => r[1] === 'down') ? rows : null;
  });
  const rates = await waitUntil('request rates with every outcome', async () => {
    const rows = await page.$$eval('#rates tbody tr', (trs) => trs.map((tr) =>
      Array.from(tr.cells).map((td) => td.textContent)));
    const total = (o) => rows.find((r) => r[0] === o)?.[2];
    return total('accepted') === '4' && total('forbidden') === '1' ? rows : null;
  });
  await page.screenshot({ path: screenshot, fullPage: true });
  const text = await page.textContent('body');
  console.log(JSON.stringify({
    rows, refused, sinksBefore, sinksAfter, rates, filtered, badStatus: bad.status, shownAfterMs,
    keyOnPage: text.includes(key),
  }));
} catch (err) {
  console.error(`live.mjs: ${err.stack || err}`);
  process.exitCode = 1;
} finally {
  await browser.close();
  process.exit();
}
