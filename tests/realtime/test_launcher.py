"""The worker's launcher (realtime/server/launcher.py): a socket's application
(past channels' protocol router, the consumer's own coroutine); the listen backlog,
REALTIME_LISTEN_BACKLOG on both its endpoints (plain and TLS), not Twisted's 50
that a reconnect storm overflows (an endpoint that names its own keeps it); and
daphne's access lines, written only when --access-log asks for them."""

from __future__ import annotations

import shutil
import subprocess

import pytest

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


class Quiet(AppServer):
    """The worker as deploy/ runs it, with extra daphne arguments."""

    extra: list[str] = []

    def command(self) -> list[str]:
        command = super().command()
        return command[:-1] + self.extra + command[-1:]  # (the application stays last)


class Asked(Quiet):
    extra = ["--access-log", "-"]


def test_a_worker_writes_daphnes_access_lines_only_when_asked(tmp_path):
    """daphne's NCSA access lines (text among the JSON log lines, one write each)
    are not written unless --access-log asks for them (launcher.DrainingServer)."""
    import urllib.request

    import time

    from realtime.server.launcher import asked_for_access_log

    app = "project.asgi:application"
    for asked in (["--access-log", "-"], ["--access-log=/x"], ["--access", "-"], ["--acc=/x"]):
        assert asked_for_access_log(["-p", "1", *asked, app]), asked
    assert not asked_for_access_log(["-p", "1", app])
    assert not asked_for_access_log(["-v", "2", app])  # (daphne's verbosity alone would log to stdout)
    for kind in (Quiet, Asked):
        (tmp_path / kind.__name__).mkdir()
        server = kind(tmp_path / kind.__name__).start()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=10) as response:
                assert response.status == 200
            deadline = time.monotonic() + 10
            while kind is Asked and '"GET /healthz" 200' not in server.log.read_text() and time.monotonic() < deadline:
                time.sleep(0.05)  # (until the line is written)
        finally:
            server.stop()
        logged = server.log.read_text()
        assert ('"GET /healthz" 200' in logged) is (kind is Asked), logged[-2000:]


def test_the_socket_app_is_the_consumers_own_coroutine_and_an_asgi3_app():
    """RealtimeConsumer.as_asgi() keeps no coroutine of its own for the socket's
    life, and servers still take it for an ASGI 3 application."""
    import asyncio

    from asgiref.compatibility import is_double_callable

    from realtime.ws.consumer import RealtimeConsumer

    app = RealtimeConsumer.as_asgi()
    assert asyncio.iscoroutinefunction(app) and not is_double_callable(app)
    assert app.consumer_class is RealtimeConsumer
    running = app({"type": "websocket"}, None, None)
    try:
        assert running.cr_code is RealtimeConsumer.__call__.__code__
    finally:
        running.close()


def test_the_launcher_runs_a_sockets_app_past_channels_protocol_router():
    from types import SimpleNamespace

    from channels.routing import ProtocolTypeRouter

    from realtime.server.launcher import DrainingServer

    def socket_app(scope, receive, send):
        pass

    router = ProtocolTypeRouter({"websocket": socket_app, "http": print})
    assert DrainingServer.socket_application(SimpleNamespace(application=router)) is socket_app
    assert DrainingServer.socket_application(SimpleNamespace(application=socket_app)) is socket_app
    only_http = ProtocolTypeRouter({"http": print})
    assert DrainingServer.socket_application(SimpleNamespace(application=only_http)) is only_http


def test_a_sockets_listening_address_and_path_are_one_object_for_all_sockets(monkeypatch):
    from collections import OrderedDict
    from types import SimpleNamespace

    from realtime.server import launcher

    monkeypatch.setattr(launcher, "_shared", OrderedDict())

    def handshake(port):
        return SimpleNamespace(), {"type": "websocket", "path": "/ws/v1/", "raw_path": b"/ws/v1/",
                                   "server": ["127.0.0.1", 8000], "client": ["192.0.2.1", port]}

    (one, a), (other, b) = handshake(50000), handshake(50001)
    launcher.share_addresses(one, a)
    launcher.share_addresses(other, b)
    assert a["server"] is b["server"] is one.server_addr is other.server_addr
    assert a["server"] == ["127.0.0.1", 8000]
    assert a["path"] is b["path"] and a["raw_path"] is b["raw_path"] is one.path is other.path
    assert a["client"] is not b["client"]  # (each its own)
    assert launcher.shared(None) is None
    # A long path (the client's choice) is not kept.
    long_path = "/" + "x" * launcher.SHARED_LENGTH
    assert launcher.shared(long_path) is long_path and ("str", long_path) not in launcher._shared
    assert all(len(key[1]) <= launcher.SHARED_LENGTH for key in launcher._shared)
    # At most SHARED_MAX are kept, the least recently used going first: a scan of
    # other paths does not keep the one in use out.
    for n in range(launcher.SHARED_MAX + 10):
        launcher.shared(f"/scan/{n}")
        if n % 100 == 0:
            assert launcher.shared("/ws/v1/") is a["path"]
    assert len(launcher._shared) == launcher.SHARED_MAX
    assert launcher.shared("/ws/v1/") is a["path"]


@pytest.mark.asyncio
async def test_a_socket_app_that_raises_when_called_fails_its_task_not_the_handshake_machinery():
    """Past channels' router the socket's app is called in create_application, not
    in its task; what it raises fails the task (daphne then refuses the handshake
    with 500), as it did when the router's coroutine called it."""
    from types import SimpleNamespace

    from realtime.server.bounded import BoundedWebSocketProtocol
    from realtime.server.launcher import DrainingServer

    def broken(scope, receive, send):
        raise LookupError("no such thing")

    protocol = BoundedWebSocketProtocol()
    server = SimpleNamespace(connections={protocol: {}}, handle_reply=lambda *args: None,
                             socket_application=lambda: broken, watch=lambda protocol, ended=None: None)
    scope = {"type": "websocket", "path": "/ws/v1/", "raw_path": b"/ws/v1/", "server": None}
    protocol.server_addr = protocol.path = None
    queue = DrainingServer.create_application(server, protocol, scope)
    assert queue is not None
    task = server.connections[protocol]["application_instance"]
    with pytest.raises(LookupError):
        await task


@pytest.mark.parametrize("value, says", [("0", "REALTIME_GC_FULL_AFTER=0 must be 1 or more."),
                                         ("often", "REALTIME_GC_FULL_AFTER='often' is not an integer.")])
def test_a_full_collection_threshold_below_one_stops_start_up(value, says):
    """REALTIME_GC_FULL_AFTER (the launcher's gc threshold for full collections):
    0 would make every young collection a full one; settings refuse it."""
    import os
    import sys

    from tests.services import ROOT

    run = subprocess.run([sys.executable, "-c", "import project.settings"], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "REALTIME_GC_FULL_AFTER": value}, timeout=60)
    assert run.returncode == 1 and says in run.stderr
