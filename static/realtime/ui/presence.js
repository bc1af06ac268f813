// Who is here, who is typing, and how far the others have read (pushes: no seq,
// not stored). They come as the client's "ephemeral" frames: over the socket, or in
// the long polls' answers while falling back (the same frames; our own typing then
// goes over REST, see client.typing). A typing notice ends when that person's
// message arrives (or after TYPING_SHOWN ms without a new one). Who is here is a
// count and the names the server gave (a first page and the diffs since): a big
// room shows SHOWN of them "and N others"; a diff that could not name everyone
// (partial) has the first page asked for again.

const TYPING_SHOWN = 4000; // ms a notice stays without a new one
const SHOWN = 8; // names on the "Here now" line, at most
export const TYPING_EVERY = 2000; // ms between our own typing notices

export function bindPresence(client, { room, user, presenceLine, typingLine, schedule, onMarkers }) {
  let present = new Set();
  let count = 0; // how many are here (the server's count; names may be fewer)
  const typers = new Map(); // username -> time the notice expires
  const markers = new Map(); // username -> seq they have read to (not ours)
  let typingTimer = null;

  function changed() {
    schedule(draw);
  }

  function expireSoon() {
    clearTimeout(typingTimer);
    if (!typers.size) return;
    const next = Math.min(...typers.values()) - Date.now();
    typingTimer = setTimeout(changed, Math.max(0, next) + 20);
  }

  client.on("ephemeral", (frame) => {
    if (frame.room !== room) return;
    if (frame.type === "presence.state") {
      present = new Set(frame.users);
      count = frame.count ?? present.size;
    } else if (frame.type === "presence.diff") {
      for (const u of frame.joins) present.add(u);
      for (const u of frame.leaves) {
        present.delete(u);
        typers.delete(u);
      }
      count = frame.count ?? present.size;
      if (frame.partial) refresh();
    } else if (frame.type === "typing") {
      typers.set(frame.user, Date.now() + TYPING_SHOWN);
      expireSoon();
    } else if (frame.type === "read.markers") {
      for (const [u, seq] of Object.entries(frame.markers)) if (u !== user) markers.set(u, seq);
      return onMarkers();
    } else if (frame.type === "read.marker") {
      if (frame.user !== user) markers.set(frame.user, Math.max(frame.seq, markers.get(frame.user) || 0));
      return onMarkers();
    } else return;
    changed();
  });

  // Their message is what they were typing: the notice ends with it.
  client.on("event", (ev) => {
    if (ev.room === room && ev.type === "message.new" && typers.delete(ev.author)) changed();
  });

  // Some came or went unnamed: the first page again (the names we show).
  let refreshing = false;
  function refresh() {
    if (refreshing) return;
    refreshing = true;
    client.presencePage(room).then((page) => {
      if (page) {
        present = new Set(page.users);
        count = page.count;
        changed();
      }
    }, () => {}).finally(() => {
      refreshing = false;
    });
  }

  function draw() {
    presenceLine.textContent = hereNow([...present], count);
    presenceLine.dataset.count = String(Math.max(0, count - (present.has(user) ? 1 : 0)));
    const now = Date.now();
    for (const [u, until] of typers) if (until <= now) typers.delete(u);
    const names = [...typers.keys()].sort();
    typingLine.textContent =
      names.length === 0 ? "" : names.length === 1 ? `${names[0]} is typing…` : `${names.slice(0, -1).join(", ")} and ${names.at(-1)} are typing…`;
  }

  /** Read markers: each reader's name under the newest rendered message they have read. */
  function drawReaders(list, { attached = true } = {}) {
    for (const el of list.querySelectorAll(".readers")) el.remove();
    if (!markers.size) return;
    const rendered = [...list.querySelectorAll('li[data-state="sent"]')];
    const byMessage = new Map();
    const last = rendered.length ? Number(rendered.at(-1).dataset.seq) : 0;
    for (const [u, seq] of markers) {
      if (seq > last && !attached) continue; // read past what is rendered here
      let best = null;
      for (const li of rendered) if (Number(li.dataset.seq) <= seq) best = li; // in seq order
      if (best) byMessage.set(best, [...(byMessage.get(best) || []), u]);
    }
    for (const [li, users] of byMessage) {
      li.append(Object.assign(document.createElement("div"), { className: "readers muted", textContent: `Seen by ${users.sort().join(", ")}` }));
    }
  }

  /** Tell the room we are typing (the client picks the socket, or REST while polling). */
  function typing() {
    client.typing(room);
  }

  return { drawReaders, typing, hasMarkers: () => markers.size > 0 };
}

/** The "Here now" line: the people we know by name in name order, at most SHOWN
 * of them, and "and N others" for the rest of `count`. */
export function hereNow(names, count, shown = SHOWN) {
  if (!count && !names.length) return "";
  const listed = [...new Set(names)].sort().slice(0, shown);
  const rest = Math.max(count, names.length) - listed.length;
  if (rest <= 0) return `Here now: ${listed.join(", ")}`;
  return `Here now: ${listed.join(", ")} and ${rest.toLocaleString("en")} ${rest === 1 ? "other" : "others"}`;
}
