// The connection's state and how it is told: the State names, the close codes
// (./codes.js, generated from the protocol, plus the client's own), the backoff
// between attempts, and Emitter: named events, and setState, the only place the
// state changes. No DOM code.

import { Close as Codes } from "./codes.js";

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

/** Equal jitter: a uniform delay in [ceiling / 2, ceiling], ceiling = min(cap,
 * base * 2^attempt). Never 0: after a mass drop, full jitter's [0, ceiling] sends
 * a share of every client back at the same instant. */
export function backoffDelay(attempt, { base = 500, cap = 30000 } = {}, random = Math.random) {
  const ceiling = Math.min(cap, base * 2 ** Math.min(attempt, 30));
  return Math.floor(ceiling / 2 + random() * (ceiling / 2));
}

/** Named events and the connection's state. A listener that throws is logged and
 * does not stop the others. */
export class Emitter {
  constructor() {
    this.state = null;
    this.listeners = new Map();
  }

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

  /** The only place the connection state changes. A "state" event when it does, or
   * when the detail names a new delay (the next attempt was rescheduled). */
  setState(state, detail = {}) {
    const changed = state !== this.state;
    this.state = state;
    if (changed || detail.delay !== undefined) this.emit("state", { state, ...detail });
  }
}
