// Unit tests of static/realtime/socket.js alone, with a fake host in place of the
// client: when a socket counts as working, the connect timeout, the heartbeat, and
// what each close leads to.
import { test } from "node:test";
import assert from "node:assert/strict";
import { SocketTransport } from "../../static/realtime/socket.js";
import { Emitter, State } from "../../static/realtime/state.js";
import { FakeTimers, fakeSocketClass } from "./fakes.mjs";

function setup(options = {}, { divert = () => false } = {}) {
  const timers = new FakeTimers();
  const { FakeSocket, sockets } = fakeSocketClass();
  const heard = [];
  const host = Object.assign(new Emitter(), {
    timers, now: () => timers.now, random: () => 0.5, backoff: { base: 500, cap: 30000 },
    _socketOpened: () => heard.push("opened"),
    _socketLive: () => heard.push("live"),
    _socketLost: () => heard.push("lost"),
    _socketFrame: (frame) => heard.push(frame),
    _divert: (code) => (heard.push(["divert", code]), divert(code)),
    _stop: (reason, code) => (heard.push(["stop", reason, code]), host.setState(State.CLOSED, { reason, code })),
  });
  const states = [];
  host.on("state", (s) => states.push(s));
  const socket = new SocketTransport(host, { url: "ws://test/ws/v1/", WebSocket: FakeSocket, ...options });
  return { socket, host, timers, sockets, heard, states };
}

test("open is not connected: the state says open only once a frame has come back", () => {
  const { socket, sockets, heard, host } = setup();
  socket.connect();
  assert.equal(host.state, State.CONNECTING);
  sockets[0].openSilently();
  assert.deepEqual(heard, ["opened"]);
  assert.equal(sockets[0].sent[0].type, "ping", "a ping asks for that first frame");
  assert.equal(host.state, State.CONNECTING);
  sockets[0].receive({ type: "pong" });
  assert.deepEqual(heard, ["opened", "live"], "a pong is not passed on");
  assert.equal(host.state, State.OPEN);
  sockets[0].receive({ type: "typing", room: "general" });
  assert.deepEqual(heard.at(-1), { type: "typing", room: "general" });
  assert.equal(heard.filter((h) => h === "live").length, 1);
});

test("no frame before the connect timeout: dropped with 4000, a failed open, and tried again", () => {
  const { socket, sockets, timers, host } = setup({ connectTimeout: 5000 });
  socket.connect();
  sockets[0].openSilently();
  timers.advance(4999);
  assert.equal(sockets[0].closedWith, undefined);
  timers.advance(1);
  assert.deepEqual(sockets[0].closedWith, { code: 4000, reason: "connect timeout" });
  assert.equal(socket.failedOpens, 1);
  assert.equal(host.state, State.RECONNECTING);
  timers.advance(1000);
  assert.equal(sockets.length, 2);
});

test("the heartbeat keeps a socket that answers, and drops one that went silent", () => {
  const { socket, sockets, timers } = setup({ pingInterval: 1000, pingTimeout: 500 });
  socket.connect();
  sockets[0].open();
  for (let i = 0; i < 5; i++) {
    timers.advance(1000);
    assert.equal(sockets[0].sent.at(-1).type, "ping");
    sockets[0].receive({ type: "pong" });
  }
  assert.equal(sockets[0].closedWith, undefined, "answered: kept");
  timers.advance(1500);
  assert.deepEqual(sockets[0].closedWith, { code: 4000, reason: "heartbeat timeout" });
  assert.equal(socket.ws, null);
});

test("4001 stops (the host says how), and nothing is tried again", () => {
  const { socket, sockets, timers, heard } = setup();
  socket.connect();
  sockets[0].open();
  sockets[0].serverClose(4001);
  assert.deepEqual(heard.at(-1), ["stop", "unauthenticated", 4001]);
  timers.advance(120000);
  assert.equal(sockets.length, 1);
});

test("a failure goes to the fallback first; when it takes over, no backoff is scheduled", () => {
  const { socket, sockets, timers, heard, host } = setup({}, { divert: () => true });
  socket.connect();
  sockets[0].serverClose(1006);
  assert.deepEqual(heard.at(-1), ["divert", 1006]);
  assert.equal(host.state, State.CONNECTING, "no reconnecting with a delay");
  assert.equal(socket.retrying, false);
  timers.advance(120000);
  assert.equal(sockets.length, 1);
});

test("4029 waits at least the retry_after of the last rate_limited error, and only once", () => {
  const { socket, sockets, states } = setup();
  socket.connect();
  sockets[0].open();
  socket.retryAfter = 9;
  sockets[0].serverClose(4029);
  assert.equal(states.at(-1).delay, 9000);
  assert.equal(socket.retryAfter, 0, "used up");
});

test("a lost socket rejects the requests waiting on it; requests without one fail at once", async () => {
  const { socket, sockets, heard } = setup();
  await assert.rejects(socket.request({ type: "read", room: "general", seq: 1 }), (err) => err.code === "disconnected");
  socket.connect();
  sockets[0].open();
  const pending = socket.request({ type: "read", room: "general", seq: 1 });
  const { ref } = sockets[0].sent.at(-1);
  const answered = socket.request({ type: "read", room: "general", seq: 2 });
  assert.equal(socket.onAck({ type: "ack", ref: sockets[0].sent.at(-1).ref, seq: 2 }), true);
  assert.equal((await answered).seq, 2);
  sockets[0].serverClose(1006);
  await assert.rejects(pending, (err) => err.code === "disconnected");
  assert.ok(heard.includes("lost"));
  assert.equal(socket.onAck({ type: "ack", ref }), false);
});
