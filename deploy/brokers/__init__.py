"""The brokers REALTIME_BROKER_URL can name, started the way an operator would on
one machine, for `make cluster BROKER=<kind>`, the tests (tests/brokers/) and the
bench. Every server binds 127.0.0.1 on free ports and is stopped by its own pid.

A broker server has `url` (what REALTIME_BROKER_URL is set to), `start()`, `stop()`
and `restart()` (down, then up again on the same ports: the contract suite's broker
restart mid-stream). Each kind's class lives in its own module, imported when used.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

# kind -> "module:Class". "redis" is the default: the cluster's own Redis (REDIS_URL).
KINDS = {
    "redis": "deploy.brokers.redis:OneRedis",
    "redis-sharded": "deploy.brokers.redis:ShardedRedis",
    "redis-cluster": "deploy.brokers.redis_cluster:RedisClusterServer",
    "nats": "deploy.brokers.nats:NatsServer",
    "amqp": "deploy.brokers.amqp:RabbitServer",
    "kafka": "deploy.brokers.kafka:TansuServer",
}


def available() -> list[str]:
    """The kinds whose server module is here."""
    found = []
    for kind, path in KINDS.items():
        module = path.partition(":")[0]
        if importlib.util.find_spec(module) is not None:
            found.append(kind)
    return found


def server(kind: str, workdir: Path):
    """An unstarted broker server of `kind` keeping its files under `workdir`."""
    if kind not in KINDS:
        raise ValueError(f"unknown broker {kind!r}; one of {', '.join(KINDS)}")
    module, _, name = KINDS[kind].partition(":")
    directory = Path(workdir) / f"broker-{kind}"
    directory.mkdir(parents=True, exist_ok=True)
    return getattr(importlib.import_module(module), name)(directory)
