"""The production topology for tests: private PostgreSQL and Redis, daphne workers,
nginx in front (deploy/cluster.py), and a resuming protocol client."""

from __future__ import annotations

import asyncio
import http.cookiejar
import json
import re
import shutil
import tempfile
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import websockets

from tests.services import Cluster

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def cluster():
    # Not under pytest's private tmp dir: nginx's workers (an unprivileged user)
    # must be able to read the static files.
    workdir = Path(tempfile.mkdtemp(prefix="realtime-cluster-"))
    workdir.chmod(0o755)
    try:
        c = Cluster(workdir, workers=2)
        c.start()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    yield c
    c.stop()
    shutil.rmtree(workdir, ignore_errors=True)


class _SourceAddressHandler(urllib.request.HTTPHandler):
    def __init__(self, source: str):
        super().__init__()
        self.source = source

    def http_open(self, req):
        import http.client

        return self.do_open(lambda host, **kw: http.client.HTTPConnection(host, source_address=(self.source, 0), **kw), req)


def login(base: str, username: str, password: str = "demo-password", source: str = "127.0.0.1") -> str:
    """Sign in through the login form; returns the Cookie header value."""
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar), _SourceAddressHandler(source))
    html = opener.open(f"{base}/accounts/login/").read().decode()
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', html).group(1)
    data = urllib.parse.urlencode({"username": username, "password": password, "csrfmiddlewaretoken": token}).encode()
    opener.open(urllib.request.Request(f"{base}/accounts/login/", data=data, headers={"Referer": f"{base}/accounts/login/"}))
    cookies = {c.name: c.value for c in jar}
    assert "sessionid" in cookies, f"login as {username} failed"
    return "; ".join(f"{k}={v}" for k, v in cookies.items())


def worker_for(base: str, source: str) -> str:
    """Which worker nginx sends this source address to."""
    opener = urllib.request.build_opener(_SourceAddressHandler(source))
    return opener.open(f"{base}/accounts/login/").headers["X-Realtime-Worker"]


def ws_url(base: str) -> str:
    return base.replace("http://", "ws://") + "/ws/v1/"


async def open_socket(base: str, cookie: str, source: str = "127.0.0.1"):
    return await websockets.connect(
        ws_url(base), subprotocols=["rt.v1.json"], origin=base, additional_headers={"Cookie": cookie},
        local_addr=(source, 0), open_timeout=5,
    )


@dataclass
class ResumingClient:
    """Follows one room like the browser client: resumes with its last seq after any
    disconnect, applies each seq once and in order, and counts what went wrong."""

    base: str
    cookie: str
    room: str
    source: str = "127.0.0.1"
    applied: list[int] = field(default_factory=list)
    duplicates: int = 0
    gaps: int = 0
    reconnects: int = 0
    close_codes: list[int] = field(default_factory=list)
    workers: list[str] = field(default_factory=list)
    subscribed: asyncio.Event = field(default_factory=asyncio.Event)
    stopped: bool = False

    @property
    def last(self) -> int:
        return self.applied[-1] if self.applied else 0

    async def run(self) -> None:
        delay = 0.05
        while not self.stopped:
            try:
                ws = await open_socket(self.base, self.cookie, self.source)
            except (OSError, websockets.InvalidHandshake, asyncio.TimeoutError):
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            delay = 0.05
            try:
                await ws.send(json.dumps({"type": "subscribe", "room": self.room, "since": self.last, "ref": "sub"}))
                async for raw in ws:
                    frame = json.loads(raw)
                    if frame.get("type") == "ack" and frame.get("ref") == "sub":
                        self.subscribed.set()
                    elif frame.get("type") == "error":
                        raise AssertionError(f"server error: {frame}")
                    elif "seq" in frame:
                        self._apply(frame["seq"])
            except websockets.ConnectionClosed as exc:
                self.close_codes.append(exc.rcvd.code if exc.rcvd else 1006)
            finally:
                await ws.close()
            if not self.stopped:
                self.reconnects += 1

    def _apply(self, seq: int) -> None:
        if seq <= self.last:
            self.duplicates += 1
        elif seq != self.last + 1:
            self.gaps += 1
            raise AssertionError(f"gap: got {seq} after {self.last}")
        else:
            self.applied.append(seq)


async def send_messages(base: str, cookie: str, room: str, count: int, prefix: str, window: int = 8,
                        on_sent=None) -> list[dict]:
    """Send `count` messages over one socket with at most `window` in flight; returns the acks."""
    ws = await open_socket(base, cookie)
    acks: dict[str, dict] = {}
    in_flight = asyncio.Semaphore(window)
    done = asyncio.Event()

    async def reader():
        async for raw in ws:
            frame = json.loads(raw)
            if frame.get("type") in ("ack", "error") and str(frame.get("ref", "")).startswith(prefix):
                assert frame["type"] == "ack", frame
                acks[frame["ref"]] = frame
                in_flight.release()
                if on_sent:
                    on_sent(len(acks))
                if len(acks) == count:
                    done.set()
                    return

    task = asyncio.create_task(reader())
    for i in range(count):
        await in_flight.acquire()
        ref = f"{prefix}{i}"
        await ws.send(json.dumps({"type": "message.send", "room": room, "body": f"{prefix} {i}", "client_id": ref, "ref": ref}))
    await asyncio.wait_for(done.wait(), 60)
    await task
    await ws.close()
    return [acks[f"{prefix}{i}"] for i in range(count)]
