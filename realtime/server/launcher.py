"""daphne with a graceful drain: `python -m realtime.server [daphne arguments]`.

Plain daphne drops every socket with 1006 on SIGTERM (no close frame), so clients
cannot tell a restart from a network failure. This launcher runs daphne's own
command line with a Server subclass that, on SIGTERM or SIGINT, or on a drain
request sent through the channel layer (`manage.py drain`):

1. stops listening, so the load balancer sends new connections to other workers;
2. closes its WebSockets with 4012 (service restart: reconnect now) in shuffled
   batches spread over REALTIME_DRAIN_SPREAD seconds, so clients do not all come
   back in the same millisecond;
3. waits for the application instances to finish (at most REALTIME_DRAIN_TIMEOUT s),
   then stops the reactor (only after a signal: a drain request leaves the process
   idle for its process manager to stop).

A message larger than daphne's --websocket-max-message-size is closed with 1009
(not dropped). It also bounds what a worker buffers for one socket, each way:
- out: a socket whose unsent bytes pass REALTIME_MAX_SEND_BUFFER (default 1 MiB) is
  closed with 4013 (overloaded: reconnect with backoff, then resume by seq) instead
  of growing the worker's memory; messages for it beyond that are not buffered;
- in: a socket with more than REALTIME_MAX_RECEIVE_FRAMES (256) frames, or
  REALTIME_MAX_RECEIVE_BUFFER bytes (1 MiB), received and not yet handled is closed
  with 4029 (a flood); what it sends after that is dropped.
Before a connection is a socket (or while it is plain HTTP), two guards against
connections that cost the worker without ever becoming a request:
- a deadline: each request, head and body, a socket's upgrade included, must
  arrive whole within REALTIME_HANDSHAKE_TIMEOUT s (10) of the connection or of the
  previous response. Twisted's own timeout is an idle one, reset by every byte, so
  a client trickling a header byte every few seconds held its connection for ever
  (slowloris);
- a cap: at most REALTIME_MAX_PENDING_PER_ADDRESS (32) such connections per peer
  address at once; one more is closed as it arrives. Trusted proxies
  (REALTIME_TRUSTED_PROXIES) are not capped: behind them the balancer's own limits
  apply (deploy/).

Each socket's scope carries the ASGI extension `realtime.frames`: `write(frame)`
puts a complete, already framed WebSocket message (protocol.websocket_frame()) on the
socket as is, at the end of the loop's current turn, in one send() with whatever
else the socket got in that turn (anything sent through ASGI goes after it). The fan-out frames a room event once and writes those bytes to every
local member, instead of daphne encoding, framing and accounting it per member.
The same send-buffer bound applies. Under another server the extension is absent
and the app sends through ASGI as usual.

It relies on daphne's Server internals (connections, listen_success,
create_application, the Twisted reactor) and on autobahn's and Twisted's
per-connection attributes (what an open socket sheds to stay small, about 15 KiB an
idle socket: docs/decisions.md): requirements.txt pins all three, and tests/cluster
checks the behaviour.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import random
import signal
import time
import types
from functools import partial

from daphne.cli import CommandLineInterface
from daphne.server import Server
from daphne.ws_protocol import WebSocketProtocol
from twisted.internet import protocol as twisted_protocol
from twisted.internet import tcp
from twisted.web import http as twisted_http

from realtime.protocol.codes import CloseCode
from realtime.web.proxies import peer_trusted, rate_subject
from realtime.ws.queues import AppQueue

log = logging.getLogger("realtime.server")

# The close codes this module sends, from the protocol's one list (exact ints:
# autobahn's sendClose refuses an IntEnum's subclass checks on some versions).
OVERLOADED = int(CloseCode.OVERLOADED)
RATE_LIMITED = int(CloseCode.RATE_LIMITED)
SERVICE_RESTART = int(CloseCode.SERVICE_RESTART)


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
    if (
        isinstance(transport, tcp.Connection) and not transport.TLS and transport.connected
        and not transport.disconnecting and not transport._writeDisconnected
        and not transport._tempDataLen and len(transport.dataBuffer) == transport.offset
    ):
        sent = transport.writeSomeData(data)
        if isinstance(sent, int):
            if sent == len(data):
                return
            data = data[sent:]
    transport.write(data)


# The prebuilt frames each socket got in this turn of the loop
# (BoundedWebSocketProtocol.write_frame), written when the turn ends. Kept here,
# not on the socket: an open socket's dict is kept small (_shed), and two more
# keys would double it.
_corked: dict["BoundedWebSocketProtocol", list[bytes]] = {}


def flush_corked() -> None:
    """Write what each socket gathered in this turn of the loop, in one send() per
    socket: a burst of room events (a batch of sends, several rooms' events)
    costs a system call per socket instead of one per socket and event."""
    gathered = list(_corked.items())
    _corked.clear()
    for socket, frames in gathered:
        socket.write_gathered(frames)


class SendQueue(list):
    """autobahn's send_queue (len, append, popleft) as a list: it is empty but for
    chopped or synchronous sends, and an empty deque holds a 64-slot block (760 B
    a socket), an empty list 56 B."""

    __slots__ = ()

    def popleft(self):
        return self.pop(0)


class OpenedRequest:
    """What daphne reads of the handshake request once a socket is open."""

    __slots__ = ("path",)

    def __init__(self, path: str):
        self.path = path


class GuardedHTTPChannel(twisted_http.HTTPChannel):
    """Twisted's HTTP channel with a deadline for each whole request (module doc),
    counted against its peer's address until it ends or becomes a socket."""

    deadline_call = None
    counted: "PendingCounter | None" = None
    address = ""
    heard = False  # a byte of the awaited request has arrived

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
        if self._handlingRequest or self.transport is None:
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
        if self.persistent and self.transport is not None and not self._handlingRequest:
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


def settings_value(name: str):
    from django.conf import settings

    return settings.REALTIME[name]


def guard_http_factory(factory) -> None:
    """Give daphne's HTTP factory the guarded channel and the per-address cap
    (IPv6 counted by /64, as every per-address limit is)."""

    counter = PendingCounter()
    factory.pending = counter
    factory.protocol = lambda: twisted_http._GenericHTTPChannelProtocol(GuardedHTTPChannel())
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
    from twisted.web.http import HTTPChannel

    producer = getattr(transport, "producer", None)  # a TCP transport
    if producer is None:
        membrane = getattr(transport, "_producer", None)  # TLS: wrapped in a membrane
        producer = getattr(membrane, "_producer", None)
    if isinstance(producer, GuardedHTTPChannel):
        producer.upgraded()
    if (isinstance(producer, HTTPChannel) and getattr(producer, "_handlingRequest", False)
            and getattr(producer, "_requestProducer", None) is None):
        transport.unregisterProducer()
        # The channel and its request point at each other: break that, so both go
        # as soon as daphne forgets the request (within a second), not at some
        # later full garbage collection.
        producer.requests = []


DENIAL_REASONS = {400: "Bad Request", 403: "Forbidden", 404: "Not Found", 429: "Too Many Requests"}


class BoundedWebSocketProtocol(WebSocketProtocol):
    """daphne's WebSocket protocol with a ceiling on unsent bytes, and one on
    received frames the application has not taken yet (daphne queues those
    without bound: a client can send far faster than frames are handled)."""

    # Instance attributes that autobahn sets to these values when a connection is
    # made and that an open socket rarely changes: onOpen leaves them to the class
    # (same values), and the instance dict shrinks (see _shed()).
    _INITIAL = {
        "closedByMe": False, "failedByMe": False, "droppedByMe": False, "wasClean": False,
        "wasNotCleanReason": None, "wasServerConnectionDropTimeout": False, "wasOpenHandshakeTimeout": False,
        "wasCloseHandshakeTimeout": False, "wasServingFlashSocketPolicyFile": False,
        "localCloseCode": None, "localCloseReason": None, "remoteCloseCode": None, "remoteCloseReason": None,
        "openHandshakeTimeoutCall": None, "closeHandshakeTimeoutCall": None, "autoPingTimeoutCall": None,
        "autoPingPending": None, "autoPingPendingCall": None, "autoPingPendingSent": None,
        "trackedTimings": None, "_perMessageCompress": None, "protocol_to_accept": None,
        "wasMaxFramePayloadSizeExceeded": False, "wasMaxMessagePayloadSizeExceeded": False,
        "root_path": "",
        # Read by the handshake only (daphne's onConnect, autobahn's processHandshake):
        # dropped whatever they hold, these are what the class answers after that.
        "http_headers": {}, "http_request_data": b"", "http_response_data": b"", "_raw_query_string": b"",
        "clean_headers": (), "application_deferred": None, "_wskey": None, "http_status_line": None,
        "http_request_uri": None, "http_request_path": None, "http_request_params": None, "http_request_host": None,
        "websocket_protocols": (), "websocket_extensions": (), "websocket_origin": None,
        "_transport_details": None,
    }
    _HANDSHAKE_ONLY = frozenset({
        "http_headers", "http_request_data", "http_response_data", "_raw_query_string", "clean_headers",
        "application_deferred", "_wskey", "http_status_line", "http_request_uri", "http_request_path",
        "http_request_params", "http_request_host", "websocket_protocols", "websocket_extensions",
        "websocket_origin",
        # autobahn's TLS details, for WAMP (its own onOpen has read them)
        "_transport_details",
    })

    max_send_buffer = int(os.environ.get("REALTIME_MAX_SEND_BUFFER", str(1024 * 1024)))
    max_receive_frames = int(os.environ.get("REALTIME_MAX_RECEIVE_FRAMES", "256"))
    max_receive_buffer = int(os.environ.get("REALTIME_MAX_RECEIVE_BUFFER", str(1024 * 1024)))
    overflowed = False
    flooded = False

    def onMessage(self, payload, isBinary):
        if self.flooded:
            return
        queue = getattr(self, "application_queue", None)
        if queue is not None and self.state == self.STATE_OPEN:
            waiting = queue._queue  # AppQueue (as asyncio.Queue) keeps its items there
            if len(waiting) >= self.max_receive_frames or len(payload) + sum(
                len(m.get("text") or m.get("bytes") or "") for m in waiting
            ) > self.max_receive_buffer:
                self.flooded = True
                log.warning("closing a socket that floods: %d frames waiting", len(waiting))
                # What waits will never be answered (the socket is closing): drop it
                # now rather than handle it, and free its memory at once.
                kept = [m for m in waiting if m.get("type") != "websocket.receive"]
                waiting.clear()
                waiting.extend(kept)
                self.sendClose(code=RATE_LIMITED)
                return
        super().onMessage(payload, isBinary)

    def handle_reply(self, message):
        """daphne's, plus the ASGI WebSocket denial response (extension
        `websocket.http.response`): a handshake refused with an HTTP status of the
        app's choosing (404 for a path with no socket), where daphne alone answers
        every refusal with 403. The body is not sent (autobahn writes its own)."""
        kind = message.get("type")
        if kind == "websocket.http.response.start" and self.state == self.STATE_CONNECTING:
            self.__dict__["denial_status"] = int(message.get("status", 403))
            return
        if kind == "websocket.http.response.body" and "denial_status" in self.__dict__:
            if not message.get("more_body") and hasattr(self, "handshake_deferred"):
                from autobahn.websocket.types import ConnectionDeny

                status = self.__dict__.pop("denial_status")
                self.handshake_deferred.errback(ConnectionDeny(code=status, reason=DENIAL_REASONS.get(status, "Refused")))
                del self.handshake_deferred
                self.server.protocol_disconnected(self)
            return
        super().handle_reply(message)

    def serverSend(self, content, binary=False):
        if self.overflowed or self.state in (self.STATE_CLOSING, self.STATE_CLOSED) or self._over_bound():
            return  # a send racing a close is dropped (autobahn would raise and kill the app)
        super().serverSend(content, binary)

    def write_frame(self, frame: bytes) -> bool:
        """Write a complete WebSocket frame (protocol.websocket_frame()) at the end of
        this turn of the loop; False when this socket cannot take it as is (not
        open, compressing, mid-message), and the caller sends through ASGI instead."""
        gathered = _corked.get(self)
        if gathered is not None:
            # Checked at this turn's first frame; anything that could have changed
            # since (a close, a reply) went through sendData, which writes them.
            gathered.append(frame)
            return True
        if self.overflowed or self.state in (self.STATE_CLOSING, self.STATE_CLOSED):
            return True  # closing: dropped, as serverSend drops it
        if (self.state != self.STATE_OPEN or self._perMessageCompress is not None
                or self.send_state != self.SEND_STATE_GROUND or self.send_queue):
            return False
        # Gathered until the loop's current turn ends, then written with whatever
        # else this socket gets in the meantime (flush_corked).
        if not _corked:
            asyncio.get_running_loop().call_soon(flush_corked)
        _corked[self] = [frame]
        return True

    def write_gathered(self, frames: list[bytes]) -> None:
        data = frames[0] if len(frames) == 1 else b"".join(frames)
        if self.state != self.STATE_OPEN or self._over_bound(len(data)):
            return  # closed meanwhile, or over the send bound (closing with 4013): dropped
        write_now(self.transport, data)

    def sendData(self, data, sync=False, chopsize=None):
        # Whatever autobahn writes (replies through ASGI, pings, the close frame)
        # goes after the frames gathered before it.
        if _corked:
            gathered = _corked.pop(self, None)
            if gathered:
                self.write_gathered(gathered)
        super().sendData(data, sync, chopsize)

    def onOpen(self):
        super().onOpen()
        # The handshake is over: let go of what only it needed (the request's
        # headers, twice, and the raw request and response), a few KiB a socket.
        # daphne still names the path in its log lines.
        self.request = OpenedRequest(self.request.path)
        self._shed()

    def _shed(self) -> None:
        """Rebuild the instance dict without the handshake's leftovers and the
        attributes that still hold their initial values (the class has the same
        ones): some 110 keys become 36 (0.8 KiB instead of 3.3), and a dict never
        shrinks by itself. A keepalive ping and its pong add 5 back: 41, still the
        same table (a 43rd key would double it)."""
        initial, d = self._INITIAL, self.__dict__
        drop = self._HANDSHAKE_ONLY
        if d.get("_listeners") is None and d.get("_valid_events") == ["message"] and d.get("_results") == {"message": None}:
            # txaio's event bookkeeping, unused while nothing listens (fire() returns
            # at once): the class's ("message",) and None stand in until on().
            drop = drop | {"_valid_events", "_results"}
        if not d.get("send_queue", True):
            d["send_queue"] = SendQueue()
        # (built anew: a deleted key would still take its slot)
        self.__dict__ = {k: v for k, v in d.items() if k not in drop and not (k in initial and v is initial[k])}

    _valid_events = ("message",)
    _results = None

    def on(self, event, handler):
        if "_results" not in self.__dict__:
            self.set_valid_events(["message"])
        super().on(event, handler)

    def connectionMade(self):
        super().connectionMade()
        # Frames go out as they are written (as asyncio's own transports do): a
        # small room event must not wait on the peer's delayed ACK (Nagle).
        with contextlib.suppress(Exception):
            self.transport.setTcpNoDelay(True)
        release_http_channel(self.transport)

    def _over_bound(self, pending: int | None = None) -> bool:
        """Whether the unsent bytes, with `pending` more (the gathered frames by
        default), pass the send bound; if so, close with 4013."""
        if pending is None:
            pending = sum(map(len, _corked.get(self, ())))
        if self.state == self.STATE_OPEN and unsent_bytes(self.transport) + pending > self.max_send_buffer:
            self.overflowed = True
            log.warning("closing a socket that stopped reading: %d bytes unsent", unsent_bytes(self.transport))
            # The close frame queues behind the backlog; autobahn drops the TCP
            # connection when the peer does not answer it in time.
            self.sendClose(code=OVERLOADED)
            return True
        return False


for _name, _value in BoundedWebSocketProtocol._INITIAL.items():
    setattr(BoundedWebSocketProtocol, _name, _value)



def worker_id() -> str:
    from realtime.state.heartbeat import worker_id as heartbeat_worker_id

    return heartbeat_worker_id()


class ControlListener:
    """The worker itself as a member of the control group (delivery/fanout.py hands
    it the group's messages, as it hands a socket its rooms')."""

    def __init__(self, server: "DrainingServer", me: str) -> None:
        self.server, self.me = server, me

    async def deliver(self, message: dict) -> bool:
        from realtime.delivery import names

        if message.get("type") == names.WORKER_DRAIN and message.get("worker") in ("*", self.me):
            self.server.drain("drain request", False)
        return True

    def put_nowait(self, message: dict) -> None:
        """(a layer recovery: nothing to catch up)"""

    @property
    def local_queue(self) -> "ControlListener":
        return self


class DrainingServer(Server):
    def run(self):
        from twisted.internet import reactor

        # No "Server: daphne" on responses and handshakes: what runs here is no
        # one else's business (daphne's --server-name cannot be set to nothing).
        self.server_name = ""

        self.ports = []
        self.draining = False
        self.exit_when_drained = False
        self.drained = False
        self.drain_spread = float(os.environ.get("REALTIME_DRAIN_SPREAD", "1.0"))
        self.drain_timeout = float(os.environ.get("REALTIME_DRAIN_TIMEOUT", "10"))
        # Twisted installs its own SIGTERM/SIGINT handlers when the reactor starts;
        # ours go in after that, so they win.
        reactor.callWhenRunning(self._start)
        super().run()

    def create_application(self, protocol, scope):
        if not isinstance(protocol, BoundedWebSocketProtocol):
            return super().create_application(protocol, scope)
        scope["extensions"] = {**(scope.get("extensions") or {}), "realtime.frames": {"write": protocol.write_frame},
                               "websocket.http.response": {}}
        # daphne's create_application, with the lean queue.
        assert "application_instance" not in self.connections[protocol]
        input_queue = AppQueue()
        scope.setdefault("asgi", {"version": "3.0"})
        application_instance = self.application(scope=scope, receive=input_queue.get,
                                                send=partial(self.handle_reply, protocol))
        if protocol not in self.connections:
            return None
        self.connections[protocol]["application_instance"] = asyncio.ensure_future(
            application_instance, loop=asyncio.get_event_loop())
        return input_queue

    def listen_success(self, port):
        self.ports.append(port)
        super().listen_success(port)

    # -- start-up ---------------------------------------------------------------
    def _start(self):
        from twisted.internet import reactor

        # What start-up made (Django, the app, the modules) lives as long as the
        # process: out of the collector's reach, a full collection walks only
        # what the sockets made since, instead of stopping every socket for the
        # whole heap's walk (bench: 150-290 ms a collection with 2,000 sockets).
        gc.collect()
        gc.freeze()

        def on_signal(signum, frame):
            reactor.callFromThread(self.drain, signal.Signals(signum).name, True)

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        # A message over --websocket-max-message-size is answered with a 1009 close
        # frame instead of a dropped TCP connection (autobahn's failByDrop), so the
        # client can tell why and does not resend it in a loop.
        self.ws_factory.setProtocolOptions(failByDrop=False)
        # Connections are built after start-up, so they all get the bounded protocol,
        # with the factory's options as class attributes: autobahn copies an option
        # onto each new connection only where the protocol has none (some 30 keys
        # less in every connection's dict).
        self.ws_factory.protocol = type(
            "BoundedWebSocketProtocol", (BoundedWebSocketProtocol,),
            # (a function, perMessageCompressionAccept, must not become a method)
            {name: staticmethod(value) if isinstance(value, types.FunctionType) else value
             for name in BoundedWebSocketProtocol.CONFIG_ATTRS for value in [getattr(self.ws_factory, name)]},
        )
        # An HTTP connection (a socket's upgrade request included) that sends
        # nothing for REALTIME_HANDSHAKE_TIMEOUT s is dropped; Twisted's default is
        # 60 s. It pauses while a request is being answered (long polls are safe).
        # And each request must arrive whole within that time, however it
        # trickles in; at most MAX_PENDING_PER_ADDRESS such connections an address.
        self.http_factory.timeOut = settings_value("HANDSHAKE_TIMEOUT")
        guard_http_factory(self.http_factory)
        asyncio.ensure_future(self._control_loop())
        from realtime.state import heartbeat

        heartbeat.ensure_started()  # the worker is in the cluster view from the start

    async def _control_loop(self):
        """Follow the workers' control group in this worker's fan-out, as a socket
        follows a room: drain requests (manage.py drain, the admin console) arrive
        by the same transport as everything else, and after a transport failure
        the fan-out subscribes to it again with the rest."""
        from realtime.delivery import names
        from realtime.delivery.fanout import fanout

        listener = ControlListener(self, worker_id())
        while True:
            try:
                await fanout().add(names.CONTROL_GROUP, listener)
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("control group unavailable; retrying")
                await asyncio.sleep(1)

    # -- the drain --------------------------------------------------------------
    def drain(self, reason: str, exit_after: bool) -> None:
        from twisted.internet import reactor

        self.exit_when_drained = self.exit_when_drained or exit_after
        if self.draining:
            if self.drained and self.exit_when_drained:
                reactor.stop()
            return
        self.draining = True
        from realtime.state import heartbeat

        heartbeat.draining = True  # /readyz answers 503, the dashboard shows it
        started = time.monotonic()
        for port in self.ports:
            port.stopListening()
        sockets = [
            p for p in self.connections
            if isinstance(p, WebSocketProtocol) and p.state == WebSocketProtocol.STATE_OPEN
        ]
        random.shuffle(sockets)
        log.warning("draining: reason=%s sockets=%d spread=%.1fs", reason, len(sockets), self.drain_spread)
        batches = max(1, min(len(sockets), 20))
        for i in range(batches):
            batch = sockets[i::batches]
            delay = self.drain_spread * i / batches
            reactor.callLater(delay, self._close_batch, batch)
        reactor.callLater(0.05, self._wait_for_applications, started)

    @staticmethod
    def _close_batch(batch):
        for protocol in batch:
            if protocol.state == WebSocketProtocol.STATE_OPEN:
                protocol.serverClose(code=SERVICE_RESTART)

    def _wait_for_applications(self, started: float) -> None:
        from twisted.internet import reactor

        alive = [
            d for d in self.connections.values()
            if d.get("application_instance") is not None and not d["application_instance"].done()
        ]
        elapsed = time.monotonic() - started
        if alive and elapsed < self.drain_spread + self.drain_timeout:
            reactor.callLater(0.05, self._wait_for_applications, started)
            return
        self.drained = True
        log.warning("drained in %.2fs (%d application instances left)", elapsed, len(alive))
        if self.exit_when_drained:
            reactor.stop()


def main() -> None:
    CommandLineInterface.server_class = DrainingServer
    CommandLineInterface.entrypoint()


if __name__ == "__main__":
    main()
