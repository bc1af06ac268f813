"""A WebSocket upgrade through the worker's HTTP factory (daphne's, guarded:
realtime/server/guard.py), over an in-memory transport: one that arrives whole
goes straight to the WebSocket protocol (upgrade_whole), anything else takes
Twisted's HTTP request and daphne's WebRequest as before, and both ways open the
same socket with the same scope, or answer the same 400."""

from __future__ import annotations

import asyncio

import pytest
from daphne.http_protocol import HTTPFactory, WebRequest
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from realtime.server import bounded, guard
from tests.realtime.test_open_socket import Transport, worker_server

pytestmark = pytest.mark.asyncio

HEAD = [b"GET /ws/v1/?codec=json&x=%C3%A9 HTTP/1.1", b"Host: localhost:8000", b"Upgrade: websocket",
        b"Connection: Upgrade", b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", b"Sec-WebSocket-Version: 13",
        b"Origin: http://localhost:8000", b"Sec-WebSocket-Protocol: rt.v1.json", b"Cookie: sessionid=abc; csrftoken=def",
        b"X-Under_Score: kept out of the scope", b"user-agent:   padded value\t"]


def head(lines=HEAD) -> bytes:
    return b"\r\n".join(lines) + b"\r\n\r\n"


class Worker:
    """A DrainingServer's two factories, as daphne's Server.run makes them and our
    launcher guards them; the application records each socket's scope, accepts
    with the first subprotocol offered, and waits for the disconnect (or is
    `app`)."""

    def __init__(self, monkeypatch, app=None):
        self.scopes: list[dict] = []
        self.processed = 0  # daphne WebRequest.process calls (the HTTP channel's way)

        async def socket_app(scope, receive, send):
            self.scopes.append(scope)
            await receive()
            await send({"type": "websocket.accept", "subprotocol": (scope["subprotocols"] or [None])[0]})
            while (await receive())["type"] != "websocket.disconnect":
                pass

        process = WebRequest.process

        def counted(request):
            self.processed += 1
            return process(request)

        monkeypatch.setattr(WebRequest, "process", counted)
        self.server = worker_server(app or socket_app)
        self.server.http_factory = HTTPFactory(self.server)
        guard.guard_http_factory(self.server.http_factory)
        self.counter = self.server.http_factory.pending

    def connect(self, host: str = "198.51.100.7") -> tuple[object, StringTransport]:
        address = IPv4Address("TCP", host, 40000)
        protocol = self.server.http_factory.buildProtocol(address)
        # (unregistering no producer is not an error, as on a TCP transport)
        transport = Transport(peerAddress=address, hostAddress=IPv4Address("TCP", "127.0.0.1", 8000))
        transport.protocol = protocol
        protocol.makeConnection(transport)
        return protocol, transport

    async def opened(self, transport: StringTransport) -> None:
        for _ in range(500):
            if transport.value().startswith(b"HTTP/1.1 101 "):
                return
            await asyncio.sleep(0.005)
        raise AssertionError(f"no 101: {transport.value()[:200]!r}")


async def test_a_whole_upgrade_opens_the_same_socket_as_one_cut_in_two(monkeypatch):
    worker = Worker(monkeypatch)
    whole_channel, whole = worker.connect()
    assert worker.counter.open == {"198.51.100.7": 1}
    whole_channel.dataReceived(head())
    await worker.opened(whole)
    assert worker.processed == 0  # no Twisted request, no daphne WebRequest
    assert isinstance(whole.protocol, bounded.BoundedWebSocketProtocol)
    assert whole.producer is None  # the HTTP channel let go
    assert worker.counter.open == {}  # no longer a pending HTTP connection

    cut_channel, cut = worker.connect()
    data = head()
    cut_channel.dataReceived(data[:40])
    cut_channel.dataReceived(data[40:])
    await worker.opened(cut)
    assert worker.processed == 1
    assert isinstance(cut.protocol, bounded.BoundedWebSocketProtocol)

    assert len(worker.scopes) == 2
    fast, slow = worker.scopes
    # each its own protocol as its writer; everything else equal
    assert fast["extensions"].pop("realtime.frames") is whole.protocol
    assert slow["extensions"].pop("realtime.frames") is cut.protocol
    assert fast == slow
    assert fast["query_string"] == b"codec=json&x=%C3%A9"
    assert fast["subprotocols"] == ["rt.v1.json"]
    assert (b"user-agent", b"padded value") in fast["headers"]
    # the handshake's answers, less the accept key's date-free same value: equal
    assert whole.value().split(b"\r\n\r\n")[0] == cut.value().split(b"\r\n\r\n")[0]


async def test_a_whole_upgrade_leaves_no_deadline_behind(monkeypatch, settings):
    from twisted.internet.task import Clock

    settings.REALTIME = {**settings.REALTIME, "HANDSHAKE_TIMEOUT": 0.05}
    worker = Worker(monkeypatch)
    clock = worker.server.http_factory.reactor = Clock()  # the channel's timers on a clock of the test's
    worker.server.http_factory.timeOut = 0.05  # Twisted's idle timeout as well, armed at the connection
    channel, transport = worker.connect()
    assert len(clock.getDelayedCalls()) == 2
    channel.dataReceived(head())
    await worker.opened(transport)
    clock.advance(1)  # past both: neither fires on the socket
    assert clock.getDelayedCalls() == [] and not transport.disconnecting


OPENED = (1, b"HTTP/1.1 101 ")  # daphne's WebRequest had it and opened the socket


@pytest.mark.parametrize("change, answer", [
    pytest.param(lambda lines: lines + [b"Cookie: second=1"], OPENED, id="a header given twice"),
    pytest.param(lambda lines: lines + [b"Content-Length: 0"], OPENED, id="a body length"),
    pytest.param(lambda lines: lines + [b"Transfer-Encoding: identity"], OPENED, id="a transfer encoding"),
    pytest.param(lambda lines: lines + [b"Expect: 100-continue"], (1, b"HTTP/1.1 100 "), id="an expectation"),
    pytest.param(lambda lines: lines[:9] + [b" folded onto the line before"] + lines[9:], OPENED, id="a folded header"),
    pytest.param(lambda lines: [lines[0].replace(b"HTTP/1.1", b"HTTP/1.0")] + lines[1:], OPENED, id="HTTP/1.0"),
    pytest.param(lambda lines: [b"GET  /ws/v1/ HTTP/1.1"] + lines[1:], (0, b"HTTP/1.1 400 "),
                 id="a request line of four parts"),
])
async def test_a_head_with_anything_unusual_takes_the_http_channels_way(monkeypatch, change, answer):
    worker = Worker(monkeypatch)
    channel, transport = worker.connect()
    channel.dataReceived(head(change(list(HEAD))))
    await asyncio.sleep(0.05)
    # as before the fast path: through daphne's WebRequest (100 Continue first
    # where asked), or refused by Twisted first
    assert (worker.processed, transport.value()[:13]) == answer


@pytest.mark.parametrize("lines", [
    pytest.param(HEAD + [b"X-Bad: a\x0bb"], id="a value daphne refuses"),
    pytest.param(HEAD + [b"X-Bad: a\x00b"], id="a value Twisted refuses"),
    pytest.param(HEAD + [b"X Bad: ab"], id="an invalid name"),
    pytest.param(HEAD + [b"No colon here"], id="a line without a colon"),
    pytest.param([b"GET /ws/\xc3\xa9/ HTTP/1.1"] + HEAD[1:], id="a target that is not ASCII"),
])
async def test_a_head_daphne_or_twisted_refuses_is_refused_as_before(monkeypatch, lines):
    worker = Worker(monkeypatch)
    channel, transport = worker.connect()
    channel.dataReceived(head(lines))
    await asyncio.sleep(0.05)
    assert transport.value().startswith(b"HTTP/1.1 400 ")
    assert worker.scopes == []


async def test_a_head_past_twisteds_bound_is_cut_off_as_before(monkeypatch):
    worker = Worker(monkeypatch)
    channel, transport = worker.connect()
    channel.dataReceived(head(HEAD + [b"X-Big: " + b"x" * guard.MOST_HEAD]))
    await asyncio.sleep(0.05)
    assert transport.disconnecting and worker.processed == 0 and worker.scopes == []


async def test_only_a_single_whole_get_upgrade_is_taken_at_once():
    assert guard.websocket_upgrade(head()) == b"/ws/v1/?codec=json&x=%C3%A9"
    assert guard.websocket_upgrade(head()[:-2]) is None  # not whole yet
    # a target with a control character in it (autobahn would split the line there)
    assert guard.websocket_upgrade(head([b"GET /ws/v1/\x0bX-In: 1 HTTP/1.1"] + HEAD[1:])) is None
    assert guard.websocket_upgrade(head() + b"\x81") is None  # something after it
    assert guard.websocket_upgrade(head([HEAD[0].replace(b"GET", b"POST")] + HEAD[1:])) is None
    assert guard.websocket_upgrade(head([h for h in HEAD if not h.startswith(b"Upgrade")])) is None
    assert guard.websocket_upgrade(head([b"Upgrade: h2c" if h.startswith(b"Upgrade") else h for h in HEAD])) is None
    assert guard.websocket_upgrade(head(HEAD + [b"X-%d: 1" % i for i in range(guard.MOST_HEADERS)])) is None
