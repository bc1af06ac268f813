// Queued sends, keyed by client_id, in the order they were written: a message
// stays queued until an ack (over the socket or REST), or the message itself coming
// back, settles it, or a final error fails it. Every resend carries the same
// client_id, so the server applies it once.
//
// Order: the order a person typed is the order everyone sees. So only the oldest
// queued message is ever on the wire (one in flight, like the REST fallback): a
// later one could otherwise be stored before an earlier one that was refused
// (rate_limited) or lost. A rate limit holds the whole outbox for retry_after, then
// the same oldest message goes again; when the client stops, every queued send
// fails. No DOM code.
//
// Its host (the client) provides emit, timers, and _deliver(frame): put a
// message.send on the wire (the socket, and REST while polling).

import { ErrorCode } from "./codes.js";

// Errors after which resending the same request cannot succeed.
export const FINAL_ERRORS = new Set([ErrorCode.INVALID, ErrorCode.UNKNOWN_TYPE, ErrorCode.FORBIDDEN, ErrorCode.NOT_FOUND,
  ErrorCode.TOO_LARGE, ErrorCode.CONFLICT]);

/** A random id for client_id (idempotent sends), without needing a secure context. */
export function randomId(cryptoImpl = globalThis.crypto) {
  const bytes = new Uint8Array(12);
  if (cryptoImpl && cryptoImpl.getRandomValues) cryptoImpl.getRandomValues(bytes);
  else for (let i = 0; i < bytes.length; i++) bytes[i] = Math.floor(Math.random() * 256);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

// ms before a send the server failed on (internal) goes again.
export const INTERNAL_RETRY = 2000;

export class Outbox {
  /**
   * @param {object} host  emit, timers, _deliver(frame)
   * @param {object} [options]
   * @param {number} [options.maxBodyLength]  REALTIME_MAX_BODY_LENGTH: longer bodies are refused here
   * @param {string} [options.user]  our username, to recognise our own messages coming back
   */
  constructor(host, { maxBodyLength = 4000, user = null } = {}) {
    this.host = host;
    this.maxBodyLength = maxBodyLength;
    this.user = user;
    this.items = new Map(); // client_id -> {room, body, resolve, reject, ref}, oldest first
    this.inFlight = null; // the client_id on the wire, waiting for its answer
    this.holdTimer = null; // a rate limit: nothing goes out until it fires
  }

  /** Held by a rate limit: nothing is sent until retry_after has passed. */
  get held() {
    return this.holdTimer !== null;
  }

  /** Number of messages waiting for an ack. */
  get size() {
    return this.items.size;
  }

  /** Queue a message and send it now if a transport can. Returns {clientId, done}:
   * done resolves with the ack or rejects on a final error. */
  send(room, body, clientId = randomId()) {
    let resolve, reject;
    const done = new Promise((res, rej) => {
      resolve = res;
      reject = rej;
    });
    if (typeof body !== "string" || body.length > this.maxBodyLength) {
      // Refused here: a frame the server would close (1009) must never be queued.
      const err = Object.assign(new Error(`longer than ${this.maxBodyLength} characters`), { code: "too_large" });
      this.host.emit("failed", { clientId, room, code: err.code, message: err.message });
      return { clientId, done: Promise.reject(err) };
    }
    const item = { room, body, resolve, reject, ref: `m:${clientId}` };
    this.items.set(clientId, item);
    this.pump();
    return { clientId, done };
  }

  /** A socket has opened: the oldest queued message goes (again, same client_id),
   * and the rest after it, one at a time. A rate limit's hold still stands. */
  resendAll() {
    this.inFlight = null;
    this.pump();
  }

  /** Put the oldest queued message on the wire, unless one is already waiting
   * for its answer or a rate limit holds the outbox. */
  pump() {
    if (this.inFlight !== null || this.held || !this.items.size) return;
    const [clientId, item] = this.first();
    this.inFlight = clientId;
    this._send(clientId, item);
  }

  /** The answer to clientId came (or it left the queue): the next one may go. */
  _answered(clientId) {
    if (this.inFlight === clientId) this.inFlight = null;
    this.pump();
  }

  /** Hold every send for `ms` (a rate limit), then resend the oldest first. */
  hold(ms) {
    this.inFlight = null;
    if (this.holdTimer) return; // the same window
    this.holdTimer = this.host.timers.setTimeout(() => {
      this.holdTimer = null;
      this.pump();
    }, ms);
  }

  _send(clientId, item) {
    // One ref per message, whatever the attempt: any attempt's ack settles it.
    item.ref = `m:${clientId}`;
    this.host._deliver({ type: "message.send", ref: item.ref, room: item.room, body: item.body, client_id: clientId });
  }

  /** The oldest queued send, [clientId, item], or undefined. */
  first() {
    return this.items.entries().next().value;
  }

  /** Whether `item` is still the queued send for clientId (not settled meanwhile). */
  holds(clientId, item) {
    return this.items.get(clientId) === item;
  }

  /** Sent: {id, seq, room} from an ack or the message itself. */
  settle(clientId, item, { id, seq, room }) {
    this.items.delete(clientId);
    item.resolve({ clientId, id, seq, room });
    this.host.emit("sent", { clientId, id, seq, room });
    this._answered(clientId);
  }

  /** Failed for good. */
  fail(clientId, item, code, message) {
    this.items.delete(clientId);
    item.reject(Object.assign(new Error(message), { code }));
    this.host.emit("failed", { clientId, room: item.room, code, message });
    this._answered(clientId);
  }

  /** Settle every queued send as failed: nothing will send them any more. */
  failAll(code, message) {
    if (this.holdTimer) this.host.timers.clearTimeout(this.holdTimer);
    this.holdTimer = null;
    this.inFlight = null;
    const items = [...this.items];
    this.items.clear();
    for (const [clientId, item] of items) {
      item.reject(Object.assign(new Error(message), { code }));
      this.host.emit("failed", { clientId, room: item.room, code, message });
    }
  }

  _byRef(ref) {
    for (const entry of this.items) if (entry[1].ref === ref) return entry;
    return null;
  }

  /** An ack frame: true if it answered one of our sends. */
  onAck(frame) {
    const entry = this._byRef(frame.ref);
    if (!entry) return false;
    this.settle(entry[0], entry[1], frame);
    return true;
  }

  /** An error frame: true if it answered one of our sends. */
  onError(frame) {
    const entry = this._byRef(frame.ref);
    if (!entry) return false;
    const [clientId, item] = entry;
    if (frame.code === ErrorCode.RATE_LIMITED) {
      // Nothing overtakes it: the whole outbox waits, then it goes first.
      this.hold(Math.max(0.1, frame.retry_after || 1) * 1000);
    } else if (FINAL_ERRORS.has(frame.code)) {
      this.fail(clientId, item, frame.code, frame.message);
    } else {
      // internal: stays queued, first in line, and goes again shortly.
      this.hold(INTERNAL_RETRY);
    }
    return true;
  }

  /** A room event was applied: if it is our own message (it arrived before its
   * ack, or the ack was lost), it is sent. */
  echo(frame) {
    if (frame.type !== "message.new" || !this.items.has(frame.client_id)) return;
    const item = this.items.get(frame.client_id);
    if (item.room === frame.room && (this.user === null || frame.author === this.user)) {
      this.settle(frame.client_id, item, frame);
    }
  }
}
