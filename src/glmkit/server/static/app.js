// glmkit web console: plain JavaScript, no build step, nothing loaded from the network.
// Markdown (marked), sanitizing (DOMPurify), code highlighting (highlight.js) and math (KaTeX,
// MathML output so no fonts are needed) are vendored under /static/vendor/.
const $ = (id) => document.getElementById(id);
const SLIDERS = ["temperature", "top_p", "top_k", "repetition_penalty", "max_new_tokens"];
const MODE_NAMES = { chat: "Chat", tool: "Tool", code: "Code interpreter" };
let current = null, controller = null, defaults = {}, config = {}, mode = "chat";

// -- HTTP -----------------------------------------------------------------------------------
function authHeaders() {
  const key = localStorage.getItem("glmkit-key");
  return key ? { Authorization: "Bearer " + key } : {};
}
function headers() { return Object.assign({ "Content-Type": "application/json" }, authHeaders()); }

async function api(path, options = {}) {
  const r = await fetch(path, Object.assign({ headers: headers() }, options));
  if (r.status === 401) { await login(); return api(path, options); }
  if (!r.ok) throw new Error((await r.json()).error?.message || r.statusText);
  return r;
}

function login() {
  return new Promise((resolve) => {
    const d = $("login");
    d.showModal();
    d.addEventListener("close", () => { localStorage.setItem("glmkit-key", $("api-key").value); resolve(); }, { once: true });
  });
}

// -- rendering ------------------------------------------------------------------------------
function escapeHtml(s) { return s.replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" }[c])); }

const MATH = /\$\$([\s\S]+?)\$\$|\\\[([\s\S]+?)\\\]|\$([^\s$](?:[^$\n]*?[^\s$\\])?)\$(?!\d)|\\\(([\s\S]+?)\\\)/g;

// Markdown -> sanitized HTML.  Math is cut out before Markdown sees it (so `_` and `*` inside
// formulas survive), except inside code, and rendered by KaTeX afterwards.
function markdown(text) {
  const formulas = [], tag = "MATH" + Math.random().toString(36).slice(2);   // a placeholder no reply can spell
  const parts = text.split(/(```[\s\S]*?(?:```|$)|`[^`\n]*`)/g);
  const src = parts.map((p, i) => (i % 2 ? p : p.replace(MATH, (m, a, b, c, d) => {
    formulas.push({ tex: a ?? b ?? c ?? d, display: a !== undefined || b !== undefined });
    return `${tag}x${formulas.length - 1}x`;
  }))).join("");
  let html = marked.parse(src, { gfm: true, breaks: true });
  html = html.replace(new RegExp(tag + "x(\\d+)x", "g"), (m, i) => {
    const f = formulas[+i];
    if (!f) return m;
    try { return katex.renderToString(f.tex, { displayMode: f.display, output: "mathml", throwOnError: false }); }
    catch { return escapeHtml(f.tex); }
  });
  return DOMPurify.sanitize(html, SANITIZE);
}

// Model output must not make the browser fetch anything: an image URL in a reply could carry
// conversation text to another server (prompt-injection exfiltration).  Only inline data images
// stay; links open in a new tab without a referrer.
const SANITIZE = {
  USE_PROFILES: { html: true, mathMl: true },
  FORBID_TAGS: ["style", "video", "audio", "source", "track", "picture", "input", "form", "iframe", "object", "embed", "link", "meta"],
  FORBID_ATTR: ["style", "background", "poster", "srcset", "action", "formaction", "ping"],
};
DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "IMG" && !/^data:image\/(png|jpeg|gif|webp);/.test(node.getAttribute("src") || "")) node.remove();
  if (node.tagName === "A") { node.setAttribute("target", "_blank"); node.setAttribute("rel", "noopener noreferrer"); }
});

function highlight(root) {
  root.querySelectorAll("pre code").forEach((c) => {
    if (c.dataset.highlighted) return;
    hljs.highlightElement(c);
    const b = el("button", "copy"); b.textContent = "copy"; b.type = "button";
    b.onclick = () => navigator.clipboard?.writeText(c.textContent).then(() => { b.textContent = "copied"; });
    c.parentElement.appendChild(b);
  });
}

function el(tag, cls, html) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (html !== undefined) e.innerHTML = html;
  return e;
}

// An assistant text bubble.  A model without ChatGLM3's protocol writes tool calls as
// <tool_call>{json}</tool_call> text: shown as a step, not as raw markup.
function setAssistantText(div, text) {
  const calls = [];
  const visible = text.replace(/<tool_call>([\s\S]*?)(?:<\/tool_call>|$)/g, (_, body) => { calls.push(body.trim()); return ""; });
  div.innerHTML = markdown(visible);
  for (const c of calls) {
    let name = "tool";
    try { name = JSON.parse(c).name || name; } catch { /* shown as written */ }
    div.appendChild(step("Tool call · " + name, c));
  }
  highlight(div);
}

function step(summary, body, ok) {
  const d = el("details", "step" + (ok === false ? " failed" : ""));
  d.appendChild(el("summary", "", escapeHtml(summary)));
  d.appendChild(el("pre", "", escapeHtml(body)));
  return d;
}

function cellOutput(result) {
  const box = el("div", "cell-output" + (result.ok ? "" : " error"));
  box.appendChild(el("div", "label", result.ok ? "Output" : "Error"));
  if (result.output) box.appendChild(el("pre", "", escapeHtml(result.output)));
  for (const img of result.images || []) {
    const i = el("img", "plot");
    i.src = "data:image/png;base64," + img; i.alt = "plot";
    box.appendChild(i);
  }
  return box;
}

function toolResult(result) {
  const s = step((result.ok ? "✓ Result · " : "✗ Failed · ") + result.name, result.output, result.ok);
  s.classList.add("result");
  return s;
}

function codeBlock(code) {
  const div = el("div", "msg assistant code-cell");
  div.appendChild(el("div", "label", "Code"));
  const pre = el("pre"), c = el("code", "language-python");
  c.textContent = code; pre.appendChild(c); div.appendChild(pre);
  highlight(div);
  return div;
}

function append(node) {
  $("messages").appendChild(node);
  $("messages").scrollTop = $("messages").scrollHeight;
  return node;
}

// One stored message -> DOM.
function addMessage(m) {
  const x = m.extras || {};
  if (m.role === "observation") {
    const node = x.name === "interpreter" ? cellOutput(x) : toolResult(Object.assign({ name: "tool", output: m.content, ok: true }, x));
    node.dataset.seq = m.seq;
    return append(node);
  }
  if (m.role === "assistant" && m.metadata === "interpreter") {
    const code = (m.content.match(/```[^\n]*\n([\s\S]*?)```/) || [null, m.content])[1];
    return append(codeBlock(code.replace(/\n$/, "")));
  }
  if (m.role === "assistant" && m.metadata) {
    const s = step("Tool call · " + m.metadata, m.content.replace(/```\w*\n?|```/g, "").trim());
    return append(s);
  }
  const div = el("div", "msg " + m.role);
  div.dataset.seq = m.seq ?? "";
  if (m.role === "assistant") setAssistantText(div, m.content || "");
  else div.textContent = m.content || "";
  if (x.stopped) div.appendChild(el("span", "badge", "stopped"));
  if (m.role === "user" && m.seq) {
    const b = el("button", "edit"); b.textContent = "edit";
    b.onclick = () => editMessage(m);
    div.appendChild(b);
  }
  return append(div);
}

// -- settings and modes ---------------------------------------------------------------------
function settings() {
  const s = {};
  if (mode === "chat") s.system = $("system").value;
  for (const k of SLIDERS) s[k] = Number($(k).value);
  return s;
}

function showSettings(s) {
  $("system").value = s.system ?? "";
  for (const k of SLIDERS) { $(k).value = s[k]; $(k + "-v").textContent = s[k]; }
}

let saveTimer = null;
let pendingSave = null;      // the debounced PATCH not yet sent
function saveSettings() {   // kept with the conversation, so a reload shows what was used
  if (!current) return;
  clearTimeout(saveTimer);
  const id = current.id, s = settings();
  pendingSave = () => { pendingSave = null; return api("/api/conversations/" + id, { method: "PATCH", body: JSON.stringify({ settings: s }) }); };
  saveTimer = setTimeout(pendingSave, 300);
}

async function flushSettings() {   // before a turn starts: a save that arrives during one is refused
  clearTimeout(saveTimer);
  if (pendingSave) {
    try { await pendingSave(); } catch (e) { /* refused: the turn runs with the settings stored before */ }
  }
}

function showMode(m) {
  mode = m;
  document.body.dataset.mode = m;
  document.querySelectorAll("#modes button").forEach((b) => b.classList.toggle("active", b.dataset.mode === m));
  $("input").placeholder = { chat: "Send a message", tool: "Ask something the tools can help with",
    code: "Ask for an analysis, a computation or a plot" }[m] + " (Enter to send, Shift+Enter for a new line)";
  if (m === "code") refreshFiles();
}

async function pickMode(m) {
  if (m === mode && current) return;
  if (current) current = await (await api("/api/conversations/" + current.id)).json();
  if (current && current.messages.length === 0) {
    await api("/api/conversations/" + current.id, { method: "PATCH", body: JSON.stringify({ mode: m }) });
    current.mode = m; showMode(m); refreshList();
  } else {
    mode = m;                  // the new conversation is made in this mode; open() then shows it,
    await newConversation();   // so nothing typed meanwhile lands in the conversation being left
  }
}

// -- conversations --------------------------------------------------------------------------
async function refreshList() {
  const list = await (await api("/api/conversations")).json();
  const ul = $("conversations");
  ul.innerHTML = "";
  for (const c of list) {
    const li = el("li");
    li.dataset.id = c.id;
    if (current && c.id === current.id) li.classList.add("active");
    li.innerHTML = `<span class="title">${escapeHtml(c.title)}</span><span class="mode-tag">${c.mode === "chat" ? "" : escapeHtml(MODE_NAMES[c.mode])}</span>`;
    li.onclick = () => open(c.id);
    const actions = el("span", "actions");
    for (const [label, fn] of [["rename", rename], ["delete", remove], ["md", (id) => exportAs(id, "md")], ["json", (id) => exportAs(id, "json")]]) {
      const b = el("button", label); b.textContent = label;
      b.onclick = (e) => { e.stopPropagation(); fn(c.id); };
      actions.appendChild(b);
    }
    li.appendChild(actions);
    ul.appendChild(li);
  }
}

async function open(id) {
  current = await (await api("/api/conversations/" + id)).json();
  $("conv-title").textContent = current.title;
  $("messages").innerHTML = "";
  current.messages.forEach(addMessage);
  showSettings(Object.assign({}, defaults, current.settings));
  showMode(current.mode);
  refreshList();
}

async function newConversation() {
  const c = await (await api("/api/conversations", { method: "POST", body: JSON.stringify({ mode, settings: settings() }) })).json();
  await open(c.id);
}

async function rename(id) {
  const title = prompt("New title");
  if (title) { await api("/api/conversations/" + id, { method: "PATCH", body: JSON.stringify({ title }) }); await open(id); }
}

async function remove(id) {
  await api("/api/conversations/" + id, { method: "DELETE" });
  if (current && current.id === id) { current = null; $("messages").innerHTML = ""; $("conv-title").textContent = ""; }
  refreshList();
}

async function clearConversation() {
  if (!current) return;
  await api(`/api/conversations/${current.id}/messages`, { method: "DELETE" });
  await open(current.id);
}

function download(blob, name) {
  const a = el("a");
  a.href = URL.createObjectURL(blob); a.download = name; a.click();
}

async function exportAs(id, format) {
  download(await (await api(`/api/conversations/${id}/export?format=${format}`)).blob(), `conversation.${format}`);
}

// -- the code interpreter's files -----------------------------------------------------------
async function refreshFiles() {
  const ul = $("files");
  ul.innerHTML = "";
  if (!current || current.mode !== "code") return;
  for (const f of await (await api(`/api/conversations/${current.id}/files`)).json()) {
    const li = el("li");
    const a = el("a", "file"); a.textContent = f.name; a.href = "#";
    a.title = `${f.size} bytes · click to download`;
    a.onclick = async (e) => {
      e.preventDefault();
      download(await (await api(`/api/conversations/${current.id}/files/${encodeURIComponent(f.name)}`)).blob(), f.name.split("/").pop());
    };
    li.appendChild(a);
    ul.appendChild(li);
  }
}

async function upload(files) {
  if (!current || current.mode !== "code") await pickMode("code");
  for (const f of files) {
    await api(`/api/conversations/${current.id}/files/${encodeURIComponent(f.name)}`,
      { method: "PUT", body: f, headers: Object.assign({ "Content-Type": "application/octet-stream" }, authHeaders()) });
  }
  $("upload").value = "";
  refreshFiles();
}

// -- answering ------------------------------------------------------------------------------
async function send(payload) {
  if (!current) await newConversation();
  await flushSettings();
  if (payload.content && payload.edit_seq === undefined) addMessage({ role: "user", content: payload.content });
  let bubble = null;
  const say = (t) => {   // re-rendered at most once a frame; a step may start a new bubble meanwhile
    if (!bubble) { bubble = append(el("div", "msg assistant")); bubble.raw = ""; }
    const target = bubble;
    target.raw += t;
    if (!target.pending) {
      target.pending = true;
      requestAnimationFrame(() => { target.pending = false; setAssistantText(target, target.raw); $("messages").scrollTop = $("messages").scrollHeight; });
    }
  };
  controller = new AbortController();
  $("stop").disabled = false; $("send").disabled = true;
  document.body.dataset.busy = "1";   // one answer at a time: switching is off until it ends
  try {
    const r = await fetch(`/api/conversations/${current.id}/messages`, {
      method: "POST", headers: headers(), body: JSON.stringify(Object.assign({ settings: settings() }, payload)), signal: controller.signal });
    if (!r.ok) throw new Error((await r.json()).error?.message || r.statusText);
    const reader = r.body.getReader(), dec = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += dec.decode(value, { stream: true });
      let i;
      while ((i = buf.indexOf("\n\n")) >= 0) {
        const line = buf.slice(0, i); buf = buf.slice(i + 2);
        if (!line.startsWith("data: ")) continue;
        const ev = JSON.parse(line.slice(6));
        if (ev.type === "text") say(ev.text);
        else if (ev.type === "code") { if (!ev.shown) append(codeBlock(ev.code)); bubble = null; append(el("div", "running", "running…")); }
        else if (ev.type === "tool_call") { bubble = null; append(step("Tool call · " + ev.name, JSON.stringify(ev.arguments, null, 2))); append(el("div", "running", "running…")); }
        else if (ev.type === "tool_result") {
          document.querySelectorAll("#messages .running").forEach((n) => n.remove());
          append(ev.name === "interpreter" ? cellOutput(ev) : toolResult(ev)); bubble = null;
        } else if (ev.type === "error") append(el("div", "msg error", escapeHtml(ev.text)));
      }
    }
  } catch (e) {
    if (e.name !== "AbortError") append(el("div", "msg error", escapeHtml(e.message)));
  } finally {
    $("stop").disabled = true; $("send").disabled = false; controller = null;
    document.querySelectorAll("#messages .running").forEach((n) => n.remove());
    await open(current.id);   // what the server stored, a stopped answer included
    document.body.dataset.busy = "";
  }
}

// Stop: the server stops and stores what was shown, then the stream is closed.
async function stop() {
  if (!controller) return;
  $("stop").disabled = true;
  try { await api(`/api/conversations/${current.id}/stop`, { method: "POST" }); }
  finally { if (controller) controller.abort(); }
}

function editMessage(m) {
  const content = prompt("Edit message", m.content);
  if (content) send({ content, edit_seq: m.seq });
}

async function main() {
  config = await (await api("/api/config")).json();
  defaults = config.defaults;
  $("model-name").textContent = config.model;
  for (const m of ["chat", "tool", "code"]) {
    const b = el("button"); b.textContent = MODE_NAMES[m]; b.dataset.mode = m; b.id = "mode-" + m;
    if (config.unavailable[m]) { b.disabled = true; b.title = config.unavailable[m]; }
    b.onclick = () => pickMode(m);
    $("modes").appendChild(b);
  }
  $("tool-list").textContent = config.tools.map((t) => t.name).join(", ") || "none";
  // the server's --max-tokens bounds the slider, so a saved setting is never one the server refuses
  if (config.limits) {
    $("max_new_tokens").max = config.limits.max_new_tokens;
    $("max_new_tokens").min = Math.min(16, config.limits.max_new_tokens);
    $("system").maxLength = config.limits.system;
  }
  showSettings(defaults);
  showMode("chat");
  for (const k of SLIDERS) {
    $(k).oninput = () => { $(k + "-v").textContent = $(k).value; };
    $(k).onchange = saveSettings;
  }
  $("system").onchange = saveSettings;
  $("new-chat").onclick = newConversation;
  $("composer").onsubmit = (e) => { e.preventDefault(); const c = $("input").value.trim(); if (c) { $("input").value = ""; send({ content: c }); } };
  $("input").onkeydown = (e) => { if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("composer").requestSubmit(); } };
  $("stop").onclick = stop;
  $("regenerate").onclick = () => current && send({ regenerate: true });
  $("clear").onclick = clearConversation;
  $("upload").onchange = (e) => upload(e.target.files);
  await refreshList();
  const first = document.querySelector("#conversations li");
  if (first) open(first.dataset.id);
}

main();
