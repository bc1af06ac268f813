"""One handler per client frame type, and the registry that is the only way a
client frame reaches code: a client can never reach a channel-layer handler or a
websocket_* method by naming it. What each action does is in domain/; a handler
turns a frame into a call and the result into a reply. message.send is handled in
ws/intake.py (alone or in a batch), subscribe in ws/stream.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable

import msgspec
from channels.db import database_sync_to_async


from accounts import bearer
from realtime import protocol
from realtime.delivery import publish as broadcast
from realtime.domain.access import room_access
from realtime.domain import services
from realtime.domain.errors import ActionError
from realtime.domain.policy import Action
from realtime.observability.logs import event
from realtime.protocol import CloseCode, ErrorCode
from realtime.state import heartbeat

log = logging.getLogger(__name__)
INFO, DEBUG, WARNING = logging.INFO, logging.DEBUG, logging.WARNING
from realtime.ws.stream import Stream


def message_ack(frame: protocol.Request, result: services.MessageResult) -> protocol.MessageAck:
    return protocol.MessageAck(ref=frame.ref, room=result.room, id=result.id, seq=result.seq)


def reaction_ack(frame: protocol.Request, result: services.ReactionResult) -> protocol.ReactionAck:
    return protocol.ReactionAck(ref=frame.ref, room=result.room, id=result.id, emoji=result.emoji, seq=result.seq)


class Handlers:
    """The handlers (a part of RealtimeConsumer)."""

    metrics_task: asyncio.Task | None = None

    async def on_unsubscribe(self, frame: protocol.Unsubscribe) -> protocol.Frame:
        await self.drop_subscription(frame.room)
        return protocol.UnsubscribeAck(ref=frame.ref, room=frame.room)

    async def on_typing(self, frame: protocol.Typing) -> protocol.Frame:
        """Shown to the room's other subscribers; only those who may post may type."""
        await database_sync_to_async(room_access)(user=self.user, slug=frame.room, action=Action.POST)
        sent = await broadcast.publish_typing(self.user, frame.room)
        return protocol.TypingAck(ref=frame.ref, room=frame.room, sent=sent)

    async def on_read(self, frame: protocol.Read) -> protocol.Frame:
        """Move the read position forward; tell the user's other sockets, and the
        room's members where the room shows read markers."""
        result = await database_sync_to_async(services.mark_read)(user=self.user, slug=frame.room, seq=frame.seq)
        await broadcast.publish_read(result, self.user, skip_conn=self.conn_id)
        return protocol.ReadAck(ref=frame.ref, room=result.room, seq=result.seq)

    async def on_message_edit(self, frame: protocol.MessageEdit) -> protocol.Frame:
        result = await services.perform(
            services.message_edit, user=self.user, slug=frame.room, message_id=frame.id, body=frame.body
        )
        return message_ack(frame, result)

    async def on_message_delete(self, frame: protocol.MessageDelete) -> protocol.Frame:
        result = await services.perform(services.message_delete, user=self.user, slug=frame.room, message_id=frame.id)
        return message_ack(frame, result)

    async def on_reaction_add(self, frame: protocol.ReactionAdd) -> protocol.Frame:
        result = await services.perform(
            services.reaction_add, user=self.user, slug=frame.room, message_id=frame.id, emoji=frame.emoji
        )
        return reaction_ack(frame, result)

    async def on_reaction_remove(self, frame: protocol.ReactionRemove) -> protocol.Frame:
        result = await services.perform(
            services.reaction_remove, user=self.user, slug=frame.room, message_id=frame.id, emoji=frame.emoji
        )
        return reaction_ack(frame, result)

    async def on_ping(self, frame: protocol.Ping) -> protocol.Frame:
        """Answer, and first catch up any subscribed room whose newest events never
        arrived live (a broadcast lost to a worker crash or the layer, in a room
        that has been quiet since, so no later event revealed the gap)."""
        await self.layer_recovered({})
        return protocol.Pong(ref=frame.ref, t=frame.t)

    async def on_auth_refresh(self, frame: protocol.AuthRefresh) -> protocol.Frame:
        """A token socket's fresh token (accounts/bearer.py): the same user's, valid;
        the socket then lives until its `exp`. A refused token changes nothing (the
        socket still closes at the old `exp`) and is logged without the token."""
        if self.grant is None:
            raise ActionError(ErrorCode.INVALID, "this socket was not opened with a token")
        try:
            grant = bearer.verify(frame.token)
        except bearer.Refused as refused:
            bearer.refused_log(refused.reason, refused.kid)
            raise ActionError(ErrorCode.INVALID, f"token refused: {refused.reason}") from None
        if grant.user_id != self.user.pk:
            bearer.refused_log("other-user", grant.kid)
            raise ActionError(ErrorCode.FORBIDDEN, "the token is another user's")
        if await self.token_user() is None:
            await self.shut(CloseCode.NOT_AUTHENTICATED, "user-revoked")
            raise ActionError(ErrorCode.INVALID, "token refused: user")
        self.grant = grant
        self.expire_at(grant.exp)
        return protocol.AuthAck(ref=frame.ref, exp=int(grant.exp))

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


Handler = Callable[..., Awaitable[protocol.Frame]]

HANDLERS: dict[type[protocol.Request], Handler] = {
    protocol.Subscribe: Stream.on_subscribe,
    protocol.Unsubscribe: Handlers.on_unsubscribe,
    protocol.MessageEdit: Handlers.on_message_edit,
    protocol.MessageDelete: Handlers.on_message_delete,
    protocol.Typing: Handlers.on_typing,
    protocol.Read: Handlers.on_read,
    protocol.Ping: Handlers.on_ping,
    protocol.MetricsSubscribe: Handlers.on_metrics_subscribe,
    protocol.MetricsUnsubscribe: Handlers.on_metrics_unsubscribe,
    protocol.ReactionAdd: Handlers.on_reaction_add,
    protocol.ReactionRemove: Handlers.on_reaction_remove,
    protocol.PresenceList: Stream.on_presence_list,
    protocol.AuthRefresh: Handlers.on_auth_refresh,
}


def msgspec_convert(record: dict) -> protocol.WorkerFigures:
    """A heartbeat record as the tick's WorkerFigures (other keys stay out)."""
    fields = {name: record[name] for name in protocol.WorkerFigures.__struct_fields__ if name in record}
    return msgspec.convert(fields, protocol.WorkerFigures)


# message.send has handle_sends (one path for a send alone or a batch of them).
assert set(HANDLERS) | {protocol.MessageSend} == set(protocol.CLIENT_FRAMES), "every client frame needs exactly one handler"
