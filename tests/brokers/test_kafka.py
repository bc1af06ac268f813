"""The kafka engine's own guarantees (realtime/delivery/engines/kafka.py), beside
the contract suite (test_contract.py), against Tansu 0.6 (deploy/brokers/kafka.py;
not Apache Kafka, which this machine kind cannot run): the partition a group's
messages take is the Java client's murmur2 choice, stable and spread; join returns
once the consumer's positions are fixed; a broker restart, or a topic made again
under the consumer, is counted and ends with `recovered()`; a broker that cannot be
reached stops a worker at start-up, naming REALTIME_BROKER_URL."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import msgspec
import pytest

from deploy.cluster import ROOT, Worker, free_port
from realtime.delivery import transport
from realtime.delivery.engines import kafka
from realtime.delivery.engines.kafka import KafkaEngine, partition_of, partition_of_key
from realtime.delivery.transport import SETTING, BrokerError
from tests.conftest import missing


@pytest.fixture(scope="module")
def tansu():
    from deploy.brokers.kafka import TansuServer

    try:
        server = TansuServer(Path(tempfile.mkdtemp(prefix="realtime-tansu-")))
    except FileNotFoundError as exc:
        missing(str(exc))
    server.start()
    yield server
    server.stop()


class Fan:
    """What a receiver needs of the fan-out (delivery/fanout.py), recorded."""

    def __init__(self, *groups: str) -> None:
        self.groups = {group: set() for group in groups}
        self.got: list[dict] = []
        self.failures: list[Exception] = []
        self.recoveries = 0

    async def dispatch(self, message: dict) -> None:
        self.got.append(message)

    async def failed(self, exc: Exception, delay: float) -> float:
        self.failures.append(exc)
        await asyncio.sleep(delay)  # the fan-out's own back-off
        return min(delay * 2, 2.0)

    def recovered(self) -> None:
        self.recoveries += 1


async def until(condition, timeout: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.02)


async def stop(receiver) -> None:
    if receiver.task is not None:
        receiver.task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await receiver.task


def unique_topic() -> str:
    return f"rt-test-{time.monotonic_ns()}"


# The partition choice.

def test_partition_of_is_the_java_clients_murmur2():
    """Kafka's Java client (Utils.murmur2, its default partitioner) on the same
    keys: murmur2 values from Kafka's UtilsTest, partitions of 1,000 from
    kafka-python's compatibility test."""
    from aiokafka.partitioner import murmur2

    java = {b"21": -973932308, b"foobar": -790332482, b"a-little-bit-long-string": -985981536,
            b"a-little-bit-longer-string": -1486304829, b"abc": 479470107,
            b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971}
    assert {key: murmur2(key) - (1 << 32 if murmur2(key) >= 1 << 31 else 0) for key in java} == java
    assert [partition_of_key(key, 1000) for key in (b"", b"a", b"ab", b"abc", b"123456789", b"\x00 ")] == \
        [681, 524, 434, 107, 566, 742]
    # Pinned: a change here moves rooms between partitions.
    assert [partition_of(g, 8) for g in ("room.general", "room.random", "user.1", "realtime.workers")] == [4, 2, 0, 7]


def test_partition_of_is_stable_across_processes():
    groups = [f"room.r{i}" for i in range(200)] + [f"user.{i}" for i in range(200)]
    here = [partition_of(g, 8) for g in groups]
    code = ("import sys, json; from realtime.delivery.engines.kafka import partition_of; "
            "print(json.dumps([partition_of(g, 8) for g in json.loads(sys.stdin.read())]))")
    import json

    for seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", code], input=json.dumps(groups), capture_output=True, text=True,
                             cwd=ROOT, env={**os.environ, "PYTHONHASHSEED": seed}, check=True, timeout=60).stdout
        assert json.loads(out) == here


def test_partition_of_spreads_groups():
    for partitions in (4, 8, 32):
        groups = [f"room.r{i}" for i in range(4000)] + [f"user.{i}" for i in range(4000)]
        counts = Counter(partition_of(g, partitions) for g in groups)
        mean = len(groups) / partitions
        assert set(counts) == set(range(partitions))
        # A uniform choice: each count within 4 standard deviations of the mean.
        assert all(abs(n - mean) < 4 * mean ** 0.5 for n in counts.values()), counts


def test_the_url_names_hosts_and_partitions():
    engine = KafkaEngine("kafka://127.0.0.1:9093,broker-b?partitions=12&topic=t1")
    assert (engine.servers, engine.partitions, engine.topic) == (["127.0.0.1:9093", "broker-b:9092"], 12, "t1")
    assert (KafkaEngine("kafka://h").partitions, KafkaEngine("kafka://h").topic) == (8, "rt-fan")
    for bad in ("kafka://h?partitions=0", "kafka://h?partitions=x", "kafka://h?nope=1", "kafka://"):
        with pytest.raises(BrokerError, match=SETTING):
            KafkaEngine(bad)


@pytest.mark.asyncio
async def test_each_groups_messages_take_its_partition_in_order(tansu):
    from aiokafka import AIOKafkaConsumer, TopicPartition

    engine = KafkaEngine(f"{tansu.url}?partitions=8&topic={unique_topic()}")
    assert await engine.ensure_topic() == list(range(8))
    consumer = AIOKafkaConsumer(bootstrap_servers=engine.servers, group_id=None, auto_offset_reset="earliest")
    await consumer.start()
    try:
        consumer.assign([TopicPartition(engine.topic, p) for p in range(8)])
        groups = [f"room.g{i}" for i in range(24)]
        await engine.send(engine.pack([(g, {"n": n}) for n in range(10) for g in groups]))
        seen: dict[str, list] = {}
        while sum(map(len, seen.values())) < 240:
            for tp, records in (await consumer.getmany(timeout_ms=1000)).items():
                for record in records:
                    group = record.key.decode()
                    assert tp.partition == partition_of(group, 8), group
                    seen.setdefault(group, []).append(msgspec.msgpack.decode(record.value)["n"])
        assert seen == {g: list(range(10)) for g in groups}
    finally:
        await consumer.stop()


# Receiving.

@pytest.mark.asyncio
async def test_join_returns_once_the_positions_are_fixed(tansu):
    """A message sent as soon as join returns arrives (the consumer was placed at
    the end before it); a group nobody here follows is not handed out."""
    for attempt in range(3):
        engine = KafkaEngine(f"{tansu.url}?topic={unique_topic()}")
        fan = Fan("room.a")
        receiver = engine.receiver(fan)
        try:
            await receiver.join("room.a")
            await engine.send(engine.pack([("room.b", {"n": 0}), ("room.a", {"n": 1})]))
            await until(lambda: fan.got, what="the message sent right after join")
            assert fan.got == [{"n": 1}]
            started = time.monotonic()
            await receiver.join("room.b")  # later joins: at once
            assert time.monotonic() - started < 0.05
        finally:
            await stop(receiver)


@pytest.mark.asyncio
async def test_a_broker_restart_is_counted_then_recovered(tansu):
    """Tansu's memory storage loses the topic: the receiver counts the failure,
    makes the topic again, places itself at the end and calls recovered(); what is
    sent after that arrives."""
    engine = KafkaEngine(f"{tansu.url}?topic={unique_topic()}")
    fan = Fan("room.a")
    receiver = engine.receiver(fan)
    try:
        await receiver.join("room.a")
        await engine.send(engine.pack([("room.a", {"n": 1})]))
        await until(lambda: len(fan.got) == 1, what="the first message")
        await asyncio.to_thread(tansu.restart)
        await until(lambda: fan.recoveries == 1, timeout=60, what="recovered() after the restart")
        assert fan.failures, "the restart was not counted"
        assert receiver.ready.is_set()
        await engine.send(engine.pack([("room.a", {"n": 2})]))
        await until(lambda: len(fan.got) == 2, what="a message after the restart")
        assert fan.got == [{"n": 1}, {"n": 2}]
    finally:
        await stop(receiver)


@pytest.mark.asyncio
async def test_a_topic_made_again_under_the_consumer_is_recovered(tansu):
    """Deleted and made again, its connections unbroken: the log now ends before
    what the consumer read (Tansu answers that with a lower high watermark, no
    error): a failure, then recovered()."""
    from aiokafka.admin import AIOKafkaAdminClient

    engine = KafkaEngine(f"{tansu.url}?partitions=2&topic={unique_topic()}")
    fan = Fan("room.a")
    receiver = engine.receiver(fan)
    admin = AIOKafkaAdminClient(bootstrap_servers=engine.servers)
    await admin.start()
    try:
        await receiver.join("room.a")
        await engine.send(engine.pack([("room.a", {"n": n}) for n in range(20)]))
        await until(lambda: len(fan.got) == 20, what="20 messages")
        await admin.delete_topics([engine.topic])
        await engine.ensure_topic()
        await engine.send(engine.pack([("room.a", {"n": 20})]))
        await until(lambda: fan.recoveries == 1, what="recovered() after the topic was made again")
        assert fan.failures
        await engine.send(engine.pack([("room.a", {"n": 21})]))
        await until(lambda: fan.got[-1] == {"n": 21}, what="a message after recovering")
    finally:
        await admin.close()
        await stop(receiver)


# Start-up.

@pytest.mark.asyncio
async def test_probe_of_an_unreachable_broker_names_the_setting():
    engine = KafkaEngine(f"kafka://127.0.0.1:{free_port()}")
    started = time.monotonic()
    with pytest.raises(BrokerError, match=SETTING) as raised:
        await engine.probe()
    assert "cannot reach Kafka" in str(raised.value) or "no answer" in str(raised.value)
    assert time.monotonic() - started < kafka.PROBE_TIMEOUT + 2


def test_check_at_start_up_names_the_setting(settings):
    settings.REALTIME_BROKER_URL = f"kafka://127.0.0.1:{free_port()}"
    with pytest.raises(BrokerError, match=SETTING):
        transport.check_at_start_up()


def test_a_worker_with_an_unreachable_broker_exits_2_naming_the_setting(tmp_path):
    url = f"kafka://127.0.0.1:{free_port()}"
    env = {**os.environ, "DJANGO_DEBUG": "0", "DJANGO_SECRET_KEY": os.urandom(32).hex(),
           "DJANGO_ALLOWED_HOSTS": "127.0.0.1",
           "DJANGO_ALLOWED_ORIGINS": "http://127.0.0.1", "DATABASE_URL": "", "REDIS_URL": "", "PYTHONUNBUFFERED": "1",
           "REALTIME_BROKER_URL": url}
    env.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
    worker = Worker("k", env, tmp_path)
    done = subprocess.run(worker.command(), cwd=ROOT, env=worker.env, capture_output=True, text=True, timeout=90)
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert SETTING in done.stderr and url in done.stderr, done.stderr[-2000:]
    assert "realtime.server:" in done.stderr
