// Serve the chat page with a bundle: node scripts/serve.mjs BUNDLE_DIR [PORT] -> http://127.0.0.1:PORT/?bundle=bundle/
// (127.0.0.1 only; cross-origin isolated, so WASM runs threads)
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { serve } from '../test/server.mjs';

const [bundle, port = '8080'] = process.argv.slice(2);
if (!bundle) {
  console.error('usage: node scripts/serve.mjs BUNDLE_DIR [PORT]');
  process.exit(2);
}
const web = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const srv = await serve({ '/bundle/': path.resolve(bundle), '/': web }, { port: Number(port) });
console.log(`${srv.url}/?bundle=bundle/`);
