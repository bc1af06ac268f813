"""Kafka (the protocol): one topic, each group on one partition by its key.

TESTED AGAINST TANSU 0.6, NOT APACHE KAFKA. Apache Kafka cannot be had on this
machine kind (no Debian package; the Maven registry its jars come from is not
reachable). Everything here was run against Tansu 0.6.0, a Kafka-protocol broker
written in Rust (deploy/brokers/kafka.py), through aiokafka 0.14 and only the
standard protocol: Metadata, CreateTopics, Produce, ListOffsets, Fetch. No consumer
groups, no transactions, no idempotent producer. It should work on Apache Kafka,
but that has not been run.

`kafka://host:port[,host:port][?partitions=8&topic=rt-fan&max_wait_ms=50]`
(port 9092 if left out). The hosts are bootstrap servers. (transport.engine_class
refuses a comma in any URL but redis://, so for now one host can be named there;
the engine itself takes the list.)

The topic (`rt-fan`, `partitions` of them, 8 by default) is made through the admin
client at start-up (`probe`), before a producer starts and whenever a receiver
connects ("already exists" is fine; an existing topic is used as it is, whatever
its partition count). Replication factor 1: raise it with Kafka's own tools on a
real cluster. aiokafka's metadata requests ask the broker to create any topic they
name (allow_auto_topic_creation, not configurable in aiokafka 0.14), with the
broker's default partition count (Tansu: 4): after a broker that lost the topic
comes back, a producer's metadata refresh may make it before a receiver does, and
then it has that many. Nothing depends on the count (the producer and the
receivers read it from the broker); on Apache Kafka set
`auto.create.topics.enable=false` to keep the URL's.

Sending: every message is msgpack-encoded (msgspec) in `pack()`, before this
worker's own sockets get the messages (dispatch_own: the fan-out keeps prebuilt
frames in them, which must not travel), with its group (UTF-8) as the key. The
partition is `partition_of(group, n)`: murmur2 of the key, as aiokafka's and the
Java client's default partitioner, passed to the producer explicitly so that the
choice is written down here and cannot change under us: stable across processes
and restarts for a given partition count, and spreads groups evenly. A group's
messages are on one partition, and aiokafka keeps at most one batch in flight per
partition (retries included), so a group keeps its order. `linger_ms=0`: a message
goes at once (latency before batching; what waits while a batch is in flight goes
together in the next). `acks=1`: the partition leader has it in its log, one
round trip; `acks=all` would wait for the replicas too, and a message lost in a
leader failover is a loss the app already tolerates (the log in PostgreSQL is the
record; sockets find what they missed by seq). `send()` waits for the broker's
acknowledgement, at most SEND_TIMEOUT seconds (as a Redis publish would: the
caller counts a failure and moves on), and fails at once when no broker takes a
connection (the producer would otherwise retry in the background until then).

The producer is per event loop (as realtime/state/store.py's Redis clients): on a
worker's loop (one with a fan-out running) it lives as long as the loop; a loop
without one (a management command's short-lived loop under async_to_sync) gets a
producer for that one send, stopped after it, so nothing is left on a closed loop.

Receiving: each worker's `KafkaReceiver` is one AIOKafkaConsumer without a group
id: it assigns itself every partition of the topic and seeks to the end when it
starts, reads everything, and hands to `fan.dispatch()` only the messages whose
key names a group this worker follows (`fan.groups`; the key is looked at before
the body is decoded). `join()` needs nothing from the broker per group: the first
waits until the consumer has a position on every partition (so nothing published
after it returns can be missed); later ones return at once, unless the receiver is
connecting again after a failure (then they wait for that, as the first). `leave()`
does nothing: what is not followed any more is skipped.

What this costs: every worker reads every group's traffic, whether it has a socket
on it or not (N workers: N times the topic's bytes out of the broker, each worker
decoding every key). Fine for a few workers and chat-sized traffic. The
alternative, when it is not: assign only the partitions of the groups followed
(`partition_of`), adding one and fixing its position in `join()` (a ListOffsets
round trip per new partition) — with many rooms per worker that soon means all
partitions anyway; or more partitions and sticky routing of rooms to workers at the
balancer. A topic per group is not an option (topics are heavy in Kafka).

A worker that falls behind (stalled, slow): the consumer buffers at most
`max_partition_fetch_bytes` per partition and `fetch_max_bytes` per fetch, never
the backlog; it reads the backlog from the log at its own pace. If its position
falls off the log (retention deleted it, or the topic was made again: offset out
of range), it seeks to the end and calls `fan.recovered()`: its sockets catch up
from the log. Failures: aiokafka's consumer retries a lost connection by itself
and would not say so, so the receiver watches its consumer's connections (through
the consumer's client: aiokafka internals, pinned at 0.14.0): a broken one is a
failure, as is a fetch that raises, and a topic that is not the one the consumer
was placed on (other partitions, or a log that now ends before what we read: made
again, which Tansu answers with a lower high watermark and no error). Then
`fan.failed()` (counted, backing off), a new consumer (the topic made again if
missing: Tansu's memory storage loses it on a restart; assign, seek to the end),
and `fan.recovered()`. A topic made again that has already grown past our
position between two fetches, without a connection breaking, would go unseen
(only topic ids, which aiokafka 0.14 does not ask for, would tell).

Measured on Tansu 0.6: a fetch waits its whole `fetch_max_wait_ms` before it
answers, even with data there (Apache Kafka answers as soon as there is some), so
a message waits on average half of it: `max_wait_ms` is 50 by default (~25 ms added,
20 fetches a second per idle worker). On Apache Kafka 500 costs nothing in latency.

Message bodies are never logged.
"""

from __future__ import annotations

import asyncio
import logging
import urllib.parse
import weakref

import msgspec

from realtime.delivery.transport import SETTING, BrokerError, Engine, Receiver, describe as _describe, decoded
from realtime.state import store

log = logging.getLogger(__name__)

DEFAULT_PORT = 9092
TOPIC = "rt-fan"
PARTITIONS = 8
MAX_WAIT_MS = 50  # a fetch's wait on the broker (module doc: Tansu answers only after it)
SEND_TIMEOUT = 2.0  # seconds a send waits for the broker's acknowledgement
JOIN_TIMEOUT = 5.0  # seconds a join waits for the consumer's positions (as Redis's subscribe confirmation)
CONNECT_TIMEOUT = 10.0  # seconds to make the topic and place a new consumer
PROBE_TIMEOUT = 3.0  # seconds to reach the broker at start-up
REQUEST_TIMEOUT_MS = 10_000
POLL_MS = 500  # how long a getmany waits (and so how soon a broken connection is noticed)
MAX_RECORDS = 500
MAX_PARTITION_FETCH_BYTES = 1 << 20
FETCH_MAX_BYTES = 4 << 20
TOPIC_ALREADY_EXISTS = 36
OPTIONS = {"partitions", "topic", "max_wait_ms"}


def partition_of_key(key: bytes, partitions: int) -> int:
    """murmur2 of the key, positive, modulo the partition count: the Java client's
    and aiokafka's default partitioner."""
    from aiokafka.partitioner import murmur2

    return (murmur2(key) & 0x7FFFFFFF) % partitions


def partition_of(group: str, partitions: int) -> int:
    """The partition that carries `group`'s messages (of `partitions`)."""
    return partition_of_key(group.encode(), partitions)


def _partitioner(key: bytes, all_partitions: list[int], available: list[int]) -> int:
    # Every message has a key (its group): no random choice, ever.
    ordered = sorted(all_partitions)
    return ordered[partition_of_key(key, len(ordered))]


def parse(url: str) -> tuple[list[str], dict[str, str]]:
    """(bootstrap servers "host:port", options) of a kafka:// URL; BrokerError
    naming the setting when it is not one."""
    base, _, query = url.strip().partition("?")
    servers = []
    for part in base.split(","):
        part = part.strip()
        if "://" in part:
            scheme, _, part = part.partition("://")
            if scheme != "kafka":
                raise BrokerError(f"{SETTING}: {scheme}:// in a kafka:// URL")
        part = part.strip("/")
        if not part:
            continue
        split = urllib.parse.urlsplit(f"//{part}")
        try:
            port = split.port or DEFAULT_PORT
        except ValueError:
            raise BrokerError(f"{SETTING}: bad port in {part!r}") from None
        if not split.hostname:
            raise BrokerError(f"{SETTING}: no host in {part!r}")
        host = f"[{split.hostname}]" if ":" in split.hostname else split.hostname
        servers.append(f"{host}:{port}")
    if not servers:
        raise BrokerError(f"{SETTING}: no host in {url!r}")
    options = dict(urllib.parse.parse_qsl(query))
    unknown = set(options) - OPTIONS
    if unknown:
        raise BrokerError(f"{SETTING}: unknown kafka:// option(s) {', '.join(sorted(unknown))}; "
                          f"known: {', '.join(sorted(OPTIONS))}")
    return servers, options


def _positive(options: dict[str, str], name: str, default: int) -> int:
    try:
        value = int(options.get(name, default))
    except ValueError:
        value = 0
    if value < 1:
        raise BrokerError(f"{SETTING}: kafka:// option {name} must be a positive whole number, "
                          f"got {options[name]!r}")
    return value


async def _quietly(closing, timeout: float) -> None:
    """Await a client's stop() or close(), ignoring its errors, and a cancellation
    it lets out of a task of its own (aiokafka 0.14's consumer does, stopping a
    fetch that was backing off after a lost connection) unless it is ours."""
    try:
        await asyncio.wait_for(closing, timeout)
    except asyncio.CancelledError:
        if asyncio.current_task().cancelling():
            raise
    except Exception:
        pass


def describe(exc: BaseException) -> str:
    """transport.describe, without the class name twice (aiokafka's errors start
    their text with it)."""
    text = str(exc).strip()
    return text if text.startswith(type(exc).__name__) else _describe(exc)


class KafkaReceiver(Receiver):
    """One worker's consumer of the whole topic (module doc)."""

    def __init__(self, engine: "KafkaEngine", fan) -> None:
        super().__init__(engine, fan)
        self.engine: KafkaEngine = engine
        self.consumer = None
        self.task: asyncio.Task | None = None
        self.ready = asyncio.Event()  # set while the consumer has its positions
        self.broken: Exception | None = None  # the consumer lost a connection (watched)
        self.partitions: set[int] = set()  # the topic's partitions when the consumer was placed
        self.next: dict = {}  # TopicPartition -> the offset after the last record read

    async def join(self, group: str) -> None:
        if self.task is None or self.task.done():
            self.task = asyncio.ensure_future(self._loop())
        if not self.ready.is_set():
            await asyncio.wait_for(self.ready.wait(), JOIN_TIMEOUT)

    async def leave(self, group: str) -> None:
        return None  # nothing to tell the broker: its messages are skipped here

    async def _loop(self) -> None:
        delay = 0.1
        failed = False  # since the consumer last had its positions
        while True:
            try:
                if self.consumer is None:
                    await self._connect()
                    if failed:
                        failed = False
                        self.fan.recovered()
                batch = await self._fetch()
            except asyncio.CancelledError:
                await self._close()
                raise
            except Exception as exc:
                failed = True
                await self._close()
                delay = await self.fan.failed(exc, delay)
                continue
            for tp, records in batch.items():
                for record in records:
                    await self._hand(record)
                if records:
                    self.next[tp] = records[-1].offset + 1
            if self.broken is None:
                self.broken = self._changed()
            if self.broken is not None:
                # What came before the break was handed out above; what was
                # published since, the sockets find in the log (recovered()).
                exc = self.broken
                failed = True
                await self._close()
                delay = await self.fan.failed(exc, delay)
                continue
            delay = 0.1

    async def _fetch(self) -> dict:
        """The next records (possibly none); raises when the consumer fails."""
        from aiokafka.errors import OffsetOutOfRangeError

        try:
            return await self.consumer.getmany(timeout_ms=POLL_MS, max_records=MAX_RECORDS)
        except OffsetOutOfRangeError as exc:
            await self._fell_behind(exc)
            return {}

    def _changed(self) -> Exception | None:
        """The topic is not the one the consumer was placed on: it has other
        partitions, or a log ends before the offset we have read up to (the topic
        was made again without our connection breaking: deleted, or the broker
        restarted between two fetches). Apache Kafka would answer a fetch beyond
        the end with "offset out of range"; Tansu 0.6 answers nothing, with the
        new, lower, high watermark."""
        consumer = self.consumer
        known = consumer.partitions_for_topic(self.engine.topic)
        if known and set(known) != self.partitions:
            return LookupError(f"the topic has {len(known)} partitions now, not {len(self.partitions)}")
        for tp, offset in self.next.items():
            highwater = consumer.highwater(tp)
            if highwater is not None and highwater < offset:
                return LookupError(f"partition {tp.partition} ends at {highwater}, before {offset}, read already: "
                                   "the topic was made again")
        return None

    async def _fell_behind(self, exc) -> None:
        """Our position is off the log (offset out of range): read on from its end,
        and have the sockets catch up from the log."""
        partitions = list(exc.args[0]) if exc.args and isinstance(exc.args[0], dict) else []
        partitions = partitions or list(self.consumer.assignment())
        log.warning("fan-out fell off the broker's log; reading on from its end",
                    extra={"event": "fanout.fell_behind", "partitions": len(partitions)})
        async with asyncio.timeout(CONNECT_TIMEOUT):
            await self.consumer.seek_to_end(*partitions)
            for tp in partitions:
                self.next[tp] = await self.consumer.position(tp)
        self.fan.recovered()

    async def _hand(self, record) -> None:
        key = record.key
        if key is None:
            return
        try:
            group = key.decode()
        except UnicodeDecodeError:
            return
        if group not in self.fan.groups:
            return  # another worker's group (module doc: what this costs)
        data = decoded(record.value)
        if data is None:
            return
        await self.fan.dispatch(data)

    async def _connect(self) -> None:
        """A new consumer on every partition of the topic (made if missing), each
        at its end; `ready` once all positions are fixed."""
        from aiokafka import AIOKafkaConsumer, TopicPartition

        engine = self.engine
        async with asyncio.timeout(CONNECT_TIMEOUT):
            partitions = await engine.ensure_topic()
        consumer = AIOKafkaConsumer(
            bootstrap_servers=engine.servers, client_id="realtime-fanout", group_id=None,
            enable_auto_commit=False, auto_offset_reset="none",  # out of range: raise (_fell_behind)
            fetch_max_wait_ms=engine.max_wait_ms, max_partition_fetch_bytes=MAX_PARTITION_FETCH_BYTES,
            fetch_max_bytes=FETCH_MAX_BYTES, request_timeout_ms=REQUEST_TIMEOUT_MS,
        )
        self.broken = None
        self._watch(consumer)
        self.consumer = consumer
        async with asyncio.timeout(CONNECT_TIMEOUT):
            await consumer.start()
            tps = [TopicPartition(engine.topic, p) for p in partitions]
            consumer.assign(tps)
            await consumer.seek_to_end(*tps)
            self.next = {tp: await consumer.position(tp) for tp in tps}
        self.partitions = set(partitions)
        self.ready.set()

    def _watch(self, consumer) -> None:
        """Note it when one of the consumer's connections breaks (the broker went
        away: it may have lost the topic, and we the messages in between).
        aiokafka's consumer would reconnect by itself and say nothing; its client
        (`_client`, aiokafka 0.14 internals) calls `_on_connection_closed` for every
        connection it made, with the reason."""
        from aiokafka.conn import CloseReason

        client = consumer._client
        original = client._on_connection_closed

        def closed(conn, reason):
            original(conn, reason)
            if reason in (CloseReason.CONNECTION_BROKEN, CloseReason.CONNECTION_TIMEOUT) \
                    and self.consumer is consumer:
                self.broken = ConnectionError(f"a connection to the broker was lost ({reason.name})")

        client._on_connection_closed = closed

    async def _close(self) -> None:
        self.ready.clear()
        consumer, self.consumer = self.consumer, None
        self.broken = None
        if consumer is not None:
            await _quietly(consumer.stop(), 5)


class KafkaEngine(Engine):
    name = "kafka"

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.servers, options = parse(url)
        self.topic = options.get("topic", TOPIC)
        self.partitions = _positive(options, "partitions", PARTITIONS)
        self.max_wait_ms = _positive(options, "max_wait_ms", MAX_WAIT_MS)
        # loop -> the start of its producer (module doc)
        self._producers: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Future]" = \
            weakref.WeakKeyDictionary()

    def receiver(self, fan) -> Receiver:
        return KafkaReceiver(self, fan)

    def pack(self, messages: list[tuple[str, dict]]) -> list[tuple[bytes, bytes]]:
        # Encoded before this worker's sockets get the messages (dispatch_own): the
        # fan-out keeps their prebuilt frames in them, which must not travel.
        return [(group.encode(), msgspec.msgpack.encode(message)) for group, message in messages]

    async def send(self, packed: list[tuple[bytes, bytes]]) -> None:
        if not packed:
            return
        if self._long_lived():
            await self._produce(await self._producer(), packed)
            return
        producer = await self._start_producer()
        try:
            await self._produce(producer, packed)
        finally:
            await self._stop(producer)

    async def ping(self) -> None:
        if self._long_lived():
            producer = await self._producer()
            await asyncio.wait_for(producer.client.fetch_all_metadata(), SEND_TIMEOUT)
            return
        await self._metadata(SEND_TIMEOUT)

    async def probe(self) -> None:
        """Reach the broker within PROBE_TIMEOUT, then make the topic if missing."""
        try:
            await self._metadata(PROBE_TIMEOUT)
        except (asyncio.TimeoutError, TimeoutError):
            raise BrokerError(f"{SETTING}: no answer from Kafka at {self.shown()} within {PROBE_TIMEOUT:g} s") \
                from None
        except Exception as exc:
            raise BrokerError(f"{SETTING}: cannot reach Kafka at {self.shown()}: {describe(exc)}") from None
        try:
            partitions = await asyncio.wait_for(self.ensure_topic(), CONNECT_TIMEOUT)
        except Exception as exc:
            raise BrokerError(f"{SETTING}: Kafka at {self.shown()} would not make or describe the topic "
                              f"{self.topic!r}: {describe(exc)}") from None
        if len(partitions) != self.partitions:
            log.warning("the fan-out topic has another partition count than the URL says; using it as it is",
                        extra={"event": "broker.partitions", "topic": self.topic, "found": len(partitions),
                               "wanted": self.partitions})

    async def ensure_topic(self) -> list[int]:
        """Make the topic unless it exists; its partitions, sorted."""
        from aiokafka.admin import AIOKafkaAdminClient, NewTopic
        from aiokafka.errors import for_code

        admin = AIOKafkaAdminClient(bootstrap_servers=self.servers, client_id="realtime-admin",
                                    request_timeout_ms=REQUEST_TIMEOUT_MS)
        await admin.start()
        try:
            response = await admin.create_topics([NewTopic(self.topic, self.partitions, 1)])
            for answer in response.topic_errors:
                code = answer[1]
                if code not in (0, TOPIC_ALREADY_EXISTS):
                    raise for_code(code)(f"creating topic {self.topic!r}")
            for topic in await admin.describe_topics([self.topic]):
                if topic["topic"] == self.topic:
                    if topic["error_code"]:
                        raise for_code(topic["error_code"])(f"describing topic {self.topic!r}")
                    found = sorted(p["partition"] for p in topic["partitions"])
                    if found:
                        return found
            raise LookupError(f"topic {self.topic!r} has no partitions")
        finally:
            await _quietly(admin.close(), SEND_TIMEOUT)

    # The producer of each loop (module doc).

    def _long_lived(self) -> bool:
        from realtime.delivery.fanout import running

        return running() is not None

    async def _producer(self):
        loop = asyncio.get_running_loop()
        starting = self._producers.get(loop)
        if starting is None or (starting.done() and (starting.cancelled() or starting.exception() is not None)):
            starting = self._producers[loop] = asyncio.ensure_future(self._start_producer())
        return await asyncio.shield(starting)

    async def _start_producer(self):
        """A started producer, the topic made first: aiokafka's metadata requests
        let the broker create a topic they name (allow_auto_topic_creation, fixed
        in aiokafka 0.14), with the broker's default partition count."""
        from aiokafka import AIOKafkaProducer

        await asyncio.wait_for(self.ensure_topic(), CONNECT_TIMEOUT)
        producer = AIOKafkaProducer(
            bootstrap_servers=self.servers, client_id="realtime-publish", acks=1, linger_ms=0,
            partitioner=_partitioner, request_timeout_ms=REQUEST_TIMEOUT_MS, enable_idempotence=False,
        )
        try:
            await asyncio.wait_for(producer.start(), CONNECT_TIMEOUT)
        except BaseException:
            await self._stop(producer)
            raise
        return producer

    @staticmethod
    async def _stop(producer) -> None:
        await _quietly(producer.stop(), SEND_TIMEOUT)

    async def _produce(self, producer, packed: list[tuple[bytes, bytes]]) -> None:
        """Each message in order, then wait (SEND_TIMEOUT in all) for the broker's
        acknowledgement of all of them."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SEND_TIMEOUT
        deliveries: list[asyncio.Future] = []
        try:
            async with asyncio.timeout_at(deadline):
                await self._reachable(producer)
                for key, value in packed:
                    delivery = await producer.send(self.topic, value, key=key)
                    delivery.add_done_callback(store.retrieved)
                    deliveries.append(delivery)
        except TimeoutError:
            raise TimeoutError(f"the Kafka producer took {len(deliveries)} of {len(packed)} messages "
                               f"in {SEND_TIMEOUT:g} s") from None
        # asyncio.wait does not cancel what is still pending: aiokafka owns those.
        _, pending = await asyncio.wait(deliveries, timeout=max(deadline - loop.time(), 0))
        if pending:
            raise TimeoutError(f"the broker acknowledged {len(deliveries) - len(pending)} of {len(deliveries)} "
                               f"messages in {SEND_TIMEOUT:g} s")
        for delivery in deliveries:
            delivery.result()

    @staticmethod
    async def _reachable(producer) -> None:
        """Fail at once when no broker can be reached (refused): the producer
        would otherwise hold the messages and retry until SEND_TIMEOUT. A broker
        already connected costs nothing here (AIOKafkaClient.ready)."""
        client = producer.client
        nodes = [broker.nodeId for broker in client.cluster.brokers()]
        for node in nodes:
            if await client.ready(node):
                return
        if nodes:
            raise ConnectionError(f"no Kafka broker reachable ({len(nodes)} known)")

    async def _metadata(self, timeout: float) -> None:
        """A metadata round trip on a client of its own (bootstrap), closed after."""
        from aiokafka import AIOKafkaClient

        client = AIOKafkaClient(bootstrap_servers=self.servers, client_id="realtime-probe",
                                request_timeout_ms=int(timeout * 1000))
        try:
            await asyncio.wait_for(client.bootstrap(), timeout)
            await asyncio.wait_for(client.fetch_all_metadata(), timeout)
        finally:
            await _quietly(client.close(), SEND_TIMEOUT)
