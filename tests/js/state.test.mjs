// Unit tests of static/realtime/state.js alone: the Emitter's events and setState.
import { test } from "node:test";
import assert from "node:assert/strict";
import { Close, Emitter, State } from "../../static/realtime/state.js";
import { Close as Generated } from "../../static/realtime/codes.js";

test("setState tells a change once; a repeat only when it names a new delay", () => {
  const e = new Emitter();
  const told = [];
  e.on("state", (s) => told.push(s));
  e.setState(State.CONNECTING);
  e.setState(State.CONNECTING);
  assert.deepEqual(told, [{ state: State.CONNECTING }]);
  e.setState(State.RECONNECTING, { delay: 500, at: 500 });
  e.setState(State.RECONNECTING, { delay: 1000, at: 1000 });
  e.setState(State.RECONNECTING);
  assert.deepEqual(told.slice(1), [{ state: State.RECONNECTING, delay: 500, at: 500 }, { state: State.RECONNECTING, delay: 1000, at: 1000 }]);
  assert.equal(e.state, State.RECONNECTING);
});

test("a listener that throws does not stop the others; on() returns its removal", (t) => {
  const e = new Emitter();
  const logged = t.mock.method(console, "error", () => {});
  const got = [];
  e.on("event", () => {
    throw new Error("boom");
  });
  const off = e.on("event", (d) => got.push(d));
  e.emit("event", 1);
  assert.deepEqual(got, [1]);
  assert.equal(logged.mock.callCount(), 1);
  off();
  e.emit("event", 2);
  assert.deepEqual(got, [1]);
});

test("the close codes are the generated ones, plus the client's own heartbeat close", () => {
  for (const [name, code] of Object.entries(Generated)) assert.equal(Close[name], code, name);
  assert.equal(Close.HEARTBEAT, 4000);
  assert.ok(!Object.values(Generated).includes(4000), "4000 is the client's, not the protocol's");
});
