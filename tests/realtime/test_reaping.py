"""Application instances reaped as they end (realtime/server/reaping.py): what
daphne's once-a-second walk over every connection did, done for the one
connection when its instance ends or its client goes. No checker runs in these
tests unless one says so: each outcome comes from the event itself."""

from __future__ import annotations

import asyncio
import logging

import pytest

from tests.realtime.test_open_socket import Peer, Transport

pytestmark = pytest.mark.asyncio


def with_app(app) -> Peer:
    """A Peer whose socket is served by `app` (set before the handshake)."""
    peer = Peer()
    peer.server.application = app
    return peer


async def handshake(peer: Peer) -> None:
    from tests.realtime.test_open_socket import HANDSHAKE

    peer.protocol.dataReceived(HANDSHAKE)
    for _ in range(200):
        if peer.protocol.state == peer.protocol.STATE_OPEN:
            return
        await asyncio.sleep(0.005)
    raise AssertionError("the socket did not open")


async def until(condition) -> None:
    for _ in range(400):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition not met")


async def test_an_application_that_fails_while_its_socket_is_open_closes_it_with_1011_at_once(caplog):
    async def app(scope, receive, send):
        await receive()
        await send({"type": "websocket.accept"})
        raise RuntimeError("boom")

    from tests.realtime.test_open_socket import HANDSHAKE

    peer = with_app(app)
    with caplog.at_level(logging.ERROR, logger="daphne.server"):
        peer.protocol.dataReceived(HANDSHAKE)
        # opened, then a close frame with 1011
        await until(lambda: peer.transport.value().endswith(b"\r\n\r\n\x88\x02\x03\xf3"))
    assert peer.transport.value().startswith(b"HTTP/1.1 101 ")
    assert [r.getMessage() for r in caplog.records if r.name == "daphne.server"] == [
        "Exception inside application: boom"]
    assert "application_instance" not in peer.server.connections[peer.protocol]


async def test_a_connection_is_forgotten_when_its_instance_ends_after_its_client_went():
    peer = Peer()
    await peer.open()
    assert peer.protocol in peer.server.connections
    peer.lose()
    await asyncio.wait_for(peer.ended.wait(), 5)
    await until(lambda: peer.protocol not in peer.server.connections)
    assert peer.server.closing == {}


async def test_a_connection_whose_instance_ended_first_is_forgotten_at_the_disconnect():
    async def app(scope, receive, send):
        await receive()
        await send({"type": "websocket.accept"})  # and returns, the socket left open

    peer = with_app(app)
    await handshake(peer)
    await until(lambda: "application_instance" not in peer.server.connections[peer.protocol])
    peer.lose()
    assert peer.protocol not in peer.server.connections


async def test_an_instance_still_running_past_the_close_timeout_is_cancelled(monkeypatch, caplog):
    from twisted.internet import reactor

    cancelled = asyncio.Event()

    async def app(scope, receive, send):
        await receive()
        await send({"type": "websocket.accept"})
        try:
            await asyncio.sleep(3600)  # deaf to the disconnect
        except asyncio.CancelledError:
            cancelled.set()
            raise

    peer = with_app(app)
    later = []  # the checker's next turns (taken, not scheduled)
    call_later = reactor.callLater

    def scheduled(delay, f, *args):
        if f == peer.server.application_checker:
            return later.append(delay)
        return call_later(delay, f, *args)

    monkeypatch.setattr(reactor, "callLater", scheduled)
    peer.server.application_close_timeout = 0.05
    await handshake(peer)
    peer.lose()
    assert list(peer.server.closing) == [peer.protocol]
    peer.server.application_checker()  # within the timeout: left running
    assert not cancelled.is_set() and later == [1]
    await asyncio.sleep(0.1)
    with caplog.at_level(logging.WARNING, logger="daphne.server"):
        peer.server.application_checker()
    await asyncio.wait_for(cancelled.wait(), 5)
    assert "took too long to shut down and was killed" in caplog.text
    await until(lambda: peer.protocol not in peer.server.connections)
    assert peer.server.closing == {}


async def test_the_shutdowns_cancel_skips_instances_already_reaped():
    async def app(scope, receive, send):
        await receive()
        await send({"type": "websocket.accept"})
        if scope["path"] == "/ends/":
            return
        await asyncio.sleep(3600)

    from tests.realtime.test_open_socket import HANDSHAKE

    peer = with_app(app)  # a socket whose instance ends at once
    peer.protocol.dataReceived(HANDSHAKE.replace(b"/ws/v1/", b"/ends/"))
    server = peer.server
    await until(lambda: peer.protocol in server.connections
                and "application_instance" not in server.connections[peer.protocol])
    # and a second socket of the same server, whose instance runs on
    other = server.ws_factory.buildProtocol(peer.transport.getPeer())
    other._raw_query_string = b""
    other.makeConnection(Transport(peerAddress=peer.transport.getPeer(), hostAddress=peer.transport.getHost()))
    other.dataReceived(HANDSHAKE)
    await until(lambda: other in server.connections and "application_instance" in server.connections[other])
    instance = server.connections[other]["application_instance"]
    # (daphne's own raised KeyError at the connection without an instance)
    assert server.kill_all_applications() is not None
    await asyncio.sleep(0)
    assert instance.cancelled()


async def test_an_http_requests_entry_goes_when_its_instance_ends_after_the_response():
    """The HTTP request's instance ends after its response has finished the
    request (a disconnect to the server): its done callback forgets it."""
    from tests.realtime.test_upgrade import Worker

    async def app(scope, receive, send):
        await receive()
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})
        await asyncio.sleep(0.05)  # still running when the request has finished

    class Patch:  # (Worker counts daphne's WebRequest.process through monkeypatch)
        @staticmethod
        def setattr(*args):
            pass

    worker = Worker(Patch, app=app)
    channel, transport = worker.connect()
    channel.dataReceived(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
    await until(lambda: transport.value().startswith(b"HTTP/1.1 204 "))
    assert len(worker.server.connections) == 1  # the request, its instance running
    await until(lambda: worker.server.connections == {})
    assert worker.server.closing == {}


async def test_a_refused_handshake_then_its_tcp_close_is_forgotten_once(caplog):
    """The refusal tells the server of a disconnect, the instance ends, and the
    TCP close tells it again: the second finds nothing and raises nothing."""
    async def app(scope, receive, send):
        await receive()
        await send({"type": "websocket.close"})  # before accept: a refusal (403)

    from tests.realtime.test_open_socket import HANDSHAKE

    peer = with_app(app)
    peer.protocol.dataReceived(HANDSHAKE)
    await until(lambda: peer.transport.value().startswith(b"HTTP/1.1 403 "))
    await until(lambda: peer.protocol not in peer.server.connections)
    peer.lose()  # (raised KeyError in daphne's protocol_disconnected)
    assert peer.protocol not in peer.server.connections
    assert "Traceback" not in caplog.text


async def test_the_entry_goes_even_when_answering_the_failure_fails(monkeypatch):
    async def app(scope, receive, send):
        await receive()
        await send({"type": "websocket.accept"})
        await receive()  # the disconnect
        raise RuntimeError("boom")

    peer = with_app(app)
    await handshake(peer)
    peer.lose()
    await until(lambda: peer.protocol not in peer.server.connections)

    async def failing_app(scope, receive, send):
        await receive()
        await send({"type": "websocket.accept"})
        raise RuntimeError("boom")

    def answer_fails(exception):
        raise ValueError("response already started")

    other = with_app(failing_app)
    monkeypatch.setattr(other.protocol, "handle_exception", answer_fails, raising=False)
    from tests.realtime.test_open_socket import HANDSHAKE

    other.protocol.dataReceived(HANDSHAKE)
    await until(lambda: other.protocol in other.server.connections
                and "application_instance" not in other.server.connections[other.protocol])
    other.lose()
    assert other.protocol not in other.server.connections


async def test_an_instance_that_swallows_the_cancel_is_cancelled_again_each_second(monkeypatch):
    from twisted.internet import reactor

    cancels = []

    async def app(scope, receive, send):
        await receive()
        await send({"type": "websocket.accept"})
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancels.append(1)  # swallowed, as asgiref's sync_to_async does
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancels.append(2)
            raise

    peer = with_app(app)
    call_later = reactor.callLater
    monkeypatch.setattr(reactor, "callLater", lambda delay, f, *a: None if f == peer.server.application_checker
                        else call_later(delay, f, *a))
    peer.server.application_close_timeout = 0
    await handshake(peer)
    peer.lose()
    peer.server.application_checker()
    await until(lambda: cancels == [1])
    assert list(peer.server.closing) == [peer.protocol]
    peer.server.application_checker()
    await until(lambda: peer.protocol not in peer.server.connections)
    assert cancels == [1, 2] and peer.server.closing == {}
