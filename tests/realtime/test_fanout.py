"""The worker's fan-out hands the room events this worker commits to its own
sockets before the transport's round trip (fanout.Fanout.dispatch_own), only when
that cannot overtake an event still in flight, and drops the copy that comes
back; a sender's own messages follow its acks at once (consumers.send_held)."""

from __future__ import annotations

import asyncio
import json

import pytest
from redis import asyncio as aioredis

from realtime.delivery import publish as broadcast
from realtime.domain import services
from realtime.ws.consumer import RealtimeConsumer
from realtime.delivery.fanout import fanout
from realtime.ws.queues import AppQueue
from tests.conftest import HOST, ORIGIN, socket, subscribe, assert_quiet

pytestmark = [pytest.mark.asyncio, pytest.mark.django_db(transaction=True)]


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
        # (not a ping to end it: a ping would repair the gap itself)
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
        await assert_quiet(bob)
    # Each event was handed to each of the worker's two sockets once: the copies
    # that came back through the transport stopped at the fan-out.
    assert handed == {seq: 2 for seq in range(1, 6)}


async def test_a_senders_own_messages_follow_its_acks_before_later_frames(cookies, settings, redis_server, monkeypatch):
    """Served as our daphne launcher serves a socket (an AppQueue, realtime/ws/queues.py):
    a burst of sends, and a frame that arrives while the burst is in the database.
    The sender's own messages, held while its frames were handled, go out right
    after the acks, not one per turn of the socket's queues behind later frames
    (with a window of sends in flight, that made the echo, and so the sender,
    wait a whole send for each of its messages)."""
    from project.asgi import application

    settings.REDIS_URL = redis_server.url
    inbox, out = AppQueue(), asyncio.Queue()
    scope = {"type": "websocket", "path": "/ws/v1/", "raw_path": b"/ws/v1/", "query_string": b"",
             "headers": [HOST, ORIGIN, (b"cookie", cookies["alice"])], "subprotocols": ["rt.v1.json"],
             "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 80)}
    app = asyncio.ensure_future(application(scope, inbox.get, out.put))

    async def frame() -> dict:
        message = await asyncio.wait_for(out.get(), 5)
        assert message["type"] == "websocket.send", message
        return json.loads(message["text"])

    def put(payload: dict) -> None:
        inbox.put_nowait({"type": "websocket.receive", "text": json.dumps(payload)})

    real = services.message_send_many

    def meanwhile(*, user, sends):
        # A frame that arrives while the burst is being written (one whose reply
        # needs nothing more: a ping would first catch the room up from the log).
        inbox.put_nowait({"type": "websocket.receive", "text": "{not json"})
        return real(user=user, sends=sends)

    try:
        inbox.put_nowait({"type": "websocket.connect"})
        assert (await asyncio.wait_for(out.get(), 5))["type"] == "websocket.accept"
        put({"type": "subscribe", "room": "general", "ref": "s", "presence": False})
        while (await frame())["type"] != "ack":
            pass
        put(send(0))  # the worker learns the room's head: what follows is handed over here
        assert [(f["type"], f["seq"]) for f in [await frame(), await frame()]] == [("ack", 1), ("message.new", 1)]
        monkeypatch.setattr(services, "message_send_many", meanwhile)
        for i in range(1, 4):
            put(send(i))
        got = [await frame() for _ in range(7)]
        assert [(f["type"], f.get("ref"), f.get("seq")) for f in got] == [
            ("ack", "r1", 2), ("ack", "r2", 3), ("ack", "r3", 4),
            ("message.new", None, 2), ("message.new", None, 3), ("message.new", None, 4),
            ("error", None, None),
        ]
    finally:
        inbox.put_nowait({"type": "websocket.disconnect", "code": 1000})
        await asyncio.wait_for(app, 5)
