// Which onnxruntime-web execution provider runs the model, and why: WebGPU when the browser has an adapter and a
// session builds on it, else WebAssembly (SIMD; threads when the page is cross-origin isolated).
import { ort } from './deps.js';

const SIMD_PROBE = new Uint8Array([0, 97, 115, 109, 1, 0, 0, 0, 1, 5, 1, 96, 0, 1, 123, 3, 2, 1, 0, 10, 10, 1, 8, 0,
  65, 0, 253, 15, 253, 98, 11]);  // a module returning i8x16.splat(0).popcnt: valid only with SIMD

export function wasmFeatures() {
  const simd = typeof WebAssembly === 'object' && WebAssembly.validate(SIMD_PROBE);
  const isolated = globalThis.crossOriginIsolated === true;
  const cores = globalThis.navigator?.hardwareConcurrency || 1;
  const threads = isolated ? Math.max(1, Math.min(4, cores)) : 1;
  const why = isolated ? `${threads} thread${threads > 1 ? 's' : ''} (cross-origin isolated, ${cores} cores)`
    : '1 thread: the page is not cross-origin isolated (serve it with Cross-Origin-Opener-Policy: same-origin ' +
      'and Cross-Origin-Embedder-Policy: require-corp for threads)';
  return { simd, threads, isolated, why };
}

// -> {ok: true, adapter, description, f16} | {ok: false, reason}
export async function webgpuAdapter() {
  if (!globalThis.navigator?.gpu) {
    return { ok: false, reason: globalThis.isSecureContext === false
      ? 'WebGPU needs a secure context (https:// or http://localhost)' : 'this browser has no WebGPU (navigator.gpu)' };
  }
  let adapter = null;
  try {
    adapter = await navigator.gpu.requestAdapter({ powerPreference: 'high-performance' });
  } catch (e) {
    return { ok: false, reason: `navigator.gpu.requestAdapter() failed: ${e.message}` };
  }
  if (!adapter) return { ok: false, reason: 'navigator.gpu.requestAdapter() found no GPU adapter' };
  const info = adapter.info || {};
  const name = [info.vendor, info.architecture, info.description].filter(Boolean).join(' ') || 'unnamed adapter';
  const fallback = info.isFallbackAdapter ? ', software fallback adapter' : '';
  const f16 = adapter.features.has('shader-f16');
  return { ok: true, adapter, f16, description: `${name}${fallback}${f16 ? ', shader-f16' : ', no shader-f16'}` };
}

function sessionOptions(ep, bundle) {
  return {
    executionProviders: [ep],
    externalData: bundle.pieces.map((p) => ({ path: p.path, data: p.data })),
    graphOptimizationLevel: 'all',
    freeDimensionOverrides: { batch_size: 1 },
    logSeverityLevel: 3,
  };
}

// engine: 'auto' (WebGPU, else WASM), 'webgpu' or 'wasm'.  -> {session, engine, reason, device}
export async function createSession(bundle, { engine = 'auto' } = {}) {
  if (!['auto', 'webgpu', 'wasm'].includes(engine)) {
    throw new RangeError(`engine=${engine}: allowed auto, webgpu, wasm`);
  }
  ort.env.logLevel = 'error';
  const wasm = wasmFeatures();
  if (!wasm.simd) throw new Error('this browser\'s WebAssembly has no SIMD, which onnxruntime-web needs');
  ort.env.wasm.numThreads = wasm.threads;
  ort.env.wasm.proxy = false;
  let why = 'WebGPU not tried (engine=wasm)';
  if (engine !== 'wasm') {
    const gpu = await webgpuAdapter();
    if (gpu.ok) {
      try {
        ort.env.webgpu.adapter = gpu.adapter;
        const session = await ort.InferenceSession.create(bundle.graph, sessionOptions('webgpu', bundle));
        return { session, engine: 'webgpu', reason: `WebGPU on ${gpu.description}`, device: ort.env.webgpu.device };
      } catch (e) {
        why = `WebGPU session failed (${e.message})`;
      }
    } else {
      why = `no WebGPU: ${gpu.reason}`;
    }
    if (engine === 'webgpu') throw new Error(why);
  }
  const session = await ort.InferenceSession.create(bundle.graph, sessionOptions('wasm', bundle));
  return { session, engine: 'wasm', reason: `WASM, SIMD, ${wasm.why}; ${why}`, device: null };
}
