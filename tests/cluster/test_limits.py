"""Frame-size limits on a real worker (daphne + realtime.server)."""

from __future__ import annotations

import json

import pytest
import websockets

from tests.cluster.conftest import login, open_socket

pytestmark = [pytest.mark.cluster, pytest.mark.asyncio]


async def test_an_oversized_frame_is_closed_with_1009_and_the_worker_stays_up(cluster):
    worker = cluster.workers[0]
    ws = await open_socket(worker.url, login(worker.url, "bob"))
    await ws.send(json.dumps({"type": "message.send", "room": "general", "body": "x" * 70_000, "client_id": "big"}))
    with pytest.raises(websockets.ConnectionClosed) as closed:
        await ws.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
    again = await open_socket(worker.url, login(worker.url, "bob"))
    await again.send(json.dumps({"type": "ping", "ref": 1}))
    assert json.loads(await again.recv()) == {"type": "pong", "ref": 1}
    await again.close()
    assert worker.proc.poll() is None


async def test_a_body_over_the_limit_inside_the_frame_limit_is_too_large(cluster):
    worker = cluster.workers[0]
    ws = await open_socket(worker.url, login(worker.url, "bob"))
    await ws.send(json.dumps({"type": "message.send", "room": "general", "body": "x" * 4001, "client_id": "long", "ref": 1}))
    reply = json.loads(await ws.recv())
    assert (reply["type"], reply["code"]) == ("error", "too_large")
    await ws.close()
