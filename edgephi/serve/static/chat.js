// edgephi's chat page: streams answers from the same /v1/chat/completions the OpenAI clients use (SSE over fetch).
// No build step, no dependencies. The conversation lives in this page; the server keeps the KV cache.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { messages: [], controller: null };

function saved(id, key) {
  const el = $(id);
  const stored = localStorage.getItem("edgephi." + key);
  if (stored !== null) el.value = stored;
  el.addEventListener("change", () => localStorage.setItem("edgephi." + key, el.value));
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  $("messages").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

async function errorText(response) {
  try {
    const body = await response.json();
    return (body.error && body.error.message) || response.statusText;
  } catch (e) {
    return response.status + " " + response.statusText;
  }
}

// Split an SSE byte stream into the data of its events ("data: ..." lines, events end with a blank line).
async function* sseData(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end).replace(/^\r?\n\r?\n/, "");
      const data = event.split(/\r?\n/).filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart());
      if (data.length) yield data.join("\n");
    }
  }
}

async function send(text) {
  const system = $("system").value.trim();
  state.messages.push({ role: "user", content: text });
  bubble("user", text);
  const out = bubble("assistant", "");
  out.dataset.state = "streaming";
  const messages = (system ? [{ role: "system", content: system }] : []).concat(state.messages);
  const body = {
    model: $("model").textContent, messages, stream: true, stream_options: { include_usage: true },
    temperature: Number($("temperature").value), max_tokens: Number($("max-tokens").value),
  };
  state.controller = new AbortController();
  $("send").disabled = true;
  $("stop").disabled = false;
  let answer = "", finish = null, usage = null;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: state.controller.signal,
    });
    if (!response.ok) throw new Error(await errorText(response));
    for await (const data of sseData(response)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices || []) {
        if (choice.delta && choice.delta.content) {
          answer += choice.delta.content;
          out.textContent = answer;
          out.scrollIntoView({ block: "end" });
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    }
    out.dataset.state = "done";
  } catch (e) {
    if (e.name === "AbortError") {
      finish = "stopped";
      out.dataset.state = "done";
    } else {
      out.classList.add("error");
      out.dataset.state = "error";
      out.textContent = (answer ? answer + "\n\n" : "") + "error: " + e.message;
    }
  } finally {
    state.controller = null;
    $("send").disabled = false;
    $("stop").disabled = true;
  }
  if (out.dataset.state === "done") {
    state.messages.push({ role: "assistant", content: answer });
    const stats = document.createElement("span");
    stats.className = "stats";
    stats.textContent = [finish && "finish: " + finish,
      usage && `${usage.completion_tokens} tokens, prompt ${usage.prompt_tokens} ` +
               `(${(usage.prompt_tokens_details || {}).cached_tokens || 0} cached)`].filter(Boolean).join(" · ");
    out.appendChild(stats);
  } else {
    state.messages.pop();  // the turn failed: leave it out of the next request
  }
}

async function loadModel() {
  try {
    const response = await fetch("/v1/models", { headers: headers() });
    if (!response.ok) throw new Error(await errorText(response));
    const models = await response.json();
    $("model").textContent = models.data[0].id;
    $("status").textContent = `context ${models.data[0].context_length} tokens`;
  } catch (e) {
    $("status").textContent = "models: " + e.message;
  }
}

saved("system", "system");
saved("temperature", "temperature");
saved("max-tokens", "maxTokens");
saved("api-key", "apiKey");
$("api-key").addEventListener("change", loadModel);
$("form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = $("input").value.trim();
  if (!text || state.controller) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) {
    ev.preventDefault();
    $("form").requestSubmit();
  }
});
$("stop").addEventListener("click", () => state.controller && state.controller.abort());
$("reset").addEventListener("click", () => {
  state.messages = [];
  $("messages").textContent = "";
});
loadModel();
