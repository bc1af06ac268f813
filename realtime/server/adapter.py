"""Every private attribute of daphne, autobahn and Twisted this server touches, in
one place: what each is for, and the accessors the rest of server/ uses.
tests/realtime/test_server_adapter.py checks that each is still where this module
expects it, so that an upgrade that moves one fails loudly there, not quietly in
production (requirements.txt pins all three).
"""

from __future__ import annotations

from twisted.internet import tcp
from twisted.web import http as twisted_http

# (where, attribute): what this package reads or writes that is not public API.
PRIVATE = (
    # Twisted's TCP transport: unsent bytes (back-pressure), whether a write can go
    # out at once, and its socket, to send it on (send_at_once).
    ("twisted.internet.tcp.Connection", "dataBuffer"),
    ("twisted.internet.tcp.Connection", "offset"),
    ("twisted.internet.tcp.Connection", "_tempDataLen"),
    ("twisted.internet.tcp.Connection", "_writeDisconnected"),
    ("twisted.internet.tcp.Connection", "socket"),
    # Twisted's HTTP channel: a request being handled (set for an upgrade handed
    # on whole, hold_request); the channel left registered as a producer after
    # an upgrade (let go, server/guard.py).
    ("twisted.web.http.HTTPChannel", "_handlingRequest"),
    ("twisted.web.http.HTTPChannel", "_requestProducer"),
    ("twisted.web.http", "_GenericHTTPChannelProtocol"),
    # TLS wraps the producer in a membrane.
    ("twisted.protocols.tls.TLSMemoryBIOProtocol", "_producer"),
    # The application's queue of received messages (asyncio.Queue's, and ours).
    ("asyncio.Queue", "_queue"),
    # autobahn's WebSocket protocol: what a prebuilt frame may bypass; the instance
    # dict an open socket sheds (server/bounded.py).
    ("autobahn.websocket.protocol.WebSocketProtocol", "send_state"),
    ("autobahn.websocket.protocol.WebSocketProtocol", "SEND_STATE_GROUND"),
    ("autobahn.websocket.protocol.WebSocketProtocol", "send_queue"),
    ("autobahn.websocket.protocol.WebSocketProtocol", "_perMessageCompress"),
    # sendData's plain case, which BoundedWebSocketProtocol.sendData does itself
    # (the traffic it counts).
    ("autobahn.websocket.protocol.WebSocketProtocol", "trafficStats"),
    ("autobahn.websocket.protocol.WebSocketProtocol", "CONFIG_ATTRS"),
    # autobahn's module-level pformat, hltype and hlval: they format a debug
    # line's arguments at every connection and read, logged or not
    # (defer_debug_formatting).
    ("autobahn.websocket.protocol", "pformat"),
    ("autobahn.websocket.protocol", "hltype"),
    ("autobahn.websocket.protocol", "hlval"),
    ("autobahn.twisted.websocket", "hltype"),
    ("autobahn.twisted.websocket", "hlval"),
    # What autobahn's dataReceived hands a read to, past its debug line
    # (BoundedWebSocketProtocol.dataReceived).
    ("autobahn.websocket.protocol.WebSocketProtocol", "_dataReceived"),
    # What Twisted's asyncio reactor wraps every read and write of a socket in
    # (direct_reads_and_writes).
    ("twisted.internet.asyncioreactor", "callWithLogger"),
    ("twisted.internet.asyncioreactor.AsyncioSelectorReactor", "_readOrWrite"),
    # txaio's stand-in for a log method below the level (logs_debug).
    ("txaio.tx", "_no_op"),
    # A Twisted Deferred's callbacks: whether anything waits on autobahn's
    # is_open and is_closed (listened).
    ("twisted.internet.defer.Deferred", "_callbacks"),
    # daphne's Server: its connections, the factories, making an application.
    ("daphne.server.Server", "connections"),
    ("daphne.server.Server", "http_factory"),
    ("daphne.server.Server", "ws_factory"),
    ("daphne.server.Server", "create_application"),
    ("daphne.server.Server", "handle_reply"),
    ("daphne.server.Server", "listen_success"),
    # Its reaping of application instances (server/reaping.py): the checker it
    # calls each second, the disconnect it is told of, the shutdown's cancel, and
    # the timeout an instance has once its client went.
    ("daphne.server.Server", "application_checker"),
    ("daphne.server.Server", "protocol_disconnected"),
    ("daphne.server.Server", "kill_all_applications"),
    ("daphne.server.Server", "application_close_timeout"),
    # daphne's WebSocket protocol: the handshake's deferred (a denial response).
    ("daphne.ws_protocol.WebSocketProtocol", "handshake_deferred"),
    ("daphne.ws_protocol.WebSocketProtocol", "application_queue"),
)


class _Formatted:
    """format(value), made only when a log observer renders it (pprint.pformat by
    default)."""

    __slots__ = ("value", "format")

    def __init__(self, value, format=None):
        self.value = value
        self.format = format

    def __str__(self) -> str:
        if self.format is None:
            import pprint

            return pprint.pformat(self.value)
        return self.format(self.value)

    __repr__ = __str__


def _deferred(format):
    def defer(value, *args, **kwargs):
        if args or kwargs:
            return _Formatted(value, lambda v: format(v, *args, **kwargs))
        return _Formatted(value, format)

    return defer


def listened(deferred) -> bool:
    """Whether anything waits on a Twisted Deferred (callbacks added)."""
    return deferred is not None and bool(deferred._callbacks)


def logs_debug(logger) -> bool:
    """Whether a txaio logger (autobahn's) writes debug lines: txaio puts a no-op
    in place of each method below the level."""
    from txaio import tx

    return logger.debug is not tx._no_op


def defer_debug_formatting() -> None:
    """autobahn formats the arguments of its debug lines whether anything logs
    debug or not: its settings at every connection (pprint, 4% of the event loop in
    a connect storm), and a highlighted name and values (hltype, hlval: an
    inspection, a split and a join, ANSI colours where click is installed) at
    every connection and every read of every socket, the sender's frames
    included. Format them only when a line is rendered."""
    from autobahn import util
    from autobahn.twisted import websocket as autobahn_twisted
    from autobahn.websocket import protocol as autobahn_protocol

    autobahn_protocol.pformat = _Formatted
    for module in (autobahn_protocol, autobahn_twisted):
        module.hltype = _deferred(util.hltype)
        module.hlval = _deferred(util.hlval)


def unsent_bytes(transport) -> int:
    """Bytes a Twisted transport holds that the peer has not taken yet (looking
    through a TLS wrapper to the TCP transport)."""
    for _ in range(4):
        if transport is None or hasattr(transport, "dataBuffer"):
            break
        transport = getattr(transport, "transport", None)
    if transport is None:
        return 0
    return len(transport.dataBuffer) - getattr(transport, "offset", 0) + getattr(transport, "_tempDataLen", 0)


def write_now(transport, data: bytes) -> None:
    """transport.write(data), but sent at once when nothing is queued ahead of it on
    a plain TCP socket: Twisted would queue it and register the socket with the
    poller for one send() on the next turn, two poller changes per frame, which
    was most of a fan-out's cost. What the kernel does not take is queued as usual."""
    if not send_at_once(transport, data):
        transport.write(data)


def send_at_once(transport, data: bytes) -> bool:
    """write_now where it sends at once: a plain TCP transport with nothing unsent
    (unsent_bytes() is 0) and open. The socket's send() is called directly (what
    Twisted's writeSomeData does, without its two Python calls: one per socket
    of a fan-out); what the kernel does not take, or anything when the send
    fails, goes to transport.write, which queues it or finds the connection lost
    as before. False: not such a transport now, nothing written."""
    if not (
        isinstance(transport, tcp.Connection) and not transport.TLS and transport.connected
        and not transport.disconnecting and not transport._writeDisconnected
        and not transport._tempDataLen and len(transport.dataBuffer) == transport.offset
    ):
        return False
    try:
        sent = transport.socket.send(data)
    except OSError:  # EWOULDBLOCK, ENOBUFS; a connection lost is found by the write below
        sent = 0
    if sent < len(data):
        transport.write(data[sent:] if sent else data)
    return True


def waiting(queue) -> list:
    """The messages an application queue holds (asyncio.Queue's and AppQueue's deque)."""
    return queue._queue


def handling_request(channel) -> bool:
    """Whether a Twisted HTTP channel has a whole request in hand."""
    return channel._handlingRequest


def http_channel_protocol(channel):
    """Twisted's protocol wrapper around an HTTP channel (what its factory builds)."""
    return twisted_http._GenericHTTPChannelProtocol(channel)


def hold_request(channel) -> None:
    """Mark a Twisted HTTP channel as handling a whole request (as its
    allContentReceived does): one handed on to a WebSocket protocol without a
    Request (server/guard.py, upgrade_whole)."""
    channel._handlingRequest = True


def http_producer(transport):
    """The HTTP channel left registered as `transport`'s producer after daphne's
    upgrade, if any: a TCP transport keeps it as `producer`, TLS inside a membrane;
    with whether it is idle for good (handling its one request, no request
    producer: its producer methods do nothing any more)."""
    producer = getattr(transport, "producer", None)
    if producer is None:
        membrane = getattr(transport, "_producer", None)
        producer = getattr(membrane, "_producer", None)
    if not isinstance(producer, twisted_http.HTTPChannel):
        return None, False
    return producer, getattr(producer, "_handlingRequest", False) and getattr(producer, "_requestProducer", None) is None


def _call(logger, func, *args, **kwargs):
    return func(*args, **kwargs)


def direct_reads_and_writes() -> None:
    """Twisted's asyncio reactor calls a socket's reads and writes (its
    `_readOrWrite`, which catches and logs what they raise) through
    twisted.python.log.callWithLogger, which asks the connection for its log
    prefix and sets a legacy log context around the call: some 3% of a worker's
    connect storm, for a context our logs never read (they are stdlib JSON
    lines, with their own fields). From now on, sockets registered with the
    reactor are called directly. An Exception a read or write raises is still
    caught, logged to Twisted's log and its connection dropped by
    `_readOrWrite`; what a connection's connectionLost raises (which
    callWithLogger caught) reaches asyncio's exception handler, logged at ERROR."""
    from twisted.internet import asyncioreactor

    asyncioreactor.callWithLogger = _call
