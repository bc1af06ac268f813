// Unit tests of static/realtime/outbox.js alone: queued sends keyed by client_id,
// settled by an ack or their own echo, failed by a final error or a stop.
import { test } from "node:test";
import assert from "node:assert/strict";
import { Outbox } from "../../static/realtime/outbox.js";
import { FakeTimers } from "./fakes.mjs";

function setup(options = {}) {
  const timers = new FakeTimers();
  const frames = []; // what went on the wire
  const emitted = [];
  const host = { timers, emit: (name, detail) => emitted.push([name, detail]), _deliver: (frame) => frames.push(frame) };
  return { outbox: new Outbox(host, options), timers, frames, emitted };
}

test("a send goes out with its client_id, and its ack settles it once", async () => {
  const { outbox, frames, emitted } = setup();
  const { clientId, done } = outbox.send("general", "hello", "c1");
  assert.equal(clientId, "c1");
  assert.deepEqual(frames, [{ type: "message.send", ref: "m:c1", room: "general", body: "hello", client_id: "c1" }]);
  assert.equal(outbox.size, 1);
  assert.equal(outbox.onAck({ type: "ack", ref: "m:c1", room: "general", id: 7, seq: 4 }), true);
  assert.deepEqual(await done, { clientId: "c1", id: 7, seq: 4, room: "general" });
  assert.equal(outbox.size, 0);
  assert.deepEqual(emitted, [["sent", { clientId: "c1", id: 7, seq: 4, room: "general" }]]);
  assert.equal(outbox.onAck({ type: "ack", ref: "m:c1", id: 7, seq: 4 }), false, "a second ack answers nothing");
  assert.equal(emitted.length, 1);
});

test("one send is on the wire at a time, oldest first; a resend carries the same client_id and ref", () => {
  const { outbox, frames } = setup();
  outbox.send("general", "one", "c1");
  outbox.send("general", "two", "c2");
  assert.deepEqual(frames.map((f) => f.client_id), ["c1"], "two waits for one's answer");
  outbox.resendAll(); // a new socket: the oldest goes again
  assert.deepEqual(frames.map((f) => [f.client_id, f.ref]), [["c1", "m:c1"], ["c1", "m:c1"]]);
  outbox.onAck({ type: "ack", ref: "m:c1", room: "general", id: 1, seq: 1 });
  assert.deepEqual(frames.map((f) => f.client_id), ["c1", "c1", "c2"]);
});

test("a rate limit holds the whole outbox: nothing overtakes the refused message", () => {
  // The defect: each refused message retried on its own timer, and later ones
  // were stored before earlier ones (n39, n43, n40...).
  const { outbox, frames, timers } = setup();
  for (let i = 1; i <= 5; i++) outbox.send("general", `n${i}`, `c${i}`);
  outbox.onAck({ type: "ack", ref: "m:c1", room: "general", id: 1, seq: 1 });
  outbox.onError({ type: "error", ref: "m:c2", code: "rate_limited", retry_after: 0.5 });
  timers.advance(499);
  assert.deepEqual(frames.map((f) => f.client_id), ["c1", "c2"], "held: nothing goes, c3 included");
  timers.advance(1);
  assert.deepEqual(frames.map((f) => f.client_id), ["c1", "c2", "c2"], "the refused one goes first again");
  outbox.onAck({ type: "ack", ref: "m:c2", room: "general", id: 2, seq: 2 });
  outbox.onError({ type: "error", ref: "m:c3", code: "rate_limited", retry_after: 0.2 });
  timers.advance(200);
  outbox.onAck({ type: "ack", ref: "m:c3", room: "general", id: 3, seq: 3 });
  outbox.onAck({ type: "ack", ref: "m:c4", room: "general", id: 4, seq: 4 });
  outbox.onAck({ type: "ack", ref: "m:c5", room: "general", id: 5, seq: 5 });
  assert.deepEqual(frames.map((f) => f.client_id), ["c1", "c2", "c2", "c3", "c3", "c4", "c5"]);
  assert.equal(outbox.size, 0);
});

test("a send made during a hold waits for it too", () => {
  const { outbox, frames, timers } = setup();
  outbox.send("general", "a", "c1");
  outbox.onError({ type: "error", ref: "m:c1", code: "rate_limited", retry_after: 1 });
  outbox.resendAll(); // even a new socket does not lift the hold
  outbox.send("general", "b", "c2");
  assert.deepEqual(frames.map((f) => f.client_id), ["c1"]);
  timers.advance(1000);
  assert.deepEqual(frames.map((f) => f.client_id), ["c1", "c1"]);
});

test("a final error rejects the send and drops it; internal keeps it queued", async () => {
  const { outbox, emitted, frames, timers } = setup();
  const kept = outbox.send("general", "kept", "c1");
  const refused = outbox.send("general", "refused", "c2");
  assert.equal(outbox.onError({ type: "error", ref: "m:c1", code: "internal", message: "oops" }), true);
  assert.equal(outbox.size, 2, "internal: still queued");
  timers.advance(2000);
  assert.deepEqual(frames.map((f) => f.client_id), ["c1", "c1"], "internal: the same one again, still first");
  assert.equal(outbox.onError({ type: "error", ref: "m:c2", code: "forbidden", message: "no" }), true);
  await assert.rejects(refused.done, (err) => err.code === "forbidden" && err.message === "no");
  assert.equal(outbox.size, 1);
  assert.deepEqual(emitted, [["failed", { clientId: "c2", room: "general", code: "forbidden", message: "no" }]]);
  assert.equal(outbox.onError({ type: "error", ref: "r9", code: "forbidden" }), false, "not one of ours");
  outbox.onAck({ type: "ack", ref: "m:c1", room: "general", id: 1, seq: 1 });
  assert.equal((await kept.done).id, 1);
});

test("rate_limited resends the same client_id after retry_after, once per window", () => {
  const { outbox, frames, timers } = setup();
  outbox.send("general", "hello", "c1");
  outbox.onError({ type: "error", ref: "m:c1", code: "rate_limited", retry_after: 3 });
  outbox.onError({ type: "error", ref: "m:c1", code: "rate_limited", retry_after: 3 }); // the same window
  timers.advance(2999);
  assert.equal(frames.length, 1, "not before retry_after");
  timers.advance(1);
  assert.equal(frames.length, 2);
  assert.equal(frames[1].client_id, "c1");
  timers.advance(60000);
  assert.equal(frames.length, 2, "one resend per window");
  assert.equal(outbox.size, 1, "still queued until acked");
});

test("a rate-limited send settled meanwhile is not sent again", () => {
  const { outbox, frames, timers } = setup();
  outbox.send("general", "hello", "c1");
  outbox.onError({ type: "error", ref: "m:c1", code: "rate_limited", retry_after: 1 });
  outbox.onAck({ type: "ack", ref: "m:c1", room: "general", id: 1, seq: 1 });
  timers.advance(1000);
  assert.equal(frames.length, 1);
});

test("our own message coming back settles it; the same client_id from someone else does not", async () => {
  const { outbox } = setup({ user: "alice" });
  const { done } = outbox.send("general", "hello", "c1");
  outbox.echo({ type: "message.new", room: "general", seq: 5, id: 9, author: "mallory", client_id: "c1" });
  outbox.echo({ type: "message.new", room: "other", seq: 5, id: 9, author: "alice", client_id: "c1" });
  assert.equal(outbox.size, 1);
  outbox.echo({ type: "message.new", room: "general", seq: 5, id: 9, author: "alice", client_id: "c1" });
  assert.deepEqual(await done, { clientId: "c1", id: 9, seq: 5, room: "general" });
});

test("failAll rejects every queued send with the stop's reason", async () => {
  const { outbox, emitted } = setup();
  const a = outbox.send("general", "a", "c1");
  const b = outbox.send("ops", "b", "c2");
  outbox.failAll("unauthenticated", "signed out");
  await assert.rejects(a.done, (err) => err.code === "unauthenticated" && err.message === "signed out");
  await assert.rejects(b.done, (err) => err.code === "unauthenticated");
  assert.equal(outbox.size, 0);
  assert.deepEqual(emitted.map(([name, d]) => [name, d.clientId, d.room]), [["failed", "c1", "general"], ["failed", "c2", "ops"]]);
});

test("a body over the limit is refused and never goes out", async () => {
  const { outbox, frames } = setup({ maxBodyLength: 5 });
  await assert.rejects(outbox.send("general", "123456", "c1").done, (err) => err.code === "too_large");
  assert.equal(outbox.size, 0);
  assert.equal(frames.length, 0);
  outbox.send("general", "12345", "c2");
  assert.equal(frames.length, 1, "the limit itself is allowed");
});

test("failAll cancels the rate-limited resends it fails", () => {
  const { outbox, timers, frames } = setup();
  const { done } = outbox.send("general", "slow", "c1");
  done.catch(() => {});
  outbox.onError({ type: "error", ref: "m:c1", code: "rate_limited", retry_after: 2, message: "slow down" });
  assert.equal(timers.queue.length, 1);
  outbox.failAll("closed", "the client was closed");
  assert.equal(timers.queue.length, 0);
  timers.advance(10000);
  assert.equal(frames.length, 1);
});
