// The three libraries the runtime uses, from vendor/ (scripts/vendor.mjs copies them out of node_modules).
export * as ort from '../vendor/onnxruntime-web/ort.webgpu.min.mjs';
export { Tokenizer as HFTokenizer } from '../vendor/tokenizers/tokenizers.min.mjs';
export { Template } from '../vendor/jinja/index.js';
