"""Group fan-out per worker, not per member.

A tutorial Channels consumer joins each room's group with its own channel, so a
room event costs one channel-layer send, one Redis round trip and one receive per
member. Here each worker process subscribes to a group once, when its first
socket needs it: a room's group (`room.<slug>`) for the sockets subscribed to the
room, a user's (`user.<id>`) for that user's sockets (session checks, forced
disconnects, read positions). Its receive loop hands each message to the group's
local sockets (broadcast.send_group names the group in the message). A room event
then costs one delivery per worker, and the frame, encoded once upstream
(broadcast.layer_message), is written as is to every socket. A socket has no
channel of its own: nothing waits on the layer per socket.

Two transports, chosen as broadcast.send_group chooses:
- with REDIS_URL, Redis pub/sub (`PUBLISH rt:fan:<group>`): one round trip to
  publish, pushed to each subscribed worker at once. channels_redis's group_send
  takes four round trips (expire the group, read it, expire each channel, push),
  and its receive waits on a blocking pop; pub/sub is what python-socketio's and
  Centrifugo's Redis engines use;
- without it, the channel layer (in-memory: one process).

A room event committed on this worker is handed to this worker's own sockets
before it is published (`dispatch_own`), when it directly follows the last event
the worker handed out in that room; the copy that comes back is dropped by seq.
On one worker that takes the Redis round trip (publish, then receive) out of
every message's latency; with several, the other workers get it as before.

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
import time
import weakref

import msgspec
from channels.layers import get_channel_layer

from realtime.state import store
from realtime.delivery import publish as broadcast
from realtime.observability import metrics

log = logging.getLogger(__name__)

GROUP_RENEW = 3600.0  # channel layer: renew memberships (channels_redis expires them after a day)
RETRY_MAX = 2.0


class Fanout:
    def __init__(self) -> None:
        self.layer = get_channel_layer()
        self.url = store.redis_url()
        self.groups: dict[str, set] = {}  # group -> local consumers
        # group -> the newest room event seq handed to its local consumers: an
        # event at or below it has been handed out already (see dispatch_own).
        self.heads: dict[str, int] = {}
        self.joined: dict[str, asyncio.Future] = {}  # group -> done once subscribed
        self.transport = PubSubTransport(self) if self.url else LayerTransport(self)

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
        group = message.get("group") or broadcast.room_group(message.get("room"))
        local = self.groups.get(group)
        if not local:
            return
        if message.get("type") == broadcast.ROOM_EVENT:
            head = self.heads.get(group)
            if head is not None and message["seq"] <= head:
                # Handed out already: this worker's own event coming back from
                # the transport (dispatch_own), or one overtaken by a newer one,
                # which sent each socket to the log for it (gap repair).
                return
            self.heads[group] = message["seq"]
        written = 0
        for consumer in tuple(local):
            try:
                if await consumer.deliver(message):
                    written += 1  # a room event, written
                    continue
            except Exception:
                log.exception("fan-out delivery failed", extra={"event": "fanout.delivery_failed"})
            consumer.local_queue.put_nowait(message)
        if written:
            # Counted once for all the sockets it was written to straight away.
            metrics.delivered(message, written)

    async def dispatch_own(self, messages: list[tuple[str, dict]]) -> None:
        """Room events this worker has just committed, handed to its own sockets
        before the transport's round trip (publish, then receive its own message
        back): the local subscribers of the sender's worker get them a Redis round
        trip sooner, the usual case on one worker. Only an event that directly
        follows the last one handed out (seq = head + 1) goes this way: any other
        might overtake one still in flight from another worker, so it waits for
        the transport, which keeps the group's order. The copy that comes back is
        dropped by seq (dispatch)."""
        for group, message in messages:
            if message.get("type") != broadcast.ROOM_EVENT or group not in self.groups:
                continue
            head = self.heads.get(group)
            if head is not None and message["seq"] == head + 1:
                await self.dispatch(message)

    def recovered(self) -> None:
        """After a transport failure: every local socket catches its rooms up."""
        for consumer in {c for local in self.groups.values() for c in local}:
            consumer.local_queue.put_nowait({"type": "layer.recovered"})

    async def failed(self, exc: Exception, delay: float) -> float:
        """A transport's receive failed: count it, wait `delay`, return the next delay."""
        metrics.LAYER_FAILURES.labels("fanout").inc()
        log.warning("fan-out receive failed", extra={"event": "fanout.failed", "reason": type(exc).__name__})
        await asyncio.sleep(delay)
        return min(delay * 2, RETRY_MAX)


class LayerTransport:
    """The channel layer: one channel of this process in each group."""

    def __init__(self, fan: Fanout) -> None:
        self.fan, self.layer = fan, fan.layer
        self.channel: str | None = None
        self.renewed = time.monotonic()

    async def join(self, group: str) -> None:
        if self.channel is None:
            self.channel = await self.layer.new_channel()
            asyncio.ensure_future(self._loop())
        await self.layer.group_add(group, self.channel)

    async def leave(self, group: str) -> None:
        await self.layer.group_discard(group, self.channel)

    async def _loop(self) -> None:
        delay = 0.1
        while True:
            try:
                message = await self.layer.receive(self.channel)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                delay = await self.fan.failed(exc, delay)
                await self._rejoin(recovered=True)
                continue
            delay = 0.1
            await self.fan.dispatch(message)
            if time.monotonic() - self.renewed > GROUP_RENEW:
                await self._rejoin(recovered=False)

    async def _rejoin(self, recovered: bool) -> None:
        try:
            for group in list(self.fan.groups):
                await self.layer.group_add(group, self.channel)
        except Exception:
            return  # still down: the loop tries again
        self.renewed = time.monotonic()
        if recovered:
            self.fan.recovered()


class PubSubTransport:
    """Redis pub/sub on a connection of this process's own (no read timeout, no
    silent retries: a failure must reach the loop, which then resubscribes and has
    the sockets catch up)."""

    def __init__(self, fan: Fanout) -> None:
        self.fan = fan
        self.pubsub = None
        self.task: asyncio.Task | None = None
        self.confirming: dict[str, list[asyncio.Future]] = {}  # channel -> waiting for its confirmation
        # One command at a time: two first subscribes racing would each open a
        # connection, and the first one's confirmation would never be read.
        self.commands = asyncio.Lock()

    def _connect(self):
        from redis import asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        client = aioredis.from_url(self.fan.url, socket_connect_timeout=2, retry=Retry(NoBackoff(), 0),
                                   health_check_interval=10)
        return client.pubsub()

    async def join(self, group: str) -> None:
        if self.pubsub is None:
            self.pubsub = self._connect()
        confirmed = self._expect(broadcast.fan_channel(group))
        async with self.commands:
            await self.pubsub.subscribe(broadcast.fan_channel(group))
        if self.task is None or self.task.done():
            self.task = asyncio.ensure_future(self._loop())
        await asyncio.wait_for(confirmed, timeout=5)

    async def leave(self, group: str) -> None:
        if self.pubsub is not None:
            async with self.commands:
                await self.pubsub.unsubscribe(broadcast.fan_channel(group))

    def _expect(self, channel: str) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        self.confirming.setdefault(channel, []).append(future)
        return future

    async def _loop(self) -> None:
        delay = 0.1
        while True:
            try:
                message = await self.pubsub.get_message(timeout=1.0)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                delay = await self.fan.failed(exc, delay)
                await self._resubscribe()
                if self.pubsub is None:
                    return
                continue
            if message is None:
                continue
            delay = 0.1
            kind = message["type"]
            if kind == "message":
                try:
                    data = msgspec.msgpack.decode(message["data"])
                except msgspec.DecodeError:
                    log.warning("fan-out message undecodable", extra={"event": "fanout.undecodable"})
                    continue
                await self.fan.dispatch(data)
            elif kind == "subscribe":
                channel = message["channel"].decode() if isinstance(message["channel"], bytes) else message["channel"]
                for future in self.confirming.pop(channel, ()):
                    if not future.done():
                        future.set_result(True)

    async def _resubscribe(self) -> None:
        """A fresh connection subscribed to every group; the sockets are told to
        catch up once Redis has confirmed all of them (the loop reads those)."""
        old, self.pubsub = self.pubsub, self._connect()
        with contextlib.suppress(Exception):
            await old.aclose()
        channels = [broadcast.fan_channel(group) for group in self.fan.groups]
        if not channels:
            # Nothing to follow: no connection until the next join (which starts
            # the loop again).
            with contextlib.suppress(Exception):
                await self.pubsub.aclose()
            self.pubsub = None
            return
        confirmations = [self._expect(channel) for channel in channels]
        try:
            async with self.commands:
                await self.pubsub.subscribe(*channels)
        except Exception:
            for future in confirmations:
                future.cancel()
            self.confirming.clear()
            return  # still down: the next read fails and we come back here

        async def tell_when_confirmed():
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.gather(*confirmations), timeout=10)
                self.fan.recovered()

        asyncio.ensure_future(tell_when_confirmed())


LOCAL_QUEUE_MAX = 1000  # room events held for one busy socket before they are dropped


class LocalQueue:
    """A socket's queue of what the fan-out and the housekeeper hand it: the part
    of asyncio.Queue used here (no size bound, one reader), at a fraction of its
    memory (asyncio.Queue keeps four deques and an Event per instance). The items
    are a list, not a deque: it is nearly always empty, and an empty deque holds
    a 64-slot block (760 B a socket) where an empty list takes 56 B."""

    __slots__ = ("items", "waiter")

    def __init__(self) -> None:
        self.items: list = []
        self.waiter: asyncio.Future | None = None

    def put_nowait(self, item) -> None:
        if len(self.items) >= LOCAL_QUEUE_MAX and item.get("type") == broadcast.ROOM_EVENT:
            # A socket this far behind drops room events: it repairs the gap from
            # the log at the next event it takes (or at its next ping).
            metrics.LAYER_FAILURES.labels("local-queue-full").inc()
            return
        self.items.append(item)
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def empty(self) -> bool:
        return not self.items

    async def get(self):
        while not self.items:
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        return self.items.pop(0)


_by_loop: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Fanout]" = weakref.WeakKeyDictionary()


def running() -> Fanout | None:
    """The fan-out on the running loop if it has one (a process that only
    publishes, such as a management command, has none)."""
    with contextlib.suppress(RuntimeError):
        found = _by_loop.get(asyncio.get_running_loop())
        if found is not None and found.layer is get_channel_layer() and found.url == store.redis_url():
            return found
    return None


def fanout() -> Fanout:
    """This process's fan-out on the running loop (tests run one loop per test,
    and switch layers and Redis between tests)."""
    found = running()
    if found is None:
        found = _by_loop[asyncio.get_running_loop()] = Fanout()
    return found
