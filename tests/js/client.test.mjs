// Unit tests of static/realtime/client.js under Node's test runner, with a fake
// WebSocket and fake timers (no browser, no network).
import { test } from "node:test";
import assert from "node:assert/strict";
import { RealtimeClient, State, backoffDelay } from "../../static/realtime/client.js";
import { FakeTimers, fakeSocketClass, flush } from "./fakes.mjs";
import { restartSpread } from "../../static/realtime/socket.js";

function setup(extra = {}) {
  const timers = new FakeTimers();
  const { FakeSocket, sockets } = fakeSocketClass();
  const client = new RealtimeClient({
    url: "ws://test/ws/v1/", WebSocket: FakeSocket, timers, now: () => timers.now, random: () => 0.5, env: null,
    ...extra,
  });
  const states = [];
  client.on("state", (s) => states.push(s));
  const events = [];
  client.on("event", (e) => events.push(e));
  return { client, timers, sockets, states, events };
}

test("backoff delays stay within equal-jitter bounds and the cap, never 0", () => {
  for (let attempt = 0; attempt < 20; attempt++) {
    const ceiling = Math.min(30000, 500 * 2 ** attempt);
    assert.equal(backoffDelay(attempt, { base: 500, cap: 30000 }, () => 0), Math.floor(ceiling / 2));
    assert.ok(backoffDelay(attempt, { base: 500, cap: 30000 }, () => 0.999999) <= ceiling);
    assert.ok(backoffDelay(attempt, { base: 500, cap: 30000 }, () => 0.999999) >= ceiling - 1);
  }
});

test("connects with the v1 subprotocol and reports its states", () => {
  const { client, sockets, states } = setup();
  client.connect();
  assert.deepEqual(sockets[0].protocols, ["rt.v1.json"]);
  sockets[0].open();
  assert.deepEqual(states.map((s) => s.state), [State.CONNECTING, State.OPEN]);
});

test("4001 and 4003 stop without retrying", () => {
  for (const code of [4001, 4003]) {
    const { client, sockets, timers } = setup();
    client.connect();
    sockets[0].open();
    sockets[0].serverClose(code);
    assert.equal(client.state, State.CLOSED);
    timers.advance(120000);
    assert.equal(sockets.length, 1, `no reconnect after ${code}`);
  }
});

test("an abnormal close backs off, attempts grow, and reset after a stable connection", () => {
  const { client, sockets, timers, states } = setup({ random: () => 0.999 });
  client.connect();
  sockets[0].serverClose(1006);
  const first = states.at(-1);
  assert.equal(first.state, State.RECONNECTING);
  assert.ok(first.delay <= 500);
  timers.advance(first.delay);
  sockets[1].serverClose(1006);
  const second = states.at(-1);
  assert.ok(second.delay > 500 && second.delay <= 1000);
  timers.advance(second.delay);
  sockets[2].open();
  timers.advance(10000); // stable: attempts reset
  sockets[2].serverClose(1006);
  assert.ok(states.at(-1).delay <= 500);
});

test("4012 reconnects at once with small jitter, never in the same millisecond as everyone", () => {
  for (const random of [() => 0, () => 0.5, () => 0.999]) {
    const { client, sockets, states } = setup({ random });
    client.attempts = 8;
    client.connect();
    sockets[0].open();
    sockets[0].serverClose(4012);
    assert.ok(states.at(-1).delay >= 100 && states.at(-1).delay < 1000, `${states.at(-1).delay}`);
  }
});

test("4012 with a drain's spread_ms comes back within it, not after a second of jitter", () => {
  for (const [random, expected] of [[() => 0, 0], [() => 0.5, 25], [() => 0.999, 49]]) {
    const { client, sockets, states, timers } = setup({ random });
    client.connect();
    sockets[0].open();
    sockets[0].serverClose(4012, "spread_ms=50");
    assert.equal(states.at(-1).state, State.RECONNECTING);
    assert.equal(states.at(-1).delay, expected);
    timers.advance(expected);
    assert.equal(sockets.length, 2, "the next attempt is made at the drawn moment");
  }
});

test("a 4012's hint is capped, and a malformed one leaves the client's own jitter", () => {
  const delay = (reason) => {
    const { client, sockets, states } = setup({ random: () => 0.5 });
    client.connect();
    sockets[0].open();
    sockets[0].serverClose(4012, reason);
    return states.at(-1).delay;
  };
  assert.equal(delay("spread_ms=999999999"), 15000); // half of RestartSpread.MAX_MS (30 s)
  assert.equal(delay("spread_ms=200"), 100);
  for (const reason of ["", "spread_ms=", "spread_ms=-5", "spread_ms=1e3", "spread_ms=50 ", "other=50", "spread_ms=0x10"]) {
    assert.equal(delay(reason), 550, `reason ${JSON.stringify(reason)}: 1000 * (0.1 + 0.9 * 0.5)`);
  }
  assert.equal(restartSpread("spread_ms=0"), 0);
  assert.equal(restartSpread(undefined), null);
});

test("resubscribes with the last applied seq, drops duplicates, orders by seq", () => {
  const { client, sockets, events, timers } = setup();
  client.subscribe("general");
  client.connect();
  sockets[0].open();
  // No snapshot loader and no seq yet: live from the head, which the ack names.
  assert.deepEqual(sockets[0].sent.at(-1), { type: "subscribe", ref: "sub:general", room: "general" });
  sockets[0].receive({ type: "ack", ref: "sub:general", room: "general", seq: 0, replayed: 0 });
  const ev = (seq) => ({ type: "message.new", room: "general", seq, id: seq, author: "a", body: `b${seq}`, client_id: `c${seq}` });
  sockets[0].receive(ev(1));
  sockets[0].receive(ev(1)); // duplicate
  sockets[0].receive(ev(3)); // gap: held, and a replay is asked for
  assert.deepEqual(sockets[0].sent.at(-1), { type: "subscribe", ref: "sub:general", room: "general", since: 1 });
  sockets[0].receive(ev(2));
  assert.deepEqual(events.map((e) => e.seq), [1, 2, 3]);
  sockets[0].serverClose(1006);
  timers.advance(1000);
  sockets[1].open();
  assert.deepEqual(sockets[1].sent.find((f) => f.type === "subscribe"), { type: "subscribe", ref: "sub:general", room: "general", since: 3 });
  sockets[1].receive(ev(3)); // replayed again by a confused server: still once
  assert.deepEqual(events.map((e) => e.seq), [1, 2, 3]);
});

test("a message sent while offline is queued and sent once connected, with the same client_id on every retry", async () => {
  const { client, sockets, timers } = setup();
  client.connect();
  const { clientId, done } = client.send("general", "hello");
  assert.equal(sockets[0].sent.length, 0);
  sockets[0].open();
  const firstTry = sockets[0].sent.find((f) => f.type === "message.send");
  assert.equal(firstTry.client_id, clientId);
  sockets[0].serverClose(1006); // ack lost
  timers.advance(1000);
  sockets[1].open();
  const retry = sockets[1].sent.find((f) => f.type === "message.send");
  assert.equal(retry.client_id, clientId);
  sockets[1].receive({ type: "ack", ref: retry.ref, room: "general", id: 7, seq: 4 });
  assert.deepEqual(await done, { clientId, id: 7, seq: 4, room: "general" });
  assert.equal(client.pendingCount, 0);
});

test("a final error fails the send; recovery_failed reloads the snapshot", async () => {
  let loads = 0;
  const { client, sockets } = setup({ loadSnapshot: async () => ({ seq: 10 + loads++, messages: [] }) });
  client.subscribe("general");
  client.connect();
  sockets[0].open();
  await new Promise((r) => setImmediate(r));
  assert.equal(sockets[0].sent.at(-1).since, 10);
  const { done } = client.send("general", "x");
  const ref = sockets[0].sent.at(-1).ref;
  sockets[0].receive({ type: "error", ref, code: "forbidden", message: "no" });
  await assert.rejects(done, (err) => err.code === "forbidden");
  sockets[0].receive({ type: "error", code: "recovery_failed", message: "too old", room: "general" });
  await new Promise((r) => setImmediate(r));
  assert.equal(loads, 2);
  assert.equal(sockets[0].sent.at(-1).since, 11);
});

test("a silent socket is dropped by the heartbeat and replaced", () => {
  const { client, sockets, timers } = setup({ pingInterval: 1000, pingTimeout: 500 });
  client.connect();
  sockets[0].open();
  timers.advance(1000);
  assert.equal(sockets[0].sent.at(-1).type, "ping");
  timers.advance(600);
  assert.equal(sockets[0].closedWith.code, 4000);
  assert.equal(client.state, State.RECONNECTING);
  timers.advance(1000);
  assert.equal(sockets.length, 2);
});

test("4001 fails every queued send instead of leaving it pending forever", async () => {
  const { client, sockets } = setup();
  client.connect();
  const { done } = client.send("general", "hello");
  sockets[0].serverClose(4001);
  await assert.rejects(done, (err) => err.code === "unauthenticated");
  assert.equal(client.pendingCount, 0);
});

test("a transient error on a resubscribe is retried; the room does not stay stuck", () => {
  const { client, sockets, timers, events } = setup();
  client.subscribe("general");
  client.connect();
  sockets[0].open();
  sockets[0].receive({ type: "ack", ref: "sub:general", room: "general", seq: 0, replayed: 0 });
  const ev = (seq) => ({ type: "message.new", room: "general", seq, id: seq, author: "a", body: "", client_id: `c${seq}` });
  sockets[0].receive(ev(2)); // gap -> resubscribe since 0
  sockets[0].receive({ type: "error", ref: "sub:general", code: "internal", message: "oops" });
  const before = sockets[0].sent.length;
  timers.advance(3000); // within the ping interval: only the retry is sent
  assert.equal(sockets[0].sent.length, before + 1);
  assert.deepEqual(sockets[0].sent.at(-1), { type: "subscribe", ref: "sub:general", room: "general", since: 0 });
  sockets[0].receive(ev(1));
  sockets[0].receive(ev(2));
  assert.deepEqual(events.map((e) => e.seq), [1, 2]);
});

test("unsubscribing while the snapshot loads sends no subscribe", async () => {
  let release;
  const { client, sockets } = setup({ loadSnapshot: () => new Promise((r) => (release = r)) });
  client.subscribe("ops");
  client.connect();
  sockets[0].open();
  client.unsubscribe("ops");
  release({ seq: 7, messages: [] });
  await new Promise((r) => setImmediate(r));
  assert.equal(sockets[0].sent.filter((f) => f.type === "subscribe").length, 0);
});

test("a handshake that never completes is dropped and retried", () => {
  const { client, sockets, timers } = setup({ connectTimeout: 5000 });
  client.connect();
  timers.advance(5000);
  assert.equal(sockets[0].closedWith.code, 4000);
  assert.equal(client.state, State.RECONNECTING);
  timers.advance(2000);
  assert.equal(sockets.length, 2);
});

test("a room whose access is revoked is no longer followed or resubscribed", () => {
  const { client, sockets, timers } = setup();
  const errors = [];
  client.on("error", (e) => errors.push(e));
  client.subscribe("ops");
  client.connect();
  sockets[0].open();
  sockets[0].receive({ type: "ack", ref: "sub:ops", room: "ops", seq: 3, replayed: 0 });
  sockets[0].receive({ type: "error", code: "forbidden", message: "gone", room: "ops" });
  assert.deepEqual(errors, [{ room: "ops", code: "forbidden", message: "gone" }]);
  sockets[0].serverClose(1006);
  timers.advance(1000);
  sockets[1].open();
  assert.equal(sockets[1].sent.filter((f) => f.type === "subscribe").length, 0);
});

test("a body over the limit is refused at once and never queued", async () => {
  const { client } = setup({ maxBodyLength: 10 });
  const { done } = client.send("general", "x".repeat(11));
  await assert.rejects(done, (err) => err.code === "too_large");
  assert.equal(client.pendingCount, 0);
});

// -- the long-polling fallback ------------------------------------------------
function fakeRest() {
  const polls = [];
  const posts = [];
  const checks = [];
  const poll = (room, since, wait, signal, limit, epoch, extra) =>
    wait === 0 ? (checks.push(room), rest.hangCheck ? new Promise((resolve, reject) => signal.addEventListener("abort", () => reject(new Error("aborted")))) :
      rest.reachable ? Promise.resolve({ events: [], seq: 5, has_more: true }) : Promise.reject(new TypeError("fetch failed"))) :
    new Promise((resolve, reject) => {
      const call = { room, since, wait, limit, epoch, extra, signal, resolve, reject };
      polls.push(call);
      signal.addEventListener("abort", () => reject(Object.assign(new Error("aborted"), { aborted: true })));
    });
  const post = (room, body, clientId) => new Promise((resolve, reject) => posts.push({ room, body, clientId, resolve, reject }));
  const rest = { polls, posts, poll, post, checks, reachable: true };
  return rest;
}

/** The first `n` WebSocket attempts close without opening (blocked, or the server down). */
function failOpens(ctx, n = 3) {
  for (let i = 0; i < n; i++) {
    ctx.sockets[i].serverClose(1006);
    ctx.timers.advance(i < n - 1 ? 5000 : 0);
  }
}

async function inFallback(reachable = true, hangCheck = false, options = {}) {
  const rest = fakeRest();
  rest.reachable = reachable;
  rest.hangCheck = hangCheck;
  const ctx = setup({ poll: rest.poll, post: rest.post, loadSnapshot: async () => ({ seq: 5, epoch: "e5", messages: [] }), ...options });
  ctx.client.subscribe("general");
  ctx.client.connect();
  failOpens(ctx); // never opened: blocked
  await flush();
  if (reachable && !hangCheck) {
    // HTTP answered: one last WebSocket attempt, which fails too.
    assert.equal(ctx.sockets.length, 4);
    ctx.sockets[3].serverClose(1006);
    await flush();
  }
  return { ...ctx, ...rest, rest };
}

test("after three attempts that never open it falls back to long polling, each seq once and in order", async () => {
  const { client, polls, states, events } = await inFallback();
  assert.equal(client.state, State.FALLBACK);
  assert.ok(states.some((s) => s.state === State.FALLBACK));
  assert.equal(polls.length, 1);
  assert.deepEqual([polls[0].room, polls[0].since, polls[0].wait, polls[0].epoch], ["general", 5, 25, "e5"]);
  polls[0].resolve({ events: [{ type: "message.new", room: "general", seq: 6 }, { type: "message.new", room: "general", seq: 7 }], seq: 7 });
  await flush();
  assert.equal(polls[1].since, 7);
  polls[1].resolve({ events: [{ type: "message.new", room: "general", seq: 7 }, { type: "message.new", room: "general", seq: 8 }], seq: 8 });
  await flush();
  assert.deepEqual(events.map((e) => e.seq), [6, 7, 8]);
  assert.equal(polls[2].since, 8);
});

test("while polling, each poll names the page and the presence it has; the answer's pushes come before its events", async () => {
  const { client, polls } = await inFallback();
  const heard = [];
  client.on("ephemeral", (f) => heard.push(["ephemeral", f.type, f.user || f.users]));
  client.on("event", (e) => heard.push(["event", e.type, e.seq]));
  const page = client.poll.clientId;
  assert.match(page, /^[A-Za-z0-9_-]{8,64}$/);
  assert.deepEqual(polls[0].extra, { client: page, presenceTag: null }, "the first poll asks for the room's presence");
  polls[0].resolve({
    events: [{ type: "message.new", room: "general", seq: 6, author: "bob" }], seq: 6, presence_tag: "a1b2",
    ephemeral: [
      { type: "presence.state", room: "general", users: ["alice", "bob"] },
      { type: "typing", room: "general", user: "bob" },
      { type: "typing", room: "ops", user: "eve" }, // not this room's: dropped
    ],
  });
  await flush();
  assert.deepEqual(heard, [
    ["ephemeral", "presence.state", ["alice", "bob"]], ["ephemeral", "typing", "bob"], ["event", "message.new", 6]]);
  assert.deepEqual(polls[1].extra, { client: page, presenceTag: "a1b2" }, "then it says which presence it has");
  polls[1].resolve({ events: [], seq: 6, presence_tag: "a1b2", ephemeral: [{ type: "read.marker", room: "general", user: "bob", seq: 6 }] });
  await flush();
  assert.deepEqual(heard.at(-1), ["ephemeral", "read.marker", "bob"]);
  assert.deepEqual(polls[2].extra, { client: page, presenceTag: "a1b2" });
});

test("typing goes over REST while polling (best effort), over the socket otherwise", async () => {
  const typed = [];
  const typing = (room) => (typed.push(room), Promise.reject(new Error("a network error is no error here")));
  const live = setup({ typing });
  live.client.connect();
  live.sockets[0].open();
  live.client.typing("general");
  assert.deepEqual(live.sockets[0].sent.filter((f) => f.type !== "ping"), [{ type: "typing", room: "general" }]);
  assert.deepEqual(typed, []);
  const { client, sockets } = await inFallback(true, false, { typing });
  assert.equal(client.transport, "poll");
  client.typing("general");
  await flush();
  assert.deepEqual(typed, ["general"]);
  assert.ok(sockets.every((ws) => !ws.sent.some((f) => f.type === "typing")), "nothing written to a socket");
});

test("while polling, sends go over REST with one client_id, retried after a rate limit", async () => {
  const { client, posts, timers } = await inFallback();
  const { clientId, done } = client.send("general", "hello");
  await flush();
  assert.equal(posts.length, 1);
  assert.deepEqual([posts[0].room, posts[0].body, posts[0].clientId], ["general", "hello", clientId]);
  posts[0].reject({ status: 429, code: "rate_limited", retryAfter: 2 });
  await flush();
  timers.advance(1999);
  await flush();
  assert.equal(posts.length, 1, "not before retry_after");
  timers.advance(1);
  await flush();
  assert.equal(posts.length, 2);
  assert.equal(posts[1].clientId, clientId);
  posts[1].resolve({ room: "general", id: 3, seq: 9 });
  assert.deepEqual(await done, { clientId, id: 3, seq: 9, room: "general" });
  assert.equal(client.pendingCount, 0);
});

test("it keeps probing for a WebSocket and switches back without losing or repeating anything", async () => {
  const { client, polls, posts, sockets, timers, events } = await inFallback();
  polls[0].resolve({ events: [{ type: "message.new", room: "general", seq: 6 }], seq: 6 });
  await flush();
  const sent = [];
  client.on("sent", (e) => sent.push(e.clientId));
  const { clientId } = client.send("general", "in flight");
  await flush();
  assert.equal(posts.length, 1);

  // A probe that fails leaves the client polling.
  timers.advance(2000);
  assert.equal(sockets.length, 5);
  sockets[4].serverClose(1006);
  assert.equal(client.state, State.FALLBACK);
  // The next one opens: polling stops, the room resumes from its seq over the socket,
  // and the unacknowledged message goes again with the same client_id.
  timers.advance(2000);
  assert.equal(sockets.length, 6);
  sockets[5].open();
  await flush();
  assert.equal(client.state, State.OPEN);
  assert.ok(polls[1].signal.aborted, "the running poll was cancelled");
  const frames = sockets[5].sent;
  assert.deepEqual(frames.find((f) => f.type === "subscribe"), { type: "subscribe", ref: "sub:general", room: "general", since: 6, epoch: "e5" });
  assert.equal(frames.find((f) => f.type === "message.send").client_id, clientId);
  // The REST answer and the socket's ack both arrive: the message is sent once.
  posts[0].resolve({ room: "general", id: 4, seq: 7 });
  await flush();
  sockets[5].receive({ type: "ack", ref: `m:${clientId}`, room: "general", id: 4, seq: 7 });
  sockets[5].receive({ type: "message.new", room: "general", seq: 6 });
  sockets[5].receive({ type: "message.new", room: "general", seq: 7, client_id: clientId });
  assert.deepEqual(sent, [clientId]);
  assert.deepEqual(events.map((e) => e.seq), [6, 7]);
  assert.equal(polls.length, 2, "no polling after the switch");
});

test("a 401 while polling stops the client and fails what is queued", async () => {
  const { client, polls } = await inFallback();
  const { done } = client.send("general", "lost session");
  const failed = assert.rejects(done, (err) => err.code === "unauthenticated");
  polls[0].reject({ status: 401, code: "forbidden" });
  await flush();
  assert.equal(client.state, State.CLOSED);
  await failed;
});

test("when HTTP fails too (the server is down) it keeps backing off instead of falling back", async () => {
  const { client, checks, polls, sockets, timers, states } = await inFallback(false);
  assert.deepEqual(checks, ["general"], "HTTP was tried once");
  assert.equal(polls.length, 0);
  assert.equal(client.state, State.RECONNECTING);
  assert.ok(!states.some((s) => s.state === State.FALLBACK), "never claims a connection it does not have");
  timers.advance(30000);
  assert.equal(sockets.length, 4, "the next WebSocket attempt came after a backoff");
});

test("while polling, edits and deletes go over REST; over the socket otherwise", async () => {
  const calls = [];
  const { client, sockets, timers } = await (async () => {
    const rest = fakeRest();
    const ctx = setup({
      poll: rest.poll, post: rest.post, loadSnapshot: async () => ({ seq: 5, messages: [] }),
      edit: async (room, id, body) => (calls.push(["edit", room, id, body]), { room, id, seq: 9 }),
      remove: async (room, id) => (calls.push(["remove", room, id]), { room, id, seq: 10 }),
    });
    ctx.client.subscribe("general");
    ctx.client.connect();
    failOpens(ctx);
    await flush();
    ctx.sockets[3].serverClose(1006); // the last attempt before falling back
    await flush();
    return ctx;
  })();
  assert.equal(client.state, State.FALLBACK);
  assert.deepEqual(await client.edit("general", 4, "new"), { room: "general", id: 4, seq: 9 });
  assert.deepEqual(await client.remove("general", 4), { room: "general", id: 4, seq: 10 });
  assert.deepEqual(calls, [["edit", "general", 4, "new"], ["remove", "general", 4]]);
  timers.advance(2000);
  sockets.at(-1).open();
  const pending = client.edit("general", 4, "again");
  assert.equal(sockets.at(-1).sent.at(-1).type, "message.edit");
  assert.equal(calls.length, 2);
  sockets.at(-1).receive({ type: "ack", ref: sockets.at(-1).sent.at(-1).ref, room: "general", id: 4, seq: 11 });
  assert.equal((await pending).seq, 11);
});

test("4013 backs off; 4029 waits at least retry_after", () => {
  const { client, sockets, timers, states } = setup({ random: () => 0 });
  client.connect();
  sockets[0].open();
  sockets[0].serverClose(4013);
  assert.equal(client.state, State.RECONNECTING);
  // equal jitter with random()=0 waits half the first ceiling (250 ms), never 0
  const backoff = states.at(-1).delay;
  assert.equal(backoff, 250);
  timers.advance(249);
  assert.equal(sockets.length, 1);
  timers.advance(1);
  assert.equal(sockets.length, 2);
  sockets[1].open();
  sockets[1].receive({ type: "error", code: "rate_limited", retry_after: 7 });
  sockets[1].serverClose(4029);
  const waiting = states.at(-1);
  assert.equal(waiting.state, State.RECONNECTING);
  assert.ok(waiting.delay >= 7000, `waited ${waiting.delay} ms`);
  timers.advance(6999);
  assert.equal(sockets.length, 2);
  timers.advance(1);
  assert.equal(sockets.length, 3);
});

test("the network or the tab coming back reconnects at once", () => {
  const listeners = {};
  const docListeners = {};
  const env = {
    addEventListener: (name, fn) => (listeners[name] = fn),
    document: { visibilityState: "hidden", addEventListener: (name, fn) => (docListeners[name] = fn) },
  };
  const { client, sockets, timers } = setup({ env });
  client.connect();
  sockets[0].open();
  listeners.offline();
  assert.equal(client.state, State.OFFLINE);
  assert.ok(sockets[0].closedWith, "the socket is dropped");
  timers.advance(60000);
  assert.equal(sockets.length, 1, "no attempts while offline");
  listeners.online();
  assert.equal(sockets.length, 2, "back online: at once");
  sockets[1].serverClose(1006);
  assert.equal(client.state, State.RECONNECTING);
  env.document.visibilityState = "visible";
  docListeners.visibilitychange();
  assert.equal(sockets.length, 3, "the tab came back: at once, not after the backoff");
});

// -- regressions found in review ------------------------------------------------
test("after a failed poll the badge says connected again only once a poll has answered", async () => {
  const { client, polls, timers } = await inFallback();
  polls[0].reject(new TypeError("fetch failed")); // the server went away
  await flush();
  assert.equal(client.state, State.RECONNECTING);
  timers.advance(30000); // the retry is in flight, nothing has answered
  await flush();
  assert.equal(polls.length, 2);
  assert.equal(client.state, State.RECONNECTING);
  polls[1].resolve({ events: [], seq: 5 });
  await flush();
  assert.equal(client.state, State.FALLBACK);
});

test("an HTTP check that hangs times out and the client backs off and retries", async () => {
  const { client, checks, sockets, timers } = await inFallback(true, true);
  assert.equal(checks.length, 1);
  timers.advance(10000); // the check's deadline
  await flush();
  assert.equal(client.state, State.RECONNECTING);
  timers.advance(60000);
  assert.ok(sockets.length > 3, "it tried the WebSocket again");
});

test("a long poll that hangs past its wait is abandoned and retried", async () => {
  const { polls, timers } = await inFallback();
  assert.equal(polls.length, 1);
  timers.advance(35000); // wait (25 s) + 10 s
  await flush();
  assert.ok(polls[0].signal.aborted, "the hung request was aborted");
  timers.advance(60000);
  await flush();
  assert.ok(polls.length >= 2, "and polled again");
});

test("a 401 while polling also drops the probe: a signed-out client never shows connected", async () => {
  const { client, polls, timers, sockets } = await inFallback();
  timers.advance(2000); // a probe socket is connecting
  assert.equal(sockets.length, 5);
  polls[0].reject({ status: 401, code: "forbidden" });
  await flush();
  assert.equal(client.state, State.CLOSED);
  assert.ok(sockets[4].closedWith, "the probe was dropped");
  sockets[4].open();
  assert.equal(client.state, State.CLOSED);
});

test("a socket that opens but carries nothing is not connected, and leads to the fallback", async () => {
  const rest = fakeRest();
  const { client, timers, sockets, states } = setup({ poll: rest.poll, post: rest.post, loadSnapshot: async () => ({ seq: 5, messages: [] }) });
  client.subscribe("general");
  client.connect();
  for (let i = 0; i < 3; i++) {
    sockets.at(-1).openSilently(); // the proxy passes the upgrade, then nothing
    const n = sockets.length;
    while (sockets.length === n && rest.checks.length === 0) timers.advance(1000);
  }
  await flush();
  sockets.at(-1).openSilently(); // the last attempt before falling back: silent too
  timers.advance(10000);
  await flush();
  assert.ok(!states.some((s) => s.state === State.OPEN), "never claimed to be connected");
  assert.equal(rest.checks.length, 1, "tried HTTP after three dead sockets");
  assert.equal(client.state, State.FALLBACK);
});

test("close() stops every retry timer", async () => {
  let loads = 0;
  const { client, timers, sockets } = setup({ loadSnapshot: async () => { loads++; throw new Error("500"); } });
  client.subscribe("general");
  client.connect();
  sockets[0].open();
  await flush();
  client.close();
  const before = loads;
  for (let i = 0; i < 5; i++) {
    timers.advance(60000);
    await flush();
  }
  assert.equal(loads, before);
  assert.equal(timers.queue.length, 0, "no timer left behind");
});

test("a REST refusal without an error code (a CSRF failure) fails the send instead of retrying for ever", async () => {
  const { client, posts } = await inFallback();
  const { done } = client.send("general", "csrf");
  const failed = assert.rejects(done, (err) => err.code === "http_403");
  await flush();
  posts[0].reject({ status: 403, message: "CSRF Failed" });
  await failed;
  assert.equal(client.pendingCount, 0);
});

test("while polling, queued messages are posted one at a time, in the order written", async () => {
  const { client, posts } = await inFallback();
  const first = client.send("general", "one");
  const second = client.send("general", "two");
  await flush();
  assert.deepEqual(posts.map((p) => p.body), ["one"], "the second waits for the first");
  posts[0].resolve({ room: "general", id: 1, seq: 6 });
  await flush();
  assert.deepEqual(posts.map((p) => p.body), ["one", "two"]);
  assert.equal(posts[1].clientId, second.clientId);
  posts[1].resolve({ room: "general", id: 2, seq: 7 });
  assert.equal((await first.done).seq, 6);
  assert.equal((await second.done).seq, 7);
});

test("a server coming back after a restart is not mistaken for blocked WebSockets", async () => {
  const rest = fakeRest();
  const { client, sockets, timers, states } = setup({ poll: rest.poll, post: rest.post, loadSnapshot: async () => ({ seq: 5, messages: [] }) });
  client.subscribe("general");
  client.connect();
  failOpens({ sockets, timers }); // the server is down
  await flush(); // ...and back: HTTP answers, so the client tries the socket once more
  assert.equal(sockets.length, 4);
  sockets[3].open();
  await flush();
  assert.equal(client.state, State.OPEN);
  assert.ok(!states.some((s) => s.state === State.FALLBACK));
  assert.equal(rest.polls.length, 0, "no long poll was started");
});

// -- issue 17: the page's defects, at the client's level ------------------------------
test("4001 means signed out, 4003 an operator's disconnect: told apart, queued sends fail with the reason", async () => {
  for (const [code, reason] of [[4001, "unauthenticated"], [4003, "operator"]]) {
    const { client, sockets, states } = setup();
    client.connect();
    sockets[0].open();
    const { done } = client.send("general", "hello");
    sockets[0].serverClose(code);
    assert.equal(states.at(-1).state, State.CLOSED);
    assert.equal(states.at(-1).reason, reason);
    await assert.rejects(done, (err) => err.code === reason);
  }
});

test("after an operator's disconnect, retryNow connects again and resubscribes from where it was", () => {
  const { client, sockets } = setup();
  client.subscribe("general", { since: 5, epoch: "e1" });
  client.connect();
  sockets[0].open();
  sockets[0].serverClose(4003);
  client.retryNow();
  assert.equal(sockets.length, 2);
  sockets[1].open();
  assert.equal(client.state, State.OPEN);
  assert.deepEqual(sockets[1].sent.find((f) => f.type === "subscribe"), { type: "subscribe", ref: "sub:general", room: "general", since: 5, epoch: "e1" });
});

test("retryNow tries at once instead of waiting for the backoff; the wait is capped at 10 s", () => {
  const { client, sockets, timers, states } = setup({ random: () => 0.999 });
  client.connect();
  for (let i = 0; i < 8; i++) {
    sockets.at(-1).serverClose(1006);
    assert.ok(states.at(-1).delay <= 10000, `attempt ${i}: ${states.at(-1).delay}`);
    assert.equal(states.at(-1).attempts, i + 1, "the page counts failed attempts");
    timers.advance(states.at(-1).delay);
  }
  sockets.at(-1).serverClose(1006);
  const before = sockets.length;
  client.retryNow();
  assert.equal(sockets.length, before + 1, "at once");
  sockets.at(-1).open();
  timers.advance(20000);
  assert.equal(sockets.length, before + 1, "the scheduled attempt was cancelled");
});

test("a room followed in the background subscribes without presence", () => {
  const { client, sockets } = setup();
  client.subscribe("general", { since: 1 });
  client.subscribe("ops", { background: true });
  client.connect();
  sockets[0].open();
  const subs = sockets[0].sent.filter((f) => f.type === "subscribe");
  assert.deepEqual(subs, [
    { type: "subscribe", ref: "sub:general", room: "general", since: 1 },
    { type: "subscribe", ref: "sub:ops", room: "ops", presence: false },
  ]);
});
