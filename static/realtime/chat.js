// Chat page: renders one room through RealtimeClient. DOM updates are batched per
// animation frame; every text goes in through textContent, never as HTML.
import { bindBadge } from "./badge.js";
import { RealtimeClient, randomId } from "./client.js";

const config = JSON.parse(document.getElementById("realtime-config").textContent);
const room = config.room;
const list = document.getElementById("messages");
const badge = document.getElementById("status");
const composer = document.getElementById("composer");
const input = document.getElementById("body");

// key -> message. Keys: "m<id>" for stored messages, "p<client_id>" while pending.
const messages = new Map();
const nodes = new Map(); // key -> <li>
const dirty = new Set();
let rebuild = false;
let frameRequested = false;

function wsUrl(path) {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${location.host}${path}`;
}

function csrfToken() {
  const match = document.cookie.match(/(?:^|;\s*)csrftoken=([^;]+)/);
  return match ? decodeURIComponent(match[1]) : "";
}

async function loadSnapshot(slug) {
  const res = await fetch(`${config.apiBase}rooms/${encodeURIComponent(slug)}/messages/?limit=100`, {
    credentials: "same-origin",
    headers: { Accept: "application/json" },
  });
  if (res.status === 401 || res.status === 403) {
    location.assign(`${config.loginUrl}?next=${encodeURIComponent(location.pathname)}`);
    throw new Error("signed out");
  }
  if (!res.ok) throw new Error(`history: HTTP ${res.status}`);
  return res.json();
}

// REST errors as the client expects them: {status, code, message, retryAfter}.
async function restError(res) {
  let body = {};
  try {
    body = await res.json();
  } catch (err) {
    /* not JSON (a proxy's error page) */
  }
  return Object.assign(new Error(body.message || body.detail || `HTTP ${res.status}`), {
    status: res.status,
    code: body.code,
    retryAfter: body.retry_after || Number(res.headers.get("Retry-After")) || 0,
  });
}

// The long-polling fallback (when WebSockets are blocked): GET events with wait.
async function poll(slug, since, wait, signal, limit) {
  const params = new URLSearchParams({ since: String(since), wait: String(wait) });
  if (limit) params.set("limit", String(limit));
  const res = await fetch(`${config.apiBase}rooms/${encodeURIComponent(slug)}/events/?${params}`, {
    credentials: "same-origin",
    headers: { Accept: "application/json" },
    signal,
  });
  if (!res.ok) throw await restError(res);
  return res.json();
}

// A write over REST (the fallback): the same rules, rate limits and ack as the socket.
async function write(method, path, payload) {
  const res = await fetch(`${config.apiBase}${path}`, {
    method,
    credentials: "same-origin",
    headers: { Accept: "application/json", "Content-Type": "application/json", "X-CSRFToken": csrfToken() },
    body: payload === undefined ? undefined : JSON.stringify(payload),
  });
  if (!res.ok) throw await restError(res);
  return res.json();
}

const messagesPath = (slug) => `rooms/${encodeURIComponent(slug)}/messages/`;
const postOverRest = (slug, body, clientId) => write("POST", messagesPath(slug), { body, client_id: clientId });
const editOverRest = (slug, id, body) => write("PATCH", `${messagesPath(slug)}${id}/`, { body });
const removeOverRest = (slug, id) => write("DELETE", `${messagesPath(slug)}${id}/`);

const client = new RealtimeClient({
  url: wsUrl(config.wsPath),
  loadSnapshot,
  poll,
  post: postOverRest,
  edit: editOverRest,
  remove: removeOverRest,
  user: config.user,
  maxBodyLength: config.maxBodyLength,
});

// -- rendering ---------------------------------------------------------------
function schedule(key) {
  if (key) dirty.add(key);
  if (frameRequested) return;
  frameRequested = true;
  requestAnimationFrame(render);
}

function ordered() {
  return [...messages.entries()].sort(([, a], [, b]) => {
    if (a.state === "pending" || a.state === "failed") return b.state === "pending" || b.state === "failed" ? a.order - b.order : 1;
    if (b.state === "pending" || b.state === "failed") return -1;
    return a.seq - b.seq;
  });
}

function render() {
  frameRequested = false;
  if (unreadDirty) drawUnread();
  const nearBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 80;
  if (rebuild) {
    rebuild = false;
    dirty.clear();
    nodes.clear();
    list.replaceChildren(...ordered().map(([key, m]) => draw(key, m)));
  } else {
    for (const key of dirty) {
      const m = messages.get(key);
      const old = nodes.get(key);
      if (!m) {
        if (old) old.remove();
        nodes.delete(key);
        continue;
      }
      const li = draw(key, m);
      if (old) old.replaceWith(li);
      else place(key, m, li);
    }
    dirty.clear();
  }
  if (nearBottom) list.scrollTop = list.scrollHeight;
}

function place(key, m, li) {
  // Stored messages in seq order, before the pending ones; pending ones go last.
  if (m.state === "sent") {
    // Walk back from the end: new messages almost always belong there.
    let el = list.lastElementChild;
    while (el && (el.dataset.state !== "sent" || Number(el.dataset.seq) > m.seq)) el = el.previousElementSibling;
    list.insertBefore(li, el ? el.nextElementSibling : list.firstElementChild);
  } else {
    list.appendChild(li);
  }
}

function draw(key, m) {
  const li = document.createElement("li");
  nodes.set(key, li);
  li.className = "message";
  li.dataset.key = key;
  li.dataset.state = m.state;
  if (m.id) li.dataset.id = m.id;
  if (m.seq) li.dataset.seq = m.seq;
  if (m.author === config.user) li.classList.add("own");
  const meta = document.createElement("div");
  meta.className = "meta";
  const author = document.createElement("span");
  author.className = "author";
  author.textContent = m.author;
  const time = document.createElement("time");
  if (m.ts) {
    time.dateTime = m.ts;
    time.textContent = new Date(m.ts).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  }
  meta.append(author, " ", time);
  if (m.edited_at) meta.append(" ", Object.assign(document.createElement("span"), { className: "muted", textContent: "(edited)" }));
  if (m.state !== "sent") {
    const st = document.createElement("span");
    st.className = `state ${m.state}`;
    st.textContent = m.state === "pending" ? "sending…" : `not sent: ${m.error || "error"}`;
    meta.append(" ", st);
  }
  const body = document.createElement("div");
  body.className = "body";
  body.textContent = m.body;
  li.append(meta, body);
  if (m.state === "sent" && m.id) {
    const actions = document.createElement("div");
    actions.className = "actions";
    if (m.author === config.user && config.canPost) actions.append(button("Edit", () => startEdit(key)));
    if ((m.author === config.user && config.canPost) || config.canModerate) actions.append(button("Delete", () => remove(m)));
    if (actions.childElementCount) li.append(actions);
  }
  if (m.state === "failed") li.append(button("Retry", () => retry(key)));
  return li;
}

function button(label, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.className = "link";
  b.textContent = label;
  b.addEventListener("click", onClick);
  return b;
}

// -- state from the client ----------------------------------------------------
let order = 0;

function store(m) {
  // A pending copy of this message (same client_id) gives way to the stored one.
  if (m.client_id && messages.has(`p${m.client_id}`)) {
    messages.delete(`p${m.client_id}`);
    schedule(`p${m.client_id}`);
  }
  messages.set(`m${m.id}`, { ...m, state: "sent" });
  schedule(`m${m.id}`);
}

client.on("snapshot", (snap) => {
  if (snap.room !== room) return;
  for (const [key, m] of messages) if (m.state === "sent") messages.delete(key);
  for (const m of snap.messages) store(m);
  rebuild = true;
  schedule();
});

client.on("event", (ev) => {
  if (ev.room !== room) return;
  const key = `m${ev.id}`;
  if (ev.type === "message.new") {
    store(ev);
  } else if (ev.type === "message.edited") {
    const m = messages.get(key);
    if (m) {
      messages.set(key, { ...m, body: ev.body, edited_at: ev.edited_at });
      schedule(key);
    }
  } else if (ev.type === "message.deleted") {
    if (messages.delete(key)) schedule(key);
  }
});

client.on("sent", ({ clientId, id, seq }) => {
  // Acked: show it as sent under its id now. Its message.new (which usually follows)
  // then finds it in place; if the broadcast was lost, the server's catch-up sends it.
  const key = `p${clientId}`;
  const m = messages.get(key);
  if (!m) return;
  messages.delete(key);
  schedule(key);
  if (!messages.has(`m${id}`)) store({ ...m, id, seq });
});

client.on("failed", ({ clientId, message }) => {
  const key = `p${clientId}`;
  const m = messages.get(key);
  if (m) {
    messages.set(key, { ...m, state: "failed", error: message });
    schedule(key);
  }
});

client.on("error", (err) => {
  if (err.room !== room || (err.code !== "forbidden" && err.code !== "not_found")) return;
  // Access was taken away while the page was open.
  const notice = document.createElement("p");
  notice.className = "error";
  notice.setAttribute("role", "alert");
  notice.textContent = `You no longer have access to this room (${err.message}).`;
  if (composer) composer.replaceWith(notice);
  else list.after(notice);
});

client.on("reset", ({ room: slug }) => {
  if (slug !== room) {
    // Too far behind to count exactly: the room has news, how much is unknown.
    unread.set(slug, Infinity);
    schedule();
    return;
  }
  rebuild = true;
  schedule();
});

// -- the other rooms: unread counts -------------------------------------------
// Counted in this browser: the last seq seen of each room is kept in localStorage,
// other rooms are followed from there (replay, then live), and each new message by
// someone else counts once. (Server-side read state comes with issue #7.)
const unread = new Map(); // slug -> count
let unreadDirty = false;
const seenKey = (slug) => `realtime:seen:${config.user}:${slug}`;

function lastSeen(slug) {
  try {
    const value = Number(localStorage.getItem(seenKey(slug)));
    return Number.isInteger(value) && value > 0 ? value : null;
  } catch (err) {
    return null; // storage disabled
  }
}

function markSeen(seq) {
  try {
    if (seq > (lastSeen(room) || 0)) localStorage.setItem(seenKey(room), String(seq));
  } catch (err) {
    /* storage disabled: counts start from now */
  }
}

function drawUnread() {
  unreadDirty = false;
  for (const link of document.querySelectorAll(".rooms a[data-room]")) {
    const count = unread.get(link.dataset.room) || 0;
    const badge = link.querySelector(".unread");
    badge.hidden = count === 0;
    const shown = count === Infinity || count > 99 ? "99+" : String(count);
    const visible = Object.assign(document.createElement("span"), { textContent: shown });
    visible.setAttribute("aria-hidden", "true");
    const spoken = Object.assign(document.createElement("span"), { className: "visually-hidden", textContent: `, ${shown} unread` });
    badge.replaceChildren(visible, spoken);
  }
}

client.on("event", (ev) => {
  if (ev.room === room) {
    markSeen(ev.seq);
    return;
  }
  if (ev.type === "message.new" && ev.author !== config.user) {
    unread.set(ev.room, (unread.get(ev.room) || 0) + 1);
    unreadDirty = true;
    schedule();
  }
});

client.on("snapshot", (snap) => {
  if (snap.room === room) markSeen(snap.seq);
});

client.on("error", (err) => {
  // A room of the list we may no longer see: stop counting it.
  if (err.room && err.room !== room && unread.delete(err.room)) {
    unreadDirty = true;
    schedule();
  }
});

// -- the status badge -----------------------------------------------------------
bindBadge(client, badge, config);

// -- actions --------------------------------------------------------------------
function post(body, clientId = randomId()) {
  const key = `p${clientId}`;
  order += 1;
  messages.set(key, { client_id: clientId, author: config.user, body, ts: new Date().toISOString(), state: "pending", order });
  schedule(key);
  const { done } = client.send(room, body, clientId);
  done.catch((err) => {
    const m = messages.get(key);
    if (m && m.state === "pending") {
      messages.set(key, { ...m, state: "failed", error: err.message });
      schedule(key);
    }
  });
}

function retry(key) {
  const m = messages.get(key);
  if (!m) return;
  messages.delete(key);
  schedule(key);
  post(m.body);
}

function remove(m) {
  client.remove(room, m.id).catch((err) => alert(`Could not delete: ${err.message}`));
}

function startEdit(key) {
  const m = messages.get(key);
  const li = nodes.get(key);
  if (!m || !li) return;
  const form = document.createElement("form");
  form.className = "edit";
  const area = document.createElement("textarea");
  area.value = m.body;
  area.setAttribute("aria-label", "Edit message");
  form.append(area, button("Cancel", () => schedule(key)));
  const save = document.createElement("button");
  save.type = "submit";
  save.textContent = "Save";
  form.append(save);
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    const body = area.value;
    if (!body.trim() || body === m.body) return schedule(key);
    client.edit(room, m.id, body).catch((err) => alert(`Could not edit: ${err.message}`));
  });
  li.querySelector(".body").replaceWith(form);
  area.focus();
}

if (composer) {
  composer.addEventListener("submit", (e) => {
    e.preventDefault();
    const body = input.value;
    if (!body.trim()) return;
    input.value = "";
    post(body);
    input.focus();
  });
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) {
      e.preventDefault();
      composer.requestSubmit();
    }
  });
}

window.addEventListener("beforeunload", () => client.close());
client.subscribe(room);
for (const link of document.querySelectorAll(".rooms a[data-room]")) {
  const slug = link.dataset.room;
  if (slug !== room) client.subscribe(slug, { since: lastSeen(slug), background: true });
}
client.connect();
window.realtimeClient = client; // for debugging and the browser tests
