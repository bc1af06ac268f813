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
async function poll(slug, since, wait, signal, limit, epoch) {
  const params = new URLSearchParams({ since: String(since), wait: String(wait) });
  if (limit) params.set("limit", String(limit));
  if (epoch) params.set("epoch", epoch);
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
const readOverRest = (slug, seq) => write("POST", `rooms/${encodeURIComponent(slug)}/read/`, { seq });

const client = new RealtimeClient({
  url: wsUrl(config.wsPath),
  loadSnapshot,
  poll,
  post: postOverRest,
  edit: editOverRest,
  remove: removeOverRest,
  read: readOverRest,
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
  const changed = rebuild || dirty.size > 0;
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
  if (pushDirty || (changed && markers.size)) drawPushes();
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
    recountSoon();
    return;
  }
  rebuild = true;
  schedule();
});

// -- the other rooms: unread counts -------------------------------------------
// The server knows how far this user has read each room (on every device): the
// page starts from its counts, follows the other rooms live and counts new messages
// by others, and asks again whenever the user reads a room elsewhere (read.state).
const unread = new Map(); // slug -> count
const liveSeqs = new Map(); // slug -> seqs of messages by others seen live since the count
let unreadDirty = false;
for (const link of document.querySelectorAll(".rooms a[data-room]")) {
  unread.set(link.dataset.room, Number(link.dataset.unread) || 0);
  unreadDirty = true;
}

function drawUnread() {
  unreadDirty = false;
  for (const link of document.querySelectorAll(".rooms a[data-room]")) {
    const count = link.dataset.room === room ? 0 : unread.get(link.dataset.room) || 0;
    const badge = link.querySelector(".unread");
    badge.hidden = count === 0;
    const shown = count > 99 ? "99+" : String(count);
    const visible = Object.assign(document.createElement("span"), { textContent: shown });
    visible.setAttribute("aria-hidden", "true");
    const spoken = Object.assign(document.createElement("span"), { className: "visually-hidden", textContent: `, ${shown} unread` });
    badge.replaceChildren(visible, spoken);
  }
}

let recount = null;
function recountSoon() {
  // Exact counts from the server, then the messages seen live after its answer.
  clearTimeout(recount);
  recount = setTimeout(async () => {
    try {
      const res = await fetch(`${config.apiBase}rooms/`, { credentials: "same-origin", headers: { Accept: "application/json" } });
      if (!res.ok) return;
      for (const r of (await res.json()).rooms) {
        const later = (liveSeqs.get(r.slug) || []).filter((seq) => seq > r.seq);
        liveSeqs.set(r.slug, later);
        unread.set(r.slug, r.unread + later.length);
      }
      unreadDirty = true;
      schedule();
    } catch (err) {
      /* offline: the next read.state asks again */
    }
  }, 300);
}

client.on("event", (ev) => {
  if (ev.room === room || ev.type !== "message.new" || ev.author === config.user) return;
  unread.set(ev.room, (unread.get(ev.room) || 0) + 1);
  liveSeqs.set(ev.room, [...(liveSeqs.get(ev.room) || []), ev.seq].slice(-500));
  unreadDirty = true;
  schedule();
});

// -- presence, typing, read markers (pushes: no seq, not stored) ----------------
const presenceLine = document.getElementById("presence");
const typingLine = document.getElementById("typing");
let present = new Set();
const typers = new Map(); // username -> time the notice expires
const markers = new Map(); // username -> seq they have read to (not ours)
let pushDirty = false;
const TYPING_SHOWN = 4000; // ms a notice stays without a new one
const TYPING_EVERY = 2000; // ms between our own typing frames

function later(fn, ms) {
  setTimeout(fn, ms);
}

client.on("ephemeral", (frame) => {
  if (frame.type === "read.state") {
    if (frame.room !== room) recountSoon();
    return;
  }
  if (frame.room !== room) return;
  if (frame.type === "presence.state") present = new Set(frame.users);
  else if (frame.type === "presence.diff") {
    for (const user of frame.joins) present.add(user);
    for (const user of frame.leaves) {
      present.delete(user);
      typers.delete(user);
    }
  } else if (frame.type === "typing") {
    typers.set(frame.user, Date.now() + TYPING_SHOWN);
    later(() => {
      pushDirty = true;
      schedule();
    }, TYPING_SHOWN + 50);
  } else if (frame.type === "read.markers") {
    for (const [user, seq] of Object.entries(frame.markers)) if (user !== config.user) markers.set(user, seq);
  } else if (frame.type === "read.marker") {
    if (frame.user !== config.user) markers.set(frame.user, Math.max(frame.seq, markers.get(frame.user) || 0));
  } else return;
  pushDirty = true;
  schedule();
});

function drawPushes() {
  pushDirty = false;
  const others = [...present].filter((u) => u !== config.user).sort();
  presenceLine.textContent = present.size ? `Here now: ${[...present].sort().join(", ")}` : "";
  presenceLine.dataset.count = String(others.length);
  const now = Date.now();
  for (const [user, until] of typers) if (until <= now) typers.delete(user);
  const names = [...typers.keys()].sort();
  typingLine.textContent =
    names.length === 0 ? "" : names.length === 1 ? `${names[0]} is typing…` : `${names.slice(0, -1).join(", ")} and ${names.at(-1)} are typing…`;
  // Read markers: each reader's name under the newest message they have read.
  for (const el of list.querySelectorAll(".readers")) el.remove();
  const byMessage = new Map();
  for (const [user, seq] of markers) {
    let best = null;
    for (const li of list.querySelectorAll('li[data-state="sent"]')) {
      const s = Number(li.dataset.seq);
      if (s <= seq && (!best || s > Number(best.dataset.seq))) best = li;
    }
    if (best) byMessage.set(best, [...(byMessage.get(best) || []), user]);
  }
  for (const [li, users] of byMessage) {
    li.append(Object.assign(document.createElement("div"), { className: "readers muted", textContent: `Seen by ${users.sort().join(", ")}` }));
  }
}

// -- marking this room read ---------------------------------------------------------
let readSent = 0;
let readTimer = null;
function markReadSoon() {
  if (readTimer || document.visibilityState !== "visible") return;
  readTimer = setTimeout(() => {
    readTimer = null;
    const seq = client.lastSeq(room);
    if (seq === null || seq <= readSent || document.visibilityState !== "visible") return;
    readSent = seq;
    client.markRead(room, seq).catch(() => {
      readSent = 0; // not sent: try again with the next event
    });
  }, 1000);
}

client.on("event", (ev) => {
  if (ev.room === room) markReadSoon();
});
client.on("snapshot", (snap) => {
  if (snap.room === room) markReadSoon();
});
document.addEventListener("visibilitychange", markReadSoon);

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
  let typingSent = 0;
  input.addEventListener("input", () => {
    // At most one typing frame every 2 s while the person types (the server
    // throttles too); nothing while the box is empty.
    if (!input.value.trim() || Date.now() - typingSent < TYPING_EVERY) return;
    typingSent = Date.now();
    client.typing(room);
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
  if (slug !== room) client.subscribe(slug, { background: true });
}
client.connect();
schedule(); // the room list's first counts
window.realtimeClient = client; // for debugging and the browser tests
