"""The cluster view across real workers: both appear in the dashboard's ticks, a
killed worker drops out within the heartbeat TTL; /readyz and /metrics per worker."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request

import pytest

from realtime.state import heartbeat
from tests.cluster.conftest import ONCE, login, open_socket

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


@ONCE
async def test_the_cluster_view_shows_every_worker_and_drops_a_dead_one(cluster):
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
        if b.proc.poll() is not None:  # restart it only if it was killed
            b.start()


async def test_each_worker_serves_readyz_and_metrics_but_the_balancer_hides_metrics(cluster):
    worker = cluster.workers[0]
    ready = json.loads(urllib.request.urlopen(f"{worker.url}/readyz").read())
    assert ready["status"] == "ok" and ready["checks"] == {"database": "ok", "channel_layer": "ok", "broker": "ok"}
    text = urllib.request.urlopen(f"{worker.url}/metrics").read().decode()
    assert "realtime_connections_active" in text
    # Start-up's heap is out of the collector's walks (a full collection would
    # otherwise stop every socket for the whole heap).
    frozen = next(line for line in text.splitlines() if line.startswith("realtime_gc_frozen_objects "))
    assert float(frozen.split()[1]) > 10_000
    # And each collection's pause is counted, by generation (a worker that has
    # served anything has made young collections).
    young = [line for line in text.splitlines() if line.startswith('realtime_gc_pause_seconds_count{generation="0"}')]
    assert young and float(young[0].split()[1]) > 0, "the collector's pauses are not counted"
    # A full collection at most once in 100 young ones (REALTIME_GC_FULL_AFTER's default).
    assert "\nrealtime_gc_full_after 100.0\n" in text
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{cluster.balancer.url}/metrics")
    # nginx answers itself; HAProxy passes it on, and the worker sees a proxied request.
    assert refused.value.code == {"nginx": 404, "haproxy": 403}[cluster.balancer_kind]


@ONCE
async def test_a_killed_workers_users_leave_presence_within_the_bound(cluster):
    """bob follows #general on worker b, carol on worker a; b is killed with -9 and
    does nothing more. Worker a's sweep announces bob's leave within presence.BOUND."""
    from realtime.state import presence

    a, b = cluster.workers
    carol = await open_socket(a.url, login(a.url, "carol"))
    bob = await open_socket(b.url, login(b.url, "bob"))
    try:
        await bob.send(json.dumps({"type": "subscribe", "room": "general", "ref": "s"}))
        while json.loads(await bob.recv()).get("ref") != "s":  # bob is in before carol looks
            pass
        await carol.send(json.dumps({"type": "subscribe", "room": "general", "ref": "s"}))

        async def until(predicate, timeout):
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                frame = json.loads(await asyncio.wait_for(carol.recv(), deadline - time.monotonic()))
                if predicate(frame):
                    return frame
            raise AssertionError("not seen in time")

        state = await until(lambda f: f.get("type") == "presence.state", 10)
        assert "bob" in state["users"] and "carol" in state["users"]
        b.kill()
        killed = time.monotonic()
        left = await until(lambda f: f.get("type") == "presence.diff" and "bob" in f["leaves"], presence.BOUND + 10)
        waited = time.monotonic() - killed
        print(f"bob left presence {waited:.1f} s after worker b was killed")
        assert left["room"] == "general"
        assert waited <= presence.BOUND + 3, f"bob left {waited:.1f} s after the crash"
    finally:
        await carol.close()
        if b.proc.poll() is not None:  # restart it only if it was killed
            b.start()


async def test_after_every_worker_was_down_the_balancer_sends_to_them_again_within_seconds(cluster):
    """Found using it: with every worker killed and restarted at once, nginx kept
    answering 502 for the rest of its fail_timeout (then 10 s) after the workers
    were back, and the pages came back some 11 s after the outage. nginx tries a
    failed worker again after 2 s now; HAProxy checks every second."""
    page = f"{cluster.balancer.url}/accounts/login/"

    def status() -> int:
        try:
            return urllib.request.urlopen(page, timeout=5).status
        except urllib.error.HTTPError as exc:
            return exc.code

    for worker in cluster.workers:
        worker.kill()
    down = {"nginx": 502, "haproxy": 503}[cluster.balancer_kind]
    assert [status() for _ in range(3)] == [down] * 3  # every worker marked failed
    try:
        for worker in cluster.workers:
            worker.start()  # returns once it listens
    finally:
        for worker in cluster.workers:
            if worker.proc.poll() is not None:
                worker.start()
    back = time.monotonic()
    while (got := status()) != 200:
        assert got == down
        assert time.monotonic() - back < 5, "the balancer still sends nothing to the workers that are back"
        await asyncio.sleep(0.1)
