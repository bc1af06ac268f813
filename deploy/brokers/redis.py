"""Redis as the broker: one instance of its own, or several (rooms sharded)."""

from __future__ import annotations

from pathlib import Path

from deploy.cluster import RedisServer


class ShardedRedis:
    """SHARDS private redis-servers; REALTIME_BROKER_URL lists them all."""

    shards = 2

    def __init__(self, workdir: Path, shards: int | None = None) -> None:
        count = shards or self.shards
        self.servers = []
        for i in range(count):
            directory = Path(workdir) / f"shard-{i}"
            directory.mkdir(parents=True, exist_ok=True)
            self.servers.append(RedisServer(directory))

    @property
    def url(self) -> str:
        return ",".join(server.url for server in self.servers)

    def start(self):
        for server in self.servers:
            server.start()
        return self

    def stop(self) -> None:
        for server in self.servers:
            server.stop()

    def restart(self) -> None:
        self.stop()
        self.start()


class OneRedis(ShardedRedis):
    """A Redis of the broker's own (not the cluster's REDIS_URL)."""

    shards = 1
