// Realtime client for protocol v1: RealtimeClient, the facade over the parts, one
// module each: state.js (states, close codes, backoff, events), socket.js (the
// WebSocket transport), longpoll.js (the fallback over REST), rooms.js (followed
// rooms: each event once, in order), outbox.js (queued sends). This module wires
// them together, routes the server's frames, and follows the browser's network and
// tab. No DOM code, so Node's test runner can drive it with a fake WebSocket and
// fake timers.

import { ErrorCode } from "./codes.js";
import { LongPoll } from "./longpoll.js";
import { Outbox, randomId } from "./outbox.js";
import { Rooms, isRoomEvent, roomOf } from "./rooms.js";
import { SocketTransport } from "./socket.js";
import { Close, Emitter, State } from "./state.js";

export { State, Close, backoffDelay } from "./state.js";
export { randomId } from "./outbox.js";

export class RealtimeClient extends Emitter {
  /**
   * @param {object} options
   * @param {string} options.url               ws:// or wss:// URL of /ws/v1/
   * @param {Function} [options.loadSnapshot]  async (room) => {seq, messages}: the room's
   *   history from REST, used on first subscribe and when recovery fails
   * @param {Function} [options.poll]  async (room, since, wait, signal, limit, epoch, extra) =>
   *   {events, seq, epoch, has_more, ephemeral?, presence_tag?}:
   *   a long poll of the room's events (REST); throws {status, code, retryAfter}. extra
   *   {client, presenceTag} (the fallback's polls): the page's poll id and the presence it
   *   has; the answer's `ephemeral` frames are emitted as "ephemeral", like the socket's pushes
   * @param {Function} [options.post]  async (room, body, clientId) => {id, seq, room}: post
   *   a message over REST; throws {status, code, retryAfter}. With poll, enables the fallback.
   * @param {Function} [options.edit]    async (room, id, body) => ack: edit over REST while polling
   * @param {Function} [options.remove]  async (room, id) => ack: delete over REST while polling
   * @param {Function} [options.read]    async (room, seq) => {room, seq}: mark read over REST while polling
   * @param {Function} [options.typing]  async (room) => {room, sent}: say we are typing over REST while polling
   * @param {string} [options.user]  our username, to recognise our own messages
   * @param {number} [options.maxBodyLength]  REALTIME_MAX_BODY_LENGTH
   * Timing (ms unless said): backoff {base, cap}, stableAfter, pingInterval, pingTimeout,
   * restartJitter, connectTimeout (socket.js); fallbackAfter (attempts), pollWait (s),
   * upgradeCap, checkTimeout (longpoll.js). For tests: WebSocket, timers
   * {setTimeout, clearTimeout}, now, random, env (online/offline, visibility; null: none).
   */
  constructor(options) {
    super();
    this.timers = options.timers || { setTimeout: (f, ms) => setTimeout(f, ms), clearTimeout: (t) => clearTimeout(t) };
    this.now = options.now || (() => Date.now());
    this.random = options.random || Math.random;
    // A 10 s cap: a server that comes back is found within 10 s (and "Retry now"
    // in the page tries at once); the equal jitter still spreads a mass reconnect.
    this.backoff = { base: 500, cap: 10000, ...(options.backoff || {}) };
    this.env = options.env === undefined ? globalThis : options.env; // for online/offline, visibility
    this.editFn = options.edit || null; // async (room, id, body) => ack, over REST
    this.removeFn = options.remove || null; // async (room, id) => ack, over REST
    this.readFn = options.read || null; // async (room, seq) => {room, seq}, over REST
    this.typingFn = options.typing || null; // async (room) => {room, sent}, over REST
    this.reactFn = options.react || null; // async (room, id, emoji, add) => ack, over REST

    this.socket = new SocketTransport(this, options);
    this.poll = new LongPoll(this, options);
    this.rooms = new Rooms(this, { loadSnapshot: options.loadSnapshot || null });
    this.outbox = new Outbox(this, { maxBodyLength: options.maxBodyLength ?? 4000, user: options.user || null });
    this._bindEnvironment();
  }

  /** "ws", or "poll" while the fallback is on. */
  get transport() {
    return this.poll.active ? "poll" : "ws";
  }

  /** Reconnects since the last stable connection (the backoff's exponent). */
  get attempts() {
    return this.socket.attempts;
  }

  set attempts(n) {
    this.socket.attempts = n;
  }

  // -- lifecycle ----------------------------------------------------------
  connect() {
    this.socket.connect();
  }

  /** Try now instead of waiting for the backoff's next attempt (the page's "Retry
   * now"), or connect again after a stop (the page's "Reconnect"). The backoff's
   * exponent stays: a failure now waits as long as the next attempt would have. */
  retryNow() {
    if (this.state === State.OPEN || this.socket.ws) return;
    this.socket.clearRetry();
    if (this.state === State.CLOSED) this.setState(State.CONNECTING);
    if (this.state === State.OFFLINE) this.setState(State.RECONNECTING, { delay: 0, at: this.now() });
    this.connect();
  }

  /** Stop for good (until connect() is called again). */
  close() {
    if (this.state === State.CLOSED) return; // (a page's beforeunload and pagehide both close it)
    this._stop("closed", Close.NORMAL, "the client was closed");
    this.socket.attempts = this.socket.failedOpens = this.poll.probes = 0;
  }

  /** Everything stops: socket, polls, probe, check, retries; queued sends fail. */
  _stop(reason, code, message) {
    this.poll.lastChance = false;
    this.socket.clearRetry();
    this.poll.leave();
    this.socket.drop(Close.NORMAL, reason);
    this.rooms.clearTimers();
    this.setState(State.CLOSED, { reason, code });
    this.outbox.failAll(reason, message);
  }

  // -- what the socket reports (see socket.js) ------------------------------------
  _socketOpened() {
    for (const room of this.rooms.names()) this.rooms.sync(room);
    this.outbox.resendAll();
  }

  _socketLive() {
    this.poll.onSocketLive();
  }

  _socketLost() {
    this.rooms.lost();
  }

  _divert(code) {
    return this.poll.divert(code);
  }

  _socketFrame(frame) {
    if (frame.type === "ack") return this._onAck(frame);
    if (frame.type === "error") return this._onError(frame);
    if (isRoomEvent(frame)) return this.rooms.onEvent(frame);
    this.emit("ephemeral", frame);
  }

  _onAck(frame) {
    if (this.rooms.onAck(frame) || this.outbox.onAck(frame)) return;
    this.socket.onAck(frame);
  }

  _onError(frame) {
    if (frame.code === ErrorCode.RATE_LIMITED && frame.retry_after) this.socket.retryAfter = frame.retry_after;
    if (this.rooms.onError(frame) || this.outbox.onError(frame) || this.socket.onError(frame)) return;
    const room = roomOf(frame);
    if (room && (frame.code === ErrorCode.FORBIDDEN || frame.code === ErrorCode.NOT_FOUND) && this.rooms.has(room)) {
      // Access to a followed room was taken away: stop following it.
      this.rooms.revoke(room);
    }
    this.emit("error", { room, code: frame.code, message: frame.message });
  }

  /** A queued message goes out (see outbox.js). While polling, over REST; and over
   * any open socket too (a probe that has not answered yet): the server applies
   * one client_id once, whichever arrives. */
  _deliver(frame) {
    if (this.poll.active) this.poll.postOutbox();
    this.socket.write(frame);
  }

  // -- environment (browser only) -------------------------------------------
  _bindEnvironment() {
    const env = this.env;
    if (!env || typeof env.addEventListener !== "function") return;
    env.addEventListener("offline", () => {
      if (this.state === State.CLOSED) return;
      this.socket.clearRetry();
      this.poll.leave();
      this.socket.drop(Close.NORMAL, "offline");
      this.setState(State.OFFLINE);
    });
    env.addEventListener("online", () => {
      if (this.state !== State.OFFLINE) return;
      this.socket.attempts = 0;
      this.socket.failedOpens = 0;
      this.setState(State.RECONNECTING, { delay: 0, at: this.now() });
      this.connect();
    });
    const doc = env.document;
    if (doc && typeof doc.addEventListener === "function") {
      doc.addEventListener("visibilitychange", () => {
        if (doc.visibilityState === "visible" && this.state === State.RECONNECTING && this.socket.retrying) {
          this.socket.clearRetry();
          this.connect();
        }
      });
    }
  }

  // -- rooms ----------------------------------------------------------------
  /**
   * Follow a room: load its snapshot (if no seq is known), then subscribe with since.
   * Options: `since` (a seq already seen: replay from there, no snapshot), `epoch`
   * (the log's epoch that seq counts in, from client.epoch(room)) and `background` (no snapshot: with no since, live from the head; not long-polled
   * in the fallback, where browsers allow only a few requests per host at once).
   */
  subscribe(room, { since = null, epoch = null, background = false } = {}) {
    this.rooms.follow(room, { since, epoch, background });
    if (this.socket.opened) this.rooms.sync(room);
    if (this.poll.active && !background) this.poll.startPolling(room);
  }

  unsubscribe(room) {
    this.rooms.unfollow(room);
    this.poll.stopPolling(room);
    this.socket.write({ type: "unsubscribe", room });
  }

  lastSeq(room) {
    return this.rooms.lastSeq(room);
  }

  /** The epoch of the log the room's lastSeq counts in (resume with both). */
  epoch(room) {
    return this.rooms.epoch(room);
  }

  // -- sending --------------------------------------------------------------
  /** Send a request and wait for its ack (rejects with {code} on error or disconnect). */
  request(frame) {
    return this.socket.request(frame);
  }

  /**
   * Post a message. It is queued while offline and sent (again) on every reconnect
   * until acked; the client_id makes each resend idempotent on the server.
   * Returns {clientId, done}: done resolves with the ack or rejects on a final error.
   */
  send(room, body, clientId = randomId()) {
    return this.outbox.send(room, body, clientId);
  }

  /** Number of messages waiting for an ack. */
  get pendingCount() {
    return this.outbox.size;
  }

  /** Tell the room this user is typing (ephemeral: never queued; over REST while polling). */
  typing(room) {
    if (this.poll.active) {
      if (this.typingFn) this.typingFn(room).catch(() => {}); // best effort, like the frame
      return;
    }
    this.socket.write({ type: "typing", room });
  }

  /** Mark the room read up to seq; resolves with the stored position. */
  markRead(room, seq) {
    if (this.poll.active && this.readFn) return this.readFn(room, seq);
    return this.request({ type: "read", room, seq });
  }

  edit(room, id, body) {
    // Over REST while polling (the same rules and ack), over the socket otherwise.
    if (this.poll.active && this.editFn) return this.editFn(room, id, body);
    return this.request({ type: "message.edit", room, id, body });
  }

  /** Add (add = true) or take back one's reaction to message `id`. */
  react(room, id, emoji, add) {
    if (this.poll.active && this.reactFn) return this.reactFn(room, id, emoji, add);
    return this.request({ type: add ? "reaction.add" : "reaction.remove", room, id, emoji });
  }

  /** A page of who is in `room` (after the user named `after`): {users, count, next}.
   * Over the socket only (while polling, each answer brings presence.state anyway). */
  presencePage(room, after = null) {
    if (this.poll.active) return Promise.resolve(null);
    return this.request({ type: "presence.list", room, ...(after ? { after } : {}) });
  }

  remove(room, id) {
    if (this.poll.active && this.removeFn) return this.removeFn(room, id);
    return this.request({ type: "message.delete", room, id });
  }
}
