"""What the other cluster tests leave out: a writer killed between commit and
publish, long polls through the balancers and on a draining worker, and one
user's rate limit shared by two workers. Real processes throughout: PostgreSQL,
Redis, daphne workers, nginx and HAProxy."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
import time
import uuid

import pytest
import websockets

from tests.cluster.conftest import (
    ONCE,
    create_rooms,
    fan_subscribers,
    held_polls,
    login,
    long_poll,
    open_socket,
    post_message,
    room_epoch,
    room_events,
    room_head,
    wait_until,
)
from tests.services import ROOT, RedisServer, Worker, free_port

pytestmark = [pytest.mark.cluster, pytest.mark.asyncio]

# The fault point (project/settings.py: tests only).
CRASH_AFTER_COMMIT = "REALTIME_TEST_CRASH_AFTER_COMMIT"


@pytest.fixture(scope="module")
def rooms(cluster):
    """Rooms of this module's own, one per use: quiet (nothing else writes to them)
    and followed by nobody else, so a poll held on a worker is that worker's only
    subscription to the room's channel."""
    tag = uuid.uuid4().hex[:8]
    names = ["crash", "crash-other", "wake", "quiet", "drain-signal", "drain-request", "rate", "rate-burst"]
    slugs = {name: f"gaps-{tag}-{name}" for name in names}
    create_rooms(cluster.env(), *slugs.values())
    return slugs


async def frames_until(ws, ref: str | None = None, timeout: float = 10, event: tuple[str, int] | None = None) -> list[dict]:
    """Every frame the socket receives up to and including the reply to `ref`, or
    with `event` (room, seq) that room event."""
    frames = []
    while True:
        frame = json.loads(await asyncio.wait_for(ws.recv(), timeout))
        frames.append(frame)
        if event is None and frame.get("ref") == ref:  # (room events carry no ref)
            return frames
        if event is not None and frame["type"].startswith("message.") and (frame.get("room"), frame.get("seq")) == event:
            return frames


def seqs(frames: list[dict], room: str) -> list[int]:
    """The room events among the frames, by seq, in the order they came."""
    return [f["seq"] for f in frames if f["type"].startswith("message.") and f.get("room") == room and "seq" in f]


async def barrier(ws, other_room: str, ref: str) -> list[dict]:
    """Frames up to the answer to a frame that changes nothing and repairs nothing
    (leaving a room the socket never followed): whatever the socket had been
    handed before it is among them."""
    await ws.send(json.dumps({"type": "unsubscribe", "room": other_room, "ref": ref}))
    return await frames_until(ws, ref)


def send_frame(room: str, body: str, client_id: str, ref: str) -> str:
    return json.dumps({"type": "message.send", "room": room, "body": body, "client_id": client_id, "ref": ref})


# ---------------------------------------------------------------------------
# A writer killed between commit and publish
# ---------------------------------------------------------------------------
@ONCE
async def test_a_writer_killed_between_commit_and_publish_loses_and_doubles_nothing(cluster, rooms):
    """The writer's worker commits a message and dies by SIGKILL before publishing
    it (the fault point). Subscribers on the other worker get it exactly once, by
    each repair path: a ping, the next event's gap, a resubscribe with since; the
    writer's retry (same client_id) gets the original's ack and writes nothing."""
    victim, survivor = cluster.workers
    room, other = rooms["crash"], rooms["crash-other"]
    marker = f"die-after-commit-{uuid.uuid4().hex}"
    env = victim.env
    # Armed on the victim alone (a restart; the drain has nothing to close).
    victim.terminate()
    assert await asyncio.to_thread(victim.proc.wait, 15) == 0
    victim.env = {**env, CRASH_AFTER_COMMIT: marker}
    victim.start()
    sockets = []
    try:
        alice = login(victim.url, "alice")  # one session, valid on every worker
        bob = await open_socket(survivor.url, login(survivor.url, "bob"))
        carol = await open_socket(survivor.url, login(survivor.url, "carol"))
        writer = await open_socket(victim.url, alice)
        sockets += [bob, carol, writer]
        for ws in sockets:
            await ws.send(json.dumps({"type": "subscribe", "room": room, "ref": "sub"}))
        heads = {(await frames_until(ws, "sub"))[-1]["seq"] for ws in sockets}
        assert len(heads) == 1
        head = heads.pop()

        # A message published as usual: everyone has head + 1.
        await writer.send(send_frame(room, "before", "crash-0", "s0"))
        ack = (await frames_until(writer, "s0"))[-1]
        assert (ack["type"], ack["seq"]) == ("ack", head + 1)
        # The marked one: committed, then the worker dies before it publishes.
        await writer.send(send_frame(room, marker, "crash-1", "s1"))
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await frames_until(writer, "s1")
        assert closed.value.rcvd is None, "no close frame: the process died"
        assert await asyncio.to_thread(victim.proc.wait, 10) == -signal.SIGKILL
        committed = room_events(survivor.url, alice, room, head + 1)
        assert [(e["type"], e["seq"], e["body"], e["client_id"]) for e in committed] == [
            ("message.new", head + 2, marker, "crash-1")]

        # Never published: bob and carol were handed head + 1 and nothing after it.
        for ws in (bob, carol):
            assert seqs(await barrier(ws, other, "b1"), room) == [head + 1]

        # Repair by ping (a quiet room): head + 2 comes before the pong, once.
        await bob.send(json.dumps({"type": "ping", "ref": "p1"}))
        got = await frames_until(bob, "p1")
        assert seqs(got, room) == [head + 2] and got[-1] == {"type": "pong", "ref": "p1"}

        # Repair by the next event's gap: bob writes head + 3; carol gets head + 2 first.
        await bob.send(send_frame(room, "after", "crash-2", "s2"))
        bob_frames = await frames_until(bob, "s2")
        assert bob_frames[-1]["seq"] == head + 3
        # (carol's copy follows a gap, so it waits for the transport's round trip,
        # which bob's ack may overtake: waited for, then a barrier for any double)
        got = await frames_until(carol, event=(room, head + 3))
        assert seqs(got + await barrier(carol, other, "b2"), room) == [head + 2, head + 3]

        # Repair by resubscribing with since: the writer's client, back on the survivor.
        writer = await open_socket(survivor.url, alice)
        sockets.append(writer)
        await writer.send(json.dumps({"type": "subscribe", "room": room, "since": head + 1, "ref": "sub"}))
        got = await frames_until(writer, "sub")
        assert seqs(got, room) == [head + 2, head + 3]
        assert (got[-1]["seq"], got[-1]["replayed"]) == (head + 3, 2)
        # It never saw the ack, so it sends again with the same client_id: the
        # original's ack, nothing written, and the event published again is
        # dropped by seq everywhere.
        await writer.send(send_frame(room, marker, "crash-1", "s1"))
        ack = (await frames_until(writer, "s1"))[-1]
        assert (ack["type"], ack["id"], ack["seq"]) == ("ack", committed[0]["id"], head + 2)
        assert seqs(await barrier(writer, other, "b3"), room) == []
        assert seqs(bob_frames + await barrier(bob, other, "b3"), room) == [head + 3]
        assert seqs(await barrier(carol, other, "b3"), room) == []
        assert [(e["seq"], e["body"]) for e in room_events(survivor.url, alice, room, head)] == [
            (head + 1, "before"), (head + 2, marker), (head + 3, "after")]
    finally:
        for ws in sockets:
            await ws.close()
        victim.env = env
        if victim.proc.poll() is None:
            victim.terminate()
            await asyncio.to_thread(victim.proc.wait, 15)
        victim.start()


# ---------------------------------------------------------------------------
# Long polls through the balancer
# ---------------------------------------------------------------------------
async def test_a_long_poll_through_the_balancer_wakes_for_an_event_posted_on_the_other_worker(cluster, rooms):
    base = cluster.balancer.url
    room = rooms["wake"]
    cookie = login(base, "bob")
    head = room_head(base, cookie, room)
    assert fan_subscribers(cluster.redis.url, room) == 0
    poll = asyncio.ensure_future(asyncio.to_thread(long_poll, base, cookie, room, head, 20))
    # Held: its worker has joined the room's channel (and nothing else follows it).
    await wait_until(lambda: fan_subscribers(cluster.redis.url, room) == 1, 10, "the poll to be held")
    # Whichever worker the balancer chose (a health check missed under load moves
    # a client address for a second), the message is posted on the other one.
    holding = [w for w in cluster.workers if held_polls(w) == 1]
    assert len(holding) == 1 and sum(held_polls(w) for w in cluster.workers) == 1
    poller = holding[0]
    writer = next(w for w in cluster.workers if w is not poller)
    alice = login(writer.url, "alice")
    posted = time.monotonic()
    status, ack = await asyncio.to_thread(post_message, writer.url, alice, room, "wake up", "wake-1")
    assert (status, ack["seq"]) == (200, head + 1)
    answer = await asyncio.wait_for(poll, 25)
    assert (answer.status, answer.worker) == (200, poller.name)
    assert [(e["type"], e["seq"], e["author"], e["body"], e["client_id"]) for e in answer.body["events"]] == [
        ("message.new", head + 1, "alice", "wake up", "wake-1")]
    assert (answer.body["seq"], answer.body["has_more"]) == (head + 1, False)
    # Woken by the other worker's publication: the poll re-reads the log on its
    # own only every RECHECK (5) s.
    assert answer.ended - posted < 2.0, answer.ended - posted
    await wait_until(lambda: fan_subscribers(cluster.redis.url, room) == 0, 5, "the answered poll to leave")


async def test_a_long_poll_is_held_its_whole_wait_through_the_balancer(cluster, rooms):
    """Neither balancer cuts a poll short: held through nginx or HAProxy for the
    wait it asked, then answered 200 with an empty page; and the timeouts that
    apply to /api/ in deploy/ exceed the longest wait the worker grants."""
    from realtime.web.longpoll import MAX_WAIT

    base = cluster.balancer.url
    room = rooms["quiet"]
    cookie = login(base, "carol")
    head = room_head(base, cookie, room)
    wait = 4
    answer = await asyncio.to_thread(long_poll, base, cookie, room, head, wait)
    assert (answer.status, answer.body) == (200, {"events": [], "seq": head, "epoch": room_epoch(base, cookie, room),
                                                  "has_more": False})
    assert wait <= answer.ended - answer.started < wait + 1.5, answer.ended - answer.started
    # The browser client asks for 25 s, the worker grants up to MAX_WAIT: every
    # timeout on the way must be longer (a cut poll is a 504 and a retry).
    if cluster.balancer_kind == "nginx":
        conf = (cluster.balancer.dir / "nginx.conf").read_text()
        api = conf.split("location / {", 1)[1].split("}", 1)[0]  # where /api/ goes
        timeouts = dict(re.findall(r"(proxy_read_timeout|proxy_send_timeout)\s+(\d+)s;", api))
        expected = {"proxy_read_timeout"}  # proxy_send_timeout: nginx's default, 60 s
    else:
        conf = (cluster.balancer.dir / "haproxy.cfg").read_text()
        timeouts = dict(re.findall(r"timeout (server|client)\s+(\d+)s", conf))
        expected = {"server", "client"}
    assert set(timeouts) == expected and all(int(t) > MAX_WAIT for t in timeouts.values()), timeouts


# ---------------------------------------------------------------------------
# One user's message.send budget across two workers
# ---------------------------------------------------------------------------
BUDGET = 7  # REALTIME_RATE_MESSAGE_SEND=0.001/7: a burst of 7, the next token in 1000 s


@pytest.fixture(scope="module")
def budget_workers(cluster):
    """Two workers on the cluster's PostgreSQL and a Redis of their own (fresh
    buckets), with message.send at 0.001/7."""
    workdir = cluster.workdir / "budget"
    workdir.mkdir(exist_ok=True)
    redis = RedisServer(workdir).start()
    ports = [(free_port(), free_port()) for _ in range(2)]
    origins = [f"{scheme}://{host}:{port}" for host in ("127.0.0.1", "localhost") for plain, tls in ports
               for scheme, port in (("http", plain), ("https", tls))]
    env = {**cluster.env(), "REDIS_URL": redis.url, "DJANGO_ALLOWED_ORIGINS": ",".join(origins),
           "REALTIME_RATE_MESSAGE_SEND": f"0.001/{BUDGET}"}
    workers = []
    try:
        workers = [Worker(f"budget{i}", env, workdir, port=port, tls_port=tls).start()
                   for i, (port, tls) in enumerate(ports)]
        yield workers
    finally:
        for worker in workers:
            worker.stop()
        redis.stop()


def outcome(frame: dict) -> tuple:
    return (frame["type"], frame.get("code"))


@ONCE
async def test_one_users_sends_on_both_workers_share_one_budget(cluster, rooms, budget_workers):
    """Buckets live in Redis: alice's sockets on two workers (and her REST posts)
    draw on one budget of 7. In turn: 4 on one worker, 4 on the other (the 8th is
    refused), then neither gets another."""
    one, two = budget_workers
    room = rooms["rate"]
    cookie = login(one.url, "alice")
    head = room_head(one.url, cookie, room)
    ws1, ws2 = await open_socket(one.url, cookie), await open_socket(two.url, cookie)
    try:
        async def send(ws, i: int) -> dict:
            await ws.send(send_frame(room, f"budget {i}", f"budget-{i}", f"r{i}"))
            return (await frames_until(ws, f"r{i}"))[-1]

        first = [await send(ws1, i) for i in range(4)]
        second = [await send(ws2, i) for i in range(4, 8)]
        third = [await send(ws1, 8), await send(ws2, 9)]
        rest = await asyncio.to_thread(post_message, two.url, cookie, room, "over rest", "budget-rest")
    finally:
        await ws1.close()
        await ws2.close()
    assert [outcome(f) for f in first] == [("ack", None)] * 4
    assert [outcome(f) for f in second] == [("ack", None)] * 3 + [("error", "rate_limited")]
    assert [outcome(f) for f in third] == [("error", "rate_limited")] * 2
    assert [f["seq"] for f in first + second[:3]] == list(range(head + 1, head + BUDGET + 1))
    for refused in second[3:] + third:
        # The next token is 1/0.001 s away, less what has dripped in since.
        assert 990 < refused["retry_after"] <= 1000, refused
    status, body = rest
    assert (status, body["code"]) == (429, "rate_limited")
    assert [e["body"] for e in room_events(one.url, cookie, room, head)] == [f"budget {i}" for i in range(BUDGET)]


@ONCE
async def test_concurrent_bursts_on_two_workers_take_exactly_the_budget(cluster, rooms, budget_workers):
    """Six sends from bob on each worker in one TCP write each, at once: the
    shared bucket grants exactly 7 of the 12, whichever worker asks first; on each
    socket the granted come first, the refused after, each rate_limited."""
    from tests.cluster.test_scale_out import burst_in_one_write

    one, two = budget_workers
    room = rooms["rate-burst"]
    cookie = login(one.url, "bob")
    head = room_head(one.url, cookie, room)

    def burst(worker, tag: str) -> list[dict]:
        frames = [{"type": "message.send", "room": room, "body": f"{tag} {i}", "client_id": f"{tag}-{i}", "ref": f"{tag}{i}"}
                  for i in range(6)]
        return burst_in_one_write(worker.port, cookie, worker.url, frames)

    replies = await asyncio.gather(asyncio.to_thread(burst, one, "x"), asyncio.to_thread(burst, two, "y"))
    granted = []
    for tag, got in zip("xy", replies):
        assert [r["ref"] for r in got] == [f"{tag}{i}" for i in range(6)]
        kinds = [outcome(r) for r in got]
        n = kinds.count(("ack", None))
        assert kinds == [("ack", None)] * n + [("error", "rate_limited")] * (6 - n), kinds
        granted += [r["seq"] for r in got[:n]]
    assert sorted(granted) == list(range(head + 1, head + BUDGET + 1))
    assert len(room_events(one.url, cookie, room, head)) == BUDGET


# ---------------------------------------------------------------------------
# A long poll on a draining worker (last: the balancer may mark the drained
#    worker down for a while)
# ---------------------------------------------------------------------------
@ONCE
async def test_a_long_poll_on_a_worker_asked_to_drain_is_answered_at_once(cluster, rooms):
    """`manage.py drain`: the held poll is answered 200 with an empty page within
    a second or two, not after its 25 s wait; the next poll, on the other worker,
    gets everything after its since, once."""
    victim, survivor = cluster.workers
    room = rooms["drain-request"]
    cookie = login(victim.url, "bob")
    alice = login(survivor.url, "alice")
    head = room_head(victim.url, cookie, room)
    poll = asyncio.ensure_future(asyncio.to_thread(long_poll, victim.url, cookie, room, head, 25))
    try:
        await wait_until(lambda: fan_subscribers(cluster.redis.url, room) == 1, 10, "the poll to be held")
        await asyncio.to_thread(subprocess.run, [sys.executable, "manage.py", "drain", "--worker", victim.name],
                                cwd=ROOT, env=cluster.env(), check=True, stdout=subprocess.DEVNULL)
        requested = time.monotonic()
        answer = await asyncio.wait_for(poll, 30)
        assert (answer.status, answer.body, answer.worker) == (
            200, {"events": [], "seq": head, "epoch": room_epoch(survivor.url, alice, room), "has_more": False},
            victim.name)
        assert answer.ended - requested < 2.0, answer.ended - requested
        assert victim.proc.poll() is None, "a drain request leaves the process to its manager"
        posted = [await asyncio.to_thread(post_message, survivor.url, alice, room, f"drained {i}", f"dr-{i}")
                  for i in range(3)]
        assert [(status, ack["seq"]) for status, ack in posted] == [(200, head + i) for i in (1, 2, 3)]
        answer = await asyncio.to_thread(long_poll, survivor.url, cookie, room, head, 5)
        assert (answer.status, answer.worker) == (200, survivor.name)
        assert [(e["seq"], e["body"]) for e in answer.body["events"]] == [(head + i, f"drained {i - 1}") for i in (1, 2, 3)]
        assert (answer.body["seq"], answer.body["has_more"]) == (head + 3, False)
    finally:
        if not poll.done():
            await asyncio.wait_for(poll, 30)
        victim.terminate()
        await asyncio.to_thread(victim.proc.wait, 15)
        victim.start()


async def test_a_long_poll_through_the_balancer_on_a_worker_stopped_with_sigterm(cluster, rooms):
    """SIGTERM (a restart by the process manager) while a poll is held on the
    worker, through the balancer: the poll is answered 200 with an empty page by
    that worker at once, the worker exits 0 within its drain, and the client's
    next poll with its since lands on the other worker and gets everything
    written meanwhile, once and in order."""
    base = cluster.balancer.url
    source = "127.0.0.1"
    room = rooms["drain-signal"]
    cookie = login(base, "bob", source=source)
    head = room_head(base, cookie, room)
    poll = asyncio.ensure_future(asyncio.to_thread(long_poll, base, cookie, room, head, 25, source))
    victim = None
    try:
        await wait_until(lambda: fan_subscribers(cluster.redis.url, room) == 1, 10, "the poll to be held")
        # The victim is the worker holding the poll, whichever the balancer chose.
        [victim] = [w for w in cluster.workers if held_polls(w) == 1]
        survivor = next(w for w in cluster.workers if w is not victim)
        alice = login(survivor.url, "alice")
        victim.terminate()
        signalled = time.monotonic()
        answer = await asyncio.wait_for(poll, 40)
        assert (answer.status, answer.body, answer.worker) == (
            200, {"events": [], "seq": head, "epoch": room_epoch(survivor.url, alice, room), "has_more": False},
            victim.name)
        assert answer.ended - signalled < 2.0, answer.ended - signalled
        # Written while the victim finishes its drain.
        posted = [await asyncio.to_thread(post_message, survivor.url, alice, room, f"after {i}", f"sig-{i}")
                  for i in range(3)]
        assert [(status, ack["seq"]) for status, ack in posted] == [(200, head + i) for i in (1, 2, 3)]
        assert await asyncio.to_thread(victim.proc.wait, 5) == 0
        answer = await asyncio.to_thread(long_poll, base, cookie, room, head, 5, source)
        assert (answer.status, answer.worker) == (200, survivor.name)
        assert [(e["seq"], e["body"]) for e in answer.body["events"]] == [(head + i, f"after {i - 1}") for i in (1, 2, 3)]
        assert (answer.body["seq"], answer.body["has_more"]) == (head + 3, False)
    finally:
        if not poll.done():
            await asyncio.wait_for(poll, 40)
        for worker in cluster.workers:
            if worker is victim and worker.proc.poll() is None:
                worker.terminate()
                await asyncio.to_thread(worker.proc.wait, 15)
            worker.start()  # (a running worker is left as it is)
