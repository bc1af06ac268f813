"""The attack that found the holes of the security issue, made again against
production-mode workers behind a real nginx and a real HAProxy (the `hardened`
fixture: the limits at test sizes, everything else as deployed). docs/security.md
maps each control to its test here."""

from __future__ import annotations

import asyncio
import http.cookiejar
import json
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest
import websockets

from tests.cluster.conftest import _LoopbackCookiePolicy, _SourceAddressHandler, login, open_socket, ws_url

pytestmark = [pytest.mark.cluster, pytest.mark.asyncio]

BALANCERS = ("nginx", "haproxy")


class Browser:
    """A cookie jar and a source address: one person's browser as the server sees it."""

    def __init__(self, base: str, source: str, headers: dict | None = None):
        self.base = base
        self.jar = http.cookiejar.CookieJar(policy=_LoopbackCookiePolicy())
        self.opener = urllib.request.build_opener(_SourceAddressHandler(source),
                                                  urllib.request.HTTPCookieProcessor(self.jar))
        self.headers = headers or {}

    def request(self, path: str, data: dict | None = None) -> tuple[int, dict, str]:
        body = urllib.parse.urlencode(data).encode() if data is not None else None
        req = urllib.request.Request(self.base + path, data=body, headers={"Referer": self.base + path, **self.headers})
        try:
            res = self.opener.open(req)
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read().decode()
        return res.status, dict(res.headers), res.read().decode()

    def csrf(self, path: str) -> str:
        _, _, html = self.request(path)
        return re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', html).group(1)

    def sign_in(self, username: str, password: str = "demo-password") -> int:
        token = self.csrf("/accounts/login/")
        status, _, _ = self.request("/accounts/login/", {"username": username, "password": password,
                                                         "csrfmiddlewaretoken": token})
        signed_in = any(c.name == "sessionid" for c in self.jar)
        return 302 if status == 200 and signed_in else status

    def sign_out(self) -> None:
        token = next(c.value for c in self.jar if c.name == "csrftoken")
        self.request("/accounts/logout/", {"csrfmiddlewaretoken": token})
        for cookie in [c for c in self.jar if c.name == "sessionid"]:
            self.jar.clear(cookie.domain, cookie.path, cookie.name)

    def sign_up(self, username: str) -> int:
        token = self.csrf("/accounts/signup/")
        status, _, _ = self.request("/accounts/signup/", {"username": username, "password1": "a-long-passphrase-42",
                                                          "password2": "a-long-passphrase-42",
                                                          "csrfmiddlewaretoken": token})
        return 302 if status == 200 and any(c.name == "sessionid" for c in self.jar) else status

    @property
    def cookie(self) -> str:
        return "; ".join(f"{c.name}={c.value}" for c in self.jar)


async def in_thread(fn, *args):
    return await asyncio.to_thread(fn, *args)


@pytest.mark.parametrize("kind", BALANCERS)
async def test_sign_in_limits_behind_the_balancer_lock_out_only_the_attacker(hardened, kind):
    """Row 1. Every client reaches the workers from the balancer's address: the
    limits must be keyed on the client's own (X-Forwarded-For from the trusted
    balancer), and an X-Forwarded-For the attacker writes must not move them."""
    base = hardened.balancers[kind].url
    n = BALANCERS.index(kind)
    victim, other, bystander = (f"{role}-{kind}" for role in ("victim", "other", "bystander"))
    await in_thread(hardened.create_users, victim, other, bystander)
    owner = Browser(base, f"127.20.{n}.1")
    assert await in_thread(owner.sign_in, victim) == 302  # the victim's browser is a known one now
    await in_thread(owner.sign_out)
    # The attacker guesses the victim's password from one address, forging a new
    # X-Forwarded-For each time.
    attacker = [Browser(base, f"127.21.{n}.1", headers={"X-Forwarded-For": f"198.51.100.{i}"}) for i in range(8)]
    statuses = [await in_thread(a.sign_in, victim, "wrong") for a in attacker[:4]]
    assert statuses == [200, 200, 200, 429]  # the account's limit for unknown browsers (3)
    # ... then another account from the same address, up to the address's limit (6).
    statuses = [await in_thread(a.sign_in, other, "wrong") for a in attacker[4:7]]
    assert statuses == [200, 200, 200]
    assert await in_thread(attacker[7].sign_in, bystander, "demo-password") == 429
    # Everyone else is untouched: another address, and the victim's known browser.
    assert await in_thread(Browser(base, f"127.22.{n}.1").sign_in, bystander) == 302
    assert await in_thread(owner.sign_in, victim) == 302
    # Going straight to a worker with a forged header from an untrusted peer: the
    # header is ignored and the peer's own address is the one limited.
    worker = hardened.workers[0]
    direct = Browser(worker.url, f"127.21.{n}.1", headers={"X-Forwarded-For": f"127.22.{n}.1"})
    assert await in_thread(direct.sign_in, bystander) == 429


@pytest.mark.parametrize("kind", BALANCERS)
async def test_sign_ups_are_limited_per_client_address_behind_the_balancer(hardened, kind):
    base = hardened.balancers[kind].url
    n = BALANCERS.index(kind)
    stamp = time.monotonic_ns() % 10**8
    flood = [await in_thread(Browser(base, f"127.23.{n}.1").sign_up, f"flood{stamp}x{i}") for i in range(3)]
    assert flood == [302, 302, 429]
    assert await in_thread(Browser(base, f"127.24.{n}.1").sign_up, f"calm{stamp}") == 302


async def test_a_ticket_taken_before_logout_opens_nothing(hardened):
    """Row 2. Take a ticket, log out, then try to open a socket with it: 4001, and no
    replay of the private room reaches the holder."""
    base = hardened.balancers["nginx"].url
    bob = Browser(base, "127.25.0.1")
    assert await in_thread(bob.sign_in, "bob") == 302
    token = next(c.value for c in bob.jar if c.name == "csrftoken")

    def take_ticket() -> str:
        req = urllib.request.Request(base + "/api/v1/tickets/", data=b"", method="POST",
                                     headers={"X-CSRFToken": token, "Referer": base + "/"})
        return json.loads(bob.opener.open(req).read())["ticket"]

    ticket = await in_thread(take_ticket)
    await in_thread(bob.sign_out)
    async with websockets.connect(ws_url(base) + f"?ticket={ticket}", subprotocols=["rt.v1.json"], origin=base) as ws:
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await ws.send(json.dumps({"type": "subscribe", "room": "ops", "since": 0, "ref": 1}))
            await asyncio.wait_for(ws.recv(), 5)
        assert closed.value.rcvd.code == 4001


async def test_unknown_socket_paths_are_404_with_one_warning(hardened):
    """Row 9. Any path but /ws/v1/ is refused before the handshake completes: 404
    from the worker (through both balancers), one warning line, no traceback."""
    worker = hardened.workers[0]
    before = worker.log.read_text()
    for base in (worker.url, *(b.url for b in hardened.balancers.values())):
        with pytest.raises(websockets.InvalidStatus) as refused:
            await websockets.connect(base.replace("http://", "ws://") + "/ws/nope/", origin=base, open_timeout=5)
        assert refused.value.response.status_code == 404
    await asyncio.sleep(0.3)
    new = worker.log.read_text()[len(before):]
    assert "Traceback" not in new and '"level": "ERROR"' not in new
    assert new.count('"event": "ws.refused"') >= 1


async def test_responses_do_not_name_the_server_or_the_worker(hardened):
    """Row 11. No Server header, no X-Realtime-Worker; /readyz tells the world its
    status only, and the detail to this machine (or the metrics token)."""
    worker = hardened.workers[0]
    for base in (worker.url, *(b.url for b in hardened.balancers.values())):
        status, headers, _ = await in_thread(Browser(base, "127.26.0.1").request, "/accounts/login/")
        assert status == 200
        names = {k.lower() for k in headers}
        assert "x-realtime-worker" not in names
        assert headers.get("Server", headers.get("server", "")) in ("", "nginx")  # HAProxy adds none
    # The WebSocket handshake's answer names no server either.
    cookie = login(worker.url, "bob")
    ws = await open_socket(worker.url, cookie)
    assert "server" not in {k.lower() for k in ws.response.headers}
    await ws.close()
    # /readyz through the balancer: the status alone.
    for kind, balancer in hardened.balancers.items():
        status, _, body = await in_thread(Browser(balancer.url, "127.26.0.1").request, "/readyz")
        assert (status, json.loads(body)) == (200, {"status": "ok"}), kind
    # From this machine, straight to the worker: the detail.
    status, _, body = await in_thread(Browser(worker.url, "127.0.0.1").request, "/readyz")
    assert status == 200 and json.loads(body)["checks"] == {"database": "ok", "channel_layer": "ok"}
    assert json.loads(body)["worker"] == worker.name
    # From another address straight to the worker: the status alone.
    status, _, body = await in_thread(Browser(worker.url, "127.26.0.1").request, "/readyz")
    assert json.loads(body) == {"status": "ok"}


def _raw(port: int, data: bytes, source: str = "127.27.0.1") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0)) as s:
        s.sendall(data)
        chunks = []
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
