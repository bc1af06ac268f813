"""Per-socket queues at a fraction of asyncio.Queue's memory, and the one
coroutine that serves a socket (Served): its admission, then its two queues
without a task for each.

asyncio.Queue keeps three deques and an Event with a fourth: 3.2 KiB a queue
before it holds anything. channels' await_many_dispatch keeps a task per queue
plus asyncio.wait's own waiter and callbacks (some 3.5 KiB a socket, measured
with tracemalloc: bench/memprobe.py).
"""

from __future__ import annotations

import asyncio
import contextlib

from channels.exceptions import StopConsumer
from channels.utils import await_many_dispatch

from realtime.delivery import names
from realtime.observability import metrics


class AppQueue:
    """daphne's queue of one socket's events for its application: the part of
    asyncio.Queue used here (put_nowait, get, get_nowait, empty, qsize), at a
    fraction of its memory (asyncio.Queue keeps three deques and an Event with a
    fourth, 3.2 KiB a socket). What waits is the list `_queue` (onMessage's receive bound reads it)."""

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

    def get_nowait(self):
        return self._queue.pop(0)  # IndexError when empty (asyncio.QueueEmpty there)

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


LOCAL_QUEUE_MAX = 1000  # room events held for one busy socket before they are dropped


class LocalQueue:
    """A socket's queue of what the fan-out and the housekeeper hand it: the part
    of asyncio.Queue used here (no size bound, one reader), at a fraction of its
    memory (asyncio.Queue keeps four deques and an Event per instance). The items
    are a list, not a deque: it is nearly always empty, and an empty deque holds
    a 64-slot block (760 B a socket) where an empty list takes 56 B."""

    __slots__ = ("items", "waiter")

    def __init__(self) -> None:
        self.items: list = []
        self.waiter: asyncio.Future | None = None

    def put_nowait(self, item) -> None:
        if len(self.items) >= LOCAL_QUEUE_MAX and item.get("type") == names.ROOM_EVENT:
            # A socket this far behind drops room events: it repairs the gap from
            # the log at the next event it takes (or at its next ping).
            metrics.LAYER_FAILURES.labels("local-queue-full").inc()
            return
        self.items.append(item)
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def empty(self) -> bool:
        return not self.items

    async def get(self):
        while not self.items:
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        return self.items.pop(0)


class Served:
    """A socket's application as one coroutine for its whole life: the consumer's
    __call__ (RealtimeConsumer mixes this in). Each coroutine a socket's task
    waits in costs a frame (some 300 B, more with its locals): the middleware's
    admission runs to its end first (`admit`: accounts/middleware.py hands it
    over instead of awaiting the consumer from a frame of its own), then this
    frame alone serves the two queues.

    When `receive` is an AppQueue's get (the daphne launcher, realtime/server/bounded.py),
    both queues wake one future of this task instead of each having a task of its
    own. The two take turns as with channels' await_many_dispatch: one message from
    each that has one, the socket's own first. Anything else: await_many_dispatch
    as is. StopConsumer (a disconnect) ends it; `end()` runs however it ends."""

    local_queue: LocalQueue

    async def __call__(self, scope, receive, send, admit=None):
        if admit is not None:
            # (admit(scope): None to go on, with the scope's identity filled in;
            # else the ASGI app that refuses the handshake)
            refusal = await admit(scope)
            admit = None  # (not kept for the socket's life)
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        self.begin(scope, receive, send)
        try:
            app_queue = getattr(receive, "__self__", None)
            if not isinstance(app_queue, AppQueue) or getattr(receive, "__func__", None) is not AppQueue.get:
                await await_many_dispatch([receive, self.local_queue.get], self.dispatch)
                return
            local_queue, dispatch = self.local_queue, self.dispatch
            incoming, local = app_queue._queue, local_queue.items
            loop = asyncio.get_running_loop()
            while True:
                if incoming:
                    await dispatch(incoming.pop(0))
                if local:
                    await dispatch(local.pop(0))
                if incoming or local:
                    continue
                waiter = loop.create_future()
                if app_queue._getters is None:
                    app_queue._getters = []
                app_queue._getters.append(waiter)
                local_queue.waiter = waiter
                try:
                    await waiter
                finally:
                    with contextlib.suppress(ValueError):
                        app_queue._getters.remove(waiter)
                    if local_queue.waiter is waiter:
                        local_queue.waiter = None
        except StopConsumer:
            pass
        finally:
            await self.end()

    def begin(self, scope, receive, send) -> None:
        """What the consumer sets up before its first message."""
        raise NotImplementedError

    async def end(self) -> None:
        """Its last word, however the socket's application ended."""
