"""Transport security of the production topology (DEBUG off): TLS at the balancer
and straight from daphne, cookie and header hardening, the handshake timeout, and
the per-user connection cap across workers."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import time
import urllib.request

import pytest
import websockets

from tests.cluster.conftest import ONCE, login, open_socket
from tests.services import Worker, free_port

pytestmark = [pytest.mark.cluster, pytest.mark.asyncio]


def tls_opener(cert) -> urllib.request.OpenerDirector:
    return urllib.request.build_opener(urllib.request.HTTPSHandler(context=ssl.create_default_context(cafile=str(cert))))


async def test_https_responses_are_hardened(cluster):
    base = cluster.balancer.tls_url
    res = tls_opener(cluster.balancer.cert).open(f"{base}/accounts/login/")
    assert res.headers["Strict-Transport-Security"] == "max-age=31536000"
    policy = res.headers["Content-Security-Policy"]
    assert "script-src 'self';" in policy and "frame-ancestors 'none'" in policy
    cookie = [v for v in res.headers.get_all("Set-Cookie") if v.startswith("csrftoken=")][0]
    assert "Secure" in cookie and "SameSite=Lax" in cookie

    # The session cookie of a sign-in: Secure, HttpOnly, SameSite=Lax.
    class Capture(urllib.request.HTTPErrorProcessor):
        handler_order = 10  # before the redirect is followed
        cookies: list[str] = []

        def http_response(self, request, response):
            self.cookies += response.headers.get_all("Set-Cookie") or []
            return response

        https_response = http_response

    capture = Capture()
    opener = tls_opener(cluster.balancer.cert)
    opener.add_handler(capture)
    login(base, "bob", opener=opener)
    session = next(c for c in capture.cookies if c.startswith("sessionid="))
    assert {"Secure", "HttpOnly", "SameSite=Lax"} <= {part.strip() for part in session.split(";")}

    # Plain http (the balancer's internal port) gets no HSTS.
    plain = urllib.request.urlopen(f"{cluster.balancer.url}/accounts/login/")
    assert "Strict-Transport-Security" not in plain.headers


@ONCE
async def test_wss_straight_to_daphnes_tls_endpoint(cluster):
    """No proxy in between: the worker's own `ssl:` endpoint, a self-signed certificate."""
    worker = cluster.workers[0]
    base = worker.tls_url
    context = ssl.create_default_context(cafile=str(worker.cert))
    cookie = login(base, "bob", opener=tls_opener(worker.cert))
    async with websockets.connect(base.replace("https://", "wss://") + "/ws/v1/", subprotocols=["rt.v1.json"],
                                  origin=base, additional_headers={"Cookie": cookie}, ssl=context) as ws:
        await ws.send(json.dumps({"type": "ping", "ref": "tls"}))
        assert json.loads(await ws.recv()) == {"type": "pong", "ref": "tls"}
    # The certificate is checked: an untrusting client is refused.
    with pytest.raises(ssl.SSLCertVerificationError):
        await websockets.connect(base.replace("https://", "wss://") + "/ws/v1/", origin=base,
                                 ssl=ssl.create_default_context())
    # The same host and port under http is another origin: refused.
    with pytest.raises(websockets.InvalidStatus) as refused:
        await websockets.connect(base.replace("https://", "wss://") + "/ws/v1/", origin=base.replace("https", "http"),
                                 additional_headers={"Cookie": cookie}, ssl=context)
    assert refused.value.response.status_code == 403


@ONCE
async def test_a_connection_that_never_finishes_its_handshake_is_dropped(cluster):
    worker = Worker("slow-handshake", {**cluster.env(), "REALTIME_HANDSHAKE_TIMEOUT": "1"}, cluster.workdir).start()
    try:
        def half_a_request() -> float:
            with socket.create_connection(("127.0.0.1", worker.port), timeout=10) as s:
                s.sendall(b"GET /ws/v1/ HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n")
                started = time.monotonic()
                try:
                    assert s.recv(1024) == b"", "the worker closes the connection"
                except ConnectionResetError:
                    pass  # aborted: closed all the same
                return time.monotonic() - started

        waited = await asyncio.to_thread(half_a_request)
        assert waited < 5, f"dropped only after {waited:.1f} s"  # Twisted's own default is 60 s
        assert worker.proc.poll() is None
    finally:
        worker.stop()


@ONCE
async def test_connections_per_user_are_capped_across_workers(cluster):
    """Two workers of their own (the shared cluster lifts the cap), on the cluster's
    Redis and database, with a cap of 6: 6 sockets split over both, then one more
    anywhere is closed with 4008; closing one on worker a frees a place on worker b."""
    ports = [(free_port(), free_port()) for _ in range(2)]
    origins = ",".join(f"http://127.0.0.1:{port}" for port, _ in ports)
    env = {**cluster.env(), "REALTIME_MAX_CONNECTIONS_PER_USER": "6", "DJANGO_ALLOWED_ORIGINS": origins}
    a, b = (Worker(f"cap-{i}", env, cluster.workdir, port=port, tls_port=tls).start() for i, (port, tls) in enumerate(ports))
    cluster.manage("shell", "-c", "from django.contrib.auth.models import User; "
                   "User.objects.filter(username='capped').exists() or "
                   "User.objects.create_user('capped', password='demo-password')")
    cookies = {w: login(w.url, "capped") for w in (a, b)}
    socks = []

    async def one(worker) -> tuple[object, int | None]:
        ws = await open_socket(worker.url, cookies[worker])
        try:
            await ws.send(json.dumps({"type": "ping", "ref": 1}))
            await ws.recv()
            return ws, None
        except websockets.ConnectionClosed as exc:
            return ws, exc.rcvd.code if exc.rcvd else 1006

    try:
        for i in range(6):
            ws, code = await one(a if i % 2 else b)
            socks.append(ws)
            assert code is None, f"socket {i + 1} was closed with {code}"
        for worker in (a, b):
            ws, code = await one(worker)
            assert code == 4008
        await socks.pop(1).close()  # one on worker a
        deadline = time.monotonic() + 5
        while True:  # the lease is given back once the worker has handled the close
            ws, code = await one(b)
            if code is None or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        socks.append(ws)
        assert code is None
    finally:
        await asyncio.gather(*(ws.close() for ws in socks))
        a.stop()
        b.stop()
