"""The /ws/v1/ socket: a thin transport that decodes, validates, dispatches and replies.

Everything a frame may cause is in actions.py; this module only maps frame types to
actions through an explicit registry (a client can never reach a channel-layer
handler or a websocket_* method by naming it), and keeps per-connection stream
state: the rooms subscribed and the last seq sent in each.

Ordering: Channels runs one handler at a time per consumer, so while `subscribe`
replays the log, room events for that room wait in this consumer's local queue
(the worker's fan-out fills it, realtime/delivery/fanout.py). They
are delivered afterwards and dropped when their seq was already sent, which is the
"join first, buffer, read the log, flush without duplicates" order of DESIGN.md.
A live event whose seq skips ahead (the layer dropped one, or two workers' broadcasts
crossed) makes the consumer read the missing range from the log before sending it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Awaitable, Callable

import msgspec
from channels.db import database_sync_to_async
from channels.exceptions import StopConsumer
from channels.generic.websocket import AsyncWebsocketConsumer
from channels.layers import get_channel_layer
from channels.consumer import get_handler_name
from django.conf import settings

from accounts.models import probation_until, send_bucket
from accounts.sessions import session_is_valid, session_user

from realtime import protocol
from realtime.ws import authsweep
from realtime.ws import queues
from realtime.state import leases as connections
from realtime.state import heartbeat
from realtime.state import housekeeper
from realtime.state import presence
from realtime.state import ratelimit
from realtime.delivery import publish as broadcast
from realtime.domain import actions
from realtime.observability import metrics
from realtime.delivery.fanout import LocalQueue, fanout
from realtime.domain.actions import ActionError
from realtime.observability.logs import TRACE, clean_trace, event
from realtime.domain.policy import Action
from realtime.web.proxies import scope_address
from realtime.protocol import CloseCode, ErrorCode

log = logging.getLogger(__name__)
INFO, DEBUG, WARNING = logging.INFO, logging.DEBUG, logging.WARNING

# Close codes counted under their own label; anything else a client sends is "other".
KNOWN_CLOSE_CODES = {1000, 1001, 1005, 1006, 1009, 1011, 1012, 1013} | {int(c) for c in CloseCode}


def close_label(code) -> str:
    return str(code) if code in KNOWN_CLOSE_CODES else "other"


@dataclass(slots=True)
class Subscription:
    last_seq: int
    presence: bool = True
    # The room and this user's role in it, as read at subscribe and re-read on
    # every access.check (membership or visibility change): message.send checks
    # against it instead of reading them again for every message.
    access: actions.RoomAccess | None = None
    access_at: float = 0.0  # loop time it was read


UNREAD = object()
ACCESS_MAX_AGE = 30.0  # seconds a cached access is trusted without an access.check
SEND_BATCH_MAX = 32  # queued messages taken at once (receive_burst)


def message_ack(frame: protocol.Request, result: actions.MessageResult) -> protocol.MessageAck:
    return protocol.MessageAck(ref=frame.ref, room=result.room, id=result.id, seq=result.seq)


class RealtimeConsumer(AsyncWebsocketConsumer):
    codec: protocol.Codec = protocol.JSON
    write_frame = None
    revoked = False
    refused_in_row = 0
    metrics_task: asyncio.Task | None = None
    replaying = 0  # > 0 while a subscribe or a catch-up sends from the log
    probation_until = UNREAD  # read from the Account at the socket's first message.send
    handling = False  # a client frame is being handled: its reply goes first

    async def __call__(self, scope, receive, send):
        """channels' AsyncConsumer.__call__ without a channel-layer channel of the
        socket's own: what the layer has for this socket (its rooms' and its user's
        groups) comes from this worker's fan-out (realtime/delivery/fanout.py), straight to
        deliver() or through local_queue. A layer failure is the fan-out's to
        survive: it rejoins and sends `layer.recovered`. Under the daphne launcher
        this task alone serves both queues (realtime/ws/queues.py: no task for each)."""
        self.scope = scope
        self.channel_layer = get_channel_layer(self.channel_layer_alias)
        self.channel_name = None
        self.base_send = send
        # The server's prebuilt-frame write (realtime/server.py), when it has one.
        self.write_frame = ((scope.get("extensions") or {}).get("realtime.frames") or {}).get("write")
        self.local_queue = LocalQueue()
        # The server's queue of this socket's received messages, when `receive` is
        # its get (our daphne launcher's AppQueue, daphne's or channels' test
        # communicator's asyncio.Queue): frames already waiting in it are taken
        # together (receive_burst).
        inbox = getattr(receive, "__self__", None)
        self.inbox = inbox if isinstance(inbox, (queues.AppQueue, asyncio.Queue)) else None
        try:
            await queues.serve(receive, self.local_queue, self.dispatch)
        except StopConsumer:
            pass
        finally:
            if getattr(self, "authenticated", False):
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
            await self.dispatch_one(message)
            return
        if self.inbox is not None and self.inbox.qsize():
            await self.receive_burst(message)
        else:
            await self.dispatch_one(message)
        await self.send_held()

    async def send_held(self) -> None:
        """The room events that waited while this socket's frames were handled (a
        sender's own messages among them, which wait for its acks), sent right
        after the replies rather than one per turn of the socket's queues: a
        client with sends in flight would otherwise get its own messages one per
        frame it sends."""
        held = self.local_queue.items
        while held and held[0]["type"] == broadcast.ROOM_EVENT:
            await self.room_event(held.pop(0))

    async def dispatch_one(self, message: dict) -> None:
        handler = getattr(self, get_handler_name(message), None)
        if handler is None:
            raise ValueError(f"No handler for message type {message['type']}")
        await handler(message)

    # -- connection ---------------------------------------------------------
    async def connect(self) -> None:
        self.conn_id = uuid.uuid4().hex[:12]
        self.user = self.scope.get("user")
        self.subscriptions: dict[str, Subscription] = {}
        self.access_changes: dict[str, int] = {}  # room -> access.checks seen (deliver())
        self.authenticated = False
        offered = self.scope.get("subprotocols") or []
        chosen = next((name for name in offered if name in protocol.CODECS), None)
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
        if self.user is None or not self.user.is_authenticated or not self.user.is_active:
            # Accept first and then close, so that a browser can see why (4001).
            event(log, INFO, "ws.closed", conn_id=self.conn_id, code=int(CloseCode.NOT_AUTHENTICATED), reason="anonymous")
            await self.close(code=int(CloseCode.NOT_AUTHENTICATED))  # autobahn wants an exact int
            return
        verdict = await ratelimit.take(self.user.pk, "handshake.user")
        if not verdict.allowed:
            await self.refuse_handshake(verdict.retry_after, "user")
            return
        if not await connections.acquire(self.user.pk, self.conn_id):
            # Too many sockets for one user (on all workers together).
            event(log, INFO, "ws.closed", conn_id=self.conn_id, user_id=self.user.pk, code=int(CloseCode.POLICY),
                  reason="too-many-connections")
            await self.close(code=int(CloseCode.POLICY))
            return
        try:
            await fanout().add(broadcast.user_group(self.user.pk), self)
        except Exception:
            # The layer (Redis) is unreachable: come back later, with backoff.
            await connections.release(self.user.pk, self.conn_id)
            event(log, WARNING, "ws.closed", conn_id=self.conn_id, code=int(CloseCode.OVERLOADED), reason="layer-unavailable")
            await self.close(code=int(CloseCode.OVERLOADED))
            return
        self.authenticated = True
        self.auth_stamp = authsweep.stamp_of(self.user)  # what authsweep.py compares with
        self.last_frame_at = asyncio.get_running_loop().time()
        session = self.scope.get("session")
        self.session_key = getattr(session, "session_key", None)
        # The handshake is over and nothing here reads the request's headers
        # again: let them go (1.5 KiB a socket, the cookie's value among them).
        self.scope["headers"] = ()
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
        metrics.RATE_LIMITED.labels(f"handshake.{per}").inc()
        event(log, INFO, "ws.closed", conn_id=self.conn_id, user_id=getattr(self.user, "pk", None),
              code=int(CloseCode.RATE_LIMITED), reason=f"handshakes-per-{per}", addr=scope_address(self.scope))
        await self.send_frame(protocol.Error(code=ErrorCode.RATE_LIMITED, message="too many connections; wait",
                                             retry_after=retry_after))
        await self.close(code=int(CloseCode.RATE_LIMITED))

    async def disconnect(self, code: int) -> None:
        metrics.CLOSED.labels(close_label(code)).inc()
        if not self.authenticated:
            return
        self.authenticated = False
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

    # -- frames in ----------------------------------------------------------
    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        self.handling = True
        try:
            await self._receive(text_data, bytes_data)
        finally:
            self.handling = False

    async def _receive(self, text_data: str | None, bytes_data: bytes | None) -> None:
        if not self.authenticated or self.revoked:
            return
        self.last_frame_at = asyncio.get_running_loop().time()
        started = time.perf_counter()
        data = bytes_data if self.codec.binary else text_data
        if data is None:
            await self.send_frame(
                protocol.Error(code=ErrorCode.INVALID, message=f"{self.codec.name} expects {'binary' if self.codec.binary else 'text'} frames")
            )
            return
        try:
            frame = self.codec.decode(data)
        except protocol.ProtocolError as exc:
            TRACE.set(clean_trace(None))
            metrics.FRAMES_IN.labels("invalid").inc()
            event(log, INFO, "ws.refused", conn_id=self.conn_id, user_id=self.user.pk, frame="invalid", code=str(exc.code))
            # Bad frames have a bucket of their own: a stream of them is a flood too.
            verdict = await ratelimit.take(self.user.pk, "invalid")
            if not verdict.allowed:
                await self.refuse_flood(exc.ref, verdict.retry_after, "invalid")
                return
            await self.send_frame(exc.reply())
            return
        except Exception:
            # A decoder fault must cost one error frame, never the connection.
            metrics.FRAMES_IN.labels("invalid").inc()
            log.exception("ws decode fault", extra={"event": "ws.decode_fault", "conn_id": self.conn_id, "user_id": self.user.pk})
            await self.send_frame(protocol.Error(code=ErrorCode.INVALID, message="unreadable frame"))
            return
        if type(frame) is protocol.MessageSend:
            # One path for sends, alone or queued together.
            await self.handle_sends([frame])
            return
        tag = frame.__struct_config__.tag
        # The frame's trace id (or a new one) follows it to the log lines, the
        # published event and every delivery.
        TRACE.set(clean_trace(frame.trace))
        metrics.FRAMES_IN.labels(tag).inc()
        verdict = await ratelimit.take(self.user.pk, tag)
        if not verdict.allowed:
            await self.refuse_flood(frame.ref, verdict.retry_after, tag)
            return
        self.refused_in_row = 0
        handler = HANDLERS[type(frame)]
        try:
            reply = await handler(self, frame)
        except Exception as exc:
            reply = self.error_reply(frame, exc)
        await self.send_frame(reply)
        self.handled(frame, time.perf_counter() - started)

    def error_reply(self, frame: protocol.Request, exc: Exception) -> protocol.Error:
        """The reply to a frame whose action raised: the refusal it names, or an
        internal error (logged with its traceback, never with the frame's body)."""
        tag = frame.__struct_config__.tag
        if isinstance(exc, ActionError):
            event(log, INFO, "ws.refused", conn_id=self.conn_id, user_id=self.user.pk, frame=tag,
                  room=getattr(frame, "room", None), code=str(exc.code))
            return protocol.Error(code=exc.code, message=exc.message, ref=frame.ref, retry_after=exc.retry_after)
        log.error("ws internal error", exc_info=exc, extra={"event": "ws.internal_error", "conn_id": self.conn_id,
                                                             "user_id": self.user.pk, "frame": tag})
        return protocol.Error(code=ErrorCode.INTERNAL, message="internal error; nothing was changed", ref=frame.ref)

    def handled(self, frame: protocol.Request, elapsed: float) -> None:
        tag = frame.__struct_config__.tag
        metrics.HANDLING.labels(tag).observe(elapsed)
        event(log, DEBUG, "ws.frame", conn_id=self.conn_id, user_id=self.user.pk, frame=tag,
              room=getattr(frame, "room", None), ms=round(elapsed * 1000, 2))

    # -- bursts: frames that were already waiting ------------------------------
    async def receive_burst(self, first: dict) -> None:
        """Take what the server has queued behind `first` as well (up to
        SEND_BATCH_MAX messages) and handle it in order. Consecutive message.sends
        among them are handled as one batch (handle_sends); anything else is
        dispatched as usual between the batches. Replies keep the frames' order."""
        burst = [first]
        while len(burst) < SEND_BATCH_MAX and self.inbox.qsize():
            burst.append(self.inbox.get_nowait())
        sends: list[protocol.MessageSend] = []
        for message in burst:
            frame = self.queued_send(message)
            if frame is not None:
                sends.append(frame)
                continue
            if sends:
                await self.handle_sends(sends)
                sends = []
            await self.dispatch_one(message)
        if sends:
            await self.handle_sends(sends)

    def queued_send(self, message: dict) -> protocol.MessageSend | None:
        """The message.send a queued message carries; None for anything else (it
        takes the usual path, which answers a bad frame in its turn)."""
        if message["type"] != "websocket.receive" or not self.authenticated or self.revoked:
            return None
        data = message.get("bytes") if self.codec.binary else message.get("text")
        if data is None:
            return None
        try:
            frame = self.codec.decode(data)
        except Exception:
            return None
        return frame if type(frame) is protocol.MessageSend else None

    async def handle_sends(self, frames: list[protocol.MessageSend]) -> None:
        """message.sends, one alone or several that were waiting, each checked and
        written as if it came alone (its own token, permission check, write, seq
        and ack, in order), with one rate-limit call, one trip to the database
        thread and one publish for all of them."""
        if not self.authenticated or self.revoked:
            return
        self.handling = True
        try:
            self.last_frame_at = asyncio.get_running_loop().time()
            started = time.perf_counter()
            tag = "message.send"
            traces = [clean_trace(frame.trace) for frame in frames]
            TRACE.set(traces[0])
            metrics.FRAMES_IN.labels(tag).inc(len(frames))
            if self.probation_until is UNREAD:
                self.probation_until = await database_sync_to_async(probation_until)(self.user.pk)
            granted, retry_after = await ratelimit.take_up_to(self.user.pk, send_bucket(self.probation_until), len(frames))
            allowed = frames[:granted]
            if allowed:
                self.refused_in_row = 0
                outcomes = await database_sync_to_async(actions.message_send_many)(user=self.user, sends=[
                    {"slug": frame.room, "body": frame.body, "client_id": frame.client_id,
                     "access": self.cached_access(frame.room)}
                    for frame in allowed
                ])
                published = [(room_event, trace) for (_, events), trace in zip(outcomes, traces) for room_event in events]
                await broadcast.publish([e for e, _ in published], [t for _, t in published])
                for frame, trace, (result, _) in zip(allowed, traces, outcomes):
                    if not isinstance(result, Exception):
                        # The dashboard's "messages in" and "busiest rooms": what was accepted.
                        metrics.WINDOW.message_in(result.room)
                    TRACE.set(trace)
                    await self.send_frame(self.error_reply(frame, result) if isinstance(result, Exception)
                                          else message_ack(frame, result))
            for frame, trace in zip(frames[granted:], traces[granted:]):
                if self.revoked:
                    break
                TRACE.set(trace)
                await self.refuse_flood(frame.ref, retry_after, tag)
            elapsed = (time.perf_counter() - started) / len(frames)
            for frame in frames:
                self.handled(frame, elapsed)
        finally:
            self.handling = False

    async def refuse_flood(self, ref, retry_after: float, action: str) -> None:
        """Answer a rate-limited frame; close with 4029 a client that keeps going."""
        self.refused_in_row += 1
        metrics.RATE_LIMITED.labels(action).inc()
        metrics.WINDOW.limited()
        if self.refused_in_row > settings.REALTIME["FLOOD_CLOSE_AFTER"]:
            await self.shut(CloseCode.RATE_LIMITED, "flood")
            return
        await self.send_frame(
            protocol.Error(code=ErrorCode.RATE_LIMITED, message="too many; slow down", ref=ref, retry_after=retry_after)
        )

    async def send_frame(self, frame: protocol.Frame) -> None:
        """Encode and send one frame."""
        metrics.FRAMES_OUT.labels(frame.__struct_config__.tag).inc()
        if isinstance(frame, protocol.Error):
            metrics.ERRORS.labels(str(frame.code)).inc()
            metrics.WINDOW.error(str(frame.code))
        data = self.codec.encode(frame)
        if self.codec.binary:
            await self.send(bytes_data=data)
        else:
            await self.send(text_data=data.decode())

    def encode_all(self, events: list[protocol.RoomEvent]) -> list[bytes]:
        """Events from the log, encoded for this socket (their size is what a
        replay costs the user's budget)."""
        return [self.codec.encode(room_event) for room_event in events]

    async def send_all(self, encoded: list[bytes], events: list[protocol.RoomEvent]) -> None:
        for data, room_event in zip(encoded, events):
            metrics.FRAMES_OUT.labels(room_event.__struct_config__.tag).inc()
            if self.codec.binary:
                await self.send(bytes_data=data)
            else:
                await self.send(text_data=data.decode())

    # -- handlers (one per client frame type) ---------------------------------
    async def on_subscribe(self, frame: protocol.Subscribe) -> protocol.Frame:
        self.replaying += 1
        try:
            return await self._subscribe(frame)
        finally:
            self.replaying -= 1

    async def _subscribe(self, frame: protocol.Subscribe) -> protocol.Frame:
        slug = frame.room
        if slug not in self.subscriptions and len(self.subscriptions) >= settings.REALTIME["MAX_ROOMS_PER_CONNECTION"]:
            raise ActionError(ErrorCode.TOO_LARGE, "subscribed to too many rooms on this connection")
        since = frame.since
        current = self.subscriptions.get(slug)
        if since is None and current is not None:
            # Already live here: "from now" means from what this socket was sent.
            since = current.last_seq
        # The replay budget (ratelimit.py): while this worker knows the user in
        # debt, the log read stops at the head, and a replay that would send
        # anything is refused; one that sends nothing goes ahead.
        budget = ratelimit.replay_check(self.user.pk) if since is not None else ratelimit.ALLOWED
        # Join the stream before reading the log: nothing committed in between is lost.
        await fanout().add(broadcast.room_group(slug), self)
        changes = self.access_changes.get(slug, 0)
        try:
            replay = await database_sync_to_async(actions.room_replay)(
                user=self.user, slug=slug, since=since, head_only=not budget.allowed)
        except BaseException:
            # Refused (or failed): no stream for this room on this socket any more.
            if current is not None:
                await self.drop_subscription(slug)
            else:
                await fanout().discard(broadcast.room_group(slug), self)
            raise
        encoded = self.encode_all(replay.events)
        if replay.held_back or encoded:
            verdict = budget if replay.held_back else await ratelimit.replay_take(self.user.pk, sum(map(len, encoded)))
            if not verdict.allowed:
                # Replaying more than the budget (a reconnect loop): wait. A stream
                # already live here stays live (this was its repair); a new one is
                # not joined. The client subscribes again after retry_after.
                if current is None:
                    await fanout().discard(broadcast.room_group(slug), self)
                metrics.RATE_LIMITED.labels("replay").inc()
                raise ActionError(ErrorCode.RATE_LIMITED, "replaying too much; wait and subscribe again",
                                  retry_after=verdict.retry_after)
        await self.send_all(encoded, replay.events)
        metrics.REPLAYED.inc(len(replay.events))
        # A re-subscribe (the client asking to repair a gap) restarts from its since.
        unchanged = self.access_changes.get(slug, 0) == changes
        self.subscriptions[slug] = Subscription(
            last_seq=replay.head, presence=current.presence if current else frame.presence,
            access=replay.access if unchanged else None, access_at=asyncio.get_running_loop().time(),
        )
        if current is None and frame.presence:
            # Present in the room from now: announce a join (if this is the user's
            # first socket there), then tell this socket who is here.
            await presence.join(slug, self.user.pk, self.user.get_username(), self.conn_id)
            await presence.announce(slug, skip_conn=self.conn_id)
            await self.send_frame(protocol.PresenceState(room=slug, users=await presence.names(slug)))
        if current is None:
            markers = await database_sync_to_async(actions.read_markers)(slug=slug)
            if markers:
                await self.send_frame(protocol.ReadMarkers(room=slug, markers=markers))
        return protocol.SubscribeAck(ref=frame.ref, room=slug, seq=replay.head, replayed=len(replay.events))

    async def drop_subscription(self, slug: str) -> None:
        """Leave a room's stream and its presence (unsubscribe, access lost, broken stream)."""
        sub = self.subscriptions.pop(slug, None)
        if sub is None:
            return
        await fanout().discard(broadcast.room_group(slug), self)
        if sub.presence:
            await self.leave_presence(slug)

    async def leave_presence(self, slug: str) -> None:
        try:
            await presence.leave(slug, self.user.pk, self.user.get_username(), self.conn_id)
        except Exception:
            pass  # the lease runs out by itself
        presence.announce_later(slug)

    async def on_unsubscribe(self, frame: protocol.Unsubscribe) -> protocol.Frame:
        await self.drop_subscription(frame.room)
        return protocol.UnsubscribeAck(ref=frame.ref, room=frame.room)

    async def on_typing(self, frame: protocol.Typing) -> protocol.Frame:
        """Shown to the room's other subscribers; only those who may post may type."""
        await database_sync_to_async(actions.room_access)(user=self.user, slug=frame.room, action=Action.POST)
        sent = await presence.typing_allowed(frame.room, self.user.pk)
        if sent:
            await broadcast.publish_push(
                broadcast.room_group(frame.room),
                protocol.TypingNotice(room=frame.room, user=self.user.get_username()),
                room=frame.room,
                skip_user=self.user.pk,
            )
        return protocol.TypingAck(ref=frame.ref, room=frame.room, sent=sent)

    async def on_read(self, frame: protocol.Read) -> protocol.Frame:
        """Move the read position forward; tell the user's other sockets, and the
        room's members where the room shows read markers."""
        result = await database_sync_to_async(actions.mark_read)(user=self.user, slug=frame.room, seq=frame.seq)
        await broadcast.publish_read(result, self.user, skip_conn=self.conn_id)
        return protocol.ReadAck(ref=frame.ref, room=result.room, seq=result.seq)

    def cached_access(self, slug: str) -> actions.RoomAccess | None:
        """The room's access as this socket's subscription holds it, if it is young
        enough to trust (None: message_send reads it)."""
        sub = self.subscriptions.get(slug)
        if sub is None or asyncio.get_running_loop().time() - sub.access_at >= ACCESS_MAX_AGE:
            return None
        return sub.access

    async def on_message_edit(self, frame: protocol.MessageEdit) -> protocol.Frame:
        result = await actions.perform(
            actions.message_edit, user=self.user, slug=frame.room, message_id=frame.id, body=frame.body
        )
        return message_ack(frame, result)

    async def on_message_delete(self, frame: protocol.MessageDelete) -> protocol.Frame:
        result = await actions.perform(actions.message_delete, user=self.user, slug=frame.room, message_id=frame.id)
        return message_ack(frame, result)

    async def on_ping(self, frame: protocol.Ping) -> protocol.Frame:
        """Answer, and first catch up any subscribed room whose newest events never
        arrived live (a broadcast lost to a worker crash or the layer, in a room
        that has been quiet since, so no later event revealed the gap)."""
        await self.layer_recovered({})
        return protocol.Pong(ref=frame.ref, t=frame.t)

    async def on_metrics_subscribe(self, frame: protocol.MetricsSubscribe) -> protocol.Frame:
        """Staff only: a metrics.tick about once a second, from the cluster view."""
        if not self.user.is_staff:
            raise ActionError(ErrorCode.FORBIDDEN, "the metrics are for staff")
        if self.metrics_task is None or self.metrics_task.done():
            self.metrics_task = asyncio.ensure_future(self.tick_metrics())
        return protocol.MetricsAck(ref=frame.ref, metrics=True)

    async def on_metrics_unsubscribe(self, frame: protocol.MetricsUnsubscribe) -> protocol.Frame:
        if self.metrics_task is not None:
            self.metrics_task.cancel()
            self.metrics_task = None
        return protocol.MetricsAck(ref=frame.ref, metrics=False)

    async def tick_metrics(self) -> None:
        while True:
            try:
                records = await heartbeat.view()
                workers = [msgspec_convert(r) for r in records]
                await self.send_frame(protocol.MetricsTick(t=time.time(), workers=workers))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                event(log, WARNING, "ws.metrics_failed", conn_id=self.conn_id, reason=type(exc).__name__)
            await asyncio.sleep(heartbeat.EVERY)

    # -- channel-layer handlers (reachable from the layer only) ---------------
    async def layer_recovered(self, message: dict) -> None:
        """The layer is back (or a ping asks): send each room what was committed
        but not delivered, e.g. while the layer was down."""
        if not self.subscriptions:
            return
        # An access.check may have been lost with the rest: read access afresh.
        for sub in self.subscriptions.values():
            sub.access = None
        heads = await database_sync_to_async(actions.room_heads)(slugs=list(self.subscriptions))
        for slug, head in heads.items():
            sub = self.subscriptions.get(slug)
            if sub is not None and head > sub.last_seq:
                await self.catch_up(slug, sub, head)

    async def deliver(self, message: dict) -> bool:
        """The fan-out's fast path: send the room's next event straight away when
        nothing is ahead of it for this socket (no queued message, no replay, no
        frame of its own being answered, so a sender gets its ack before its own
        message; the seq right after the last one sent). False: queue it, and
        room_event takes it in order with everything else."""
        kind = message.get("type")
        if kind == broadcast.ACCESS_CHECK:
            # Forget the room's access at once, not when access_check gets its
            # turn: a message.send handled before that reads it afresh. A read
            # begun before this (a subscribe, an earlier check) is not kept.
            self.access_changes[message["room"]] = self.access_changes.get(message["room"], 0) + 1
            if message["room"] in self.subscriptions:
                self.subscriptions[message["room"]].access = None
        if kind != broadcast.ROOM_EVENT or self.replaying or self.handling or not self.local_queue.empty():
            return False
        sub = self.subscriptions.get(message["room"])
        if sub is None or self.revoked or message["seq"] != sub.last_seq + 1:
            return False
        await self.write_event(message, sub)  # the fan-out counts it (metrics.delivered)
        return True

    async def room_event(self, message: dict) -> None:
        """A committed event of a room: send it once, in seq order."""
        slug = message["room"]
        sub = self.subscriptions.get(slug)
        if sub is None or self.revoked:
            return
        seq = message["seq"]
        if seq <= sub.last_seq:
            return
        if seq > sub.last_seq + 1 and not await self.catch_up(slug, sub, seq - 1):
            return
        await self.write_event(message, sub)
        metrics.delivered(message)

    async def write_event(self, message: dict, sub: Subscription) -> None:
        await self.send_encoded(message)
        sub.last_seq = message["seq"]
        if log.isEnabledFor(DEBUG):
            log.debug("ws.deliver", extra={"event": "ws.deliver", "conn_id": self.conn_id, "user_id": self.user.pk,
                                           "room": message["room"], "seq": message["seq"],
                                           "trace_id": message.get("trace")})

    async def push(self, message: dict) -> None:
        """An ephemeral frame (typing, presence, read markers), encoded once upstream."""
        room = message.get("room")
        sub = self.subscriptions.get(room) if room is not None else None
        if self.revoked or (room is not None and sub is None):
            return
        if message.get("skip_user") == self.user.pk or message.get("skip_conn") == self.conn_id:
            return
        if message.get("presence") and not sub.presence:
            return
        await self.send_encoded(message)

    async def send_encoded(self, message: dict) -> None:
        """Send a layer message's payload as encoded upstream for this socket's codec:
        framed once per worker and written as is where the server allows it
        (realtime/server.py), through ASGI otherwise."""
        if self.write_frame is not None and self.write_frame(protocol.framed(message, self.codec)):
            return
        payload = message[self.codec.name]
        if self.codec.binary:
            await self.send(bytes_data=payload)
        else:
            await self.send(text_data=payload)

    async def session_check(self, message: dict) -> None:
        """The user's session may have ended (logout, password change, deactivation,
        deletion, expiry): if it has, close with 4003 and deliver nothing more."""
        if self.revoked or not self.authenticated:
            return
        if self.session_key not in message.get("revoked", ()) and await database_sync_to_async(session_is_valid)(
            self.session_key, self.user.pk
        ):
            return
        await self.shut(CloseCode.FORBIDDEN, "session-ended")

    async def auth_changed(self, message: dict) -> None:
        """The user's record changed behind the signals' back (realtime/ws/authsweep.py):
        check the session as a request would (close with 4003 if it ended), then
        take the user as they are now (staff or not) and check every room again."""
        if self.revoked or not self.authenticated:
            return
        user = await database_sync_to_async(session_user)(self.session_key, self.user.pk)
        if user is None:
            await self.shut(CloseCode.FORBIDDEN, "session-ended")
            return
        self.user, self.auth_stamp = user, authsweep.stamp_of(user)
        heartbeat.SOCKETS[self.conn_id] = (user.pk, user.get_username())
        if not user.is_staff and self.metrics_task is not None:
            self.metrics_task.cancel()
            self.metrics_task = None
        for slug in list(self.subscriptions):
            await self.access_check({"type": broadcast.ACCESS_CHECK, "room": slug})

    async def force_disconnect(self, message: dict) -> None:
        """An operator closed this user's sockets (the admin's realtime console)."""
        if self.revoked or not self.authenticated:
            return
        await self.shut(CloseCode.FORBIDDEN, "forced")

    async def shut(self, code: CloseCode, reason: str) -> None:
        """Close this socket for good: nothing more is handled or delivered."""
        self.revoked = True
        event(log, INFO, "ws.closed", conn_id=self.conn_id, user_id=self.user.pk, code=int(code), reason=reason)
        await self.close(code=int(code))

    async def access_check(self, message: dict) -> None:
        """A room's memberships or visibility changed: leave it if no longer allowed."""
        slug = message["room"]
        if slug not in self.subscriptions or self.revoked:
            return
        sub = self.subscriptions[slug]
        sub.access = None  # until read again: message.send reads it itself
        changes = self.access_changes.get(slug, 0)
        try:
            access = await database_sync_to_async(actions.room_access)(user=self.user, slug=slug, action=Action.VIEW)
        except ActionError as exc:
            await self.drop_subscription(slug)
            await self.send_frame(protocol.Error(code=exc.code, message=exc.message, room=slug))
            return
        if self.subscriptions.get(slug) is sub and self.access_changes.get(slug, 0) == changes:
            sub.access, sub.access_at = access, asyncio.get_running_loop().time()

    async def housekeeping_idle(self, message: dict) -> None:
        """Silent for REALTIME_IDLE_TIMEOUT s (realtime/state/housekeeper.py)."""
        await self.shut(CloseCode.POLICY, "idle")

    async def catch_up(self, slug: str, sub: Subscription, upto: int) -> bool:
        """Send the room's events after sub.last_seq up to `upto` from the log.
        On failure the subscription ends and the client is told to reload the room."""
        self.replaying += 1
        try:
            return await self._catch_up(slug, sub, upto)
        finally:
            self.replaying -= 1

    async def _catch_up(self, slug: str, sub: Subscription, upto: int) -> bool:
        try:
            missing = await database_sync_to_async(actions.room_events_between)(slug=slug, after=sub.last_seq, upto=upto)
        except Exception as exc:
            if not isinstance(exc, ActionError):
                log.exception("ws catch-up failed", extra={"event": "ws.catchup_failed", "conn_id": self.conn_id, "room": slug})
            await self.drop_subscription(slug)
            await self.send_frame(
                protocol.Error(
                    code=ErrorCode.RECOVERY_FAILED,
                    message="this room's stream broke off; reload it and subscribe again",
                    room=slug,
                )
            )
            return False
        # Gap repair: counted against the replay budget, never refused (the gap
        # is the server's doing, not the client's).
        encoded = self.encode_all(missing)
        if encoded:
            await ratelimit.replay_take(self.user.pk, sum(map(len, encoded)), force=True)
        await self.send_all(encoded, missing)
        metrics.REPLAYED.inc(len(missing))
        if missing:
            sub.last_seq = missing[-1].seq
        return True


Handler = Callable[[RealtimeConsumer, protocol.Request], Awaitable[protocol.Frame]]

HANDLERS: dict[type[protocol.Request], Handler] = {
    protocol.Subscribe: RealtimeConsumer.on_subscribe,
    protocol.Unsubscribe: RealtimeConsumer.on_unsubscribe,
    protocol.MessageEdit: RealtimeConsumer.on_message_edit,
    protocol.MessageDelete: RealtimeConsumer.on_message_delete,
    protocol.Typing: RealtimeConsumer.on_typing,
    protocol.Read: RealtimeConsumer.on_read,
    protocol.Ping: RealtimeConsumer.on_ping,
    protocol.MetricsSubscribe: RealtimeConsumer.on_metrics_subscribe,
    protocol.MetricsUnsubscribe: RealtimeConsumer.on_metrics_unsubscribe,
}


def msgspec_convert(record: dict) -> protocol.WorkerFigures:
    """A heartbeat record as the tick's WorkerFigures (other keys stay out)."""
    fields = {name: record[name] for name in protocol.WorkerFigures.__struct_fields__ if name in record}
    return msgspec.convert(fields, protocol.WorkerFigures)
# message.send has handle_sends (one path for a send alone or a batch of them).
assert set(HANDLERS) | {protocol.MessageSend} == set(protocol.CLIENT_FRAMES), "every client frame needs exactly one handler"
