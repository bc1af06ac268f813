// The room list: rooms and direct messages apart (roomlist.js decides which and
// how they are named), an unread badge and a distinct mention badge ("@2") on
// each other room, and at phone width the toggle that shows and hides it. It
// starts from the server's counts (the read position it keeps per user), counts
// messages by others seen live (the other rooms are followed in the background),
// and asks the server again (GET rooms/) when the server says the list changed
// (rooms.changed: someone added us to a room or opened a DM with us, or we were
// removed), when the socket opens again (a push may have been missed meanwhile),
// when the tab comes back, when this user reads a room elsewhere (read.state), when
// a room was reset, and every POLL_ROOMS ms while long polling (no pushes then).

import { badges, countText, roomLabel, sidebarGroups } from "./roomlist.js";

const POLL_ROOMS = 8000; // ms between asks for the room list while long polling and visible

export function bindSidebar(client, { room, user, api, schedule, rooms: initial, onRooms, onCounts }) {
  const $ = (id) => document.getElementById(id);
  const byslug = new Map(initial.map((r) => [r.slug, { ...r }])); // slug -> summary (counts live)
  const liveSeqs = new Map(); // slug -> [{seq, mention}] messages by others seen live since the count
  const current = byslug.get(room) || null;
  const mentionsMe = (ev) => (ev.mentions || []).some((u) => u.toLowerCase() === user.toLowerCase());

  function link(r) {
    const li = document.createElement("li");
    const a = document.createElement("a");
    a.href = `/rooms/${encodeURIComponent(r.slug)}/`;
    a.dataset.room = r.slug;
    a.dataset.kind = r.kind;
    if (r.slug === room) a.setAttribute("aria-current", "page");
    const name = Object.assign(document.createElement("span"), { className: "name", textContent: roomLabel(r) });
    if (r.kind !== "dm" && !r.is_public) {
      // Seen, not read out: the name stays "#ops, 2 unread" (the room says it is private).
      const lock = Object.assign(document.createElement("span"), { className: "lock", textContent: "🔒", title: "private" });
      lock.setAttribute("aria-hidden", "true");
      name.append(" ", lock);
    }
    const b = badges(r.slug === room ? {} : r);
    const unread = document.createElement("span");
    unread.className = "unread";
    unread.hidden = !b.unread;
    if (b.unread) unread.append(hidden(b.unread, true), hidden(`, ${countText(r.unread)} unread`));
    const mentions = document.createElement("span");
    mentions.className = "mentions";
    mentions.hidden = !b.mentions;
    if (b.mentions) mentions.append(hidden(b.mentions, true), hidden(`, ${countText(r.mentions)} ${r.mentions === 1 ? "mention" : "mentions"}`));
    a.append(name, mentions, unread);
    li.append(a);
    return li;
  }

  function hidden(text, ariaHidden = false) {
    const span = document.createElement("span");
    span.textContent = text;
    if (ariaHidden) span.setAttribute("aria-hidden", "true");
    else span.className = "visually-hidden";
    return span;
  }

  function draw() {
    const all = [...byslug.values()];
    if (current && !byslug.has(room)) all.push(current);
    const groups = sidebarGroups(all, room);
    $("room-list").replaceChildren(...groups.rooms.map(link));
    $("dm-list").replaceChildren(...(groups.dms.length ? groups.dms.map(link)
      : [Object.assign(document.createElement("li"), { className: "muted empty", textContent: "None yet" })]));
    let total = 0; // over the listed rooms only (not public ones we are not in)
    for (const r of [...groups.rooms, ...groups.dms]) if (r.slug !== room) total += r.unread || 0;
    const toggleCount = $("toggle-count");
    toggleCount.hidden = total === 0;
    toggleCount.textContent = total ? ` (${countText(total)} unread)` : "";
    if (onCounts) onCounts(total);
  }

  async function recount() {
    // Exact counts from the server, then the messages seen live after its answer.
    const answer = await api.rooms();
    const before = new Set(byslug.keys());
    const seen = new Set();
    for (const r of answer.rooms) {
      seen.add(r.slug);
      const later = (liveSeqs.get(r.slug) || []).filter((m) => m.seq > r.seq);
      liveSeqs.set(r.slug, later);
      byslug.set(r.slug, { ...r, unread: r.unread + later.length, mentions: r.mentions + later.filter((m) => m.mention).length });
    }
    for (const slug of before) if (!seen.has(slug)) byslug.delete(slug);
    const listed = (slug) => byslug.has(slug) && (byslug.get(slug).role !== null || slug === room);
    const added = [...seen].filter((s) => listed(s) && !before.has(s));
    const gone = [...before].filter((s) => !seen.has(s));
    if (onRooms && (added.length || gone.length)) onRooms({ added, gone });
    schedule(draw);
  }

  let recountTimer = null;
  function recountSoon(wait = 300) {
    clearTimeout(recountTimer);
    recountTimer = setTimeout(() => {
      recountTimer = null;
      recount().catch(() => {}).finally(() => {
        if (document.visibilityState === "visible" && client.transport !== "ws") recountSoon(POLL_ROOMS);
      });
    }, wait);
  }
  document.addEventListener("visibilitychange", () => {
    if (document.visibilityState === "visible") recountSoon(0);
  });

  client.on("event", (ev) => {
    if (ev.room === room || ev.type !== "message.new" || ev.author === user) return;
    const r = byslug.get(ev.room);
    if (!r) return;
    const mention = mentionsMe(ev);
    r.unread = (r.unread || 0) + 1;
    if (mention) r.mentions = (r.mentions || 0) + 1;
    liveSeqs.set(ev.room, [...(liveSeqs.get(ev.room) || []), { seq: ev.seq, mention }].slice(-500));
    schedule(draw);
  });
  client.on("ephemeral", (frame) => {
    if (frame.type === "rooms.changed") recountSoon(0);
    else if (frame.type === "read.state" && frame.room !== room) recountSoon();
  });
  let opens = 0; // (the first open is the page's: it came with the server's list)
  client.on("state", ({ state }) => {
    if (state === "open" && opens++ > 0) recountSoon(0);
    else if (client.transport !== "ws" && recountTimer === null) recountSoon(POLL_ROOMS);
  });
  client.on("reset", ({ room: slug }) => {
    if (slug !== room) recountSoon();
  });
  client.on("error", (err) => {
    // A room of the list we may no longer see: ask the server what is left.
    if (err.room && err.room !== room && (err.code === "not_found" || err.code === "forbidden")) recountSoon();
  });

  // -- phone width: the list hides behind a button -------------------------------------
  const toggle = $("sidebar-toggle");
  const sidebar = $("sidebar");
  function setOpen(open) {
    sidebar.classList.toggle("open", open);
    toggle.setAttribute("aria-expanded", String(open));
    if (open) (sidebar.querySelector("a[aria-current]") || sidebar.querySelector("a, button, input")).focus();
  }
  toggle.addEventListener("click", () => setOpen(!sidebar.classList.contains("open")));
  // A dialog opened from the list (new room, browse, new message, search) takes its
  // place; a click beside it closes it.
  const hide = () => {
    sidebar.classList.remove("open");
    toggle.setAttribute("aria-expanded", "false");
  };
  sidebar.addEventListener("click", (e) => {
    if (e.target.closest("[aria-haspopup]")) hide();
  });
  $("search-form").addEventListener("submit", hide);
  document.addEventListener("click", (e) => {
    if (sidebar.classList.contains("open") && !sidebar.contains(e.target) && !toggle.contains(e.target) && !e.target.closest("dialog")) hide();
  });
  sidebar.addEventListener("keydown", (e) => {
    if (e.key === "Escape" && sidebar.classList.contains("open")) {
      setOpen(false);
      toggle.focus();
    }
  });

  schedule(draw);
  return { recount, close: () => setOpen(false), room: (slug) => byslug.get(slug) || null };
}
