// Drives headless Chromium for tests/browser.rs's identity test: `node identity.mjs <url>`.
//
// Opens the page through the proxy, waits until td-js-sdk's two fetchServerCookie() calls have
// answered, reloads it and waits again, and prints one JSON object on stdout: for each load the
// page's own view (window.testState), the Set-Cookie headers of the page's response, the cookies
// the browser holds afterwards (with their expiry) and the browser's requests to /get_cookie_id
// (status, cookies sent, Set-Cookie received). The Rust test makes the assertions. Every wait is
// bounded; on a timeout it says what it was waiting for on stderr and exits 1.
//
// CHROMIUM overrides the browser binary (default /usr/bin/chromium, Debian's package).

import { args, hardStop, launch, newPage, waitUntil } from './harness.mjs';

const STEP_MS = 30_000;
const TOTAL_MS = 100_000;

const [url] = args('identity.mjs', '<url of the page>', 1);
const stop = hardStop('identity.mjs', TOTAL_MS);
const browser = await launch(STEP_MS);

let phase = 'launching';
let load = 0;
const sscRequests = [];
try {
  // The proxy's certificate is a throw-away self-signed one made by the test.
  const { context, page } = await newPage(browser, STEP_MS);
  const pending = [];
  context.on('requestfinished', (req) => {
    if (!new URL(req.url()).pathname.startsWith('/get_cookie_id')) return;
    const entry = { load, url: req.url() };
    sscRequests.push(entry);
    pending.push((async () => {
      entry.cookie = (await req.allHeaders()).cookie ?? null;
      const resp = await req.response();
      entry.status = resp.status();
      entry.setCookies = (await resp.headersArray())
        .filter((h) => h.name.toLowerCase() === 'set-cookie').map((h) => h.value);
      entry.body = await resp.text();
    })().catch((e) => { entry.failure = String(e); }));
  });

  async function settle(response) {
    phase = `load ${load}: fetchServerCookie`;
    const state = await waitUntil(phase, () => page.evaluate(() => {
      const s = window.testState;
      return s && s.ssc !== null && s.forced !== null ? s : null;
    }));
    await Promise.all(pending);
    return {
      state,
      setCookies: (await response.headersArray())
        .filter((h) => h.name.toLowerCase() === 'set-cookie').map((h) => h.value),
      cookies: await context.cookies(),
      now: Date.now() / 1000,
    };
  }

  phase = 'opening the page';
  load = 1;
  const first = await settle(await page.goto(url, { waitUntil: 'load' }));
  phase = 'reloading the page';
  load = 2;
  const second = await settle(await page.reload({ waitUntil: 'load' }));
  await Promise.all(pending);
  process.stdout.write(JSON.stringify({ loads: [first, second], sscRequests }) + '\n');
} catch (e) {
  console.error(`identity.mjs failed during ${phase}: ${e && e.stack ? e.stack : e}`);
  process.exitCode = 1;
} finally {
  await browser.close().catch(() => {});
  clearTimeout(stop);
}
