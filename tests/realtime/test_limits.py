"""Handshake and connection limits: exact origins, sockets per user, idle timeout."""

from __future__ import annotations

import asyncio

import pytest
from django.test import override_settings

from realtime.state import leases as connections
from tests.conftest import call, communicator, socket, assert_quiet

pytestmark = [pytest.mark.asyncio, pytest.mark.django_db(transaction=True)]

APP = ["https://chat.example.test", "http://127.0.0.1:8000"]


async def handshake(cookie, origin: bytes | None) -> tuple[bool, object]:
    comm = communicator(cookie, origin=None if origin is None else (b"origin", origin))
    connected, _ = await comm.connect(timeout=5)
    return connected, comm


@pytest.mark.parametrize("origin, allowed", [
    (b"https://chat.example.test", True),
    (b"https://chat.example.test:443", True),  # the default port, spelled out
    (b"HTTPS://Chat.Example.Test", True),  # scheme and host compare without case
    (b"http://127.0.0.1:8000", True),
    (None, False),  # missing
    (b"null", False),  # sandboxed frames, file:// pages
    (b"https://chat.example.test.evil.test", False),  # look-alike suffix
    (b"https://evil-chat.example.test", False),
    (b"http://chat.example.test", False),  # wrong scheme
    (b"https://chat.example.test:8443", False),  # wrong port
    (b"http://127.0.0.1:8001", False),
    (b"http://127.0.0.1", False),  # the right host on another (default) port
    (b"https://user@chat.example.test", False),
    (b"https://chat.example.test/path", False),
    (b"ws://chat.example.test", False),
    (b"https://chat.example.test:99999", False),  # not a port
    (b"", False),
])
async def test_only_the_listed_full_origins_may_open_the_socket(cookies, origin, allowed):
    with override_settings(REALTIME_ALLOWED_ORIGINS=APP):
        connected, comm = await handshake(cookies["alice"], origin)
        try:
            assert connected is allowed
            if allowed:
                assert (await call(comm, {"type": "ping", "ref": 1}))["type"] == "pong"
        finally:
            await comm.disconnect()


@pytest.mark.parametrize("origin, allowed", [
    (b"http://127.0.0.1", True),
    (b"http://127.0.0.1:5173", True),  # development servers move between ports
    (b"https://localhost:8443", True),
    (b"http://evil.example", False),
    (b"http://127.0.0.1.evil.example", False),
    (b"null", False),
    (None, False),
])
async def test_without_a_list_debug_allows_the_allowed_hosts_only(cookies, origin, allowed):
    with override_settings(REALTIME_ALLOWED_ORIGINS=[], DEBUG=True):
        connected, comm = await handshake(cookies["alice"], origin)
        await comm.disconnect()
        assert connected is allowed
    with override_settings(REALTIME_ALLOWED_ORIGINS=[], DEBUG=False):
        connected, comm = await handshake(cookies["alice"], origin)
        await comm.disconnect()
        assert not connected  # never reached in practice: settings.py refuses to start


# -- sockets per user ---------------------------------------------------------------
@pytest.fixture(params=["memory", "redis"])
def leases(request, settings):
    """Leases in process memory, and in Redis, where every worker shares them (two
    sockets of this test process then count exactly as two sockets on two workers)."""
    if request.param == "redis":
        settings.REDIS_URL = request.getfixturevalue("redis_server").url
    else:
        settings.REDIS_URL = ""
    settings.REALTIME = {**settings.REALTIME, "MAX_CONNECTIONS_PER_USER": 3}
    connections.leases.reset()
    yield request.param
    connections.leases.reset()


async def opened(cookie) -> tuple[object, int | None]:
    """A socket and, if the server closed it at once, the close code."""
    comm = communicator(cookie)
    connected, _ = await comm.connect(timeout=5)
    assert connected
    out = await comm.receive_output(timeout=1) if not await comm.receive_nothing(timeout=0.2) else None
    return comm, (out or {}).get("code")


async def test_connections_per_user_are_capped_across_workers(cookies, leases):
    socks = []
    try:
        for _ in range(3):
            comm, code = await opened(cookies["alice"])
            socks.append(comm)
            assert code is None
        extra, code = await opened(cookies["alice"])
        assert code == 4008, "the fourth socket of one user is closed with 4008 (policy)"
        await extra.disconnect()

        # Another user is not affected.
        other, code = await opened(cookies["bob"])
        assert code is None
        await other.disconnect()

        # Closing one gives its place back.
        await socks.pop().disconnect()
        comm, code = await opened(cookies["alice"])
        socks.append(comm)
        assert code is None
        assert (await call(comm, {"type": "ping", "ref": 1}))["type"] == "pong"
        assert await connections.leases().count(await alice_id(cookies)) == 3
    finally:
        for comm in socks:
            await comm.disconnect()
    assert await connections.leases().count(await alice_id(cookies)) == 0


async def alice_id(cookies) -> int:
    from django.contrib.auth import get_user_model

    return (await get_user_model().objects.aget(username="alice")).pk


async def test_a_dead_workers_leases_run_out(cookies, leases, clock):
    """A worker killed with -9 never releases its sockets' leases: they expire."""
    uid = await alice_id(cookies)
    for i in range(3):
        assert await connections.acquire(uid, f"dead-{i}")
    clock.advance(connections.LEASE_TTL - 1)
    comm, code = await opened(cookies["alice"])
    await comm.disconnect()
    assert code == 4008, "a second before their expiry the leases still hold"
    assert await connections.leases().count(uid) == 3
    clock.advance(2)
    assert await connections.leases().count(uid) == 0
    comm, code = await opened(cookies["alice"])
    await comm.disconnect()
    assert code is None


# -- idle timeout -------------------------------------------------------------------
async def test_a_silent_socket_is_closed_after_the_idle_timeout(cookies, settings):
    settings.REALTIME = {**settings.REALTIME, "IDLE_TIMEOUT": 0.5}
    async with socket(cookies["alice"]) as quiet, socket(cookies["bob"]) as chatty:
        for i in range(8):  # 0.8 s of a ping every 0.1 s
            assert (await call(chatty, {"type": "ping", "ref": i}))["type"] == "pong"
            await asyncio.sleep(0.1)
        out = await quiet.receive_output(timeout=1)
        assert out == {"type": "websocket.close", "code": 4008}
        await assert_quiet(chatty)  # a socket that talks stays open
