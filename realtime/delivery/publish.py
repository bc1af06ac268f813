"""Fan-out of committed room events through the channel layer, encoded once per event.

Group names are built here and nowhere else (channels allows [a-zA-Z0-9-_.] under
100 characters; room slugs and user ids fit).
"""

from __future__ import annotations

import logging
import time

import msgspec

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import transaction

from realtime import protocol
from realtime.state import store
from realtime.observability import metrics
from realtime.observability.logs import TRACE

log = logging.getLogger(__name__)

# The channel-layer message type that carries a room event to each subscriber.
ROOM_EVENT = "room.event"
# Control messages: a user's sockets re-check their session; a room's subscribers
# re-check their access to it.
SESSION_CHECK = "session.check"
ACCESS_CHECK = "access.check"
# From the admin console: close the user's sockets everywhere.
FORCE_DISCONNECT = "force.disconnect"
# Ephemeral frames (typing, presence, read markers): no seq, not stored.
PUSH = "push"
# The group every worker process listens on for control messages (server.py).
CONTROL_GROUP = "realtime.workers"


def room_group(slug: str) -> str:
    return f"room.{slug}"


def user_group(user_id: int) -> str:
    return f"user.{user_id}"


def fan_channel(group: str) -> str:
    """The Redis pub/sub channel that carries a group's messages (with REDIS_URL)."""
    return f"rt:fan:{group}"


async def send_group(group: str, message: dict) -> None:
    """group_send, with the group named in the message: each worker's fan-out
    (realtime/delivery/fanout.py) receives every group's messages on one channel and hands
    them to the sockets that follow that group."""
    await send_groups([(group, message)])


async def send_groups(messages: list[tuple[str, dict]]) -> None:
    """send_group for each (group, message), in order; with Redis in one round trip.
    There, room events this worker's sockets follow are handed to them first,
    without waiting for the round trip (fanout.Fanout.dispatch_own); the
    in-process layer has none to save."""
    from realtime.delivery.fanout import running

    for group, message in messages:
        message["group"] = group
    url = store.redis_url()
    if not url:
        for group, message in messages:
            await get_channel_layer().group_send(group, message)
        return
    # Redis pub/sub (realtime/delivery/fanout.py says why). Encoded before the local
    # sockets get the messages (the fan-out keeps their frames in them).
    payloads = [(fan_channel(group), msgspec.msgpack.encode(message)) for group, message in messages]
    fan = running()
    if fan is not None:
        await fan.dispatch_own(messages)
    redis = store.client(url)
    if len(payloads) == 1:
        await redis.publish(*payloads[0])
        return
    pipe = redis.pipeline(transaction=False)
    for channel, payload in payloads:
        pipe.publish(channel, payload)
    await pipe.execute()


def layer_message(event: protocol.RoomEvent, trace: str | None = None) -> dict:
    """The channel-layer message for one event: both wire encodings, made once,
    with the event's type, its publication time (for the latency histogram) and
    the trace id of the action that caused it."""
    return {
        "type": ROOM_EVENT,
        "room": event.room,
        "seq": event.seq,
        "event": event.__struct_config__.tag,
        "t": time.time(),
        "trace": trace or TRACE.get(),
        protocol.JSON.name: protocol.JSON.encode(event).decode(),
        protocol.MSGPACK.name: protocol.MSGPACK.encode(event),
    }


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
        await send_groups([(room_group(event.room), layer_message(event, traces[i] if traces else None))
                           for i, event in enumerate(events)])
    except Exception:
        metrics.LAYER_FAILURES.labels("broadcast").inc()
        log.exception("broadcast failed", extra={"event": "broadcast.failed", "room": events[0].room,
                                                 "seq": events[0].seq, "count": len(events)})


def publish_on_commit(events: list[protocol.RoomEvent]) -> None:
    """From synchronous code (REST views, the admin): publish once the current
    transaction commits, or now when there is none."""
    if events:
        transaction.on_commit(lambda: async_to_sync(publish)(events))


def _send_on_commit(group: str, message: dict) -> None:
    def send():
        try:
            async_to_sync(send_group)(group, message)
        except Exception:
            # A lost session.check is caught by the periodic re-check
            # (REALTIME_SESSION_RECHECK); a lost access.check by the cached
            # access's age limit and the sockets' pings (consumers.py).
            metrics.LAYER_FAILURES.labels("control").inc()
            log.exception("control message failed", extra={"event": "control.failed", "frame": message["type"]})

    transaction.on_commit(send)


def session_check_on_commit(user_id: int, revoked: list[str] | None = None) -> None:
    """Ask the user's sockets to re-check their session (revoked: keys known dead)."""
    _send_on_commit(user_group(user_id), {"type": SESSION_CHECK, "revoked": revoked or []})


def access_check_on_commit(slug: str) -> None:
    """Ask the room's subscribers to re-check that they may still see it."""
    _send_on_commit(room_group(slug), {"type": ACCESS_CHECK, "room": slug})


async def force_disconnect(user_id: int) -> None:
    """Close every socket of this user, on every worker (4003)."""
    await send_group(user_group(user_id), {"type": FORCE_DISCONNECT})


async def request_drain(worker: str) -> None:
    """Ask one worker (its REALTIME_WORKER_ID), or all ("*"), to drain."""
    await get_channel_layer().group_send(CONTROL_GROUP, {"type": "worker.drain", "worker": worker})


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
    except Exception:
        metrics.LAYER_FAILURES.labels("push").inc()
        log.warning("push failed", extra={"event": "push.failed", "room": room})


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
