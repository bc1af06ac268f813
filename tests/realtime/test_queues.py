"""The per-socket queues of realtime/queues.py."""

import asyncio

import pytest

from realtime.queues import AppQueue

pytestmark = pytest.mark.asyncio


async def test_app_queue_is_fifo_and_wakes_a_waiting_get():
    queue = AppQueue()
    queue.put_nowait(1)
    queue.put_nowait(2)
    assert queue.qsize() == 2 and not queue.empty()
    assert [await queue.get(), await queue.get()] == [1, 2]
    getter = asyncio.ensure_future(queue.get())
    await asyncio.sleep(0)
    assert not getter.done()
    queue.put_nowait(3)
    assert await asyncio.wait_for(getter, 1) == 3
    assert queue.empty()


async def test_app_queue_cancelled_get_loses_nothing_and_two_getters_both_get():
    queue = AppQueue()
    first = asyncio.ensure_future(queue.get())
    second = asyncio.ensure_future(queue.get())
    await asyncio.sleep(0)
    queue.put_nowait("a")
    first.cancel()  # woken and cancelled at once: "a" goes to the other getter
    queue.put_nowait("b")
    got = [await asyncio.wait_for(second, 1), await asyncio.wait_for(queue.get(), 1)]
    assert sorted(got) == ["a", "b"]
