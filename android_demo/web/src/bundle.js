// Fetching a bundle's files: manifest.json, the web format's web_config.json, graph and external data pieces, and
// the tokenizer files, each checked against the size manifest.json recorded at export.
import { BundleLoadError } from './errors.js';

export const FORMAT = 'web';

export function baseUrl(url) {
  const u = new URL(url, globalThis.location?.href);
  if (!u.pathname.endsWith('/')) u.pathname += '/';
  return u;
}

async function get(base, rel, { as = 'json', expect = null, onBytes = null, signal } = {}) {
  const url = new URL(rel, base).href;
  let res;
  try {
    res = await fetch(url, { signal });
  } catch (e) {
    throw new BundleLoadError(`cannot fetch ${url}: ${e.message} (is the server running and the page allowed ` +
      'to read it?)', { url, cause: e });
  }
  if (!res.ok) {
    const hint = rel === 'manifest.json' ? ` — is ${base.href} an edgephi bundle? (\`edgephi export MODEL --format ` +
      'web -o DIR\` makes one)' : '';
    throw new BundleLoadError(`${url}: HTTP ${res.status} ${res.statusText}${hint}`, { url });
  }
  if (as === 'json' || as === 'text') {
    const text = await res.text();
    if (as === 'text') return text;
    try {
      return JSON.parse(text);
    } catch (e) {
      throw new BundleLoadError(`${url}: not valid JSON (${e.message})`, { url, cause: e });
    }
  }
  // binary, read in chunks for progress, into one buffer of the recorded size
  const total = expect ?? Number(res.headers.get('content-length') || 0);
  const reader = res.body.getReader();
  let buf = new Uint8Array(total || 1 << 20);
  let n = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    if (n + value.length > buf.length) {
      if (expect != null) {
        throw new BundleLoadError(`${url}: more than the ${expect} bytes manifest.json recorded: the file was ` +
          'replaced after export; export the bundle again', { url });
      }
      const bigger = new Uint8Array(Math.max(buf.length * 2, n + value.length));
      bigger.set(buf.subarray(0, n));
      buf = bigger;
    }
    buf.set(value, n);
    n += value.length;
    onBytes?.(value.length);
  }
  if (expect != null && n !== expect) {
    throw new BundleLoadError(`${url}: ${n} bytes, manifest.json recorded ${expect}: the file is truncated or was ` +
      'replaced after export; copy or export the bundle again', { url });
  }
  return n === buf.length ? buf : buf.subarray(0, n);
}

// -> {base, manifest, entry, webConfig, folder, tokenizer: {json, config, template}, graph, pieces: [{path, data}]}
export async function fetchBundle(url, { onProgress = null, signal } = {}) {
  const base = baseUrl(url);
  const manifest = await get(base, 'manifest.json', { signal });
  const entry = manifest?.formats?.[FORMAT];
  if (!entry) {
    const have = Object.keys(manifest?.formats || {}).join(', ') || 'none';
    throw new BundleLoadError(`${base.href}manifest.json: the bundle has no ${FORMAT} model (it has: ${have}); ` +
      `export one with \`edgephi export MODEL --format ${FORMAT}\``, { url: base.href });
  }
  const folder = entry.entry.split('/').slice(0, -1).join('/') + '/';
  const webConfig = await get(base, entry.extra?.web_config || folder + 'web_config.json', { signal });
  const sizes = entry.sizes || {};
  const files = [entry.entry, ...webConfig.external_data.map((p) => folder + p.path)];
  const total = files.reduce((s, f) => s + (sizes[f] || 0), 0);
  let loaded = 0;
  const onBytes = (n) => { loaded += n; onProgress?.({ loaded, total }); };
  const tokFiles = manifest.tokenizer_files || [];
  if (!tokFiles.includes('tokenizer.json')) {
    throw new BundleLoadError(`${base.href}: the bundle has no tokenizer.json (it has ${tokFiles.join(', ')}); ` +
      'the browser runtime reads tokenizer.json', { url: base.href });
  }
  const [json, config, template] = await Promise.all([
    get(base, 'tokenizer.json', { signal }),
    tokFiles.includes('tokenizer_config.json') ? get(base, 'tokenizer_config.json', { signal }) : {},
    tokFiles.includes('chat_template.jinja') ? get(base, 'chat_template.jinja', { as: 'text', signal }) : null,
  ]);
  const graph = await get(base, entry.entry, { as: 'bytes', expect: sizes[entry.entry] ?? null, onBytes, signal });
  const pieces = [];
  for (const p of webConfig.external_data) {  // one at a time: a browser holds a few GB, not twice that
    const data = await get(base, folder + p.path, { as: 'bytes', expect: sizes[folder + p.path] ?? p.bytes, onBytes,
      signal });
    pieces.push({ path: p.path, data });
  }
  return { base, manifest, entry, webConfig, folder, tokenizer: { json, config, template }, graph, pieces };
}
