// The rooms this client follows, and the delivery guarantee on its side: each
// room's last applied seq and the epoch of the log it counts in (a resume sends
// both: a log started again answers recovery_failed, never another history); events applied exactly once and in seq order (later
// ones held until the gap fills); a gap asks for a replay (subscribe with since);
// recovery_failed (too far behind) resets the room and loads its snapshot again;
// a snapshot that fails to load is retried with backoff. No DOM code.
//
// Its host (the client) provides emit, timers, random, backoff, state, transport,
// socket (opened, write(frame)) and outbox (echo(frame)).

import { ErrorCode } from "./codes.js";
import { State, backoffDelay } from "./state.js";

// Frames without a place in a room's log.
const EPHEMERAL = new Set(["typing", "presence.state", "presence.diff", "read.state", "read.marker", "read.markers", "rooms.changed", "metrics.tick"]);

/** Room events carry the room's seq; pushes (typing, presence, read markers,
 * metrics) are ephemeral, even those that carry a seq of their own. */
export function isRoomEvent(frame) {
  return !EPHEMERAL.has(frame.type) && typeof frame.seq === "number" && typeof frame.room === "string";
}

const isSubscribeRef = (ref) => typeof ref === "string" && ref.startsWith("sub:");

/** The room an error frame is about: named, or the one of the subscribe it answers. */
export function roomOf(frame) {
  return frame.room || (isSubscribeRef(frame.ref) ? frame.ref.slice(4) : null);
}

export class Rooms {
  /**
   * @param {object} host  see the header
   * @param {object} [options]
   * @param {Function} [options.loadSnapshot]  async (room) => {seq, messages}: the room's history
   */
  constructor(host, { loadSnapshot = null } = {}) {
    this.host = host;
    this.loadSnapshot = loadSnapshot;
    // room -> {lastSeq, epoch, pending: Map(seq -> frame), subscribed, resyncing,
    //          loading, background, retryTimer, snapshotAttempts, subscribeAttempts}
    this.map = new Map();
  }

  get size() {
    return this.map.size;
  }

  get(room) {
    return this.map.get(room);
  }

  has(room) {
    return this.map.has(room);
  }

  names() {
    return this.map.keys();
  }

  entries() {
    return this.map.entries();
  }

  /** Start following a room (once); `since`: a seq already seen, of the log `epoch`. */
  follow(room, { since = null, epoch = null, background = false } = {}) {
    if (this.map.has(room)) return;
    const known = Number.isInteger(since);
    this.map.set(room, {
      lastSeq: known ? since : null, epoch: known ? epoch : null,
      pending: new Map(), subscribed: false, resyncing: false, loading: null, background,
    });
  }

  /** Stop following a room (unsubscribe): its retry is cancelled. */
  unfollow(room) {
    const r = this.map.get(room);
    if (r) this._clearTimer(r);
    this.map.delete(room);
  }

  /** Access to a followed room was taken away: stop following it (its retry too). */
  revoke(room) {
    this.unfollow(room);
  }

  epoch(room) {
    const r = this.map.get(room);
    return r ? r.epoch : null;
  }

  /** Go live from `seq` of the log `epoch` (a head read without history). */
  startAt(r, seq, epoch) {
    if (r.lastSeq !== null) return;
    r.lastSeq = seq;
    r.epoch = epoch ?? null;
  }

  lastSeq(room) {
    const r = this.map.get(room);
    return r ? r.lastSeq : null;
  }

  _clearTimer(r) {
    if (r.retryTimer) this.host.timers.clearTimeout(r.retryTimer);
    r.retryTimer = null;
  }

  /** Cancel every room's pending retry. */
  clearTimers() {
    for (const r of this.map.values()) this._clearTimer(r);
  }

  /** The socket is gone: no room is subscribed on it any more. */
  lost() {
    for (const r of this.map.values()) r.subscribed = false;
  }

  /** The room's history arrived: start from its seq (unless one was set meanwhile,
   * by the fallback's own load: never go back). */
  loaded(room, r, snap) {
    if (r.lastSeq !== null) return;
    r.lastSeq = snap.seq;
    r.epoch = snap.epoch ?? null;
    r.pending.clear();
    this.host.emit("snapshot", { room, ...snap });
  }

  /** Too far behind to replay, or the log was started again: forget the seq, its
   * epoch and what was held. */
  reset(room, r) {
    r.lastSeq = null;
    r.epoch = null;
    r.resyncing = false;
    r.pending.clear();
    this.host.emit("reset", { room });
  }

  /** Load the room's snapshot if no seq is known, then subscribe over the socket
   * with since (or, with no loader and no seq, live from the head). */
  async sync(room) {
    const r = this.map.get(room);
    if (!r) return;
    if (r.lastSeq === null && this.loadSnapshot && !r.background) {
      if (r.loading) return;
      try {
        r.loading = this.loadSnapshot(room);
        const snap = await r.loading;
        if (this.map.get(room) !== r) return; // unfollowed meanwhile
        r.snapshotAttempts = 0;
        this.loaded(room, r, snap);
      } catch (err) {
        if (this.map.get(room) !== r) return;
        this.host.emit("error", { room, code: "snapshot_failed", message: String(err) });
        // Try the history again with its own backoff; the socket is fine.
        r.snapshotAttempts = (r.snapshotAttempts || 0) + 1;
        this._clearTimer(r);
        if (this.host.state !== State.CLOSED && this.host.transport === "ws") {
          this._retry(room, r, backoffDelay(r.snapshotAttempts, this.host.backoff, this.host.random) + 250);
        }
        return;
      } finally {
        r.loading = null;
      }
    }
    if (this.map.get(room) !== r || !this.host.socket.opened) return;
    r.resyncing = true;
    // Without a snapshot loader and no seq yet, go live from the head (the ack says which).
    this.host.socket.write(this._subscribeFrame(room, r));
  }

  _subscribeFrame(room, r) {
    const frame = { type: "subscribe", ref: `sub:${room}`, room };
    // A room followed in the background (unread counts) is not one the person is
    // in: it must not list them under "Here now" there.
    if (r.background) frame.presence = false;
    if (r.lastSeq !== null) {
      frame.since = r.lastSeq;
      if (r.epoch) frame.epoch = r.epoch;
    }
    return frame;
  }

  _retry(room, r, wait) {
    r.retryTimer = this.host.timers.setTimeout(() => {
      r.retryTimer = null;
      this.sync(room);
    }, wait);
  }

  /** An ack frame: true if it answers a subscribe (ours or not). */
  onAck(frame) {
    if (!isSubscribeRef(frame.ref)) return false;
    const r = this.map.get(frame.room);
    if (r) {
      r.subscribed = true;
      r.resyncing = false;
      r.subscribeAttempts = 0;
      if (r.lastSeq === null) r.lastSeq = frame.seq;
      if (frame.epoch) r.epoch = frame.epoch;
      this.host.emit("subscribed", { room: frame.room, seq: frame.seq, replayed: frame.replayed });
    }
    return true;
  }

  /** An error frame: true if it was about a subscription (recovery_failed, or a
   * subscribe refused), and was told as an "error" event where it should be. */
  onError(frame) {
    const room = roomOf(frame);
    if (frame.code === ErrorCode.RECOVERY_FAILED && room && this.map.has(room)) {
      // Too far behind to replay, or the log was started again: reload the
      // room's history (or, without a loader, go live from the head), then
      // subscribe again.
      const r = this.map.get(room);
      this.reset(room, r);
      this.sync(room);
      return true;
    }
    if (!isSubscribeRef(frame.ref)) return false;
    const r = this.map.get(room);
    if (r) {
      r.resyncing = false;
      r.subscribed = false;
      if (frame.code === ErrorCode.INTERNAL || frame.code === ErrorCode.RATE_LIMITED) {
        // Transient: ask again later.
        r.subscribeAttempts = (r.subscribeAttempts || 0) + 1;
        const wait = Math.max((frame.retry_after || 0) * 1000, backoffDelay(r.subscribeAttempts, this.host.backoff, this.host.random));
        this._clearTimer(r);
        this._retry(room, r, wait);
      }
    }
    this.host.emit("error", { room, code: frame.code, message: frame.message });
    return true;
  }

  /** Apply room events exactly once and in seq order; ask for a replay on a gap. */
  onEvent(frame) {
    const r = this.map.get(frame.room);
    if (!r || r.lastSeq === null) return;
    if (frame.seq <= r.lastSeq) return; // already applied
    if (frame.seq > r.lastSeq + 1) {
      r.pending.set(frame.seq, frame);
      // A gap: the server replays everything after what we have. (While polling,
      // the next page starts after what we have anyway.)
      if (!r.resyncing && this.host.socket.opened) {
        r.resyncing = true;
        this.host.socket.write(this._subscribeFrame(frame.room, r));
      }
      return;
    }
    this._apply(r, frame);
    let next;
    while ((next = r.pending.get(r.lastSeq + 1))) {
      r.pending.delete(next.seq);
      this._apply(r, next);
    }
    for (const seq of r.pending.keys()) if (seq <= r.lastSeq) r.pending.delete(seq);
  }

  _apply(r, frame) {
    r.lastSeq = frame.seq;
    this.host.outbox.echo(frame);
    this.host.emit("event", frame);
  }
}
