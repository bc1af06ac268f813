"""The worker's listen backlog (realtime/server/launcher.py): REALTIME_LISTEN_BACKLOG
on both its endpoints (plain and TLS), not Twisted's 50 that a reconnect storm
overflows; an endpoint that names its own keeps it."""

from __future__ import annotations

import shutil
import subprocess

from realtime.server.launcher import with_backlog
from tests.conftest import missing
from tests.services import AppServer


def test_a_backlog_is_added_to_tcp_and_tls_endpoints_only_where_none_is_named():
    assert with_backlog("tcp:port=8000:interface=127.0.0.1", 1024) == "tcp:port=8000:interface=127.0.0.1:backlog=1024"
    assert with_backlog("ssl:8443:privateKey=k.pem:certKey=c.pem", 64) == "ssl:8443:privateKey=k.pem:certKey=c.pem:backlog=64"
    assert with_backlog("tcp:port=8000:backlog=7", 1024) == "tcp:port=8000:backlog=7"
    assert with_backlog("unix:/run/app.sock", 1024) == "unix:/run/app.sock"


def listen_queue(port: int) -> int:
    """The kernel's accept-queue limit of the socket listening on `port` (ss: Send-Q)."""
    out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True).stdout
    [line] = out.strip().splitlines()
    return int(line.split()[2])


def test_a_worker_listens_with_the_configured_backlog(tmp_path):
    if shutil.which("ss") is None:
        missing("ss (iproute2) is not installed")
    server = AppServer(tmp_path, env={"REALTIME_LISTEN_BACKLOG": "700"}).start()
    try:
        assert listen_queue(server.port) == 700
        assert listen_queue(server.tls_port) == 700
    finally:
        server.stop()
