"""Frames in: decode, validate, rate-limit, dispatch through the handler registry
(ws/handlers.py), reply. Frames that were already waiting are taken together: a run
of message.sends is handled as one batch (one take from the rate limit, usually
from the worker's reserve with no call to Redis; one write, on PostgreSQL from the
loop's own connection, else in the database thread; one publish), each with its
own checks, seq and reply, in order.
A client that keeps sending past its limits is answered `rate_limited` and then
closed with 4029. A part of RealtimeConsumer (ws/consumer.py).
"""

from __future__ import annotations

import asyncio
import logging
import time

from channels.db import database_sync_to_async
from django.conf import settings

from accounts.models import probation_until, send_bucket

from realtime import protocol
from realtime.domain import services
from realtime.domain.errors import ActionError
from realtime.observability import metrics, tracing
from realtime.observability.logs import TRACE, clean_trace, event
from realtime.protocol import CloseCode, ErrorCode
from realtime.state import ratelimit

log = logging.getLogger(__name__)
INFO, DEBUG, WARNING = logging.INFO, logging.DEBUG, logging.WARNING
from realtime.ws.handlers import HANDLERS, message_ack

UNREAD = object()
SEND_BATCH_MAX = 32  # queued messages taken at once (receive_burst)


class Intake:
    """Frames in (a part of RealtimeConsumer)."""

    refused_in_row = 0
    handling = False  # a client frame (its reply goes first) or a queued message is being handled
    probation_until = UNREAD  # read from the Account at the socket's first message.send

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
            metrics.labelled(metrics.FRAMES_IN, "invalid").inc()
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
            metrics.labelled(metrics.FRAMES_IN, "invalid").inc()
            log.exception("ws decode fault", extra={"event": "ws.decode_fault", "conn_id": self.conn_id, "user_id": self.user.pk})
            await self.send_frame(protocol.Error(code=ErrorCode.INVALID, message="unreadable frame"))
            return
        if type(frame) is protocol.MessageSend:
            # One path for sends, alone or queued together.
            await self.handle_sends([frame])
            return
        if tracing.ENABLED:
            with tracing.span(f"ws {frame.__struct_config__.tag}", tracing.SERVER, conn_id=self.conn_id,
                              user_id=self.user.pk, room=getattr(frame, "room", None)):
                await self.handle_one(frame, started)
        else:
            await self.handle_one(frame, started)

    async def handle_one(self, frame: protocol.Request, started: float) -> None:
        """Any frame but message.send: rate-limit, dispatch, reply."""
        tag = frame.__struct_config__.tag
        # The frame's trace id (or a new one) follows it to the log lines, the
        # published event and every delivery.
        TRACE.set(clean_trace(frame.trace))
        metrics.labelled(metrics.FRAMES_IN, tag).inc()
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
        metrics.labelled(metrics.HANDLING, tag).observe(elapsed)
        event(log, DEBUG, "ws.frame", conn_id=self.conn_id, user_id=self.user.pk, frame=tag,
              room=getattr(frame, "room", None), ms=round(elapsed * 1000, 2))

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
        and ack, in order), with one take from the rate limit, one write (the
        loop's own connection on PostgreSQL, else the database thread) and one
        publish for all of them."""
        if not self.authenticated or self.revoked:
            return
        if tracing.ENABLED:
            rooms = {frame.room for frame in frames}
            with tracing.span("ws message.send", tracing.SERVER, conn_id=self.conn_id, user_id=self.user.pk,
                              frames=len(frames), room=rooms.pop() if len(rooms) == 1 else None):
                await self._handle_sends(frames)
        else:
            await self._handle_sends(frames)

    async def _handle_sends(self, frames: list[protocol.MessageSend]) -> None:
        self.handling = True
        try:
            self.last_frame_at = asyncio.get_running_loop().time()
            started = time.perf_counter()
            tag = "message.send"
            traces = [clean_trace(frame.trace) for frame in frames]
            TRACE.set(traces[0])
            metrics.labelled(metrics.FRAMES_IN, tag).inc(len(frames))
            if self.probation_until is UNREAD:
                self.probation_until = await database_sync_to_async(probation_until)(self.user.pk)
            asked = time.perf_counter()
            granted, retry_after = await ratelimit.take_up_to(self.user.pk, send_bucket(self.probation_until), len(frames),
                                                              reserve=True)
            metrics.labelled(metrics.SEND_STEP, "rate_limit").observe(time.perf_counter() - asked)
            allowed = frames[:granted]
            if allowed:
                self.refused_in_row = 0
                results = await services.send_messages(user=self.user, traces=traces[:granted], sends=[
                    {"slug": frame.room, "body": frame.body, "client_id": frame.client_id,
                     "access": self.cached_access(frame.room)}
                    for frame in allowed
                ])
                for frame, trace, result in zip(allowed, traces, results):
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
        metrics.labelled(metrics.RATE_LIMITED, action).inc()
        metrics.WINDOW.limited()
        if self.refused_in_row > settings.REALTIME["FLOOD_CLOSE_AFTER"]:
            await self.shut(CloseCode.RATE_LIMITED, "flood")
            return
        await self.send_frame(
            protocol.Error(code=ErrorCode.RATE_LIMITED, message="too many; slow down", ref=ref, retry_after=retry_after)
        )
