// The KV cache, as edgephi's Python ONNX backend keeps it (edgephi/backends/onnx.py): per layer a key and a value
// buffer (1, n_kv, capacity, head_dim) float32 fed as past_key_values.i; GroupQueryAttention writes the new
// positions after the valid ones and takes the valid length from the attention mask, so rewinding only lowers
// the count.
//
// WebGPU (GpuKV): one preallocated GPU buffer of n_ctx positions per tensor, bound as past AND as the
// pre-allocated present output; the kernel sees one buffer and updates it in place (no copy per step).
// WASM (WasmKV): onnxruntime-web copies CPU tensors into WebAssembly memory for each run and returns outputs as
// new arrays, so one buffer cannot be both; the cache is a fixed-capacity buffer passed as past and taken back
// from present, its capacity grown in steps of GROW positions (up to n_ctx) so a step copies what is in use,
// not the whole n_ctx.
const GROW = 256;

function names(io, layers) {
  const out = [];
  for (let i = 0; i < layers; i++) {
    for (const kind of ['key', 'value']) {
      out.push([io[`past_${kind}`].replace('%d', i), io[`present_${kind}`].replace('%d', i)]);
    }
  }
  return out;
}

export class GpuKV {
  constructor(ort, device, cfg, nCtx) {
    this.nCtx = nCtx;
    this.pairs = names(cfg.io, cfg.num_hidden_layers);
    const dims = [1, cfg.num_key_value_heads, nCtx, cfg.head_dim];
    const size = 4 * dims.reduce((a, b) => a * b, 1);
    /* global GPUBufferUsage */
    this.buffers = this.pairs.map(() => device.createBuffer({
      size, usage: GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST }));
    this.tensors = this.buffers.map((gpuBuffer) => ort.Tensor.fromGpuBuffer(gpuBuffer, { dataType: 'float32', dims }));
  }

  bind(feeds, fetches) {
    this.pairs.forEach(([past, present], k) => { feeds[past] = this.tensors[k]; fetches[present] = this.tensors[k]; });
  }

  update() {}

  dispose() {
    this.buffers.forEach((b) => b.destroy());
    this.buffers = [];
  }
}

export class WasmKV {
  constructor(ort, cfg, nCtx) {
    this.ort = ort;
    this.nCtx = nCtx;
    this.heads = cfg.num_key_value_heads;
    this.hd = cfg.head_dim;
    this.pairs = names(cfg.io, cfg.num_hidden_layers);
    this.cap = 0;
    this.arrays = this.pairs.map(() => new Float32Array(0));
  }

  // room for `total` positions; the first `valid` of each head are kept
  ensure(total, valid) {
    if (total <= this.cap) return;
    const cap = Math.min(this.nCtx, Math.ceil(total / GROW) * GROW);
    const { heads, hd } = this;
    this.arrays = this.arrays.map((old) => {
      const a = new Float32Array(heads * cap * hd);
      for (let h = 0; h < heads && valid > 0; h++) {  // (n_kv, cap, hd): each head's rows move to its new start
        a.set(old.subarray(h * this.cap * hd, (h * this.cap + valid) * hd), h * cap * hd);
      }
      return a;
    });
    this.cap = cap;
  }

  bind(feeds, fetches, total, valid) {
    this.ensure(total, valid);
    const dims = [1, this.heads, this.cap, this.hd];
    this.pairs.forEach(([past, present], k) => {
      feeds[past] = new this.ort.Tensor('float32', this.arrays[k], dims);
      fetches[present] = null;
    });
  }

  update(results) {
    this.pairs.forEach(([, present], k) => {
      const t = results[present];
      if (t.dims[2] !== this.cap) {
        throw new Error(`${present}: ${t.dims[2]} positions back for a ${this.cap}-position cache`);
      }
      this.arrays[k] = t.data;
    });
  }

  dispose() { this.arrays = []; }
}
