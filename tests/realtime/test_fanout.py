"""The worker's fan-out hands the room events this worker commits to its own
sockets before the transport's round trip (fanout.Fanout.dispatch_own), only when
that cannot overtake an event still in flight, and drops the copy that comes
back. Run on the embedded default and with REDIS_URL (pub/sub)."""

from __future__ import annotations

import pytest
from redis import asyncio as aioredis

from realtime import broadcast, ratelimit
from realtime.consumers import RealtimeConsumer
from realtime.fanout import fanout
from tests.conftest import socket, subscribe

pytestmark = [pytest.mark.asyncio, pytest.mark.django_db(transaction=True)]


@pytest.fixture(params=["memory", "redis"])
def transport(request, settings):
    if request.param == "redis":
        settings.REDIS_URL = request.getfixturevalue("redis_server").url
    else:
        settings.REDIS_URL = ""
        settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    ratelimit.buckets.reset()
    yield request.param
    ratelimit.buckets.reset()


@pytest.fixture
def lost_publishes(monkeypatch):
    """From the moment it is switched on, every PUBLISH is lost on its way (a
    dropped pub/sub message): what still arrives came another way."""
    state = {"on": False, "lost": 0}
    real = aioredis.Redis.publish

    async def publish(self, channel, message, **kwargs):
        if state["on"] and str(channel).startswith("rt:fan:room."):
            state["lost"] += 1
            return 0
        return await real(self, channel, message, **kwargs)

    monkeypatch.setattr(aioredis.Redis, "publish", publish)
    return state


@pytest.fixture
def handed(monkeypatch):
    """How many times the fan-out handed each room event (by seq) to a socket."""
    seen: dict[int, int] = {}
    real = RealtimeConsumer.deliver

    async def counted(self, message):
        if message.get("type") == broadcast.ROOM_EVENT:
            seen[message["seq"]] = seen.get(message["seq"], 0) + 1
        return await real(self, message)

    monkeypatch.setattr(RealtimeConsumer, "deliver", counted)
    return seen


def send(i: int) -> dict:
    return {"type": "message.send", "room": "general", "body": f"m{i}", "client_id": f"f{i}", "ref": f"r{i}"}


async def next_of(comm, kind: str, timeout: float = 5) -> dict:
    while True:
        frame = await comm.receive_json_from(timeout=timeout)
        if frame["type"] == kind:
            return frame


async def test_an_event_committed_here_reaches_this_workers_sockets_without_the_transport(
        cookies, settings, redis_server, lost_publishes):
    settings.REDIS_URL = redis_server.url
    async with socket(cookies["alice"]) as alice, socket(cookies["bob"]) as bob:
        await subscribe(alice, "general")
        await subscribe(bob, "general")
        await alice.send_json_to(send(0))  # through pub/sub: the worker learns the room's head
        assert (await next_of(bob, "message.new"))["seq"] == 1
        assert (await next_of(alice, "message.new"))["seq"] == 1
        lost_publishes["on"] = True
        await alice.send_json_to(send(1))
        got = await bob.receive_json_from(timeout=2)
        assert (got["type"], got["seq"], got["body"]) == ("message.new", 2, "m1")
        assert lost_publishes["lost"] == 1, "the event was not published for the other workers"
        # The sender still gets its ack before its own message.
        mine = [await alice.receive_json_from(timeout=2) for _ in range(2)]
        assert [(f["type"], f.get("ref"), f["seq"]) for f in mine] == [("ack", "r1", 2), ("message.new", None, 2)]


async def test_an_event_out_of_turn_waits_for_the_transport(cookies, settings, redis_server, lost_publishes):
    """When another event may still be in flight (the worker's last is not the
    seq right before), the worker's own event is not handed over early: it would
    overtake the other. It comes through the transport, in the group's order."""
    settings.REDIS_URL = redis_server.url
    async with socket(cookies["alice"]) as alice, socket(cookies["bob"]) as bob:
        await subscribe(alice, "general")
        await subscribe(bob, "general")
        await alice.send_json_to(send(0))
        assert (await next_of(bob, "message.new"))["seq"] == 1
        assert (await next_of(alice, "message.new"))["seq"] == 1
        fan = fanout()
        fan.heads[broadcast.room_group("general")] = 0  # as if seq 1 were still on its way here
        lost_publishes["on"] = True
        await alice.send_json_to(send(1))
        assert (await next_of(alice, "ack"))["seq"] == 2
        assert await bob.receive_nothing(timeout=0.3), "an event out of turn was handed over before the transport's"
        # The next one, through the transport, brings it back in order (gap repair).
        lost_publishes["on"] = False
        await alice.send_json_to(send(2))
        got = [await next_of(bob, "message.new") for _ in range(2)]
        assert [(e["seq"], e["body"]) for e in got] == [(2, "m1"), (3, "m2")]


async def test_the_copy_that_comes_back_is_dropped_once_for_the_worker(cookies, transport, handed):
    async with socket(cookies["alice"]) as alice, socket(cookies["bob"]) as bob:
        await subscribe(alice, "general")
        await subscribe(bob, "general")
        for i in range(5):
            await alice.send_json_to(send(i))
            assert (await next_of(alice, "ack"))["ref"] == f"r{i}"
        got = [await next_of(bob, "message.new") for _ in range(5)]
        assert [e["seq"] for e in got] == [1, 2, 3, 4, 5]
        assert await bob.receive_nothing(timeout=0.3)
    # Each event was handed to each of the worker's two sockets once: the copies
    # that came back through the transport stopped at the fan-out.
    assert handed == {seq: 2 for seq in range(1, 6)}
