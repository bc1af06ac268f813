// Unit tests of static/realtime/rooms.js alone: the delivery guarantee on the
// client (each event once, in seq order; a gap asks for one replay with since;
// recovery_failed resets and reloads), and snapshot loading with retry.
import { test } from "node:test";
import assert from "node:assert/strict";
import { Rooms, isRoomEvent } from "../../static/realtime/rooms.js";
import { State } from "../../static/realtime/state.js";
import { FakeTimers, flush } from "./fakes.mjs";

function setup({ loadSnapshot = null } = {}) {
  const timers = new FakeTimers();
  const written = []; // frames written on the socket
  const emitted = [];
  const echoed = [];
  const host = {
    timers, random: () => 0.5, backoff: { base: 500, cap: 30000 }, state: State.OPEN, transport: "ws",
    emit: (name, detail) => emitted.push([name, detail]),
    socket: { opened: true, write: (frame) => (written.push(frame), true) },
    outbox: { echo: (frame) => echoed.push(frame) },
  };
  const rooms = new Rooms(host, { loadSnapshot });
  const applied = () => emitted.filter(([name]) => name === "event").map(([, e]) => e.seq);
  return { rooms, host, timers, written, emitted, echoed, applied };
}

const ev = (seq, room = "general") => ({ type: "message.new", room, seq, id: seq, author: "a", body: `b${seq}`, client_id: `c${seq}` });

test("frames out of order are applied once each, in seq order", () => {
  const { rooms, applied } = setup();
  rooms.follow("general", { since: 0 });
  rooms.onEvent(ev(3));
  rooms.onEvent(ev(2));
  assert.deepEqual(applied(), [], "held until the gap fills");
  rooms.onEvent(ev(1));
  assert.deepEqual(applied(), [1, 2, 3]);
  assert.equal(rooms.lastSeq("general"), 3);
});

test("a duplicate is dropped, held or applied", () => {
  const { rooms, applied } = setup();
  rooms.follow("general", { since: 0 });
  rooms.onEvent(ev(1));
  rooms.onEvent(ev(1));
  rooms.onEvent(ev(3));
  rooms.onEvent(ev(3)); // held twice: still once
  rooms.onEvent(ev(2));
  rooms.onEvent(ev(2));
  assert.deepEqual(applied(), [1, 2, 3]);
});

test("a gap asks for exactly one replay, with since the last applied seq", () => {
  const { rooms, written, applied } = setup();
  rooms.follow("general", { since: 4 });
  rooms.onEvent(ev(5));
  rooms.onEvent(ev(7));
  rooms.onEvent(ev(9));
  rooms.onEvent(ev(8));
  assert.deepEqual(written, [{ type: "subscribe", ref: "sub:general", room: "general", since: 5 }]);
  // The replay's ack ends the resync; the replayed events fill the gap.
  rooms.onAck({ type: "ack", ref: "sub:general", room: "general", seq: 9, replayed: 4 });
  rooms.onEvent(ev(6));
  assert.deepEqual(applied(), [5, 6, 7, 8, 9]);
  rooms.onEvent(ev(11)); // a new gap after the resync: one more replay
  assert.equal(written.length, 2);
  assert.equal(written[1].since, 9);
});

test("an applied event is offered to the outbox (our own message settles there), then told", () => {
  const { rooms, echoed, emitted } = setup();
  rooms.follow("general", { since: 0 });
  rooms.onEvent(ev(1));
  assert.deepEqual(echoed.map((e) => e.seq), [1]);
  assert.deepEqual(emitted.map(([name]) => name), ["event"]);
});

test("events of a room without a seq yet, or not followed, are ignored", () => {
  const { rooms, applied, written } = setup();
  rooms.follow("general");
  rooms.onEvent(ev(1));
  rooms.onEvent(ev(1, "elsewhere"));
  assert.deepEqual(applied(), []);
  assert.deepEqual(written, []);
});

test("without a loader and a seq, the subscribe goes live from the head its ack names", () => {
  const { rooms, written, emitted, applied } = setup();
  rooms.follow("general");
  rooms.sync("general");
  assert.deepEqual(written, [{ type: "subscribe", ref: "sub:general", room: "general" }]);
  assert.equal(rooms.onAck({ type: "ack", ref: "sub:general", room: "general", seq: 12, replayed: 0 }), true);
  assert.equal(rooms.lastSeq("general"), 12);
  assert.deepEqual(emitted.at(-1), ["subscribed", { room: "general", seq: 12, replayed: 0 }]);
  rooms.onEvent(ev(13));
  assert.deepEqual(applied(), [13]);
});

test("recovery_failed resets the room and reloads its snapshot, then subscribes with the new seq", async () => {
  let loads = 0;
  const { rooms, written, emitted, applied } = setup({ loadSnapshot: async () => ({ seq: [10, 20][loads++], messages: [] }) });
  rooms.follow("general");
  rooms.sync("general");
  await flush();
  assert.deepEqual(written.at(-1), { type: "subscribe", ref: "sub:general", room: "general", since: 10 });
  rooms.onEvent(ev(12)); // a gap: held
  assert.equal(rooms.onError({ type: "error", code: "recovery_failed", room: "general", message: "too old" }), true);
  assert.equal(rooms.lastSeq("general"), null);
  await flush();
  assert.equal(loads, 2);
  const names = emitted.map(([name]) => name);
  assert.deepEqual(names.slice(names.indexOf("reset")), ["reset", "snapshot"]);
  assert.deepEqual(written.at(-1), { type: "subscribe", ref: "sub:general", room: "general", since: 20 });
  rooms.onEvent(ev(21));
  assert.deepEqual(applied(), [21], "what was held before the reset is gone");
});

test("a snapshot that fails to load is told and retried with backoff", async () => {
  let loads = 0;
  const { rooms, timers, written, emitted } = setup({
    loadSnapshot: async () => {
      loads += 1;
      if (loads === 1) throw new Error("503");
      return { seq: 3, messages: [] };
    },
  });
  rooms.follow("general");
  rooms.sync("general");
  await flush();
  assert.deepEqual(emitted, [["error", { room: "general", code: "snapshot_failed", message: "Error: 503" }]]);
  assert.deepEqual(written, [], "no subscribe without a seq to start from");
  timers.advance(999); // backoffDelay(1) with random 0.5 is 750, + 250
  await flush();
  assert.equal(loads, 1);
  timers.advance(1);
  await flush();
  assert.equal(loads, 2);
  assert.deepEqual(written, [{ type: "subscribe", ref: "sub:general", room: "general", since: 3 }]);
});

test("a transient error on a subscribe retries it after max(retry_after, backoff)", () => {
  const { rooms, timers, written } = setup();
  rooms.follow("general", { since: 2 });
  rooms.sync("general");
  assert.equal(rooms.onError({ type: "error", ref: "sub:general", code: "rate_limited", retry_after: 5 }), true);
  timers.advance(4999);
  assert.equal(written.length, 1);
  timers.advance(1);
  assert.equal(written.length, 2);
  assert.deepEqual(written[1], { type: "subscribe", ref: "sub:general", room: "general", since: 2 });
});

test("unfollowing cancels a pending retry, which would otherwise hit the room followed again", () => {
  const { rooms, timers, written } = setup();
  rooms.follow("general", { since: 2 });
  rooms.onError({ type: "error", ref: "sub:general", code: "internal", message: "oops" });
  rooms.unfollow("general");
  assert.equal(timers.queue.length, 0);
  rooms.follow("general", { since: 2 }); // followed again, not synced yet
  timers.advance(60000);
  assert.deepEqual(written, []);
});

test("typing, presence, read markers and metrics are not room events, even with a seq", () => {
  assert.equal(isRoomEvent(ev(1)), true);
  for (const type of ["typing", "presence.state", "presence.diff", "read.state", "read.marker", "read.markers", "metrics.tick"]) {
    assert.equal(isRoomEvent({ type, room: "general", seq: 4 }), false, type);
  }
  assert.equal(isRoomEvent({ type: "message.new", seq: 4 }), false, "no room");
});

// -- the log's epoch ------------------------------------------------------------
test("the epoch from the snapshot goes with since on every resubscribe and gap repair", async () => {
  const { rooms, written } = setup({ loadSnapshot: async () => ({ seq: 10, epoch: "e1", messages: [] }) });
  rooms.follow("general");
  rooms.sync("general");
  await flush();
  assert.deepEqual(written.at(-1), { type: "subscribe", ref: "sub:general", room: "general", since: 10, epoch: "e1" });
  rooms.onAck({ type: "ack", ref: "sub:general", room: "general", seq: 10, epoch: "e1", replayed: 0 });
  rooms.onEvent(ev(12)); // a gap
  assert.deepEqual(written.at(-1), { type: "subscribe", ref: "sub:general", room: "general", since: 10, epoch: "e1" });
  assert.equal(rooms.epoch("general"), "e1");
});

test("a room live from the head takes the ack's epoch, and resumes with it", () => {
  const { rooms, written } = setup();
  rooms.follow("general");
  rooms.sync("general");
  rooms.onAck({ type: "ack", ref: "sub:general", room: "general", seq: 4, epoch: "abc", replayed: 0 });
  rooms.lost();
  rooms.sync("general"); // the socket came back
  assert.deepEqual(written.at(-1), { type: "subscribe", ref: "sub:general", room: "general", since: 4, epoch: "abc" });
});

test("a log started again (recovery_failed) forgets the epoch and reloads into the new one", async () => {
  let loads = 0;
  const snaps = [{ seq: 10, epoch: "old" }, { seq: 3, epoch: "new" }];
  const { rooms, written, applied } = setup({ loadSnapshot: async () => ({ ...snaps[loads++], messages: [] }) });
  rooms.follow("general");
  rooms.sync("general");
  await flush();
  rooms.onAck({ type: "ack", ref: "sub:general", room: "general", seq: 10, epoch: "old", replayed: 0 });
  rooms.onEvent(ev(11));
  // The server ends the subscription: the log was started again.
  rooms.onError({ type: "error", code: "recovery_failed", room: "general", message: "started again" });
  assert.equal(rooms.epoch("general"), null);
  await flush();
  assert.deepEqual(written.at(-1), { type: "subscribe", ref: "sub:general", room: "general", since: 3, epoch: "new" });
  rooms.onEvent(ev(4));
  assert.deepEqual(applied(), [11, 4], "seqs of the new log apply from its snapshot's seq");
});

test("following with a seq and its epoch resumes with both; a seq alone resumes without", () => {
  const { rooms, written } = setup();
  rooms.follow("general", { since: 7, epoch: "e7" });
  rooms.follow("ops", { since: 2 });
  rooms.sync("general");
  rooms.sync("ops");
  assert.deepEqual(written, [
    { type: "subscribe", ref: "sub:general", room: "general", since: 7, epoch: "e7" },
    { type: "subscribe", ref: "sub:ops", room: "ops", since: 2 },
  ]);
});

test("a gap while no socket is open holds the event and writes nothing (the next poll page fills it)", () => {
  const { rooms, host, written, applied } = setup();
  host.socket.opened = false;
  rooms.follow("general", { since: 1 });
  rooms.onEvent(ev(3));
  assert.deepEqual(written, []);
  assert.equal(rooms.get("general").resyncing, false);
  rooms.onEvent(ev(2));
  assert.deepEqual(applied(), [2, 3]);
});

test("a revoked room's pending retry is cancelled", () => {
  const { rooms, timers, written } = setup();
  rooms.follow("general", { since: 2 });
  rooms.onError({ type: "error", ref: "sub:general", code: "internal", message: "oops" });
  rooms.revoke("general");
  assert.equal(timers.queue.length, 0);
  rooms.follow("general", { since: 2 });
  timers.advance(60000);
  assert.deepEqual(written, []);
});
