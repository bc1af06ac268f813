"""The same guarantees on every broker engine (tests/brokers/conftest.py runs each
test once per engine): a message crosses workers both ways; each room's order
holds with writers on both workers; a worker killed with SIGKILL, the broker
restarted and a worker that stalls mid-stream each end with every client holding
every seq once, in order; /readyz and /metrics name the engine."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
import urllib.request

import pytest

from tests.cluster.conftest import (
    assert_all_caught_up, followers, login, open_socket, post_message, room_head, run_clients, send_messages,
    split_sources, wait_until,
)

pytestmark = [pytest.mark.cluster, pytest.mark.asyncio]

ENGINE_NAMES = {"redis": "redis", "redis-sharded": "redis-sharded", "redis-cluster": "redis-cluster", "nats": "nats",
                "amqp": "amqp", "kafka": "kafka"}


async def recv_type(ws, type_: str, timeout: float = 5) -> dict:
    while True:
        frame = json.loads(await asyncio.wait_for(ws.recv(), timeout))
        if frame["type"] == type_:
            return frame


def metric(worker, name: str, **labels) -> float:
    text = urllib.request.urlopen(f"{worker.url}/metrics", timeout=10).read().decode()
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        m = re.match(rf"^{name}\{{(.*)\}} (\S+)$", line)
        if m and ",".join(sorted(m.group(1).split(","))) == want:
            return float(m.group(2))
    return 0.0


async def test_a_message_crosses_workers_both_ways(engine):
    a, b = engine.workers
    alice = await open_socket(a.url, login(a.url, "alice"))
    bob = await open_socket(b.url, login(b.url, "bob"))
    try:
        for ws in (alice, bob):
            await ws.send(json.dumps({"type": "subscribe", "room": "general", "ref": "s"}))
            await recv_type(ws, "ack")
        tag = f"{engine.broker_kind}-{time.monotonic_ns()}"
        await alice.send(json.dumps({"type": "message.send", "room": "general", "body": f"a {tag}",
                                     "client_id": f"a-{tag}", "ref": 1}))
        got = await recv_type(bob, "message.new")
        assert (got["author"], got["body"]) == ("alice", f"a {tag}")
        await bob.send(json.dumps({"type": "message.send", "room": "general", "body": f"b {tag}",
                                   "client_id": f"b-{tag}", "ref": 1}))
        got = await recv_type(alice, "message.new")
        while got["body"] != f"b {tag}":  # alice sees her own message first
            got = await recv_type(alice, "message.new")
        assert got["author"] == "bob"
    finally:
        await alice.close()
        await bob.close()


async def test_each_rooms_order_holds_with_writers_on_both_workers(engine):
    """Followers on both workers while both workers write 150 messages each into
    the room: every follower holds every seq once, in order (a follower fails on
    the first gap or repeat it sees)."""
    base = engine.balancer.url
    sources = split_sources(base)
    a, b = engine.workers
    start = room_head(base, login(base, "alice"))
    placements = [(user, source) for source in sources.values() for user in ("bob", "carol")]
    async with followers(base, placements, start=start) as clients:
        acks_a, acks_b = await asyncio.gather(
            send_messages(a.url, login(a.url, "alice"), "general", 150, f"oa{time.monotonic_ns()}"),
            send_messages(b.url, login(b.url, "bob"), "general", 150, f"ob{time.monotonic_ns()}"),
        )
        head = max(x["seq"] for x in acks_a + acks_b)
        assert sorted(x["seq"] for x in acks_a + acks_b) == list(range(start + 1, head + 1))
        await assert_all_caught_up(clients, head)


async def test_a_worker_killed_mid_stream_loses_and_doubles_nothing(engine):
    sources = split_sources(engine.balancer.url)
    victim, moved, stayed = await run_clients(engine, sources, "a", lambda w: w.kill(), messages=300, act_at=100)
    try:
        assert victim.proc.poll() is not None, "the victim was not killed"
        assert all(c.reconnects >= 1 for c in moved)
        assert all(c.reconnects == 0 for c in stayed)
    finally:
        victim.start()


async def test_a_broker_restart_mid_stream_loses_and_doubles_nothing(engine):
    """The broker goes down and comes back while messages are written; open sockets
    stay open. The followers do not ping (no head check of their own): what was
    written while the broker was down reaches them only because the worker, once
    subscribed again, has every socket catch up from the log (fan.recovered), and
    what is written after only if it subscribed again. Every follower ends with
    every seq once, in order; each worker counts the failure under its engine."""
    base = engine.balancer.url
    sources = split_sources(base)
    start = room_head(base, login(base, "alice"))
    placements = [(user, source) for source in sources.values() for user in ("bob", "carol")]
    sender = engine.workers[0]
    name = ENGINE_NAMES[engine.broker_kind]
    failures = [metric(w, "realtime_broker_failures_total", engine=name) for w in engine.workers]
    async with followers(base, placements, start=start) as clients:
        cookie = login(sender.url, "alice")
        before = await send_messages(sender.url, cookie, "general", 20, f"rb{time.monotonic_ns()}")
        await assert_all_caught_up(clients, before[-1]["seq"])
        engine.broker.stop()
        # Written while the broker is down, over REST (a new socket is refused with
        # 4013 while its worker cannot join the user's group): stored and acked.
        tag = f"rd{time.monotonic_ns()}"
        during = [await asyncio.to_thread(post_message, sender.url, cookie, "general", f"{tag} {i}", f"{tag}-{i}")
                  for i in range(20)]
        assert [status for status, _ in during] == [200] * 20, during
        engine.broker.start()
        await assert_all_caught_up(clients, during[-1][1]["seq"], timeout=60)
        after = await send_messages(sender.url, cookie, "general", 20, f"ra{time.monotonic_ns()}")
        await assert_all_caught_up(clients, after[-1]["seq"], timeout=30)
        assert all(c.reconnects == 0 for c in clients), "open sockets ride out a broker restart"
    assert all(w.proc.poll() is None for w in engine.workers)
    now = [metric(w, "realtime_broker_failures_total", engine=name) for w in engine.workers]
    assert all(n > f for n, f in zip(now, failures)), (failures, now)


async def test_a_worker_that_falls_behind_is_repaired_from_the_log(engine):
    """Worker b stops reading (SIGSTOP) while 300 messages are sent through a, then
    goes on: its followers end with every seq once, in order, caught up from the
    log where the broker dropped what b could not take."""
    base = engine.balancer.url
    sources = split_sources(base)
    a, b = engine.workers
    start = room_head(base, login(base, "alice"))
    placements = [(user, source) for source in sources.values() for user in ("bob", "carol")]
    async with followers(base, placements, ping_every=1.0, start=start) as clients:
        os.kill(b.proc.pid, signal.SIGSTOP)
        try:
            acks = await send_messages(a.url, login(a.url, "alice"), "general", 300, f"fb{time.monotonic_ns()}",
                                       body="x" * 2000)
        finally:
            os.kill(b.proc.pid, signal.SIGCONT)
        await assert_all_caught_up(clients, acks[-1]["seq"], timeout=60)
    assert b.proc.poll() is None


async def test_readyz_and_metrics_name_the_engine(engine):
    name = ENGINE_NAMES[engine.broker_kind]
    for worker in engine.workers:
        ready = json.loads(urllib.request.urlopen(f"{worker.url}/readyz").read())
        assert ready["status"] == "ok" and ready["broker"] == name
        assert ready["checks"] == {"database": "ok", "channel_layer": "ok", "broker": "ok"}
        assert metric(worker, "realtime_broker_info", engine=name) == 1

    # Counted under the engine's name: what a worker publishes, and what it takes
    # from the broker for a room one of its sockets follows (its own messages
    # coming back included; test_a_message_crosses_workers_both_ways proves the
    # crossing). The test sends its own: a worker restarted by an earlier test
    # may have taken nothing from the broker since.
    def counts(direction):
        return [metric(w, "realtime_broker_messages_total", engine=name, direction=direction)
                for w in engine.workers]

    base = engine.balancer.url
    start = room_head(base, login(base, "alice"))
    async with followers(base, [("bob", source) for source in split_sources(base).values()], start=start) as clients:
        received, published = counts("received"), counts("published")
        acks = [(await send_messages(w.url, login(w.url, "alice"), "general", 1, f"rz{i}-{time.monotonic_ns()}"))[0]
                for i, w in enumerate(engine.workers)]
        await assert_all_caught_up(clients, max(ack["seq"] for ack in acks))
        await wait_until(lambda: all(now > then for now, then in zip(counts("received"), received)), 10,
                         "each worker to count a message received from the broker")
        assert all(now > then for now, then in zip(counts("published"), published)), (published, counts("published"))
