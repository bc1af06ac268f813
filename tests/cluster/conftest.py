"""The production topology for tests: private PostgreSQL and Redis, daphne workers,
nginx in front (deploy/cluster.py), and a resuming protocol client."""

from __future__ import annotations

import asyncio
import contextlib
import http.cookiejar
import json
import random
import re
import shutil
import tempfile
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import websockets

from realtime import protocol
from tests.conftest import missing
from tests.services import Cluster

pytestmark = pytest.mark.cluster


# The cluster's JWT key (a test value; tests/cluster/test_tokens.py signs with it).
JWT_SECRET = "cluster-test-secret-" + "x" * 24

# For a test that talks to the workers directly (the balancer makes no difference)
# or brings both balancers of its own: the cluster behind nginx only, once.
ONCE = pytest.mark.parametrize("cluster", ["nginx"], indirect=True)


@pytest.fixture(scope="session", params=["nginx", "haproxy"])
def cluster(request):
    """One cluster per load balancer for every cluster test (each test runs behind
    nginx and behind HAProxy); a test that stops a worker restarts it."""
    # Not under pytest's private tmp dir: nginx's workers (an unprivileged user)
    # must be able to read the static files.
    workdir = Path(tempfile.mkdtemp(prefix="realtime-cluster-"))
    workdir.chmod(0o755)
    try:
        # The tests send hundreds of messages a second and sign in often from one
        # address: lift those limits here (tests/realtime proves the limits).
        # Kill -9 tests leave leases behind for LEASE_TTL: lift the per-user socket
        # cap too (test_security.py proves it on workers of its own).
        c = Cluster(workdir, workers=2, balancer=request.param, extra_env={
            "REALTIME_RATE_MESSAGE_SEND": "100000/100000",
            "DJANGO_LOGIN_RATE_LIMIT": "10000/m",
            "REALTIME_MAX_CONNECTIONS_PER_USER": "1000",
            # Tests find out where the balancer sent them (off by default with DEBUG off).
            "REALTIME_EXPOSE_WORKER": "1",
            # Many tests open sockets and replay from one address as fast as they can.
            "REALTIME_RATE_HANDSHAKE_USER": "10000/10000",
            "REALTIME_RATE_HANDSHAKE_ADDRESS": "10000/10000",
            "REALTIME_REPLAY_BUDGET": "100000000/100000000",
            # Tokens for non-browser clients (tests/cluster/test_tokens.py).
            "REALTIME_JWT_KEYS": f"cluster:{JWT_SECRET}",
            "REALTIME_JWT_AUDIENCE": "realtime-cluster",
            "REALTIME_JWT_ISSUER": "https://issuer.test",
        })
        c.start()
    except FileNotFoundError as exc:
        missing(str(exc))
    yield c
    c.stop()
    # Keep the workers' logs as test artifacts (what a failure needs to be read).
    artifacts = Path(__file__).resolve().parents[2] / "test-artifacts" / f"cluster-{request.param}"
    artifacts.mkdir(parents=True, exist_ok=True)
    for log in [*workdir.glob("worker-*.log"), *workdir.glob(f"{request.param}/*.log")]:
        shutil.copy(log, artifacts / log.name)
    shutil.rmtree(workdir, ignore_errors=True)


@dataclass
class Hardened:
    """Production-mode workers with the attack's limits at test sizes (docs/security.md),
    behind nginx and HAProxy at once."""

    workers: list
    balancers: dict
    redis: object
    env: dict

    def shell(self, code: str) -> None:
        """Run Python in `manage.py shell` with the workers' settings."""
        import subprocess
        import sys

        from tests.services import ROOT

        subprocess.run([sys.executable, "manage.py", "shell", "-c", code], cwd=ROOT, env=self.env, check=True,
                       stdout=subprocess.DEVNULL)

    def create_users(self, *names: str, password: str = "demo-password") -> None:
        """Users of a test's own (limits keyed on an account outlive the test)."""
        self.shell("from django.contrib.auth.models import User\n"
                   f"for name in {list(names)!r}:\n"
                   f"    User.objects.filter(username=name).exists() or User.objects.create_user(name, password={password!r})")


@pytest.fixture(scope="module")
def hardened(cluster):
    """Two workers on the cluster's PostgreSQL and a private Redis, with nginx and
    HAProxy both in front of them; every limit the security tests attack lowered to
    a size a test can reach, everything else as in production (no X-Realtime-Worker
    header, no Server header)."""
    from tests.services import HAProxy, Nginx, RedisServer, Worker, free_port

    workdir = cluster.workdir / "hardened"
    workdir.mkdir(exist_ok=True)
    redis = RedisServer(workdir).start()
    ports = {"nginx": (free_port(), free_port()), "haproxy": (free_port(), free_port())}
    worker_ports = [(free_port(), free_port()) for _ in range(2)]
    origins = []
    for host in ("127.0.0.1", "localhost"):
        for port, tls_port in [*ports.values(), *worker_ports]:
            origins += [f"http://{host}:{port}", f"https://{host}:{tls_port}"]
    env = {k: v for k, v in cluster.env().items() if k not in ("REALTIME_EXPOSE_WORKER",)}
    env.update({
        "REDIS_URL": redis.url,
        "DJANGO_ALLOWED_ORIGINS": ",".join(origins),
        "REALTIME_RATE_MESSAGE_SEND": "100/200",
        # django-ratelimit counts in fixed windows: a day's, so that none ends inside a test.
        "DJANGO_LOGIN_RATE_LIMIT": "6/d",
        "DJANGO_LOGIN_ACCOUNT_RATE_LIMIT": "3/d",
        "DJANGO_LOGIN_DEVICE_RATE_LIMIT": "3/d",
        "DJANGO_SIGNUP_RATE_LIMIT": "2/d",
        "REALTIME_HANDSHAKE_TIMEOUT": "2",
        "REALTIME_MAX_PENDING_PER_ADDRESS": "8",
        "REALTIME_RATE_HANDSHAKE_USER": "1/20",
        "REALTIME_RATE_HANDSHAKE_ADDRESS": "2/40",
        "REALTIME_MAX_CONNECTIONS_PER_USER": "10",
        "REALTIME_REPLAY_BUDGET": "2000/20000",
    })
    workers, balancers = [], {}
    try:
        workers = [Worker(f"h{i}", env, workdir, port=port, tls_port=tls).start()
                   for i, (port, tls) in enumerate(worker_ports)]
        for kind, cls in (("nginx", Nginx), ("haproxy", HAProxy)):
            port, tls_port = ports[kind]
            balancers[kind] = cls(workdir, workers, cluster.workdir / "static", port=port, tls_port=tls_port,
                                  header_timeout=2, conn_per_address=16).start()
        yield Hardened(workers, balancers, redis, env)
    finally:
        for balancer in balancers.values():
            balancer.stop()
        for worker in workers:
            worker.stop()
        redis.stop()
        artifacts = Path(__file__).resolve().parents[2] / "test-artifacts" / "cluster-hardened"
        artifacts.mkdir(parents=True, exist_ok=True)
        for log in workdir.glob("worker-*.log"):
            shutil.copy(log, artifacts / log.name)


class _SourceAddressHandler(urllib.request.HTTPHandler):
    def __init__(self, source: str):
        super().__init__()
        self.source = source

    def http_open(self, req):
        import http.client

        return self.do_open(lambda host, **kw: http.client.HTTPConnection(host, source_address=(self.source, 0), **kw), req)


class _LoopbackCookiePolicy(http.cookiejar.DefaultCookiePolicy):
    """The cluster's cookies are Secure (DEBUG off); the tests also speak plain http
    to the balancer and workers on loopback, so send them there too."""

    def return_ok_secure(self, cookie, request):
        return True


def login(base: str, username: str, password: str = "demo-password", source: str = "127.0.0.1",
          opener=None) -> str:
    """Sign in through the login form; returns the Cookie header value."""
    jar = http.cookiejar.CookieJar(policy=_LoopbackCookiePolicy())
    if opener is None:
        opener = urllib.request.build_opener(_SourceAddressHandler(source))
    opener.add_handler(urllib.request.HTTPCookieProcessor(jar))
    html = opener.open(f"{base}/accounts/login/").read().decode()
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', html).group(1)
    data = urllib.parse.urlencode({"username": username, "password": password, "csrfmiddlewaretoken": token}).encode()
    opener.open(urllib.request.Request(f"{base}/accounts/login/", data=data, headers={"Referer": f"{base}/accounts/login/"}))
    cookies = {c.name: c.value for c in jar}
    assert "sessionid" in cookies, f"login as {username} failed"
    return "; ".join(f"{k}={v}" for k, v in cookies.items())


def worker_for(base: str, source: str) -> str:
    """Which worker the balancer sends this source address to."""
    opener = urllib.request.build_opener(_SourceAddressHandler(source))
    return opener.open(f"{base}/accounts/login/").headers["X-Realtime-Worker"]


def room_head(base: str, cookie: str, room: str = "general") -> int:
    request = urllib.request.Request(f"{base}/api/v1/rooms/", headers={"Cookie": cookie})
    rooms = json.loads(urllib.request.urlopen(request).read())["rooms"]
    return next(r["seq"] for r in rooms if r["slug"] == room)


def room_epoch(base: str, cookie: str, room: str = "general") -> str:
    """The epoch of the room's log (what a history page carries)."""
    request = urllib.request.Request(f"{base}/api/v1/rooms/{room}/messages/?limit=1", headers={"Cookie": cookie})
    return json.loads(urllib.request.urlopen(request).read())["epoch"]


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
    close_reasons: list[str] = field(default_factory=list)
    downtimes: list[float] = field(default_factory=list)
    ping_every: float = 0  # seconds; the browser client pings every 20 s
    start: int = 0  # the seq the client already has (it follows from there)
    subscribed: asyncio.Event = field(default_factory=asyncio.Event)
    stopped: bool = False

    @property
    def last(self) -> int:
        return self.applied[-1] if self.applied else self.start

    async def run(self) -> None:
        delay = 0.05
        closed_at = None
        while not self.stopped:
            try:
                ws = await open_socket(self.base, self.cookie, self.source)
            except (OSError, websockets.InvalidHandshake, asyncio.TimeoutError):
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            delay = 0.05
            pinger = asyncio.create_task(self._ping(ws)) if self.ping_every else None
            try:
                await ws.send(json.dumps({"type": "subscribe", "room": self.room, "since": self.last, "ref": "sub"}))
                async for raw in ws:
                    frame = json.loads(raw)
                    if frame.get("type") == "ack" and frame.get("ref") == "sub":
                        self.subscribed.set()
                        if closed_at is not None:
                            self.downtimes.append(time.monotonic() - closed_at)
                            closed_at = None
                    elif frame.get("type") == "error":
                        raise AssertionError(f"server error: {frame}")
                    elif frame.get("type", "").startswith("message.") and "seq" in frame:
                        self._apply(frame["seq"])
            except websockets.ConnectionClosed as exc:
                self.close_codes.append(exc.rcvd.code if exc.rcvd else 1006)
                self.close_reasons.append(exc.rcvd.reason if exc.rcvd else "")
                closed_at = time.monotonic()
            finally:
                if pinger:
                    pinger.cancel()
                await ws.close()
            if not self.stopped:
                self.reconnects += 1
                # As the browser client: back within the drain's spread_ms, not at once.
                spread = protocol.restart_spread(self.close_reasons[-1]) if self.close_codes[-1:] == [4012] else None
                if spread:
                    await asyncio.sleep(random.random() * spread / 1000)

    async def _ping(self, ws) -> None:
        while True:
            await asyncio.sleep(self.ping_every)
            try:
                await ws.send(json.dumps({"type": "ping"}))
            except websockets.ConnectionClosed:
                return

    def _apply(self, seq: int) -> None:
        if seq <= self.last:
            self.duplicates += 1
        elif seq != self.last + 1:
            self.gaps += 1
            raise AssertionError(f"gap: got {seq} after {self.last}")
        else:
            self.applied.append(seq)


async def send_messages(base: str, cookie: str, room: str, count: int, prefix: str, window: int = 8,
                        on_sent=None, body: str | None = None) -> list[dict]:
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
        await ws.send(json.dumps({"type": "message.send", "room": room, "body": body or f"{prefix} {i}", "client_id": ref, "ref": ref}))
    await asyncio.wait_for(done.wait(), 60)
    await task
    await ws.close()
    return [acks[f"{prefix}{i}"] for i in range(count)]


def split_sources(base: str, timeout: float = 15) -> dict[str, str]:
    """A source address that the balancer sends to each worker. A worker restarted by an
    earlier test may still be marked down (nginx fail_timeout 2 s): wait for it."""
    deadline = time.monotonic() + timeout
    while True:
        found: dict[str, str] = {}
        for i in range(1, 40):
            source = f"127.{i}.0.1"
            found.setdefault(worker_for(base, source), source)
            if len(found) == 2:
                return found
        if time.monotonic() > deadline:
            raise AssertionError(f"could not place clients on both workers: {found}")
        time.sleep(0.5)


@contextlib.asynccontextmanager
async def followers(base: str, placements: list[tuple[str, str]], **options):
    """ResumingClients of #general, one per (user, source address), running and
    subscribed for the duration of the block; stopped after it."""
    clients = [ResumingClient(base, login(base, user), "general", source=source, **options)
               for user, source in placements]
    tasks = [asyncio.create_task(c.run()) for c in clients]
    try:
        await asyncio.wait_for(asyncio.gather(*(c.subscribed.wait() for c in clients)), 15)
        yield clients
    finally:
        for c in clients:
            c.stopped = True
        for t in tasks:
            t.cancel()
        # A client's own failure (a gap, a server error) must fail the test, not
        # vanish with the cancellation.
        for outcome in await asyncio.gather(*tasks, return_exceptions=True):
            if isinstance(outcome, Exception) and not isinstance(outcome, asyncio.CancelledError):
                raise outcome


async def assert_all_caught_up(clients, head: int, timeout: float = 30) -> None:
    """Wait until every client has applied `head`; each must hold every seq after
    its start exactly once, in order."""
    async def caught_up():
        while any(c.last < head for c in clients):
            await asyncio.sleep(0.05)

    await asyncio.wait_for(caught_up(), timeout)
    for c in clients:
        assert c.applied == list(range(c.start + 1, head + 1))
        assert (c.duplicates, c.gaps) == (0, 0)


async def run_clients(cluster, sources, victim_name, action, messages=300, act_at=100):
    """Three followers of #general on each worker (placed through the balancer by
    source address) while `messages` are sent through the other worker;
    `action(victim)` runs after the `act_at`-th ack. Asserts every follower ends with
    every seq once, in order; returns the victim and the followers that were on it
    and elsewhere."""
    base = cluster.balancer.url
    victim = next(w for w in cluster.workers if w.name == victim_name)
    survivor = next(w for w in cluster.workers if w.name != victim_name)
    start = room_head(base, login(base, "alice"))
    placements = [(user, source) for source in sources.values() for user in ("bob", "carol", "alice")]
    async with followers(base, placements, start=start) as clients:

        def maybe_act(sent: int) -> None:
            if sent == act_at:
                action(victim)

        prefix = f"d{victim_name}{time.monotonic_ns()}"
        acks = await send_messages(survivor.url, login(survivor.url, "alice"), "general", messages, prefix,
                                   on_sent=maybe_act)
        moved = [c for c in clients if c.source == sources[victim_name]]
        stayed = [c for c in clients if c.source != sources[victim_name]]
        # Every follower of the victim must be back (moved and subscribed) before the block ends:
        # the messages can all arrive before the victim has closed its last socket
        # (a drain spreads its closes over a second), and closing the followers
        # then would leave nothing to assert.
        deadline = time.monotonic() + 15
        while not all(c.downtimes for c in moved) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await assert_all_caught_up(clients, acks[-1]["seq"])
        return victim, moved, stayed


# -- long polls, REST posts and the fan-out's subscriptions (tests/cluster/test_gaps.py) --
def manage_shell(env: dict, code: str) -> None:
    """Run Python in `manage.py shell` with these settings (a cluster's env())."""
    import subprocess
    import sys

    from tests.services import ROOT

    subprocess.run([sys.executable, "manage.py", "shell", "-c", code], cwd=ROOT, env=env, check=True,
                   stdout=subprocess.DEVNULL)


def create_rooms(env: dict, *slugs: str) -> None:
    """Public rooms of a test's own (nobody else follows or writes to them)."""
    manage_shell(env, "from realtime.models import Room\n"
                      f"for slug in {list(slugs)!r}:\n"
                      "    Room.objects.get_or_create(slug=slug, defaults={'title': slug, 'is_public': True})")


@dataclass
class Poll:
    """A long poll's answer, and when it was asked and answered (time.monotonic())."""

    status: int
    body: object
    headers: object  # case-insensitive .get()
    started: float
    ended: float

    @property
    def worker(self) -> str | None:
        return self.headers.get("X-Realtime-Worker")


def long_poll(base: str, cookie: str, room: str, since: int, wait: int, source: str = "127.0.0.1",
              timeout: float | None = None) -> Poll:
    """GET .../events/?since=&wait= (blocking: run it in a thread), from this source
    address (which the balancer hashes); an error status is an answer too."""
    import urllib.error

    opener = urllib.request.build_opener(_SourceAddressHandler(source))
    request = urllib.request.Request(f"{base}/api/v1/rooms/{room}/events/?since={since}&wait={wait}",
                                     headers={"Cookie": cookie})
    started = time.monotonic()
    try:
        with opener.open(request, timeout=timeout or wait + 10) as res:
            return Poll(res.status, json.loads(res.read()), res.headers, started, time.monotonic())
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            body = json.loads(raw)
        except ValueError:
            body = raw.decode(errors="replace")
        return Poll(exc.code, body, exc.headers, started, time.monotonic())


def post_message(base: str, cookie: str, room: str, body: str, client_id: str) -> tuple[int, dict]:
    """POST .../messages/ (the REST send): (status, JSON body), an error status included."""
    import urllib.error

    csrf = dict(part.split("=", 1) for part in cookie.split("; "))["csrftoken"]
    request = urllib.request.Request(
        f"{base}/api/v1/rooms/{room}/messages/",
        data=json.dumps({"body": body, "client_id": client_id}).encode(),
        headers={"Cookie": cookie, "Content-Type": "application/json", "X-CSRFToken": csrf, "Referer": base + "/"},
    )
    try:
        with urllib.request.urlopen(request) as res:
            return res.status, json.loads(res.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def room_events(base: str, cookie: str, room: str, since: int) -> list[dict]:
    """The room's log after `since` (GET .../events/ without wait)."""
    request = urllib.request.Request(f"{base}/api/v1/rooms/{room}/events/?since={since}&limit=500",
                                     headers={"Cookie": cookie})
    return json.loads(urllib.request.urlopen(request).read())["events"]


def held_polls(worker) -> int:
    """How many long polls the worker holds now (its realtime_long_polls_held gauge)."""
    text = urllib.request.urlopen(f"{worker.url}/metrics", timeout=5).read().decode()
    return int(float(re.search(r"^realtime_long_polls_held (\S+)$", text, re.M).group(1)))


def fan_subscribers(redis_url: str, room: str) -> int:
    """How many workers' fan-outs follow the room's Redis channel (one subscription
    per worker while anything there, a socket or a held poll, follows the room)."""
    import redis

    from realtime.delivery import names

    client = redis.Redis.from_url(redis_url)
    try:
        [(_, count)] = client.pubsub_numsub(names.fan_channel(names.room_group(room)))
        return count
    finally:
        client.close()


async def wait_until(condition, timeout: float, what: str) -> None:
    """Wait for a condition (checked every 20 ms); fail saying what never happened."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)
