// edgephi's browser runtime: an edgephi bundle's web model (`edgephi export MODEL --format web`) in onnxruntime-web.
//
//   import { loadBundle } from './src/edgephi.js';
//   const model = await loadBundle('bundles/default/', { onProgress: ({ loaded, total }) => ... });
//   model.engine, model.engineReason                        // 'webgpu' | 'wasm', and why
//   const r = await model.chat([{ role: 'user', content: 'Hi' }], { onToken: ({ text }) => show(text) });
//   r.text, r.ids (without the stop id), r.stopReason ('stop' | 'length' | 'context' | 'abort'), r.tokensPerSecond
//
// Greedy by default (temperature 0); temperature, topK, topP, minP, repetitionPenalty and seed sample.  The stop
// ids are manifest.json's; chat() keeps the KV cache between turns and evaluates only what changed.
import { BundleLoadError, ContextFullError } from './errors.js';
import { fetchBundle } from './bundle.js';
import { createSession, wasmFeatures, webgpuAdapter } from './engine.js';
import { makeSampler } from './sampling.js';
import { WebSession } from './session.js';
import { Tokenizer } from './tokenizer.js';

export { BundleLoadError, ContextFullError, Tokenizer, makeSampler, wasmFeatures, webgpuAdapter };

export class Model {
  constructor(bundle, tokenizer, session, { engine, reason }) {
    this.url = bundle.base.href;
    this.manifest = bundle.manifest;
    this.webConfig = bundle.webConfig;
    this.tokenizer = tokenizer;
    this.session = session;
    this.engine = engine;
    this.engineReason = reason;
    this.nCtx = session.nCtx;
    this.stopIds = new Set(bundle.manifest.stop_ids || []);
    this.cached = [];  // the ids whose keys and values are in the cache, in order
    this.busy = false;
  }

  get name() { return this.manifest.spec?.name || this.manifest.source?.model || this.manifest.spec?.model_type; }

  reset() {
    this.session.rewind(0);
    this.cached = [];
  }

  // the conversation's prompt ids (chat template) and a generation from them
  async chat(messages, options = {}) {
    return this.generate(this.tokenizer.applyChatTemplate(messages, { addGenerationPrompt: true }), options);
  }

  // prompt: token ids, or text encoded as is (no template, no BOS).
  // options: maxTokens (128), temperature, topK, topP, minP, repetitionPenalty, seed, stopIds (manifest's),
  // onToken({id, text, index}) after every token, signal (AbortSignal).
  async generate(prompt, options = {}) {
    if (this.busy) throw new Error('a generation is already running on this model');
    this.busy = true;
    try {
      return await this._generate(typeof prompt === 'string' ? this.tokenizer.encode(prompt) : prompt, options);
    } finally {
      this.busy = false;
    }
  }

  async _generate(ids, { maxTokens = 128, onToken = null, signal = null, stopIds = null, ...sampling } = {}) {
    if (!ids.length) throw new RangeError('generate: the prompt is empty');
    if (!(Number.isInteger(maxTokens) && maxTokens > 0)) throw new RangeError(`maxTokens=${maxTokens}: must be >= 1`);
    const choose = makeSampler(sampling);
    const stops = stopIds ? new Set(stopIds) : this.stopIds;
    // keep the cached prefix this prompt shares; at least one token is evaluated for its logits
    let k = 0;
    while (k < this.cached.length && k < ids.length && this.cached[k] === ids[k]) k++;
    if (k === ids.length) k--;
    if (ids.length > this.nCtx) throw new ContextFullError(ids.length - k, this.nCtx, k);
    this.session.rewind(k);
    this.cached.length = k;
    const t0 = performance.now();
    let logits = await this.session.forward(ids.slice(k));
    this.cached.push(...ids.slice(k));
    const t1 = performance.now();
    const detok = this.tokenizer.detokenizer({ skipSpecialTokens: true });
    const out = [];
    let stopReason = 'length';
    let stopId = null;
    for (;;) {
      const id = choose(logits, ids.concat(out));
      if (stops.has(id)) { stopReason = 'stop'; stopId = id; break; }
      out.push(id);
      const text = detok.add(id);  // every id, whether or not anyone listens
      onToken?.({ id, text, index: out.length - 1 });
      if (out.length >= maxTokens) break;
      if (signal?.aborted) { stopReason = 'abort'; break; }
      if (this.session.nPast >= this.nCtx) { stopReason = 'context'; break; }
      logits = await this.session.forward([id]);
      this.cached.push(id);
    }
    const rest = detok.flush();
    if (rest) onToken?.({ id: null, text: rest, index: out.length });
    const t2 = performance.now();
    const decoded = out.length + (stopId === null ? 0 : 1) - 1;  // tokens sampled after a decode step
    return {
      ids: out, text: detok.text, stopReason, stopId,
      message: stopReason === 'context' ? `context full: the ${this.nCtx}-token cache is used up; start a new ` +
        'conversation (reset)' : null,
      promptTokens: ids.length, evaluatedPromptTokens: ids.length - k,
      prefillSeconds: (t1 - t0) / 1000, decodeSeconds: (t2 - t1) / 1000,
      tokensPerSecond: decoded > 0 ? decoded / ((t2 - t1) / 1000) : null,
    };
  }

  async dispose() { await this.session.dispose(); }
}

// url: the bundle folder (manifest.json inside).  options: engine ('auto' | 'webgpu' | 'wasm'), nCtx (cache
// length, at most web_config.json's n_ctx: the largest that fits a tab), onProgress({loaded, total}), signal.
export async function loadBundle(url, { engine = 'auto', nCtx = null, onProgress = null, signal = null,
  prefillChunk = null } = {}) {
  const bundle = await fetchBundle(url, { onProgress, signal });
  const cfg = bundle.webConfig;
  if (nCtx != null && !(Number.isInteger(nCtx) && nCtx > 0 && nCtx <= cfg.context_length)) {
    throw new RangeError(`nCtx=${nCtx}: allowed 1..${cfg.context_length} (the model's context)`);
  }
  let tokenizer;
  try {
    tokenizer = new Tokenizer(bundle.tokenizer.json, bundle.tokenizer.config, bundle.tokenizer.template);
  } catch (e) {
    throw new BundleLoadError(`${bundle.base.href}tokenizer.json: the tokenizer does not load (${e.message})`,
      { url: bundle.base.href, cause: e });
  }
  let created;
  try {
    created = await createSession(bundle, { engine });
  } catch (e) {
    throw new BundleLoadError(`${bundle.base.href}${bundle.entry.entry}: onnxruntime-web cannot load the model ` +
      `(${e.message})`, { url: bundle.base.href, cause: e });
  }
  bundle.pieces = null;  // the session holds the weights now
  const session = new WebSession(created.session, cfg, { ...created, nCtx: nCtx ?? cfg.n_ctx, prefillChunk });
  return new Model(bundle, tokenizer, session, created);
}
