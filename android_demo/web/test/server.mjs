// A small static file server for the tests and the bench: 127.0.0.1 only, a random free port, GET/HEAD only.
// mounts: {urlPrefix: directory}; isolate: send COOP/COEP so that the page is cross-origin isolated (WASM threads).
import { createServer } from 'node:http';
import { createReadStream, promises as fs } from 'node:fs';
import path from 'node:path';

const TYPES = {
  '.html': 'text/html; charset=utf-8', '.js': 'text/javascript', '.mjs': 'text/javascript', '.css': 'text/css',
  '.json': 'application/json', '.wasm': 'application/wasm', '.onnx': 'application/octet-stream',
  '.jinja': 'text/plain; charset=utf-8', '.svg': 'image/svg+xml', '.webmanifest': 'application/manifest+json',
};

export async function serve(mounts, { isolate = true, port = 0 } = {}) {
  const table = Object.entries(mounts).sort((a, b) => b[0].length - a[0].length);
  const server = createServer(async (req, res) => {
    const send = (code, text) => { res.writeHead(code, { 'content-type': 'text/plain' }); res.end(text); };
    if (req.method !== 'GET' && req.method !== 'HEAD') return send(405, 'GET only');
    const url = new URL(req.url, 'http://127.0.0.1');
    let rel = decodeURIComponent(url.pathname);
    const hit = table.find(([prefix]) => rel === prefix.replace(/\/$/, '') || rel.startsWith(prefix));
    if (!hit) return send(404, 'not found');
    const [prefix, dir] = hit;
    rel = rel.slice(prefix.length);
    const file = path.resolve(dir, '.' + path.posix.normalize('/' + rel));
    if (!file.startsWith(path.resolve(dir))) return send(403, 'outside the served folder');
    let st;
    try {
      st = await fs.stat(file);
      if (st.isDirectory()) { st = await fs.stat(path.join(file, 'index.html')); return serveFile(path.join(file, 'index.html'), st); }
    } catch { return send(404, `not found: ${url.pathname}`); }
    return serveFile(file, st);

    function serveFile(f, stat) {
      const headers = { 'content-type': TYPES[path.extname(f)] || 'application/octet-stream',
        'content-length': stat.size, 'cache-control': 'no-cache' };
      if (isolate) Object.assign(headers, { 'cross-origin-opener-policy': 'same-origin',
        'cross-origin-embedder-policy': 'require-corp', 'cross-origin-resource-policy': 'same-origin' });
      res.writeHead(200, headers);
      if (req.method === 'HEAD') return res.end();
      createReadStream(f).pipe(res);
    }
  });
  await new Promise((resolve) => server.listen(port, '127.0.0.1', resolve));
  return { url: `http://127.0.0.1:${server.address().port}`, close: () => new Promise((r) => { server.closeAllConnections?.(); server.close(r); }) };
}
