"""Publishing: every message a worker sends to a group goes through here, encoded
once per event (both wire encodings, made here, written as is by every worker's
fan-out), and carried by the configured transport (delivery/transport.py).

Who calls it: the domain's services publish room events after commit (the only
publisher of room events); presence, typing and read positions push ephemeral
frames; the signals send session and access checks; the admin console sends
forced disconnects and drain requests.
"""

from __future__ import annotations

import asyncio
import logging
import time

from asgiref.sync import async_to_sync
from django.conf import settings
from django.db import transaction

from realtime import protocol
from realtime.delivery import names
from realtime.delivery.fanout import running
from realtime.delivery.names import (  # noqa: F401  (the names, as publish.X, for callers)
    ACCESS_CHECK, CONTROL_GROUP, FORCE_DISCONNECT, LOG_RESET, PUSH, ROOM_EVENT, SESSION_CHECK, room_group, user_group,
)
from realtime.delivery.transport import chosen
from realtime.observability import metrics, tracing
from realtime.observability.logs import TRACE
from realtime.state import degraded, store

log = logging.getLogger(__name__)


# The longest a worker's own sockets wait for a publish that goes first (send_groups):
# a round trip is a tenth of a millisecond to a few; a broker that takes longer is
# in trouble (an engine's send may wait seconds, AMQP's confirms without a bound).
PUBLISH_FIRST_WAIT = 0.05


async def send_group(group: str, message: dict) -> None:
    """Send `message` to every socket following `group`, on every worker."""
    await send_groups([(group, message)])


async def send_groups(messages: list[tuple[str, dict]]) -> None:
    """send_group for each (group, message), in order, in one round trip where the
    transport allows. Room events this worker's own sockets follow are handed to
    them without waiting for the copy the transport brings back
    (fanout.Fanout.dispatch_own): before the publish, or, where this worker has
    many sockets in those rooms (REALTIME["PUBLISH_FIRST_AT"] or more), after
    the publish's round trip, so that the other workers' sweeps do not wait for
    this one's (5,000 sockets take tens of milliseconds to write to). A publish
    that fails, or has no answer within PUBLISH_FIRST_WAIT (a broker in
    trouble), does not hold this worker's sockets back any longer than that."""
    for group, message in messages:
        message["group"] = group
    engine = chosen()
    packed = engine.pack(messages)
    fan = running() if engine.hands_own_events else None
    if fan is None:
        await engine.send(packed)
    elif fan.own_sockets(messages) < settings.REALTIME["PUBLISH_FIRST_AT"]:
        await fan.dispatch_own(messages)
        await engine.send(packed)
    else:
        sending = asyncio.ensure_future(engine.send(packed))
        # Its error is raised by the await below, or, if this task is cancelled
        # first, dropped here (the event is in the log; publish() would only
        # have counted it).
        sending.add_done_callback(store.retrieved)
        try:
            await asyncio.wait({sending}, timeout=PUBLISH_FIRST_WAIT)
        finally:
            await fan.dispatch_own(messages)
        await sending
    metrics.BROKER_MESSAGES.labels(engine.name, "published").inc(len(messages))


def layer_message(event: protocol.RoomEvent, trace: str | None = None) -> dict:
    """The channel-layer message for one event: both wire encodings, made once,
    with the event's type, its publication time (for the latency histogram) and
    the trace id of the action that caused it."""
    message = {
        "type": ROOM_EVENT,
        "room": event.room,
        "seq": event.seq,
        "event": event.__struct_config__.tag,
        "t": time.time(),
        "trace": trace or TRACE.get(),
        protocol.JSON.name: protocol.JSON.encode(event).decode(),
        protocol.MSGPACK.name: protocol.MSGPACK.encode(event),
    }
    if isinstance(event, (protocol.MemberLeft, protocol.MemberRole)):
        # A membership that ended or changed: that member's sockets read their
        # access again before anything more of the room (ws/stream.room_event).
        message["member"] = event.user
    return message


async def publish(events: list[protocol.RoomEvent], traces: list[str] | None = None) -> None:
    """Send committed events to their rooms' groups, in one round trip. Call only
    after commit. `traces`: each event's trace id (the current one if None).

    A failed send is logged and swallowed: the event is in the log already, and
    subscribers recover it by seq (gap repair or resume), so the writer's request
    has still succeeded.
    """
    if not events:
        return
    try:
        messages = [(room_group(event.room), layer_message(event, traces[i] if traces else None))
                    for i, event in enumerate(events)]
        if tracing.ENABLED:
            # The publish span, its traceparent in every event's message.
            with tracing.publishing(messages):
                await send_groups(messages)
        else:
            await send_groups(messages)
    except Exception as exc:
        metrics.LAYER_FAILURES.labels("broadcast").inc()
        degraded.tolerate(degraded.PUBLISH, exc)


def publish_on_commit(events: list[protocol.RoomEvent]) -> None:
    """From synchronous code (REST views, the admin): publish once the current
    transaction commits, or now when there is none."""
    if events:
        transaction.on_commit(lambda: async_to_sync(publish)(events))


def _send_on_commit(group: str, message: dict) -> None:
    def send():
        try:
            async_to_sync(send_group)(group, message)
        except Exception as exc:
            metrics.LAYER_FAILURES.labels("control").inc()
            degraded.tolerate(degraded.CONTROL, exc)

    transaction.on_commit(send)


def session_check_on_commit(user_id: int, revoked: list[str] | None = None) -> None:
    """Ask the user's sockets to re-check their session (revoked: keys known dead)."""
    _send_on_commit(user_group(user_id), {"type": SESSION_CHECK, "revoked": revoked or []})


def access_check_on_commit(slug: str) -> None:
    """Ask the room's subscribers to re-check that they may still see it."""
    _send_on_commit(room_group(slug), {"type": ACCESS_CHECK, "room": slug})


def log_reset_on_commit(slug: str, epoch: str) -> None:
    """Tell the room's subscribers that its log was started again (a new epoch)."""
    _send_on_commit(room_group(slug), {"type": LOG_RESET, "room": slug, "epoch": epoch})


def rooms_changed_on_commit(user_id: int, room: str, change: str) -> None:
    """Tell the user's sockets that they were added to or removed from a room
    (rooms.changed), so that their pages list it or drop it at once."""
    _send_on_commit(user_group(user_id), push_message(protocol.RoomsChanged(room=room, change=change)))


async def force_disconnect(user_id: int) -> None:
    """Close every socket of this user, on every worker (4003)."""
    await send_group(user_group(user_id), {"type": FORCE_DISCONNECT})


async def request_drain(worker: str) -> None:
    """Ask one worker (its REALTIME_WORKER_ID), or all ("*"), to drain."""
    await send_group(names.CONTROL_GROUP, {"type": names.WORKER_DRAIN, "worker": worker})


def push_message(frame: protocol.Frame, *, room: str | None = None, skip_user: int | None = None,
                 skip_conn: str | None = None) -> dict:
    """A channel-layer message carrying an ephemeral frame, encoded once per codec.
    With `room`, only sockets subscribed to it pass it on; `skip_user`'s sockets
    never do (a typist does not see their own typing)."""
    return {
        "type": PUSH,
        "room": room,
        "skip_user": skip_user,
        "skip_conn": skip_conn,
        # Presence frames go only to sockets that asked for presence.
        "presence": isinstance(frame, (protocol.PresenceState, protocol.PresenceDiff)),
        protocol.JSON.name: protocol.JSON.encode(frame).decode(),
        protocol.MSGPACK.name: protocol.MSGPACK.encode(frame),
    }


async def publish_push(group: str, frame: protocol.Frame, *, room: str | None = None, skip_user: int | None = None,
                       skip_conn: str | None = None) -> None:
    """Best effort: an ephemeral frame lost to a layer failure is not worth an error."""
    try:
        await send_group(group, push_message(frame, room=room, skip_user=skip_user, skip_conn=skip_conn))
    except Exception as exc:
        metrics.LAYER_FAILURES.labels("push").inc()
        degraded.tolerate(degraded.PUSH, exc)


async def publish_typing(user, room: str) -> bool:
    """`user` is typing in `room` (access already checked: they may post there): tell
    the room's other subscribers and pollers, at most once per user and room every
    presence.TYPING_EVERY seconds. True if a notice went out. The socket's `typing`
    frame and `POST rooms/<slug>/typing/` both come here."""
    from realtime.state import presence

    sent = await presence.typing_allowed(room, user.pk)
    if sent:
        await publish_push(room_group(room), protocol.TypingNotice(room=room, user=user.get_username()),
                           room=room, skip_user=user.pk)
    return sent


async def publish_read(result, user, skip_conn: str | None = None) -> None:
    """A read position moved (actions.mark_read): tell the user's other sockets
    (read.state; not the socket `skip_conn`, which has its ack) and, where the room shows
    read markers, the room (read.marker; not the reader's own sockets)."""
    if not result.moved:
        return
    await publish_push(user_group(user.pk), protocol.ReadPosition(room=result.room, seq=result.seq),
                       skip_conn=skip_conn)
    if result.markers:
        marker = protocol.ReadMarker(room=result.room, user=user.get_username(), seq=result.seq)
        await publish_push(room_group(result.room), marker, room=result.room, skip_user=user.pk)
