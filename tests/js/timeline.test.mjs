// Unit tests of static/realtime/ui/timeline.js: history pages and live events
// merged in seq order, neither overwriting the other with something older.
import { test } from "node:test";
import assert from "node:assert/strict";
import { Timeline, lowerBound } from "../../static/realtime/ui/timeline.js";

const msg = (id, seq, body = `m${id}`) => ({ id, seq, author: "alice", body, ts: "2025-01-01T10:00:00Z", edited_at: null });

test("older pages are prepended in order; has_more says when the beginning is reached", () => {
  const t = new Timeline();
  t.load({ seq: 30, has_more: true, messages: [msg(20, 20), msg(30, 30)] });
  assert.equal(t.prepend({ seq: 30, has_more: true, messages: [msg(5, 5), msg(10, 10)] }), 2);
  assert.equal(t.hasOlder, true);
  t.prepend({ seq: 30, has_more: false, messages: [msg(1, 1)] });
  assert.deepEqual(t.items.map((m) => m.seq), [1, 5, 10, 20, 30]);
  assert.equal(t.hasOlder, false);
  assert.equal(lowerBound(t.items, 11), 3);
});

test("a page read before an edit or a delete does not bring the old version back", () => {
  const t = new Timeline();
  t.load({ seq: 50, has_more: true, messages: [msg(40, 40)] });
  // Events about messages not loaded yet, newer than the page in flight.
  assert.equal(t.apply({ type: "message.edited", room: "g", seq: 51, id: 10, body: "new", edited_at: "x" }), null);
  assert.equal(t.apply({ type: "message.deleted", room: "g", seq: 52, id: 11 }), null);
  t.prepend({ seq: 50, has_more: false, messages: [msg(10, 10, "old"), msg(11, 11), msg(12, 12)] });
  assert.deepEqual(t.items.map((m) => [m.id, m.body]), [[10, "new"], [12, "m12"], [40, "m40"]]);
});

test("live events: new once, edits by version, deletes", () => {
  const t = new Timeline();
  t.load({ seq: 2, has_more: false, messages: [msg(1, 1)] });
  assert.equal(t.apply({ type: "message.new", room: "g", ...msg(3, 3) }), 3);
  assert.equal(t.apply({ type: "message.new", room: "g", ...msg(3, 3) }), null, "once");
  assert.equal(t.items.at(-1).room, undefined, "stored without the event's envelope");
  assert.equal(t.apply({ type: "message.edited", room: "g", seq: 4, id: 1, body: "e", edited_at: "x" }), 1);
  assert.equal(t.byId.get(1).body, "e");
  assert.equal(t.apply({ type: "message.deleted", room: "g", seq: 5, id: 3 }), 3);
  assert.deepEqual(t.items.map((m) => m.id), [1]);
  assert.equal(t.acked(msg(9, 9)), true);
  assert.equal(t.acked(msg(9, 9)), false);
});
