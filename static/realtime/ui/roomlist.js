// The room list's pure logic: which rooms the sidebar shows and how (rooms and
// direct messages apart, a DM named by the other people), the text of the unread
// and mention badges, and the tab's title with the total unread. No DOM code.

/** A count as a badge shows it. */
export function countText(n) {
  return n > 99 ? "99+" : String(n);
}

/** The badges of one room: {unread, mentions} visible texts (null: no badge) and
 * what a screen reader hears after the room's name. */
export function badges({ unread = 0, mentions = 0 } = {}) {
  const spoken = [];
  if (unread > 0) spoken.push(`${countText(unread)} unread`);
  if (mentions > 0) spoken.push(`${countText(mentions)} ${mentions === 1 ? "mention" : "mentions"}`);
  return {
    unread: unread > 0 ? countText(unread) : null,
    mentions: mentions > 0 ? `@${countText(mentions)}` : null,
    spoken: spoken.map((s) => `, ${s}`).join(""),
  };
}

/** A DM's name: the other people, sorted (the server's title says the same). */
export function dmName(usernames, me) {
  const others = [...new Set(usernames)].filter((u) => u !== me).sort((a, b) => a.localeCompare(b));
  return others.length ? others.join(", ") : me;
}

/** How a room is named in the list and the tab: "#slug", or a DM's people. */
export function roomLabel(room) {
  return room.kind === "dm" ? room.title : `#${room.slug}`;
}

/** The sidebar's two lists: rooms one is a member of (and the open one), and DMs.
 * Public rooms one is not in are for "Browse rooms". */
export function sidebarGroups(rooms, current) {
  const mine = rooms.filter((r) => r.role !== null || r.slug === current);
  const byLabel = (a, b) => roomLabel(a).localeCompare(roomLabel(b));
  return {
    rooms: mine.filter((r) => r.kind !== "dm").sort((a, b) => a.slug.localeCompare(b.slug)),
    dms: mine.filter((r) => r.kind === "dm").sort(byLabel),
  };
}

/** Unread messages over every listed room but the open one. */
export function totalUnread(counts, current) {
  let total = 0;
  for (const [slug, c] of counts) if (slug !== current) total += c.unread || 0;
  return total;
}

/** The tab's title: "(3) #room · Realtime". */
export function pageTitle(total, label, site = "Realtime") {
  const base = site ? `${label} · ${site}` : label;
  return total > 0 ? `(${countText(total)}) ${base}` : base;
}
