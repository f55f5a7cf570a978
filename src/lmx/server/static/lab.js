// lmx Lab: a chat page over the server's OpenAI-compatible API. Works offline: its two libraries
// (marked, DOMPurify) are vendored in /static/vendor/.
// Conversations and settings live in this browser's localStorage.
"use strict";

const KEYS = { chats: "lmx.lab.chats", current: "lmx.lab.current", settings: "lmx.lab.settings", apiKey: "lmx.lab.apiKey" };
const $ = (id) => document.getElementById(id);

const ui = {
  messages: $("messages"), empty: $("empty"), input: $("input"), send: $("send"), stop: $("stop"),
  form: $("composer"), newChat: $("new-chat"), chatList: $("chat-list"), stats: $("stats"),
  modelName: $("model-name"), modelInfo: $("model-info"), system: $("system-prompt"),
  temperature: $("temperature"), temperatureValue: $("temperature-value"),
  topP: $("top-p"), topPValue: $("top-p-value"), topK: $("top-k"), maxTokens: $("max-tokens"), seed: $("seed"),
  sidebarToggle: $("sidebar-toggle"), backdrop: $("backdrop"),
  modelSelect: $("model-select"), jsonMode: $("json-mode"), banner: $("banner"),
  attach: $("attach"), imageInput: $("image-input"), attachments: $("attachments"),
  keyDialog: $("key-dialog"), keyForm: $("key-form"), keyInput: $("key-input"), keyError: $("key-error"),
};

let model = null;          // the model id requests name: the picker's choice among /v1/models
let models = [];           // /v1/models entries: the base model, then adapters when served
let preferredModel = "";   // the choice kept in settings, applied once the list has loaded
let controller = null;     // AbortController of the reply being streamed
let pendingImages = [];    // data: URLs of the images attached to the next message
let chats = load(KEYS.chats, {});
let currentId = localStorage.getItem(KEYS.current);

function load(key, fallback) {
  try { return JSON.parse(localStorage.getItem(key)) ?? fallback; } catch { return fallback; }
}
function save() {
  // Empty chats are not worth keeping.
  const kept = Object.fromEntries(Object.entries(chats).filter(([, c]) => c.messages.length > 0));
  try {
    localStorage.setItem(KEYS.chats, JSON.stringify(kept));
  } catch {
    // Images can fill localStorage's few megabytes: keep the chats without them.
    const bare = JSON.stringify(kept, (k, v) => (k === "images" ? undefined : v));
    try { localStorage.setItem(KEYS.chats, bare); } catch { /* storage full: this tab still holds the chats */ }
  }
  if (currentId) localStorage.setItem(KEYS.current, currentId);
}
function newId() { return Date.now().toString(36) + Math.random().toString(36).slice(2, 7); }
function current() {
  if (!currentId || !chats[currentId]) {
    currentId = newId();
    chats[currentId] = { id: currentId, title: "New chat", messages: [], updated: Date.now() };
  }
  return chats[currentId];
}

// ---------------------------------------------------------------- markdown (marked + DOMPurify)
// Model output is untrusted: raw HTML in it is shown as text, and the rendered HTML goes through
// DOMPurify, which drops event handlers and javascript: links. Both libraries are vendored in
// /static/vendor/ (see its README), so the page still works offline.
function escapeHtml(s) {
  return s.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}
function codeBlock(lang, code) {
  return `<div class="codeblock"><div class="codehead"><span>${escapeHtml(lang || "code")}</span>` +
    `<button class="copy" type="button">Copy</button></div><pre><code>${escapeHtml(code.replace(/\n$/, ""))}</code></pre></div>`;
}
const markdown = new marked.Marked({
  gfm: true, breaks: true,
  renderer: {
    // A fence still open while streaming is a code block up to the end.
    code: (token) => codeBlock((token.lang || "").split(/\s/)[0], token.text),
    html: (token) => (token.block ? `<p>${escapeHtml(token.text)}</p>` : escapeHtml(token.text)),
  },
});
DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A" && node.hasAttribute("href")) {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer");
  }
});
function renderMarkdown(src) {
  if (!src.trim()) return "";
  return DOMPurify.sanitize(markdown.parse(src), { ADD_ATTR: ["target"] });
}

// ---------------------------------------------------------------- rendering
function messageElement(msg, index, last) {
  const row = document.createElement("div");
  row.className = `msg ${msg.error ? "error" : msg.role}`;
  row.dataset.index = index;
  const bubble = document.createElement("div");
  bubble.className = "bubble";
  if (msg.role === "assistant") {
    bubble.innerHTML = '<div class="role">assistant</div><div class="content"></div><div class="meta"></div>';
  } else {
    bubble.innerHTML = '<div class="content"></div>';
  }
  // Copy any message, edit and resend a user turn, regenerate the last answer.
  const actions = document.createElement("div");
  actions.className = "actions";
  const buttons = [["copy", "Copy"]];
  if (msg.role === "user") buttons.push(["edit", "Edit"]);
  if (msg.role === "assistant" && last) buttons.push(["regenerate", "Regenerate"]);
  for (const [action, label] of buttons) {
    const button = document.createElement("button");
    button.type = "button";
    button.dataset.action = action;
    button.textContent = label;
    actions.appendChild(button);
  }
  bubble.appendChild(actions);
  row.appendChild(bubble);
  updateMessage(row, msg);
  return row;
}
function updateMessage(row, msg) {
  const content = row.querySelector(".content");
  if (msg.error) {
    row.className = "msg error";
    content.textContent = msg.content ? msg.content + "\n\n" : "";
    content.textContent += "Error: " + msg.error;
  } else if (msg.role === "assistant") {
    content.innerHTML = renderMarkdown(msg.content);
  } else {
    content.textContent = msg.content;
    row.querySelector(".images")?.remove();
    if (msg.images?.length) content.before(imageStrip(msg.images));
  }
  const meta = row.querySelector(".meta");
  if (meta) {
    const m = msg.meta || {};
    const parts = [];
    if (m.tokens) parts.push(`${m.tokens} tokens`);
    if (m.tps) parts.push(`${m.tps.toFixed(1)} tok/s`);
    meta.innerHTML = parts.map(escapeHtml).join(" · ") + (m.stopped ? ' <span class="stopped">· stopped</span>' : "");
  }
}
function imageStrip(urls, removable = false) {
  // Only data:image/ URLs the user attached here are shown (never a remote address).
  const strip = document.createElement("div");
  strip.className = "images";
  urls.filter((u) => typeof u === "string" && u.startsWith("data:image/")).forEach((url, i) => {
    const figure = document.createElement("figure");
    const img = document.createElement("img");
    img.className = "thumb";
    img.alt = "attached image";
    img.src = url;
    figure.appendChild(img);
    if (removable) {
      const remove = document.createElement("button");
      remove.type = "button";
      remove.className = "remove";
      remove.title = "Remove image";
      remove.textContent = "×";
      remove.dataset.index = i;
      figure.appendChild(remove);
    }
    strip.appendChild(figure);
  });
  return strip;
}
function renderAttachments() {
  ui.attachments.innerHTML = "";
  ui.attachments.hidden = pendingImages.length === 0;
  if (pendingImages.length) ui.attachments.appendChild(imageStrip(pendingImages, true));
}
// A large photo is sent smaller: the request body is bounded (--max-body-bytes, 4 MiB by default,
// base64 included) and the model sees 896 x 896 pixels anyway.
const MAX_IMAGE_BYTES = 2 * 2 ** 20, MAX_IMAGE_SIDE = 1792;
function shrink(url) {
  return new Promise((resolve) => {
    const img = new Image();
    img.onload = () => {
      const scale = Math.min(1, MAX_IMAGE_SIDE / Math.max(img.naturalWidth, img.naturalHeight));
      const canvas = document.createElement("canvas");
      canvas.width = Math.max(1, Math.round(img.naturalWidth * scale));
      canvas.height = Math.max(1, Math.round(img.naturalHeight * scale));
      const ctx = canvas.getContext("2d");
      ctx.fillStyle = "#fff";  // transparency over white, as the server's decoder does
      ctx.fillRect(0, 0, canvas.width, canvas.height);
      ctx.drawImage(img, 0, 0, canvas.width, canvas.height);
      resolve(canvas.toDataURL("image/jpeg", 0.9));
    };
    img.onerror = () => resolve(url);  // not decodable here: the server says what is wrong with it
    img.src = url;
  });
}
function attachFiles(files) {
  for (const file of files) {
    if (!file.type.startsWith("image/")) continue;
    const reader = new FileReader();
    reader.onload = async () => {
      pendingImages.push(file.size > MAX_IMAGE_BYTES ? await shrink(reader.result) : reader.result);
      renderAttachments();
    };
    reader.readAsDataURL(file);
  }
}
function renderChat() {
  const chat = current();
  ui.messages.querySelectorAll(".msg").forEach((el) => el.remove());
  ui.empty.hidden = chat.messages.length > 0;
  chat.messages.forEach((msg, i) => ui.messages.appendChild(messageElement(msg, i, i === chat.messages.length - 1)));
  ui.messages.scrollTop = ui.messages.scrollHeight;
  const lastReply = [...chat.messages].reverse().find((m) => m.role === "assistant" && !m.error);
  showStats(lastReply || {});
  renderChatList();
}
function renderChatList() {
  const items = Object.values(chats).filter((c) => c.messages.length > 0).sort((a, b) => b.updated - a.updated);
  ui.chatList.innerHTML = "";
  if (items.length === 0) {
    ui.chatList.innerHTML = '<li class="none">No chats yet</li>';
    return;
  }
  for (const chat of items) {
    const li = document.createElement("li");
    li.className = chat.id === currentId ? "active" : "";
    li.dataset.id = chat.id;
    li.innerHTML = `<span class="title"></span><button class="delete" type="button" title="Delete chat">×</button>`;
    li.querySelector(".title").textContent = chat.title;
    ui.chatList.appendChild(li);
  }
}
function setBusy(busy) {
  document.body.dataset.state = busy ? "streaming" : "idle";
  ui.send.hidden = busy;
  ui.stop.hidden = !busy;
}
function autoGrow() {
  ui.input.style.height = "auto";
  ui.input.style.height = Math.min(ui.input.scrollHeight, 200) + "px";
}

// ---------------------------------------------------------------- settings
const defaults = { system: "", temperature: 0, topP: 1, topK: 0, maxTokens: 512, seed: "", model: "", jsonMode: false };
function readSettings() {
  return {
    system: ui.system.value, temperature: Number(ui.temperature.value), topP: Number(ui.topP.value),
    topK: Number(ui.topK.value) || 0, maxTokens: Number(ui.maxTokens.value) || 512, seed: ui.seed.value,
    model: ui.modelSelect.value || preferredModel, jsonMode: ui.jsonMode.checked,
  };
}
function applySettings(s) {
  ui.system.value = s.system; ui.temperature.value = s.temperature; ui.topP.value = s.topP;
  ui.topK.value = s.topK; ui.maxTokens.value = s.maxTokens; ui.seed.value = s.seed;
  ui.jsonMode.checked = Boolean(s.jsonMode); preferredModel = s.model || "";
  ui.temperatureValue.textContent = s.temperature; ui.topPValue.textContent = s.topP;
}
function settingsChanged() {
  const s = readSettings();
  ui.temperatureValue.textContent = s.temperature;
  ui.topPValue.textContent = s.topP;
  localStorage.setItem(KEYS.settings, JSON.stringify(s));
}

// ---------------------------------------------------------------- talking to the server
function requestBody(chat) {
  const s = readSettings();
  const history = chat.messages.filter((m) => !m.error && (m.role === "user" || m.content))
    .map((m) => ({ role: m.role, content: m.images?.length ? contentParts(m) : m.content }));
  const body = {
    model, messages: s.system.trim() ? [{ role: "system", content: s.system }, ...history] : history,
    stream: true, stream_options: { include_usage: true },
    temperature: s.temperature, top_p: s.topP, max_tokens: s.maxTokens,
  };
  if (s.topK > 0) body.top_k = s.topK;
  if (s.jsonMode) body.response_format = { type: "json_object" };  // JSON mode: the reply is one JSON object
  if (s.seed !== "") body.seed = Number(s.seed);
  return body;
}

function contentParts(m) {
  // OpenAI content parts: the images (data: URLs), then the text
  const parts = m.images.map((url) => ({ type: "image_url", image_url: { url } }));
  if (m.content) parts.push({ type: "text", text: m.content });
  return parts;
}
function send(text, images = []) {
  const chat = current();
  if (chat.messages.length === 0) chat.title = text.slice(0, 48) || "Image";
  const msg = { role: "user", content: text };
  if (images.length) msg.images = images;
  chat.messages.push(msg);
  return generate(chat);
}
function regenerate() {
  const chat = current();
  if (controller || chat.messages.at(-1)?.role !== "assistant") return;
  chat.messages.pop();
  generate(chat);
}
function resend(index, text) {
  // Editing a user turn drops it and everything after it, then sends the new text in its place.
  const chat = current();
  const images = chat.messages[index]?.images || [];
  if (controller || !(text || images.length) || chat.messages[index]?.role !== "user") return;
  chat.messages.splice(index);
  send(text, images);
}
function startEdit(row) {
  const msg = current().messages[Number(row.dataset.index)];
  const bubble = row.querySelector(".bubble");
  bubble.classList.add("editing");
  bubble.innerHTML = '<textarea class="edit-input" rows="3"></textarea><div class="actions">' +
    '<button type="button" data-action="cancel">Cancel</button><button type="button" data-action="resend" class="primary">Send</button></div>';
  const area = bubble.querySelector("textarea");
  area.value = msg.content;
  area.focus();
}

async function generate(chat) {
  const body = requestBody(chat);
  const msg = { role: "assistant", content: "", meta: {} };
  chat.messages.push(msg);
  chat.updated = Date.now();
  save();
  renderChat();
  const row = ui.messages.lastElementChild;
  row.classList.add("streaming");
  controller = new AbortController();
  setBusy(true);

  let chunks = 0, tFirst = 0, pending = false;
  const redraw = () => {
    if (pending) return;
    pending = true;
    requestAnimationFrame(() => {
      pending = false;
      updateMessage(row, msg);
      ui.messages.scrollTop = ui.messages.scrollHeight;
    });
  };
  const handle = (data) => {
    const event = JSON.parse(data);
    if (event.error) throw new Error(event.error.message || JSON.stringify(event.error));
    for (const choice of event.choices || []) {
      const piece = choice.delta?.content || "";
      chunks += 1;
      if (!tFirst) tFirst = performance.now();
      msg.content += piece;
    }
    if (event.usage) msg.meta.tokens = event.usage.completion_tokens;
    if (event.metrics?.decode_tokens_per_s) msg.meta.tps = event.metrics.decode_tokens_per_s;
    redraw();
  };
  try {
    const res = await api("/v1/chat/completions", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body), signal: controller.signal,
    });
    if (!res.ok) {
      const err = (await res.json().catch(() => null))?.error;
      const where = err?.param ? ` (${err.param})` : "";
      throw new Error(`${res.status}${where}: ${err?.message || res.statusText}`);
    }
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of block.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data !== "[DONE]") handle(data);
        }
      }
    }
  } catch (e) {
    if (e.name === "AbortError") msg.meta.stopped = true;
    else msg.error = e.message;
  } finally {
    controller = null;
    if (!msg.meta.tokens) msg.meta.tokens = chunks;
    if (!msg.meta.tps && chunks > 1 && tFirst) msg.meta.tps = (chunks - 1) / ((performance.now() - tFirst) / 1000);
    row.classList.remove("streaming");
    chat.updated = Date.now();
    save();
    setBusy(false);
    if (chat === chats[currentId]) renderChat();  // the finished reply gets its actions (Regenerate)
    showStats(msg);
    ui.input.focus();
  }
}

function showStats(msg) {
  const m = msg.meta || {};
  ui.stats.textContent = m.tps ? `last reply: ${m.tokens} tokens · ${m.tps.toFixed(1)} tok/s` : "";
}

// ---------------------------------------------------------------- API key
// A server started with --api-key serves this page openly but guards the API: the page asks for
// the key once per browser tab, keeps it in sessionStorage and sends it as a Bearer token.
function api(path, init = {}) {
  const key = sessionStorage.getItem(KEYS.apiKey);
  const headers = { ...(init.headers || {}) };
  if (key) headers.Authorization = `Bearer ${key}`;
  return fetch(path, { ...init, headers }).then((res) => {
    if (res.status === 401) askForKey(key ? "The server refused this key." : "");
    return res;
  });
}
function askForKey(problem) {
  sessionStorage.removeItem(KEYS.apiKey);
  ui.keyError.textContent = problem;
  ui.keyError.hidden = !problem;
  if (!ui.keyDialog.open) ui.keyDialog.showModal();
  ui.keyInput.focus();
}
ui.keyDialog.addEventListener("cancel", (e) => e.preventDefault());  // the API cannot be used without it
ui.keyForm.addEventListener("submit", (e) => {
  e.preventDefault();
  const key = ui.keyInput.value.trim();
  if (!key) return;
  sessionStorage.setItem(KEYS.apiKey, key);
  ui.keyInput.value = "";
  ui.keyDialog.close();
  loadModel();
});

async function loadModel() {
  try {
    const res = await api("/v1/models");
    const data = await res.json();
    if (!res.ok) throw new Error(data?.error?.message || res.statusText);
    models = data.data;
    ui.modelSelect.innerHTML = "";
    for (const entry of models) {
      const option = document.createElement("option");
      option.value = option.textContent = entry.id;
      ui.modelSelect.appendChild(option);
    }
    ui.modelSelect.value = models.some((m) => m.id === preferredModel) ? preferredModel : models[0].id;
    showModel();
  } catch (e) {
    ui.modelName.textContent = "model unavailable";
    ui.modelInfo.innerHTML = `<dt>error</dt><dd>${escapeHtml(e.message)}</dd>`;
  }
}
function templateNote(name, info) {
  // One line when the model has no chat template of its own (lmx's ModelInfo.chat_template).
  if (info.chat_template === "architecture") {
    return `${name} has no chat template of its own (a base model?): lmx applies the ${info.model_type} template, ` +
      "so replies may be continuations, not answers.";
  }
  if (info.chat_template === "none") return `${name} has no chat template: chat needs one (use /v1/completions).`;
  return "";
}
function showModel() {
  model = ui.modelSelect.value;
  ui.modelName.textContent = model;
  const card = models.find((m) => m.id === model) || models[0];
  const info = card.lmx || models[0].lmx || {};  // an adapter's entry may leave the base model's facts out
  const note = templateNote(model, info);
  ui.banner.textContent = note;
  ui.banner.hidden = !note;
  const rows = [
    ["type", info.model_type], ["parameters", info.num_parameters && fmtCount(info.num_parameters)],
    ["layers", info.num_layers], ["context", info.context_length && `${info.context_length} tokens`],
    ["dtype", info.dtype], ["quantization", info.quantization ? `${info.quantization.bits}-bit` : info.gguf_file_type ? `GGUF ${info.gguf_file_type}` : "none"],
    ["compute", info.compute_dtype],
    ["device", info.device], ["weights", info.weights_bytes && fmtBytes(info.weights_bytes)],
  ].filter(([, v]) => v !== undefined && v !== null && v !== "");
  ui.modelInfo.innerHTML = rows.map(([k, v]) => `<dt>${escapeHtml(k)}</dt><dd>${escapeHtml(String(v))}</dd>`).join("");
}
function fmtCount(n) {
  for (const [unit, scale] of [["B", 1e9], ["M", 1e6], ["K", 1e3]]) if (n >= scale) return (n / scale).toFixed(n >= 10 * scale ? 0 : 1) + unit;
  return String(n);
}
function fmtBytes(n) {
  for (const [unit, scale] of [["GiB", 2 ** 30], ["MiB", 2 ** 20], ["KiB", 2 ** 10]]) if (n >= scale) return (n / scale).toFixed(1) + " " + unit;
  return n + " B";
}

// ---------------------------------------------------------------- events
ui.form.addEventListener("submit", (e) => {
  e.preventDefault();
  const text = ui.input.value.trim();
  if (!(text || pendingImages.length) || controller || !model) return;
  const images = pendingImages;
  pendingImages = [];
  renderAttachments();
  ui.input.value = "";
  autoGrow();
  send(text, images);
});
ui.attach.addEventListener("click", () => ui.imageInput.click());
ui.imageInput.addEventListener("change", () => {
  attachFiles(ui.imageInput.files);
  ui.imageInput.value = "";  // the same file can be attached again
});
ui.attachments.addEventListener("click", (e) => {
  if (!e.target.classList.contains("remove")) return;
  pendingImages.splice(Number(e.target.dataset.index), 1);
  renderAttachments();
});
ui.input.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    ui.form.requestSubmit();
  }
});
ui.input.addEventListener("input", autoGrow);
ui.stop.addEventListener("click", () => controller?.abort());
ui.newChat.addEventListener("click", () => {
  controller?.abort();
  currentId = null;
  current();
  save();
  renderChat();
  ui.stats.textContent = "";
  setSidebar(false);
  ui.input.focus();
});
ui.chatList.addEventListener("click", (e) => {
  const li = e.target.closest("li[data-id]");
  if (!li || controller) return;
  if (e.target.classList.contains("delete")) {
    delete chats[li.dataset.id];
    if (li.dataset.id === currentId) currentId = null;
  } else {
    currentId = li.dataset.id;
    setSidebar(false);
  }
  save();
  renderChat();
});
function flash(button, text) {
  const before = button.textContent;
  button.textContent = text;
  setTimeout(() => { button.textContent = before; }, 1200);
}
ui.messages.addEventListener("click", (e) => {
  const action = e.target.closest("button[data-action]");
  const row = e.target.closest(".msg");
  if (action && row && !controller) {
    const index = Number(row.dataset.index);
    const msg = current().messages[index];
    if (action.dataset.action === "copy") {
      navigator.clipboard?.writeText(msg.content).then(() => flash(action, "Copied"));
    } else if (action.dataset.action === "edit") {
      startEdit(row);
    } else if (action.dataset.action === "cancel") {
      renderChat();
    } else if (action.dataset.action === "resend") {
      resend(index, row.querySelector(".edit-input").value.trim());
    } else if (action.dataset.action === "regenerate") {
      regenerate();
    }
    return;
  }
  if (!e.target.classList.contains("copy")) return;
  const code = e.target.closest(".codeblock").querySelector("code").textContent;
  navigator.clipboard?.writeText(code).then(() => flash(e.target, "Copied"));
});
ui.messages.addEventListener("keydown", (e) => {
  if (e.target.classList.contains("edit-input") && e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    e.target.closest(".bubble").querySelector('[data-action="resend"]').click();
  }
});
// Phone width: the sidebar is a drawer opened by the topbar's toggle.
function setSidebar(open) {
  document.body.classList.toggle("sidebar-open", open);
  ui.sidebarToggle.setAttribute("aria-expanded", String(open));
}
ui.sidebarToggle.addEventListener("click", () => setSidebar(!document.body.classList.contains("sidebar-open")));
ui.backdrop.addEventListener("click", () => setSidebar(false));
for (const el of [ui.system, ui.temperature, ui.topP, ui.topK, ui.maxTokens, ui.seed, ui.jsonMode]) el.addEventListener("input", settingsChanged);
ui.modelSelect.addEventListener("change", () => { showModel(); settingsChanged(); });

applySettings({ ...defaults, ...load(KEYS.settings, {}) });
setBusy(false);
renderChat();
loadModel();
