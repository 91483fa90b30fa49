// One model's forward passes over the KV cache (kv.js): edgephi's Session contract (forward, rewind, n_past).
import { ort } from './deps.js';
import { ContextFullError } from './errors.js';
import { GpuKV, WasmKV } from './kv.js';

// onnxruntime-web 1.31's WebGPU GroupQueryAttention gives wrong logits for a forward of 32 or more new tokens
// (every Phi family here, on SwiftShader: 8, 16 and 20 tokens match the CPU, 32 and 40 do not); fed in chunks of
// 16 a prompt of any length matches, past the sliding window and LongRoPE's switch too.  WASM takes
// web_config.json's prefill_chunk.
export const WEBGPU_PREFILL_CHUNK = 16;

export class WebSession {
  constructor(session, cfg, { engine, device, nCtx, prefillChunk }) {
    this.session = session;
    this.cfg = cfg;
    this.io = cfg.io;
    this.engine = engine;
    this.nCtx = nCtx;
    this.vocab = cfg.vocab_size;
    this.chunk = prefillChunk || (engine === 'webgpu' ? WEBGPU_PREFILL_CHUNK : cfg.prefill_chunk || 256);
    this.kv = engine === 'webgpu' ? new GpuKV(ort, device, cfg, nCtx) : new WasmKV(ort, cfg, nCtx);
    this.nPast = 0;
    this.nEvaluated = 0;
  }

  // ids: token ids to append; -> Float32Array logits (V) after the last one
  async forward(ids) {
    if (!ids.length) throw new RangeError('forward: no token ids');
    if (this.nPast + ids.length > this.nCtx) throw new ContextFullError(ids.length, this.nCtx, this.nPast);
    for (const id of ids) {
      if (!Number.isInteger(id) || id < 0 || id >= this.vocab) {
        throw new RangeError(`token id ${id}: allowed 0..${this.vocab - 1}`);
      }
    }
    let logits = null;
    for (let s = 0; s < ids.length; s += this.chunk) {  // long prompts in chunks (the memory budget's assumption)
      const part = ids.slice(s, s + this.chunk);
      const t = part.length;
      const total = this.nPast + t;
      const feeds = {
        [this.io.input_ids]: new ort.Tensor('int64', BigInt64Array.from(part, BigInt), [1, t]),
        // only its length matters: GroupQueryAttention takes positions and valid lengths from it (batch 1)
        [this.io.attention_mask]: new ort.Tensor('int64', new BigInt64Array(total).fill(1n), [1, total]),
      };
      const fetches = { [this.io.logits]: null };
      this.kv.bind(feeds, fetches, total, this.nPast);
      const out = await this.session.run(feeds, fetches);
      this.kv.update(out);
      const all = out[this.io.logits];
      logits = all.data.slice((t - 1) * this.vocab, t * this.vocab);  // (1, T, V): the last row
      all.dispose?.();
      this.nPast = total;
      this.nEvaluated += t;
    }
    return logits;
  }

  rewind(n) {
    if (!(Number.isInteger(n) && n >= 0 && n <= this.nPast)) {
      throw new RangeError(`rewind: n=${n}; allowed 0..${this.nPast} (the tokens cached)`);
    }
    this.nPast = n;  // positions >= n are masked until the next forward overwrites them
  }

  async dispose() {
    this.kv.dispose();
    await this.session.release();
  }
}
