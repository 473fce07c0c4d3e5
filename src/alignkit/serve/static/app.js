// alignkit web page: a streaming chat, a comparison view that collects human judgments (free, or in judge mode a
// fixed queue of the pipeline's samples), and demonstrations (a person's ideal answer to a prompt).
// No framework, no build step, nothing loaded from elsewhere (the page works offline).
"use strict";

const $ = (id) => document.getElementById(id);
const PENDING_KEY = "alignkit.pendingJudgments";
// what waits in this browser until the server has stored it (ids make a resend harmless)
const QUEUES = {
  judgments: { key: PENDING_KEY, url: "/api/feedback", refusedKey: "alignkit.refusedJudgments", status: "feedback-status", noun: "judgment(s)" },
  demonstrations: { key: "alignkit.pendingDemonstrations", url: "/api/demonstrations", refusedKey: "alignkit.refusedDemonstrations",
                    status: "demo-status", noun: "demonstration(s)" },
};
const SETTINGS = {
  "set-api-key": "alignkit.apiKey", "set-annotator": "alignkit.annotator", "set-system": "alignkit.system",
  "set-temperature": "alignkit.temperature", "set-top-p": "alignkit.topP", "set-max-tokens": "alignkit.maxTokens",
};

let modelId = null;
let chatMessages = [];       // the conversation shown in the chat view
let chatAbort = null;        // aborting the fetch closes the stream; the server frees the row
let comparison = null;       // {prompt, responses, sampling, model} being judged
let prompts = [], promptIndex = -1;
let judgeMode = false;       // the server serves a fixed queue of items to judge (the pipeline's `judge: human`)
let judgeItem = null;        // the queue item shown
const judgedHere = new Set(); // keys of items judged in this page, perhaps not stored yet

// ------------------------------------------------------------------------------------------ settings

function loadSettings() {
  for (const [id, key] of Object.entries(SETTINGS)) {
    const value = localStorage.getItem(key);
    if (value !== null) $(id).value = value;
    $(id).addEventListener("change", () => localStorage.setItem(key, $(id).value));
  }
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("set-api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function sampling() {
  return {
    temperature: parseFloat($("set-temperature").value),
    top_p: parseFloat($("set-top-p").value),
    max_tokens: parseInt($("set-max-tokens").value, 10),
  };
}

function withSystem(messages) {
  const system = $("set-system").value.trim();
  return system ? [{ role: "system", content: system }, ...messages] : messages;
}

async function errorText(response) {
  try { return (await response.json()).error.message; } catch (e) { return response.status + " " + response.statusText; }
}

async function connect() {
  try {
    const response = await fetch("/api/info", { headers: headers() });
    if (!response.ok) throw new Error(await errorText(response));
    const info = await response.json();
    modelId = info.model;
    $("model-name").textContent = info.model + " · context " + info.context_length + (info.feedback ? "" : " · feedback off");
    loadJudge(-1);
  } catch (e) {
    $("model-name").textContent = "not connected: " + e.message;
    setTimeout(connect, 2000);
  }
}

// ------------------------------------------------------------------------------------------ chat

function addBubble(role, text) {
  const div = document.createElement("div");
  div.className = "message " + role;
  const label = document.createElement("span");
  label.className = "role";
  label.textContent = role;
  const body = document.createElement("span");
  body.className = "content";
  body.textContent = text;
  div.append(label, body);
  $("chat-log").append(div);
  $("chat-log").scrollTop = $("chat-log").scrollHeight;
  return div;
}

// POST a streaming chat completion; onDelta(text) per content delta. Resolves with the finish reason.
async function streamChat(messages, onDelta, signal) {
  const response = await fetch("/v1/chat/completions", {
    method: "POST", headers: headers(), signal,
    body: JSON.stringify({ model: modelId, messages, stream: true, ...sampling() }),
  });
  if (!response.ok) throw new Error(await errorText(response));
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "", reason = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return reason;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return reason;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        for (const choice of chunk.choices) {
          if (choice.delta && choice.delta.content) onDelta(choice.delta.content);
          if (choice.finish_reason) reason = choice.finish_reason;
        }
      }
    }
  }
}

async function sendChat(event) {
  event.preventDefault();
  const text = $("chat-input").value.trim();
  if (!text || chatAbort) return;
  if (!modelId) { $("chat-status").textContent = "not connected yet"; return; }
  $("chat-input").value = "";
  chatMessages.push({ role: "user", content: text });
  addBubble("user", text);
  const bubble = addBubble("assistant", "");
  const content = bubble.querySelector(".content");
  let chunks = 0;
  chatAbort = new AbortController();
  $("chat-send").disabled = true; $("chat-stop").disabled = false;
  $("chat-status").textContent = "generating…";
  try {
    const reason = await streamChat(withSystem(chatMessages), (delta) => {
      content.textContent += delta;
      bubble.dataset.chunks = String(++chunks);  // how many pieces arrived (the tests check it streamed)
      $("chat-log").scrollTop = $("chat-log").scrollHeight;
    }, chatAbort.signal);
    chatMessages.push({ role: "assistant", content: content.textContent });
    bubble.dataset.done = "true";
    $("chat-status").textContent = reason === "length" ? "stopped at max tokens" : "";
  } catch (e) {
    if (e.name === "AbortError") {
      if (content.textContent) chatMessages.push({ role: "assistant", content: content.textContent });
      else chatMessages.pop();
      $("chat-status").textContent = "stopped";
    } else {
      chatMessages.pop();  // the turn failed: let the user send it again
      bubble.classList.add("error");
      content.textContent = "error: " + e.message;
      $("chat-status").textContent = "";
    }
    bubble.dataset.done = "true";
  } finally {
    chatAbort = null;
    $("chat-send").disabled = false; $("chat-stop").disabled = true;
  }
}

// ------------------------------------------------------------------------------------------ comparison

function parsePrompts(name, text) {
  const pick = (item) => typeof item === "string" ? item : (item && (item.prompt || item.instruction || item.text || "")) || "";
  if (name.endsWith(".jsonl")) return text.split("\n").filter((l) => l.trim()).map((l) => pick(JSON.parse(l)));
  if (name.endsWith(".json")) return JSON.parse(text).map(pick);
  return text.split("\n");
}

async function loadPromptFile() {
  const file = $("prompt-file").files[0];
  if (!file) return;
  try {
    prompts = parsePrompts(file.name.toLowerCase(), await file.text()).filter((p) => typeof p === "string" && p.trim());
  } catch (e) {
    $("compare-status").textContent = "could not read " + file.name + ": " + e.message;
    return;
  }
  showPrompt(prompts.length ? 0 : -1);
}

function showPrompt(index) {
  promptIndex = index;
  $("prompt-position").textContent = prompts.length ? (index + 1) + " / " + prompts.length : "no prompts in the file";
  if (index >= 0) $("compare-prompt").value = prompts[index];
  $("prompt-prev").disabled = index <= 0;
  $("prompt-next").disabled = index < 0 || index >= prompts.length - 1;
}

function clearComparison() {
  comparison = null;
  $("compare-responses").replaceChildren();
  $("pair-choice").classList.add("hidden");
  $("rank-choice").classList.add("hidden");
}

async function sample() {
  const text = $("compare-prompt").value.trim();
  if (!text) { $("compare-status").textContent = "type a prompt or load a file first"; return; }
  const k = parseInt($("compare-k").value, 10);
  const prompt = withSystem([{ role: "user", content: text }]);
  const settings = { ...sampling(), n: k };
  clearComparison();
  $("compare-sample").disabled = true;
  $("compare-status").textContent = "sampling " + k + " responses…";
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify({ model: modelId, messages: prompt, ...settings }),
    });
    if (!response.ok) throw new Error(await errorText(response));
    const result = await response.json();
    const responses = result.choices.sort((a, b) => a.index - b.index).map((c) => c.message.content);
    comparison = { prompt, responses, sampling: settings, model: result.model };
    renderComparison();
    $("compare-status").textContent = "";
  } catch (e) {
    $("compare-status").textContent = "error: " + e.message;
  } finally {
    $("compare-sample").disabled = false;
  }
}

function renderComparison() {
  const k = comparison.responses.length;
  comparison.responses.forEach((text, i) => {
    const card = document.createElement("div");
    card.className = "card";
    card.dataset.index = String(i);
    const title = document.createElement("h3");
    title.textContent = String.fromCharCode(65 + i);
    const body = document.createElement("div");
    body.className = "text";
    body.textContent = text || "(empty)";
    card.append(title, body);
    if (k > 2) {
      const select = document.createElement("select");
      select.className = "rank";
      for (let r = 1; r <= k; r++) select.append(new Option("rank " + r, String(r), false, r === i + 1));
      card.append(select);
    }
    $("compare-responses").append(card);
  });
  $(k === 2 ? "pair-choice" : "rank-choice").classList.remove("hidden");
}

function newId() {
  if (window.crypto && crypto.randomUUID) return crypto.randomUUID();
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function judge(ranks) {
  if (!comparison) return;
  const judged = comparison;
  const judgment = {
    id: newId(), annotator: $("set-annotator").value.trim() || "anonymous", model: judged.model,
    prompt: judged.prompt, responses: judged.responses, ranks, sampling: judged.sampling,
  };
  enqueue("judgments", judgment);  // stored in this browser first: nothing is lost if the server is down or restarting
  clearComparison();
  if (judgeMode) {
    judgedHere.add(judged.key);
    flush().then(() => loadJudge(judged.index));
    return;
  }
  if (promptIndex >= 0 && promptIndex < prompts.length - 1) showPrompt(promptIndex + 1);
  flush();
}

function readPending(name) {
  try { return JSON.parse(localStorage.getItem(QUEUES[name].key) || "[]"); } catch (e) { return []; }
}

function enqueue(name, item) {
  localStorage.setItem(QUEUES[name].key, JSON.stringify([...readPending(name), item]));
}

const flushing = {}, retryTimers = {};

function flush() {
  return Promise.all(Object.keys(QUEUES).map(flushQueue));
}

// Send every pending item of a queue; each leaves it only once the server has stored it (ids make retries safe).
async function flushQueue(name) {
  const queue = QUEUES[name];
  if (flushing[name]) return;
  flushing[name] = true;
  clearTimeout(retryTimers[name]);
  let total = null, problem = null;
  const drop = (id) => localStorage.setItem(queue.key, JSON.stringify(readPending(name).filter((item) => item.id !== id)));
  try {
    for (const item of readPending(name)) {
      let response;
      try {
        response = await fetch(queue.url, { method: "POST", headers: headers(), body: JSON.stringify(item) });
      } catch (e) {
        problem = "the server is unreachable"; break;
      }
      if (response.ok) {
        total = (await response.json()).total;
        drop(item.id);
      } else if (response.status === 400 || response.status === 422) {
        problem = "the server refused one: " + await errorText(response);  // kept for a look, not resent forever
        drop(item.id);
        localStorage.setItem(queue.refusedKey, JSON.stringify([...JSON.parse(localStorage.getItem(queue.refusedKey) || "[]"), item]));
      } else {
        problem = await errorText(response); break;
      }
    }
  } finally {
    flushing[name] = false;
  }
  const left = readPending(name).length;
  const status = $(queue.status);
  status.dataset.pending = String(left);
  if (left) {
    status.textContent = left + " " + queue.noun + " waiting to be sent (" + problem + "); retrying…";
    retryTimers[name] = setTimeout(() => flushQueue(name), 1000);
  } else if (problem) {
    status.textContent = problem;
  } else if (total !== null) {
    status.textContent = "saved ✓ — " + total + " " + queue.noun + " stored";
    status.dataset.total = String(total);
  }
}

// ------------------------------------------------------------------------------------------ judge mode

// Ask the server for progress and the next unjudged item after queue index `after`; show it.
async function loadJudge(after) {
  let status;
  try {
    const response = await fetch("/api/judge?after=" + after, { headers: headers() });
    if (!response.ok) return;
    status = await response.json();
  } catch (e) {
    if (judgeMode) $("judge-progress").textContent = "the server is unreachable (the pipeline may have all it needs)";
    return;
  }
  if (!status.active) return;
  if (!judgeMode) {
    judgeMode = true;
    $("free-compare").classList.add("hidden");
    $("judge-panel").classList.remove("hidden");
    showView("compare-view");
  }
  const progress = $("judge-progress");
  progress.textContent = status.judged + " of " + status.needed + " comparisons" + (status.item ? "" : " — all done, thank you");
  progress.dataset.judged = String(status.judged);
  const item = status.item;
  if (item && judgedHere.has(item.key)) {  // judged here, still on its way to the store: ask again shortly
    setTimeout(() => loadJudge(after), 500);
    return;
  }
  clearComparison();
  judgeItem = item;
  $("judge-prompt").textContent = item ? item.prompt[item.prompt.length - 1].content : "";
  if (!item) return;
  comparison = { prompt: item.prompt, responses: item.responses, sampling: { judge_queue: true }, model: modelId, index: item.index, key: item.key };
  renderComparison();
}

// ------------------------------------------------------------------------------------------ demonstrations

function startDemonstration() {
  const prompt = judgeMode ? (judgeItem ? judgeItem.prompt[judgeItem.prompt.length - 1].content : "") : $("compare-prompt").value.trim();
  if (prompt) $("demo-prompt").value = prompt;
  showView("demo-view");
  $("demo-answer").focus();
}

function submitDemonstration() {
  const prompt = $("demo-prompt").value.trim(), answer = $("demo-answer").value.trim();
  if (!prompt || !answer) { $("demo-status").textContent = "write a prompt and an answer first"; return; }
  enqueue("demonstrations", {
    id: newId(), annotator: $("set-annotator").value.trim() || "anonymous", model: modelId,
    prompt: withSystem([{ role: "user", content: prompt }]), completion: answer,
  });
  $("demo-answer").value = "";
  flushQueue("demonstrations");
}

// ------------------------------------------------------------------------------------------ wiring

function showView(id) {
  for (const view of document.querySelectorAll(".view")) view.classList.toggle("hidden", view.id !== id);
  for (const tab of document.querySelectorAll(".tab")) tab.classList.toggle("active", tab.dataset.view === id);
}

document.addEventListener("DOMContentLoaded", () => {
  loadSettings();
  $("settings-form").addEventListener("submit", (e) => e.preventDefault());  // Enter in a field must not reload the page
  for (const tab of document.querySelectorAll(".tab")) tab.addEventListener("click", () => showView(tab.dataset.view));
  $("chat-form").addEventListener("submit", sendChat);
  $("chat-input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("chat-form").requestSubmit(); }
  });
  $("chat-stop").addEventListener("click", () => chatAbort && chatAbort.abort());
  $("chat-reset").addEventListener("click", () => { chatMessages = []; $("chat-log").replaceChildren(); });
  $("prompt-file").addEventListener("change", loadPromptFile);
  $("prompt-prev").addEventListener("click", () => showPrompt(promptIndex - 1));
  $("prompt-next").addEventListener("click", () => showPrompt(promptIndex + 1));
  $("compare-sample").addEventListener("click", sample);
  for (const button of document.querySelectorAll("#pair-choice .choice")) {
    button.addEventListener("click", () => {
      const c = button.dataset.choice;
      judge(c === "tie" ? [1, 1] : c === "0" ? [1, 2] : [2, 1]);
    });
  }
  $("submit-ranking").addEventListener("click", () => {
    judge(Array.from(document.querySelectorAll("#compare-responses select.rank"), (s) => parseInt(s.value, 10)));
  });
  $("judge-skip").addEventListener("click", () => loadJudge(judgeItem ? judgeItem.index : -1));
  $("judge-demo").addEventListener("click", startDemonstration);
  $("demo-submit").addEventListener("click", submitDemonstration);
  $("set-api-key").addEventListener("change", () => { connect(); flush(); });
  connect();
  flush();  // judgments and demonstrations left from an earlier visit
});
