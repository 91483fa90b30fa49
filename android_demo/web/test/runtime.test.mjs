// The browser runtime on WASM in headless Chromium against edgephi's Python side: the tokenizer's ids and the
// greedy tokens of the Python ONNX backend on the same web/model.onnx, for the built-in model and tiny models of
// each Phi family; stop ids, sampling, streaming, a full context and load errors.
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { cpSync, mkdirSync, readFileSync, rmSync, truncateSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { launch, openHarness, startServer } from './browser.mjs';
import { FIXTURES, VARIANTS, assertGreedy, expectations } from './fixtures.mjs';

const EXP = expectations();
let browser, server, page;

async function model(variant, options = {}) {
  return page.evaluate(async (v, o) => {
    window.models ??= {};
    const key = `${v} ${JSON.stringify(o)}`;
    window.models[key] ??= await edgephi.loadBundle(`/bundles/${v}/`, { engine: 'wasm', ...o });
    window.m = window.models[key];
    window.m.reset();
    return { engine: window.m.engine, reason: window.m.engineReason, nCtx: window.m.nCtx };
  }, variant, options);
}

function brokenBundles() {
  const dir = path.join(FIXTURES, 'broken');
  rmSync(dir, { recursive: true, force: true });
  const manifest = JSON.parse(readFileSync(path.join(FIXTURES, 'default/manifest.json'), 'utf8'));
  delete manifest.formats.web;
  manifest.formats.onnx = { format: 'onnx', entry: 'onnx/model.onnx', files: ['onnx/model.onnx'], bits: 4, quant: 'x' };
  mkdirSync(path.join(dir, 'noweb'), { recursive: true });
  writeFileSync(path.join(dir, 'noweb/manifest.json'), JSON.stringify(manifest));
  cpSync(path.join(FIXTURES, 'default'), path.join(dir, 'truncated'), { recursive: true });
  const piece = path.join(dir, 'truncated/web/model.onnx.data.0');
  truncateSync(piece, Math.floor(readFileSync(piece).length / 2));
}

before(async () => {
  brokenBundles();
  server = await startServer(FIXTURES);
  browser = await launch();
  page = await openHarness(browser, server);
});
after(async () => { await browser?.close(); await server?.close(); });

for (const variant of VARIANTS) {
  describe(`${variant} on WASM`, () => {
    const exp = EXP[variant];
    test('tokenizer ids and chat template equal the Python tokenizer\'s', async () => {
      await model(variant);
      const got = await page.evaluate((texts, messages) => ({
        ids: texts.map((t) => m.tokenizer.encode(t)),
        chatText: m.tokenizer.applyChatTemplate(messages, { tokenize: false }),
        chatIds: m.tokenizer.applyChatTemplate(messages),
      }), exp.tokenizer.map((c) => c.text), exp.chat.messages);
      exp.tokenizer.forEach((c, i) => assert.deepEqual(got.ids[i], c.ids, `encode(${JSON.stringify(c.text)})`));
      assert.equal(got.chatText, exp.chat.text);
      assert.deepEqual(got.chatIds, exp.chat.ids);
    });

    test('greedy tokens equal the Python ONNX backend\'s (raw prompt past the window / LongRoPE switch)', async () => {
      const info = await model(variant);
      assert.equal(info.engine, 'wasm');
      const r = await page.evaluate((p, n) => m.generate(p, { maxTokens: n, stopIds: [] }), exp.raw.prompt,
        exp.raw.tokens.length);
      assertGreedy(r.ids, exp.raw, `${variant} raw`);
    });

    test('chat, then a second turn over the kept cache, equal the Python backend\'s', async () => {
      await model(variant);
      const r = await page.evaluate(async (c, t2) => {
        const one = await m.chat(c.messages, { maxTokens: c.greedy.tokens.length, stopIds: [] });
        const two = await m.chat(t2.messages, { maxTokens: t2.greedy.tokens.length, stopIds: [] });
        return { one, two };
      }, exp.chat, exp.turn2);
      assertGreedy(r.one.ids, exp.chat.greedy, `${variant} chat`);
      assertGreedy(r.two.ids, exp.turn2.greedy, `${variant} second turn`);
      assert.ok(r.two.evaluatedPromptTokens < r.two.promptTokens,
        `the second turn evaluated ${r.two.evaluatedPromptTokens} of ${r.two.promptTokens} prompt tokens`);
    });
  });
}

describe('generation on the built-in model (WASM)', () => {
  const exp = EXP.default;
  test('streamed pieces concatenate to the text, which equals Python\'s decode', async () => {
    await model('default');
    const r = await page.evaluate(async (p, n) => {
      const pieces = [];
      const res = await m.generate(p, { maxTokens: n, stopIds: [], onToken: ({ text }) => pieces.push(text) });
      return { ...res, pieces };
    }, exp.raw.prompt, exp.raw.tokens.length);
    assert.equal(r.pieces.join(''), r.text);
    assert.equal(r.text, exp.raw_text);
    assert.ok(r.pieces.length >= r.ids.length, 'one callback per token');
  });

  test('a stop id ends the answer before it', async () => {
    await model('default');
    const stop = exp.raw.tokens[3];
    const r = await page.evaluate((p, s) => m.generate(p, { maxTokens: 30, stopIds: [s] }), exp.raw.prompt, stop);
    assert.equal(r.stopReason, 'stop');
    assert.equal(r.stopId, stop);
    assert.deepEqual(r.ids, exp.raw.tokens.slice(0, exp.raw.tokens.indexOf(stop)));
  });

  test('the manifest\'s stop ids are used by default', async () => {
    await model('default');
    const ids = await page.evaluate(() => [...m.stopIds]);
    assert.deepEqual(ids.sort(), [...exp.stop_ids].sort());
  });

  test('sampling: the same seed gives the same tokens', async () => {
    await model('default');
    const r = await page.evaluate(async (p) => {
      const opts = { maxTokens: 12, temperature: 0.9, topP: 0.9, topK: 40, stopIds: [] };
      const a = await m.generate(p, { ...opts, seed: 7 });
      const b = await m.generate(p, { ...opts, seed: 7 });
      const c = await m.generate(p, { ...opts, seed: 8 });
      return [a.ids, b.ids, c.ids];
    }, exp.raw.prompt);
    assert.deepEqual(r[0], r[1]);
    assert.equal(r[2].length, 12);
  });

  test('a full context stops the answer with a message; a prompt that cannot fit is refused', async () => {
    await model('default', { nCtx: 32 });
    const r = await page.evaluate(async (p) => {
      const res = await m.generate(p, { maxTokens: 100, stopIds: [] });
      let err = null;
      try { await m.generate(Array(40).fill(p[0])); } catch (e) { err = `${e.name}: ${e.message}`; }
      return { ...res, nPast: m.session.nPast, err };
    }, exp.raw.prompt);
    assert.equal(r.stopReason, 'context');
    assert.match(r.message, /context full/);
    assert.equal(r.ids.length, 32 - exp.raw.prompt.length + 1);
    assert.match(r.err, /^ContextFullError: context full/);
  });

  test('load errors say why: no bundle, no web model, a truncated piece', async () => {
    const errs = await page.evaluate(async () => {
      const out = {};
      for (const u of ['/bundles/nope/', '/bundles/broken/noweb/', '/bundles/broken/truncated/']) {
        try { await edgephi.loadBundle(u, { engine: 'wasm' }); out[u] = 'loaded'; } catch (e) { out[u] = `${e.name}: ${e.message}`; }
      }
      return out;
    });
    assert.match(errs['/bundles/nope/'], /BundleLoadError: .*manifest\.json: HTTP 404.*edgephi bundle/);
    assert.match(errs['/bundles/broken/noweb/'], /has no web model \(it has: onnx\).*--format web/);
    assert.match(errs['/bundles/broken/truncated/'], /model\.onnx\.data\.0: \d+ bytes, manifest\.json recorded \d+.*truncated/);
  });
});

test('without cross-origin isolation WASM runs one thread and says why', async () => {
  const plain = await startServer(FIXTURES, { isolate: false });
  const p = await openHarness(browser, plain);
  try {
    const r = await p.evaluate(async () => {
      const m = await edgephi.loadBundle('/bundles/default/');
      const out = { engine: m.engine, reason: m.engineReason, isolated: crossOriginIsolated };
      await m.dispose();
      return out;
    });
    assert.equal(r.isolated, false);
    assert.equal(r.engine, 'wasm');
    assert.match(r.reason, /1 thread: the page is not cross-origin isolated/);
    assert.match(r.reason, /no WebGPU: /);
  } finally {
    await p.close();
    await plain.close();
  }
});
