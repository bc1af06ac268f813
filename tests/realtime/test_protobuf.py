"""rt.v1.protobuf (realtime/protocol/proto.py): the same frames as JSON, from the
same declarations. A socket speaking it gets every reply, event and push as a JSON
socket does, field for field; a frame it sends that does not parse, carries a field
the schema does not know, a wrong wire type or a bad value gets the error JSON would
get, and nothing is stored or broadcast."""

from __future__ import annotations

import contextlib
import json

import pytest

from realtime import protocol
from realtime.models import Message
from realtime.protocol import PROTOBUF, proto
from tests.conftest import call, communicator, subscribe

pytestmark = [pytest.mark.asyncio, pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("layer")]


def envelope(frame: dict) -> bytes:
    """A client frame (its JSON form) as a protobuf Frame, built field by field."""
    message = proto._classes()()
    cls = protocol.CLIENT_TYPES[frame["type"]]
    proto._fill(getattr(message, proto._snake(cls.__name__)), frame)
    return message.SerializeToString()


class ProtobufSocket:
    def __init__(self, comm) -> None:
        self.comm = comm

    async def send(self, frame: dict) -> None:
        await self.comm.send_to(bytes_data=envelope(frame))

    async def send_raw(self, data: bytes) -> None:
        await self.comm.send_to(bytes_data=data)

    async def receive(self, timeout: float = 5) -> dict:
        output = await self.comm.receive_output(timeout=timeout)
        assert output["type"] == "websocket.send" and output.get("bytes") is not None, output
        return PROTOBUF.decode_any(output["bytes"])

    async def call(self, frame: dict) -> dict:
        await self.send(frame)
        return await self.receive()


@contextlib.asynccontextmanager
async def protobuf_socket(cookie: bytes):
    comm = communicator(cookie, subprotocols=("rt.v1.protobuf",))
    connected, subprotocol = await comm.connect(timeout=5)
    assert connected and subprotocol == "rt.v1.protobuf"
    try:
        yield ProtobufSocket(comm)
    finally:
        await comm.disconnect()


@contextlib.asynccontextmanager
async def json_socket(cookie: bytes):
    comm = communicator(cookie)
    connected, _ = await comm.connect(timeout=5)
    assert connected
    try:
        yield comm
    finally:
        await comm.disconnect()


async def test_every_request_and_what_it_causes_reads_the_same_as_json(cookies, demo):
    """bob speaks protobuf, carol JSON, both in #general; bob does everything a
    client can do. Each reply bob gets is what JSON would carry, and each event and
    push both get is the same object."""
    async with protobuf_socket(cookies["bob"]) as bob, json_socket(cookies["carol"]) as carol, \
            protobuf_socket(cookies["admin"]) as admin:
        await subscribe(carol, "general")
        ack = await bob.call({"type": "subscribe", "room": "general", "ref": "s", "presence": True})
        while ack["type"] != "ack":
            assert ack["type"] in ("presence.state", "read.markers"), ack
            ack = await bob.receive()
        assert ack["ref"] == "s" and ack["room"] == "general" and ack["replayed"] == 0

        async def both(expect_type: str):
            """The next frame of that type on each socket: equal, field for field."""
            mine = await bob.receive()
            while mine["type"] != expect_type:
                mine = await bob.receive()
            theirs = await carol.receive_json_from(timeout=5)
            while theirs["type"] != expect_type:
                theirs = await carol.receive_json_from(timeout=5)
            assert mine == theirs
            return mine

        sent = await bob.call({"type": "message.send", "room": "general", "body": "héllo 🎉 @carol", "client_id": "pb-1",
                               "ref": 7})
        assert sent["type"] == "ack" and sent["ref"] == 7 and sent["room"] == "general"
        new = await both("message.new")
        assert (new["body"], new["author"], new["seq"], new["mentions"]) == ("héllo 🎉 @carol", "bob", sent["seq"], ["carol"])
        assert new["ts"].endswith("Z")
        edited = await bob.call({"type": "message.edit", "room": "general", "id": sent["id"], "body": "edited",
                                 "ref": "e"})
        assert edited["ref"] == "e"
        assert (await both("message.edited"))["body"] == "edited"
        reacted = await bob.call({"type": "reaction.add", "room": "general", "id": sent["id"], "emoji": "👍",
                                  "ref": "ra"})
        assert (reacted["type"], reacted["emoji"]) == ("ack", "👍")
        assert (await both("reaction.added"))["emoji"] == "👍"
        await bob.call({"type": "reaction.remove", "room": "general", "id": sent["id"], "emoji": "👍", "ref": "rr"})
        await both("reaction.removed")
        typing = await bob.call({"type": "typing", "room": "general", "ref": "t"})
        assert typing == {"type": "ack", "ref": "t", "room": "general", "sent": True}
        assert (await carol.receive_json_from(timeout=5))["type"] == "typing"
        read = await bob.call({"type": "read", "room": "general", "seq": sent["seq"], "ref": "r"})
        assert read == {"type": "ack", "ref": "r", "room": "general", "seq": sent["seq"]}
        page = await bob.call({"type": "presence.list", "room": "general", "ref": "p"})
        while page["type"] != "presence.page":
            page = await bob.receive()
        assert page["ref"] == "p" and "bob" in page["users"]
        assert await bob.call({"type": "ping", "t": 1.5, "ref": 9}) == {"type": "pong", "ref": 9, "t": 1.5}
        assert (await bob.call({"type": "metrics.subscribe", "ref": "m"}))["code"] == "forbidden"
        admin_ack = await admin.call({"type": "metrics.subscribe", "ref": "m"})
        assert admin_ack == {"type": "ack", "ref": "m", "metrics": True}
        tick = await admin.receive()
        while tick["type"] != "metrics.tick":
            tick = await admin.receive()
        assert tick["workers"] and tick["workers"][0]["connections"] >= 1
        assert await admin.call({"type": "metrics.unsubscribe", "ref": "mu"}) == {"type": "ack", "ref": "mu", "metrics": False}
        refused = await bob.call({"type": "auth.refresh", "token": "x.y.z", "ref": "a"})
        assert (refused["type"], refused["code"], refused["ref"]) == ("error", "invalid", "a")
        deleted = await bob.call({"type": "message.delete", "room": "general", "id": sent["id"], "ref": "d"})
        assert deleted["ref"] == "d"
        assert (await both("message.deleted"))["id"] == sent["id"]
        assert await bob.call({"type": "unsubscribe", "room": "general", "ref": "u"}) == \
            {"type": "ack", "ref": "u", "room": "general"}


@pytest.mark.parametrize("case", ["unparseable", "unknown field", "wrong wire type", "unknown frame type",
                                  "a server frame", "bad value"])
async def test_a_bad_protobuf_frame_gets_the_error_json_would_and_changes_nothing(cookies, demo, case):
    subscribe_env = proto._classes()()
    subscribe_env.message_send.room = "general"
    subscribe_env.message_send.body = "sneaky"
    subscribe_env.message_send.client_id = "pb-bad"
    subscribe_env.message_send.ref_number = 5
    inner = subscribe_env.message_send.SerializeToString()
    number = dict((name, n) for name, n, _ in proto.envelope_fields())["message_send"]

    def wrap(body: bytes, field: int = number) -> bytes:
        tag = (field << 3) | 2
        head = bytearray()
        while True:  # varint
            byte, tag = tag & 0x7F, tag >> 7
            head.append(byte | (0x80 if tag else 0))
            if not tag:
                break
        return bytes(head) + bytes([len(body)]) + body

    data, code, ref = {
        "unparseable": (b"\xff\xff\xff", "invalid", None),
        "unknown field": (wrap(inner + bytes([0x98, 0x06, 0x01])), "invalid", 5),  # field 99, a varint
        "wrong wire type": (wrap(inner + bytes([0x20, 0x05])), "invalid", 5),  # room (4) as a varint
        "unknown frame type": (wrap(b"", 999), "unknown_type", None),
        "a server frame": (wrap(b"", dict((n, f) for n, f, _ in proto.envelope_fields())["message_new"]),
                           "unknown_type", None),
        "bad value": (envelope({"type": "message.send", "room": "Not A Slug", "body": "x", "client_id": "pb-bad",
                                "ref": 5}), "invalid", 5),
    }[case]
    async with protobuf_socket(cookies["bob"]) as bob, json_socket(cookies["carol"]) as carol:
        await subscribe(carol, "general")
        await bob.send_raw(data)
        reply = await bob.receive()
        assert (reply["type"], reply["code"], reply.get("ref")) == ("error", code, ref)
        # The socket stays open and well: the next frame is answered.
        assert await bob.call({"type": "ping", "ref": 1}) == {"type": "pong", "ref": 1}
        # Nothing stored, nothing broadcast.
        assert not await Message.objects.filter(client_id="pb-bad").aexists()
        assert await call(carol, {"type": "ping", "ref": "q"}) == {"type": "pong", "ref": "q"}


async def test_an_event_is_encoded_once_per_worker_not_once_per_socket(cookies, demo, monkeypatch):
    calls = []
    real = PROTOBUF.event_payload

    def counted(message):
        calls.append(message.get("seq"))
        return real(message)

    monkeypatch.setattr(PROTOBUF, "event_payload", counted)
    async with protobuf_socket(cookies["bob"]) as bob, protobuf_socket(cookies["carol"]) as carol, \
            protobuf_socket(cookies["alice"]) as alice:
        for s in (bob, carol, alice):
            await s.send({"type": "subscribe", "room": "general", "ref": "s"})
            while (await s.receive())["type"] != "ack":
                pass
        ack = await alice.call({"type": "message.send", "room": "general", "body": "once", "client_id": "pb-once",
                                "ref": 1})
        for s in (bob, carol):
            got = await s.receive()
            assert (got["type"], got["seq"]) == ("message.new", ack["seq"])
    assert calls.count(ack["seq"]) == 1, calls


async def test_the_protobuf_frame_is_smaller_than_json():
    import datetime

    event = protocol.MessageNew(room="general", seq=12345, id=678, author="alice", body="hello there",
                                client_id="c-1", ts=datetime.datetime(2026, 12, 3, 7, 0, tzinfo=datetime.timezone.utc))
    sizes = {codec.name: len(codec.encode(event)) for codec in protocol.CODECS.values()}
    assert sizes["rt.v1.protobuf"] < sizes["rt.v1.msgpack"] < sizes["rt.v1.json"], sizes
    assert PROTOBUF.decode_any(PROTOBUF.encode(event)) == json.loads(protocol.JSON.encode(event))


async def test_an_empty_frame_holds_no_frame_type():
    with pytest.raises(protocol.ProtocolError) as caught:
        PROTOBUF.decode(b"")
    assert (caught.value.code, caught.value.message) == ("invalid", "a frame must hold one frame type")
