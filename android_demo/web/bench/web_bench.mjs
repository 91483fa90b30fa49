// Tokens/s of the browser runtime (headless Chromium: WASM, and WebGPU where an adapter exists) beside the Python
// ONNX backend on the same web/model.onnx, on this machine's CPU: random prompt ids, EOS ignored, one warm-up,
// RUNS trials, medians (min-max).  Results: benchmarks/results/web_bench.{jsonl,md}.
// Usage: node bench/web_bench.mjs [--bundle DIR] [--prompt 64] [--gen 64] [--runs 3] [--no-webgpu]
import { execFileSync } from 'node:child_process';
import { appendFileSync, existsSync, mkdtempSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { WEB, launch, openHarness } from '../test/browser.mjs';
import { serve } from '../test/server.mjs';

const { values: a } = parseArgs({ options: { bundle: { type: 'string' }, prompt: { type: 'string', default: '64' },
  gen: { type: 'string', default: '64' }, runs: { type: 'string', default: '3' }, 'no-webgpu': { type: 'boolean' },
  label: { type: 'string' } } });
const [P, G, RUNS] = [Number(a.prompt), Number(a.gen), Number(a.runs)];
const ROOT = path.resolve(WEB, '../..');
const PY = process.env.EDGEPHI_PYTHON || path.join(ROOT, '.venv/bin/python');
const RESULTS = path.join(ROOT, 'benchmarks/results');
let bundle = a.bundle;
if (!bundle) {  // the built-in model, exported with the web format
  bundle = path.join(mkdtempSync(path.join(os.tmpdir(), 'edgephi-bench-')), 'default');
  execFileSync(path.join(ROOT, '.venv/bin/edgephi'), ['export', 'default', '-o', bundle, '--format', 'web', '-q']);
}
const median = (xs) => [...xs].sort((x, y) => x - y)[Math.floor(xs.length / 2)];
const summary = (trials, key) => ({ median: median(trials.map((t) => t[key])),
  min: Math.min(...trials.map((t) => t[key])), max: Math.max(...trials.map((t) => t[key])) });

async function browserRuns(webgpu) {
  const server = await serve({ '/bundles/b/': bundle, '/': WEB });
  const browser = await launch({ webgpu });
  try {
    const page = await openHarness(browser, server);
    return await page.evaluate(async (engine, P, G, RUNS) => {
      if (engine === 'webgpu' && !(await edgephi.webgpuAdapter()).ok) return null;
      const m = await edgephi.loadBundle('/bundles/b/', { engine });
      let seed = 1;
      const ids = Array.from({ length: P }, () => 100 + ((seed = (seed * 48271) % 2147483647) % Math.min(m.webConfig.vocab_size - 100, 29900)));
      const trials = [];
      for (let t = 0; t <= RUNS; t++) {
        m.reset();
        const r = await m.generate(ids, { maxTokens: G + 1, stopIds: [] });
        if (t) trials.push({ prefill_tps: P / r.prefillSeconds, decode_tps: r.tokensPerSecond });
      }
      return { trials, reason: m.engineReason, engine: m.engine };
    }, webgpu ? 'webgpu' : 'wasm', P, G, RUNS);
  } finally {
    await browser.close();
    await server.close();
  }
}

const machine = `${os.cpus()[0].model.trim()}, ${os.cpus().length} cores, load ${os.loadavg()[0].toFixed(1)}`;
const chromium = execFileSync('/usr/bin/chromium', ['--version']).toString().trim();
const model = path.basename(bundle);
const rows = [];
const py = execFileSync(PY, [path.join(WEB, 'bench/py_bench.py'), path.join(bundle, 'web'), String(P), String(G),
  String(RUNS), String(os.cpus().length)], { env: { ...process.env, PYTHONPATH: ROOT } })
  .toString().trim().split('\n').map((l) => JSON.parse(l));
rows.push({ subject: 'Python ONNX backend (onnxruntime CPU)', detail: `${os.cpus().length} threads`, trials: py });
for (const webgpu of a['no-webgpu'] ? [false] : [false, true]) {
  const r = await browserRuns(webgpu);
  if (!r) { rows.push({ subject: 'browser WebGPU', detail: 'skipped: no adapter', trials: [] }); continue; }
  rows.push({ subject: `browser ${r.engine === 'webgpu' ? 'WebGPU' : 'WASM'} (onnxruntime-web)`, detail: r.reason,
    trials: r.trials });
}
const stamp = new Date().toISOString();
const cmd = `node bench/web_bench.mjs ${process.argv.slice(2).join(' ')}`.trim();
for (const row of rows) {
  const line = { time: stamp, model: a.label || model, machine, chromium, command: cmd, prompt: P, gen: G, runs: RUNS,
    subject: row.subject, detail: row.detail, trials: row.trials,
    prefill_tps: row.trials.length ? summary(row.trials, 'prefill_tps') : null,
    decode_tps: row.trials.length ? summary(row.trials, 'decode_tps') : null };
  appendFileSync(path.join(RESULTS, 'web_bench.jsonl'), JSON.stringify(line) + '\n');
  console.log(JSON.stringify({ subject: row.subject, prefill: line.prefill_tps, decode: line.decode_tps }));
}
const f = (s) => (s ? `${s.median.toFixed(1)} (${s.min.toFixed(1)}–${s.max.toFixed(1)})` : '—');
const md = [`# Browser runtime vs the Python ONNX backend: ${a.label || model}`, '',
  `${stamp} · this machine's CPU (${machine}) · ${chromium} headless · \`${cmd}\` · prompt ${P} random ids, ` +
  `${G} greedy tokens (EOS ignored), one warm-up, median of ${RUNS} (min–max)`, '',
  '| subject | engine detail | prefill tok/s | decode tok/s |', '|---|---|---|---|',
  ...rows.map((r) => {
    const s = r.trials.length ? [summary(r.trials, 'prefill_tps'), summary(r.trials, 'decode_tps')] : [null, null];
    return `| ${r.subject} | ${r.detail.replace(/\|/g, '/')} | ${f(s[0])} | ${f(s[1])} |`;
  }), ''].join('\n');
writeFileSync(path.join(RESULTS, `web_bench.md`), md + '\n', { flag: existsSync(path.join(RESULTS, 'web_bench.md')) && a.label ? 'a' : 'w' });
console.log(md);
