// The chat page: one conversation with a bundle's web model in this tab (src/edgephi.js); after the first load the
// service worker (sw.js) serves the page, the runtime and the bundle from its cache, so it works offline.
import { loadBundle } from './src/edgephi.js';

const $ = (id) => document.getElementById(id);
const ui = { status: $('status'), progress: $('progress'), log: $('log'), input: $('input'), send: $('send'),
  stop: $('stop'), reset: $('reset'), bundle: $('bundle'), engine: $('engine'), load: $('load') };
const state = { model: null, messages: [], abort: null, busy: false };
window.edgephiPage = state;  // for tests and the console

function status(text, error = false) {
  ui.status.textContent = text;
  ui.status.classList.toggle('error', error);
  ui.status.dataset.state = error ? 'error' : state.model && !state.busy ? 'ready' : 'busy';
}

function enable() {
  const ready = !!state.model && !state.busy;
  ui.input.disabled = ui.send.disabled = ui.reset.disabled = !ready;
  ui.stop.disabled = !state.busy || !state.abort;
  ui.load.disabled = state.busy;
}

function bubble(cls, text = '') {
  const el = document.createElement('div');
  el.className = `msg ${cls}`;
  el.textContent = text;
  ui.log.append(el);
  ui.log.scrollTop = ui.log.scrollHeight;
  return el;
}

async function load() {
  const url = ui.bundle.value.trim();
  if (!url) return status('Enter the URL of a bundle folder (one with manifest.json).', true);
  state.busy = true;
  enable();
  await state.model?.dispose();
  state.model = null;
  ui.progress.hidden = false;
  ui.progress.value = 0;
  status(`Loading ${url} …`);
  try {
    state.model = await loadBundle(url, { engine: ui.engine.value, onProgress: ({ loaded, total }) => {
      if (total) ui.progress.value = loaded / total;
      status(`Loading ${url} … ${(loaded / 1e6).toFixed(1)} of ${(total / 1e6).toFixed(1)} MB`);
    } });
    state.messages = [];
    ui.log.replaceChildren();
    state.busy = false;
    state.line = `${state.model.name} · ${state.model.engine.toUpperCase()} · ${state.model.engineReason} · ` +
      `context ${state.model.nCtx} tokens`;
    status(state.line);
    ui.input.focus();
  } catch (e) {
    state.busy = false;
    status(`Could not load the model: ${e.message}`, true);
  } finally {
    ui.progress.hidden = true;
    enable();
  }
}

function settings() {
  const num = (id) => Number($(id).value);
  return { temperature: num('temperature'), topP: num('topP'), topK: num('topK'), seed: num('seed'),
    repetitionPenalty: num('repetitionPenalty'), maxTokens: num('maxTokens') };
}

async function send(text) {
  state.messages.push({ role: 'user', content: text });
  bubble('user', text);
  const out = bubble('assistant');
  state.busy = true;
  state.abort = new AbortController();
  enable();
  status('Answering …');
  try {
    const r = await state.model.chat(state.messages, { ...settings(), signal: state.abort.signal,
      onToken: ({ text: piece }) => { out.textContent += piece; ui.log.scrollTop = ui.log.scrollHeight; } });
    state.messages.push({ role: 'assistant', content: r.text });
    const meta = document.createElement('div');
    meta.className = 'meta';
    const speed = r.tokensPerSecond ? `, ${r.tokensPerSecond.toFixed(1)} tok/s` : '';
    meta.textContent = `${r.ids.length} tokens${speed}, prompt ${r.evaluatedPromptTokens} of ${r.promptTokens} ` +
      `evaluated, ${r.stopReason}`;
    out.after(meta);
    out.dataset.done = r.stopReason;
    state.busy = false;
    status(r.message || state.line, r.stopReason === 'context');
  } catch (e) {
    state.messages.pop();
    out.dataset.done = 'error';
    state.busy = false;
    status(e.message, true);
  } finally {
    state.abort = null;
    enable();
  }
}

$('form').addEventListener('submit', (ev) => {
  ev.preventDefault();
  const text = ui.input.value.trim();
  if (!text || !state.model || state.busy) return;
  ui.input.value = '';
  send(text);
});
ui.input.addEventListener('keydown', (ev) => {
  if (ev.key === 'Enter' && !ev.shiftKey) { ev.preventDefault(); $('form').requestSubmit(); }
});
ui.stop.addEventListener('click', () => state.abort?.abort());
ui.reset.addEventListener('click', () => {
  state.model.reset();
  state.messages = [];
  ui.log.replaceChildren();
  status(state.line);
});
ui.load.addEventListener('click', load);

if ('serviceWorker' in navigator) {
  navigator.serviceWorker.register('sw.js').catch((e) => console.warn('offline cache unavailable:', e.message));
}
const params = new URLSearchParams(location.search);
ui.bundle.value = params.get('bundle') || localStorage.getItem('edgephi.bundle') || 'bundle/';
if (params.get('engine')) ui.engine.value = params.get('engine');
ui.bundle.addEventListener('change', () => localStorage.setItem('edgephi.bundle', ui.bundle.value));
if (params.has('bundle') || params.has('autoload')) load();
