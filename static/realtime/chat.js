// Chat page: wires one room's view to a RealtimeClient. The parts are modules in
// ui/: api.js (REST calls), messages.js + message.js + timeline.js (the message
// list, all of history a window at a time), format.js and dates.js (how a message
// reads), composer.js (sending), presence.js (here now, typing, read markers),
// sidebar.js (unread counts of the other rooms), status.js (the connection badge
// and its buttons). DOM writes are batched per animation frame (schedule below);
// every text goes in as text, never as HTML.
import { RealtimeClient } from "./client.js";
import { makeApi } from "./ui/api.js";
import { bindComposer } from "./ui/composer.js";
import { createMessageView } from "./ui/messages.js";
import { bindPresence } from "./ui/presence.js";
import { bindSidebar } from "./ui/sidebar.js";
import { bindStatus, loginHref } from "./ui/status.js";

const config = JSON.parse(document.getElementById("realtime-config").textContent);
const room = config.room;
const me = config.user;
const api = makeApi(config.apiBase);
const $ = (id) => document.getElementById(id);
const list = $("messages");

// -- one DOM write pass per animation frame --------------------------------------
const jobs = new Set();
let frameRequested = false;
function schedule(job) {
  jobs.add(job);
  if (frameRequested) return;
  frameRequested = true;
  requestAnimationFrame(() => {
    frameRequested = false;
    const now = [...jobs];
    jobs.clear();
    for (const fn of now) fn();
  });
}

// -- history: the newest page, or back to the first unread message on opening -----
const MAX_PAGES_TO_UNREAD = 5; // further back than 1000 messages, open at the oldest loaded
let readAt = config.read ?? null; // how far this user had read, when the page opened
async function loadSnapshot(slug) {
  let snap = await api.messages(slug, { limit: 200 });
  if (readAt !== null && readAt > 0) {
    for (let i = 1; i < MAX_PAGES_TO_UNREAD && snap.has_more && snap.messages.length && snap.messages[0].seq > readAt + 1; i++) {
      const older = await api.messages(slug, { before: snap.messages[0].seq, limit: 200 });
      snap = { ...snap, has_more: older.has_more, messages: [...older.messages, ...snap.messages] };
    }
  }
  return snap;
}

const client = new RealtimeClient({
  url: `${location.protocol === "https:" ? "wss:" : "ws:"}//${location.host}${config.wsPath}`,
  loadSnapshot,
  poll: api.poll,
  post: api.post,
  edit: api.edit,
  remove: api.remove,
  read: api.read,
  user: me,
  maxBodyLength: config.maxBodyLength,
});

const presence = bindPresence(client, {
  room, user: me, api, presenceLine: $("presence"), typingLine: $("typing"), schedule,
  onMarkers: () => schedule(() => view.decorate()),
});
const view = createMessageView({
  list, room, me, api, client, schedule,
  canPost: config.canPost,
  canModerate: config.canModerate,
  afterRender: (el, where) => presence.drawReaders(el, where),
});
const composer = bindComposer(client, { room, me, view, presence, form: $("composer"), input: $("body") });
bindSidebar(client, { room, user: me, api, schedule });

client.on("snapshot", (snap) => {
  if (snap.room !== room) return;
  view.snapshot(snap, readAt);
  readAt = null; // the divider is for the opening only
});
client.on("event", (ev) => {
  if (ev.room !== room) return;
  view.event(ev);
  if (ev.type === "message.new" && ev.author !== me) announce(`${ev.author}: ${ev.body.slice(0, 200)}`);
});
client.on("reset", ({ room: slug }) => {
  if (slug === room) schedule(() => {});
});

// New messages by others, read out once (the list itself is not a live region:
// scrolling through history adds nodes that must not be read out).
const announcer = $("announce");
function announce(text) {
  if (announcer) announcer.textContent = text;
}

// -- losing access, the session, or the connection --------------------------------
function notice(id, text, link) {
  const p = document.createElement("p");
  p.className = "error notice";
  p.id = id;
  p.setAttribute("role", "alert");
  p.append(text);
  if (link) p.append(" ", Object.assign(document.createElement("a"), { href: link.href, textContent: link.text }));
  return p;
}

client.on("error", (err) => {
  if (err.room !== room || (err.code !== "forbidden" && err.code !== "not_found")) return;
  // Access was taken away while the page was open.
  const p = notice("access-notice", `You no longer have access to this room (${err.message}).`);
  if ($("composer")) $("composer").replaceWith(p);
  else list.after(p);
});

bindStatus(client, {
  badge: $("status"),
  live: $("status-live"),
  actions: $("status-actions"),
  loginUrl: config.loginUrl,
  onStop(reason) {
    if (reason === "unauthenticated" && !$("signed-out")) {
      const p = notice("signed-out", "You were signed out (in another tab or window).", { href: loginHref(config.loginUrl), text: "Sign in again" });
      if ($("composer")) composer.signedOut(p);
      else list.after(p);
    }
  },
});
client.on("state", ({ state }) => {
  if (state === "open" && !$("signed-out")) composer.resume();
});

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
client.on("event", (ev) => ev.room === room && markReadSoon());
client.on("snapshot", (snap) => snap.room === room && markReadSoon());
document.addEventListener("visibilitychange", markReadSoon);

window.addEventListener("beforeunload", () => client.close());
client.subscribe(room);
for (const link of document.querySelectorAll(".rooms a[data-room]")) {
  const slug = link.dataset.room;
  if (slug !== room) client.subscribe(slug, { background: true });
}
client.connect();
window.realtimeClient = client; // for debugging and the browser tests
