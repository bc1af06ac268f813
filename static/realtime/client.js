// Realtime client for protocol v1: transport, reconnection and resume. No DOM code,
// so Node's test runner can drive it with a fake WebSocket and fake timers.

import { Close as Codes, ErrorCode } from "./codes.js";

export const State = Object.freeze({
  CONNECTING: "connecting", // first attempt, nothing open yet
  OPEN: "open", // socket open and accepted
  RECONNECTING: "reconnecting", // waiting `delay` ms before the next attempt
  OFFLINE: "offline", // the browser says the network is gone; waiting for it
  FALLBACK: "fallback", // WebSockets fail here: long polling over REST, probing for a way back
  CLOSED: "closed", // stopped for good: signed out, forbidden, or close() called
});

// Close codes (generated from the protocol's declarations, ./codes.js), and the
// one this client uses itself to drop a silent socket.
export const Close = Object.freeze({ ...Codes, HEARTBEAT: 4000 });

const STOP = { [Close.NOT_AUTHENTICATED]: "unauthenticated", [Close.FORBIDDEN]: "forbidden" };
const RESTART = new Set([Close.SERVICE_RESTART, Close.SERVER_RESTART]);

// Frames without a place in a room's log.
const EPHEMERAL = new Set(["typing", "presence.state", "presence.diff", "read.state", "read.marker", "read.markers", "metrics.tick"]);

// Errors after which resending the same request cannot succeed.
const FINAL_ERRORS = new Set([ErrorCode.INVALID, ErrorCode.UNKNOWN_TYPE, ErrorCode.FORBIDDEN, ErrorCode.NOT_FOUND,
  ErrorCode.TOO_LARGE, ErrorCode.CONFLICT]);

/** Equal jitter: a uniform delay in [ceiling / 2, ceiling], ceiling = min(cap,
 * base * 2^attempt). Never 0: after a mass drop, full jitter's [0, ceiling] sends
 * a share of every client back at the same instant. */
export function backoffDelay(attempt, { base = 500, cap = 30000 } = {}, random = Math.random) {
  const ceiling = Math.min(cap, base * 2 ** Math.min(attempt, 30));
  return Math.floor(ceiling / 2 + random() * (ceiling / 2));
}

/** A random id for client_id (idempotent sends), without needing a secure context. */
export function randomId(cryptoImpl = globalThis.crypto) {
  const bytes = new Uint8Array(12);
  if (cryptoImpl && cryptoImpl.getRandomValues) cryptoImpl.getRandomValues(bytes);
  else for (let i = 0; i < bytes.length; i++) bytes[i] = Math.floor(Math.random() * 256);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

export class RealtimeClient {
  /**
   * @param {object} options
   * @param {string} options.url               ws:// or wss:// URL of /ws/v1/
   * @param {Function} [options.loadSnapshot]  async (room) => {seq, messages}: the room's
   *   history from REST, used on first subscribe and when recovery fails
   * @param {Function} [options.poll]  async (room, since, wait, signal) => {events, seq, has_more}:
   *   a long poll of the room's events (REST); throws {status, code, retryAfter}
   * @param {Function} [options.post]  async (room, body, clientId) => {id, seq, room}: post
   *   a message over REST; throws {status, code, retryAfter}. With poll, enables the fallback.
   * @param {Function} [options.edit]    async (room, id, body) => ack: edit over REST while polling
   * @param {Function} [options.remove]  async (room, id) => ack: delete over REST while polling
   */
  constructor(options) {
    this.url = options.url;
    this.WebSocket = options.WebSocket || globalThis.WebSocket;
    this.loadSnapshot = options.loadSnapshot || null;
    this.user = options.user || null; // our username, to recognise our own messages
    this.timers = options.timers || { setTimeout: (f, ms) => setTimeout(f, ms), clearTimeout: (t) => clearTimeout(t) };
    this.now = options.now || (() => Date.now());
    this.random = options.random || Math.random;
    this.backoff = { base: 500, cap: 30000, ...(options.backoff || {}) };
    this.stableAfter = options.stableAfter ?? 10000; // ms open before attempts reset
    this.pingInterval = options.pingInterval ?? 20000;
    this.pingTimeout = options.pingTimeout ?? 10000; // silence allowed past an unanswered ping
    this.restartJitter = options.restartJitter ?? 1000;
    this.connectTimeout = options.connectTimeout ?? 10000; // no first frame by then: dropped
    this.maxBodyLength = options.maxBodyLength ?? 4000; // REALTIME_MAX_BODY_LENGTH
    this.env = options.env === undefined ? globalThis : options.env; // for online/offline, visibility
    // Long-polling fallback: after `fallbackAfter` attempts in a row that never
    // opened, poll over REST; probe for a WebSocket again with backoff (base 1 s,
    // cap `upgradeCap`), and switch back as soon as one opens.
    this.pollFn = options.poll || null;
    this.postFn = options.post || null;
    this.editFn = options.edit || null; // async (room, id, body) => ack, over REST
    this.removeFn = options.remove || null; // async (room, id) => ack, over REST
    this.readFn = options.read || null; // async (room, seq) => {room, seq}, over REST
    this.fallbackAfter = options.fallbackAfter ?? 3;
    this.pollWait = options.pollWait ?? 25;
    this.upgradeCap = options.upgradeCap ?? 10000;
    this.transport = "ws"; // or "poll"
    this.failedOpens = 0;
    this.probes = 0;
    this._polls = new Map(); // room -> AbortController of its running poll loop
    this.checkTimeout = options.checkTimeout ?? 10000; // the HTTP check before falling back
    this._check = null; // the HTTP check in flight: {controller, timer}

    this.state = null;
    this.attempts = 0;
    this.ws = null;
    this.rooms = new Map(); // room -> {lastSeq, pending: Map(seq -> frame), subscribed, resyncing}
    this.outbox = new Map(); // client_id -> {room, body, resolve, reject, ref}
    this.requests = new Map(); // ref -> {resolve, reject}
    this.listeners = new Map();
    this.refCounter = 0;
    this.retryAfter = 0;
    this._timer = null;
    this._stableTimer = null;
    this._pingTimer = null;
    this._connectTimer = null;
    this._lastFrameAt = 0;
    this._bindEnvironment();
  }

  // -- events -------------------------------------------------------------
  on(name, fn) {
    if (!this.listeners.has(name)) this.listeners.set(name, new Set());
    this.listeners.get(name).add(fn);
    return () => this.listeners.get(name).delete(fn);
  }

  emit(name, detail) {
    for (const fn of this.listeners.get(name) || []) {
      try {
        fn(detail);
      } catch (err) {
        console.error("realtime listener failed", err);
      }
    }
  }

  /** The only place the connection state changes. */
  setState(state, detail = {}) {
    const changed = state !== this.state;
    this.state = state;
    if (changed || detail.delay !== undefined) this.emit("state", { state, ...detail });
  }

  // -- lifecycle ----------------------------------------------------------
  connect() {
    if (this.state === State.OPEN || this.ws) return;
    this._clearTimer();
    this.setState(this.state === null || this.state === State.CLOSED ? State.CONNECTING : this.state);
    let ws;
    try {
      ws = new this.WebSocket(this.url, ["rt.v1.json"]);
    } catch (err) {
      this.failedOpens += 1;
      this._scheduleReconnect(Close.ABNORMAL);
      return;
    }
    this.ws = ws;
    ws.onopen = () => this._onOpen(ws);
    ws.onmessage = (ev) => this._onMessage(ws, ev.data);
    ws.onclose = (ev) => this._onClose(ws, ev.code, ev.reason);
    ws.onerror = () => {}; // a close always follows
    this._connectTimer = this.timers.setTimeout(() => {
      this._connectTimer = null;
      if (this.ws === ws && !ws.live) {
        // No frame came back in time (a handshake that hangs, or a proxy that
        // passes the upgrade and then nothing): it counts as a failed open.
        this.failedOpens += 1;
        this._dropSocket(Close.HEARTBEAT, "connect timeout");
        this._scheduleReconnect(Close.ABNORMAL);
      }
    }, this.connectTimeout);
  }

  /** Stop for good (until connect() is called again). */
  close() {
    this._stop("closed", Close.NORMAL, "the client was closed");
    this.attempts = this.failedOpens = this.probes = 0;
  }

  /** Everything stops: socket, polls, probe, check, retries; queued sends fail. */
  _stop(reason, code, message) {
    this._lastChance = false;
    this._clearTimer();
    this._cancelCheck();
    this._stopPolling();
    this.transport = "ws";
    this._dropSocket(Close.NORMAL, reason);
    for (const r of this.rooms.values()) this._clearRoomTimer(r);
    this.setState(State.CLOSED, { reason, code });
    this._failOutbox(reason, message);
  }

  _clearRoomTimer(r) {
    if (r.retryTimer) this.timers.clearTimeout(r.retryTimer);
    r.retryTimer = null;
  }

  /** Settle every queued send as failed: nothing will send them any more. */
  _failOutbox(code, message) {
    for (const [clientId, item] of this.outbox) {
      item.reject(Object.assign(new Error(message), { code }));
      this.emit("failed", { clientId, room: item.room, code, message });
    }
    this.outbox.clear();
  }

  _onOpen(ws) {
    if (ws !== this.ws) return;
    // Open is not yet connected: the state says so once a frame has come back
    // (_onLive), so a proxy that passes the upgrade and then nothing is caught.
    ws.opened = true;
    this._raw({ type: "ping", t: this.now() });
    for (const room of this.rooms.keys()) this._subscribe(room);
    for (const [clientId, item] of this.outbox) this._sendMessage(clientId, item);
  }

  /** The first frame from the server: the socket really works. */
  _onLive(ws) {
    ws.live = true;
    this._lastChance = false;
    this.failedOpens = 0;
    this.probes = 0;
    this._cancelCheck();
    if (this.transport === "poll") {
      // A WebSocket works again: polling stops; every room was resubscribed with
      // its seq and the outbox resent (same client_ids) when the socket opened.
      this._stopPolling();
      this.transport = "ws";
    }
    if (this._connectTimer) this.timers.clearTimeout(this._connectTimer);
    this._connectTimer = null;
    this._clearTimer();
    this.setState(State.OPEN);
    this._stableTimer = this.timers.setTimeout(() => {
      this.attempts = 0;
    }, this.stableAfter);
    this._schedulePing();
  }

  _onClose(ws, code, reason) {
    if (ws !== this.ws) return;
    this.ws = null;
    if (!ws.live) this.failedOpens += 1;
    this._stopSocketTimers();
    for (const room of this.rooms.values()) room.subscribed = false;
    for (const [, req] of this.requests) req.reject(Object.assign(new Error("connection lost"), { code: "disconnected" }));
    this.requests.clear();
    if (STOP[code]) {
      this._stop(STOP[code], code, code === Close.NOT_AUTHENTICATED ? "signed out" : "access revoked");
      return;
    }
    if (this.state === State.CLOSED) return;
    this._scheduleReconnect(code, reason);
  }

  _scheduleReconnect(code) {
    if (this.state === State.OFFLINE || this.state === State.CLOSED) return;
    if (this.transport === "poll" || this._lastChance) {
      this._lastChance = false;
      this._fallback(); // a failed probe: keep polling, probe again later
      return;
    }
    if (this.pollFn && this.failedOpens >= this.fallbackAfter && this.rooms.size) {
      if (this._check) return; // one check at a time; it decides what comes next
      // WebSockets keep failing. Fall back only if plain HTTP gets through (they are
      // blocked); if it does not, the server is down and backing off is right.
      const room = this.rooms.keys().next().value;
      const check = { controller: new AbortController(), timer: null };
      check.timer = this.timers.setTimeout(() => check.controller.abort(), this.checkTimeout);
      this._check = check;
      const decide = (answered) => {
        if (this._check !== check) return; // cancelled: connected, closed or offline meanwhile
        this._cancelCheck();
        if (this.ws || this.state === State.OFFLINE || this.state === State.CLOSED) return;
        if (!answered) {
          this._backoffReconnect(code);
          return;
        }
        // HTTP works. The server may just be back (a restart fails sockets too):
        // one more WebSocket attempt first, and the fallback only if it fails.
        this._lastChance = true;
        this.connect();
      };
      this.pollFn(room, 0, 0, check.controller.signal, 1).then(() => decide(true), () => decide(false));
      this.setState(State.RECONNECTING, { delay: 0, code, at: this.now() });
      return;
    }
    this._backoffReconnect(code);
  }

  _cancelCheck() {
    const check = this._check;
    if (!check) return;
    this._check = null;
    this.timers.clearTimeout(check.timer);
    check.controller.abort();
  }

  _backoffReconnect(code) {
    let delay;
    if (RESTART.has(code)) {
      // The server is restarting on purpose: come back at once, spread out a little.
      // (a tenth of the window at least: never all in the same millisecond)
      delay = Math.floor(this.restartJitter * (0.1 + 0.9 * this.random()));
    } else {
      delay = backoffDelay(this.attempts, this.backoff, this.random);
      this.attempts += 1;
      if (code === Close.RATE_LIMITED) delay = Math.max(delay, this.retryAfter * 1000);
      this.retryAfter = 0;
    }
    this._clearTimer();
    this.setState(State.RECONNECTING, { delay, code, at: this.now() + delay });
    this._timer = this.timers.setTimeout(() => {
      this._timer = null;
      this.connect();
    }, delay);
  }

  _dropSocket(code, reason) {
    const ws = this.ws;
    if (!ws) return;
    this.ws = null;
    ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
    try {
      ws.close(code, reason);
    } catch (err) {
      /* already closed */
    }
    this._stopSocketTimers();
    for (const room of this.rooms.values()) room.subscribed = false;
    for (const [, req] of this.requests) req.reject(Object.assign(new Error("connection lost"), { code: "disconnected" }));
    this.requests.clear();
  }

  _stopSocketTimers() {
    for (const t of [this._stableTimer, this._pingTimer, this._connectTimer]) if (t) this.timers.clearTimeout(t);
    this._stableTimer = this._pingTimer = this._connectTimer = null;
  }

  _clearTimer() {
    if (this._timer) this.timers.clearTimeout(this._timer);
    this._timer = null;
  }

  // -- heartbeat ----------------------------------------------------------
  _schedulePing() {
    this._pingTimer = this.timers.setTimeout(() => this._heartbeat(), this.pingInterval);
  }

  _heartbeat() {
    this._pingTimer = null;
    if (!this.ws || !this.ws.live) return;
    const silentFor = this.now() - this._lastFrameAt;
    if (silentFor >= this.pingInterval + this.pingTimeout) {
      // Nothing at all came back, not even a pong: the socket is dead.
      this._dropSocket(Close.HEARTBEAT, "heartbeat timeout");
      this._scheduleReconnect(Close.ABNORMAL);
      return;
    }
    this._raw({ type: "ping", t: this.now() });
    this._pingTimer = this.timers.setTimeout(() => this._heartbeat(), Math.min(this.pingInterval, this.pingTimeout));
  }

  // -- environment (browser only) -------------------------------------------
  _bindEnvironment() {
    const env = this.env;
    if (!env || typeof env.addEventListener !== "function") return;
    env.addEventListener("offline", () => {
      if (this.state === State.CLOSED) return;
      this._clearTimer();
      this._cancelCheck();
      this._stopPolling();
      this.transport = "ws";
      this._dropSocket(Close.NORMAL, "offline");
      this.setState(State.OFFLINE);
    });
    env.addEventListener("online", () => {
      if (this.state !== State.OFFLINE) return;
      this.attempts = 0;
      this.failedOpens = 0;
      this.setState(State.RECONNECTING, { delay: 0, at: this.now() });
      this.connect();
    });
    const doc = env.document;
    if (doc && typeof doc.addEventListener === "function") {
      doc.addEventListener("visibilitychange", () => {
        if (doc.visibilityState === "visible" && this.state === State.RECONNECTING && this._timer) {
          this._clearTimer();
          this.connect();
        }
      });
    }
  }

  // -- sending --------------------------------------------------------------
  _raw(frame) {
    if (!this.ws || !this.ws.opened) return false;
    this.ws.send(JSON.stringify(frame));
    return true;
  }

  _nextRef() {
    this.refCounter += 1;
    return `r${this.refCounter}`;
  }

  /** Send a request and wait for its ack (rejects with {code} on error or disconnect). */
  request(frame) {
    return new Promise((resolve, reject) => {
      const ref = this._nextRef();
      if (!this._raw({ ...frame, ref })) {
        reject(Object.assign(new Error("not connected"), { code: "disconnected" }));
        return;
      }
      this.requests.set(ref, { resolve, reject });
    });
  }

  /**
   * Post a message. It is queued while offline and sent (again) on every reconnect
   * until acked; the client_id makes each resend idempotent on the server.
   * Returns {clientId, done}: done resolves with the ack or rejects on a final error.
   */
  send(room, body, clientId = randomId()) {
    let resolve, reject;
    const done = new Promise((res, rej) => {
      resolve = res;
      reject = rej;
    });
    if (typeof body !== "string" || body.length > this.maxBodyLength) {
      // Refused here: a frame the server would close (1009) must never be queued.
      const err = Object.assign(new Error(`longer than ${this.maxBodyLength} characters`), { code: "too_large" });
      this.emit("failed", { clientId, room, code: err.code, message: err.message });
      return { clientId, done: Promise.reject(err) };
    }
    const item = { room, body, resolve, reject, ref: null };
    this.outbox.set(clientId, item);
    this._sendMessage(clientId, item);
    return { clientId, done };
  }

  _sendMessage(clientId, item) {
    // One ref per message, whatever the attempt: any attempt's ack settles it.
    item.ref = `m:${clientId}`;
    // While polling, over REST; and over any open socket too (a probe that has not
    // answered yet): the server applies one client_id once, whichever arrives.
    if (this.transport === "poll") this._postMessage();
    this._raw({ type: "message.send", ref: item.ref, room: item.room, body: item.body, client_id: clientId });
  }

  /** Number of messages waiting for an ack. */
  get pendingCount() {
    return this.outbox.size;
  }

  /** Tell the room this user is typing (ephemeral: not queued, not sent while polling). */
  typing(room) {
    this._raw({ type: "typing", room });
  }

  /** Mark the room read up to seq; resolves with the stored position. */
  markRead(room, seq) {
    if (this.transport === "poll" && this.readFn) return this.readFn(room, seq);
    return this.request({ type: "read", room, seq });
  }

  edit(room, id, body) {
    // Over REST while polling (the same rules and ack), over the socket otherwise.
    if (this.transport === "poll" && this.editFn) return this.editFn(room, id, body);
    return this.request({ type: "message.edit", room, id, body });
  }

  remove(room, id) {
    if (this.transport === "poll" && this.removeFn) return this.removeFn(room, id);
    return this.request({ type: "message.delete", room, id });
  }

  // -- long-polling fallback ---------------------------------------------------
  /** Enter (or stay in) the fallback: poll every room, post the outbox, and
   * schedule the next WebSocket probe. */
  _fallback() {
    this._clearTimer();
    if (this.transport !== "poll") {
      this.transport = "poll";
      // The HTTP check has just answered: connected, over the fallback. A poll
      // that fails later says "reconnecting" until one answers again (_polled).
      this.setState(State.FALLBACK);
      for (const r of this.rooms.values()) this._clearRoomTimer(r);
      for (const [room, r] of this.rooms) if (!r.background) this._startPolling(room);
      this._postMessage();
    }
    const delay = backoffDelay(this.probes, { base: 1000, cap: this.upgradeCap }, this.random) + 500;
    this.probes += 1;
    this._timer = this.timers.setTimeout(() => {
      this._timer = null;
      if (this.transport === "poll") this.connect(); // a probe: _onOpen switches back
    }, delay);
  }

  /** HTTP answered while polling: the connection works, over the fallback. */
  _polled() {
    if (this.transport === "poll" && this.state !== State.FALLBACK) this.setState(State.FALLBACK);
  }

  _stopPolling() {
    for (const controller of this._polls.values()) controller.abort();
    this._polls.clear();
  }

  _startPolling(room) {
    if (!this.pollFn || this._polls.has(room)) return;
    const controller = new AbortController();
    this._polls.set(room, controller);
    this._pollLoop(room, controller).finally(() => {
      if (this._polls.get(room) === controller) this._polls.delete(room);
    });
  }

  _sleep(ms, signal) {
    return new Promise((resolve) => {
      const onAbort = () => {
        this.timers.clearTimeout(t);
        resolve();
      };
      const t = this.timers.setTimeout(() => {
        signal.removeEventListener("abort", onAbort);
        resolve();
      }, ms);
      signal.addEventListener("abort", onAbort, { once: true });
    });
  }

  /** One poll with a deadline of its own: a request that hangs (a connection
   * that died silently) fails after wait + 10 s instead of stalling the room. */
  async _timedPoll(room, since, wait, signal, limit) {
    const request = new AbortController();
    const onAbort = () => request.abort();
    signal.addEventListener("abort", onAbort, { once: true });
    const timer = this.timers.setTimeout(() => request.abort(), (wait + 10) * 1000);
    try {
      return await this.pollFn(room, since, wait, request.signal, limit);
    } finally {
      this.timers.clearTimeout(timer);
      signal.removeEventListener("abort", onAbort);
    }
  }

  async _pollLoop(room, controller) {
    const signal = controller.signal;
    let failures = 0;
    while (!signal.aborted && this.transport === "poll") {
      const r = this.rooms.get(room);
      if (!r) return;
      try {
        if (r.lastSeq === null) {
          if (this.loadSnapshot) {
            const snap = await this.loadSnapshot(room);
            if (signal.aborted || this.rooms.get(room) !== r) return;
            if (r.lastSeq === null) {
              r.lastSeq = snap.seq;
              r.pending.clear();
              this.emit("snapshot", { room, ...snap });
            }
          } else {
            // No history wanted: go live from the head.
            const head = await this._timedPoll(room, 0, 0, signal, 1);
            if (signal.aborted || this.rooms.get(room) !== r) return;
            if (r.lastSeq === null) r.lastSeq = head.seq;
          }
          this._polled();
          this.emit("subscribed", { room, seq: r.lastSeq, replayed: 0 });
        }
        const page = await this._timedPoll(room, r.lastSeq, this.pollWait, signal);
        if (signal.aborted || this.rooms.get(room) !== r) return;
        failures = 0;
        this._polled();
        // The same path as socket events: each seq once, in order.
        for (const event of page.events || []) this._onEvent(event);
      } catch (err) {
        if (signal.aborted) return;
        const status = err && err.status;
        if (status === 401) {
          this._stop("unauthenticated", Close.NOT_AUTHENTICATED, "signed out");
          return;
        }
        if (err && err.code === "recovery_failed") {
          r.lastSeq = null;
          r.pending.clear();
          this.emit("reset", { room });
          failures += 1;
          await this._sleep(backoffDelay(failures, this.backoff, this.random), signal);
          continue;
        }
        if (err && (err.code === "forbidden" || err.code === "not_found")) {
          this.rooms.delete(room);
          this.emit("error", { room, code: err.code, message: err.message });
          return;
        }
        failures += 1;
        const wait = Math.max(((err && err.retryAfter) || 0) * 1000, backoffDelay(failures, this.backoff, this.random));
        if (!err || !err.status || err.status >= 500) {
          // The server is unreachable over HTTP too: say so, honestly.
          this.setState(State.RECONNECTING, { delay: wait, at: this.now() + wait });
        }
        await this._sleep(wait, signal);
      }
    }
  }

  /** While polling, post the outbox over REST one message at a time, in the order
   * they were written: two posts in flight could commit in either order. */
  _postMessage() {
    if (!this.postFn || this._posting) return;
    this._posting = true;
    this._drainOverRest().finally(() => {
      this._posting = false;
    });
  }

  async _drainOverRest() {
    let failures = 0;
    while (this.transport === "poll" && this.outbox.size) {
      const [clientId, item] = this.outbox.entries().next().value;
      try {
        const ack = await this.postFn(item.room, item.body, clientId);
        failures = 0;
        if (this.outbox.get(clientId) !== item) continue; // the socket's ack came first
        this.outbox.delete(clientId);
        item.resolve({ clientId, id: ack.id, seq: ack.seq, room: ack.room });
        this.emit("sent", { clientId, id: ack.id, seq: ack.seq, room: ack.room });
      } catch (err) {
        if (this.outbox.get(clientId) !== item) continue;
        const status = (err && err.status) || 0;
        // A refusal (4xx but a timeout or a rate limit) will not change by itself.
        const final = (err && FINAL_ERRORS.has(err.code)) || (status >= 400 && status < 500 && status !== 408 && status !== 429);
        if (final) {
          const code = (err && err.code) || `http_${status}`;
          const message = (err && err.message) || code;
          this.outbox.delete(clientId);
          item.reject(Object.assign(new Error(message), { code }));
          this.emit("failed", { clientId, room: item.room, code, message });
          continue;
        }
        // Rate-limited, a network error or a server fault: the same client_id
        // again later (idempotent on the server), still before the next one.
        failures += 1;
        const wait = Math.max(((err && err.retryAfter) || 0) * 1000, backoffDelay(failures, this.backoff, this.random));
        await new Promise((resolve) => this.timers.setTimeout(resolve, wait));
      }
    }
  }

  // -- rooms ----------------------------------------------------------------
  /**
   * Follow a room: load its snapshot (if no seq is known), then subscribe with since.
   * Options: `since` (a seq already seen: replay from there, no snapshot) and
   * `background` (no snapshot: with no since, live from the head; not long-polled
   * in the fallback, where browsers allow only a few requests per host at once).
   */
  subscribe(room, { since = null, background = false } = {}) {
    if (!this.rooms.has(room)) {
      this.rooms.set(room, {
        lastSeq: Number.isInteger(since) ? since : null,
        pending: new Map(), subscribed: false, resyncing: false, loading: null, background,
      });
    }
    if (this.ws && this.ws.opened) this._subscribe(room);
    if (this.transport === "poll" && !background) this._startPolling(room);
  }

  unsubscribe(room) {
    const r = this.rooms.get(room);
    if (r) this._clearRoomTimer(r);
    this.rooms.delete(room);
    const poll = this._polls.get(room);
    if (poll) poll.abort();
    this._polls.delete(room);
    this._raw({ type: "unsubscribe", room });
  }

  lastSeq(room) {
    const r = this.rooms.get(room);
    return r ? r.lastSeq : null;
  }

  async _subscribe(room) {
    const r = this.rooms.get(room);
    if (!r) return;
    if (r.lastSeq === null && this.loadSnapshot && !r.background) {
      if (r.loading) return;
      try {
        r.loading = this.loadSnapshot(room);
        const snap = await r.loading;
        if (this.rooms.get(room) !== r) return; // unsubscribed meanwhile
        r.snapshotAttempts = 0;
        if (r.lastSeq === null) {
          // (Not if the fallback's own load got there first: never go back.)
          r.lastSeq = snap.seq;
          r.pending.clear();
          this.emit("snapshot", { room, ...snap });
        }
      } catch (err) {
        if (this.rooms.get(room) !== r) return;
        this.emit("error", { room, code: "snapshot_failed", message: String(err) });
        // Try the history again with its own backoff; the socket is fine.
        r.snapshotAttempts = (r.snapshotAttempts || 0) + 1;
        this._clearRoomTimer(r);
        if (this.state !== State.CLOSED && this.transport === "ws") {
          r.retryTimer = this.timers.setTimeout(() => {
            r.retryTimer = null;
            this._subscribe(room);
          }, backoffDelay(r.snapshotAttempts, this.backoff, this.random) + 250);
        }
        return;
      } finally {
        r.loading = null;
      }
    }
    if (this.rooms.get(room) !== r || !this.ws || !this.ws.opened) return;
    r.resyncing = true;
    // Without a snapshot loader and no seq yet, go live from the head (the ack says which).
    const frame = { type: "subscribe", ref: `sub:${room}`, room };
    if (r.lastSeq !== null) frame.since = r.lastSeq;
    this._raw(frame);
  }

  // -- receiving ------------------------------------------------------------
  _onMessage(ws, data) {
    if (ws !== this.ws) return;
    this._lastFrameAt = this.now();
    if (!ws.live) this._onLive(ws);
    let frame;
    try {
      frame = JSON.parse(data);
    } catch (err) {
      return;
    }
    if (!frame || typeof frame.type !== "string") return;
    switch (frame.type) {
      case "pong":
        return;
      case "ack":
        return this._onAck(frame);
      case "error":
        return this._onError(frame);
      default:
        // Room events carry the room's seq; pushes (typing, presence, read markers,
        // metrics) are ephemeral, even those that carry a seq of their own.
        if (!EPHEMERAL.has(frame.type) && typeof frame.seq === "number" && typeof frame.room === "string") {
          return this._onEvent(frame);
        }
        this.emit("ephemeral", frame);
    }
  }

  _onAck(frame) {
    const ref = frame.ref;
    if (typeof ref === "string" && ref.startsWith("sub:")) {
      const r = this.rooms.get(frame.room);
      if (r) {
        r.subscribed = true;
        r.resyncing = false;
        r.subscribeAttempts = 0;
        if (r.lastSeq === null) r.lastSeq = frame.seq;
        this.emit("subscribed", { room: frame.room, seq: frame.seq, replayed: frame.replayed });
      }
      return;
    }
    for (const [clientId, item] of this.outbox) {
      if (item.ref === ref) {
        this.outbox.delete(clientId);
        item.resolve({ clientId, id: frame.id, seq: frame.seq, room: frame.room });
        this.emit("sent", { clientId, id: frame.id, seq: frame.seq, room: frame.room });
        return;
      }
    }
    const req = this.requests.get(ref);
    if (req) {
      this.requests.delete(ref);
      req.resolve(frame);
    }
  }

  _onError(frame) {
    if (frame.code === "rate_limited" && frame.retry_after) this.retryAfter = frame.retry_after;
    const ref = frame.ref;
    const room = frame.room || (typeof ref === "string" && ref.startsWith("sub:") ? ref.slice(4) : null);
    if (frame.code === "recovery_failed" && room && this.rooms.has(room)) {
      // Too far behind to replay: reload the room's history (or, without a
      // loader, go live from the head), then subscribe again.
      const r = this.rooms.get(room);
      r.lastSeq = null;
      r.pending.clear();
      r.resyncing = false;
      this.emit("reset", { room });
      this._subscribe(room);
      return;
    }
    if (typeof ref === "string" && ref.startsWith("sub:")) {
      const r = this.rooms.get(room);
      if (r) {
        r.resyncing = false;
        r.subscribed = false;
        if (frame.code === "internal" || frame.code === "rate_limited") {
          // Transient: ask again later.
          r.subscribeAttempts = (r.subscribeAttempts || 0) + 1;
          const wait = Math.max((frame.retry_after || 0) * 1000, backoffDelay(r.subscribeAttempts, this.backoff, this.random));
          this._clearRoomTimer(r);
          r.retryTimer = this.timers.setTimeout(() => {
            r.retryTimer = null;
            this._subscribe(room);
          }, wait);
        }
      }
      this.emit("error", { room, code: frame.code, message: frame.message });
      return;
    }
    for (const [clientId, item] of this.outbox) {
      if (item.ref !== ref) continue;
      if (frame.code === "rate_limited") {
        const wait = Math.max(1, frame.retry_after || 1) * 1000;
        if (!item.retryTimer) {
          item.retryTimer = this.timers.setTimeout(() => {
            item.retryTimer = null;
            if (this.outbox.get(clientId) === item) this._sendMessage(clientId, item);
          }, wait);
        }
      } else if (FINAL_ERRORS.has(frame.code)) {
        this.outbox.delete(clientId);
        item.reject(Object.assign(new Error(frame.message), { code: frame.code }));
        this.emit("failed", { clientId, room: item.room, code: frame.code, message: frame.message });
      }
      // internal: stays queued and is resent on the next connection.
      return;
    }
    const req = this.requests.get(ref);
    if (req) {
      this.requests.delete(ref);
      req.reject(Object.assign(new Error(frame.message), { code: frame.code }));
      return;
    }
    if (room && (frame.code === "forbidden" || frame.code === "not_found") && this.rooms.has(room)) {
      // Access to a followed room was taken away: stop following it.
      this.rooms.delete(room);
    }
    this.emit("error", { room, code: frame.code, message: frame.message });
  }

  /** Apply room events exactly once and in seq order; ask for a replay on a gap. */
  _onEvent(frame) {
    const r = this.rooms.get(frame.room);
    if (!r || r.lastSeq === null) return;
    if (frame.seq <= r.lastSeq) return; // already applied
    if (frame.seq > r.lastSeq + 1) {
      r.pending.set(frame.seq, frame);
      if (!r.resyncing) {
        // A gap: the server replays everything after what we have.
        r.resyncing = true;
        this._raw({ type: "subscribe", ref: `sub:${frame.room}`, room: frame.room, since: r.lastSeq });
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
    if (frame.type === "message.new" && this.outbox.has(frame.client_id)) {
      // Our own message arrived before its ack (or the ack was lost): it is sent.
      const item = this.outbox.get(frame.client_id);
      if (item.room === frame.room && (this.user === null || frame.author === this.user)) {
        this.outbox.delete(frame.client_id);
        item.resolve({ clientId: frame.client_id, id: frame.id, seq: frame.seq, room: frame.room });
        this.emit("sent", { clientId: frame.client_id, id: frame.id, seq: frame.seq, room: frame.room });
      }
    }
    this.emit("event", frame);
  }
}
