"""An open socket's protocol object, as the worker builds it: a real handshake
through daphne's WebSocket factory and our launcher (over an in-memory transport),
then frames, a keepalive ping and a close. What it keeps for its life is in slots;
its instance dict stays empty (server/bounded.py, docs/decisions.md: an idle
socket's memory)."""

from __future__ import annotations

import asyncio
import os
import struct
import sys

import pytest
from daphne.ws_protocol import WebSocketFactory
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from realtime.server import bounded, launcher

pytestmark = pytest.mark.asyncio

HANDSHAKE = (b"GET /ws/v1/ HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
             b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")


class Transport(StringTransport):
    def unregisterProducer(self):  # (autobahn's close unregisters; none was registered here)
        self.producer = None


def masked(opcode: int, payload: bytes) -> bytes:
    """A client's frame (masked, as a browser sends it), payload under 126 bytes."""
    key = os.urandom(4)
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def worker_server(app) -> launcher.DrainingServer:
    """A DrainingServer that is not listening, with daphne's WebSocket factory
    made as daphne's Server.run makes it and our launcher sets it up."""
    server = launcher.DrainingServer(application=app, endpoints=["tcp:port=0:interface=127.0.0.1"])
    server.connections = {}
    factory = WebSocketFactory(server, server="test")
    factory.setProtocolOptions(failByDrop=False)
    factory.protocol = bounded.with_options_of(factory)
    server.ws_factory = factory
    return server


class Peer:
    """One socket on a DrainingServer that is not listening: the application
    accepts, records what it receives, and ends at the disconnect."""

    def __init__(self, before_open=None):
        self.received: list[dict] = []
        self.accepted = asyncio.Event()
        self.ended = asyncio.Event()

        async def app(scope, receive, send):
            self.scope, self.send = scope, send
            await receive()
            await send({"type": "websocket.accept"})
            self.accepted.set()
            while True:
                message = await receive()
                self.received.append(message)
                if message["type"] == "websocket.disconnect":
                    self.ended.set()
                    return

        self.server = worker_server(app)
        factory = self.server.ws_factory
        address = IPv4Address("TCP", "127.0.0.1", 40000)
        self.protocol = factory.buildProtocol(address)
        self.transport = Transport(peerAddress=address, hostAddress=IPv4Address("TCP", "127.0.0.1", 8000))
        self.protocol._raw_query_string = b""  # (daphne's HTTP upgrade sets it)
        self.protocol.makeConnection(self.transport)
        if before_open is not None:
            before_open(self.protocol)

    async def open(self) -> None:
        self.protocol.dataReceived(HANDSHAKE)
        await asyncio.wait_for(self.accepted.wait(), 5)
        assert self.protocol.state == self.protocol.STATE_OPEN
        assert self.transport.value().startswith(b"HTTP/1.1 101 ")

    async def handled(self, count: int) -> None:
        while len(self.received) < count:
            await asyncio.sleep(0)

    def lose(self) -> None:
        self.protocol.connectionLost(Failure(ConnectionDone()))


async def test_an_open_socket_keeps_nothing_in_its_dict_through_frames_and_pings():
    """Everything an open socket keeps, and what autobahn sets at every frame and
    ping, lives in the protocol's slots: its dict is empty, at the size of an
    empty dict, after the handshake, a message, a ping and its pong."""
    peer = Peer()
    await peer.open()
    empty = sys.getsizeof({})
    proto = peer.protocol
    assert (proto.__dict__, sys.getsizeof(proto.__dict__)) == ({}, empty)
    # autobahn's queue of chopped and synchronous sends: an empty list, not an
    # empty deque's 64-slot block (760 B)
    assert type(proto.send_queue) is bounded.SendQueue and len(proto.send_queue) == 0

    proto.dataReceived(masked(1, b"hello"))
    await peer.handled(1)
    assert peer.received == [{"type": "websocket.receive", "text": "hello"}]
    proto._sendAutoPing()
    assert proto.autoPingPending is not None
    proto.dataReceived(masked(10, proto.autoPingPending))
    assert proto.autoPingPending is None
    assert (proto.__dict__, sys.getsizeof(proto.__dict__)) == ({}, empty)


async def test_a_frames_unmasker_is_let_go_between_frames_only():
    peer = Peer()
    await peer.open()
    proto = peer.protocol
    frame = masked(1, b"hello there")
    proto.dataReceived(frame[:9])  # (the header, its mask and a part of the payload)
    assert proto.current_frame is not None and proto.current_frame_masker is not None
    proto.dataReceived(frame[9:])
    await peer.handled(1)
    assert peer.received == [{"type": "websocket.receive", "text": "hello there"}]
    assert proto.current_frame is None and proto.current_frame_masker is None


async def test_the_sockets_of_a_worker_count_their_traffic_together():
    one, two = Peer(), Peer()
    await one.open()
    await two.open()
    assert one.protocol.trafficStats is two.protocol.trafficStats is bounded.WORKER_TRAFFIC
    before = bounded.WORKER_TRAFFIC.outgoingOctetsWireLevel
    one.protocol.sendMessage(b"12345")
    two.protocol.sendMessage(b"1234567")
    assert bounded.WORKER_TRAFFIC.outgoingOctetsWireLevel - before == (2 + 5) + (2 + 7)


async def test_is_open_and_is_closed_are_let_go_once_open_and_made_again_when_read():
    peer = Peer()
    await peer.open()
    proto = peer.protocol
    assert proto._is_open is None and proto._is_closed is None
    assert proto.is_open.called  # open: resolved
    closed = []
    proto.is_closed.addCallback(closed.append)
    assert proto._is_closed is not None and not proto.is_closed.called
    proto.dataReceived(masked(8, struct.pack("!H", 1000)))
    peer.lose()
    await asyncio.wait_for(peer.ended.wait(), 5)
    assert closed == [proto] and proto.state == proto.STATE_CLOSED


async def test_a_future_listened_to_before_the_open_is_kept():
    fired = []
    peer = Peer(before_open=lambda proto: proto.is_closed.addCallback(fired.append))
    await peer.open()
    kept = peer.protocol._is_closed
    assert kept is not None and peer.protocol._is_open is None
    peer.lose()
    await asyncio.wait_for(peer.ended.wait(), 5)
    assert fired == [peer.protocol]
    # Read after the close, it is resolved with the socket (the one resolved at
    # the close is let go: test_a_closed_socket_is_freed_at_once_...).
    later = []
    peer.protocol.is_closed.addCallback(later.append)
    assert later == [peer.protocol]


async def test_the_apps_send_is_the_protocols_own_and_goes_nowhere_once_disconnected():
    peer = Peer()
    await peer.open()
    proto = peer.protocol
    assert peer.scope["extensions"]["realtime.frames"] is proto and peer.send == proto.asgi_send
    await proto.asgi_send({"type": "websocket.send", "text": "one"})
    sent = peer.transport.value()
    assert sent.endswith(b"\x81\x03one")
    peer.lose()
    await asyncio.wait_for(peer.ended.wait(), 5)
    await proto.asgi_send({"type": "websocket.send", "text": "two"})
    assert peer.transport.value() == sent



async def test_no_application_queue_is_made_up_before_daphne_has_one():
    """daphne's onClose tells the application of a close only when it has a
    queue (hasattr): a slot preset to None would make it put to None."""
    peer = Peer()
    assert not hasattr(peer.protocol, "application_queue")
    await peer.open()
    assert peer.protocol.application_queue is not None


async def test_a_closed_socket_is_freed_at_once_not_by_the_collector():
    """At the close autobahn resolves is_closed with the socket itself: the socket
    held that Deferred and the Deferred held the socket, a cycle that only a full
    collection freed, with all the socket still held (about 2 KiB a socket,
    thousands after a drain's or a deploy's closes). Once its application has
    ended, a closed socket is freed by its last reference going, the collector
    kept out of it."""
    import gc
    import weakref

    peer = Peer()
    await peer.open()
    peer.lose()
    await asyncio.wait_for(peer.ended.wait(), 5)
    for _ in range(3):
        await asyncio.sleep(0)  # (the application's task ends, its callbacks run)
    assert peer.protocol not in peer.server.connections
    gone = weakref.ref(peer.protocol)
    gc.disable()
    try:
        # (what this test's application kept: its scope and send)
        peer.protocol = peer.scope = peer.send = None
        assert gone() is None, [type(r).__name__ for r in gc.get_referrers(gone())]
    finally:
        gc.enable()
