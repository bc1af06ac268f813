"""Property-based tests (hypothesis) of everything a client can put in a frame.

Properties:
- the codecs turn any input into a valid client frame or a ProtocolError, never
  another exception (JSON and MessagePack, text and bytes, any nesting);
- a socket answers any sequence of frames with exactly one reply each (an ack, a
  pong or an error with a documented code, never `internal`), stays open, and
  stores and broadcasts only what it acknowledged.
The raw-frame fuzz (opcodes, UTF-8, fragmentation, floods) is in
tests/cluster/test_hostile.py, against a real worker.
"""

from __future__ import annotations

import json

import msgpack
import pytest
from asgiref.sync import async_to_sync
from django.test import override_settings
from hypothesis import HealthCheck, example, given, settings as hsettings, strategies as st

from realtime import protocol
from realtime.models import Event, Message
from realtime.protocol import ErrorCode
from tests.conftest import socket, subscribe

FIELDS = ["type", "room", "body", "client_id", "id", "since", "ref", "t", "seq", "extra"]
TYPES = sorted(protocol.CLIENT_TYPES) + ["room.event", "session.check", "websocket.disconnect", "", "PING"]

def json_values(int_bits: int):
    scalars = st.one_of(
        st.none(), st.booleans(), st.integers(min_value=-(2**int_bits), max_value=2**int_bits - 1),
        st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30),
    )
    values = st.recursive(scalars, lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ), max_leaves=12)
    # Frames that look almost right: known types and field names, any values.
    near_frames = st.fixed_dictionaries(
        {"type": st.sampled_from(TYPES)},
        optional={name: st.one_of(values, st.sampled_from(["general", "ops", "nope", "x" * 200])) for name in FIELDS[1:]},
    )
    return st.one_of(values, near_frames)


any_json = json_values(70)  # past 64 bits too: JSON has no integer limit
any_msgpack = json_values(63)  # MessagePack stops at 64 bits


def json_text(value) -> str:
    return json.dumps(value, allow_nan=True)


def assert_frame_or_protocol_error(codec: protocol.Codec, data: bytes) -> None:
    try:
        frame = codec.decode(data)
    except protocol.ProtocolError as exc:
        assert exc.code in (ErrorCode.INVALID, ErrorCode.UNKNOWN_TYPE)
        assert exc.reply().code == exc.code
    else:
        assert type(frame) in protocol.CLIENT_FRAMES


@given(data=st.one_of(st.binary(max_size=300), st.text(max_size=300).map(str.encode), any_json.map(lambda v: json_text(v).encode())))
@hsettings(max_examples=400, deadline=None)
def test_the_json_codec_answers_anything_with_a_frame_or_a_protocol_error(data):
    assert_frame_or_protocol_error(protocol.JSON, data)


@given(data=st.one_of(st.binary(max_size=300), any_msgpack.map(lambda v: msgpack.packb(v, use_bin_type=True))))
@example(data=b"\xa4\x00\x00\x00\x80")  # a string of invalid UTF-8 (found by hypothesis)
@hsettings(max_examples=300, deadline=None)
def test_the_msgpack_codec_answers_anything_with_a_frame_or_a_protocol_error(data):
    assert_frame_or_protocol_error(protocol.MSGPACK, data)


@given(depth=st.integers(min_value=1, max_value=20_000), opener=st.sampled_from(["[", '{"a":']))
@hsettings(max_examples=40, deadline=None)
def test_any_nesting_depth_is_a_frame_error_not_a_crash(depth, opener):
    closer = "]" if opener == "[" else "}"
    with pytest.raises(protocol.ProtocolError):
        protocol.JSON.decode((opener * depth + "1" + closer * depth).encode())


PUSH_TYPES = {cls.__struct_config__.tag for cls in protocol.PUSHES}
REPLY_CODES = {code.value for code in ErrorCode} - {ErrorCode.INTERNAL.value, ErrorCode.RATE_LIMITED.value}
LIFTED = {action: (1e6, 1e6) for action in ("message.send", "message.edit", "message.delete", "subscribe",
                                              "unsubscribe", "ping", "invalid")}


@pytest.mark.django_db(transaction=True)
@given(frames=st.lists(any_json, min_size=1, max_size=8))
@hsettings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_a_socket_answers_every_frame_once_and_stores_only_what_it_acknowledged(cookies, settings, frames):
    settings.REALTIME = {**settings.REALTIME, "RATE_LIMITS": LIFTED}

    async def run():
        before_messages = await Message.objects.acount()
        before_events = await Event.objects.acount()
        acked_new = 0
        async with socket(cookies["alice"]) as alice, socket(cookies["bob"]) as bob:
            await subscribe(bob, "general", since=None)
            for value in frames:
                await alice.send_to(text_data=json_text(value))
                # Exactly one reply; a subscribe also replays events before its ack.
                while True:
                    reply = await alice.receive_json_from(timeout=5)
                    if reply["type"] in ("ack", "pong", "error", "presence.page"):
                        break
                    assert reply["type"] in ("message.new", "message.edited", "message.deleted", "reaction.added",
                                             "reaction.removed", "presence.state",
                                             "presence.diff", "read.markers", "read.marker", "read.state", "typing")
                if reply["type"] == "error":
                    assert reply["code"] in REPLY_CODES, reply
                elif reply["type"] == "ack" and value.get("type") in ("message.send", "message.edit", "message.delete",
                                                                       "reaction.add", "reaction.remove"):
                    acked_new += 1
                while not await alice.receive_nothing(timeout=0.01):
                    extra = await alice.receive_json_from()
                    assert extra["type"] in PUSH_TYPES, f"one reply per frame, got {extra}"
            # The socket outlived all of it.
            await alice.send_json_to({"type": "ping", "ref": "end"})
            assert await alice.receive_json_from(timeout=5) == {"type": "pong", "ref": "end"}
            # Bob saw exactly the events that alice's acks stand for (at most: a
            # repeated client_id is acknowledged again without a new event).
            seen = []
            while not await bob.receive_nothing(timeout=0.05):
                frame = await bob.receive_json_from()
                if "seq" in frame and frame["type"].startswith(("message.", "reaction.")):
                    seen.append(frame)
            new_events = await Event.objects.acount() - before_events
            assert len(seen) == new_events <= acked_new
            assert await Message.objects.acount() - before_messages <= acked_new

    with override_settings(REALTIME=settings.REALTIME):
        async_to_sync(run)()
