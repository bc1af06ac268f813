"""Group fan-out per worker, not per member.

A tutorial Channels consumer joins each room's group with its own channel, so a
room event costs one channel-layer send, one Redis round trip and one receive per
member. Here each worker process joins a group once, with one channel of its own,
when its first socket needs it: a room's group (`room.<slug>`) for the sockets
subscribed to the room, a user's (`user.<id>`) for that user's sockets (session
checks, forced disconnects, read positions). Its receive loop hands each message
to the group's local sockets (broadcast.send_group names the group in the
message). A room event then costs one layer delivery per worker, and the frame,
encoded once upstream (broadcast.layer_message), is written as is to every socket.
A socket has no channel of its own: no channel-layer receive waits per socket.

Every per-socket guarantee stays where it was: each consumer still takes room
messages one at a time from its own queue, drops seqs it has sent, repairs gaps
from the log, and replays on subscribe after it has joined (`add` returns only
once the worker's channel is in the group, so nothing committed after the
subscribe's log read can be missed).

If the layer fails (Redis restarting), the loop retries, joins every group again
(a restarted Redis has forgotten them) and tells each local socket
`layer.recovered`, which catches every room up from the log. Group memberships are
renewed every GROUP_RENEW seconds (channels_redis expires them after a day).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time

from channels.layers import get_channel_layer

from . import broadcast, metrics

log = logging.getLogger(__name__)

GROUP_RENEW = 3600.0


class Fanout:
    def __init__(self) -> None:
        self.layer = get_channel_layer()
        self.channel: str | None = None
        self.groups: dict[str, set] = {}  # group -> local consumers
        self.joined: dict[str, asyncio.Future] = {}  # group -> done once it is joined
        self.task: asyncio.Task | None = None
        self.renewed = time.monotonic()

    async def _channel(self) -> str:
        if self.channel is None:
            # The default prefix on purpose: channels_redis receives every channel
            # of a process through one list and one lock; another prefix would
            # wait on the consumers' blocking receives.
            self.channel = await self.layer.new_channel()
            self.task = asyncio.ensure_future(self._loop())
        return self.channel

    async def add(self, group: str, consumer) -> None:
        """Deliver the group's messages to `consumer` (deliver() or its local_queue),
        from the moment this returns."""
        channel = await self._channel()
        self.groups.setdefault(group, set()).add(consumer)
        joined = self.joined.get(group)
        if joined is None:
            joined = self.joined[group] = asyncio.get_running_loop().create_future()
            try:
                await self.layer.group_add(group, channel)
            except BaseException as exc:
                del self.joined[group]
                self.groups[group].discard(consumer)
                joined.set_exception(exc)
                joined.exception()  # retrieved: the waiters below get it too
                raise
            joined.set_result(True)
        else:
            await asyncio.shield(joined)

    async def discard(self, group: str, consumer) -> None:
        local = self.groups.get(group)
        if local is None:
            return
        local.discard(consumer)
        if local:
            return
        del self.groups[group]
        joined = self.joined.pop(group, None)
        if joined is not None and joined.done() and not joined.exception() and self.channel is not None:
            try:
                await self.layer.group_discard(group, self.channel)
            except Exception:
                pass  # the membership expires; messages for it are dropped below

    async def _loop(self) -> None:
        delay = 0.1
        while True:
            try:
                message = await self.layer.receive(self.channel)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                metrics.LAYER_FAILURES.labels("fanout").inc()
                log.warning("fan-out receive failed", extra={"event": "fanout.failed", "reason": type(exc).__name__})
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                await self._rejoin(recovered=True)
                continue
            delay = 0.1
            group = message.get("group") or broadcast.room_group(message.get("room"))
            for consumer in tuple(self.groups.get(group, ())):
                try:
                    if await consumer.deliver(message):
                        continue
                except Exception:
                    log.exception("fan-out delivery failed", extra={"event": "fanout.delivery_failed"})
                consumer.local_queue.put_nowait(message)
            if time.monotonic() - self.renewed > GROUP_RENEW:
                await self._rejoin(recovered=False)

    async def _rejoin(self, recovered: bool) -> None:
        """Join every group again; after a failure, have every local socket catch
        its rooms up from the log."""
        try:
            for group in list(self.groups):
                await self.layer.group_add(group, self.channel)
        except Exception:
            return  # still down: the loop tries again
        self.renewed = time.monotonic()
        if recovered:
            for consumer in {c for local in self.groups.values() for c in local}:
                consumer.local_queue.put_nowait({"type": "layer.recovered"})


class LocalQueue:
    """A socket's queue of what the fan-out and the housekeeper hand it: the part
    of asyncio.Queue used here (no size bound, one reader), at a fraction of its
    memory (asyncio.Queue keeps four deques and an Event per instance)."""

    __slots__ = ("items", "waiter")

    def __init__(self) -> None:
        self.items: collections.deque = collections.deque()
        self.waiter: asyncio.Future | None = None

    def put_nowait(self, item) -> None:
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
        return self.items.popleft()


_by_loop: dict[int, Fanout] = {}


def fanout() -> Fanout:
    """This process's fan-out on the running loop (tests run one loop per test)."""
    loop = asyncio.get_running_loop()
    found = _by_loop.get(id(loop))
    if found is None or found.layer is not get_channel_layer():
        _by_loop.clear()
        found = _by_loop[id(loop)] = Fanout()
    return found
