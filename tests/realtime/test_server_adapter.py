"""Every private attribute of daphne, autobahn and Twisted that our server touches
(realtime/server/adapter.py names them) is still there: on a class, or assigned to
instances by the class's own code. An upgrade that moves one fails here."""

from __future__ import annotations

import importlib
import inspect
import re

import pytest

from realtime.server import adapter


def resolve(where: str):
    module, _, name = where.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return importlib.import_module(where)


def assigned_by(owner, attribute: str) -> bool:
    """Whether `owner` (a class: any in its MRO) or module assigns self.<attribute>."""
    classes = inspect.getmro(owner) if inspect.isclass(owner) else (owner,)
    pattern = re.compile(rf"self\.{re.escape(attribute)}\s*(?:\[.*?\])?\s*[:=]")
    for cls in classes:
        try:
            source = inspect.getsource(inspect.getmodule(cls))
        except (TypeError, OSError):
            continue
        if pattern.search(source):
            return True
    return False


@pytest.mark.parametrize("where, attribute", adapter.PRIVATE, ids=[f"{w}.{a}" for w, a in adapter.PRIVATE])
def test_each_private_attribute_is_where_the_adapter_expects_it(where, attribute):
    owner = resolve(where)
    assert hasattr(owner, attribute) or assigned_by(owner, attribute), (
        f"{where}.{attribute} is gone: realtime/server/adapter.py and what uses it need a look")


def test_the_accessors_read_real_objects():
    import asyncio
    import socket

    from twisted.internet import tcp
    from twisted.web import http

    left, right = socket.socketpair()
    try:
        connection = tcp.Connection(left, None)
        assert adapter.unsent_bytes(connection) == 0
    finally:
        left.close()
        right.close()
    queue = asyncio.Queue()
    queue.put_nowait({"type": "websocket.receive", "text": "x"})
    assert list(adapter.waiting(queue)) == [{"type": "websocket.receive", "text": "x"}]
    channel = http.HTTPChannel()
    assert adapter.handling_request(channel) is False
    assert adapter.http_channel_protocol(channel)._channel is channel


def test_autobahns_per_connection_debug_text_is_made_only_when_rendered():
    import pprint

    from autobahn.websocket import protocol as autobahn_protocol

    import realtime.server.bounded  # noqa: F401  (what the worker imports)

    settings = [("autoPingInterval", 0), ("maxMessagePayloadSize", 65536, "WebSocketServerFactory")]
    deferred = autobahn_protocol.pformat(settings)
    assert isinstance(deferred, adapter._Formatted)  # nothing formatted yet
    assert f"{deferred}" == str(deferred) == pprint.pformat(settings)  # as before, once rendered


def test_autobahns_highlighted_debug_arguments_are_made_only_when_rendered():
    """hltype and hlval run at every read of every socket (autobahn's dataReceived
    debug line), logged or not."""
    from autobahn import util
    from autobahn.twisted import websocket as autobahn_twisted
    from autobahn.websocket import protocol as autobahn_protocol

    import realtime.server.bounded  # noqa: F401  (what the worker imports)

    for module in (autobahn_protocol, autobahn_twisted):
        name = module.hltype(autobahn_twisted.WebSocketServerProtocol.dataReceived)
        value = module.hlval(42, color="blue")
        assert isinstance(name, adapter._Formatted) and isinstance(value, adapter._Formatted)
        assert f"{name}" == util.hltype(autobahn_twisted.WebSocketServerProtocol.dataReceived)
        assert str(value) == util.hlval(42, color="blue")


def test_sockets_hash_by_identity_in_c():
    """daphne's WebSocketProtocol hashes with hash(id(self)), a Python call whose
    values keep the pointer's zero low bits: a dict keyed by thousands of sockets
    (a turn's gathered frames, the server's connections) then probes far more. Ours
    hash as object does: the same identity, in C."""
    from daphne.ws_protocol import WebSocketProtocol

    from realtime.server.bounded import BoundedWebSocketProtocol

    assert WebSocketProtocol.__hash__ is not object.__hash__  # what this works around
    assert BoundedWebSocketProtocol.__hash__ is object.__hash__
    assert BoundedWebSocketProtocol.__eq__ is object.__eq__
    a, b = BoundedWebSocketProtocol(), BoundedWebSocketProtocol()
    assert a == a and a != b and len({a, b, a}) == 2


def test_a_read_formats_no_debug_line_unless_autobahn_logs_debug(monkeypatch):
    import txaio
    from autobahn.twisted import websocket as autobahn_twisted

    from realtime.server.bounded import BoundedWebSocketProtocol

    formatted, handled = [], []
    monkeypatch.setattr(autobahn_twisted, "hltype", lambda f: formatted.append(f) or "name")
    proto = BoundedWebSocketProtocol()
    proto._dataReceived = handled.append
    proto.peer = "tcp:127.0.0.1:1"
    proto.dataReceived(b"x")
    assert handled == [b"x"] and formatted == []
    proto.log = txaio.make_logger()
    proto.log.set_log_level("debug")
    assert adapter.logs_debug(proto.log) is True
    proto.dataReceived(b"y")
    assert handled == [b"x", b"y"] and len(formatted) == 1  # autobahn's own, line and all


def test_autobahns_read_is_its_debug_line_and_then_the_frames():
    """BoundedWebSocketProtocol.dataReceived stands in for autobahn's Twisted
    adapter's: a debug line, then _dataReceived. If an upgrade makes it do more,
    this fails, and the override must do that too."""
    from autobahn.twisted.websocket import WebSocketAdapterProtocol

    assert set(WebSocketAdapterProtocol.dataReceived.__code__.co_names) == {
        "log", "debug", "hltype", "dataReceived", "hlval", "peer", "len", "_dataReceived"}


def test_the_reactor_calls_a_sockets_reads_directly_and_still_drops_one_that_raises(monkeypatch):
    """adapter.direct_reads_and_writes: Twisted's asyncio reactor calls a socket's
    doRead without callWithLogger's log context (its logPrefix not asked, no
    "system" set around the read); a read that raises is still caught by the
    reactor's own _readOrWrite (which logs it to Twisted's log) and its
    connection dropped."""
    import asyncio
    import socket

    from twisted.internet import abstract, asyncioreactor
    from twisted.python import context

    monkeypatch.setattr(asyncioreactor, "callWithLogger", asyncioreactor.callWithLogger)  # (put back after)
    adapter.direct_reads_and_writes()
    loop = asyncio.new_event_loop()
    reactor = asyncioreactor.AsyncioSelectorReactor(loop)
    ours, theirs = socket.socketpair()
    seen, lost = [], []

    class Reader(abstract.FileDescriptor):
        def fileno(self):
            return ours.fileno()

        def logPrefix(self):
            seen.append("asked for its log prefix")
            return "reader"

        def doRead(self):
            data = ours.recv(16)
            seen.append((data, context.get("system")))
            if data == b"boom":
                raise ValueError("a read that fails")

        def connectionLost(self, reason):
            lost.append(reason.type)
            loop.stop()

    try:
        reader = Reader(reactor)
        reactor.addReader(reader)
        theirs.send(b"hi")
        loop.call_later(0.2, theirs.send, b"boom")
        loop.call_later(5, loop.stop)
        loop.run_forever()
    finally:
        ours.close()
        theirs.close()
        loop.close()
    assert seen == [(b"hi", None), (b"boom", None)]
    assert lost == [ValueError]
