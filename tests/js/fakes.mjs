// Fakes shared by the client's unit tests: timers driven by hand, and a WebSocket
// the test opens, feeds and closes. (Not a test file: no test runner pattern matches.)

export class FakeTimers {
  constructor() { this.now = 0; this.queue = []; this.nextId = 1; }
  setTimeout = (fn, ms) => { const id = this.nextId++; this.queue.push({ id, at: this.now + ms, fn }); return id; };
  clearTimeout = (id) => { this.queue = this.queue.filter((t) => t.id !== id); };
  advance(ms) {
    const until = this.now + ms;
    for (;;) {
      this.queue.sort((a, b) => a.at - b.at);
      const t = this.queue[0];
      if (!t || t.at > until) break;
      this.queue.shift();
      this.now = t.at;
      t.fn();
    }
    this.now = until;
  }
}

export function fakeSocketClass() {
  const sockets = [];
  class FakeSocket {
    constructor(url, protocols) { this.url = url; this.protocols = protocols; this.sent = []; sockets.push(this); }
    send(data) { this.sent.push(JSON.parse(data)); }
    close(code, reason) { this.closedWith = { code, reason }; }
    // helpers for the test
    // A live server: the socket opens and answers the client's first ping.
    open() { this.openSilently(); this.receive({ type: "pong" }); }
    // A proxy that passes the upgrade and then nothing.
    openSilently() { this.onopen && this.onopen(); }
    receive(frame) { this.onmessage && this.onmessage({ data: JSON.stringify(frame) }); }
    serverClose(code, reason = "") { this.onclose && this.onclose({ code, reason }); }
  }
  return { FakeSocket, sockets };
}

/** Let pending promise callbacks run. */
export const flush = async () => {
  for (let i = 0; i < 10; i++) await new Promise((r) => setImmediate(r));
};
