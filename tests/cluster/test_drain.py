"""Graceful restarts: SIGTERM (and `manage.py drain`) close a worker's sockets with
4012, whose reason says how long to spread the return over; its clients are back on
a live worker within 2 s and miss nothing."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import pytest

from tests.cluster.conftest import run_clients, split_sources
from tests.services import ROOT

pytestmark = [pytest.mark.cluster, pytest.mark.asyncio]


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


async def test_sigterm_closes_with_4012_and_clients_are_back_within_2s(cluster):
    sources = split_sources(cluster.balancer.url)
    victim, moved, stayed = await run_clients(cluster, sources, "a", lambda w: w.terminate())
    try:
        rc = await asyncio.get_running_loop().run_in_executor(None, victim.proc.wait, 15)
        assert rc == 0, f"the worker exited with {rc}"
        # The victim held its three followers: three batches a third of a second apart.
        assert len(moved) == 3
        for c in moved:
            assert c.close_codes[:1] == [4012], c.close_codes
            assert c.close_reasons[:1] == ["spread_ms=333"], c.close_reasons
            assert c.downtimes and max(c.downtimes) < 2.0, c.downtimes
        assert all(c.reconnects == 0 for c in stayed)
    finally:
        if victim.proc.poll() is not None:
            victim.start()


async def test_drain_command_closes_sockets_and_stops_listening(cluster):
    sources = split_sources(cluster.balancer.url)

    def drain(worker):
        subprocess.run([sys.executable, "manage.py", "drain", "--worker", worker.name], cwd=ROOT,
                       env=cluster.env(), check=True, stdout=subprocess.DEVNULL)

    victim, moved, stayed = await run_clients(cluster, sources, "b", drain)
    try:
        for c in moved:
            assert c.close_codes[:1] == [4012], c.close_codes
            assert max(c.downtimes) < 2.0
        assert victim.proc.poll() is None, "a drain request leaves the process for its manager to stop"
        assert not port_open(victim.port), "a drained worker takes no new connections"
        victim.terminate()
        assert await asyncio.get_running_loop().run_in_executor(None, victim.proc.wait, 10) == 0
    finally:
        if victim.proc.poll() is None:
            victim.kill()
        victim.start()
