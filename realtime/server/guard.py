"""Connections before they are sockets: a deadline for each whole request, a cap
per peer address, and letting go of the HTTP channel once a socket is open.

- a deadline: each request, head and body, a socket's upgrade included, must
  arrive whole within REALTIME_HANDSHAKE_TIMEOUT s (10) of the connection or of the
  previous response. Twisted's own timeout is an idle one, reset by every byte, so
  a client trickling a header byte every few seconds held its connection for ever
  (slowloris);
- a cap: at most REALTIME_MAX_PENDING_PER_ADDRESS (32) such connections per peer
  address at once; one more is closed as it arrives. Trusted proxies
  (REALTIME_TRUSTED_PROXIES) are not capped: behind them the balancer's own limits
  apply (deploy/);
- a WebSocket upgrade that arrives whole in the connection's first read (as a
  browser's does) goes to daphne's WebSocket protocol at once (`upgrade_whole`),
  as daphne's HTTP request would hand it on, without Twisted parsing it into a
  request first: autobahn parses the handshake anyway, and the first parse was
  about a tenth of a connect storm's worker time. Anything else, or any doubt
  (a header daphne or Twisted would refuse, one given twice, a body, a request
  cut over two reads), takes the HTTP channel's way, which answers it as before.
"""

from __future__ import annotations

import logging
import re

from daphne.utils import HEADER_NAME_RE, INVALID_HEADER_VALUE_BYTES
from twisted.internet import protocol as twisted_protocol
from twisted.protocols.policies import ProtocolWrapper
from twisted.web import http as twisted_http

from realtime.server import adapter
from realtime.web.proxies import peer_trusted, rate_subject

log = logging.getLogger("realtime.server")


def settings_value(name: str):
    from django.conf import settings

    return settings.REALTIME[name]


class GuardedHTTPChannel(twisted_http.HTTPChannel):
    """Twisted's HTTP channel with a deadline for each whole request (module doc),
    counted against its peer's address until it ends or becomes a socket."""

    deadline_call = None
    counted: "PendingCounter | None" = None
    address = ""
    heard = False  # a byte of the awaited request has arrived
    fresh = True  # nothing has arrived on this connection yet

    def connectionMade(self):
        super().connectionMade()
        self._arm()

    def _arm(self) -> None:
        timeout = settings_value("HANDSHAKE_TIMEOUT")
        self.heard = False
        if timeout:
            self.deadline_call = self.callLater(timeout, self._too_slow)

    def dataReceived(self, data):
        self.heard = True
        if self.fresh:
            self.fresh = False
            if upgrade_whole(self, data):
                return
        super().dataReceived(data)

    def _disarm(self) -> None:
        if self.deadline_call is not None and self.deadline_call.active():
            self.deadline_call.cancel()
        self.deadline_call = None

    def _too_slow(self) -> None:
        """The deadline passed with the request still incomplete. A request that has
        begun to trickle in is cut off at once (abort: nothing of ours is queued);
        a connection that has sent nothing of a next request is closed gracefully,
        so that the end of a previous response still queued for a slow reader
        reaches it first."""
        self.deadline_call = None
        if adapter.handling_request(self) or self.transport is None:
            return
        if self.heard:
            from realtime.observability.logs import event

            event(log, logging.INFO, "http.too_slow", addr=self.address)
            self.transport.abortConnection()
        else:
            self.transport.loseConnection()

    def allContentReceived(self):
        self._disarm()
        super().allContentReceived()

    def requestDone(self, request):
        super().requestDone(request)
        if self.persistent and self.transport is not None and not adapter.handling_request(self):
            self._arm()  # the next request on this kept-alive connection

    def upgraded(self) -> None:
        """It is a WebSocket now: no longer a pending HTTP connection."""
        self._disarm()
        self._uncount()

    def _uncount(self) -> None:
        if self.counted is not None:
            self.counted.release(rate_subject(self.address))
            self.counted = None

    def connectionLost(self, reason):
        self._disarm()
        self._uncount()
        super().connectionLost(reason)


# What the HTTP channel's way lets through (twisted.web.http.HTTPChannel): a larger
# head, or more headers, is answered there (400).
MOST_HEAD = twisted_http.HTTPChannel.totalHeadersSize
MOST_HEADERS = twisted_http.HTTPChannel.maxHeaders
# Header values Twisted refuses (NUL, CR, LF) and daphne's own (RFC 9110 5.5).
REFUSED_IN_VALUES = frozenset(b"\x00\r\n") | INVALID_HEADER_VALUE_BYTES
# A request target of visible ASCII only: autobahn splits the head it parses at
# any line break Python knows (VT, FF, FS... as well as CR and LF).
TARGET = re.compile(rb"/[\x21-\x7e]*")
# Headers that would give a GET a body, or (Expect) an interim answer before the
# 101: the HTTP channel's way decides about them.
BODY_HEADERS = (b"content-length", b"transfer-encoding", b"expect")


def websocket_upgrade(data: bytes) -> bytes | None:
    """The request target when `data` is exactly one whole request head (nothing
    after it) of an HTTP/1.1 GET asking for a WebSocket upgrade, which Twisted and
    daphne would pass as it is: every header a valid name and value, none given
    twice, none folded over two lines, no body, a target of visible ASCII. None
    for anything else (the HTTP channel's way then answers it as before)."""
    if len(data) > MOST_HEAD or not data.startswith(b"GET /") or data.find(b"\r\n\r\n") != len(data) - 4:
        return None
    lines = data[:-4].split(b"\r\n")
    if len(lines) - 1 > MOST_HEADERS:
        return None
    request = lines[0].split(b" ")
    if len(request) != 3 or request[2] != b"HTTP/1.1" or not TARGET.fullmatch(request[1]):
        return None
    seen = set()
    upgrade = None
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not HEADER_NAME_RE.fullmatch(name):
            return None  # (also a folded line: it starts with a space)
        value = value.strip(b" \t")
        if not REFUSED_IN_VALUES.isdisjoint(value):
            return None
        name = name.lower()
        if name in seen or name in BODY_HEADERS:
            return None
        seen.add(name)
        if name == b"upgrade":
            upgrade = value
    if upgrade is None or upgrade.lower() != b"websocket":
        return None
    return request[1]


def upgrade_whole(channel: GuardedHTTPChannel, data: bytes) -> bool:
    """Hand a whole WebSocket upgrade (websocket_upgrade) to daphne's WebSocket
    protocol, as daphne's WebRequest.process does once Twisted has parsed it
    (the query string, the transport, the request's bytes). The channel is left
    as Twisted leaves it with a whole request in hand (its idle timeout off, the
    request being handled), so that the WebSocket protocol's connectionMade lets
    it go as after any upgrade (release_http_channel). False (nothing done): not
    such a request, or no protocol to hand it to."""
    target = websocket_upgrade(data)
    if target is None:
        return False
    transport = channel.transport
    protocol = channel.factory.server.ws_factory.buildProtocol(transport.getPeer())
    if protocol is None:
        return False
    protocol._raw_query_string = target.partition(b"?")[2]
    channel.setTimeout(None)
    adapter.hold_request(channel)
    if isinstance(transport, ProtocolWrapper):  # TLS
        transport.wrappedProtocol = protocol
    else:
        transport.protocol = protocol
    protocol.makeConnection(transport)
    protocol.dataReceived(data)
    return True


class Refuse(twisted_protocol.Protocol):
    """Closes a connection as soon as it is made (one over the per-address cap)."""

    def connectionMade(self):
        self.transport.abortConnection()


class PendingCounter:
    """Connections per peer address that are not (yet) sockets."""

    def __init__(self) -> None:
        self.open: dict[str, int] = {}

    def take(self, address: str, cap: int) -> bool:
        n = self.open.get(address, 0)
        if n >= cap:
            return False
        self.open[address] = n + 1
        return True

    def release(self, address: str) -> None:
        n = self.open.get(address, 0) - 1
        if n > 0:
            self.open[address] = n
        else:
            self.open.pop(address, None)


def guard_http_factory(factory) -> None:
    """Give daphne's HTTP factory the guarded channel and the per-address cap
    (IPv6 counted by /64, as every per-address limit is)."""

    counter = PendingCounter()
    factory.pending = counter
    factory.protocol = lambda: adapter.http_channel_protocol(GuardedHTTPChannel())
    build = factory.buildProtocol

    def buildProtocol(addr):
        host = getattr(addr, "host", "")
        trusted = peer_trusted(host)
        if not trusted and not counter.take(rate_subject(host), settings_value("MAX_PENDING_PER_ADDRESS")):
            from realtime.observability.logs import event

            event(log, logging.WARNING, "http.refused", reason="connections-per-address", addr=host)
            return Refuse()
        p = build(addr)
        channel = p._channel
        channel.address = host
        if not trusted:
            channel.counted = counter
        return p

    factory.buildProtocol = buildProtocol


def release_http_channel(transport) -> None:
    """After daphne's upgrade the HTTP channel stays registered as the transport's
    producer, keeping the channel, its request, both header sets and the raw
    request alive (some 5 KiB a socket). Its producer methods do nothing once the
    request is being handled and never finishes (no request producer, the network
    producer left alone), so the transport is better off with no producer: what
    autobahn's own server protocols have."""
    producer, idle = adapter.http_producer(transport)
    if isinstance(producer, GuardedHTTPChannel):
        producer.upgraded()
    if idle:
        transport.unregisterProducer()
        # The channel and its request point at each other: break that, so both go
        # as soon as daphne forgets the request (within a second), not at some
        # later full garbage collection.
        producer.requests = []
