"""How group messages travel between workers: one interface, one engine chosen by
one setting, REALTIME_BROKER_URL, whose scheme picks it (`chosen()`):

| URL | Engine | Module |
| --- | --- | --- |
| unset, REDIS_URL set | Redis pub/sub on REDIS_URL | engines/redis.py |
| `redis://h:p/0` | one Redis | engines/redis.py |
| `redis://a:p/0,redis://b:p/0` | rooms sharded over several Redis by a stable hash | engines/redis.py |
| `redis+cluster://h:p` | Redis Cluster, sharded pub/sub (SSUBSCRIBE/SPUBLISH) | engines/redis_cluster.py |
| `nats://h:p` | NATS, a subject per group | engines/nats.py |
| `amqp://u:pw@h:p/vhost` | RabbitMQ, a topic exchange, a queue per worker | engines/amqp.py |
| `kafka://h:p` | Kafka, one topic, groups partitioned by key | engines/kafka.py |
| unset, no REDIS_URL | the channel layer (in-memory, one process) | here |

An engine (`Engine`) does two things. Receiving, for one worker's fan-out
(delivery/fanout.py), through the `Receiver` it makes: `join(group)` returns once
the worker is subscribed (nothing published after it can be missed), `leave(group)`,
and a loop that hands every message to `fan.dispatch()`; when that fails it calls
`fan.failed()`, subscribes again to every group and then calls `fan.recovered()`,
which has every socket catch its rooms up from the log. Sending, from any process
(a management command has no fan-out): `pack(messages)` then `send(packed)`, in
order, each group's messages in the order given. `hands_own_events`: whether the
publishing worker hands its own room events to its own sockets before the round
trip (fanout.dispatch_own; the in-process layer has no round trip to save).

Every engine keeps a group's messages in order (one connection, shard, subject,
routing key or partition per group) and may lose some (a dropped connection, a
full queue): nothing relies on it not to. A socket finds what it missed by seq
(gap repair, the ping's head check, resume). Each engine passes the same contract
suite against a real server (tests/brokers/).

At start-up (`python -m realtime.server`) `check_at_start_up()` has the engine
reach its broker: an unreachable broker, a wrong password or a cluster URL that
names a single node stops the worker with a message naming REALTIME_BROKER_URL.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import time
import urllib.parse

import msgspec

from channels.layers import get_channel_layer
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

log = logging.getLogger(__name__)

GROUP_RENEW = 3600.0  # channel layer: renew memberships (channels_redis expires them after a day)
SETTING = "REALTIME_BROKER_URL"

# scheme -> "module:Engine", imported when chosen (a client library is loaded only
# by the engine that needs it).
ENGINES = {
    "redis": "realtime.delivery.engines.redis:RedisEngine",
    "rediss": "realtime.delivery.engines.redis:RedisEngine",
    "redis+cluster": "realtime.delivery.engines.redis_cluster:RedisClusterEngine",
    "nats": "realtime.delivery.engines.nats:NatsEngine",
    "amqp": "realtime.delivery.engines.amqp:AmqpEngine",
    "amqps": "realtime.delivery.engines.amqp:AmqpEngine",
    "kafka": "realtime.delivery.engines.kafka:KafkaEngine",
}


# Schemes whose URL may list several (comma-separated): Redis shards, Redis Cluster
# nodes to start from, Kafka bootstrap servers.
LISTS = {"redis", "rediss", "redis+cluster", "kafka"}


class BrokerError(Exception):
    """The broker cannot be used as configured (start-up): the message says why and
    names the setting."""


class Receiver:
    """One worker's subscriptions on an engine (module doc)."""

    def __init__(self, engine: "Engine", fan) -> None:
        self.engine, self.fan = engine, fan

    async def join(self, group: str) -> None:
        raise NotImplementedError

    async def leave(self, group: str) -> None:
        raise NotImplementedError


class Engine:
    """The interface every engine implements (module doc). One instance per
    configuration and process (`chosen()`); its connections are per event loop."""

    name = "?"  # the engine's label (metrics, /readyz, logs)
    hands_own_events = True

    def __init__(self, url: str) -> None:
        self.url = url

    def receiver(self, fan) -> Receiver:
        raise NotImplementedError

    def pack(self, messages: list[tuple[str, dict]]):
        raise NotImplementedError

    async def send(self, packed) -> None:
        raise NotImplementedError

    async def ping(self) -> None:
        """Raise unless the broker answers now (/readyz)."""
        raise NotImplementedError

    async def probe(self) -> None:
        """At start-up: raise BrokerError unless the broker is there and is what the
        URL says it is. By default, a ping."""
        await self.ping()

    def shown(self) -> str:
        """The URL with any password hidden (logs, errors)."""
        return hide_password(self.url)


class LayerReceiver(Receiver):
    """The channel layer: one channel of this process in each group."""

    def __init__(self, engine, fan) -> None:
        super().__init__(engine, fan)
        self.layer = get_channel_layer()
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


class LayerEngine(Engine):
    """The channel layer (the embedded default: the in-memory layer, one process)."""

    name = "layer"
    hands_own_events = False

    def receiver(self, fan) -> Receiver:
        return LayerReceiver(self, fan)

    def pack(self, messages: list[tuple[str, dict]]) -> list[tuple[str, dict]]:
        return messages

    async def send(self, packed: list[tuple[str, dict]]) -> None:
        layer = get_channel_layer()
        for group, message in packed:
            await layer.group_send(group, message)

    async def ping(self) -> None:
        return None


def decoded(payload: bytes) -> dict | None:
    """A group message as an engine received it (MessagePack, as every engine's
    pack() makes it), or None, logged, for bytes that are not one: the receive
    loop goes on with the next."""
    try:
        return msgspec.msgpack.decode(payload)
    except msgspec.DecodeError:
        log.warning("fan-out message undecodable", extra={"event": "fanout.undecodable"})
        return None


def hide_password(url: str) -> str:
    parts = []
    for one in url.split(","):
        split = urllib.parse.urlsplit(one.strip())
        if split.password:
            netloc = f"{split.username or ''}:***@{split.hostname}" + (f":{split.port}" if split.port else "")
            one = urllib.parse.urlunsplit(split._replace(netloc=netloc))
        parts.append(one.strip())
    return ",".join(parts)


def broker_url() -> str:
    """REALTIME_BROKER_URL, or REDIS_URL where it is unset (one Redis), or ""."""
    return getattr(settings, SETTING, "") or getattr(settings, "REDIS_URL", "")


def engine_class(url: str) -> type[Engine]:
    """The engine `url`'s scheme names; ImproperlyConfigured (naming the setting)
    for a scheme no engine serves."""
    if not url:
        return LayerEngine
    # (A listed node may leave out the scheme: `redis+cluster://a:7000,b:7000`.)
    schemes = {urllib.parse.urlsplit(one.strip()).scheme for one in url.split(",") if "://" in one}
    if len(schemes) != 1:
        raise ImproperlyConfigured(f"{SETTING}: a list of URLs must all be redis:// (rooms sharded over several Redis); "
                                   f"got the schemes {sorted(schemes)}")
    scheme = schemes.pop()
    if scheme not in ENGINES:
        raise ImproperlyConfigured(f"{SETTING}: unknown scheme {scheme!r} in {hide_password(url)!r}; "
                                   f"one of {', '.join(sorted(ENGINES))}")
    if "," in url and scheme not in LISTS:
        raise ImproperlyConfigured(f"{SETTING}: only redis:// (shards), redis+cluster:// (nodes) and kafka:// "
                                   f"(bootstrap servers) URLs can be listed; got {scheme}://")
    module, _, name = ENGINES[scheme].partition(":")
    return getattr(importlib.import_module(module), name)


_engines: dict[str, Engine] = {}


def chosen() -> Engine:
    """The engine configuration picks, one per URL and process."""
    url = broker_url()
    found = _engines.get(url)
    if found is None:
        found = _engines[url] = engine_class(url)(url)
    return found


def check_at_start_up(timeout: float = 10.0) -> None:
    """Reach the broker before the worker listens: raise BrokerError (naming the
    setting) if it cannot be used. Run on a loop of its own, closed after."""
    engine = chosen()
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(asyncio.wait_for(engine.probe(), timeout))
    except BrokerError:
        raise
    except (asyncio.TimeoutError, TimeoutError):
        raise BrokerError(f"{SETTING}: no answer from {engine.shown()} ({engine.name}) within {timeout:g} s") from None
    except Exception as exc:
        raise BrokerError(f"{SETTING}: cannot reach {engine.shown()} ({engine.name}): {describe(exc)}") from None
    finally:
        loop.close()


def describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
