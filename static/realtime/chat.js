// Chat page: wires one room's view to a RealtimeClient. The parts are modules in
// ui/: api.js (REST calls), messages.js + message.js + timeline.js (the message
// list, all of history a window at a time), format.js and dates.js (how a message
// reads), composer.js (sending), presence.js (here now, typing, read markers),
// sidebar.js + roomlist.js (rooms and DMs, unread and mention counts),
// roomdialogs.js (new room, browse, new DM), members.js (the members panel, leave),
// picker.js + reactions.js (reactions), mentionbox.js (@-autocomplete), search.js +
// snippet.js (search), notify.js (desktop notifications), status.js (the
// connection badge and its buttons). DOM writes are batched per animation frame
// (schedule below); every text goes in as text, never as HTML.
import { RealtimeClient } from "./client.js";
import { makeApi } from "./ui/api.js";
import { bindComposer } from "./ui/composer.js";
import { bindMembers } from "./ui/members.js";
import { bindMentionBox } from "./ui/mentionbox.js";
import { createMessageView } from "./ui/messages.js";
import { bindNotify } from "./ui/notify.js";
import { bindPicker } from "./ui/picker.js";
import { bindPresence } from "./ui/presence.js";
import { bindRoomDialogs } from "./ui/roomdialogs.js";
import { pageTitle, roomLabel } from "./ui/roomlist.js";
import { bindSearch } from "./ui/search.js";
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
const MAX_PAGES_TO_TARGET = 10; // a search result up to 2000 messages back opens in place
let readAt = config.read ?? null; // how far this user had read, when the page opened
// A search result (or a notification) opens the room at a message: ?at=<its seq>.
let openAt = Number(new URLSearchParams(location.search).get("at")) || null;
async function loadSnapshot(slug) {
  let snap = await api.messages(slug, { limit: 200 });
  const back = openAt !== null ? openAt : readAt !== null && readAt > 0 ? readAt + 1 : null;
  const pages = openAt !== null ? MAX_PAGES_TO_TARGET : MAX_PAGES_TO_UNREAD;
  if (back !== null) {
    for (let i = 1; i < pages && snap.has_more && snap.messages.length && snap.messages[0].seq > back; i++) {
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
  pollLeave: api.pollLeave,
  post: api.post,
  edit: api.edit,
  remove: api.remove,
  read: api.read,
  react: api.react,
  typing: api.typing,
  user: me,
  maxBodyLength: config.maxBodyLength,
});

const presence = bindPresence(client, {
  room, user: me, presenceLine: $("presence"), typingLine: $("typing"), schedule,
  onMarkers: () => schedule(() => view.decorate()),
});
const pick = bindPicker();
const view = createMessageView({
  list, room, me, api, client, schedule,
  canPost: config.canPost,
  canModerate: config.canModerate,
  afterRender: (el, where) => presence.drawReaders(el, where),
  react: (m, emoji, add, failed) => client.react(room, m.id, emoji, add).catch(failed),
  pick,
});
const composer = bindComposer(client, { room, me, view, presence, form: $("composer"), input: $("body") });

// -- the room list, the tab's title ------------------------------------------------------
let othersUnread = 0; // unread in the other rooms (the sidebar's count)
let unseenHere = 0; // messages by others that arrived here while the tab was hidden
const label = config.kind === "dm" ? config.title : `#${room}`;
function drawTitle() {
  document.title = pageTitle(othersUnread + unseenHere, label);
}
const sidebar = bindSidebar(client, {
  room, user: me, api, schedule, rooms: config.rooms,
  onCounts: (total) => {
    othersUnread = total;
    drawTitle();
  },
  onRooms: ({ added, gone }) => {
    // A room someone added us to (or a DM opened with us): follow it for its counts.
    for (const slug of added) if (slug !== room) client.subscribe(slug, { background: true });
    for (const slug of gone) if (slug !== room) client.unsubscribe(slug);
  },
});
client.on("event", (ev) => {
  if (ev.room === room && ev.type === "message.new" && ev.author !== me && document.visibilityState !== "visible") {
    unseenHere += 1;
    drawTitle();
  }
});
document.addEventListener("visibilitychange", () => {
  if (document.visibilityState === "visible" && unseenHere) {
    unseenHere = 0;
    drawTitle();
  }
});
const labelOf = (slug) => (sidebar.room(slug) ? roomLabel(sidebar.room(slug)) : `#${slug}`);
bindRoomDialogs({ api, me });
bindSearch({ api, room, labelOf });
bindNotify(client, { me, button: $("notify-button"), kindOf: (slug) => sidebar.room(slug)?.kind, labelOf });
const members = bindMembers(client, {
  room, me, api, kind: config.kind, role: config.role,
  onRemoved: (by) => removedState(`${by} removed you from this room.`),
});
bindMentionBox({ input: $("body"), list: $("mention-list"), names: members.names, me });

client.on("snapshot", (snap) => {
  if (snap.room !== room) return;
  view.snapshot(snap, readAt, openAt);
  readAt = null; // the divider is for the opening only
  openAt = null;
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

// Removed from the room while viewing it (a private room's stream ends with
// not_found; in a public one our member.left says who): the room stays on screen,
// read-only, and says so.
function removedState(text) {
  if ($("access-notice")) return;
  const p = notice("access-notice", text, { href: "/", text: "Back to your rooms" });
  const form = $("composer");
  if (form) {
    for (const el of form.querySelectorAll("textarea, button")) el.disabled = true;
    form.setAttribute("aria-describedby", p.id);
    form.before(p);
  } else list.after(p);
  readOnly();
}
// The page after losing the room or the session: messages stay readable, nothing
// on them or the room can be acted on.
function readOnly() {
  list.classList.add("removed");
  view.readOnly();
  presence.stop(); // who is here and typing: no longer ours to know, no stale line
  for (const id of ["leave-button", "members-button"]) if ($(id)) $(id).disabled = true;
}
client.on("error", (err) => {
  if (err.room !== room || (err.code !== "forbidden" && err.code !== "not_found")) return;
  removedState("You were removed from this room.");
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
      readOnly();
      // There is no session left to end (the status beside the badge offers signing in).
      if ($("logout-form")) $("logout-form").remove();
    }
  },
});
client.on("state", ({ state }) => {
  if (state === "open" && !$("signed-out") && !$("access-notice")) composer.resume();
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

// Leaving the page closes the client: the socket, or the polls with their goodbye
// (pagehide too: mobile browsers may skip beforeunload).
for (const type of ["beforeunload", "pagehide"]) window.addEventListener(type, () => client.close());
client.subscribe(room);
// The other listed rooms, in the background (unread and mention counts).
for (const r of config.rooms) {
  if (r.slug !== room && r.role !== null) client.subscribe(r.slug, { background: true });
}
client.connect();
window.realtimeClient = client; // for debugging and the browser tests
