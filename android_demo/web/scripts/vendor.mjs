// Copies the few files the page and the runtime load from node_modules into vendor/ (served beside src/), so that
// the runtime is plain ES modules with relative imports: no bundler, no import map, nothing from a CDN.
import { copyFileSync, mkdirSync, rmSync, existsSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const FILES = {
  'onnxruntime-web': ['dist/ort.webgpu.min.mjs', 'dist/ort-wasm-simd-threaded.asyncify.mjs',
    'dist/ort-wasm-simd-threaded.asyncify.wasm', 'LICENSE'],
  tokenizers: ['@huggingface/tokenizers/dist/tokenizers.min.mjs', '@huggingface/tokenizers/LICENSE'],
  jinja: ['@huggingface/jinja/dist/index.js', '@huggingface/jinja/LICENSE'],
};
const out = path.join(root, 'vendor');
rmSync(out, { recursive: true, force: true });
for (const [dir, files] of Object.entries(FILES)) {
  mkdirSync(path.join(out, dir), { recursive: true });
  for (const f of files) {
    const src = path.join(root, 'node_modules', dir === 'onnxruntime-web' ? 'onnxruntime-web' : '', f);
    if (!existsSync(src)) {
      if (f.endsWith('LICENSE')) continue;
      throw new Error(`${src}: missing; run npm ci in ${root}`);
    }
    copyFileSync(src, path.join(out, dir, path.basename(f)));
  }
}
console.log(`vendor: ${Object.values(FILES).flat().length} files into ${path.relative(process.cwd(), out) || out}`);
