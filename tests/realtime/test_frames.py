"""The fan-out's prebuilt WebSocket frames (protocol.websocket_frame / framed),
read back with the websockets library's own frame parser."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest
from websockets.frames import Frame, Opcode
from websockets.streams import StreamReader

from realtime import protocol
from realtime.delivery import publish as broadcast


def parse(data: bytes) -> Frame:
    reader = StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    parser = Frame.parse(reader.read_exact, mask=False)
    with pytest.raises(StopIteration) as done:
        next(parser)
    with pytest.raises(StopIteration) as ended:  # (at_eof is a generator-based coroutine)
        next(reader.at_eof())
    assert ended.value.value is True, "bytes left after the frame"
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


class Transport:
    """What the protocol writes, write by write (not a TCP transport: write_now
    hands it everything through write())."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))


def open_socket(**attributes):
    from types import SimpleNamespace

    from realtime.server.bounded import BoundedWebSocketProtocol

    socket = BoundedWebSocketProtocol.__new__(BoundedWebSocketProtocol)
    # (set one by one: most of these live in the protocol's slots, not its dict)
    for name, value in {"state": socket.STATE_OPEN, "transport": Transport(), "_perMessageCompress": None,
                        "send_state": socket.SEND_STATE_GROUND, "send_queue": [], "peer": "tcp:127.0.0.1:1",
                        "trafficStats": SimpleNamespace(outgoingOctetsWireLevel=0), "logOctets": False,
                        "client_addr": ["127.0.0.1", 1], **attributes}.items():
        setattr(socket, name, value)
    return socket


@pytest.mark.asyncio
async def test_frames_of_one_turn_go_out_in_one_write_before_anything_sent_after_them():
    import asyncio

    socket = open_socket()
    assert socket.write_frame(b"one") and socket.write_frame(b"two")
    assert socket.transport.writes == [], "written before the turn ended"
    await asyncio.sleep(0)
    assert socket.transport.writes == [b"onetwo"]
    socket.write_frame(b"three")
    socket.sendData(b"ack")  # a reply through ASGI in the same turn goes after it
    assert socket.transport.writes == [b"onetwo", b"three", b"ack"]
    await asyncio.sleep(0)
    assert socket.transport.writes == [b"onetwo", b"three", b"ack"]


@pytest.mark.asyncio
async def test_gathered_frames_count_against_the_send_bound():
    import asyncio

    closed = []
    socket = open_socket(max_send_buffer=10)
    socket.sendClose = lambda code: closed.append(code)
    assert socket.write_frame(b"x" * 8) and socket.write_frame(b"y" * 8)
    await asyncio.sleep(0)
    assert closed == [4013] and socket.overflowed
    # What fits goes, whole frames only, as frames sent one at a time would.
    assert socket.transport.writes == [b"x" * 8], "the bound did not hold"
    assert socket.write_frame(b"z")  # taken and dropped: the socket is closing
    await asyncio.sleep(0)
    assert socket.transport.writes == [b"x" * 8]


@pytest.mark.asyncio
async def test_a_replay_past_the_bound_is_cut_between_frames_then_closed():
    """A replay larger than the send bound (write_all) is not all-or-nothing: the
    frames that fit go, whole, then the close (4013), so the client resumes from
    the last of them; one that fits goes in one write with the turn's other frames."""
    import asyncio

    closed = []
    socket = open_socket(max_send_buffer=100)
    socket.sendClose = lambda code: closed.append(code)
    frames = [bytes([n]) * 30 for n in range(5)]  # 150 bytes
    assert socket.write_frame(b"ack") is True and socket.write_frames(frames) is True
    await asyncio.sleep(0)
    assert socket.transport.writes == [b"ack" + b"".join(frames[:3])] and closed == [4013]

    fitting = open_socket(max_send_buffer=1000)
    assert fitting.write_frames(frames) and fitting.write_frame(b"ack")
    await asyncio.sleep(0)
    assert fitting.transport.writes == [b"".join(frames) + b"ack"]


@pytest.mark.asyncio
async def test_nothing_follows_a_close_for_the_bound():
    """autobahn writing (a reply, a ping, its close frame) first writes what the
    socket gathered; if that passes the bound, the socket is closed with 4013 and
    what autobahn was writing does not follow it."""
    closed = []
    socket = open_socket(max_send_buffer=10)
    socket.sendClose = lambda code: closed.append(code)
    assert socket.write_frame(b"x" * 8) and socket.write_frame(b"y" * 8)
    socket.sendData(b"\x88\x02\x0f\xbd")  # a close frame (4029) in the same turn
    assert closed == [4013]
    assert socket.transport.writes == [b"x" * 8], "something was written after the bound's close"


@pytest.mark.asyncio
async def test_a_sweep_makes_no_container_per_socket():
    """A room event written to a thousand sockets in one turn, then flushed, makes
    no GC-tracked object per socket (bounded._corked holds a socket's one frame
    as bytes; the flush walks the turn's dict without a tuple a socket): such
    objects, alive until the turn ends, outlived the young collections of a big
    room's sweep and brought on the old generation's full collections, each a
    pause of every socket. Counted as the collector counts them (gc.get_count()),
    at the first and the last socket's write and after the flush."""
    import gc

    from realtime.server import bounded

    counts = []

    class Counting(Transport):
        def write(self, data: bytes) -> None:
            counts.append(gc.get_count()[0])
            super().write(data)

    sockets = [open_socket(transport=Counting()) for _ in range(1000)]
    frame = protocol.websocket_frame(b'{"type":"message.new"}', False)
    gc.collect()
    gc.disable()
    try:
        before = gc.get_count()[0]
        for socket in sockets:
            assert socket.write_frame(frame)
        gathered = gc.get_count()[0] - before
        bounded.flush_corked()
        flushed = gc.get_count()[0] - before
    finally:
        gc.enable()
    assert [socket.transport.writes for socket in sockets] == [[frame]] * 1000
    # (a handful, whatever the count of sockets: the turn's call_soon handle, the
    # next turn's dict, the frames of the calls)
    assert gathered <= 10, f"{gathered} tracked objects made for 1,000 sockets' frames"
    assert max(counts) - before <= 10 and flushed <= 10, f"the flush made {max(counts) - before}"


@pytest.mark.asyncio
async def test_a_frame_gathered_alone_counts_against_the_send_bound():
    """One frame gathered (held as bytes) counts against the bound when autobahn
    sends through serverSend in the same turn: past it, the socket closes with
    4013 and what was sent does not go."""
    closed, sent = [], []
    socket = open_socket(max_send_buffer=10)
    socket.sendClose = lambda code: closed.append(code)
    # (what daphne's serverSend hands on, had the bound let it through)
    socket.sendMessage = lambda payload, binary=False: sent.append(payload)
    assert socket.write_frame(b"x" * 12)
    socket.serverSend("y" * 4)
    assert closed == [4013] and socket.overflowed
    assert sent == [] and socket.transport.writes == []


def test_autobahns_plain_writes_go_out_at_once_and_are_counted():
    """sendData's plain case (the handshake's response, a reply through ASGI, a
    ping, the close frame) is in the kernel when sendData returns on a real TCP
    socket, with nothing left queued for the reactor's next turn, and counted as
    autobahn counts it: on the wire once open, as pre-open traffic before."""
    import socket as sockets
    from types import SimpleNamespace

    from twisted.internet import tcp

    left, right = sockets.socketpair()
    left.setblocking(False)
    right.settimeout(5)
    try:
        connection = tcp.Connection(left, None)
        connection.connected = 1
        socket = open_socket(transport=connection, trafficStats=SimpleNamespace(
            outgoingOctetsWireLevel=0, preopenOutgoingOctetsWireLevel=0))
        socket.state = socket.STATE_CONNECTING
        socket.sendData(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")
        socket.state = socket.STATE_OPEN
        socket.sendData(b"\x81\x02hi")
        assert connection.dataBuffer == b"" and not connection._tempDataLen, "left queued for the next turn"
        expected = b"HTTP/1.1 101 Switching Protocols\r\n\r\n\x81\x02hi"
        got = b""
        while len(got) < len(expected):
            got += right.recv(100)
        assert got == expected
        assert socket.trafficStats.preopenOutgoingOctetsWireLevel == 36
        assert socket.trafficStats.outgoingOctetsWireLevel == 4
    finally:
        left.close()
        right.close()


@pytest.mark.asyncio
async def test_a_turns_frames_on_a_real_tcp_socket_go_out_in_one_send_within_the_bound():
    """On a plain TCP transport with nothing unsent, a turn's frames are sent at
    once (adapter.send_at_once: the socket's send(), no queue for the next turn)
    when they fit the send bound; when they do not, the same cut as anywhere:
    the whole frames that fit, then the close (4013). What the kernel does not
    take stays queued in the transport, in order."""
    import asyncio
    import socket as sockets

    from twisted.internet import tcp

    def pair(bound: int):
        left, right = sockets.socketpair()
        left.setblocking(False)
        right.settimeout(5)
        connection = tcp.Connection(left, None)
        connection.connected = 1
        closed = []
        socket = open_socket(transport=connection, max_send_buffer=bound)
        socket.sendClose = lambda code: closed.append(code)
        return socket, left, right, closed

    def received(right, size: int) -> bytes:
        got = b""
        while len(got) < size:
            got += right.recv(size - len(got))
        return got

    socket, left, right, closed = pair(100)
    try:
        assert socket.write_frame(b"a" * 30) and socket.write_frame(b"b" * 30)
        await asyncio.sleep(0)
        assert socket.transport.dataBuffer == b"" and not socket.transport._tempDataLen
        assert received(right, 60) == b"a" * 30 + b"b" * 30 and closed == []
        # Past the bound with nothing unsent: cut between whole frames, then 4013.
        assert socket.write_frame(b"c" * 60) and socket.write_frame(b"d" * 60)
        await asyncio.sleep(0)
        assert closed == [4013] and socket.overflowed
        assert received(right, 60) == b"c" * 60
        right.setblocking(False)
        with pytest.raises(BlockingIOError):
            right.recv(1)  # nothing of the frame past the bound
    finally:
        left.close()
        right.close()

    socket, left, right, closed = pair(1 << 24)
    left.setsockopt(sockets.SOL_SOCKET, sockets.SO_SNDBUF, 4096)
    try:
        big = bytes(range(256)) * 4096  # 1 MiB: more than the kernel takes at once
        assert socket.write_frame(big)
        await asyncio.sleep(0)
        unsent = len(socket.transport.dataBuffer) + socket.transport._tempDataLen
        assert 0 < unsent < len(big), "the kernel took all of it: the test shows nothing"
        socket.transport.stopWriting()
        sent = len(big) - unsent
        queued = bytes(socket.transport.dataBuffer) + b"".join(socket.transport._tempDataBuffer)
        assert queued == big[sent:]
        assert received(right, sent) == big[:sent]
    finally:
        left.close()
        right.close()


@pytest.mark.parametrize("error", [BlockingIOError, ConnectionResetError, BrokenPipeError])
def test_a_send_that_fails_at_once_leaves_the_whole_frame_to_the_transport(error):
    """adapter.send_at_once: a socket whose buffer is full (EAGAIN) or whose peer is
    gone (ECONNRESET, EPIPE) has the whole frame queued by Twisted's write, which
    sends it later or finds the connection lost, as writeSomeData's callers did."""
    import socket as sockets

    from twisted.internet import tcp

    from realtime.server import adapter

    left, right = sockets.socketpair()
    try:
        connection = tcp.Connection(left, None)
        connection.connected = 1
        written = []
        connection.write = written.append

        class Failing:
            def send(self, data):
                raise error()

        connection.socket = Failing()
        assert adapter.send_at_once(connection, b"frame") is True
        assert written == [b"frame"]
    finally:
        left.close()
        right.close()


def test_one_sockets_failed_write_does_not_cost_the_others_their_turn(caplog):
    """flush_corked: a socket whose write raises is dropped (its client resumes by
    seq); the sockets after it in the turn still get their frames."""
    from realtime.server import bounded

    written, aborted = [], []

    class Transport:
        def abortConnection(self):
            aborted.append(True)

    class Socket:
        transport = Transport()

        def __init__(self, name, fails=False):
            self.name, self.fails = name, fails

        def write_gathered(self, frames):
            if self.fails:
                raise RuntimeError("boom")
            written.append((self.name, frames))

    bounded._corked.update({Socket("a"): [b"1"], Socket("b", fails=True): [b"2"], Socket("c"): [b"3"]})
    bounded.flush_corked()
    assert written == [("a", [b"1"]), ("c", [b"3"])] and aborted == [True]
    assert bounded._corked == {}
    assert "writing a socket's frames failed" in caplog.text
