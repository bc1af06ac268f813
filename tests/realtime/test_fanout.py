"""The worker's fan-out hands the room events this worker commits to its own
sockets before the transport's round trip (fanout.Fanout.dispatch_own), only when
that cannot overtake an event still in flight, and drops the copy that comes
back; a sender's own messages follow its acks at once (consumers.send_held)."""

from __future__ import annotations

import asyncio
import json

import msgspec
import pytest
from redis import asyncio as aioredis

from realtime import protocol
from realtime.delivery import publish as broadcast
from realtime.domain import services
from realtime.delivery.fanout import Fanout, fanout
from realtime.ws.consumer import RealtimeConsumer
from realtime.ws.queues import AppQueue
from tests.conftest import HOST, ORIGIN, assert_quiet, log_reads, socket, subscribe

pytestmark = [pytest.mark.asyncio, pytest.mark.django_db(transaction=True)]


class RoomPublishes:
    """Every PUBLISH to a room's channel, as the test sets `mode`: None, as Redis
    answers it; "lost", lost on its way (a dropped pub/sub message: what still
    arrives came another way); "failed", the broker went away; "held", no answer
    until `release` is set. `log` gets "published" as Redis answers each one."""

    def __init__(self) -> None:
        self.mode: str | None = None
        self.lost = self.held = 0
        self.release = asyncio.Event()
        self.log: list = []


@pytest.fixture
def room_publishes(monkeypatch):
    publishes = RoomPublishes()
    real = aioredis.Redis.publish

    async def publish(self, channel, message, **kwargs):
        if not str(channel).startswith("rt:fan:room."):
            return await real(self, channel, message, **kwargs)
        if publishes.mode == "lost":
            publishes.lost += 1
            return 0
        if publishes.mode == "failed":
            raise ConnectionError("the broker went away")
        if publishes.mode == "held":
            publishes.held += 1
            await publishes.release.wait()
        answered = await real(self, channel, message, **kwargs)
        publishes.log.append("published")
        return answered

    monkeypatch.setattr(aioredis.Redis, "publish", publish)
    return publishes


@pytest.fixture
def handed(monkeypatch):
    """How many times the fan-out handed each room event (by seq) to a socket."""
    seen: dict[int, int] = {}
    real = Fanout._deliver

    async def counted(self, message, local, traced=False):
        if message.get("type") == broadcast.ROOM_EVENT:
            seen[message["seq"]] = seen.get(message["seq"], 0) + len(local)
        return await real(self, message, local, traced)

    monkeypatch.setattr(Fanout, "_deliver", counted)
    return seen


def send(i: int) -> dict:
    return {"type": "message.send", "room": "general", "body": f"m{i}", "client_id": f"f{i}", "ref": f"r{i}"}


async def next_of(comm, kind: str, timeout: float = 5) -> dict:
    while True:
        frame = await comm.receive_json_from(timeout=timeout)
        if frame["type"] == kind:
            return frame


async def head_learned(alice, bob) -> None:
    """Both subscribed to general, and its first event sent by alice through the
    transport (the worker learns the room's head from it) and received by both."""
    await subscribe(alice, "general")
    await subscribe(bob, "general")
    await alice.send_json_to(send(0))
    assert (await next_of(bob, "message.new"))["seq"] == 1
    assert (await next_of(alice, "message.new"))["seq"] == 1


async def test_an_event_committed_here_reaches_this_workers_sockets_without_the_transport(
        cookies, settings, redis_server, room_publishes):
    settings.REDIS_URL = redis_server.url
    async with socket(cookies["alice"]) as alice, socket(cookies["bob"]) as bob:
        await head_learned(alice, bob)  # through pub/sub: the worker learns the room's head
        room_publishes.mode = "lost"
        await alice.send_json_to(send(1))
        got = await bob.receive_json_from(timeout=2)
        assert (got["type"], got["seq"], got["body"]) == ("message.new", 2, "m1")
        assert room_publishes.lost == 1, "the event was not published for the other workers"
        # The sender still gets its ack before its own message.
        mine = [await alice.receive_json_from(timeout=2) for _ in range(2)]
        assert [(f["type"], f.get("ref"), f["seq"]) for f in mine] == [("ack", "r1", 2), ("message.new", None, 2)]


async def test_an_event_out_of_turn_waits_for_the_transport(cookies, settings, redis_server, room_publishes):
    """When another event may still be in flight (the worker's last is not the
    seq right before), the worker's own event is not handed over early: it would
    overtake the other. It comes through the transport, in the group's order."""
    settings.REDIS_URL = redis_server.url
    async with socket(cookies["alice"]) as alice, socket(cookies["bob"]) as bob:
        await head_learned(alice, bob)
        fan = fanout()
        fan.heads[broadcast.room_group("general")] = 0  # as if seq 1 were still on its way here
        room_publishes.mode = "lost"
        await alice.send_json_to(send(1))
        assert (await next_of(alice, "ack"))["seq"] == 2
        # (not a ping to end it: a ping would repair the gap itself)
        assert await bob.receive_nothing(timeout=0.3), "an event out of turn was handed over before the transport's"
        # The next one, through the transport, brings it back in order (gap repair).
        room_publishes.mode = None
        await alice.send_json_to(send(2))
        got = [await next_of(bob, "message.new") for _ in range(2)]
        assert [(e["seq"], e["body"]) for e in got] == [(2, "m1"), (3, "m2")]


@pytest.fixture
def order(monkeypatch, room_publishes):
    """What happened to each room event in turn: its PUBLISH answered by Redis
    ("published"), and this worker's own sockets handed it (("own", how many
    sockets))."""
    real = Fanout.dispatch_own

    async def dispatch_own(self, messages):
        if any(m.get("type") == broadcast.ROOM_EVENT for _, m in messages):
            room_publishes.log.append(("own", self.own_sockets(messages)))
        await real(self, messages)

    monkeypatch.setattr(Fanout, "dispatch_own", dispatch_own)
    return room_publishes.log


@pytest.mark.parametrize("first_at, expected", [
    (3, [("own", 2), "published"]),  # two sockets here, below the bar: they get it first
    (2, ["published", ("own", 2)]),  # at the bar: the other workers' sweeps go first
    (0, ["published", ("own", 2)]),  # 0: always published first
])
async def test_a_worker_with_many_sockets_in_the_room_publishes_before_it_writes_to_them(
        cookies, settings, redis_server, order, first_at, expected):
    settings.REDIS_URL = redis_server.url
    settings.REALTIME = {**settings.REALTIME, "PUBLISH_FIRST_AT": first_at}
    async with socket(cookies["alice"]) as alice, socket(cookies["bob"]) as bob:
        await subscribe(alice, "general")
        await subscribe(bob, "general")
        for i in range(2):
            await alice.send_json_to(send(i))
            assert (await next_of(bob, "message.new"))["seq"] == i + 1
            assert (await next_of(alice, "message.new"))["seq"] == i + 1
        await assert_quiet(bob)
    # Each event once to each socket, in order, either way; the second event's
    # turn is the one asked about (the first taught the worker the room's head).
    assert order[-2:] == expected


@pytest.mark.parametrize("trouble", ["failed", "held"])
async def test_a_broker_in_trouble_holds_this_workers_sockets_back_no_longer_than_the_wait(
        cookies, settings, redis_server, room_publishes, trouble):
    """A publish that goes first and fails, or gets no answer (AMQP's confirms
    wait without a bound): the worker's own sockets still get the event, a held
    publish's after PUBLISH_FIRST_WAIT while it is still held; the sender's ack
    and its own copy follow (once a held publish answers)."""
    settings.REDIS_URL = redis_server.url
    settings.REALTIME = {**settings.REALTIME, "PUBLISH_FIRST_AT": 0}
    async with socket(cookies["alice"]) as alice, socket(cookies["bob"]) as bob:
        await head_learned(alice, bob)
        room_publishes.mode = trouble
        await alice.send_json_to(send(1))
        got = await next_of(bob, "message.new", timeout=2)
        assert (got["seq"], got["body"]) == (2, "m1")
        if trouble == "held":
            assert room_publishes.held == 1 and not room_publishes.release.is_set(), "answered before bob got it"
            room_publishes.release.set()
        mine = [await alice.receive_json_from(timeout=2) for _ in range(2)]
        assert [(f["type"], f["seq"]) for f in mine] == [("ack", 2), ("message.new", 2)]


async def test_own_sockets_counts_each_room_of_a_batch_once():
    """A burst of 32 sends into a room of 32 of this worker's sockets is a sweep of
    32 sockets, not 1,024: the bar is about the sockets in the rooms."""
    worker = type("Worker", (), {"groups": {"room.a": set(range(32)), "room.b": set(range(5))}})()
    event = {"type": broadcast.ROOM_EVENT}
    burst = [("room.a", event)] * 32 + [("room.b", event), ("room.c", event), ("user.1", {"type": "push"})]
    assert Fanout.own_sockets(worker, burst) == 37


async def test_sockets_that_miss_the_same_events_repair_the_gap_with_one_read(
        cookies, settings, redis_server, room_publishes, monkeypatch):
    """A worker's sockets in a room that miss the same event (its publish lost,
    here) read it from the log once between them (ws/replays.between), each still
    getting every event once and in order."""
    settings.REDIS_URL = redis_server.url
    reads = log_reads(monkeypatch, "room_events_between")
    async with socket(cookies["alice"]) as alice, socket(cookies["bob"]) as bob, socket(cookies["carol"]) as carol:
        await subscribe(bob, "general")
        await subscribe(carol, "general")
        await alice.send_json_to(send(0))  # alice follows nothing: she only sends
        assert (await next_of(alice, "ack"))["seq"] == 1
        assert (await next_of(bob, "message.new"))["seq"] == 1
        assert (await next_of(carol, "message.new"))["seq"] == 1
        fanout().heads[broadcast.room_group("general")] = 0  # as if seq 1 were still on its way: no early hand-out
        room_publishes.mode = "lost"
        await alice.send_json_to(send(1))
        assert (await next_of(alice, "ack"))["seq"] == 2
        room_publishes.mode = None
        await alice.send_json_to(send(2))
        for member in (bob, carol):
            got = [await next_of(member, "message.new") for _ in range(2)]
            assert [(e["seq"], e["body"]) for e in got] == [(2, "m1"), (3, "m2")]
        await assert_quiet(bob)
    assert reads == [(1, 2)]


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


# The fused path (Fanout._deliver -> Stream.deliver_now -> the server's writer),
# on sockets of our server (BoundedWebSocketProtocol, as tests/realtime/test_frames.py
# opens them) and of another (no frame writer: ASGI).

def event(seq: int, **extra) -> dict:
    from datetime import datetime, timezone

    found = protocol.MessageNew(room="general", seq=seq, id=seq, author="alice", body=f"m{seq}", client_id=f"c{seq}",
                                ts=datetime(2026, 11, 26, tzinfo=timezone.utc))
    return {**broadcast.layer_message(found), **extra}


class Member(RealtimeConsumer):
    """A socket subscribed to #general, sent everything up to `last_seq`, on our
    server (`server`: its BoundedWebSocketProtocol) or, with server=False, on one
    without prebuilt frames; `state` overrides any of its attributes."""

    def __init__(self, name: str = "bob", last_seq: int = 0, server: bool = True, codec=None, bound=1 << 20,
                 **state):
        from types import SimpleNamespace

        from realtime.ws.queues import LocalQueue
        from realtime.ws.stream import Subscription
        from tests.realtime.test_frames import open_socket

        self.conn_id, self.codec = name, codec or protocol.JSON
        self.user = SimpleNamespace(pk=hash(name), get_username=lambda: name)
        self.subscriptions = {"general": Subscription(last_seq=last_seq)}
        self.checking, self.access_changes = {}, {}
        self.local_queue = LocalQueue()
        self.asgi: list = []
        self.closed: list = []
        self.server = open_socket(max_send_buffer=bound) if server else None
        if server:
            self.server.sendClose = lambda code: self.closed.append(code)
        self.writer = self.server
        self.__dict__.update(state)

    async def send(self, text_data=None, bytes_data=None):
        self.asgi.append(text_data if bytes_data is None else bytes_data)

    def got(self) -> list[int]:
        """The seqs written to this socket, in order (as prebuilt frames or through ASGI)."""
        return [frame["seq"] for frame in self.frames()]

    def frames(self) -> list[dict]:
        """What was written to this socket, decoded, in order: the prebuilt frames,
        then what went through ASGI."""
        from websockets.frames import Frame
        from websockets.streams import StreamReader

        reader = StreamReader()
        reader.feed_data(b"".join(self.server.transport.writes) if self.server else b"")
        reader.feed_eof()
        found = []
        while reader.buffer:
            parser = Frame.parse(reader.read_exact, mask=False)
            with pytest.raises(StopIteration) as done:
                next(parser)
            data = done.value.value.data
            found.append(msgspec.msgpack.decode(data) if self.codec.binary else json.loads(data))
        return found + [json.loads(text) for text in self.asgi]


async def test_a_room_event_is_written_to_every_socket_in_turn_in_one_send_per_socket_at_the_turns_end():
    from prometheus_client import REGISTRY

    sample = lambda: REGISTRY.get_sample_value("realtime_frames_out_total", {"type": "message.new"}) or 0  # noqa: E731
    members = [Member(f"u{i}", last_seq=4) for i in range(3)] + [Member("m", last_seq=4, codec=protocol.MSGPACK)]
    first = event(5)
    before = sample()
    assert await fanout()._deliver(first, set(members)) == 4
    assert sample() - before == 4
    assert all(m.server.transport.writes == [] for m in members), "written before the turn ended"
    second = event(6)
    assert await fanout()._deliver(second, set(members)) == 4
    await asyncio.sleep(0)
    for m in members[:3]:
        assert m.server.transport.writes == [protocol.framed(first, protocol.JSON) + protocol.framed(second, protocol.JSON)]
        assert m.subscriptions["general"].last_seq == 6 and not m.local_queue.items
    assert members[3].server.transport.writes == [protocol.framed(first, protocol.MSGPACK)
                                                  + protocol.framed(second, protocol.MSGPACK)]


@pytest.mark.parametrize("state", [
    {"last_seq": 3},  # a gap: seq 4 is missing
    {"last_seq": 5},  # sent already
    {"replaying": 1}, {"handling": True}, {"revoked": True},
    {"checking": {"general": 1}},  # its access being read again
    {"name": "carol"},  # a change to this user's own membership
    {"subscriptions": {}},
    {"queued": True},  # something waits ahead of it
])
@pytest.mark.parametrize("server", [True, False])
async def test_an_event_out_of_turn_is_queued_not_written(state, server):
    """The fused path makes deliver()'s checks: an event the socket may not be
    sent now (a gap, a replay, a frame being answered, ...) goes to its queue,
    where room_event takes it in order (repairing a gap from the log); the
    sockets in turn beside it are written."""
    state = dict(state)
    queued = state.pop("queued", False)
    out = Member(state.pop("name", "bob"), last_seq=state.pop("last_seq", 4), server=server, **state)
    if queued:
        out.local_queue.put_nowait({"type": broadcast.SESSION_CHECK})
    fine = Member("dave", last_seq=4, server=server)
    message = event(5, member="carol")
    assert await fanout()._deliver(message, {out, fine}) == 1
    await asyncio.sleep(0)
    assert out.got() == [] and out.local_queue.items[-1] is message
    assert fine.got() == [5] and not fine.local_queue.items
    assert fine.subscriptions["general"].last_seq == 5


async def test_a_socket_of_another_server_is_sent_through_asgi_in_turn():
    sockets = [Member("bob", last_seq=4, server=False), Member("dave", last_seq=4, server=True)]
    for seq in (5, 6):
        assert await fanout()._deliver(event(seq), set(sockets)) == 2
    await asyncio.sleep(0)
    assert [s.got() for s in sockets] == [[5, 6], [5, 6]]
    assert [len(s.asgi) for s in sockets] == [2, 0]


async def test_a_socket_whose_writer_refuses_now_is_sent_through_asgi_once_and_in_turn():
    """Under our server, a socket that cannot take a prebuilt frame now (per-message
    compression negotiated; likewise a message half-sent) gets the event through
    ASGI, once each, in order; the others get it as frames."""
    refusing = Member("bob", last_seq=4)
    refusing.server._perMessageCompress = object()
    fine = Member("dave", last_seq=4)
    for seq in (5, 6):
        assert await fanout()._deliver(event(seq), {refusing, fine}) == 2
    await asyncio.sleep(0)
    assert refusing.server.transport.writes == [] and refusing.got() == [5, 6] and len(refusing.asgi) == 2
    assert fine.got() == [5, 6] and fine.asgi == []
    assert refusing.subscriptions["general"].last_seq == 6 and not refusing.local_queue.items


async def test_a_socket_past_its_send_bound_is_closed_between_whole_frames_and_the_others_written():
    small, fine = Member("bob", last_seq=4, bound=150), Member("dave", last_seq=4)
    frame = len(protocol.framed(event(5), small.codec))
    assert frame < 150 < 2 * frame
    for seq in (5, 6, 7):
        await fanout()._deliver(event(seq), {small, fine})
    await asyncio.sleep(0)
    assert small.closed == [4013] and small.server.overflowed
    assert small.got() == [5], "more than the whole frames that fit, or a cut frame"
    assert fine.got() == [5, 6, 7] and fine.closed == []


async def test_a_socket_that_fails_is_logged_and_queued_and_the_others_are_written(caplog):
    class Broken(Member):
        def deliver_now(self, message, frames):
            raise RuntimeError("boom")

    broken, fine = Broken("bob", last_seq=4), Member("dave", last_seq=4)
    message = event(5)
    assert await fanout()._deliver(message, {broken, fine}) == 1
    await asyncio.sleep(0)
    assert broken.local_queue.items == [message] and fine.got() == [5]
    assert any(r.getMessage() == "fan-out delivery failed" for r in caplog.records)


async def test_a_sampled_trace_writes_its_first_sockets_through_tracing_write(monkeypatch):
    from realtime.observability import tracing

    spanned = []
    real = tracing.write

    async def write(consumer, message):
        spanned.append(consumer)
        return await real(consumer, message)

    monkeypatch.setattr(tracing, "write", write)
    sockets = [Member(f"u{i}", last_seq=4) for i in range(tracing.WRITE_SPANS + 2)]
    local = dict.fromkeys(sockets)  # (insertion order: tuple(local) in the fan-out)
    assert await fanout()._deliver(event(5), local, traced=True) == len(sockets)
    await asyncio.sleep(0)
    assert spanned == sockets[:tracing.WRITE_SPANS]
    assert all(s.got() == [5] for s in sockets)


async def test_a_member_that_is_no_socket_is_awaited_through_deliver():
    class Waiter:
        def __init__(self):
            self.delivered = []
            self.local_queue = self

        async def deliver(self, message):
            self.delivered.append(message["seq"])
            return False

        def put_nowait(self, message):
            self.delivered.append("queued")

    waiter, fine = Waiter(), Member("dave", last_seq=4)
    assert await fanout()._deliver(event(5), {waiter, fine}) == 1
    assert waiter.delivered == [5, "queued"]


async def test_each_write_of_the_fused_path_is_logged_at_debug(caplog):
    import logging

    caplog.set_level(logging.DEBUG, logger="realtime.ws.stream")
    sockets = [Member("bob", last_seq=4), Member("dave", last_seq=4, server=False)]
    await fanout()._deliver(event(5, trace="t5"), set(sockets))
    logged = [r for r in caplog.records if getattr(r, "event", None) == "ws.deliver"]
    assert sorted((r.conn_id, r.seq, r.trace_id) for r in logged) == [("bob", 5, "t5"), ("dave", 5, "t5")]


# Pushes (presence diffs, typing, read markers) take the fused path too
# (Fanout._deliver -> Stream.push_now): written in the fan-out's loop, not queued
# for each socket's task to wake up and write.

def diff(**route) -> dict:
    frame = protocol.PresenceDiff(room="general", joins=["erin"], leaves=[], count=3)
    return broadcast.push_message(frame, room="general", **route)


async def test_a_push_is_written_to_every_socket_in_the_loop_with_nothing_queued():
    members = [Member(f"u{i}") for i in range(3)] + [Member("m", codec=protocol.MSGPACK)]
    message = diff()
    assert await fanout()._deliver(message, set(members)) == 0  # (room events are what it counts)
    assert all(not m.local_queue.items for m in members), "queued for the socket's task"
    assert all(m.server.transport.writes == [] for m in members), "written before the turn ended"
    await asyncio.sleep(0)
    for m in members:
        assert m.server.transport.writes == [protocol.framed(message, m.codec)]
        assert m.frames() == [{"type": "presence.diff", "room": "general", "joins": ["erin"], "leaves": [], "count": 3}]


@pytest.mark.parametrize("state", [
    {"replaying": 1}, {"handling": True}, {"revoked": True},
    {"checking": {"general": 1}},  # its access being read again
    {"queued": True},  # something waits ahead of it
])
async def test_a_push_with_something_ahead_of_it_is_queued_behind_it(state):
    state = dict(state)
    queued = state.pop("queued", False)
    out, fine = Member("bob", **state), Member("dave")
    if queued:
        out.local_queue.put_nowait({"type": broadcast.SESSION_CHECK})
    message = diff()
    await fanout()._deliver(message, {out, fine})
    await asyncio.sleep(0)
    assert out.server.transport.writes == [] and out.local_queue.items[-1] is message
    assert len(fine.frames()) == 1 and not fine.local_queue.items


@pytest.mark.parametrize("route, state", [
    ({"skip_user": hash("bob")}, {}),  # the typist's own typing
    ({"skip_conn": "bob"}, {}),  # the socket a push leaves out
    ({}, {"subscriptions": {}}),  # not following the room
    ({}, {"presence": False}),  # following it without presence
])
async def test_a_push_not_for_a_socket_is_passed_over_not_queued(route, state):
    from realtime.ws.stream import Subscription

    state = dict(state)
    if state.pop("presence", True) is False:
        state["subscriptions"] = {"general": Subscription(last_seq=0, presence=False)}
    out, fine = Member("bob", **state), Member("dave")
    await fanout()._deliver(diff(**route), {out, fine})
    await asyncio.sleep(0)
    assert out.server.transport.writes == [] and not out.local_queue.items
    assert len(fine.frames()) == 1


async def test_a_push_to_a_socket_of_another_server_is_queued_and_sent_through_asgi():
    other, fine = Member("bob", server=False), Member("dave")
    message = diff()
    await fanout()._deliver(message, {other, fine})
    assert other.local_queue.items == [message]
    await other.push(other.local_queue.items.pop())
    await asyncio.sleep(0)
    assert other.frames() == fine.frames() and len(fine.frames()) == 1


async def test_what_the_fan_out_brings_while_a_queued_check_is_in_hand_waits_behind_it():
    """A session check taken from the socket's queue reads the database: a push and
    a room event that come meanwhile are queued behind it, as they would have
    waited in the queue, and a check that ends the socket is sent neither."""
    gate = asyncio.Event()

    class Checked(Member):
        async def session_check(self, message):
            await gate.wait()
            self.revoked = True  # the session ended (shut() sets it)

    out, fine = Checked("bob", last_seq=4), Member("dave", last_seq=4)
    check = asyncio.ensure_future(out.dispatch({"type": broadcast.SESSION_CHECK}))
    await asyncio.sleep(0)
    push, room_event = diff(), event(5)
    await fanout()._deliver(push, {out, fine})
    await fanout()._deliver(room_event, {out, fine})
    await asyncio.sleep(0)
    assert out.server.transport.writes == [] and out.local_queue.items == [push, room_event]
    gate.set()
    await check
    assert out.handling is False
    while out.local_queue.items:
        await out.dispatch(out.local_queue.items.pop(0))
    await asyncio.sleep(0)
    assert out.server.transport.writes == [] and out.asgi == []
    assert [frame["type"] for frame in fine.frames()] == ["presence.diff", "message.new"]


async def test_a_push_to_a_long_poll_is_not_counted_as_a_delivered_room_event():
    from prometheus_client import REGISTRY

    class Waiter:
        local_queue = None

        async def deliver(self, message):
            return True  # (a poll's waiter takes everything: web/longpoll.py)

    sample = lambda: REGISTRY.get_sample_value("realtime_frames_out_total", {"type": "room.event"}) or 0  # noqa: E731
    before = sample()
    assert await fanout()._deliver(diff(), {Waiter()}) == 0
    assert sample() == before
