// The WebSocket transport: opening a socket; knowing it works only once a frame
// has come back (a proxy may pass the upgrade and then nothing); the connect
// timeout; the heartbeat; dropping a socket; what a close code means; when to try
// again (backoff, restart jitter, a rate limit's retry_after); requests and their
// acks by ref. It knows nothing of rooms or sends. No DOM code.
//
// Its host (the client) provides state, setState, timers, now, random, backoff,
// and hears what happens: _socketOpened(), _socketLive(), _socketLost(),
// _socketFrame(frame), _divert(code) (true: the long-poll fallback takes over
// from here), _stop(reason, code, message).

import { RestartSpread } from "./codes.js";
import { Close, State, backoffDelay } from "./state.js";

// Closes after which trying again by itself cannot help: stop, and say why. 4001:
// not signed in, or the session ended (a logout in another tab): the page offers
// the login. 4003: an operator disconnected this user: the page offers a reconnect.
export const STOP = { [Close.NOT_AUTHENTICATED]: "unauthenticated", [Close.FORBIDDEN]: "operator" };
const STOP_MESSAGE = { unauthenticated: "signed out", operator: "disconnected by an administrator" };
const RESTART = new Set([Close.SERVICE_RESTART, Close.SERVER_RESTART]);

const SPREAD = new RegExp(`^${RestartSpread.KEY}=([0-9]{1,9})$`);

/** The hint of a 4012's reason, "spread_ms=N": come back within N ms (at most
 * RestartSpread.MAX_MS). null without one, or a malformed one. */
export function restartSpread(reason) {
  const m = SPREAD.exec(typeof reason === "string" ? reason : "");
  return m ? Math.min(Number(m[1]), RestartSpread.MAX_MS) : null;
}

const disconnected = () => Object.assign(new Error("connection lost"), { code: "disconnected" });

export class SocketTransport {
  constructor(host, options) {
    this.host = host;
    this.url = options.url;
    this.WebSocket = options.WebSocket || globalThis.WebSocket;
    this.stableAfter = options.stableAfter ?? 10000; // ms open before attempts reset
    this.pingInterval = options.pingInterval ?? 20000;
    this.pingTimeout = options.pingTimeout ?? 10000; // silence allowed past an unanswered ping
    this.restartJitter = options.restartJitter ?? 1000;
    this.connectTimeout = options.connectTimeout ?? 10000; // no first frame by then: dropped

    this.ws = null;
    this.attempts = 0; // reconnects since the last stable connection: the backoff's exponent
    this.failedOpens = 0; // attempts in a row that never carried a frame
    this.retryAfter = 0; // s, from the last rate_limited error: a 4029 waits at least this
    this.requests = new Map(); // ref -> {resolve, reject}
    this.refCounter = 0;
    this._timer = null; // the next attempt (a reconnect, or the fallback's probe)
    this._stableTimer = null;
    this._pingTimer = null;
    this._connectTimer = null;
    this._lastFrameAt = 0;
  }

  /** Open: frames can be written (the server may not have answered yet). */
  get opened() {
    return !!(this.ws && this.ws.opened);
  }

  /** An attempt is scheduled. */
  get retrying() {
    return this._timer !== null;
  }

  connect() {
    const host = this.host;
    if (host.state === State.OPEN || this.ws) return;
    this.clearRetry();
    host.setState(host.state === null || host.state === State.CLOSED ? State.CONNECTING : host.state);
    let ws;
    try {
      ws = new this.WebSocket(this.url, ["rt.v1.json"]);
    } catch (err) {
      this.failedOpens += 1;
      this.scheduleReconnect(Close.ABNORMAL);
      return;
    }
    this.ws = ws;
    ws.onopen = () => this._onOpen(ws);
    ws.onmessage = (ev) => this._onMessage(ws, ev.data);
    ws.onclose = (ev) => this._onClose(ws, ev.code, ev.reason);
    ws.onerror = () => {}; // a close always follows
    this._connectTimer = host.timers.setTimeout(() => {
      this._connectTimer = null;
      if (this.ws === ws && !ws.live) {
        // No frame came back in time (a handshake that hangs, or a proxy that
        // passes the upgrade and then nothing): it counts as a failed open.
        this.failedOpens += 1;
        this.drop(Close.HEARTBEAT, "connect timeout");
        this.scheduleReconnect(Close.ABNORMAL);
      }
    }, this.connectTimeout);
  }

  _onOpen(ws) {
    if (ws !== this.ws) return;
    // Open is not yet connected: the state says so once a frame has come back
    // (_onLive), so a proxy that passes the upgrade and then nothing is caught.
    ws.opened = true;
    this.write({ type: "ping", t: this.host.now() });
    this.host._socketOpened();
  }

  /** The first frame from the server: the socket really works. */
  _onLive(ws) {
    const host = this.host;
    ws.live = true;
    this.failedOpens = 0;
    host._socketLive();
    if (this._connectTimer) host.timers.clearTimeout(this._connectTimer);
    this._connectTimer = null;
    this.clearRetry();
    host.setState(State.OPEN);
    this._stableTimer = host.timers.setTimeout(() => {
      this.attempts = 0;
    }, this.stableAfter);
    this._schedulePing();
  }

  _onMessage(ws, data) {
    if (ws !== this.ws) return;
    this._lastFrameAt = this.host.now();
    if (!ws.live) this._onLive(ws);
    let frame;
    try {
      frame = JSON.parse(data);
    } catch (err) {
      return;
    }
    if (!frame || typeof frame.type !== "string") return;
    if (frame.type === "pong") return;
    this.host._socketFrame(frame);
  }

  _onClose(ws, code, reason) {
    if (ws !== this.ws) return;
    this.ws = null;
    if (!ws.live) this.failedOpens += 1;
    this._lost();
    if (STOP[code]) {
      this.host._stop(STOP[code], code, STOP_MESSAGE[STOP[code]]);
      return;
    }
    if (this.host.state === State.CLOSED) return;
    this.scheduleReconnect(code, reason);
  }

  /** Close our socket, if any, and forget it: no handler of it runs again. */
  drop(code, reason) {
    const ws = this.ws;
    if (!ws) return;
    this.ws = null;
    ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
    try {
      ws.close(code, reason);
    } catch (err) {
      /* already closed */
    }
    this._lost();
  }

  /** The socket is gone: its timers stop, and what waited on it is told. */
  _lost() {
    for (const t of [this._stableTimer, this._pingTimer, this._connectTimer]) if (t) this.host.timers.clearTimeout(t);
    this._stableTimer = this._pingTimer = this._connectTimer = null;
    this.host._socketLost();
    for (const [, req] of this.requests) req.reject(disconnected());
    this.requests.clear();
  }

  // -- the next attempt ---------------------------------------------------------
  /** After a failure: the fallback's turn if it takes it, else a backoff. */
  scheduleReconnect(code, reason) {
    const state = this.host.state;
    if (state === State.OFFLINE || state === State.CLOSED) return;
    if (this.host._divert(code)) return;
    this.backoffReconnect(code, reason);
  }

  backoffReconnect(code, reason) {
    const host = this.host;
    let delay;
    if (RESTART.has(code)) {
      // The server is restarting on purpose: come back at once, spread out. A drain
      // says over how long (it closes its sockets in batches that far apart, at the
      // pace the other workers can take them back); else our own jitter, a tenth
      // of the window at least: never all in the same millisecond.
      const spread = restartSpread(reason);
      delay = spread === null
        ? Math.floor(this.restartJitter * (0.1 + 0.9 * host.random()))
        : Math.floor(spread * host.random());
    } else {
      delay = backoffDelay(this.attempts, host.backoff, host.random);
      this.attempts += 1;
      if (code === Close.RATE_LIMITED) delay = Math.max(delay, this.retryAfter * 1000);
      this.retryAfter = 0;
    }
    this.clearRetry();
    // attempts: failed attempts in a row, so the page can say "server unreachable".
    host.setState(State.RECONNECTING, { delay, code, at: host.now() + delay, attempts: this.attempts });
    this.retryIn(delay);
  }

  /** Connect in `delay` ms, if `when()` still says so then. One such timer at a time. */
  retryIn(delay, when = () => true) {
    this.clearRetry();
    this._timer = this.host.timers.setTimeout(() => {
      this._timer = null;
      if (when()) this.connect();
    }, delay);
  }

  clearRetry() {
    if (this._timer) this.host.timers.clearTimeout(this._timer);
    this._timer = null;
  }

  // -- heartbeat --------------------------------------------------------------
  _schedulePing() {
    this._pingTimer = this.host.timers.setTimeout(() => this._heartbeat(), this.pingInterval);
  }

  _heartbeat() {
    this._pingTimer = null;
    if (!this.ws || !this.ws.live) return;
    const silentFor = this.host.now() - this._lastFrameAt;
    if (silentFor >= this.pingInterval + this.pingTimeout) {
      // Nothing at all came back, not even a pong: the socket is dead.
      this.drop(Close.HEARTBEAT, "heartbeat timeout");
      this.scheduleReconnect(Close.ABNORMAL);
      return;
    }
    this.write({ type: "ping", t: this.host.now() });
    this._pingTimer = this.host.timers.setTimeout(() => this._heartbeat(), Math.min(this.pingInterval, this.pingTimeout));
  }

  // -- writing ----------------------------------------------------------------
  /** Write a frame if a socket is open; false if none is. */
  write(frame) {
    if (!this.opened) return false;
    this.ws.send(JSON.stringify(frame));
    return true;
  }

  /** Send a request and wait for its ack (rejects with {code} on error or disconnect). */
  request(frame) {
    return new Promise((resolve, reject) => {
      this.refCounter += 1;
      const ref = `r${this.refCounter}`;
      if (!this.write({ ...frame, ref })) {
        reject(Object.assign(new Error("not connected"), { code: "disconnected" }));
        return;
      }
      this.requests.set(ref, { resolve, reject });
    });
  }

  /** An ack frame: true if it answered a request. */
  onAck(frame) {
    const req = this.requests.get(frame.ref);
    if (!req) return false;
    this.requests.delete(frame.ref);
    req.resolve(frame);
    return true;
  }

  /** An error frame: true if it answered a request. */
  onError(frame) {
    const req = this.requests.get(frame.ref);
    if (!req) return false;
    this.requests.delete(frame.ref);
    req.reject(Object.assign(new Error(frame.message), { code: frame.code }));
    return true;
  }
}
