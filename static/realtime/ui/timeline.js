// The open room's stored messages, in seq order: a contiguous run from the oldest
// page loaded to the live head, and whether older ones exist. It merges history
// pages (older ones prepended as the person scrolls up) with live events, so that
// neither overwrites the other with something older: an event that a page in
// flight did not see yet (an edit, a delete) wins over that page. Reactions
// (reaction.added/removed: deltas on a page's whole {emoji: [users]}) and mentions
// (replaced by an edit's list) live on each item. No DOM code.

import { applyReaction } from "./reactions.js";

/** The first index in `items` (sorted by seq) whose seq is >= seq. */
export function lowerBound(items, seq) {
  let lo = 0;
  let hi = items.length;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (items[mid].seq < seq) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

const REMEMBERED = 2000; // edits and deletes of messages not loaded, kept for pages in flight

export class Timeline {
  constructor() {
    this.reset();
  }

  /** Forget everything (a new snapshot follows). */
  reset() {
    this.items = []; // {id, seq, author, body, ts, edited_at, client_id, version}
    this.byId = new Map();
    this.hasOlder = false;
    this.head = 0; // the log's seq the contents are current to
    this.gone = new Map(); // id -> seq of its delete event
    this.edits = new Map(); // id -> the latest edit event of a message not loaded
  }

  get size() {
    return this.items.length;
  }

  get oldestSeq() {
    return this.items.length ? this.items[0].seq : null;
  }

  /** A snapshot: the newest page(s) of the room, current to snap.seq. */
  load(snap) {
    this.reset();
    this.head = snap.seq || 0;
    this.hasOlder = !!snap.has_more;
    for (const m of snap.messages) this._insert(m, this.head);
  }

  /** A page of older messages (before the oldest loaded one), current to page.seq.
   * Returns how many were added. */
  prepend(page) {
    const oldest = this.oldestSeq;
    const version = page.seq || 0;
    const older = [];
    for (const m of page.messages) {
      if (oldest !== null && m.seq >= oldest) continue; // we have it, from the live side
      const item = this._version(m, version);
      if (!item || this.byId.has(item.id)) continue;
      older.push(item);
      this.byId.set(item.id, item);
    }
    older.sort((a, b) => a.seq - b.seq);
    // One copy per page (not a splice per message: 100,000 messages stay linear).
    if (older.length) this.items = older.concat(this.items);
    this.hasOlder = !!page.has_more;
    return older.length;
  }

  /** A page's message as stored here, with any newer edit applied; null if it was
   * deleted after the page was read. */
  _version(m, version) {
    const deletedAt = this.gone.get(m.id);
    if (deletedAt !== undefined && deletedAt > version) return null;
    const item = { ...m, version };
    const edit = this.edits.get(m.id);
    if (edit && edit.seq > version) Object.assign(item, { body: edit.body, edited_at: edit.edited_at, mentions: edit.mentions || [], version: edit.seq });
    return item;
  }

  _insert(m, version) {
    const item = this._version(m, version);
    if (!item || this.byId.has(item.id)) return;
    const at = lowerBound(this.items, item.seq);
    this.items.splice(at, 0, item);
    this.byId.set(item.id, item);
  }

  _remember(map, id, value) {
    map.set(id, value);
    if (map.size > REMEMBERED) map.delete(map.keys().next().value);
  }

  /** A room event (in seq order, once: rooms.js sees to it). Returns the changed
   * item's id, or null if nothing shown changed. */
  apply(ev) {
    if (ev.seq > this.head) this.head = ev.seq;
    if (ev.type === "message.new") {
      const held = this.byId.get(ev.id);
      if (held) {
        // Our own message, shown from its ack: the event adds what the server resolved.
        if (held.mentions !== undefined) return null;
        held.mentions = ev.mentions || [];
        return ev.id;
      }
      const { type, room, ...m } = ev;
      this._insert({ mentions: [], ...m }, ev.seq);
      return ev.id;
    }
    const item = this.byId.get(ev.id);
    if (ev.type === "message.edited") {
      if (!item) {
        this._remember(this.edits, ev.id, ev);
        return null;
      }
      if (item.version > ev.seq) return null;
      Object.assign(item, { body: ev.body, edited_at: ev.edited_at, mentions: ev.mentions || [], version: ev.seq });
      return ev.id;
    }
    if (ev.type === "reaction.added" || ev.type === "reaction.removed") {
      // A page current to a later seq has it already; a message not held is ignored.
      if (!item || item.version >= ev.seq) return null;
      item.reactions = applyReaction(item.reactions, ev);
      return ev.id;
    }
    if (ev.type === "message.deleted") {
      this._remember(this.gone, ev.id, ev.seq);
      if (!item) return null;
      this.items.splice(lowerBound(this.items, item.seq), 1);
      this.byId.delete(ev.id);
      return ev.id;
    }
    return null;
  }

  /** Our own message, acked before its event arrived: shown as stored now. */
  acked(m) {
    if (this.byId.has(m.id)) return false;
    this._insert(m, m.seq);
    return true;
  }
}
