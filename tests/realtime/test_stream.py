"""The delivery guarantee's edges (realtime/ws/stream.py), each forced to happen:
a commit between joining the room's stream and reading its log, a socket whose
local queue overflows, and the age limit of the access a subscription caches.
On both transports."""

from __future__ import annotations

import asyncio

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from prometheus_client import REGISTRY

from realtime.delivery import publish
from realtime.delivery.fanout import fanout
from realtime.domain import roomlog, services
from realtime.ws import queues, stream
from tests.conftest import assert_quiet, call, log_reads, socket, subscribe

pytestmark = [pytest.mark.asyncio, pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("layer")]


def committed(user, body: str, client_id: str) -> list:
    """A message committed (not yet published): its events."""
    _, events = services.message_send(user=user, slug="general", body=body, client_id=client_id)
    return events


def consumer_of(slug: str):
    (consumer,) = fanout().groups[f"room.{slug}"]
    return consumer


def queue_full_drops() -> float:
    return REGISTRY.get_sample_value("realtime_layer_send_failures_total", {"kind": "local-queue-full"}) or 0.0


async def test_a_commit_between_joining_and_reading_arrives_once(cookies, demo, monkeypatch):
    """Committed and published after the socket joined the stream, before it read
    the log: the replay has it, and so does the stream. Sent once."""
    from realtime.ws import replays

    read = replays.checks.resolve  # (the subscribe's head and access: ws/replays.py)

    def commit_then_read(asks):
        async_to_sync(publish.publish)(committed(demo["alice"], "in between", "between"))
        return read(asks)

    monkeypatch.setattr(replays.checks, "resolve", commit_then_read)
    async with socket(cookies["bob"]) as bob:
        replayed = await subscribe(bob, "general", since=0)
        assert [(e["seq"], e["body"]) for e in replayed] == [(1, "in between")]
        monkeypatch.setattr(replays.checks, "resolve", read)
        await assert_quiet(bob)  # the stream's copy was dropped, not sent again


async def test_a_commit_after_reading_arrives_live(cookies, demo, monkeypatch):
    """Committed and published after the log was read, before the ack: only the
    stream has it, and the socket (joined before it read) gets it without asking."""
    from realtime.ws import replays

    read = replays.checks.resolve

    def read_then_commit(asks):
        answers = read(asks)
        async_to_sync(publish.publish)(committed(demo["alice"], "just after", "after"))
        return answers

    monkeypatch.setattr(replays.checks, "resolve", read_then_commit)
    async with socket(cookies["bob"]) as bob:
        assert await subscribe(bob, "general", since=0) == []
        monkeypatch.setattr(replays.checks, "resolve", read)
        # Before any ping (whose catch-up would repair a loss and hide it).
        live = await bob.receive_json_from(timeout=5)
        assert (live["type"], live["seq"], live["body"]) == ("message.new", 1, "just after")
        await assert_quiet(bob)


async def test_a_local_queue_that_overflows_drops_events_and_repairs_them_from_the_log(cookies, demo, monkeypatch):
    monkeypatch.setattr(queues, "LOCAL_QUEUE_MAX", 20)
    async with socket(cookies["bob"]) as bob:
        await subscribe(bob, "general", since=0)
        consumer = consumer_of("general")
        events = []
        for i in range(25):
            events += await sync_to_async(committed)(demo["alice"], f"m{i}", f"q{i}")
        before = queue_full_drops()
        # All at once, before the socket takes any: 20 are held, 5 dropped.
        for event in events:
            consumer.local_queue.put_nowait(publish.layer_message(event))
        assert len(consumer.local_queue.items) == 20
        assert queue_full_drops() - before == 5
        got = [await bob.receive_json_from(timeout=5) for _ in range(20)]
        assert [f["seq"] for f in got] == list(range(1, 21))
        # The dropped tail is repaired from the log when the socket next looks (a ping).
        await bob.send_json_to({"type": "ping", "ref": "p"})
        repaired = [await bob.receive_json_from(timeout=5) for _ in range(5)]
        assert [(f["seq"], f["body"]) for f in repaired] == [(21 + i, f"m{20 + i}") for i in range(5)]
        assert await bob.receive_json_from(timeout=5) == {"type": "pong", "ref": "p"}
        await assert_quiet(bob)


async def test_a_cached_access_is_trusted_only_while_young(cookies, demo):
    """message.send trusts the access its subscription read for ACCESS_MAX_AGE;
    older, it reads it again (a change that sent no access.check is seen)."""
    from realtime.models import Membership, Role

    async with socket(cookies["bob"]) as bob:
        await subscribe(bob, "general")
        consumer = consumer_of("general")
        # Demoted without a signal (a queryset update sends no access.check).
        await Membership.objects.filter(user=demo["bob"], room__slug="general").aupdate(role=Role.READER)
        reply = await call(bob, {"type": "message.send", "room": "general", "body": "x", "client_id": "young", "ref": 1})
        assert reply["type"] == "ack"  # the young cache's role
        await bob.receive_json_from(timeout=5)  # its own message.new
        sub = consumer.subscriptions["general"]
        assert sub.access is not None
        # The clock moves past the age limit (the loop's time, which the cache reads).
        sub.access_at = asyncio.get_running_loop().time() - stream.ACCESS_MAX_AGE
        reply = await call(bob, {"type": "message.send", "room": "general", "body": "x", "client_id": "old", "ref": 2})
        assert (reply["type"], reply["code"], reply["ref"]) == ("error", "forbidden", 2)


async def test_a_subscribe_costs_one_query_and_one_more_where_read_markers_show(cookies, demo, monkeypatch):
    """What a join costs the database (issue 18: the connect storm): the room with
    the user's role, whose row is also the head; the read markers only in a room
    that shows them. Counted on every thread (the queries run on the database's)."""
    from django.db.backends import utils

    from realtime.models import Room

    queries: list[str] = []
    real = utils.CursorWrapper.execute

    def counting(self, sql, params=None):
        queries.append(sql)
        return real(self, sql, params)

    async with socket(cookies["bob"]) as bob:
        await sync_to_async(Room.objects.filter(slug="general").update)(read_markers=False)
        await sync_to_async(Room.objects.filter(slug="ops").update)(read_markers=True)
        monkeypatch.setattr(utils.CursorWrapper, "execute", counting)
        await subscribe(bob, "general")
        assert len(queries) == 1, queries
        queries.clear()
        await subscribe(bob, "ops")
        assert len(queries) == 2, queries
        assert "read_markers" in queries[1] or "readstate" in queries[1].lower(), queries


async def test_subscribes_waiting_together_are_checked_together_each_for_its_own_user(demo, monkeypatch):
    """A storm's subscribes (ws/replays.py): one trip and two queries for a batch of
    several users, and each answer the one room_access gives that user alone."""
    from django.db.backends import utils

    from realtime.domain.errors import ActionError
    from realtime.ws import replays

    queries: list[str] = []
    real = utils.CursorWrapper.execute

    def counting(self, sql, params=None):
        queries.append(sql)
        return real(self, sql, params)

    monkeypatch.setattr(utils.CursorWrapper, "execute", counting)
    asks = [roomlog.ReplayAsk(user=demo[name], slug=slug, since=since)
            for name, slug, since in (("alice", "ops", None), ("bob", "ops", 0), ("carol", "ops", None),
                                      ("carol", "general", None), ("bob", "nowhere", None))]
    answers = await asyncio.gather(*(replays.checks.get(ask) for ask in asks), return_exceptions=True)
    assert len(queries) == 2, queries  # the rooms; the roles of these users in them
    shown = [(a.code, a.message) if isinstance(a, ActionError) else (a.room, a.head, a.access.role) for a in answers]
    assert shown == [("ops", 0, "owner"), ("ops", 0, "member"), ("not_found", "no such room"),
                     ("general", 0, "reader"),
                     ("not_found", "no such room")]
    for ask, answer in zip(asks, answers):  # the same as each alone
        try:
            alone = await sync_to_async(roomlog.room_replay)(user=ask.user, slug=ask.slug, since=ask.since, defer=True)
        except ActionError as exc:
            alone = exc
        assert type(alone) is type(answer)
        if not isinstance(alone, ActionError):
            assert (alone.head, alone.epoch, alone.access.role) == (answer.head, answer.epoch, answer.access.role)


async def test_identical_replays_at_the_same_time_read_the_log_once(cookies, demo, monkeypatch):
    """A reconnect storm's replays (ws/replays.py): the same range asked for while a
    read of it is under way is that read's answer, not another query; a range asked
    for after it is read afresh; a different range is its own read."""
    from realtime.models import Room
    from realtime.ws import replays

    for i in range(3):
        await sync_to_async(committed)(demo["alice"], f"m{i}", f"c{i}")
    room = await Room.objects.aget(slug="general")
    reads = log_reads(monkeypatch, "read_range")
    key = (room.pk, room.epoch, 0, 3)
    first, second, other = await asyncio.gather(replays.read(key, "general"), replays.read(key, "general"),
                                                replays.read((room.pk, room.epoch, 1, 3), "general"))
    assert [e.seq for e in first.events] == [1, 2, 3]
    assert second is first  # one answer, encoded once for all who share it
    assert [e.seq for e in other.events] == [2, 3]
    assert sorted(reads) == [(0, 3), (1, 3)]
    assert replays.in_flight() == {}
    again = await replays.read(key, "general")
    assert again is not first and [e.seq for e in again.events] == [1, 2, 3]
    assert sorted(reads) == [(0, 3), (0, 3), (1, 3)]


async def test_a_shared_read_that_fails_after_every_asker_left_is_not_logged_as_unretrieved(monkeypatch):
    """A gap repair's read (ws/replays.between) whose socket closed while it ran,
    and which then fails (events no longer kept): its error was nobody's, and the
    loop does not report it as an exception never retrieved."""
    import gc
    import threading

    from realtime.domain.errors import ActionError
    from realtime.protocol import ErrorCode
    from realtime.ws import replays

    started, release = threading.Event(), threading.Event()

    def failing(**kwargs):
        started.set()
        release.wait(5)
        raise ActionError(ErrorCode.RECOVERY_FAILED, "events after seq 1 are no longer kept")

    monkeypatch.setattr(roomlog, "room_events_between", failing)
    loop = asyncio.get_running_loop()
    reported = []
    loop.set_exception_handler(lambda loop, context: reported.append(context))
    try:
        asker = asyncio.ensure_future(replays.between("general", 1, 2))
        await asyncio.to_thread(started.wait, 5)
        asker.cancel()  # the socket went away
        release.set()
        while replays.in_flight():
            await asyncio.sleep(0.01)
        with pytest.raises(asyncio.CancelledError):
            await asker
        del asker
        gc.collect()
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(None)
    assert reported == []


@pytest.mark.parametrize("codec", ["rt.v1.json", "rt.v1.msgpack", "rt.v1.protobuf"])
async def test_a_shared_replay_is_encoded_and_framed_once_per_codec(cookies, demo, codec):
    """However many sockets share a read, each event is encoded once per codec, and
    the frames are joined once: what each socket is sent in one write."""
    from realtime import protocol
    from realtime.ws import replays
    from tests.realtime.test_frames import parse

    for i in range(3):
        await sync_to_async(committed)(demo["alice"], f"m{i}", f"c{i}")
    events = await sync_to_async(roomlog.room_events_between)(slug="general", after=0, upto=3)
    replayed = replays.Replayed(events)
    chosen = protocol.CODECS[codec]
    encoded = replayed.encoded(chosen)
    assert encoded == [chosen.encode(event) for event in events]
    assert replayed.encoded(chosen) is encoded
    frames = replayed.frames(chosen)
    assert replayed.frames(chosen) is frames
    # The frames read back as the three events, in order, each a frame of its own.
    assert [parse(frame).data for frame in frames] == encoded
    assert replayed.tags == {"message.new": 3}


class Writer:
    """The server's prebuilt-frame writer (the `realtime.frames` extension), as a
    function that takes what is written and says whether it took it."""

    def __init__(self, take):
        self.write_frame = self.write_frames = take


async def test_a_replay_goes_out_in_one_write_where_the_server_allows_it(cookies, demo):
    """A socket on our server (realtime.frames' writer in the scope) is sent its
    replay as one write of the shared frames, counted as the events it holds; a
    socket without it (another ASGI server) one send per event."""
    from realtime import protocol
    from realtime.ws import replays

    for i in range(3):
        await sync_to_async(committed)(demo["alice"], f"m{i}", f"c{i}")
    events = await sync_to_async(roomlog.room_events_between)(slug="general", after=0, upto=3)
    replayed = replays.Replayed(events)

    from realtime.ws.consumer import RealtimeConsumer

    class Socket(stream.Stream):
        codec = protocol.CODECS["rt.v1.json"]
        send_payload = RealtimeConsumer.send_payload

        def __init__(self, write_frames):
            self.writer, self.sent = Writer(write_frames) if write_frames else None, []

        async def send(self, text_data=None, bytes_data=None):
            self.sent.append(text_data)

    written = []
    sample = lambda: REGISTRY.get_sample_value("realtime_frames_out_total", {"type": "message.new"}) or 0  # noqa: E731
    before = sample()
    one = Socket(lambda frames: written.append(frames) or True)
    await one.send_replayed(replayed)
    assert written == [replayed.frames(one.codec)] and one.sent == []
    assert sample() - before == 3
    other = Socket(None)
    await other.send_replayed(replayed)
    assert other.sent == [data.decode() for data in replayed.encoded(other.codec)]
    refused = Socket(lambda frames: False)  # (mid-close, compressing: through ASGI)
    await refused.send_replayed(replayed)
    assert len(refused.sent) == 3
    await one.send_replayed(replays.Replayed([]))
    assert len(written) == 1, "an empty replay wrote something"


async def test_a_subscribe_replays_from_the_shared_read_up_to_its_head(cookies, demo):
    for i in range(3):
        await sync_to_async(committed)(demo["alice"], f"m{i}", f"c{i}")
    async with socket(cookies["bob"]) as one, socket(cookies["carol"]) as two:
        for comm in (one, two):
            await comm.send_json_to({"type": "subscribe", "room": "general", "since": 0, "ref": "s"})
        for comm in (one, two):
            got = []
            while True:
                frame = await comm.receive_json_from(timeout=5)
                if frame.get("ref") == "s":
                    assert frame["replayed"] == 3 and frame["seq"] == 3, frame
                    break
                if frame["type"] == "message.new":
                    got.append(frame["seq"])
            assert got == [1, 2, 3]


@pytest.mark.parametrize("codec", ["rt.v1.json", "rt.v1.msgpack", "rt.v1.protobuf"])
async def test_a_reply_is_framed_and_written_as_is_where_the_server_allows_it(codec):
    """send_frame on our server: the frame's encoding behind a WebSocket header,
    handed to the server's writer (in order with the rest of the turn's frames,
    tests/realtime/test_frames.py); elsewhere (or when the writer cannot take it),
    one ASGI send of the same encoding."""
    from realtime import protocol
    from realtime.ws.consumer import RealtimeConsumer
    from tests.realtime.test_frames import parse

    chosen = protocol.CODECS[codec]
    reply = protocol.SubscribeAck(ref="s", room="general", seq=3, epoch="e", replayed=0)
    sent, written = [], []

    class Socket(RealtimeConsumer):
        def __init__(self, write_frame):
            self.codec, self.writer = chosen, Writer(write_frame) if write_frame else None

        async def send(self, text_data=None, bytes_data=None):
            sent.append(bytes_data if chosen.binary else text_data)

    await Socket(lambda frame: written.append(frame) or True).send_frame(reply)
    frame = parse(written[0])
    assert (len(written), sent, frame.data) == (1, [], chosen.encode(reply))
    assert frame.opcode.name == ("BINARY" if chosen.binary else "TEXT")
    await Socket(None).send_frame(reply)
    await Socket(lambda frame: False).send_frame(reply)
    expected = chosen.encode(reply) if chosen.binary else chosen.encode(reply).decode()
    assert (len(written), sent) == (1, [expected, expected])
