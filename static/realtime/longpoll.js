// The long-polling fallback, for networks where WebSockets fail: after
// `fallbackAfter` attempts in a row that never carried a frame, an HTTP check
// (if plain HTTP fails too, the server is down and backing off is right); one last
// socket attempt (the server may just be back); then a poll loop per room, each
// poll with a deadline of its own; the outbox posted over REST one message at a
// time, in order; and probes for a socket with backoff (base 1 s, cap
// `upgradeCap`), switching back as soon as one carries a frame. No DOM code.
//
// Its host (the client) provides state, setState, emit, timers, now, random,
// backoff, _stop(reason, code, message), socket (ws, failedOpens, connect(),
// backoffReconnect(code), retryIn(delay, when), clearRetry()), rooms and outbox.

import { Close, State, backoffDelay } from "./state.js";
import { FINAL_ERRORS, randomId } from "./outbox.js";

export class LongPoll {
  /**
   * @param {object} host  see the header
   * @param {object} options  poll, post (both needed to fall back), fallbackAfter,
   *   pollWait (s), upgradeCap (ms), checkTimeout (ms)
   */
  constructor(host, options) {
    this.host = host;
    this.pollFn = options.poll || null;
    this.pollLeaveFn = options.pollLeave || null; // (room, clientId): the page leaves its presence
    this.postFn = options.post || null;
    this.fallbackAfter = options.fallbackAfter ?? 3;
    this.pollWait = options.pollWait ?? 25;
    this.upgradeCap = options.upgradeCap ?? 10000;
    this.checkTimeout = options.checkTimeout ?? 10000; // the HTTP check before falling back
    this.active = false; // polling: the client's transport is "poll"
    this.probes = 0;
    this.lastChance = false; // HTTP answered: one more socket attempt before falling back
    this._polls = new Map(); // room -> AbortController of its running poll loop
    this._check = null; // the HTTP check in flight: {controller, timer}
    this._posting = false;
    // This page's poll id: while it polls a room it is present there, and each answer
    // carries the room's pushes (presence, typing, read markers) as `ephemeral`.
    this.clientId = options.pollClientId || randomId();
    this._presenceTags = new Map(); // room -> presence_tag of the presence.state we have
  }

  /** A socket attempt failed: true if the fallback takes it from here (keeps
   * polling and probes later, or checks HTTP first); false: back off. */
  divert(code) {
    const host = this.host;
    if (this.active || this.lastChance) {
      this.lastChance = false;
      this.enter(); // a failed probe: keep polling, probe again later
      return true;
    }
    if (!this.pollFn || host.socket.failedOpens < this.fallbackAfter || !host.rooms.size) return false;
    if (this._check) return true; // one check at a time; it decides what comes next
    // WebSockets keep failing. Fall back only if plain HTTP gets through (they are
    // blocked); if it does not, the server is down and backing off is right.
    const room = host.rooms.names().next().value;
    const check = { controller: new AbortController(), timer: null };
    check.timer = host.timers.setTimeout(() => check.controller.abort(), this.checkTimeout);
    this._check = check;
    const decide = (answered) => {
      if (this._check !== check) return; // cancelled: connected, closed or offline meanwhile
      this.cancelCheck();
      if (host.socket.ws || host.state === State.OFFLINE || host.state === State.CLOSED) return;
      if (!answered) {
        host.socket.backoffReconnect(code);
        return;
      }
      // HTTP works. The server may just be back (a restart fails sockets too):
      // one more WebSocket attempt first, and the fallback only if it fails.
      this.lastChance = true;
      host.socket.connect();
    };
    this.pollFn(room, 0, 0, check.controller.signal, 1).then(() => decide(true), () => decide(false));
    host.setState(State.RECONNECTING, { delay: 0, code, at: host.now() });
    return true;
  }

  cancelCheck() {
    const check = this._check;
    if (!check) return;
    this._check = null;
    this.host.timers.clearTimeout(check.timer);
    check.controller.abort();
  }

  /** Enter (or stay in) the fallback: poll every room, post the outbox, and
   * schedule the next WebSocket probe. */
  enter() {
    const host = this.host;
    host.socket.clearRetry();
    if (!this.active) {
      this.active = true;
      // The HTTP check has just answered: connected, over the fallback. A poll
      // that fails later says "reconnecting" until one answers again (_polled).
      host.setState(State.FALLBACK);
      host.rooms.clearTimers();
      for (const [room, r] of host.rooms.entries()) if (!r.background) this.startPolling(room);
      this.postOutbox();
    }
    const delay = backoffDelay(this.probes, { base: 1000, cap: this.upgradeCap }, host.random) + 500;
    this.probes += 1;
    host.socket.retryIn(delay, () => this.active); // a probe: once it carries a frame, onSocketLive
  }

  /** A socket works (a probe or otherwise): polling stops. Every room was
   * resubscribed with its seq and the outbox resent (same client_ids) when it opened. */
  onSocketLive() {
    this.lastChance = false;
    this.probes = 0;
    this.cancelCheck();
    if (this.active) this.leave();
  }

  /** Stop everything: the check, the polls; the transport is the socket again. */
  leave() {
    this.cancelCheck();
    for (const room of [...this._polls.keys()]) this.stopPolling(room);
    this.active = false;
  }

  /** HTTP answered while polling: the connection works, over the fallback. */
  _polled() {
    if (this.active && this.host.state !== State.FALLBACK) this.host.setState(State.FALLBACK);
  }

  startPolling(room) {
    if (!this.pollFn || this._polls.has(room)) return;
    const controller = new AbortController();
    this._polls.set(room, controller);
    this._pollLoop(room, controller).finally(() => {
      if (this._polls.get(room) === controller) this._polls.delete(room);
    });
  }

  stopPolling(room) {
    const poll = this._polls.get(room);
    if (poll) poll.abort();
    this._polls.delete(room);
    // Our presence there ends now: the aborted poll may not have been held (a
    // page closing between two polls), and a lease would outlive us by its TTL.
    if (poll && this.pollLeaveFn) this.pollLeaveFn(room, this.clientId).catch(() => {});
  }

  _sleep(ms, signal) {
    const timers = this.host.timers;
    return new Promise((resolve) => {
      const onAbort = () => {
        timers.clearTimeout(t);
        resolve();
      };
      const t = timers.setTimeout(() => {
        signal.removeEventListener("abort", onAbort);
        resolve();
      }, ms);
      signal.addEventListener("abort", onAbort, { once: true });
    });
  }

  /** One poll with a deadline of its own: a request that hangs (a connection
   * that died silently) fails after wait + 10 s instead of stalling the room. */
  async _timedPoll(room, since, wait, signal, limit, epoch = null, extra = undefined) {
    const request = new AbortController();
    const onAbort = () => request.abort();
    signal.addEventListener("abort", onAbort, { once: true });
    const timer = this.host.timers.setTimeout(() => request.abort(), (wait + 10) * 1000);
    try {
      return await this.pollFn(room, since, wait, request.signal, limit, epoch, extra);
    } finally {
      this.host.timers.clearTimeout(timer);
      signal.removeEventListener("abort", onAbort);
    }
  }

  async _pollLoop(room, controller) {
    const host = this.host;
    const rooms = host.rooms;
    const signal = controller.signal;
    let failures = 0;
    this._presenceTags.delete(room); // a new loop asks for the room's presence afresh
    while (!signal.aborted && this.active) {
      const r = rooms.get(room);
      if (!r) return;
      try {
        if (r.lastSeq === null) {
          if (rooms.loadSnapshot) {
            const snap = await rooms.loadSnapshot(room);
            if (signal.aborted || rooms.get(room) !== r) return;
            rooms.loaded(room, r, snap);
          } else {
            // No history wanted: go live from the head.
            const head = await this._timedPoll(room, 0, 0, signal, 1);
            if (signal.aborted || rooms.get(room) !== r) return;
            rooms.startAt(r, head.seq, head.epoch);
          }
          this._polled();
          host.emit("subscribed", { room, seq: r.lastSeq, replayed: 0 });
        }
        const extra = { client: this.clientId, presenceTag: this._presenceTags.get(room) || null };
        const page = await this._timedPoll(room, r.lastSeq, this.pollWait, signal, undefined, r.epoch, extra);
        if (signal.aborted || rooms.get(room) !== r) return;
        if (!r.epoch && page.epoch) r.epoch = page.epoch; // (a seq given to subscribe without one)
        failures = 0;
        this._polled();
        if (page.presence_tag) this._presenceTags.set(room, page.presence_tag);
        // The room's pushes, as the socket would have sent them (before the events:
        // someone's message ends their typing notice).
        for (const frame of page.ephemeral || []) if (frame && frame.room === room) host.emit("ephemeral", frame);
        // The same path as socket events: each seq once, in order.
        for (const event of page.events || []) rooms.onEvent(event);
      } catch (err) {
        if (signal.aborted) return;
        const status = err && err.status;
        if (status === 401) {
          host._stop("unauthenticated", Close.NOT_AUTHENTICATED, "signed out");
          return;
        }
        if (err && err.code === "recovery_failed") {
          rooms.reset(room, r);
          failures += 1;
          await this._sleep(backoffDelay(failures, host.backoff, host.random), signal);
          continue;
        }
        if (err && (err.code === "forbidden" || err.code === "not_found")) {
          rooms.revoke(room);
          host.emit("error", { room, code: err.code, message: err.message });
          return;
        }
        failures += 1;
        const wait = Math.max(((err && err.retryAfter) || 0) * 1000, backoffDelay(failures, host.backoff, host.random));
        if (!err || !err.status || err.status >= 500) {
          // The server is unreachable over HTTP too: say so, honestly.
          host.setState(State.RECONNECTING, { delay: wait, at: host.now() + wait });
        }
        await this._sleep(wait, signal);
      }
    }
  }

  /** While polling, post the outbox over REST one message at a time, in the order
   * they were written: two posts in flight could commit in either order. */
  postOutbox() {
    if (!this.postFn || this._posting) return;
    this._posting = true;
    this._drainOverRest().finally(() => {
      this._posting = false;
    });
  }

  async _drainOverRest() {
    const outbox = this.host.outbox;
    let failures = 0;
    while (this.active && outbox.size) {
      const [clientId, item] = outbox.first();
      try {
        const ack = await this.postFn(item.room, item.body, clientId);
        failures = 0;
        if (!outbox.holds(clientId, item)) continue; // the socket's ack came first
        outbox.settle(clientId, item, ack);
      } catch (err) {
        if (!outbox.holds(clientId, item)) continue;
        const status = (err && err.status) || 0;
        // A refusal (4xx but a timeout or a rate limit) will not change by itself.
        const final = (err && FINAL_ERRORS.has(err.code)) || (status >= 400 && status < 500 && status !== 408 && status !== 429);
        if (final) {
          const code = (err && err.code) || `http_${status}`;
          outbox.fail(clientId, item, code, (err && err.message) || code);
          continue;
        }
        // Rate-limited, a network error or a server fault: the same client_id
        // again later (idempotent on the server), still before the next one.
        failures += 1;
        const wait = Math.max(((err && err.retryAfter) || 0) * 1000, backoffDelay(failures, this.host.backoff, this.host.random));
        await new Promise((resolve) => this.host.timers.setTimeout(resolve, wait));
      }
    }
  }
}
