// The chat page of `layercake serve`: streams /v1/chat/completions (SSE) on the same origin.
"use strict";

const $ = (id) => document.getElementById(id);
const turns = []; // the conversation: {role: "user" | "assistant", content}
let running = null; // the AbortController of the reply being streamed

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

async function errorText(response) {
  try {
    const body = await response.json();
    return (body.error && body.error.message) || JSON.stringify(body);
  } catch (e) {
    return `${response.status} ${response.statusText}`;
  }
}

async function loadInfo() {
  $("note").textContent = "";
  const r = await fetch("/v1/info", { headers: headers() });
  if (!r.ok) {
    $("note").textContent = r.status === 401 ? "This server needs its API key." : await errorText(r);
    return;
  }
  const info = await r.json();
  $("model").textContent = info.model;
  $("path").textContent = info.path;
  $("max-tokens").max = info.max_context;
  if (!info.chat_template) $("note").textContent = "This model has no chat template.";
}

function addMessage(role, text) {
  const box = document.createElement("div");
  box.className = "msg " + role;
  const label = document.createElement("div");
  label.className = "role";
  label.textContent = role;
  const content = document.createElement("div");
  content.className = "content";
  content.textContent = text;
  box.append(label, content);
  $("messages").append(box);
  box.scrollIntoView({ block: "end" });
  return box;
}

function number(id, parse) {
  const v = $(id).value.trim();
  return v === "" ? undefined : parse(v);
}

function request() {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  return {
    messages: messages.concat(turns),
    stream: true,
    temperature: number("temperature", parseFloat),
    top_p: number("top-p", parseFloat),
    max_tokens: number("max-tokens", (v) => parseInt(v, 10)),
    seed: number("seed", (v) => parseInt(v, 10)),
  };
}

function showFigures(start, first, now, tokens, finish) {
  $("ttft").textContent = first === null ? "–" : `${Math.round(first - start)} ms`;
  const rate = tokens > 1 ? (tokens - 1) / ((now - first) / 1000) : null;
  $("tps").textContent = rate === null ? "–" : `${rate.toFixed(1)} tok/s`;
  $("tokens").textContent = String(tokens);
  $("finish").textContent = finish || "…";
}

// Each SSE event's data (a JSON chunk) in order, from a fetch response body.
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { done, value } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        yield chunk;
      }
    }
  }
}

async function send() {
  const text = $("prompt").value.trim();
  if (!text || running) return;
  $("prompt").value = "";
  turns.push({ role: "user", content: text });
  addMessage("user", text);
  const box = addMessage("assistant", "");
  box.classList.add("streaming");
  const content = box.querySelector(".content");
  running = new AbortController();
  $("send").textContent = "Stop";
  $("send").classList.add("stop");
  const start = performance.now();
  let first = null, tokens = 0, reply = "", finish = null;
  showFigures(start, first, start, tokens, finish);
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(request()), signal: running.signal,
    });
    if (!r.ok) throw new Error(await errorText(r));
    for await (const chunk of events(r)) {
      const choice = chunk.choices[0];
      if (choice.delta.role) continue; // the opening chunk carries no token
      const now = performance.now();
      if (first === null) first = now;
      tokens += 1;
      reply += choice.delta.content || "";
      content.textContent = reply;
      finish = choice.finish_reason;
      showFigures(start, first, now, tokens, finish);
      box.scrollIntoView({ block: "end" });
    }
  } catch (e) {
    if (e.name === "AbortError") {
      finish = "stopped";
    } else {
      box.classList.add("error");
      content.textContent = reply ? `${reply}\n[error: ${e.message}]` : `error: ${e.message}`;
    }
  } finally {
    box.classList.remove("streaming");
    if (reply) turns.push({ role: "assistant", content: reply });
    else turns.pop(); // nothing came back: the question is not part of the conversation
    $("finish").textContent = finish || "–";
    running = null;
    $("send").textContent = "Send";
    $("send").classList.remove("stop");
  }
}

$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  if (running) running.abort();
  else send();
});
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) {
    e.preventDefault();
    if (!running) send();
  }
});
$("clear").addEventListener("click", () => {
  if (running) running.abort();
  turns.length = 0;
  $("messages").replaceChildren();
});
$("api-key").value = localStorage.getItem("layercake-api-key") || "";
$("api-key").addEventListener("change", () => {
  localStorage.setItem("layercake-api-key", $("api-key").value.trim());
  loadInfo();
});
loadInfo();
