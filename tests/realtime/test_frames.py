"""The fan-out's prebuilt WebSocket frames (protocol.websocket_frame / framed),
read back with the websockets library's own frame parser."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest
from websockets.frames import Frame, Opcode
from websockets.streams import StreamReader

from realtime import broadcast, protocol


def parse(data: bytes) -> Frame:
    reader = StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    parser = Frame.parse(reader.read_exact, mask=False)
    with pytest.raises(StopIteration) as done:
        next(parser)
    assert reader.at_eof(), "bytes left after the frame"
    return done.value.value


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 200_000])
@pytest.mark.parametrize("binary", [False, True])
def test_every_length_encoding_reads_back(size, binary):
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    frame = parse(protocol.websocket_frame(payload, binary))
    assert frame.fin and frame.opcode == (Opcode.BINARY if binary else Opcode.TEXT)
    assert frame.data == payload


def test_a_room_event_is_framed_once_per_codec_and_kept_in_the_message():
    event = protocol.MessageNew(room="general", seq=3, id=9, author="bob", body="héllo", client_id="c",
                                ts=datetime(2026, 11, 26, tzinfo=timezone.utc))
    message = broadcast.layer_message(event)
    text = protocol.framed(message, protocol.JSON)
    assert protocol.framed(message, protocol.JSON) is text  # made once
    assert parse(text).data.decode() == message[protocol.JSON.name]
    binary = parse(protocol.framed(message, protocol.MSGPACK))
    assert binary.opcode == Opcode.BINARY
    assert binary.data == message[protocol.MSGPACK.name]
