"""REALTIME_BROKER_URL: which engine each URL picks, the shards' hash, and the
start-up check that stops a worker whose broker cannot be used, with a message
naming the setting (and never the password)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter

import pytest
from django.core.exceptions import ImproperlyConfigured

from realtime.delivery import transport
from realtime.delivery.engines.redis import RedisEngine, jump_hash, shard_of
from tests.services import ROOT, RedisServer, free_port

pytestmark = pytest.mark.django_db


def test_the_scheme_picks_the_engine():
    assert transport.engine_class("") is transport.LayerEngine
    assert transport.engine_class("redis://127.0.0.1:6379/0") is RedisEngine
    assert transport.engine_class("redis://a:1/0,redis://b:2/0") is RedisEngine
    assert RedisEngine("redis://a:1/0,redis://b:2/0").name == "redis-sharded"
    assert RedisEngine("redis://a:1/0").name == "redis"


@pytest.mark.parametrize("url, says", [
    ("mqtt://127.0.0.1:1883", "unknown scheme 'mqtt'"),
    ("redis://a:1/0,nats://b:2", "must all be redis://"),
    ("nats://a:1,nats://b:2", "only redis:// (shards), redis+cluster:// (nodes) and kafka://"),
])
def test_a_url_no_engine_serves_stops_start_up_naming_the_setting(url, says):
    with pytest.raises(ImproperlyConfigured) as caught:
        transport.engine_class(url)
    assert str(caught.value).startswith("REALTIME_BROKER_URL: ") and says in str(caught.value)


def test_unset_means_redis_at_redis_url_and_without_it_the_layer(settings):
    settings.REALTIME_BROKER_URL, settings.REDIS_URL = "", "redis://127.0.0.1:1/0"
    assert transport.broker_url() == "redis://127.0.0.1:1/0"
    settings.REALTIME_BROKER_URL = "nats://127.0.0.1:4222"
    assert transport.broker_url() == "nats://127.0.0.1:4222"
    settings.REALTIME_BROKER_URL, settings.REDIS_URL = "", ""
    assert transport.chosen().name == "layer"


def test_passwords_are_hidden_in_what_is_shown():
    assert transport.hide_password("amqp://guest:s3cret@127.0.0.1:5672/x") == "amqp://guest:***@127.0.0.1:5672/x"
    assert "pw" not in transport.hide_password("redis://:pw@a:1/0,redis://:pw@b:2/0")


def test_the_shard_hash_is_stable_even_and_moves_only_to_a_new_shard():
    groups = [f"room.r{i}" for i in range(20_000)]
    # The published jump hash (its reference implementation's test vectors), and
    # the groups' shards pinned: every process, every release, the same answer.
    assert [jump_hash(k, b) for k, b in ((1, 1), (42, 57), (0xDEAD10CC, 1), (0xDEAD10CC, 666), (256, 1024))] == \
        [0, 43, 0, 361, 520]
    assert [shard_of(g, 4) for g in ("room.general", "room.ops", "user.1", "realtime.workers")] == [1, 3, 2, 2]
    # Even: each of 4 shards carries a quarter (within 5%).
    counts = Counter(shard_of(g, 4) for g in groups)
    assert all(abs(n - 5000) < 250 for n in counts.values()), counts
    # A fifth shard takes about a fifth of the groups, every one from the others to it.
    moved = [(shard_of(g, 4), shard_of(g, 5)) for g in groups if shard_of(g, 4) != shard_of(g, 5)]
    assert all(new == 4 for _, new in moved)
    assert abs(len(moved) - 4000) < 300, len(moved)


def test_a_shard_listed_twice_is_refused():
    with pytest.raises(transport.BrokerError, match="REALTIME_BROKER_URL: a Redis shard is listed twice"):
        RedisEngine("redis://a:1/0,redis://a:1/0")


def probe(settings, url: str) -> str:
    """What the start-up check says of `url`."""
    settings.REALTIME_BROKER_URL = url
    with pytest.raises(transport.BrokerError) as caught:
        transport.check_at_start_up(timeout=5)
    return str(caught.value)


def test_a_wrong_password_or_a_cluster_node_behind_redis_url_is_refused(settings, tmp_path):
    locked = RedisServer(tmp_path / "locked")
    locked.workdir.mkdir()
    node = RedisServer(tmp_path / "node")
    node.workdir.mkdir()
    for server, extra in ((locked, ["--requirepass", "right-one"]), (node, ["--cluster-enabled", "yes",
                          "--cluster-config-file", str(tmp_path / "node" / "nodes.conf"),
                          "--cluster-port", str(free_port())])):
        server.proc = subprocess.Popen(
            [server.binary, "--port", str(server.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(server.workdir), *extra], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        from deploy.cluster import wait_port

        wait_port(server.port, proc=server.proc)
    try:
        said = probe(settings, f"redis://:wrong-one@127.0.0.1:{locked.port}/0")
        assert said.startswith("REALTIME_BROKER_URL: Redis at redis://:***@127.0.0.1") and "password" in said
        assert "wrong-one" not in said
        said = probe(settings, f"redis://127.0.0.1:{node.port}/0")
        assert said.startswith("REALTIME_BROKER_URL: ") and "use redis+cluster://" in said
        # The right password is let through.
        settings.REALTIME_BROKER_URL = f"redis://:right-one@127.0.0.1:{locked.port}/0"
        transport.check_at_start_up(timeout=5)
    finally:
        locked.stop()
        node.stop()


def test_a_worker_whose_broker_is_unreachable_stops_before_listening_naming_the_setting(tmp_path):
    port, dead = free_port(), free_port()
    env = {**os.environ, "DJANGO_DEBUG": "1", "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}",
           "REDIS_URL": "", "REALTIME_BROKER_URL": f"redis://:hunter2@127.0.0.1:{dead}/0"}
    done = subprocess.run([sys.executable, "-m", "realtime.server", "-b", "127.0.0.1", "-p", str(port),
                           "project.asgi:application"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"REALTIME_BROKER_URL: cannot reach redis://:***@127.0.0.1:{dead}/0 (redis)" in done.stderr
    assert "hunter2" not in done.stderr + done.stdout


def test_a_worker_with_an_unknown_scheme_stops_naming_the_setting(tmp_path):
    env = {**os.environ, "DJANGO_DEBUG": "1", "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}",
           "REDIS_URL": "", "REALTIME_BROKER_URL": "mqtt://127.0.0.1:1883"}
    done = subprocess.run([sys.executable, "-m", "realtime.server", "-b", "127.0.0.1", "-p", str(free_port()),
                           "project.asgi:application"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "REALTIME_BROKER_URL: unknown scheme 'mqtt'" in done.stderr


def test_every_engine_the_setting_names_runs_the_contract_suite():
    """Each scheme's engine has a broker server (deploy/brokers/), so the contract
    suite (tests/brokers/conftest.py: one run per server present) runs on all six."""
    from deploy import brokers

    assert brokers.available() == list(brokers.KINDS) == \
        ["redis", "redis-sharded", "redis-cluster", "nats", "amqp", "kafka"]
    engines = {transport.engine_class(url).__name__ for url in (
        "redis://a:1/0", "redis+cluster://a:1", "nats://a:1", "amqp://a:1/", "kafka://a:1")}
    assert engines == {"RedisEngine", "RedisClusterEngine", "NatsEngine", "AmqpEngine", "KafkaEngine"}
