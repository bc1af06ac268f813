"""Group fan-out per worker, not per member.

A tutorial Channels consumer joins each room's group with its own channel, so a
room event costs one channel-layer send, one Redis round trip and one receive per
member. Here each worker process subscribes to a group once, when its first
socket needs it: a room's group (`room.<slug>`) for the sockets subscribed to the
room, a user's (`user.<id>`) for that user's sockets (session checks, forced
disconnects, read positions). Its receive loop hands each message to the group's
local sockets (publish.send_groups names the group in the message). A room event
then costs one delivery per worker, and the frame, encoded once upstream
(publish.layer_message), is written as is to every socket. A socket has no
channel of its own: nothing waits on the layer per socket.

The messages travel by the broker engine configuration chooses (delivery/
transport.py: REALTIME_BROKER_URL; Redis pub/sub on REDIS_URL where unset; the
channel layer without either).

A room event committed on this worker is handed to this worker's own sockets
without waiting for its copy to come back (`dispatch_own`), when it directly
follows the last event the worker handed out in that room; the copy that comes
back is dropped by seq. On one worker that takes the Redis round trip (publish,
then receive) out of every message's latency. It is handed out before the
publish, or, where this worker has many sockets in the room
(REALTIME_PUBLISH_FIRST_AT, 1,000), right after the publish's round trip: a
sweep of thousands of sockets takes tens of milliseconds, which the other
workers' sweeps would otherwise wait for (publish.send_groups).

Every per-socket guarantee stays where it was: each consumer still takes room
messages one at a time, drops seqs it has sent, repairs gaps from the log, and
replays on subscribe after it has joined (`add` returns only once the
subscription is confirmed, so nothing committed after the subscribe's log read
can be missed). Pub/sub, like the layer, may lose a message (a dropped
connection); what a socket misses is found by seq (gap repair, the ping's head
comparison, resume).

If the transport fails (Redis restarting), the loop retries, subscribes to every
group again (waiting for the confirmations) and then tells each local socket
`layer.recovered`, which catches every room up from the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref

from channels.layers import get_channel_layer

from realtime import protocol
from realtime.delivery import names
from realtime.delivery.transport import broker_url, chosen
from realtime.observability import metrics, tracing
from realtime.state import degraded

log = logging.getLogger(__name__)

RETRY_MAX = 2.0


class Fanout:
    def __init__(self) -> None:
        self.layer = get_channel_layer()
        self.url = broker_url()
        self.groups: dict[str, set] = {}  # group -> local consumers
        # group -> the newest room event seq handed to its local consumers: an
        # event at or below it has been handed out already (see dispatch_own).
        self.heads: dict[str, int] = {}
        self.joined: dict[str, asyncio.Future] = {}  # group -> done once subscribed
        self.engine = chosen()
        self.transport = self.engine.receiver(self)
        self._received = metrics.BROKER_MESSAGES.labels(self.engine.name, "received")
        metrics.BROKER_INFO.labels(self.engine.name).set(1)

    async def add(self, group: str, consumer) -> None:
        """Deliver the group's messages to `consumer` (deliver() or its local_queue),
        from the moment this returns. The subscription is made in a task of its own:
        a caller that is cancelled (a long poll whose client left) does not cancel
        it for the others waiting on the same group."""
        self.groups.setdefault(group, set()).add(consumer)
        joined = self.joined.get(group)
        if joined is None:
            joined = self.joined[group] = asyncio.ensure_future(self.transport.join(group))
            joined.add_done_callback(lambda done, group=group: self._join_ended(group, done))
        try:
            await asyncio.shield(joined)
        except BaseException:
            await self._forget(group, consumer)
            raise

    def _join_ended(self, group: str, done: asyncio.Future) -> None:
        if done.cancelled() or done.exception() is not None:
            if self.joined.get(group) is done:
                del self.joined[group]

    async def _forget(self, group: str, consumer) -> None:
        """`consumer` will not follow the group after all (its join failed, or it
        gave up waiting)."""
        local = self.groups.get(group)
        if local is not None and consumer in local:
            await self.discard(group, consumer)

    async def discard(self, group: str, consumer) -> None:
        local = self.groups.get(group)
        if local is None:
            return
        local.discard(consumer)
        if local:
            return
        del self.groups[group]
        self.heads.pop(group, None)
        joined = self.joined.pop(group, None)
        if joined is not None and joined.done() and not joined.cancelled() and joined.exception() is None:
            try:
                await self.transport.leave(group)
            except Exception:
                pass  # messages for it are dropped below (no local consumer)

    async def dispatch(self, message: dict) -> None:
        """A message the engine received: handed to the group's local consumers."""
        self._received.inc()
        await self._hand_out(message, received=True)

    async def _hand_out(self, message: dict, received: bool = False) -> None:
        group = message.get("group") or names.room_group(message.get("room"))
        local = self.groups.get(group)
        if not local:
            return
        if message.get("type") == names.ROOM_EVENT:
            head = self.heads.get(group)
            if head is not None and message["seq"] <= head:
                # Handed out already: this worker's own event coming back from
                # the transport (dispatch_own), or one overtaken by a newer one,
                # which sent each socket to the log for it (gap repair).
                return
            self.heads[group] = message["seq"]
        if tracing.ENABLED and tracing.sampled(message):
            # The publisher's trace: the broker hop (if `received`), this fan-out,
            # and the writes to the first tracing.WRITE_SPANS sockets.
            with tracing.fan_out(message, received, len(local)) as span:
                span.set_attribute("realtime.written", await self._deliver(message, local, traced=True))
        else:
            await self._deliver(message, local)

    async def _deliver(self, message: dict, local: set, traced: bool = False) -> int:
        """Write `message` to each local socket that can take it now; queue it for
        the others. Returns how many room events were written.

        A room event goes to each socket's deliver_now() (ws/stream.py), a plain
        call with deliver()'s checks that hands the server the event's frame, made
        once per codec for all of them: no coroutine per socket (those, and the
        calls under them, were half of the sending loop's time at low message
        rates, where each event is a send() per socket). A push (a presence diff,
        typing, read markers) goes to push_now() the same way: queued, it woke
        each socket's task to write a frame made already (some 28 µs of the
        worker's CPU a socket all told, against 16 now: bench/pushes.py).
        deliver() is awaited where a room event cannot be written so (no
        prebuilt frames: ASGI), for the first tracing.WRITE_SPANS sockets of a
        sampled trace (tracing.write), for a member that is not a socket (a long
        poll), and for other messages."""
        kind = message.get("type")
        room_event = kind == names.ROOM_EVENT
        fused = room_event or kind == names.PUSH
        frames = protocol.EventFrames(message)
        spans = tracing.WRITE_SPANS if traced else 0
        written = 0
        for i, consumer in enumerate(tuple(local)):
            try:
                done = None
                if fused and i >= spans:
                    try:
                        write_now = consumer.deliver_now if room_event else consumer.push_now
                    except AttributeError:
                        pass  # (not a socket: a long poll's waiter)
                    else:
                        done = write_now(message, frames)
                if done is None:
                    done = await (tracing.write(consumer, message) if i < spans else consumer.deliver(message))
                if done:
                    written += 1
                    continue
            except Exception:
                log.exception("fan-out delivery failed", extra={"event": "fanout.delivery_failed"})
            consumer.local_queue.put_nowait(message)
        if written and room_event:
            # Counted once for all the sockets it was written to straight away.
            metrics.delivered(message, written)
            return written
        return 0

    def own_sockets(self, messages: list[tuple[str, dict]]) -> int:
        """This worker's sockets in the rooms of the room events among `messages`,
        each room counted once however many of its events the batch holds (a
        burst of sends is one batch): how wide dispatch_own's sweep is."""
        rooms = {group for group, message in messages if message.get("type") == names.ROOM_EVENT}
        return sum(len(self.groups.get(group, ())) for group in rooms)

    async def dispatch_own(self, messages: list[tuple[str, dict]]) -> None:
        """Room events this worker has just committed, handed to its own sockets
        before the transport's round trip (publish, then receive its own message
        back): the local subscribers of the sender's worker get them a Redis round
        trip sooner, the usual case on one worker. Only an event that directly
        follows the last one handed out (seq = head + 1) goes this way: any other
        might overtake one still in flight from another worker, so it waits for
        the transport, which keeps the group's order. The copy that comes back is
        dropped by seq (dispatch); where the copy came back first (called after
        the publish's round trip, publish.send_groups), that copy was handed out
        and this finds its seq at the head, and writes nothing again."""
        for group, message in messages:
            if message.get("type") != names.ROOM_EVENT or group not in self.groups:
                continue
            head = self.heads.get(group)
            if head is not None and message["seq"] == head + 1:
                await self._hand_out(message)

    def recovered(self) -> None:
        """After a transport failure: every local socket catches its rooms up."""
        for consumer in {c for local in self.groups.values() for c in local}:
            consumer.local_queue.put_nowait({"type": names.LAYER_RECOVERED})

    async def failed(self, exc: Exception, delay: float) -> float:
        """A transport's receive failed: count it, wait `delay`, return the next delay."""
        metrics.LAYER_FAILURES.labels("fanout").inc()
        metrics.BROKER_FAILURES.labels(self.engine.name).inc()
        degraded.tolerate(degraded.FANOUT, exc)
        await asyncio.sleep(delay)
        return min(delay * 2, RETRY_MAX)


_by_loop: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Fanout]" = weakref.WeakKeyDictionary()


def running() -> Fanout | None:
    """The fan-out on the running loop if it has one (a process that only
    publishes, such as a management command, has none)."""
    with contextlib.suppress(RuntimeError):
        found = _by_loop.get(asyncio.get_running_loop())
        if found is not None and found.layer is get_channel_layer() and found.url == broker_url():
            return found
    return None


def fanout() -> Fanout:
    """This process's fan-out on the running loop (tests run one loop per test,
    and switch layers and Redis between tests)."""
    found = running()
    if found is None:
        found = _by_loop[asyncio.get_running_loop()] = Fanout()
    return found
