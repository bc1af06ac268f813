"""The delivery guarantee for one socket, in one place: how a socket subscribes
(join the room's stream first, read the log after `since`, send it, then go live),
how every room event reaches it once and in seq order (dedupe, gap repair from the
log, catch-up after a transport failure), and the room's access as the socket holds
it. A part of RealtimeConsumer (ws/consumer.py).

Ordering: a socket handles one message at a time, so while `subscribe` replays the
log, room events for that room wait in the socket's local queue (the worker's
fan-out fills it, delivery/fanout.py). They are delivered afterwards and dropped
when their seq was already sent: the "join first, buffer, read the log, flush
without duplicates" order of DESIGN.md. A live event whose seq skips ahead (the
transport dropped one, or two workers' publications crossed) makes the socket read
the missing range from the log before sending it.

A reconnecting client resumes by sending `since` (its last seq) with subscribe:
`_subscribe` below is the whole of what happens then.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from types import MappingProxyType

from channels.db import database_sync_to_async
from django.conf import settings


from realtime import protocol
from realtime.delivery import publish as broadcast
from realtime.delivery.fanout import fanout
from realtime.domain.access import RoomAccess, room_access
from realtime.domain import roomlog
from realtime.domain.errors import ActionError
from realtime.domain.policy import Action
from realtime.observability import metrics
from realtime.protocol import ErrorCode
from realtime.state import presence, ratelimit
from realtime.ws import replays

log = logging.getLogger(__name__)
INFO, DEBUG, WARNING = logging.INFO, logging.DEBUG, logging.WARNING


@dataclass(slots=True)
class Subscription:
    last_seq: int
    presence: bool = True
    # The room and this user's role in it, as read at subscribe and re-read on
    # every access.check (membership or visibility change): message.send checks
    # against it instead of reading them again for every message.
    access: RoomAccess | None = None
    access_at: float = 0.0  # loop time it was read


# What access_changes and checking start as: no room yet, and nothing to write
# (each is made when its first room is; most sockets never see an access check,
# and two empty dicts were 128 B of every idle socket).
NO_ROOMS = MappingProxyType({})

ACCESS_MAX_AGE = 30.0  # seconds a cached access is trusted without an access.check


class Stream:
    """Subscriptions and room events (a part of RealtimeConsumer)."""

    replaying = 0  # > 0 while a subscribe or a catch-up sends from the log

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
            # (with the other subscribes waiting: ws/replays.py)
            replay = await replays.checks.get(roomlog.ReplayAsk(
                user=self.user, slug=slug, since=since, head_only=not budget.allowed,
                epoch=frame.epoch if frame.since is not None else None))
            # Checked for this user; the rows are the same for anyone (ws/replays.py).
            replayed = (replays.Replayed(replay.events) if replay.pending is None
                        else await replays.read(replay.pending, slug))
        except BaseException:
            # Refused (or failed): no stream for this room on this socket any more.
            if current is not None:
                await self.drop_subscription(slug)
            else:
                await fanout().discard(broadcast.room_group(slug), self)
            raise
        if replay.held_back or replayed:
            verdict = budget if replay.held_back else await ratelimit.replay_take(
                self.user.pk, sum(map(len, replayed.encoded(self.codec))))
            if not verdict.allowed:
                # Replaying more than the budget (a reconnect loop): wait. A stream
                # already live here stays live (this was its repair); a new one is
                # not joined. The client subscribes again after retry_after.
                if current is None:
                    await fanout().discard(broadcast.room_group(slug), self)
                metrics.labelled(metrics.RATE_LIMITED, "replay").inc()
                raise ActionError(ErrorCode.RATE_LIMITED, "replaying too much; wait and subscribe again",
                                  retry_after=verdict.retry_after)
        await self.send_replayed(replayed)
        # A re-subscribe (the client asking to repair a gap) restarts from its since.
        unchanged = self.access_changes.get(slug, 0) == changes
        self.subscriptions[slug] = Subscription(
            last_seq=replay.head, presence=current.presence if current else frame.presence,
            access=replay.access if unchanged else None, access_at=asyncio.get_running_loop().time(),
        )
        if current is None and frame.presence:
            # Present in the room from now (the room hears of a first arrival in
            # its next diff); this socket gets the count and the first page.
            first = await presence.join(slug, self.user.pk, self.user.get_username(), self.conn_id)
            await self.send_frame(presence.state_frame(slug, first))
        if current is None and replay.access is not None and replay.access.room.read_markers:
            # (Most rooms show no read markers: no query for them.)
            markers = await replays.markers.get(slug)
            if markers:
                await self.send_frame(protocol.ReadMarkers(room=slug, markers=markers))
        return protocol.SubscribeAck(ref=frame.ref, room=slug, seq=replay.head, epoch=replay.epoch,
                                     replayed=len(replayed))

    async def drop_subscription(self, slug: str) -> None:
        """Leave a room's stream and its presence (unsubscribe, access lost, broken stream)."""
        sub = self.subscriptions.pop(slug, None)
        if sub is None:
            return
        await fanout().discard(broadcast.room_group(slug), self)
        if sub.presence:
            await self.leave_presence(slug)

    async def leave_presence(self, slug: str) -> None:
        await presence.leave(slug, self.user.pk, self.user.get_username(), self.conn_id)

    async def on_presence_list(self, frame: protocol.PresenceList) -> protocol.Frame:
        """A page of who is here, for a room this socket follows with presence (the
        subscription's access stands for the check: a socket that loses the room
        loses the subscription)."""
        sub = self.subscriptions.get(frame.room)
        if sub is None or not sub.presence:
            raise ActionError(ErrorCode.NOT_FOUND, "not subscribed to this room with presence")
        found = await presence.page(frame.room, after=frame.after)
        return protocol.PresencePage(ref=frame.ref, room=frame.room, users=found.users, count=found.count,
                                     next=found.next)

    def cached_access(self, slug: str) -> RoomAccess | None:
        """The room's access as this socket's subscription holds it, if it is young
        enough to trust (None: message_send reads it)."""
        sub = self.subscriptions.get(slug)
        if sub is None or asyncio.get_running_loop().time() - sub.access_at >= ACCESS_MAX_AGE:
            return None
        return sub.access

    def forget_access(self, slug: str) -> None:
        """An access check is on its way (pushed, or queued by the auth sweep): forget
        the room's cached access at once, not when the check gets its turn, so a
        message.send handled before that reads it afresh. A read begun before this
        (a subscribe, an earlier check) is not kept."""
        if self.access_changes is NO_ROOMS:
            self.access_changes = {}
        self.access_changes[slug] = self.access_changes.get(slug, 0) + 1
        if slug in self.subscriptions:
            self.subscriptions[slug].access = None

    async def deliver(self, message: dict) -> bool:
        """The fan-out's fast path: send the room's next event straight away when
        nothing is ahead of it for this socket (deliver_now); False: queue it, and
        room_event takes it in order with everything else. Where the server takes
        no prebuilt frame from this socket, the event goes through ASGI."""
        kind = message.get("type")
        if kind == broadcast.ACCESS_CHECK:
            self.forget_access(message["room"])
        if kind != broadcast.ROOM_EVENT:
            return False
        written = self.deliver_now(message, protocol.EventFrames(message))
        if written is not None:
            return written
        # Its turn, but not as a prebuilt frame (another server, or not now).
        sub = self.subscriptions[message["room"]]
        await self.send_payload(protocol.payload(message, self.codec))
        self.sent_event(message, sub)
        return True  # the fan-out counts it (metrics.delivered)

    def deliver_now(self, message: dict, frames: protocol.EventFrames) -> bool | None:
        """deliver() of a room event as a plain call: the fan-out makes it for each
        of the worker's sockets in the room (Fanout._deliver). Fused, because a
        coroutine per socket (deliver, write_event, send_encoded), each awaited,
        and the calls under them were half of what a delivery cost in Python,
        the send() itself a third. `frames`: the event's frame for each codec,
        made once for all the sockets.

        Written when nothing is ahead of it for this socket (nothing_ahead), not
        a change to this user's own membership, and the seq right after the last
        one sent. True: written (the server's writer has it, to go out at the end
        of this turn); False: queue it; None: its turn, but the server takes no
        prebuilt frame from this socket (none under another server, or not now):
        deliver() sends it through ASGI."""
        room = message["room"]
        # (nothing_ahead, written out: this runs for every socket of every sweep,
        # where a call more is a share of what a delivery costs in Python)
        if self.replaying or self.handling or self.local_queue.items or self.revoked or room in self.checking:
            return False
        member = message.get("member")
        if member is not None and member == self.user.get_username():
            # This user's own membership changed: settled in turn (room_event).
            return False
        sub = self.subscriptions.get(room)
        if sub is None or message["seq"] != sub.last_seq + 1:
            return False
        writer = self.writer
        if writer is None or not writer.write_frame(frames[self.codec]):
            return None
        self.sent_event(message, sub)
        return True

    def push_now(self, message: dict, frames: protocol.EventFrames) -> bool | None:
        """push() as a plain call, for the fan-out's loop as deliver_now is: a
        presence diff or a typing frame to a room of thousands is a dict lookup
        and a write a socket, not a wakeup of each socket's task. Written (or
        passed over, as push() would pass it over) when nothing is ahead of it for
        this socket, so it keeps its place behind what is queued. True: done;
        False: queue it; None: the server takes no prebuilt frame now (queued,
        push() sends it through ASGI)."""
        if not self.nothing_ahead(message.get("room")):
            return False
        if not self.wants_push(message):
            return True
        writer = self.writer
        if writer is None or not writer.write_frame(frames[self.codec]):
            return None
        return True

    def nothing_ahead(self, room: str | None) -> bool:
        """Whether a frame from the fan-out may go now, before anything else this
        socket has in hand: no queued message, none of them being handled (a
        session or access check: the consumer's dispatch), no replay, no frame of
        its own being answered (a sender gets its ack before its own message), not
        revoked, and the room's access not being read again (a member removed?
        what follows waits behind the check, which may end the stream). A client
        frame received and not yet handled is not waited for: the fan-out's frame
        was sent before it was read."""
        if self.replaying or self.handling or self.local_queue.items or self.revoked:
            return False
        return room is None or room not in self.checking

    async def room_event(self, message: dict) -> None:
        """A committed event of a room: send it once, in seq order."""
        slug = message["room"]
        sub = self.subscriptions.get(slug)
        if sub is None or self.revoked:
            return
        seq = message["seq"]
        if seq <= sub.last_seq:
            return
        if message.get("member") == self.user.get_username():
            # This user's own membership ended or changed: whether they may still
            # follow the room is settled before this event or any later one is
            # sent, whether or not the access.check sent with it came first.
            await self.access_check({"type": broadcast.ACCESS_CHECK, "room": slug})
            sub = self.subscriptions.get(slug)
            if sub is None:
                return
        if seq > sub.last_seq + 1 and not await self.catch_up(slug, sub, seq - 1):
            return
        await self.write_event(message, sub)
        metrics.delivered(message)

    async def write_event(self, message: dict, sub: Subscription) -> None:
        await self.send_encoded(message)
        self.sent_event(message, sub)

    def sent_event(self, message: dict, sub: Subscription) -> None:
        """A room event was sent: the next in turn is the seq after it."""
        sub.last_seq = message["seq"]
        if log.isEnabledFor(DEBUG):
            log.debug("ws.deliver", extra={"event": "ws.deliver", "conn_id": self.conn_id, "user_id": self.user.pk,
                                           "room": message["room"], "seq": message["seq"],
                                           "trace_id": message.get("trace")})

    async def push(self, message: dict) -> None:
        """An ephemeral frame (typing, presence, read markers), encoded once upstream."""
        if self.wants_push(message):
            await self.send_encoded(message)

    def wants_push(self, message: dict) -> bool:
        """Whether this socket is sent a push: it follows the room (if the push has
        one), with presence for a presence frame, and is not the one it skips."""
        room = message.get("room")
        sub = self.subscriptions.get(room) if room is not None else None
        if self.revoked or (room is not None and sub is None):
            return False
        if message.get("skip_user") == self.user.pk or message.get("skip_conn") == self.conn_id:
            return False
        return not (message.get("presence") and not sub.presence)

    async def send_encoded(self, message: dict) -> None:
        """Send a layer message's payload as encoded upstream for this socket's codec:
        framed once per worker and written as is where the server allows it
        (realtime/server/bounded.py), through ASGI otherwise."""
        if self.writer is not None and self.writer.write_frame(protocol.framed(message, self.codec)):
            return
        await self.send_payload(protocol.payload(message, self.codec))

    async def send_held(self) -> None:
        """The room events that waited while this socket's frames were handled (a
        sender's own messages among them, which wait for its acks), sent right
        after the replies rather than one per turn of the socket's queues: a
        client with sends in flight would otherwise get its own messages one per
        frame it sends."""
        held = self.local_queue.items
        while held and held[0]["type"] == broadcast.ROOM_EVENT:
            await self.room_event(held.pop(0))

    async def send_replayed(self, replayed: replays.Replayed) -> None:
        """Events from the log: in one write, framed once for every socket that
        shares the read, where the server allows it (realtime/server/bounded.py;
        whatever is sent after them through ASGI, the subscribe's ack among it,
        is written after them); one ASGI send each otherwise."""
        if not replayed:
            return
        for tag, count in replayed.tags.items():
            metrics.labelled(metrics.FRAMES_OUT, tag).inc(count)
        metrics.REPLAYED.inc(len(replayed))
        if self.writer is not None and self.writer.write_frames(replayed.frames(self.codec)):
            return
        for data in replayed.encoded(self.codec):
            await self.send_payload(data)

    async def layer_recovered(self, message: dict) -> None:
        """The layer is back (or a ping asks): send each room what was committed
        but not delivered, e.g. while the layer was down."""
        if not self.subscriptions:
            return
        # An access.check may have been lost with the rest: read access afresh.
        for sub in self.subscriptions.values():
            sub.access = None
        heads = await database_sync_to_async(roomlog.room_heads)(slugs=list(self.subscriptions))
        for slug, head in heads.items():
            sub = self.subscriptions.get(slug)
            if sub is not None and head > sub.last_seq:
                await self.catch_up(slug, sub, head)

    async def access_check(self, message: dict) -> None:
        """A room's memberships or visibility changed: leave it if no longer allowed."""
        slug = message["room"]
        if slug not in self.subscriptions or self.revoked:
            return
        sub = self.subscriptions[slug]
        sub.access = None  # until read again: message.send reads it itself
        changes = self.access_changes.get(slug, 0)
        if self.checking is NO_ROOMS:
            self.checking = {}
        self.checking[slug] = self.checking.get(slug, 0) + 1
        try:
            access = await database_sync_to_async(room_access)(user=self.user, slug=slug, action=Action.VIEW)
        except ActionError as exc:
            await self.drop_subscription(slug)
            await self.send_frame(protocol.Error(code=exc.code, message=exc.message, room=slug))
            return
        finally:
            self.checking[slug] -= 1
            if not self.checking[slug]:
                del self.checking[slug]
        if self.subscriptions.get(slug) is sub and self.access_changes.get(slug, 0) == changes:
            sub.access, sub.access_at = access, asyncio.get_running_loop().time()

    async def log_reset(self, message: dict) -> None:
        """The room's log was started on a new epoch (services.reset_epoch): what
        this socket was sent counts in a history that is gone. The subscription
        ends and the client reloads the room (as after any recovery_failed)."""
        slug = message["room"]
        if slug not in self.subscriptions or self.revoked:
            return
        await self.drop_subscription(slug)
        await self.send_frame(protocol.Error(
            code=ErrorCode.RECOVERY_FAILED, room=slug,
            message=f"the room's log was started again (epoch {message['epoch']}); reload it and subscribe again"))

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
            # (read once for this worker's sockets that miss the same events: ws/replays.py)
            replayed = await replays.between(slug, sub.last_seq, upto)
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
        missing = replayed.events
        if replayed:
            await ratelimit.replay_take(self.user.pk, sum(map(len, replayed.encoded(self.codec))), force=True)
        await self.send_replayed(replayed)
        if missing:
            sub.last_seq = missing[-1].seq
        return True
