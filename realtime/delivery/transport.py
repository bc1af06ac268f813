"""How group messages travel between workers: one Transport interface, one engine
chosen by configuration (`chosen()`), with two engines today:

- `RedisPubSubTransport` with REDIS_URL: a pub/sub channel per group;
- `LayerTransport` without it: the channel layer (in-memory, one process).

A transport does two things. Receiving, for one worker's fan-out (delivery/
fanout.py): `join(group)` returns once the worker is subscribed (so nothing
published after it can be missed), `leave(group)`, and a loop that hands every
message to `fan.dispatch()`; when the loop fails it calls `fan.failed()`,
resubscribes to every group and calls `fan.recovered()`, which has every socket
catch its rooms up from the log. Sending, from any process (a management command
has no fan-out): `pack(messages)` then `send(packed)`, in order, in one round trip
where the engine allows. `hands_own_events`: whether the publishing worker hands
its own room events to its own sockets before the round trip (fanout.dispatch_own);
the in-process layer has no round trip to save.

An engine may lose a message (a dropped connection, a full queue): nothing relies
on it not to. A socket finds what it missed by seq (gap repair, the ping's head
check, resume).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import msgspec
from channels.layers import get_channel_layer

from realtime.delivery import names
from realtime.state import store

log = logging.getLogger(__name__)

GROUP_RENEW = 3600.0  # channel layer: renew memberships (channels_redis expires them after a day)


class Transport:
    """The interface every engine implements (module doc)."""

    name = "?"  # the engine's label (metrics, /readyz)
    hands_own_events = False

    def __init__(self, fan) -> None:
        self.fan = fan

    async def join(self, group: str) -> None:
        raise NotImplementedError

    async def leave(self, group: str) -> None:
        raise NotImplementedError

    @staticmethod
    def pack(messages: list[tuple[str, dict]]):
        raise NotImplementedError

    @staticmethod
    async def send(packed) -> None:
        raise NotImplementedError


class LayerTransport(Transport):
    """The channel layer: one channel of this process in each group (the embedded
    default: the in-memory layer, one process)."""

    name = "layer"

    def __init__(self, fan) -> None:
        self.fan, self.layer = fan, get_channel_layer()
        self.channel: str | None = None
        self.renewed = time.monotonic()

    async def join(self, group: str) -> None:
        if self.channel is None:
            self.channel = await self.layer.new_channel()
            asyncio.ensure_future(self._loop())
        await self.layer.group_add(group, self.channel)

    async def leave(self, group: str) -> None:
        await self.layer.group_discard(group, self.channel)

    @staticmethod
    def pack(messages: list[tuple[str, dict]]) -> list[tuple[str, dict]]:
        return messages

    @staticmethod
    async def send(packed: list[tuple[str, dict]]) -> None:
        layer = get_channel_layer()
        for group, message in packed:
            await layer.group_send(group, message)

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


class RedisPubSubTransport(Transport):
    """Redis pub/sub (`PUBLISH rt:fan:<group>`, REDIS_URL): one round trip to
    publish, pushed to each subscribed worker at once. channels_redis's group_send
    takes four round trips (expire the group, read it, expire each channel, push),
    and its receive waits on a blocking pop; pub/sub is what python-socketio's and
    Centrifugo's Redis engines use. Receiving is on a connection of this process's
    own (no read timeout, no silent retries: a failure must reach the loop, which
    then resubscribes and has the sockets catch up)."""

    name = "redis"
    hands_own_events = True

    def __init__(self, fan) -> None:
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

        client = aioredis.from_url(store.redis_url(), socket_connect_timeout=2, retry=Retry(NoBackoff(), 0),
                                   health_check_interval=10)
        return client.pubsub()

    async def join(self, group: str) -> None:
        if self.pubsub is None:
            self.pubsub = self._connect()
        confirmed = self._expect(names.fan_channel(group))
        async with self.commands:
            await self.pubsub.subscribe(names.fan_channel(group))
        if self.task is None or self.task.done():
            self.task = asyncio.ensure_future(self._loop())
        await asyncio.wait_for(confirmed, timeout=5)

    async def leave(self, group: str) -> None:
        if self.pubsub is not None:
            async with self.commands:
                await self.pubsub.unsubscribe(names.fan_channel(group))

    @staticmethod
    def pack(messages: list[tuple[str, dict]]) -> list[tuple[str, bytes]]:
        # Encoded before this worker's sockets get the messages (dispatch_own): the
        # fan-out keeps their prebuilt frames in them, which must not travel.
        return [(names.fan_channel(group), msgspec.msgpack.encode(message)) for group, message in messages]

    @staticmethod
    async def send(packed: list[tuple[str, bytes]]) -> None:
        redis = store.client(store.redis_url())
        if len(packed) == 1:
            await redis.publish(*packed[0])
            return
        pipe = redis.pipeline(transaction=False)
        for channel, payload in packed:
            pipe.publish(channel, payload)
        await pipe.execute()

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
        channels = [names.fan_channel(group) for group in self.fan.groups]
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


def chosen() -> type[Transport]:
    """The engine configuration picks: Redis pub/sub with REDIS_URL, else the layer."""
    return RedisPubSubTransport if store.redis_url() else LayerTransport
