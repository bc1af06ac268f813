"""Abuse that costs others: reconnect loops (handshakes per user and per client
address), replay amplification (the replay budget), accounts on probation, and
counters that count only what was accepted. On the in-process stores and Redis."""

from __future__ import annotations

import pytest
from asgiref.sync import sync_to_async
from django.test import Client

from django.contrib.auth import get_user_model

from realtime.observability import metrics
from realtime.state import leases
from realtime.models import Event
from tests.conftest import HOST, ORIGIN, call, subscribe

pytestmark = [pytest.mark.asyncio, pytest.mark.django_db(transaction=True)]
User = get_user_model()


def from_address(address: str):
    """The app, as reached by a client at `address` (what ProxyHeadersMiddleware leaves)."""
    from project.asgi import application

    async def app(scope, receive, send):
        scope["client"] = [address, 40000]
        await application(scope, receive, send)

    return app


async def opened(cookie: bytes | None, address: str = "203.0.113.1"):
    """A socket and what the server said before closing it, if it did: (comm, frames, close code)."""
    from channels.testing import WebsocketCommunicator

    headers = [HOST, ORIGIN] + ([(b"cookie", cookie)] if cookie else [])
    comm = WebsocketCommunicator(from_address(address), "/ws/v1/", headers=headers, subprotocols=["rt.v1.json"])
    connected, _ = await comm.connect(timeout=5)
    assert connected
    frames, code = [], None
    while not await comm.receive_nothing(timeout=0.15):
        out = await comm.receive_output(timeout=1)
        if out["type"] == "websocket.close":
            code = out.get("code")
            break
        frames.append(out)
    return comm, frames, code


def throttled(frames, code) -> float:
    """The retry_after of a handshake refused with 4029 (asserts that it was)."""
    import json

    assert code == 4029, (frames, code)
    (frame,) = [json.loads(f["text"]) for f in frames]
    assert (frame["type"], frame["code"]) == ("error", "rate_limited")
    assert frame["retry_after"] > 0
    return frame["retry_after"]


async def test_a_users_reconnect_loop_gets_4029_with_a_retry_hint(cookies, transport, settings):
    settings.REALTIME = {**settings.REALTIME, "RATE_LIMITS": {
        **settings.REALTIME["RATE_LIMITS"], "handshake.user": (0.5, 3)}}
    socks = []
    try:
        for _ in range(3):  # a burst the size of a user's sockets coming back at once
            comm, frames, code = await opened(cookies["alice"])
            socks.append(comm)
            assert code is None
        comm, frames, code = await opened(cookies["alice"], address="203.0.113.2")  # another address: still alice
        socks.append(comm)
        assert 1 <= throttled(frames, code) <= 2  # a token every 2 s
        # Its lease, asked for beside the bucket, was given back: the three open hold hers.
        alice = await User.objects.aget(username="alice")
        assert await leases.leases().count(alice.pk) == 3
        comm, frames, code = await opened(cookies["bob"])  # others are untouched
        socks.append(comm)
        assert code is None
        assert (await call(comm, {"type": "ping", "ref": 1}))["type"] == "pong"
    finally:
        for comm in socks:
            await comm.disconnect()


async def test_handshakes_per_address_are_limited_before_the_session_is_read(cookies, transport, settings):
    settings.REALTIME = {**settings.REALTIME, "RATE_LIMITS": {
        **settings.REALTIME["RATE_LIMITS"], "handshake.address": (1, 4)}}
    socks = []
    try:
        for _ in range(4):  # anonymous: accepted and closed with 4001
            comm, frames, code = await opened(None, address="198.51.100.7")
            socks.append(comm)
            assert code == 4001
        comm, frames, code = await opened(cookies["bob"], address="198.51.100.7")
        socks.append(comm)
        throttled(frames, code)  # a signed-in user on the flooded address waits too
        # An IPv6 flood is one bucket per /64, not per address.
        for i in range(4):
            comm, frames, code = await opened(None, address=f"2001:db8:1:2::{i + 1}")
            socks.append(comm)
            assert code == 4001
        comm, frames, code = await opened(None, address="2001:db8:1:2:ffff::9")
        socks.append(comm)
        throttled(frames, code)
        comm, frames, code = await opened(cookies["bob"], address="198.51.100.8")
        socks.append(comm)
        assert code is None
    finally:
        for comm in socks:
            await comm.disconnect()


async def post_many(client: Client, n: int, body: str = "x" * 100, prefix: str = "m") -> None:
    for i in range(n):
        res = await sync_to_async(client.post)("/api/v1/rooms/general/messages/", {"body": body, "client_id": f"{prefix}{i}"},
                                               content_type="application/json")
        assert res.status_code == 200


async def test_a_subscribe_its_bucket_refuses_does_nothing_and_a_live_stream_stays(demo, cookies, transport, settings):
    """A subscribe its bucket refuses does nothing: no fan-out group of a new
    room, no presence, nothing replayed; a stream live before stays live; the
    refusal is `rate_limited` even where the subscribe would have failed (the
    token is asked for first); refusals in a row close the socket with 4029."""
    from realtime.delivery.fanout import fanout
    from realtime.models import Room
    from realtime.state import presence

    settings.REALTIME = {**settings.REALTIME, "FLOOD_CLOSE_AFTER": 3, "RATE_LIMITS": {
        **settings.REALTIME["RATE_LIMITS"], "subscribe": (1e-6, 2), "message.send": (1000, 1000)}}
    await Room.objects.acreate(slug="lobby", title="Lobby", is_public=True)
    alice = Client()
    await sync_to_async(alice.force_login)(demo["alice"])
    await post_many(alice, 3)
    bob, _, _ = await opened(cookies["bob"])
    try:
        assert len(await subscribe(bob, "general", since=0)) == 3
        assert await subscribe(bob, "general", since=None) == []  # the bucket's second (and last) token
        # A repair of the live stream: refused before anything of it is sent.
        reply = await call(bob, {"type": "subscribe", "room": "general", "since": 0, "ref": "repair"})
        assert (reply["type"], reply["code"], reply["ref"]) == ("error", "rate_limited", "repair")
        assert reply["retry_after"] > 0
        # A room that does not exist: the bucket's answer, not not_found.
        reply = await call(bob, {"type": "subscribe", "room": "no-such-room", "ref": "none"})
        assert (reply["code"], reply["ref"]) == ("rate_limited", "none")
        # A room it may see, with presence: not joined, not present.
        reply = await call(bob, {"type": "subscribe", "room": "lobby", "presence": True, "ref": "lobby"})
        assert (reply["code"], reply["ref"]) == ("rate_limited", "lobby")
        assert [c for c in fanout().groups.get("room.lobby", ()) if getattr(c, "user", None) is not None] == []
        assert (await presence.page("lobby")).count == 0
        # The live stream goes on.
        await post_many(alice, 1, prefix="later")
        live = await bob.receive_json_from(timeout=5)
        assert (live["type"], live["seq"]) == ("message.new", 4)
        # A fourth refusal in a row closes the socket.
        await bob.send_json_to({"type": "subscribe", "room": "lobby", "ref": "again"})
        assert await bob.receive_output(timeout=5) == {"type": "websocket.close", "code": 4029}
    finally:
        await bob.disconnect()


async def test_replays_past_the_budget_are_refused_until_it_refills(demo, cookies, transport, settings):
    """A replay runs while the user is not in debt and its bytes are taken
    afterwards; the next replay, on any socket of the user's, waits; a subscribe
    that replays nothing, and other users, are not held back."""
    settings.REALTIME = {**settings.REALTIME, "REPLAY_BUDGET": (1000, 4000),
                         "RATE_LIMITS": {**settings.REALTIME["RATE_LIMITS"], "message.send": (1000, 1000)}}
    alice = Client()
    await sync_to_async(alice.force_login)(demo["alice"])
    await post_many(alice, 30)  # about 6 KB of events
    bob_a, _, _ = await opened(cookies["bob"])
    bob_b, _, _ = await opened(cookies["bob"])
    carol, _, _ = await opened(cookies["carol"])
    try:
        assert len(await subscribe(bob_a, "general", since=0)) == 30  # within the budget: all of it
        await call(bob_a, {"type": "unsubscribe", "room": "general", "ref": "u"})
        for comm in (bob_a, bob_b):
            reply = await call(comm, {"type": "subscribe", "room": "general", "since": 0, "ref": "again"})
            assert (reply["type"], reply["code"], reply["ref"]) == ("error", "rate_limited", "again")
            assert 0.5 <= reply["retry_after"] <= 3.5  # the debt (about 2 KB) at 1 KB a second
        # A refused subscribe leaves the socket in no fan-out group of the room.
        from realtime.delivery.fanout import fanout

        assert all("general" in c.subscriptions for c in fanout().groups.get("room.general", ()))
        # Going live without a replay is not a replay, nor is a since at the head.
        assert await subscribe(bob_b, "general", since=None) == []
        await call(bob_b, {"type": "unsubscribe", "room": "general", "ref": "u"})
        assert await subscribe(bob_b, "general", since=30) == []
        # A repair asked of a live stream is refused, and the stream stays live.
        reply = await call(bob_b, {"type": "subscribe", "room": "general", "since": 0, "ref": "repair"})
        assert (reply["code"], reply["ref"]) == ("rate_limited", "repair")
        await post_many(alice, 1, prefix="later")
        live = await bob_b.receive_json_from(timeout=5)
        assert (live["type"], live["seq"]) == ("message.new", 31)
        # REST history and event pages share the budget.
        bob = Client()
        await sync_to_async(bob.force_login)(demo["bob"])
        res = await sync_to_async(bob.get)("/api/v1/rooms/general/events/?since=0")
        assert res.status_code == 429 and res.json()["code"] == "rate_limited" and int(res["Retry-After"]) >= 1
        res = await sync_to_async(bob.get)("/api/v1/rooms/general/messages/")
        assert res.status_code == 429
        # Another user replays as usual.
        assert len(await subscribe(carol, "general", since=0)) == 31
    finally:
        for comm in (bob_a, bob_b, carol):
            await comm.disconnect()
    assert await Event.objects.acount() == 31


async def test_concurrent_replays_of_one_user_overshoot_by_one_at_most(demo, cookies, transport, settings):
    """Five sockets of one user asking for the same backlog at once: the budget is
    taken atomically before each replay is sent, so one gets it and the rest wait."""
    import asyncio

    settings.REALTIME = {**settings.REALTIME, "REPLAY_BUDGET": (100, 1000),
                         "RATE_LIMITS": {**settings.REALTIME["RATE_LIMITS"], "message.send": (1000, 1000)}}
    alice = Client()
    await sync_to_async(alice.force_login)(demo["alice"])
    await post_many(alice, 20)
    socks = [(await opened(cookies["bob"]))[0] for _ in range(5)]
    try:
        replies = await asyncio.gather(*(call(comm, {"type": "subscribe", "room": "general", "since": 0, "ref": "s",
                                                     "presence": False}) for comm in socks))
        kinds = sorted(r["type"] for r in replies)
        assert kinds == ["error", "error", "error", "error", "message.new"], replies
    finally:
        for comm in socks:
            await comm.disconnect()


async def test_a_new_account_posts_at_the_probation_rate(db, demo, transport, settings):
    settings.REALTIME = {**settings.REALTIME, "RATE_LIMITS": {
        **settings.REALTIME["RATE_LIMITS"], "message.send.probation": (0.1, 3)}}
    newcomer = Client()
    res = await sync_to_async(newcomer.post)("/accounts/signup/", {
        "username": "newcomer", "password1": "a-long-passphrase-42", "password2": "a-long-passphrase-42"})
    assert res.status_code == 302
    statuses = []
    for i in range(4):
        res = await sync_to_async(newcomer.post)("/api/v1/rooms/general/messages/", {"body": "hi", "client_id": f"n{i}"},
                                                 content_type="application/json")
        statuses.append(res.status_code)
    assert statuses == [200, 200, 200, 429]
    # Over the socket too, with the same bucket.
    cookie = f"sessionid={newcomer.cookies['sessionid'].value}".encode()
    comm, _, code = await opened(cookie)
    assert code is None
    reply = await call(comm, {"type": "message.send", "room": "general", "body": "x", "client_id": "s1", "ref": 1})
    assert (reply["type"], reply["code"]) == ("error", "rate_limited")
    await comm.disconnect()
    # An established account is not held to it.
    alice = Client()
    await sync_to_async(alice.force_login)(demo["alice"])
    for i in range(5):
        res = await sync_to_async(alice.post)("/api/v1/rooms/general/messages/", {"body": "hi", "client_id": f"a{i}"},
                                              content_type="application/json")
        assert res.status_code == 200


async def test_the_dashboard_counts_only_accepted_messages(demo, cookies, transport):
    """A send refused by the policy (a room that does not exist, one the sender may
    not post in) puts nothing in "Busiest rooms" or in messages per second."""
    metrics.WINDOW.take()
    comm, _, _ = await opened(cookies["carol"])  # a reader in #general
    try:
        for room in ("made-up-room", "ops", "general"):
            reply = await call(comm, {"type": "message.send", "room": room, "body": "x", "client_id": room, "ref": 1})
            assert reply["type"] == "error"
        bob, _, _ = await opened(cookies["bob"])
        assert (await call(bob, {"type": "message.send", "room": "general", "body": "x", "client_id": "b",
                                 "ref": 1}))["type"] == "ack"
        await bob.disconnect()
    finally:
        await comm.disconnect()
    figures = metrics.WINDOW.take()
    assert figures["rooms"] == {"general": 1}
    assert figures["messages_in"] > 0
