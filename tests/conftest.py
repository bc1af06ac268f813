"""Shared fixtures: demo data, signed-in sockets, and the channel layers to run on."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import inspect
import time

import pytest
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from channels.testing import WebsocketCommunicator
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.test import Client

from tests.services import RedisServer

ORIGIN = (b"origin", b"http://127.0.0.1")
HOST = (b"host", b"127.0.0.1")


@pytest.fixture(autouse=True)
def fast_password_hashing(settings):
    # Real hashing costs about 0.25 s a user; these tests are not about hashing.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture(autouse=True)
def allowed_origins(settings):
    # pytest-django runs with DEBUG off, where the socket needs its list of origins.
    settings.REALTIME_ALLOWED_ORIGINS = [ORIGIN[1].decode()]


@pytest.fixture(autouse=True)
def fresh_rate_limits():
    """Each test starts with full token buckets (and django-ratelimit's counters,
    which live in the cache)."""
    from django.core.cache import cache

    from realtime.state import ratelimit

    ratelimit.reset()
    cache.clear()
    yield
    ratelimit.reset()


@pytest.fixture(autouse=True)
def loop_connection_discarded():
    """A test's loop ends with it: its PostgreSQL loop connection (domain/loopdb.py)
    is closed after it, so none outlives its test (the test database could not be
    dropped)."""
    yield
    from realtime.domain import loopdb

    loopdb.discard()


def missing(what: str) -> None:
    """A program the tests need is not installed: skip, or, where it must be there
    (REALTIME_TEST_STRICT=1: `make test` and CI set it), fail."""
    import os

    if os.environ.get("REALTIME_TEST_STRICT") == "1":
        pytest.fail(f"{what} (REALTIME_TEST_STRICT=1: make test installs it; run `make system-deps`)")
    pytest.skip(what)


def run_module_on_postgresql(path: str, must_pass: tuple[str, ...] = ()) -> None:
    """Run the test module at `path` again, whole, on a private PostgreSQL with every
    migration applied (the module's tests run on the embedded SQLite otherwise):
    all of it passes, nothing is skipped, and each test named in `must_pass` (one
    the module defines on PostgreSQL only) passed there."""
    import os
    import subprocess
    import sys

    from tests.services import ROOT, PostgresServer

    try:
        server = PostgresServer()
    except FileNotFoundError as exc:
        missing(str(exc))
    server.start()
    try:
        env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DJANGO_ALLOW_ASYNC_UNSAFE")}
        env["DATABASE_URL"] = server.url
        run = subprocess.run(
            [sys.executable, "-m", "pytest", path, "-v", "-p", "no:randomly", "-p", "no:cacheprovider"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
        )
    finally:
        server.stop()
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    for name in must_pass:
        assert f"{name} PASSED" in run.stdout, run.stdout
    assert "skipped" not in run.stdout.splitlines()[-1], run.stdout


class Clock:
    """A clock that stands still until the test moves it."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch) -> Clock:
    """One clock the test moves (clock.advance(seconds)) in place of the ones that
    time the connection leases, the presence leases and the tickets (each module's
    wall_clock and local_clock), so that a TTL runs out without waiting for it."""
    from accounts import tickets
    from realtime.state import leases, presence

    fake = Clock(time.time())
    for module in (leases, presence, tickets):
        for name in ("wall_clock", "local_clock"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, fake)
    return fake


async def presence_settled(room: str = "general") -> None:
    """Nothing of the room's presence waits in this process's coalescer to be told
    (so the next arrival makes a diff of its own)."""
    from realtime.state import presence

    await until(lambda: room not in presence.coalescer().pending, what="the room's presence diff sent")


async def until(predicate, timeout: float = 5, what: str = "the condition"):
    """Wait until predicate() (awaited if it returns an awaitable) is true, and
    return it; fail after `timeout` seconds. For a change that comes by itself
    (from another task, the channel layer or a worker's timer)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if loop.time() >= deadline:
            pytest.fail(f"{what}: not within {timeout} s")
        await asyncio.sleep(0.01)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A private redis-server for the whole session (skipped, with the reason, when
    the binary is missing; `make test` installs it)."""
    try:
        server = RedisServer(tmp_path_factory.mktemp("redis"))
    except FileNotFoundError as exc:
        missing(str(exc))
    server.start()
    yield server
    server.stop()


@pytest.fixture(params=["memory", "redis"])
def layer(request, settings):
    """Run the test on the embedded default (the in-memory layer, everything in this
    process) and on the production transport: a real Redis channel layer, REDIS_URL
    set, so the fan-out rides Redis pub/sub and rate limits, leases and presence
    live in Redis."""
    from realtime.state import ratelimit

    if request.param == "redis":
        server = request.getfixturevalue("redis_server")
        settings.CHANNEL_LAYERS = {
            "default": {
                "BACKEND": "channels_redis.core.RedisChannelLayer",
                "CONFIG": {"hosts": [{"address": server.url, "socket_timeout": None}]},
            }
        }
        settings.REDIS_URL = server.url
        import redis

        # Nothing of an earlier test's buckets, leases or presence.
        with redis.Redis.from_url(server.url) as client:
            client.flushall()
    else:
        settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
        settings.REDIS_URL = ""
    ratelimit.reset()
    yield request.param
    ratelimit.reset()
    layer = get_channel_layer()
    if request.param == "redis":
        async_to_sync(layer.flush)()


@pytest.fixture(params=["memory", "redis"])
def transport(request, settings):
    """Run the test on the embedded default (the in-memory layer, buckets in this
    process) and with REDIS_URL (Redis buckets, the pub/sub fan-out)."""
    from realtime.state import ratelimit

    if request.param == "redis":
        settings.REDIS_URL = request.getfixturevalue("redis_server").url
    else:
        settings.REDIS_URL = ""
        settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    ratelimit.reset()
    yield request.param
    ratelimit.reset()


@pytest.fixture
def demo(db):
    """The seed_demo data: alice, bob, carol, admin; rooms general and ops."""
    call_command("seed_demo", stdout=open("/dev/null", "w"))
    User = get_user_model()
    return {u.username: u for u in User.objects.all()}


@pytest.fixture
def clients(demo):
    """A signed-in Django test client per demo user (REST calls, sync)."""
    from django.test import Client

    result = {}
    for name, user in demo.items():
        result[name] = Client()
        result[name].force_login(user)
    return result


@pytest.fixture
def cookies(demo):
    """A session cookie header for each demo user."""
    result = {}
    for name, user in demo.items():
        client = Client()
        client.force_login(user)
        result[name] = f"sessionid={client.cookies['sessionid'].value}".encode()
    return result


def communicator(cookie: bytes | None = None, subprotocols=("rt.v1.json",), origin=ORIGIN, path="/ws/v1/"):
    from project.asgi import application

    headers = [HOST]
    if origin is not None:
        headers.append(origin)
    if cookie:
        headers.append((b"cookie", cookie))
    return WebsocketCommunicator(application, path, headers=headers, subprotocols=list(subprotocols))


@contextlib.asynccontextmanager
async def socket(cookie: bytes | None, **kwargs):
    """A connected socket; always disconnected afterwards."""
    comm = communicator(cookie, **kwargs)
    connected, _ = await comm.connect(timeout=5)
    assert connected, "handshake refused"
    try:
        yield comm
    finally:
        await comm.disconnect()


async def call(comm, frame: dict, timeout: float = 5) -> dict:
    """Send a request and return the next frame."""
    await comm.send_json_to(frame)
    return await comm.receive_json_from(timeout=timeout)


def log_reads(monkeypatch, name: str) -> list[tuple[int, int]]:
    """The (after, upto) of each call of roomlog.<name> (read_range,
    room_events_between) from now on, in order; each call is still made."""
    from realtime.domain import roomlog

    reads: list[tuple[int, int]] = []
    real = getattr(roomlog, name)

    def recorded(**kwargs):
        reads.append((kwargs["after"], kwargs["upto"]))
        return real(**kwargs)

    monkeypatch.setattr(roomlog, name, recorded)
    return reads


async def subscribe(comm, room: str, since: int | None = 0, presence: bool = False) -> list[dict]:
    """Subscribe and return the replayed events; asserts the ack. Without presence
    by default, so that the tests see the room's events alone."""
    frame = {"type": "subscribe", "room": room, "ref": f"sub-{room}", "presence": presence}
    if since is not None:
        frame["since"] = since
    await comm.send_json_to(frame)
    events = []
    while True:
        reply = await comm.receive_json_from(timeout=5)
        if reply["type"] == "ack":
            assert reply["ref"] == f"sub-{room}"
            assert reply["replayed"] == len(events)
            return events
        assert reply["type"] != "error", reply
        if reply["type"] in ("presence.state", "read.markers"):
            continue
        events.append(reply)


async def epoch(slug: str = "general") -> str:
    """The room's log epoch (what a subscribe ack and a page of events carry)."""
    from realtime.models import Room

    return (await Room.objects.aget(slug=slug)).epoch


async def assert_quiet(comm, ref: str = "quiet") -> None:
    """Nothing is on its way to `comm`: a ping sent now is answered before anything
    else arrives. (The socket answers in order, and the ping first catches up any
    room whose head is past what the socket was sent, so a frame still owed to it
    comes first and fails this; waiting a while for nothing lets a late one slip
    through.)"""
    await comm.send_json_to({"type": "ping", "ref": ref})
    assert await comm.receive_json_from(timeout=5) == {"type": "pong", "ref": ref}


def pytest_configure(config):
    """The ports this process's servers get (deploy.cluster.free_port): drawn from
    below the kernel's ephemeral range, where no outgoing connection takes one
    before its server binds it. Each pytest-xdist process takes a slice of the
    range its controller had (a process started in place of a crashed one takes
    the crashed one's), so a run of xdist inside a test (tests/test_suite.py)
    splits that test's slice, and a pytest run by a test keeps it."""
    import os

    span = os.environ.get("REALTIME_FREE_PORTS") or f"20000-{ephemeral_low() - 1}"
    worker = getattr(config, "workerinput", None)
    if worker is not None:
        low, high = map(int, span.split("-"))
        count = int(worker["workercount"])
        index = int(worker["workerid"].removeprefix("gw")) % count
        size = (high - low + 1) // count
        span = f"{low + index * size}-{low + (index + 1) * size - 1}"
    os.environ["REALTIME_FREE_PORTS"] = span


def ephemeral_low() -> int:
    """Where the kernel's range of ports for outgoing connections begins."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return max(int(f.read().split()[0]), 21000)
    except (OSError, ValueError, IndexError):
        return 32768


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """`make test` runs the suite in two processes (pytest-xdist). Work goes out a
    module at a time, so a module's fixtures (a browser, an app server, a broker's
    cluster) start once and its tests run in order, as in one process; every
    cluster module goes to one process, so the session's cluster behind each
    balancer starts once."""
    from xdist.scheduler import LoadScopeScheduling

    class ByModule(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return scope_of(nodeid)

    return ByModule(config, log)


def scope_of(nodeid: str) -> str:
    """The unit of work a test goes out in: its module, or the cluster's modules."""
    path = nodeid.split("::", 1)[0]
    return "tests/cluster" if path.startswith("tests/cluster/") else path


def pytest_collection_modifyitems(config, items):
    """Every test has a node id of its own: xdist keys tests by node id, and of
    tests that share one it would run only one."""
    for item in items:
        if not item.nodeid.endswith(item.name):
            # schemathesis names its items by API operation but gives them all
            # the test's node id. (pytest 9 keeps a node's id as item._id, a
            # NodeId; NodeId.parse reads one.)
            item._id = type(item.id).parse(f"{item.nodeid.rsplit('::', 1)[0]}::{item.name}")
    seen = collections.Counter(item.nodeid for item in items)
    if twice := sorted(nodeid for nodeid, n in seen.items() if n > 1):
        raise pytest.UsageError(f"tests collected under one node id (xdist would run one of each): {twice[:5]}")
