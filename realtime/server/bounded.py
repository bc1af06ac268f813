"""The WebSocket protocol of our worker: bounded buffers each way, prebuilt frames
written as is (corked: one send() per socket and turn of the loop), a handshake
refused with any HTTP status, and an open socket's memory shed.

A message larger than daphne's --websocket-max-message-size is closed with 1009
(not dropped). It also bounds what a worker buffers for one socket, each way:
- out: a socket whose unsent bytes pass REALTIME_MAX_SEND_BUFFER (default 1 MiB) is
  closed with 4013 (overloaded: reconnect with backoff, then resume by seq) instead
  of growing the worker's memory; messages for it beyond that are not buffered;
- in: a socket with more than REALTIME_MAX_RECEIVE_FRAMES (256) frames, or
  REALTIME_MAX_RECEIVE_BUFFER bytes (1 MiB), received and not yet handled is closed
  with 4029 (a flood); what it sends after that is dropped.

Each socket's scope carries the ASGI extension `realtime.frames`: the socket's
protocol itself, whose `write_frame(frame)` puts a complete, already framed
WebSocket message (protocol.websocket_frame()) on the socket as is, at the end of
the loop's current turn, in one send() with whatever else the socket got in that
turn (anything sent through ASGI goes after it). The fan-out frames a room event
once and writes those bytes to every local member, instead of daphne encoding,
framing and accounting it per member; the consumer writes its replies that way
too, and a replay's frames with `write_frames(frames)`. The same send-buffer bound
applies: past it, the whole frames that fit go, then the close (4013). Under
another server the extension is absent and the app sends through ASGI as usual.

What an open socket sheds to stay small (about 6.7 KiB an idle socket, all told):
docs/decisions.md. The private attributes it touches: server/adapter.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import types

from autobahn.websocket.protocol import TrafficStats
from daphne.ws_protocol import WebSocketProtocol
from twisted.internet import defer

from realtime.protocol.codes import CloseCode
from realtime.server import adapter
from realtime.server.adapter import send_at_once, unsent_bytes, write_now
from realtime.server.guard import release_http_channel

adapter.defer_debug_formatting()

log = logging.getLogger("realtime.server")

# The close codes this module sends, from the protocol's one list (exact ints).
OVERLOADED = int(CloseCode.OVERLOADED)
RATE_LIMITED = int(CloseCode.RATE_LIMITED)


# The prebuilt frames each socket got in this turn of the loop
# (BoundedWebSocketProtocol.write_frame), written when the turn ends. Kept here,
# not on the socket: an open socket's dict is kept small (_shed), and two more
# keys would double it. A socket's entry is its one frame (bytes) until a second
# comes, then a list of them: a fan-out's sweep makes no container per socket
# (see "A sweep makes no garbage" in docs/decisions.md: a list a socket, alive
# until the turn ends, outlived the young collections of a 2,500-socket sweep,
# and the thousands of them a message reached the old generation and brought on
# its full collections, each a pause of every socket of the worker).
_corked: dict["BoundedWebSocketProtocol", "bytes | list[bytes]"] = {}


def gathered_size(gathered: "bytes | list[bytes] | None") -> int:
    """The bytes a socket's entry in _corked holds (0 for none)."""
    if gathered is None:
        return 0
    return len(gathered) if gathered.__class__ is bytes else sum(map(len, gathered))


def flush_corked() -> None:
    """Write what each socket gathered in this turn of the loop, in one send() per
    socket: a burst of room events (a batch of sends, several rooms' events)
    costs a system call per socket instead of one per socket and event."""
    global _corked
    # The turn's dict is taken whole (a new one gathers anything written from
    # here on): walking its items makes no tuple a socket, where a list of them
    # made one each.
    gathered, _corked = _corked, {}
    for socket, frames in gathered.items():
        try:
            socket.write_gathered(frames)
        except Exception:
            # Its frames are lost (their seqs counted as sent): drop the connection,
            # and the client resumes from the last it got. The others still go.
            log.exception("writing a socket's frames failed", extra={"event": "ws.write_failed"})
            with contextlib.suppress(Exception):
                socket.transport.abortConnection()


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


# A closed socket's is_closed once let go (connectionLost).
CLOSED = object()

# autobahn's traffic counts for every socket of the worker together.
WORKER_TRAFFIC = TrafficStats()

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
        "openHandshakeTimeoutCall": None, "closeHandshakeTimeoutCall": None,
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

    # What a socket keeps for its life, and what autobahn sets at every frame and
    # ping, in fixed slots instead of the instance dict: a dict of some 36 keys is
    # 0.8 KiB, and a ping's five more doubled its table; 41 slots are 328 B. (Not a
    # name the class, or the factory's options in launcher's subclass, gives a
    # value: a class attribute of the same name would hide the slot.)
    __slots__ = (
        # Twisted's Protocol
        "transport", "connected", "factory",
        # autobahn's connection state, set when it is made
        "state", "send_state", "send_queue", "data", "peer", "trafficStats", "triggered", "utf8validator",
        "websocket_version", "websocket_protocol_in_use", "websocket_extensions_in_use",
        # ... its framing, re-set at every frame received
        "inside_message", "current_frame", "current_frame_masker", "frame_length", "frame_data", "control_frame_data",
        "utf8validateIncomingCurrentMessage",
        "utf8validateLast", "_isMessageCompressed", "message_opcode", "message_data", "message_is_binary",
        "message_data_total_length",
        # ... and its keepalive ping, at every ping and pong
        "autoPingPending", "autoPingPendingCall", "autoPingPendingSent", "autoPingPendingSeq", "autoPingTimeoutCall",
        # its futures of the open and the close (the is_open and is_closed properties)
        "_is_open", "_is_closed",
        # daphne's
        "server", "request", "path", "client_addr", "server_addr", "socket_opened", "last_ping", "application_queue",
    )

    def __init__(self):
        # The slots whose names the classes above give a default (a slot hides it):
        # the same default, before anything reads them.
        self.transport = None
        self.connected = 0
        self.factory = None
        self.peer = None
        self.current_frame = self.current_frame_masker = None
        self._is_open = self._is_closed = None
        super().__init__()

    # autobahn's futures of the open and the close (its own callers resolve them;
    # daphne and we never wait on them). Once the socket is open they are let go
    # unless something listens (_accepted), and made again when read: is_open
    # resolved, is_closed to be resolved by autobahn at the close.
    @property
    def is_open(self):
        if self._is_open is None:
            self._is_open = defer.Deferred()
            if self.state in (self.STATE_OPEN, self.STATE_CLOSING, self.STATE_CLOSED):
                self._is_open.callback(None)
        return self._is_open

    @is_open.setter
    def is_open(self, future):
        self._is_open = future

    @property
    def is_closed(self):
        if self._is_closed is CLOSED:
            return defer.succeed(self)  # (closed, and its own let go: connectionLost)
        if self._is_closed is None:
            # (autobahn resolves it as it closes the socket, reading it here)
            self._is_closed = defer.Deferred()
        return self._is_closed

    @is_closed.setter
    def is_closed(self, future):
        self._is_closed = future

    # Identity, as daphne's own __hash__ and __eq__ define it, but object's: in C,
    # and hashed with the pointer's low (always zero) bits rotated away. daphne's
    # hash(id(self)) leaves them in place, so a dict keyed by sockets (the gathered
    # frames of a turn, the server's connections) probes a sixteenth of its slots:
    # a tenth of a 2,500-member fan-out went to those lookups.
    __hash__ = object.__hash__
    __eq__ = object.__eq__

    # Set from settings.REALTIME at start-up (server/launcher.py).
    max_send_buffer = 1024 * 1024
    max_receive_frames = 256
    max_receive_buffer = 1024 * 1024
    overflowed = False
    flooded = False

    def onMessage(self, payload, isBinary):
        if self.flooded:
            return
        queue = getattr(self, "application_queue", None)
        if queue is not None and self.state == self.STATE_OPEN:
            waiting = adapter.waiting(queue)
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

    def dataReceived(self, data):
        # autobahn's, without the arguments of its debug line (a highlighted name
        # and two values, a few µs) at every read of every socket unless autobahn
        # logs debug.
        if adapter.logs_debug(self.log):
            super().dataReceived(data)
        else:
            self._dataReceived(data)
        if self.current_frame is None:
            # Between frames: the last frame's unmasker (1.1 KiB) is not needed
            # again; the next frame's header makes its own.
            self.current_frame_masker = None

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

    def asgi_send(self, message):
        """The application's `send` (ASGI): daphne's reply handler for this socket,
        as a method instead of a partial object a socket."""
        return self.server.handle_reply(self, message)

    def serverSend(self, content, binary=False):
        if self.overflowed or self.state in (self.STATE_CLOSING, self.STATE_CLOSED) or self._over_bound():
            return  # a send racing a close is dropped (autobahn would raise and kill the app)
        super().serverSend(content, binary)

    def write_frame(self, frame: bytes) -> bool:
        """Write a complete WebSocket frame (protocol.websocket_frame()) at the end of
        this turn of the loop; False when this socket cannot take it as is (not
        open, compressing, mid-message), and the caller sends through ASGI instead.
        (write_frames of one frame, without the tuple and the list: the fan-out
        calls it for each socket.)"""
        gathered = _corked.get(self)
        if gathered is None:
            return self._gather(frame if frame.__class__ is bytes else [frame])
        if gathered.__class__ is bytes:
            _corked[self] = [gathered, frame]
        else:
            gathered.append(frame)
        return True

    def write_frames(self, frames) -> bool:
        """write_frame for several frames in a row (a replay): kept apart, so that
        a send bound passed part-way through them cuts between two frames."""
        gathered = _corked.get(self)
        if gathered is None:
            return self._gather(list(frames))
        # Checked at this turn's first frame; anything that could have changed
        # since (a close, a reply) went through sendData, which writes them.
        if gathered.__class__ is bytes:
            _corked[self] = [gathered, *frames]
        else:
            gathered.extend(frames)
        return True

    def _gather(self, frames: "bytes | list[bytes]") -> bool:
        """The first frames of this turn for this socket: one frame as bytes, or a
        list of frames (the entry of _corked)."""
        if self.overflowed or self.state in (self.STATE_CLOSING, self.STATE_CLOSED):
            return True  # closing: dropped, as serverSend drops it
        if (self.state != self.STATE_OPEN or self._perMessageCompress is not None
                or self.send_state != self.SEND_STATE_GROUND or self.send_queue):
            return False
        # Gathered until the loop's current turn ends, then written with whatever
        # else this socket gets in the meantime (flush_corked).
        if not _corked:
            asyncio.get_running_loop().call_soon(flush_corked)
        _corked[self] = frames
        return True

    def write_gathered(self, frames: "bytes | list[bytes]") -> None:
        """Write a socket's entry of _corked: one frame (bytes) or a list of them."""
        if self.state != self.STATE_OPEN:
            return  # closed meanwhile: dropped
        if frames.__class__ is bytes:
            data = frames
        else:
            data = frames[0] if len(frames) == 1 else b"".join(frames)
        if len(data) <= self.max_send_buffer and send_at_once(self.transport, data):
            return  # (nothing was unsent: all of it within the bound)
        room = self.max_send_buffer - unsent_bytes(self.transport)
        if len(data) <= room:
            self.transport.write(data)  # (something is unsent, or not plain TCP: queued behind it)
            return
        # Past the send bound (a client that stopped reading, or a replay larger
        # than the bound): the whole frames that fit go, the rest does not, and
        # the socket closes with 4013, as frames sent one at a time would (a
        # replay's client then resumes from the last of them it got).
        if frames.__class__ is bytes:
            frames = [frames]
        fits = size = 0
        for frame in frames:
            if size + len(frame) > room:
                break
            fits, size = fits + 1, size + len(frame)
        if fits:
            write_now(self.transport, b"".join(frames[:fits]))
        self._overflow(len(data) - size)

    def sendData(self, data, sync=False, chopsize=None):
        # Whatever autobahn writes (replies through ASGI, pings, the close frame)
        # goes after the frames gathered before it.
        if _corked:
            gathered = _corked.pop(self, None)
            if gathered:
                self.write_gathered(gathered)
                if self.overflowed:
                    return  # they passed the bound: closed with 4013, nothing after it
        if sync or chopsize or self.send_queue or self.logOctets:
            super().sendData(data, sync, chopsize)
            return
        # autobahn's plain case (transport.write, the traffic counted), written at
        # once where nothing waits ahead of it (write_now): the handshake's
        # response, the replies and the pings of a reconnect storm each cost a
        # send() instead of a queued write and two poller changes.
        write_now(self.transport, data)
        if self.state == self.STATE_OPEN:
            self.trafficStats.outgoingOctetsWireLevel += len(data)
        elif self.state in (self.STATE_CONNECTING, self.STATE_PROXY_CONNECTING):
            self.trafficStats.preopenOutgoingOctetsWireLevel += len(data)

    def onOpen(self):
        super().onOpen()
        # The handshake is over: let go of what only it needed (the request's
        # headers, twice, and the raw request and response), a few KiB a socket.
        # daphne still names the path in its log lines.
        self.request = OpenedRequest(self.request.path)

    def serverAccept(self, subprotocol=None):
        # daphne's (the application's accept): it lets go of the handshake's
        # deferred after the open, so the shedding comes after it.
        super().serverAccept(subprotocol)
        if self.state == self.STATE_OPEN:
            self._accepted()

    def application_ended(self, instance) -> None:
        """The done callback of this socket's application instance (the server
        reaps it: Reaping.watch, given it by create_application)."""
        self.server.instance_ended(self, instance)

    def connectionLost(self, reason):
        super().connectionLost(reason)
        # autobahn resolved is_closed with the socket itself: a Deferred holding
        # the socket as its result, held by the socket, a cycle that only a full
        # collection frees (with everything the socket still holds: about 2 KiB
        # a socket, kept until then). Let go of it once resolved; read later, it
        # is a resolved one made then (is_closed).
        closed = self._is_closed
        if isinstance(closed, defer.Deferred) and closed.called and not adapter.listened(closed):
            self._is_closed = CLOSED

    def _accepted(self) -> None:
        """The socket is open and daphne has let go of its handshake's deferred:
        shed what the handshake left."""
        if not adapter.listened(self._is_open):
            self._is_open = None
        if not adapter.listened(self._is_closed):
            self._is_closed = None
        self._shed()

    def _shed(self) -> None:
        """Rebuild the instance dict without the handshake's leftovers and the
        attributes that still hold their initial values (the class has the same
        ones), in a table sized for what is left (a dict never shrinks by itself):
        some 70 keys become none at all, what an open socket keeps being in its
        slots."""
        initial, d = self._INITIAL, self.__dict__
        drop = self._HANDSHAKE_ONLY
        if d.get("_listeners") is None and d.get("_valid_events") == ["message"] and d.get("_results") == {"message": None}:
            # txaio's event bookkeeping, unused while nothing listens (fire() returns
            # at once): the class's ("message",) and None stand in until on().
            drop = drop | {"_valid_events", "_results"}
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
        # autobahn's traffic counts, one object for the worker's sockets instead
        # of one each (nothing here reads them per socket).
        self.trafficStats = WORKER_TRAFFIC
        # (empty: nothing was sent yet)
        self.send_queue = SendQueue()
        # Frames go out as they are written (as asyncio's own transports do): a
        # small room event must not wait on the peer's delayed ACK (Nagle).
        with contextlib.suppress(Exception):
            self.transport.setTcpNoDelay(True)
        release_http_channel(self.transport)

    def _over_bound(self, pending: int | None = None) -> bool:
        """Whether the unsent bytes, with `pending` more (the gathered frames by
        default), pass the send bound; if so, close with 4013."""
        if pending is None:
            pending = gathered_size(_corked.get(self))
        if self.state == self.STATE_OPEN and unsent_bytes(self.transport) + pending > self.max_send_buffer:
            self._overflow(pending)
            return True
        return False

    def _overflow(self, dropped: int) -> None:
        """Close with 4013: `dropped` bytes could not be queued within the bound."""
        self.overflowed = True
        log.warning("closing a socket over its send bound: %d bytes unsent, %d more not queued",
                    unsent_bytes(self.transport), dropped)
        # The close frame queues behind the backlog; autobahn drops the TCP
        # connection when the peer does not answer it in time.
        self.sendClose(code=OVERLOADED)


assert not set(BoundedWebSocketProtocol._INITIAL) & set(BoundedWebSocketProtocol.__slots__)
for _name, _value in BoundedWebSocketProtocol._INITIAL.items():
    setattr(BoundedWebSocketProtocol, _name, _value)


def with_options_of(factory) -> type:
    """BoundedWebSocketProtocol with `factory`'s protocol options as class
    attributes: autobahn copies an option onto each new connection only where
    the protocol has none (some 30 keys less in every connection's dict)."""
    return type(
        "BoundedWebSocketProtocol", (BoundedWebSocketProtocol,),
        # (a function, perMessageCompressionAccept, must not become a method)
        {"__slots__": (), **{name: staticmethod(value) if isinstance(value, types.FunctionType) else value
                             for name in BoundedWebSocketProtocol.CONFIG_ATTRS
                             for value in [getattr(factory, name)]}},
    )
