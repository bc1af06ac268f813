"""Redis pub/sub: one Redis, or rooms sharded over several.

`PUBLISH rt:fan:<group>`: one round trip to publish, pushed to each subscribed
worker at once. channels_redis's group_send takes four round trips (expire the
group, read it, expire each channel, push), and its receive waits on a blocking
pop; pub/sub is what python-socketio's and Centrifugo's Redis engines use.

Shards (`redis://a/0,redis://b/0`): each group lives on one shard, picked by a
jump consistent hash of its name (`shard_of`), so a room's messages keep their
order (one connection each way) and each Redis carries 1/n of the traffic. A
worker subscribes on a shard only for the groups it has there: one connection per
shard it uses. The hash is stable across processes and restarts and depends only on
the number of shards, in the listed order: adding an n+1th moves about 1/(n+1) of
the groups, each to the new shard (deploy/README.md: how to add one).

Receiving is on a connection of this process's own per shard (no read timeout, no
silent retries: a failure must reach the loop, which then subscribes again and has
the sockets catch up). A shard that fails is retried by itself; the others go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging

import msgspec

from realtime.delivery import names
from realtime.delivery.transport import BrokerError, Engine, Receiver, SETTING, decoded
from realtime.state import store

log = logging.getLogger(__name__)


def jump_hash(key: int, buckets: int) -> int:
    """Lamping and Veach's jump consistent hash: a bucket in [0, buckets) for a
    64-bit key; growing from n to n+1 buckets moves 1/(n+1) of the keys, each to
    the new bucket."""
    bucket, j = -1, 0
    while j < buckets:
        bucket = j
        key = (key * 2862933555777941757 + 1) & 0xFFFFFFFFFFFFFFFF
        j = int((bucket + 1) * (float(1 << 31) / float((key >> 33) + 1)))
    return bucket


def shard_of(group: str, shards: int) -> int:
    if shards == 1:
        return 0
    key = int.from_bytes(hashlib.blake2b(group.encode(), digest_size=8).digest(), "big")
    return jump_hash(key, shards)


class ShardSubscriber:
    """This worker's subscriptions on one Redis (one shard)."""

    def __init__(self, receiver: "RedisReceiver", url: str, index: int) -> None:
        self.receiver, self.fan, self.url, self.index = receiver, receiver.fan, url, index
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

        client = aioredis.from_url(self.url, socket_connect_timeout=2, retry=Retry(NoBackoff(), 0),
                                   health_check_interval=10)
        return client.pubsub()

    def _mine(self) -> list[str]:
        shards = len(self.receiver.subscribers)
        return [group for group in self.fan.groups if shard_of(group, shards) == self.index]

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

    def _expect(self, channel: str) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        self.confirming.setdefault(channel, []).append(future)
        return future

    async def _loop(self) -> None:
        delay = 0.1
        while True:
            try:
                # The reply itself, not get_message(): a published message (nearly
                # every reply) goes straight to the fan-out, without the dict and the
                # bookkeeping redis-py makes of each (52 -> 37 µs of CPU a message in
                # bench/engines.py). Anything else goes through handle_message.
                response = await self.pubsub.parse_response(block=False, timeout=1.0)
                if response is None:
                    continue
                published = type(response) is list and response[0] == b"message"
                message = None if published else await self.pubsub.handle_message(response)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                delay = await self.fan.failed(exc, delay)
                await self._resubscribe()
                if self.pubsub is None:
                    return
                continue
            delay = 0.1
            if published:
                data = decoded(response[2])
                if data is not None:
                    await self.fan.dispatch(data)
            elif message is not None and message["type"] == "subscribe":
                channel = message["channel"].decode() if isinstance(message["channel"], bytes) else message["channel"]
                for future in self.confirming.pop(channel, ()):
                    if not future.done():
                        future.set_result(True)

    async def _resubscribe(self) -> None:
        """A fresh connection subscribed to every group of this shard; the sockets
        are told to catch up once Redis has confirmed all of them (the loop reads
        those)."""
        old, self.pubsub = self.pubsub, self._connect()
        with contextlib.suppress(Exception):
            await old.aclose()
        channels = [names.fan_channel(group) for group in self._mine()]
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


class RedisReceiver(Receiver):
    def __init__(self, engine: "RedisEngine", fan) -> None:
        super().__init__(engine, fan)
        self.subscribers = [ShardSubscriber(self, url, i) for i, url in enumerate(engine.urls)]

    def _for(self, group: str) -> ShardSubscriber:
        return self.subscribers[shard_of(group, len(self.subscribers))]

    async def join(self, group: str) -> None:
        await self._for(group).join(group)

    async def leave(self, group: str) -> None:
        await self._for(group).leave(group)


class RedisEngine(Engine):
    name = "redis"

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.urls = [one.strip() for one in url.split(",") if one.strip()]
        if len(set(self.urls)) != len(self.urls):
            raise BrokerError(f"{SETTING}: a Redis shard is listed twice in {self.shown()}")
        if len(self.urls) > 1:
            self.name = "redis-sharded"

    def receiver(self, fan) -> Receiver:
        return RedisReceiver(self, fan)

    def shard(self, group: str) -> str:
        """The URL of the Redis that carries `group`."""
        return self.urls[shard_of(group, len(self.urls))]

    def pack(self, messages: list[tuple[str, dict]]) -> list[tuple[str, str, bytes]]:
        # Encoded before this worker's sockets get the messages (dispatch_own): the
        # fan-out keeps their prebuilt frames in them, which must not travel.
        return [(self.shard(group), names.fan_channel(group), msgspec.msgpack.encode(message))
                for group, message in messages]

    async def send(self, packed: list[tuple[str, str, bytes]]) -> None:
        if len(packed) == 1:
            url, channel, payload = packed[0]
            await store.client(url).publish(channel, payload)
            return
        by_shard: dict[str, list[tuple[str, bytes]]] = {}
        for url, channel, payload in packed:
            by_shard.setdefault(url, []).append((channel, payload))

        async def publish(url: str, items: list[tuple[str, bytes]]) -> None:
            pipe = store.client(url).pipeline(transaction=False)
            for channel, payload in items:
                pipe.publish(channel, payload)
            await pipe.execute()

        await asyncio.gather(*(publish(url, items) for url, items in by_shard.items()))

    async def ping(self) -> None:
        await asyncio.gather(*(store.client(url).ping() for url in self.urls))

    async def probe(self) -> None:
        from redis import asyncio as aioredis
        from redis.exceptions import AuthenticationError, ResponseError

        for url in self.urls:
            client = aioredis.from_url(url, socket_connect_timeout=3, socket_timeout=3)
            try:
                info = await client.info("cluster")
            except AuthenticationError as exc:
                raise BrokerError(f"{SETTING}: Redis at {hide(url)} refused the password ({exc})") from None
            except ResponseError as exc:
                raise BrokerError(f"{SETTING}: Redis at {hide(url)} answered {exc}") from None
            finally:
                await client.aclose()
            if info.get("cluster_enabled"):
                raise BrokerError(f"{SETTING}: {hide(url)} is a Redis Cluster node; classic PUBLISH on a cluster "
                                  "reaches every node: use redis+cluster://host:port (sharded pub/sub)")


def hide(url: str) -> str:
    from realtime.delivery.transport import hide_password

    return hide_password(url)
