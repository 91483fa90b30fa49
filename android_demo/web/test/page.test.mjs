// The chat page (index.html, app.js) in headless Chromium: it loads a bundle, shows the engine and why, streams
// the same greedy answer as the Python ONNX backend, keeps the conversation, says why a load failed, and after
// one load it works with the server gone (service worker cache).
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { launch, startServer } from './browser.mjs';
import { FIXTURES, expectations } from './fixtures.mjs';

const EXP = expectations().default;
let browser, server;

before(async () => {
  server = await startServer(FIXTURES);
  browser = await launch();
});
after(async () => { await browser?.close(); await server?.close(); });

async function open(url) {
  const page = await browser.newPage();
  page.on('pageerror', (e) => console.error('page error:', e.message));
  await page.goto(url);
  await page.waitForFunction(() => ['ready', 'error'].includes(document.getElementById('status').dataset.state),
    { timeout: 120_000 });
  return page;
}

async function ask(page, text, n) {
  await page.evaluate((t, max) => {
    document.getElementById('maxTokens').value = String(max);
    document.getElementById('input').value = t;
    document.getElementById('send').click();
  }, text, n);
  await page.waitForFunction((k) => document.querySelectorAll('.assistant[data-done]').length === k,
    { timeout: 120_000 }, await page.evaluate(() => document.querySelectorAll('.assistant').length));
  return page.evaluate(() => {
    const all = document.querySelectorAll('.assistant');
    const last = all[all.length - 1];
    return { text: last.textContent, done: last.dataset.done, meta: last.nextElementSibling?.textContent,
      status: document.getElementById('status').textContent };
  });
}

// The service worker stores each response while the page reads it (cache.put under waitUntil): wait until every
// same-origin file this page fetched is in Cache Storage before the server goes, or a large file (the WASM binary,
// the model) may still be on its way into the cache.
async function cached(page) {
  return page.waitForFunction(async () => {
    const cache = await caches.open('edgephi-v1');
    const urls = performance.getEntriesByType('resource').map((e) => e.name)
      .filter((u) => u.startsWith(location.origin + '/'));
    const hits = await Promise.all([location.href, ...urls].map((u) => cache.match(u)));
    return urls.length > 0 && hits.every(Boolean) && urls;
  }, { timeout: 60_000, polling: 200 }).then((h) => h.jsonValue());
}

test('the page streams the Python backend\'s greedy answer, keeps the conversation, then works offline', async () => {
  const own = await startServer(FIXTURES);  // stopped half-way: the page must go on from its cache
  const url = `${own.url}/index.html?bundle=/bundles/default/`;
  let page = await open(url);
  try {
    let status = await page.$eval('#status', (e) => e.textContent);
    assert.match(status, / · WASM · WASM, SIMD, \d threads? .*no WebGPU: .*context 2048 tokens/);
    const first = await ask(page, EXP.page.messages[0].content, 24);
    assert.equal(first.text, EXP.page.answer);
    assert.match(first.meta, /tokens, .*tok\/s, prompt \d+ of \d+ evaluated, (stop|length)/);
    const second = await ask(page, 'Thanks!', 8);
    assert.ok(second.text.length > 0, 'a second answer');
    const [evaluated, total] = second.meta.match(/prompt (\d+) of (\d+)/).slice(1).map(Number);
    assert.ok(evaluated < total, `the second turn reused the cache (${second.meta})`);
    await page.evaluate(() => navigator.serviceWorker.ready.then(() => true));
    // once more under the service worker's control, so that every file went through its cache
    await page.close();
    page = await open(url);
    assert.equal(await page.evaluate(() => navigator.serviceWorker.controller !== null), true);
    const stored = await cached(page);
    for (const want of [/\.wasm$/, /\/web\/model\.onnx$/]) assert.ok(stored.some((u) => want.test(u)), `${want} cached`);
    await own.close();
    await page.close();
    page = await open(url);
    status = await page.$eval('#status', (e) => e.textContent);
    assert.match(status, / · WASM · /, `offline load: ${status}`);
    const offline = await ask(page, EXP.page.messages[0].content, 24);
    assert.equal(offline.text, EXP.page.answer);
  } finally {
    await page.close();
    await own.close().catch(() => {});
  }
});

test('a page whose model cannot load says why', async () => {
  const page = await open(`${server.url}/index.html?bundle=/bundles/missing/`);
  try {
    const s = await page.$eval('#status', (e) => ({ text: e.textContent, state: e.dataset.state }));
    assert.equal(s.state, 'error');
    assert.match(s.text, /^Could not load the model: .*\/bundles\/missing\/manifest\.json: HTTP 404/);
    assert.equal(await page.$eval('#send', (e) => e.disabled), true);
  } finally {
    await page.close();
  }
});
