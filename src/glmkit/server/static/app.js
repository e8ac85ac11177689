// glmkit web console: plain JavaScript, no build step, nothing loaded from the network.
const $ = (id) => document.getElementById(id);
const SLIDERS = ["temperature", "top_p", "top_k", "repetition_penalty", "max_new_tokens"];
let current = null, controller = null, defaults = {};

function headers() {
  const key = localStorage.getItem("glmkit-key");
  return Object.assign({ "Content-Type": "application/json" }, key ? { Authorization: "Bearer " + key } : {});
}

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

function escapeHtml(s) { return s.replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" }[c])); }

// Minimal, safe rendering: text is escaped first; fenced code becomes <pre><code>.
function render(text) {
  return escapeHtml(text).replace(/```(\w*)\n([\s\S]*?)```/g, (_, lang, code) => `<pre><code class="lang-${lang}">${code}</code></pre>`);
}

function addMessage(m) {
  const div = document.createElement("div");
  div.className = "msg " + m.role;
  div.dataset.seq = m.seq ?? "";
  div.innerHTML = render(m.content || "");
  if (m.role === "user" && m.seq) {
    const b = document.createElement("button");
    b.className = "edit"; b.textContent = "edit";
    b.onclick = () => editMessage(m);
    div.appendChild(b);
  }
  $("messages").appendChild(div);
  $("messages").scrollTop = $("messages").scrollHeight;
  return div;
}

function settings() {
  const s = { system: $("system").value };
  for (const k of SLIDERS) s[k] = Number($(k).value);
  return s;
}

function showSettings(s) {
  $("system").value = s.system ?? "";
  for (const k of SLIDERS) { $(k).value = s[k]; $(k + "-v").textContent = s[k]; }
}

async function refreshList() {
  const list = await (await api("/api/conversations")).json();
  const ul = $("conversations");
  ul.innerHTML = "";
  for (const c of list) {
    const li = document.createElement("li");
    li.dataset.id = c.id;
    if (current && c.id === current.id) li.classList.add("active");
    li.innerHTML = `<span class="title">${escapeHtml(c.title)}</span>`;
    li.onclick = () => open(c.id);
    for (const [label, fn] of [["rename", rename], ["delete", remove], ["md", (id) => exportAs(id, "md")], ["json", (id) => exportAs(id, "json")]]) {
      const b = document.createElement("button");
      b.textContent = label; b.className = label;
      b.onclick = (e) => { e.stopPropagation(); fn(c.id); };
      li.appendChild(b);
    }
    ul.appendChild(li);
  }
}

async function open(id) {
  current = await (await api("/api/conversations/" + id)).json();
  $("conv-title").textContent = current.title;
  $("messages").innerHTML = "";
  current.messages.forEach(addMessage);
  showSettings(Object.assign({}, defaults, current.settings));
  refreshList();
}

async function newConversation() {
  const c = await (await api("/api/conversations", { method: "POST", body: JSON.stringify({ settings: settings() }) })).json();
  await open(c.id);
}

async function rename(id) {
  const title = prompt("New title");
  if (title) { await api("/api/conversations/" + id, { method: "PATCH", body: JSON.stringify({ title }) }); await open(id); }
}

async function remove(id) {
  await api("/api/conversations/" + id, { method: "DELETE" });
  if (current && current.id === id) { current = null; $("messages").innerHTML = ""; }
  refreshList();
}

async function exportAs(id, format) {
  const text = await (await api(`/api/conversations/${id}/export?format=${format}`)).text();
  const a = document.createElement("a");
  a.href = URL.createObjectURL(new Blob([text])); a.download = `conversation.${format}`; a.click();
}

async function send(payload) {
  if (!current) await newConversation();
  if (payload.content && payload.edit_seq === undefined) addMessage({ role: "user", content: payload.content });
  const out = addMessage({ role: "assistant", content: "" });
  controller = new AbortController();
  $("stop").disabled = false; $("send").disabled = true;
  let text = "", aborted = false;
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
        if (ev.type === "text") { text += ev.text; out.innerHTML = render(text); }
      }
    }
  } catch (e) {
    if (e.name === "AbortError") aborted = true;
    else out.innerHTML = render(text + "\n[error: " + e.message + "]");
  } finally {
    $("stop").disabled = true; $("send").disabled = false; controller = null;
    // after Stop the server stores what was shown as soon as it sees the disconnect: keep the
    // text on screen rather than racing it with a reload
    if (aborted) refreshList(); else await open(current.id);
  }
}

function editMessage(m) {
  const content = prompt("Edit message", m.content);
  if (content) send({ content, edit_seq: m.seq });
}

async function main() {
  const cfg = await (await api("/api/config")).json();
  defaults = cfg.defaults;
  $("model-name").textContent = cfg.model;
  showSettings(defaults);
  for (const k of SLIDERS) $(k).oninput = () => { $(k + "-v").textContent = $(k).value; };
  $("new-chat").onclick = newConversation;
  $("composer").onsubmit = (e) => { e.preventDefault(); const c = $("input").value.trim(); if (c) { $("input").value = ""; send({ content: c }); } };
  $("input").onkeydown = (e) => { if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("composer").requestSubmit(); } };
  $("stop").onclick = () => controller && controller.abort();
  $("regenerate").onclick = () => current && send({ regenerate: true });
  await refreshList();
  const first = document.querySelector("#conversations li");
  if (first) open(first.dataset.id);
}

main();
