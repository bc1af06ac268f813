"""The /ws/v1/ socket: its life (the handshake's checks, open, close, the session's
end) and the parts it is made of, each a module of its own:

- ws/intake.py: frames in (decode, validate, rate-limit, bursts, floods);
- ws/handlers.py: one handler per frame type, and the registry;
- ws/stream.py: the delivery guarantee (subscribe, replay, dedupe, gap repair);
- what an action does is in domain/, who may do it in domain/policy.py.

Messages a socket is handed (room events, pushes, session and access checks, the
housekeeper's idle close) come from the worker's fan-out (delivery/fanout.py) and
housekeeper (state/housekeeper.py), never from a client: `dispatch` maps a
message's type to the method of the same name.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import time

from asgiref.sync import markcoroutinefunction
from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from channels.layers import get_channel_layer
from channels.consumer import get_handler_name

from django.utils.crypto import constant_time_compare

from accounts import identities
from accounts.sessions import session_is_valid, session_user

from realtime import protocol
from realtime.delivery import publish as broadcast
from realtime.delivery.fanout import fanout
from realtime.observability import metrics
from realtime.observability.logs import TRACE, event
from realtime.protocol import CloseCode, ErrorCode
from realtime.state import degraded, heartbeat, housekeeper, presence, ratelimit
from realtime.state import leases as connections
from realtime.web.proxies import scope_address
from realtime.ws import authsweep, queues
from realtime.ws.queues import LocalQueue

log = logging.getLogger(__name__)
INFO, DEBUG, WARNING = logging.INFO, logging.DEBUG, logging.WARNING
from realtime.ws.handlers import Handlers
from realtime.ws.intake import Intake
from realtime.ws.stream import NO_ROOMS, Stream, Subscription

# Close codes counted under their own label; anything else a client sends is "other".
KNOWN_CLOSE_CODES = {1005} | {int(c) for c in CloseCode} | {int(c) for c in protocol.TransportCode}


# The scope's keys that only the handshake reads (the server's and the
# middleware's): gone once the socket is open.
# What is left: type, path, client, user and session.
HANDSHAKE_ONLY = frozenset({
    "headers", "query_string", "root_path", "extensions", "subprotocols", "raw_path", "server", "asgi",
    # the TCP peer behind a trusted proxy (realtime/web/proxies.py: "client" is
    # the client's own address), and whether a ticket opened it (accounts/middleware.py)
    "peer", "ticket",
})


def compact(scope: dict, drop: frozenset) -> None:
    """`scope` without the keys in `drop`, in a table sized for what is left: the
    same dict (the middleware's frame holds it too), rebuilt."""
    kept = {key: value for key, value in scope.items() if key not in drop}
    scope.clear()
    scope.update(kept)


def close_label(code) -> str:
    return str(code) if code in KNOWN_CLOSE_CODES else "other"


class RealtimeConsumer(queues.Served, Intake, Handlers, Stream, AsyncWebsocketConsumer):
    codec: protocol.Codec = protocol.JSON
    writer = None  # the server's prebuilt-frame writer (realtime/server/bounded.py), when it has one
    revoked = False
    grant = None  # a token socket's accounts.bearer.Grant (None: a session's socket)
    expiry: asyncio.TimerHandle | None = None  # the token's `exp`, as a timer
    channel_name = None  # (no channel-layer channel of its own: __call__)
    groups = ()  # (channels' own list of groups to join: none, the fan-out joins them)

    def __init__(self, *args, **kwargs):
        """Every attribute a socket sets in its life, set now, in one order, to the
        value it starts with (as the class or connect() would give it). CPython
        (3.11) keeps an instance's attributes in a small array beside a table of
        names the class shares, but that table takes new names only from the
        first few instances made: a storm makes hundreds of consumers before the
        first one's connect() runs, names set after that do not fit, and each
        socket got a dict of its own instead (0.8 KiB). Made here, the first
        instance names them all."""
        super().__init__(*args, **kwargs)
        self.scope = self.channel_layer = self.base_send = None
        self.writer = None
        self.local_queue = self.inbox = None
        self.conn_id = self.user = None
        self.subscriptions = self.access_changes = self.checking = None
        self.authenticated = False
        self.codec = protocol.JSON
        self.auth_stamp = self.session_key = self.grant = None
        self.last_frame_at = self.opened_at = self.next_session_check = 0.0
        self.handling = False
        self.refused_in_row = self.replaying = 0
        self.probation_until = Intake.probation_until
        self.revoked = False
        self.expiry = self.metrics_task = None

    @classmethod
    def as_asgi(cls, **initkwargs):
        """channels' as_asgi, but the app is not a coroutine of its own: it hands
        back the consumer's, so that no frame of it waits for the socket's whole
        life (some 300 B a socket). Marked as a coroutine function, as ASGI servers
        and asgiref tell an ASGI 3 app by that."""

        def app(scope, receive, send):
            return cls(**initkwargs)(scope, receive, send)

        def after_admission(admit, scope, receive, send):
            """The socket's coroutine, which runs the middleware's `admit(scope)`
            first (accounts/middleware.py): one frame where there were two."""
            return cls(**initkwargs)(scope, receive, send, admit)

        app.after_admission = after_admission
        app.consumer_class = cls
        app.consumer_initkwargs = initkwargs
        functools.update_wrapper(app, cls, updated=())
        return markcoroutinefunction(app)

    def begin(self, scope, receive, send) -> None:
        """channels' AsyncConsumer.__call__ without a channel-layer channel of the
        socket's own: what the layer has for this socket (its rooms' and its user's
        groups) comes from this worker's fan-out (realtime/delivery/fanout.py), straight to
        deliver() or through local_queue. A layer failure is the fan-out's to
        survive: it rejoins and sends `layer.recovered`. The socket is then served
        by queues.Served.__call__ (one coroutine, no task for each queue)."""
        self.scope = scope
        self.channel_layer = get_channel_layer(self.channel_layer_alias)
        self.base_send = send
        # The server's prebuilt-frame writer (realtime/server/bounded.py), when it has one.
        self.writer = (scope.get("extensions") or {}).get("realtime.frames")
        self.local_queue = LocalQueue()
        # The server's queue of this socket's received messages, when `receive` is
        # its get (our daphne launcher's AppQueue, daphne's or channels' test
        # communicator's asyncio.Queue): frames already waiting in it are taken
        # together (receive_burst).
        inbox = getattr(receive, "__self__", None)
        self.inbox = inbox if isinstance(inbox, (queues.AppQueue, asyncio.Queue)) else None

    async def end(self) -> None:
        if self.authenticated:
            # The app ended without a disconnect (a handler raised, or daphne
            # cancelled it): give back the leases, the presence and the groups
            # all the same, or the housekeeper would renew them for ever.
            with contextlib.suppress(BaseException):
                await self.disconnect(1011)

    async def dispatch(self, message: dict) -> None:
        """channels' dispatch without its `aclose_old_connections()` before every
        message: that is a hop to the database thread for each room event delivered
        (a quarter of a busy worker's time, measured with py-spy). Every database
        access here goes through database_sync_to_async, which closes stale
        connections around itself."""
        if message["type"] != "websocket.receive":
            # A message of the socket's own queue in hand (a session or access check
            # reading the database, a catch-up from the log): what the fan-out brings
            # meanwhile waits behind it (Stream.nothing_ahead), as it would have
            # waited in the queue, so a check that ends the socket is sent nothing
            # after it.
            self.handling = True
            try:
                await self.dispatch_one(message)
            finally:
                self.handling = False
            return
        # A frame's trace id (set while it is handled: ws/intake.py) is its own:
        # once it is answered, the socket's log lines carry none, and its task's
        # context lets go of it (some 200 B an idle socket).
        token = TRACE.set(None)
        try:
            if self.inbox is not None and self.inbox.qsize():
                await self.receive_burst(message)
            else:
                await self.dispatch_one(message)
            await self.send_held()
        finally:
            TRACE.reset(token)

    async def dispatch_one(self, message: dict) -> None:
        handler = getattr(self, get_handler_name(message), None)
        if handler is None:
            raise ValueError(f"No handler for message type {message['type']}")
        await handler(message)

    async def connect(self) -> None:
        self.conn_id = os.urandom(6).hex()  # (48 random bits, as uuid4().hex[:12] gave, at a third of the cost)
        self.user = self.scope.get("user")
        self.subscriptions: dict[str, Subscription] = {}
        # room -> access.checks seen (deliver()), room -> access.checks being read
        # now (no fast path meanwhile): each a dict from its first room on
        self.access_changes = self.checking = NO_ROOMS
        self.authenticated = False
        # (the subprotocols offered leave the scope: only this reads them)
        offered = self.scope.pop("subprotocols", None) or []
        # The codec's own name, not the header's copy of it: the server keeps it
        # for the socket's life (as the protocol in use).
        chosen = next((protocol.CODECS[name].name for name in offered if name in protocol.CODECS), None)
        if offered and chosen is None:
            # The client speaks none of our versions: refuse the handshake (HTTP 403).
            event(log, INFO, "ws.refused", conn_id=self.conn_id, reason="subprotocol")
            await self.close()
            return
        self.codec = protocol.CODECS[chosen or protocol.SUBPROTOCOL_JSON]
        await self.accept(subprotocol=chosen)
        if "throttled" in self.scope:
            # Too many handshakes from this address (accounts/middleware.py).
            await self.refuse_handshake(self.scope["throttled"], "address")
            return
        if self.scope.get("unavailable"):
            # Its ticket could not be read (state/degraded.py): retry with backoff.
            event(log, WARNING, "ws.closed", conn_id=self.conn_id, code=int(CloseCode.OVERLOADED),
                  reason="tickets-unavailable")
            await self.close(code=int(CloseCode.OVERLOADED))
            return
        if self.user is None or not self.user.is_authenticated or not self.user.is_active:
            # Accept first and then close, so that a browser can see why (4001).
            event(log, INFO, "ws.closed", conn_id=self.conn_id, code=int(CloseCode.NOT_AUTHENTICATED), reason="anonymous")
            await self.close(code=int(CloseCode.NOT_AUTHENTICATED))  # autobahn wants an exact int
            return
        # The user's handshake bucket and the socket's lease, asked for together (one
        # round trip where there were two, in a storm's Redis pipeline); a lease
        # taken for a socket the bucket refuses is given back (shielded: a socket
        # cancelled meanwhile still gives it back).
        verdict, leased = await asyncio.gather(ratelimit.take(self.user.pk, "handshake.user"),
                                               connections.acquire(self.user.pk, self.conn_id))
        if not verdict.allowed:
            if leased:
                await asyncio.shield(connections.release(self.user.pk, self.conn_id))
            await self.refuse_handshake(verdict.retry_after, "user")
            return
        if not leased:
            # Too many sockets for one user (on all workers together).
            event(log, INFO, "ws.closed", conn_id=self.conn_id, user_id=self.user.pk, code=int(CloseCode.POLICY),
                  reason="too-many-connections")
            await self.close(code=int(CloseCode.POLICY))
            return
        try:
            await fanout().add(broadcast.user_group(self.user.pk), self)
        except Exception as exc:
            # The transport (Redis) is unreachable: come back later, with backoff.
            degraded.tolerate(degraded.NEW_SOCKETS, exc)
            await connections.release(self.user.pk, self.conn_id)
            event(log, WARNING, "ws.closed", conn_id=self.conn_id, code=int(CloseCode.OVERLOADED), reason="layer-unavailable")
            await self.close(code=int(CloseCode.OVERLOADED))
            return
        self.authenticated = True
        self.auth_stamp = authsweep.stamp_of(self.user)  # what authsweep.py compares with
        self.last_frame_at = asyncio.get_running_loop().time()
        session = self.scope.get("session")
        self.session_key = getattr(session, "session_key", None)
        self.grant = self.scope.pop("grant", None)
        if self.grant is not None:
            self.expire_at(self.grant.exp)
        # The handshake is over and nothing here reads the request's headers, its
        # query or the server's extensions again (the frame writers are read
        # above, the denial response is past): let them go (1.5 KiB a socket with
        # the cookie's value among them, and 0.5 KiB), and rebuild the scope's
        # table for what is left (a dict never shrinks by itself).
        compact(self.scope, drop=HANDSHAKE_ONLY)
        housekeeper.add(self)
        self.opened_at = time.monotonic()
        metrics.CONNECTIONS.inc()
        metrics.OPENED.inc()
        heartbeat.SOCKETS[self.conn_id] = (self.user.pk, self.user.get_username())
        heartbeat.ensure_started()
        presence.ensure_started()
        event(log, INFO, "ws.open", conn_id=self.conn_id, user_id=self.user.pk, codec=self.codec.name,
              addr=scope_address(self.scope))

    async def refuse_handshake(self, retry_after: float, per: str) -> None:
        """Too many sockets opened (per client address or per user): say how long
        to wait, then close with 4029. Nothing else is done for this socket."""
        metrics.labelled(metrics.RATE_LIMITED, f"handshake.{per}").inc()
        event(log, INFO, "ws.closed", conn_id=self.conn_id, user_id=getattr(self.user, "pk", None),
              code=int(CloseCode.RATE_LIMITED), reason=f"handshakes-per-{per}", addr=scope_address(self.scope))
        await self.send_frame(protocol.Error(code=ErrorCode.RATE_LIMITED, message="too many connections; wait",
                                             retry_after=retry_after))
        await self.close(code=int(CloseCode.RATE_LIMITED))

    async def disconnect(self, code: int) -> None:
        metrics.labelled(metrics.CLOSED, close_label(code)).inc()
        if not self.authenticated:
            return
        self.authenticated = False
        if self.expiry is not None:
            self.expiry.cancel()
        housekeeper.discard(self)
        if self.metrics_task is not None:
            self.metrics_task.cancel()
        metrics.CONNECTIONS.dec()
        heartbeat.SOCKETS.pop(self.conn_id, None)
        for slug, sub in list(self.subscriptions.items()):
            await fanout().discard(broadcast.room_group(slug), self)
            if sub.presence:
                await self.leave_presence(slug)
        self.subscriptions.clear()
        await fanout().discard(broadcast.user_group(self.user.pk), self)
        await connections.release(self.user.pk, self.conn_id)
        event(log, INFO, "ws.close", conn_id=self.conn_id, user_id=self.user.pk, code=code,
              duration_s=round(time.monotonic() - self.opened_at, 3))

    async def send_frame(self, frame: protocol.Frame) -> None:
        """Encode and send one frame: framed here and written as is where the server
        allows it (realtime/server/bounded.py: at the end of this turn of the loop,
        in order with everything else this socket is sent), through ASGI otherwise.
        A reply costs a WebSocket header in front of its bytes, not a trip through
        daphne's reply handler and autobahn's framing."""
        metrics.labelled(metrics.FRAMES_OUT, frame.__struct_config__.tag).inc()
        if isinstance(frame, protocol.Error):
            metrics.labelled(metrics.ERRORS, str(frame.code)).inc()
            metrics.WINDOW.error(str(frame.code))
        data = self.codec.encode(frame)
        if self.writer is not None and self.writer.write_frame(protocol.websocket_frame(data, self.codec.binary)):
            return
        await self.send_payload(data)

    async def send_payload(self, data: bytes | str) -> None:
        """One encoded frame through ASGI (a server that takes no prebuilt frames)."""
        if self.codec.binary:
            await self.send(bytes_data=data)
        else:
            await self.send(text_data=data if isinstance(data, str) else data.decode())

    async def session_check(self, message: dict) -> None:
        """The user's session may have ended (logout, password change, deactivation,
        deletion, expiry): if it has, close with 4001 (signed out: the page offers the
        login) and deliver nothing more. A token socket has no session: its user
        is checked instead (deactivated, or the password changed: 4001)."""
        if self.revoked or not self.authenticated:
            return
        if self.grant is not None:
            if await self.token_user() is None:
                await self.shut(CloseCode.NOT_AUTHENTICATED, "user-revoked")
            return
        if self.session_key not in message.get("revoked", ()) and await database_sync_to_async(session_is_valid)(
            self.session_key, self.user.pk
        ):
            return
        await self.shut(CloseCode.NOT_AUTHENTICATED, "session-ended")

    async def auth_changed(self, message: dict) -> None:
        """The user's record changed behind the signals' back (realtime/ws/authsweep.py):
        check the session as a request would (close with 4001 if it ended), then
        take the user as they are now (staff or not) and check every room again."""
        if self.revoked or not self.authenticated:
            return
        if self.grant is not None:
            user = await self.token_user()
        else:
            user = await database_sync_to_async(session_user)(self.session_key, self.user.pk)
        if user is None:
            await self.shut(CloseCode.NOT_AUTHENTICATED, "user-revoked" if self.grant else "session-ended")
            return
        self.user, self.auth_stamp = user, authsweep.stamp_of(user)
        heartbeat.SOCKETS[self.conn_id] = (user.pk, user.get_username())
        if not user.is_staff and self.metrics_task is not None:
            self.metrics_task.cancel()
            self.metrics_task = None
        for slug in list(self.subscriptions):
            await self.access_check({"type": broadcast.ACCESS_CHECK, "room": slug})

    # -- a token socket (accounts/bearer.py) ------------------------------------
    async def token_user(self):
        """The token's user as the database has them now, while active and with the
        password they had when the socket opened (a changed password revokes, as it
        ends sessions); else None."""
        users = await database_sync_to_async(identities.active_users)([self.user.pk])
        user = users.get(self.user.pk)
        if user is None or not constant_time_compare(user.password, self.user.password):
            return None
        return user

    def expire_at(self, exp: float) -> None:
        """Close with 4001 at `exp` (Unix seconds), unless a fresh token comes first."""
        if self.expiry is not None:
            self.expiry.cancel()
        loop = asyncio.get_running_loop()
        self.expiry = loop.call_at(loop.time() + max(0.0, exp - time.time()),
                                   self.local_queue.put_nowait, {"type": "auth.expired"})

    async def auth_expired(self, message: dict) -> None:
        if self.revoked or not self.authenticated or self.grant is None:
            return
        if time.time() < self.grant.exp:
            return  # refreshed meanwhile
        await self.shut(CloseCode.NOT_AUTHENTICATED, "token-expired")

    async def force_disconnect(self, message: dict) -> None:
        """An operator closed this user's sockets (the admin's realtime console): 4003,
        which the page tells apart from a session that ended (4001)."""
        if self.revoked or not self.authenticated:
            return
        await self.shut(CloseCode.FORBIDDEN, "forced")

    async def shut(self, code: CloseCode, reason: str) -> None:
        """Close this socket for good: nothing more is handled or delivered."""
        self.revoked = True
        event(log, INFO, "ws.closed", conn_id=self.conn_id, user_id=self.user.pk, code=int(code), reason=reason)
        await self.close(code=int(code))

    async def housekeeping_idle(self, message: dict) -> None:
        """Silent for REALTIME_IDLE_TIMEOUT s (realtime/state/housekeeper.py)."""
        await self.shut(CloseCode.POLICY, "idle")
