// glmkit web console: plain JavaScript, no build step, nothing loaded from the network.
// Markdown (marked), sanitizing (DOMPurify), code highlighting (highlight.js) and math (KaTeX,
// MathML output so no fonts are needed) are vendored under /static/vendor/.
const $ = (id) => document.getElementById(id);
const SLIDERS = ["temperature", "top_p", "top_k", "repetition_penalty", "max_new_tokens"];
const MODE_NAMES = { chat: "Chat", tool: "Tool", code: "Code interpreter", knowledge: "Knowledge" };
let current = null, controller = null, defaults = {}, config = {}, mode = "chat";

// -- HTTP -----------------------------------------------------------------------------------
function authHeaders() {
  const key = localStorage.getItem("glmkit-key");
  return key ? { Authorization: "Bearer " + key } : {};
}
function headers() { return Object.assign({ "Content-Type": "application/json" }, authHeaders()); }

async function failure(r) {   // a refused request's one readable message
  let message = r.statusText || "HTTP " + r.status;
  try { message = (await r.json()).error?.message || message; } catch { /* not JSON */ }
  return new Error(message);
}

async function api(path, options = {}) {
  let r;
  try { r = await fetch(path, Object.assign({ headers: headers() }, options)); }
  catch (e) { throw new Error("the server cannot be reached (" + e.message + ")"); }
  if (r.status === 401) {      // the key was revoked meanwhile: back to the login form, saying so
    sessionStorage.setItem("glmkit-login-error", "Your API key is no longer accepted; sign in again.");
    localStorage.removeItem("glmkit-key");
    location.reload();
    throw new Error("signed out: the API key is no longer accepted");
  }
  if (!r.ok) throw await failure(r);
  return r;
}

// Every failure is shown on the page: a toast, and the console gets nothing the page does not.
function toast(message, kind = "error") {
  const t = el("div", "toast " + kind);
  t.setAttribute("role", kind === "error" ? "alert" : "status");
  t.appendChild(el("span", "", escapeHtml(String(message))));
  const x = el("button", "icon", "×"); x.type = "button"; x.setAttribute("aria-label", "Dismiss");
  x.onclick = () => t.remove();
  t.appendChild(x);
  $("toasts").appendChild(t);
  setTimeout(() => t.remove(), kind === "error" ? 12000 : 5000);
  return t;
}
// an event handler whose failure is a toast, never an uncaught rejection
const guard = (fn) => async (...args) => { try { return await fn(...args); } catch (e) { toast(e.message); } };
window.addEventListener("unhandledrejection", (e) => { e.preventDefault(); toast(e.reason?.message || String(e.reason)); });

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

const RUNNABLE = /^(|python|py|python3)$/;   // a fenced block's language that Run runs

// Highlight code blocks, with a copy button each and, where `run` is given, a Run button on
// each Python (or unlabelled) block: it runs in the conversation's kernel.
function highlight(root, run) {
  root.querySelectorAll("pre code").forEach((c) => {
    if (c.dataset.highlighted) return;
    const lang = ((c.className.match(/language-(\S+)/) || [])[1] || "").toLowerCase();
    hljs.highlightElement(c);
    const bar = el("span", "code-actions");
    const b = el("button", "copy"); b.textContent = "copy"; b.type = "button";
    b.onclick = () => navigator.clipboard?.writeText(c.textContent).then(() => { b.textContent = "copied"; });
    bar.appendChild(b);
    if (run && RUNNABLE.test(lang)) {
      const r = el("button", "run"); r.textContent = "▶ Run"; r.type = "button"; r.title = "Run in this conversation's sandbox";
      r.onclick = guard(() => run(c.textContent));
      bar.appendChild(r);
    }
    c.parentElement.appendChild(bar);
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
function setAssistantText(div, text, run) {
  const calls = [];
  const visible = text.replace(/<tool_call>([\s\S]*?)(?:<\/tool_call>|$)/g, (_, body) => { calls.push(body.trim()); return ""; });
  div.innerHTML = markdown(visible);
  for (const c of calls) {
    let name = "tool";
    try { name = JSON.parse(c).name || name; } catch { /* shown as written */ }
    div.appendChild(step("Tool call · " + name, c));
  }
  highlight(div, run);
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

function codeBlock(code, byUser) {
  const div = el("div", "msg assistant code-cell" + (byUser ? " by-user" : ""));
  div.appendChild(el("div", "label", byUser ? "Code · run by you" : "Code"));
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

function usageLine(x) {
  const u = x.usage, parts = [];
  if (u) parts.push(`${u.prompt_tokens} prompt + ${u.completion_tokens} completion tokens`);
  if (x.tokens_per_second !== undefined) parts.push(`${x.tokens_per_second} tokens/s`);
  return el("div", "meta", escapeHtml(parts.join(" · ")));
}

// One stored message -> DOM.
function addMessage(m) {
  const x = m.extras || {};
  const cut = x.finish_reason === "length" && !x.stopped;
  // Run buttons in a Code conversation, except on a reply cut at the token limit (its code may be cut too)
  const run = current && current.mode === "code" && !cut ? runCode : null;
  if (m.role === "observation") {
    const node = x.name === "interpreter" ? cellOutput(x) : toolResult(Object.assign({ name: "tool", output: m.content, ok: true }, x));
    node.dataset.seq = m.seq;
    return append(node);
  }
  if (m.role === "assistant" && (m.metadata === "interpreter" || x.by === "user")) {
    const code = (m.content.match(/```[^\n]*\n([\s\S]*?)```/) || [null, m.content])[1];
    return append(codeBlock(code.replace(/\n$/, ""), x.by === "user"));
  }
  if (m.role === "assistant" && m.metadata) {
    const s = step("Tool call · " + m.metadata, m.content.replace(/```\w*\n?|```/g, "").trim());
    return append(s);
  }
  const div = el("div", "msg " + m.role);
  div.dataset.seq = m.seq ?? "";
  if (m.role === "assistant") { setAssistantText(div, m.content || "", run); if (x.citations) linkCitations(div, x.citations); }
  else if (m.role === "user") { div.innerHTML = markdown(m.content || ""); highlight(div, run); }
  else div.textContent = m.content || "";
  if (x.stopped) div.appendChild(el("span", "badge", "stopped"));
  if (cut) div.appendChild(el("span", "badge cut", "reply cut at the token limit"));
  if (m.role === "user" && m.seq) {
    const b = el("button", "edit"); b.textContent = "edit"; b.type = "button";
    b.onclick = () => editMessage(m);
    div.appendChild(b);
  }
  append(div);
  if (m.role === "assistant" && x.knowledge) append(sources(x));
  if (m.role === "assistant" && (x.usage || x.tokens_per_second !== undefined)) append(usageLine(x));
  return div;
}

// -- Knowledge mode: a reply's [n] open the passage they cite ------------------------------------
// The citations are the server's (stored with the reply: n, document, position, text); document
// text is only ever set as textContent.
const CITE = /[\[【]\s*(\d{1,3}(?:\s*[,，、]\s*\d{1,3})*)\s*[\]】]/g;

function citeLink(c) {
  const a = el("a", "cite");
  a.href = "#"; a.textContent = String(c.n); a.dataset.n = c.n;
  a.title = c.document + (c.position ? " · " + c.position : "");
  a.onclick = (e) => { e.preventDefault(); showPassage(c); };
  return a;
}

// Each [n] in the reply's text (not in code) whose n is a cited passage becomes a link.
function linkCitations(div, cited) {
  const byN = new Map(cited.map((c) => [Number(c.n), c]));
  if (!byN.size) return;
  const walker = document.createTreeWalker(div, NodeFilter.SHOW_TEXT, {
    acceptNode: (n) => (n.parentElement.closest("pre, code, a, math") ? NodeFilter.FILTER_REJECT : NodeFilter.FILTER_ACCEPT) });
  const nodes = [];
  while (walker.nextNode()) nodes.push(walker.currentNode);
  for (const node of nodes) {
    const text = node.nodeValue;
    CITE.lastIndex = 0;
    if (!CITE.test(text)) continue;
    CITE.lastIndex = 0;                 // matchAll starts where test() left off
    const frag = document.createDocumentFragment();
    let at = 0;
    for (const m of text.matchAll(CITE)) {
      frag.appendChild(document.createTextNode(text.slice(at, m.index)));
      let inner = 0;
      for (const d of m[0].matchAll(/\d{1,3}/g)) {       // the brackets and separators stay text
        frag.appendChild(document.createTextNode(m[0].slice(inner, d.index)));
        const c = byN.get(Number(d[0]));
        frag.appendChild(c ? citeLink(c) : document.createTextNode(d[0]));
        inner = d.index + d[0].length;
      }
      frag.appendChild(document.createTextNode(m[0].slice(inner)));
      at = m.index + m[0].length;
    }
    frag.appendChild(document.createTextNode(text.slice(at)));
    node.replaceWith(frag);
  }
}

// Under a Knowledge reply: the passages it cites, each opening its passage, and how they were found.
function sources(x) {
  const k = x.knowledge, box = el("div", "sources");
  const cited = x.citations || [];
  const label = el("span");
  label.textContent = cited.length ? "Sources:" : `No passage cited (${k.passages} from ${k.kb})`;
  box.appendChild(label);
  for (const c of cited) {
    const b = el("button", "source"); b.type = "button";
    b.textContent = `[${c.n}] ${c.document}` + (c.position ? ` · ${c.position}` : "");
    b.onclick = () => showPassage(c);
    box.appendChild(b);
  }
  if (k.note) { const n = el("small"); n.textContent = "(" + k.note + ")"; box.appendChild(n); }
  return box;
}

function showPassage(c) {
  $("passage-doc").textContent = `[${c.n}] ${c.document}`;
  $("passage-pos").textContent = c.position || "";
  $("passage-text").textContent = c.text;
  if (!$("passage").open) $("passage").showModal();
}

// -- settings and modes ---------------------------------------------------------------------
function settings() {   // only what differs from the model's defaults: the rest follows whichever model answers
  const s = {}, defaults = modelInfo().defaults || {};
  if ((mode === "chat" || mode === "knowledge") && $("system").value) s.system = $("system").value;
  for (const k of SLIDERS) {
    const v = Number($(k).value);
    if (v !== Number(defaults[k])) s[k] = v;
  }
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
  saveTimer = setTimeout(guard(pendingSave), 300);
}

async function flushSettings() {   // before a turn starts: a save that arrives during one is refused
  clearTimeout(saveTimer);
  if (pendingSave) {
    try { await pendingSave(); } catch (e) { toast("the settings were not saved: " + e.message); }
  }
}

let noteDismissed = false;   // the small-model note: shown once per page load, until dismissed
function showMode(m) {
  mode = m;
  document.body.dataset.mode = m;
  document.querySelectorAll("#modes button").forEach((b) => b.classList.toggle("active", b.dataset.mode === m));
  $("input").placeholder = { chat: "Send a message", tool: "Ask something the tools can help with",
    code: "Ask for an analysis, a computation or a plot", knowledge: "Ask about your documents" }[m] + " (Enter to send, Shift+Enter for a new line)";
  $("note-text").textContent = modelInfo().note || "";
  $("note").hidden = !(modelInfo().note && m !== "chat" && !noteDismissed);
  if (m === "code") refreshFiles().catch((e) => toast(e.message));
  if (m === "knowledge") refreshKnowledge().catch((e) => toast(e.message));
}

// A mode switch may create a conversation: anything that needs "the conversation shown" (an
// upload, a message) waits for the switch in flight, then names the conversation explicitly.
let switching = Promise.resolve();
function pickMode(m) {
  const next = switching.then(() => switchMode(m));
  switching = next.catch(() => {});
  return next;
}

async function switchMode(m) {
  if (m === (current ? current.mode : mode)) { showMode(m); return; }
  if (current) current = await (await api("/api/conversations/" + current.id)).json();
  if (current && current.messages.length === 0) {
    await api("/api/conversations/" + current.id, { method: "PATCH", body: JSON.stringify({ mode: m }) });
    current.mode = m; showMode(m); await refreshList();
  } else {
    await newConversation(m);  // open() shows it, so nothing typed meanwhile lands in the one being left
  }
}

// -- conversations --------------------------------------------------------------------------
function slugify(title) {
  return (title || "").toLowerCase().normalize("NFKD").replace(/[\u0300-\u036f]/g, "")
    .replace(/[^\p{L}\p{N}]+/gu, "-").replace(/^-+|-+$/g, "").slice(0, 60).replace(/-+$/, "") || "conversation";
}

async function refreshList() {
  const q = $("search").value.trim();
  const list = await (await api("/api/conversations" + (q ? "?q=" + encodeURIComponent(q) : ""))).json();
  const ul = $("conversations");
  ul.innerHTML = "";
  if (q && !list.length) ul.appendChild(el("li", "empty", "No conversation matches."));
  for (const c of list) {
    const li = el("li");
    li.dataset.id = c.id;
    if (current && c.id === current.id) li.classList.add("active");
    li.innerHTML = `<span class="title">${escapeHtml(c.title)}</span><span class="mode-tag">${c.mode === "chat" ? "" : escapeHtml(MODE_NAMES[c.mode])}</span>`;
    if (c.match) li.appendChild(el("span", "match", escapeHtml(c.match)));
    li.onclick = guard(() => open(c.id));
    const actions = el("span", "actions");
    for (const [label, fn] of [["rename", rename], ["delete", remove], ["md", (c) => exportAs(c, "md")], ["json", (c) => exportAs(c, "json")]]) {
      const b = el("button", label); b.textContent = label; b.type = "button";
      b.onclick = (e) => { e.stopPropagation(); guard(fn)(c); };
      actions.appendChild(b);
    }
    li.appendChild(actions);
    ul.appendChild(li);
  }
}

async function open(id) {
  const conv = await (await api("/api/conversations/" + id)).json();
  current = conv;
  $("conv-title").textContent = current.title;
  $("messages").innerHTML = "";
  mode = current.mode;        // before the messages: Run buttons are for Code conversations
  const used = current.messages.filter((m) => m.extras && m.extras.knowledge).pop();
  if (used) kbWanted = used.extras.knowledge.kb;
  current.messages.forEach(addMessage);
  for (const w of current.warnings || []) toast(w, "warning");
  if (current.model) $("model-pick").value = current.model;
  showSettings(Object.assign({}, modelInfo().defaults, current.settings));
  showMode(current.mode);
  document.body.classList.remove("sidebar-open");
  await refreshList();
}

async function newConversation(m = mode) {
  const c = await (await api("/api/conversations", { method: "POST", body: JSON.stringify(Object.assign({ mode: m, settings: settings() }, pickedModel())) })).json();
  await open(c.id);
}

async function rename(c) {
  const title = prompt("New title", c.title);
  if (title) { await api("/api/conversations/" + c.id, { method: "PATCH", body: JSON.stringify({ title }) }); await open(c.id); }
}

async function remove(c) {
  if (!confirm(`Delete “${c.title}”? Its messages and files are removed for good.`)) return;
  await api("/api/conversations/" + c.id, { method: "DELETE" });
  if (current && current.id === c.id) { current = null; $("messages").innerHTML = ""; $("conv-title").textContent = ""; }
  await refreshList();
}

async function clearConversation() {
  if (!current) return;
  if (!confirm(`Clear “${current.title}”? Its messages and variables are removed; its settings and files stay.`)) return;
  await api(`/api/conversations/${current.id}/messages`, { method: "DELETE" });
  await open(current.id);
}

function download(blob, name) {
  const a = el("a");
  a.href = URL.createObjectURL(blob); a.download = name; a.click();
}

async function exportAs(c, format) {
  download(await (await api(`/api/conversations/${c.id}/export?format=${format}`)).blob(), `${slugify(c.title)}.${format}`);
}

// -- the code interpreter's files -----------------------------------------------------------
async function refreshFiles() {
  const ul = $("files");
  ul.innerHTML = "";
  if (!current || current.mode !== "code") return;
  const cid = current.id;
  for (const f of await (await api(`/api/conversations/${cid}/files`)).json()) {
    const li = el("li");
    const a = el("a", "file"); a.textContent = f.name; a.href = "#";
    a.title = `${f.size} bytes · click to download`;
    a.onclick = guard(async (e) => {
      e.preventDefault();
      download(await (await api(`/api/conversations/${cid}/files/${encodeURIComponent(f.name)}`)).blob(), f.name.split("/").pop());
    });
    li.appendChild(a);
    ul.appendChild(li);
  }
}

async function upload(files) {
  files = [...files];
  $("upload").value = "";
  await switching;                                   // a mode switch in flight lands first
  if (!current || current.mode !== "code") await pickMode("code");
  const cid = current.id;                            // the conversation shown, named explicitly
  try {
    for (const f of files) {
      await api(`/api/conversations/${cid}/files/${encodeURIComponent(f.name)}`,
        { method: "PUT", body: f, headers: Object.assign({ "Content-Type": "application/octet-stream" }, authHeaders()) });
    }
  } finally {
    await refreshFiles();
  }
}

// -- Knowledge mode: the owner's knowledge bases, and their documents --------------------------
let kbWanted = localStorage.getItem("glmkit-kb") || "";   // the one to show: last picked, or last answered from
const kbPath = (name) => "/api/knowledge/" + encodeURIComponent(name);

async function refreshKnowledge() {
  const list = await (await api("/api/knowledge")).json();
  const pick = $("kb-pick");
  pick.innerHTML = "";
  for (const kb of list) {
    const o = el("option"); o.value = kb.name;
    o.textContent = kb.name + (kb.words_only ? " (words only)" : "");
    pick.appendChild(o);
  }
  if (!list.length) { const o = el("option"); o.value = ""; o.textContent = "No knowledge base yet: create one"; pick.appendChild(o); }
  if (list.some((kb) => kb.name === kbWanted)) pick.value = kbWanted;
  $("kb-delete").hidden = $("kb-upload-label").hidden = !pick.value;
  await refreshDocuments();
}

async function refreshDocuments() {
  const ul = $("kb-docs"), kb = $("kb-pick").value;
  ul.innerHTML = "";
  if (!kb) return;
  const docs = await (await api(kbPath(kb) + "/documents")).json();
  if (!docs.length) { const li = el("li", "empty"); li.textContent = "No documents yet: add some."; ul.appendChild(li); }
  for (const d of docs) {
    const li = el("li");
    const name = el("span", "name"); name.textContent = d.name; name.title = `${d.kind}, ${d.bytes} bytes`;
    const n = el("small"); n.textContent = `${d.chunks} passage${d.chunks === 1 ? "" : "s"}`;
    const x = el("button", "icon", "×"); x.type = "button"; x.setAttribute("aria-label", "Remove " + d.name);
    x.onclick = guard(async () => {
      if (!confirm(`Remove “${d.name}” from ${kb}?`)) return;
      await api(`${kbPath(kb)}/documents/${encodeURIComponent(d.name)}`, { method: "DELETE" });
      await refreshDocuments();
    });
    li.append(name, n, x);
    ul.appendChild(li);
  }
}

async function createKnowledgeBase(e) {
  e.preventDefault();
  const name = $("kb-name").value.trim();
  if (!name) return;
  await api("/api/knowledge", { method: "POST", body: JSON.stringify({ name }) });
  $("kb-name").value = "";
  pickKnowledgeBase(name);
  await refreshKnowledge();
}

function pickKnowledgeBase(name) { kbWanted = name; localStorage.setItem("glmkit-kb", name); }

async function deleteKnowledgeBase() {
  const kb = $("kb-pick").value;
  if (!kb || !confirm(`Delete the knowledge base “${kb}” and all its documents?`)) return;
  await api(kbPath(kb), { method: "DELETE" });
  await refreshKnowledge();
}

async function addDocuments(files) {
  files = [...files];
  $("kb-upload").value = "";
  const kb = $("kb-pick").value;
  if (!kb) { toast("create a knowledge base first"); return; }
  $("kb-upload-label").classList.add("busy");
  try {
    for (const f of files) {
      try {
        const r = await (await api(`${kbPath(kb)}/files/${encodeURIComponent(f.name)}`,
          { method: "PUT", body: f, headers: Object.assign({ "Content-Type": "application/octet-stream" }, authHeaders()) })).json();
        if (r.status === "duplicate" || r.status === "unchanged") toast(`${f.name}: ${r.detail || "already there"}`, "warning");
      } catch (err) { toast(err.message); }       // one line for a file that cannot be added; the others go on
    }
  } finally {
    $("kb-upload-label").classList.remove("busy");
    await refreshDocuments();
  }
}

function knowledgeChoice() {   // Knowledge mode: the knowledge base each message is answered from
  return current && current.mode === "knowledge" ? { kb: $("kb-pick").value } : {};
}

// -- text attachments (Chat and Tool modes): sent as context inside the message ----------------
const ATTACH_MAX = 100 * 1000;
let attached = [];     // {name, text}

function showAttachments() {
  const box = $("attachments");
  box.innerHTML = "";
  attached.forEach((a, i) => {
    const chip = el("span", "chip", `📄 ${escapeHtml(a.name)} <small>${(a.text.length / 1000).toFixed(1)} kB</small>`);
    const x = el("button", "icon", "×"); x.type = "button"; x.setAttribute("aria-label", "Remove " + a.name);
    x.onclick = () => { attached.splice(i, 1); showAttachments(); };
    chip.appendChild(x);
    box.appendChild(chip);
  });
}

async function attach(files) {
  files = [...files];
  $("attach").value = "";
  for (const f of files) {
    if (f.size > ATTACH_MAX) {
      toast(`${f.name} is ${(f.size / 1000).toFixed(0)} kB: a text attachment may be at most ${ATTACH_MAX / 1000} kB`);
      continue;
    }
    const text = await f.text();
    if (text.includes("\u0000") || text.includes("\uFFFD")) { toast(`${f.name} is not a UTF-8 text file; attach text files only`); continue; }
    attached.push({ name: f.name, text });
  }
  showAttachments();
}

function withAttachments(typed) {
  const blocks = attached.map((a) => {
    const ticks = "`".repeat(Math.max(3, ...[...a.text.matchAll(/`+/g)].map((m) => m[0].length + 1)));
    const lang = (a.name.match(/\.(\w+)$/) || [])[1] || "";
    return `Attached file \`${a.name}\`:\n${ticks}${lang}\n${a.text.replace(/\n$/, "")}\n${ticks}`;
  });
  return [typed, ...blocks].filter(Boolean).join("\n\n");   // the question first: it names the conversation
}

// -- answering ------------------------------------------------------------------------------
function busy(on) {
  $("stop").disabled = !on; $("send").disabled = on;
  document.body.dataset.busy = on ? "1" : "";   // one answer at a time: switching is off until it ends
}

// Run a code block (Run button) in the conversation's kernel; the step is stored with it.
async function runCode(code) {
  if (document.body.dataset.busy === "1" || !current) return;
  const cid = current.id;
  busy(true);
  append(el("div", "running", "running…"));
  try {
    await api(`/api/conversations/${cid}/run`, { method: "POST", body: JSON.stringify({ code }) });
  } finally {
    document.querySelectorAll("#messages .running").forEach((n) => n.remove());
    try { if (current && current.id === cid) await open(cid); }
    finally { busy(false); }
  }
}

// the picked model's sampling defaults and small-model note (with one model: the server's)
function modelInfo() {
  const name = $("model-pick").hidden ? config.default_model : $("model-pick").value;
  return (config.per_model || {})[name] || { defaults, note: config.note };
}

function pickedModel() {   // with several models: the header's choice, sent with each message and stored
  return $("model-pick").hidden ? {} : { model: $("model-pick").value };
}

async function send(payload, accepted = () => {}) {
  await switching;
  if ((current ? current.mode : mode) === "knowledge" && !$("kb-pick").value) {
    toast("Knowledge mode answers from a knowledge base: create one and add documents first");
    return;
  }
  if (!current) await newConversation();
  await flushSettings();
  const cid = current.id;
  let bubble = null, shown = null;
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
  busy(true);
  try {
    if (payload.content && payload.edit_seq === undefined) shown = addMessage({ role: "user", content: payload.content });
    const r = await fetch(`/api/conversations/${cid}/messages`, {
      method: "POST", headers: headers(), body: JSON.stringify(Object.assign({ settings: settings() }, pickedModel(), knowledgeChoice(), payload)), signal: controller.signal });
    if (!r.ok) { if (shown) shown.remove(); throw await failure(r); }
    accepted();
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
        else if (ev.type === "knowledge") {
          const r = append(el("div", "running"));
          r.textContent = `${ev.passages} passage${ev.passages === 1 ? "" : "s"} from ${ev.kb}` + (ev.note ? ` (${ev.note})` : "");
        } else if (ev.type === "code") { if (!ev.shown) append(codeBlock(ev.code)); bubble = null; append(el("div", "running", "running…")); }
        else if (ev.type === "tool_call") { bubble = null; append(step("Tool call · " + ev.name, JSON.stringify(ev.arguments, null, 2))); append(el("div", "running", "running…")); }
        else if (ev.type === "tool_result") {
          document.querySelectorAll("#messages .running").forEach((n) => n.remove());
          append(ev.name === "interpreter" ? cellOutput(ev) : toolResult(ev)); bubble = null;
        } else if (ev.type === "error") { append(el("div", "msg error", escapeHtml(ev.text))); toast(ev.text); }
      }
    }
  } catch (e) {
    if (e.name !== "AbortError") toast(e.message);
  } finally {
    controller = null;
    $("stop").disabled = true; $("send").disabled = false;   // busy until what was stored is shown
    document.querySelectorAll("#messages .running").forEach((n) => n.remove());
    try { if (current && current.id === cid) await open(cid); }   // what the server stored, a stopped answer included
    catch (e) { toast(e.message); }
    finally { document.body.dataset.busy = ""; }
  }
}

// Stop (the button or Esc): the server stops and stores what was shown, then the stream is closed.
async function stop() {
  if (!controller && document.body.dataset.busy !== "1") return;   // an answer, or a Run, in progress
  $("stop").disabled = true;
  try { await api(`/api/conversations/${current.id}/stop`, { method: "POST" }); }
  finally { if (controller) controller.abort(); }
}

function editMessage(m) {
  const content = prompt("Edit message", m.content);
  if (content) send({ content, edit_seq: m.seq });
}

function submit() {
  const typed = $("input").value.trim();
  if (!typed && !attached.length) return;
  const content = withAttachments(typed);
  if (config.limits && content.length > config.limits.content) {
    toast(`the message with its attachments is ${content.length} characters; at most ${config.limits.content} fit`);
    return;
  }
  const sent = attached;
  // the input and attachments stay until the server accepts the message: a refusal loses nothing
  return send({ content }, () => {
    if ($("input").value.trim() === typed) $("input").value = "";
    if (attached === sent) { attached = []; showAttachments(); }
  });
}

// -- start: the login form alone until /api/config accepts the key; then the app ---------------
function showLogin(message) {
  const d = $("login");
  $("login-error").textContent = message || "";
  $("login-error").hidden = !message;
  if (!d.open) d.showModal();
  $("api-key").focus();
}

async function loadConfig(key) {
  const r = await fetch("/api/config", { headers: key ? { Authorization: "Bearer " + key } : {} });
  if (r.status === 401) return null;
  if (!r.ok) throw await failure(r);
  return r.json();
}

async function boot() {
  $("login-form").onsubmit = async (e) => {
    e.preventDefault();
    const key = $("api-key").value.trim();
    $("login-ok").disabled = true;
    try {
      const c = await loadConfig(key);
      if (!c) { showLogin("That API key was not accepted. Check it and try again."); $("api-key").select(); return; }
      localStorage.setItem("glmkit-key", key);
      $("login").close();
      await startApp(c);
    } catch (err) { showLogin("The server cannot be reached: " + err.message); }
    finally { $("login-ok").disabled = false; }
  };
  $("login").addEventListener("cancel", (e) => e.preventDefault());   // Esc does not skip the login
  const stored = localStorage.getItem("glmkit-key");
  const said = sessionStorage.getItem("glmkit-login-error");
  sessionStorage.removeItem("glmkit-login-error");
  let c;
  try { c = await loadConfig(stored); }
  catch (err) { toast("The server cannot be reached: " + err.message); return; }
  if (!c) return showLogin(said || (stored ? "The saved API key is no longer accepted; sign in again." : ""));
  await startApp(c);
}

async function startApp(c) {
  config = c;
  defaults = config.defaults;
  document.body.insertBefore($("app-template").content.cloneNode(true), $("toasts"));
  document.body.classList.add("signed-in");
  $("model-name").textContent = config.model;
  $("model-name").title = config.model;
  if ((config.models || []).length > 1) {       // several models (serve --models): a picker instead
    for (const name of config.models) { const o = el("option"); o.value = o.textContent = name; $("model-pick").appendChild(o); }
    $("model-pick").value = config.default_model;
    $("model-pick").hidden = false;
    $("model-name").hidden = true;
  }
  for (const m of ["chat", "tool", "code", "knowledge"]) {
    const b = el("button"); b.textContent = MODE_NAMES[m]; b.dataset.mode = m; b.id = "mode-" + m; b.type = "button";
    if (config.unavailable[m]) { b.disabled = true; b.title = config.unavailable[m]; }
    b.onclick = guard(() => pickMode(m));
    $("modes").appendChild(b);
  }
  $("tool-list").textContent = config.tools.map((t) => t.name).join(", ") || "none";
  $("note-text").textContent = config.note || "";
  $("note-close").onclick = () => { noteDismissed = true; $("note").hidden = true; };
  // the server's --max-tokens bounds the slider, so a saved setting is never one the server refuses
  if (config.limits) {
    $("max_new_tokens").max = config.limits.max_new_tokens;
    $("max_new_tokens").min = Math.min(16, config.limits.max_new_tokens);
    $("system").maxLength = config.limits.system;
  }
  if (config.auth_required) {
    for (const b of document.querySelectorAll(".sign-out")) {     // the header's; on a phone, the sidebar's
      b.hidden = false;
      b.onclick = () => { localStorage.removeItem("glmkit-key"); location.reload(); };
    }
  }
  showSettings(modelInfo().defaults);
  showMode("chat");
  // another model picked: its sampling defaults (under what the conversation set) and its note
  $("model-pick").onchange = () => {
    showSettings(Object.assign({}, modelInfo().defaults, current ? current.settings : {}));
    showMode(mode);
  };
  for (const k of SLIDERS) {
    $(k).oninput = () => { $(k + "-v").textContent = $(k).value; };
    $(k).onchange = saveSettings;
  }
  $("system").onchange = saveSettings;
  $("new-chat").onclick = guard(() => newConversation());
  $("composer").onsubmit = (e) => { e.preventDefault(); guard(submit)(); };
  $("input").onkeydown = (e) => { if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); $("composer").requestSubmit(); } };
  $("stop").onclick = guard(stop);
  $("regenerate").onclick = guard(() => current && send({ regenerate: true }));
  $("clear").onclick = guard(clearConversation);
  $("upload").onchange = guard((e) => upload(e.target.files));
  $("attach").onchange = guard((e) => attach(e.target.files));
  $("kb-new").onsubmit = guard(createKnowledgeBase);
  $("kb-pick").onchange = guard(async () => { pickKnowledgeBase($("kb-pick").value); await refreshDocuments(); });
  $("kb-upload").onchange = guard((e) => addDocuments(e.target.files));
  $("kb-delete").onclick = guard(deleteKnowledgeBase);
  $("passage-close").onclick = () => $("passage").close();
  $("passage").onclick = (e) => { if (e.target === $("passage")) $("passage").close(); };   // a click on the backdrop
  let searchTimer = null;
  $("search").oninput = () => { clearTimeout(searchTimer); searchTimer = setTimeout(guard(refreshList), 250); };
  $("toggle-sidebar").onclick = () => document.body.classList.toggle("sidebar-open");
  $("toggle-settings").onclick = () => document.body.classList.toggle("settings-open");
  $("scrim").onclick = () => document.body.classList.remove("sidebar-open", "settings-open");
  document.addEventListener("keydown", (e) => {
    if (e.key !== "Escape") return;
    if (controller) { e.preventDefault(); guard(stop)(); }
    else document.body.classList.remove("sidebar-open", "settings-open");
  });
  await refreshList();
  const first = document.querySelector("#conversations li[data-id]");
  if (first) await open(first.dataset.id);
}

boot();
