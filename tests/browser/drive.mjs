// Drives headless Chromium for tests/browser.rs: `node drive.mjs <url of the first page>`.
//
// Opens the page through the proxy, waits until its <img> pixel, its sendBeacon and td-js-sdk's
// trackPageview and trackEvent have all been answered, clicks through to the second page, waits
// again, and prints one JSON object on stdout: the browser's User-Agent, each page load (URL,
// the page's own view of what happened, the cookies afterwards) and every request the browser
// made, with its headers, body, status and response headers. The Rust test makes the assertions.
// Every wait is bounded; on a timeout it says what it was waiting for on stderr and exits 1.
//
// CHROMIUM overrides the browser binary (default /usr/bin/chromium, Debian's package).

import { args, hardStop, launch, newPage, sleep, waitUntil } from './harness.mjs';

const STEP_MS = 30_000;
const TOTAL_MS = 100_000;

const [firstUrl] = args('drive.mjs', '<url of the first page>', 1);
const stop = hardStop('drive.mjs', TOTAL_MS);
const browser = await launch(STEP_MS);

/** Every request the page made, in order. */
const requests = [];
/** Promises that fill in the entries of `requests` (headers are read asynchronously). */
const filling = [];
let currentLoad = 1;
let phase = 'launching';

try {
  // The proxy's certificate is a throw-away self-signed one made by the test.
  const { context, page } = await newPage(browser, STEP_MS);

  const byRequest = new Map();
  context.on('request', (req) => {
    const entry = {
      load: currentLoad,
      method: req.method(),
      url: req.url(),
      resourceType: req.resourceType(),
      postData: req.postData(),
      requestHeaders: null,
      status: null,
      responseHeaders: null,
      failure: null,
      done: false,
    };
    requests.push(entry);
    byRequest.set(req, entry);
    filling.push(
      req.allHeaders().then(
        (h) => { entry.requestHeaders = h; },
        (e) => { entry.requestHeaders = { error: String(e) }; },
      ),
    );
  });
  context.on('requestfinished', (req) => {
    const entry = byRequest.get(req);
    if (!entry) return;
    filling.push(
      (async () => {
        const resp = await req.response();
        if (resp) {
          entry.status = resp.status();
          entry.responseHeaders = await resp.headersArray();
        }
        entry.done = true;
      })().catch((e) => { entry.failure = String(e); entry.done = true; }),
    );
  });
  context.on('requestfailed', (req) => {
    const entry = byRequest.get(req);
    if (!entry) return;
    entry.failure = req.failure()?.errorText ?? 'failed';
    entry.done = true;
  });

  const collected = (load) =>
    requests.filter((r) => r.load === load && /\/(postback|td)\//.test(new URL(r.url).pathname));

  /** Waits until the page says all four sends answered and the browser saw each of them end. */
  async function settle(load) {
    phase = `load ${load}: the page's sends`;
    const state = await waitUntil(phase, () =>
      page.evaluate(() => {
        const s = window.testState;
        return s && s.pixel && s.beacon && s.pageviews && s.events ? s : null;
      }),
    );
    // sendBeacon has no callback: the network log is the only way to see its answer.
    phase = `load ${load}: the network log (pixel, beacon, two SDK requests finished)`;
    await waitUntil(phase, () => {
      const mine = collected(load);
      const has = (re) => mine.some((r) => re.test(new URL(r.url).pathname) && r.done);
      return has(/\/pixels$/) && has(/\/beacons$/) && has(/\/td\/web\/pageviews$/) && has(/\/td\/web\/events$/);
    });
    return {
      url: page.url(),
      state,
      cookies: await context.cookies(),
    };
  }

  phase = 'opening the first page';
  await page.goto(firstUrl, { waitUntil: 'load' });
  const first = await settle(1);

  phase = 'following the link to the second page';
  currentLoad = 2;
  await Promise.all([
    page.waitForURL('**/shop/item.html?load=2', { waitUntil: 'load' }),
    page.click('#next'),
  ]);
  const second = await settle(2);

  phase = 'reading navigator.userAgent';
  const userAgent = await page.evaluate(() => navigator.userAgent);
  await Promise.all(filling);

  for (const r of requests) delete r.done;
  process.stdout.write(JSON.stringify({ userAgent, loads: [first, second], requests }) + '\n');
} catch (e) {
  console.error(`drive.mjs failed during ${phase}: ${e && e.stack ? e.stack : e}`);
  console.error(`requests so far: ${JSON.stringify(requests, null, 1)}`);
  process.exitCode = 1;
} finally {
  await browser.close().catch(() => {});
  clearTimeout(stop);
}
