"""Per-socket queues at a fraction of asyncio.Queue's memory.

asyncio.Queue keeps three deques and an Event with a fourth: 3.2 KiB a queue
before it holds anything (measured with tracemalloc: bench/memprobe.py).
"""

from __future__ import annotations

import asyncio
import contextlib



class AppQueue:
    """daphne's queue of one socket's events for its application: the part of
    asyncio.Queue used here (put_nowait, get, empty, qsize), at a fraction of its
    memory (asyncio.Queue keeps three deques and an Event with a fourth, 3.2 KiB a
    socket). What waits is the list `_queue` (onMessage's receive bound reads it)."""

    __slots__ = ("_queue", "_getters")

    def __init__(self) -> None:
        self._queue: list = []
        self._getters: list[asyncio.Future] | None = None

    def put_nowait(self, item) -> None:
        self._queue.append(item)
        self._wakeup_next()

    def empty(self) -> bool:
        return not self._queue

    def qsize(self) -> int:
        return len(self._queue)

    def _wakeup_next(self) -> None:
        getters = self._getters
        while getters:
            getter = getters.pop(0)
            if not getter.done():
                getter.set_result(None)
                break

    async def get(self):
        # asyncio.Queue.get, with its cancellation handling.
        while not self._queue:
            getter = asyncio.get_running_loop().create_future()
            if self._getters is None:
                self._getters = []
            self._getters.append(getter)
            try:
                await getter
            except BaseException:
                getter.cancel()
                with contextlib.suppress(ValueError):
                    self._getters.remove(getter)
                if self._queue and not getter.cancelled():
                    self._wakeup_next()
                raise
        return self._queue.pop(0)
