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

  // Stopped (signed out, removed from the room): who is here and typing is no
  // longer ours to know; a draw already scheduled, or a late answer, shows nothing.
  let stopped = false;

  function draw() {
    if (stopped) {
      presenceLine.textContent = typingLine.textContent = "";
      presenceLine.dataset.count = "0";
      return;
    }
    presenceLine.textContent = hereNow([...present], count);
    presenceLine.dataset.count = String(Math.max(0, count - (present.has(user) ? 1 : 0)));
    const now = Date.now();
    for (const [u, until] of typers) if (until <= now) typers.delete(u);
    const names = [...typers.keys()].sort();
    typingLine.textContent =
      names.length === 0 ? "" : names.length === 1 ? `${names[0]} is typing…` : `${names.slice(0, -1).join(", ")} and ${names.at(-1)} are typing…`;
  }

  /** Read markers: each reader's name under the newest rendered message they have read
   * (readerPlacement). */
  function drawReaders(list, { attached = true } = {}) {
    for (const el of list.querySelectorAll(".readers")) el.remove();
    if (!markers.size) return;
    const rendered = [...list.querySelectorAll('li[data-state="sent"]')];
    const shown = rendered.map((li) => ({ seq: Number(li.dataset.seq), author: li.dataset.author }));
    for (const [i, users] of readerPlacement(shown, markers, attached)) {
      rendered[i].append(Object.assign(document.createElement("div"), { className: "readers muted", textContent: `Seen by ${users.join(", ")}` }));
    }
  }

  /** Tell the room we are typing (the client picks the socket, or REST while polling). */
  function typing() {
    client.typing(room);
  }

  function stop() {
    stopped = true;
    clearTimeout(typingTimer);
    draw();
  }

  return { drawReaders, typing, stop, hasMarkers: () => markers.size > 0 };
}

/** Where the read markers go: `rendered` is the messages shown ({seq, author}, in seq
 * order), `markers` each reader's read position (name -> seq). A reader's name goes
 * under the newest shown message they have read, and nowhere when that message is
 * their own (writing it says they saw it, and everything before it) or, with the
 * timeline not `attached` to the room's newest, when they have read past what is
 * shown. Returns index in `rendered` -> names in name order. */
export function readerPlacement(rendered, markers, attached = true) {
  const placed = new Map();
  const last = rendered.length ? rendered.at(-1).seq : 0;
  for (const [user, seq] of markers) {
    if (seq > last && !attached) continue;
    let best = -1;
    for (let i = 0; i < rendered.length && rendered[i].seq <= seq; i++) best = i;
    if (best < 0 || rendered[best].author === user) continue;
    placed.set(best, [...(placed.get(best) || []), user]);
  }
  for (const users of placed.values()) users.sort();
  return placed;
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
