"""Reads that wait together are made together.

A reconnect storm is thousands of sockets asking the database the same kind of
question within a few seconds (whose is this session cookie?), each a trip to the
worker's one database thread and a query or two. A `Batcher` answers the first
request at once, alone; the requests that arrive while that read runs wait and are
then read together, in one trip to the thread and as few queries as the read
function can manage for all of them (`resolve(keys) -> {key: answer}`). So a quiet
worker pays no wait, and a busy one pays one read per batch instead of one per
socket: the batches grow with the load, by themselves.

An answer is for everyone who asked for that key in that batch; an answer that is
an exception (a refusal of that one key) is raised to them. A read that raises
raises for every request of its batch (each caller handles it as it would its own
read's); requests that arrive meanwhile are read next, afresh.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

from channels.db import database_sync_to_async
from prometheus_client import Histogram

from realtime.state import store

BATCH_SIZE = Histogram(
    "realtime_read_batch_size", "Requests answered by one batched database read, by read",
    ["read"], buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)


@dataclass(slots=True)
class _Queue:
    waiting: list = field(default_factory=list)  # (key, future)
    reader: asyncio.Task | None = None


class Batcher:
    """`await batcher.get(key)`: the answer of `resolve([... key ...])[key]`, read
    on the database thread together with the other requests waiting (module doc)."""

    def __init__(self, name: str, resolve: Callable[[list], dict], most: int = 256):
        self.name, self.resolve, self.most = name, resolve, most
        self._queues = store.LoopLocal(_Queue)  # (tests run a loop per test)
        self._observe = BATCH_SIZE.labels(name).observe

    async def get(self, key: Hashable):
        queue = self._queues()
        future = asyncio.get_running_loop().create_future()
        queue.waiting.append((key, future))
        if queue.reader is None:
            queue.reader = asyncio.ensure_future(self._read(queue))
        return await future

    async def _read(self, queue: _Queue) -> None:
        batch: list = []
        try:
            while queue.waiting:
                batch, queue.waiting = queue.waiting[:self.most], queue.waiting[self.most:]
                keys = list(dict.fromkeys(key for key, _ in batch))
                self._observe(len(batch))
                try:
                    found = await database_sync_to_async(self.resolve)(keys)
                except Exception as exc:
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for key, future in batch:
                    if future.done():  # (a caller that went away has cancelled its own)
                        continue
                    answer = found[key]
                    if isinstance(answer, Exception):
                        future.set_exception(answer)
                    else:
                        future.set_result(answer)
        finally:
            queue.reader = None
            # Cancelled (the loop closing): no answer will come for these.
            for _, future in batch + queue.waiting:
                future.cancel()
            queue.waiting = []
