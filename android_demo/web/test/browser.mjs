// Debian's chromium, headless, driven by puppeteer-core (never a downloaded browser), and the static server.
import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import puppeteer from 'puppeteer-core';
import { serve } from './server.mjs';

export const WEB = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
export const CHROMIUM = process.env.EDGEPHI_CHROMIUM || '/usr/bin/chromium';
export const FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
  '--disable-component-update', '--disable-sync', '--no-first-run'];
// a WebGPU adapter without a GPU: SwiftShader's Vulkan (no shader-f16), allowed only with these two
export const WEBGPU_FLAGS = ['--enable-unsafe-webgpu', '--enable-unsafe-swiftshader'];

export async function launch({ webgpu = false } = {}) {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'edgephi-chromium-'));
  const browser = await puppeteer.launch({
    executablePath: CHROMIUM, headless: true, ignoreDefaultArgs: true, pipe: true,
    args: [...FLAGS, ...(webgpu ? WEBGPU_FLAGS : []), `--user-data-dir=${dir}`, 'about:blank'],
    protocolTimeout: 600_000,
  });
  const close = browser.close.bind(browser);
  browser.close = async () => { await close(); rmSync(dir, { recursive: true, force: true }); };
  return browser;
}

// the web folder at /, bundles at /bundles/
export async function startServer(bundles, options) {
  return serve({ '/bundles/': bundles, '/': WEB }, options);
}

export async function openHarness(browser, server, page = null) {
  page ??= await browser.newPage();
  page.on('pageerror', (e) => console.error('page error:', e.message));
  await page.goto(`${server.url}/test/harness.html`);
  await page.waitForFunction('window.harnessReady === true', { timeout: 60_000 });
  return page;
}
