"""The cluster view across real workers: both appear in the dashboard's ticks, a
killed worker drops out within the heartbeat TTL; /readyz and /metrics per worker."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request

import pytest

from realtime import heartbeat
from tests.cluster.conftest import login, open_socket

pytestmark = [pytest.mark.cluster, pytest.mark.asyncio]


async def ticks_until(ws, predicate, timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    names = None
    while time.monotonic() < deadline:
        frame = json.loads(await asyncio.wait_for(ws.recv(), timeout))
        if frame.get("type") == "metrics.tick":
            names = [w["worker"] for w in frame["workers"]]
            if predicate(names):
                return names
    raise AssertionError(f"the cluster view never matched; last: {names}")


async def test_the_cluster_view_shows_every_worker_and_drops_a_dead_one(cluster):
    if cluster.balancer_kind != "nginx":
        pytest.skip("talks to the workers directly; run once")
    a, b = cluster.workers
    ws = await open_socket(a.url, login(a.url, "admin"))
    try:
        await ws.send(json.dumps({"type": "metrics.subscribe", "ref": "m"}))
        await ticks_until(ws, lambda names: names == ["a", "b"], 10)
        b.kill()
        started = time.monotonic()
        await ticks_until(ws, lambda names: names == ["a"], heartbeat.TTL + 5)
        assert time.monotonic() - started <= heartbeat.TTL + 3
    finally:
        await ws.close()
        b.start()


async def test_each_worker_serves_readyz_and_metrics_but_the_balancer_hides_metrics(cluster):
    worker = cluster.workers[0]
    ready = json.loads(urllib.request.urlopen(f"{worker.url}/readyz").read())
    assert ready["status"] == "ok" and ready["checks"] == {"database": "ok", "channel_layer": "ok"}
    text = urllib.request.urlopen(f"{worker.url}/metrics").read().decode()
    assert "realtime_connections_active" in text
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{cluster.balancer.url}/metrics")
    assert refused.value.code in (403, 404)
