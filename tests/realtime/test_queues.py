"""The per-socket queues and the dispatch loop of realtime/ws/queues.py, and the
WebSocket router of realtime/web/routing.py."""

import asyncio

import pytest
from channels.exceptions import StopConsumer

from realtime.ws.queues import LocalQueue
from realtime.ws.queues import AppQueue, Served
from realtime.web.routing import SocketRouter

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


class Loop(Served):
    """Served with a dispatch of the test's, recording begin and end."""

    def __init__(self, dispatch):
        self.local_queue = LocalQueue()
        self.handle = dispatch
        self.calls: list[str] = []

    def begin(self, scope, receive, send):
        self.calls.append("begin")

    async def dispatch(self, message):
        await self.handle(message)

    async def end(self):
        self.calls.append("end")


async def test_served_takes_turns_and_keeps_no_waiter_behind():
    incoming = AppQueue()
    seen = []

    async def dispatch(message):
        seen.append(message)
        if message == "stop":
            raise StopConsumer()

    loop = Loop(dispatch)
    local = loop.local_queue
    for n in range(3):
        incoming.put_nowait(f"in{n}")
        local.put_nowait({"type": "x", "n": n})
    task = asyncio.ensure_future(loop({}, incoming.get, None))
    await asyncio.sleep(0)
    assert seen == ["in0", {"type": "x", "n": 0}, "in1", {"type": "x", "n": 1}, "in2", {"type": "x", "n": 2}]
    # Many wake-ups from the local queue alone leave no stale waiter in the other.
    for n in range(100):
        local.put_nowait({"type": "y", "n": n})
        await asyncio.sleep(0)
    assert len(seen) == 106 and incoming._getters == [local.waiter]  # the one it waits on now
    incoming.put_nowait("stop")
    assert await asyncio.wait_for(task, 1) is None  # (StopConsumer ends it quietly)
    assert not incoming._getters and local.waiter is None
    assert loop.calls == ["begin", "end"]


async def test_served_falls_back_to_await_many_dispatch_for_other_servers():
    incoming = asyncio.Queue()
    seen = []

    async def dispatch(message):
        seen.append(message)
        if message == "stop":
            raise StopConsumer()

    loop = Loop(dispatch)
    loop.local_queue.put_nowait({"type": "x"})
    incoming.put_nowait("stop")
    await asyncio.wait_for(loop({}, incoming.get, None), 1)
    assert seen[-1] == "stop" and loop.calls == ["begin", "end"]


async def test_served_ends_however_a_handler_fails():
    async def dispatch(message):
        raise ValueError("a handler's bug")

    loop = Loop(dispatch)
    incoming = AppQueue()
    incoming.put_nowait("boom")
    with pytest.raises(ValueError, match="a handler's bug"):
        await asyncio.wait_for(loop({}, incoming.get, None), 1)
    assert loop.calls == ["begin", "end"]


async def test_served_runs_the_admission_first_and_a_refusal_instead_of_the_socket():
    order = []

    async def admit(scope):
        order.append("admit")
        scope["user"] = "someone"

    async def dispatch(message):
        order.append(message)
        raise StopConsumer()

    loop = Loop(dispatch)
    incoming = AppQueue()
    incoming.put_nowait("connect")
    scope = {}
    await asyncio.wait_for(loop(scope, incoming.get, None, admit), 1)
    assert order == ["admit", "connect"] and scope == {"user": "someone"} and loop.calls == ["begin", "end"]

    refused = []

    async def refusal(scope, receive, send):
        refused.append(await receive())

    async def deny(scope):
        return refusal

    loop = Loop(dispatch)
    incoming.put_nowait("connect")
    await asyncio.wait_for(loop({}, incoming.get, None, deny), 1)
    assert refused == ["connect"] and loop.calls == []  # nothing begun, nothing to end


async def test_socket_router_matches_as_url_router_does():
    calls = []

    def app(name):
        async def run(scope, receive, send):
            calls.append(name)
        return run

    router = SocketRouter({"ws/v1/": app("realtime")}, app("other"))
    await router({"path": "/ws/v1/"}, None, None)
    await router({"path": "/prefix/ws/v1/", "root_path": "/prefix"}, None, None)
    await router({"path": "/ws/v1/x"}, None, None)
    await router({"path": "/ws/bench/bare/"}, None, None)
    assert calls == ["realtime", "realtime", "other", "other"]


async def test_the_application_is_asgi_3_to_servers_that_inspect_it():
    """uvicorn (and hypercorn) take an app whose __call__ is not a coroutine function
    for ASGI 2 and call it with the scope alone: a 500 on every request."""
    import inspect

    from project.asgi import application

    assert inspect.iscoroutinefunction(type(application).__call__)
