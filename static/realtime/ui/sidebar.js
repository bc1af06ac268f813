// The room list: an unread count on each other room. The page starts from the
// server's counts (the read position it keeps per user, on every device), counts
// new messages by others seen live, and asks the server again when this user reads
// a room elsewhere (read.state), when a room was reset, and every 15 s while long
// polling (other rooms are not followed then).

const POLL_COUNTS = 15000; // ms between counts while long polling

export function bindSidebar(client, { room, user, api, schedule }) {
  const links = () => document.querySelectorAll(".rooms a[data-room]");
  const unread = new Map(); // slug -> count
  const liveSeqs = new Map(); // slug -> seqs of messages by others seen live since the count
  for (const link of links()) unread.set(link.dataset.room, Number(link.dataset.unread) || 0);

  function draw() {
    for (const link of links()) {
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

  async function recount() {
    // Exact counts from the server, then the messages seen live after its answer.
    const answer = await api.rooms();
    for (const r of answer.rooms) {
      const later = (liveSeqs.get(r.slug) || []).filter((seq) => seq > r.seq);
      liveSeqs.set(r.slug, later);
      unread.set(r.slug, r.unread + later.length);
    }
    schedule(draw);
  }

  let recountTimer = null;
  function recountSoon() {
    clearTimeout(recountTimer);
    recountTimer = setTimeout(() => recount().catch(() => {}), 300);
  }

  client.on("event", (ev) => {
    if (ev.room === room || ev.type !== "message.new" || ev.author === user) return;
    unread.set(ev.room, (unread.get(ev.room) || 0) + 1);
    liveSeqs.set(ev.room, [...(liveSeqs.get(ev.room) || []), ev.seq].slice(-500));
    schedule(draw);
  });
  client.on("ephemeral", (frame) => {
    if (frame.type === "read.state" && frame.room !== room) recountSoon();
  });
  client.on("reset", ({ room: slug }) => {
    if (slug !== room) recountSoon();
  });
  client.on("error", (err) => {
    // A room of the list we may no longer see: stop counting it.
    if (err.room && err.room !== room && unread.delete(err.room)) schedule(draw);
  });

  // Long polling follows only this room: the others' counts come from the server.
  let pollTimer = null;
  function pollCounts() {
    pollTimer = null;
    if (client.transport !== "poll") return;
    recount().catch(() => {});
    pollTimer = setTimeout(pollCounts, POLL_COUNTS);
  }
  client.on("state", () => {
    if (client.transport === "poll" && !pollTimer) pollTimer = setTimeout(pollCounts, 0);
  });

  schedule(draw);
  return { recount };
}
