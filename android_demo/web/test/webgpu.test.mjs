// The browser runtime on WebGPU where Chromium has an adapter (here: SwiftShader, a software Vulkan without
// shader-f16, so a few short generations); skipped with the reason where it has none.
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { launch, openHarness, startServer } from './browser.mjs';
import { FIXTURES, VARIANTS, assertGreedy, expectations } from './fixtures.mjs';

const EXP = expectations();
const GPU_VARIANTS = process.env.EDGEPHI_WEB_ALL === '1' ? VARIANTS
  : VARIANTS.filter((v) => ['default', 'phi-4-mini'].includes(v));  // GQA, partial rotary, LongRoPE's switch
let browser, server, page, adapter;

before(async () => {
  server = await startServer(FIXTURES);
  browser = await launch({ webgpu: true });
  page = await openHarness(browser, server);
  adapter = await page.evaluate(async () => {
    const a = await edgephi.webgpuAdapter();
    return { ok: a.ok, reason: a.reason, description: a.description };
  });
  if (adapter.ok) console.log(`# WebGPU adapter: ${adapter.description}`);
});
after(async () => { await browser?.close(); await server?.close(); });

for (const variant of GPU_VARIANTS) {
  describe(`${variant} on WebGPU`, () => {
    test('greedy tokens equal the Python ONNX backend\'s (KV cache shared as past and present)', async (t) => {
      if (!adapter.ok) return t.skip(`no WebGPU adapter: ${adapter.reason}`);
      const exp = EXP[variant].short;
      const steps = Math.min(exp.tokens.length, 4);
      const r = await page.evaluate(async (v, p, n) => {
        const m = await edgephi.loadBundle(`/bundles/${v}/`, { engine: 'webgpu' });
        try {
          const res = await m.generate(p, { maxTokens: n, stopIds: [] });
          return { ...res, engine: m.engine, reason: m.engineReason };
        } finally { await m.dispose(); }
      }, variant, exp.prompt, steps);
      assert.equal(r.engine, 'webgpu');
      assert.match(r.reason, /^WebGPU on /);
      assertGreedy(r.ids, { ...exp, tokens: exp.tokens.slice(0, steps) }, `${variant} WebGPU`);
    });
  });
}
