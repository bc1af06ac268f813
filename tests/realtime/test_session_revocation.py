"""Sockets obey the Django session: when it ends, they close with 4001 (signed
out; an operator's disconnect is 4003, test_observability.py); when a membership
goes, the room's stream goes with it."""

from __future__ import annotations

from datetime import timedelta

import pytest
from asgiref.sync import sync_to_async
from django.contrib.sessions.models import Session
from django.test import Client
from django.utils import timezone

from realtime.models import Membership, Room
from tests.conftest import call, socket, subscribe, assert_quiet, until

pytestmark = [pytest.mark.asyncio, pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("layer")]


@pytest.fixture
def bob_browser(demo):
    """A signed-in browser of bob's: its Client and its cookie header."""
    client = Client()
    client.force_login(demo["bob"])
    return client, f"sessionid={client.cookies['sessionid'].value}".encode()


async def closed_with(comm, timeout: float = 2) -> int:
    """The close code of the next output, skipping frames sent before it."""
    while True:
        output = await comm.receive_output(timeout=timeout)
        if output["type"] == "websocket.close":
            return output["code"]


async def test_logout_closes_that_sessions_sockets_and_no_others(bob_browser, demo):
    client, cookie = bob_browser
    other = Client()
    await sync_to_async(other.force_login)(demo["bob"])
    other_cookie = f"sessionid={other.cookies['sessionid'].value}".encode()
    async with socket(cookie) as comm, socket(other_cookie) as elsewhere:
        await subscribe(comm, "general")
        await sync_to_async(client.post)("/accounts/logout/")
        assert await closed_with(comm) == 4001
        assert await call(elsewhere, {"type": "ping", "ref": 1}) == {"type": "pong", "ref": 1}


@pytest.mark.parametrize("change", ["deactivate", "password", "delete_session"])
async def test_the_session_ending_closes_the_socket_with_4001(bob_browser, demo, change):
    client, cookie = bob_browser
    async with socket(cookie) as comm:
        await subscribe(comm, "general")
        bob = demo["bob"]
        if change == "deactivate":
            bob.is_active = False
            await bob.asave()
        elif change == "password":
            await sync_to_async(bob.set_password)("a-new-long-password")
            await bob.asave()
        else:
            await Session.objects.filter(session_key=client.session.session_key).adelete()
        assert await closed_with(comm) == 4001


async def test_nothing_is_delivered_after_revocation(bob_browser, demo, cookies):
    client, cookie = bob_browser
    async with socket(cookie) as bob, socket(cookies["alice"]) as alice:
        await subscribe(bob, "general")
        await sync_to_async(client.post)("/accounts/logout/")
        assert await closed_with(bob) == 4001
        await call(alice, {"type": "message.send", "room": "general", "body": "after", "client_id": "a1", "ref": 1})
        assert await bob.receive_nothing(timeout=0.3)  # (closed: no ping to end it with)


@pytest.fixture
def cache_sessions(settings):
    """Sessions kept in the cache: where the sweep cannot read them."""
    settings.SESSION_ENGINE = "django.contrib.sessions.backends.cache"


async def test_a_session_the_sweep_cannot_read_is_rechecked_per_socket(cache_sessions, bob_browser, settings):
    from importlib import import_module

    settings.REALTIME = {**settings.REALTIME, "SESSION_RECHECK": 0.3, "AUTH_SWEEP": 600}
    client, cookie = bob_browser
    async with socket(cookie) as comm:
        await subscribe(comm, "general")
        # Gone from the cache without any signal (as its timeout does it).
        store = import_module(settings.SESSION_ENGINE).SessionStore(client.session.session_key)
        await sync_to_async(store.delete)()
        assert await closed_with(comm, timeout=3) == 4001


async def test_database_sessions_are_left_to_the_sweep_not_checked_per_socket(bob_browser, settings, monkeypatch):
    """The sweep reads every socket's session in one query: no query per socket."""
    from realtime.ws import authsweep
    from realtime.ws import consumer as consumers

    settings.REALTIME = {**settings.REALTIME, "SESSION_RECHECK": 0.1, "AUTH_SWEEP": 0.2}
    checked, sweeps = [], []
    real_check, real_sweep = consumers.session_is_valid, authsweep.sweep
    monkeypatch.setattr(consumers, "session_is_valid", lambda *a: checked.append(a) or real_check(*a))

    async def counted(sockets):
        sweeps.append(len(sockets))
        return await real_sweep(sockets)

    monkeypatch.setattr(authsweep, "sweep", counted)
    client, cookie = bob_browser
    async with socket(cookie) as comm:
        await subscribe(comm, "general")
        # Three sweeps of this socket: three times its recheck period and more.
        await until(lambda: sweeps.count(1) >= 3, what="three sweeps")
        assert checked == []
        # And an expiry is still found, by the sweep.
        await Session.objects.filter(session_key=client.session.session_key).aupdate(
            expire_date=timezone.now() - timedelta(seconds=1)
        )
        assert await closed_with(comm, timeout=3) == 4001
        assert checked  # (the sweep's session.check: the socket asked once the sweep said so)


async def test_removed_membership_ends_the_rooms_stream_with_not_found(cookies, demo):
    async with socket(cookies["bob"]) as bob, socket(cookies["alice"]) as alice:
        await subscribe(bob, "ops")
        await Membership.objects.filter(user=demo["bob"], room__slug="ops").adelete()
        # The stream's end (after a read of access) and rooms.changed (at once), in
        # either order.
        frames = sorted([await bob.receive_json_from(timeout=2) for _ in range(2)], key=lambda f: f["type"])
        assert [(f["type"], f.get("code", f.get("change")), f["room"]) for f in frames] == [
            ("error", "not_found", "ops"), ("rooms.changed", "removed", "ops")]
        await call(alice, {"type": "message.send", "room": "ops", "body": "secret", "client_id": "s1", "ref": 1})
        await assert_quiet(bob)
        # The socket itself stays, and other rooms are unaffected.
        assert await call(bob, {"type": "ping", "ref": 2}) == {"type": "pong", "ref": 2}


async def test_a_room_made_private_drops_non_members(cookies):
    await Membership.objects.filter(user__username="carol", room__slug="general").adelete()
    async with socket(cookies["carol"]) as carol, socket(cookies["bob"]) as bob:
        await subscribe(carol, "general")
        await subscribe(bob, "general")
        room = await Room.objects.aget(slug="general")
        room.is_public = False
        await room.asave()
        notice = await carol.receive_json_from(timeout=2)
        assert (notice["code"], notice["room"]) == ("not_found", "general")
        await assert_quiet(bob)  # members keep the stream


# -- changes no signal announces: the worker's sweep (realtime/ws/authsweep.py) ----------
@pytest.fixture
def swept(settings):
    """A sweep every 0.2 s, and no periodic session check to find things instead."""
    settings.REALTIME = {**settings.REALTIME, "AUTH_SWEEP": 0.2, "SESSION_RECHECK": 600}


@pytest.mark.parametrize("change", ["password", "deactivate", "session_deleted", "session_expired"])
async def test_a_revocation_without_a_signal_closes_the_socket_within_the_sweep(bob_browser, demo, swept, change):
    from django.contrib.auth import get_user_model
    from django.contrib.auth.hashers import make_password

    client, cookie = bob_browser
    users = get_user_model().objects.filter(pk=demo["bob"].pk)
    async with socket(cookie) as bob, socket(f"sessionid={(await sync_to_async(alice_cookie)(demo))}".encode()) as alice:
        await subscribe(bob, "general")
        if change == "password":
            await users.aupdate(password=await sync_to_async(make_password)("changed-behind-its-back"))
        elif change == "deactivate":
            await users.aupdate(is_active=False)
        elif change == "session_deleted":
            await sync_to_async(Session.objects.filter(session_key=client.session.session_key)._raw_delete)("default")
        else:
            await Session.objects.filter(session_key=client.session.session_key).aupdate(
                expire_date=timezone.now() - timedelta(seconds=1))
        assert await closed_with(bob, timeout=2) == 4001
        # Nothing more reaches it, and other users are untouched.
        assert await call(alice, {"type": "ping", "ref": 1}) == {"type": "pong", "ref": 1}


def alice_cookie(demo) -> str:
    client = Client()
    client.force_login(demo["alice"])
    return client.cookies["sessionid"].value


async def test_a_role_lowered_without_a_signal_is_seen_within_the_sweep(bob_browser, demo, swept, monkeypatch):
    from realtime.ws import authsweep

    queued = []  # what each sweep queued on the sockets it compared
    real = authsweep.sweep

    async def sweep(sockets) -> int:
        queued.append(await real(sockets))
        return queued[-1]

    monkeypatch.setattr(authsweep, "sweep", sweep)
    _, cookie = bob_browser
    async with socket(cookie) as bob:
        await subscribe(bob, "general")
        send = {"type": "message.send", "room": "general", "body": "hi", "ref": 1}
        assert (await call(bob, {**send, "client_id": "before"}))["type"] == "ack"  # access cached now
        await bob.receive_json_from(timeout=2)  # its own message
        before = len(queued)
        await Membership.objects.filter(user=demo["bob"], room__slug="general").aupdate(role="reader")
        # No ping, no resubscribe: a sweep finds the change and queues the socket's access check.
        await until(lambda: any(queued[before:]), what="a sweep finding the lowered role")
        reply = await call(bob, {**send, "client_id": "after"})
        assert (reply["type"], reply["code"]) == ("error", "forbidden")


async def test_a_room_made_private_without_a_signal_drops_non_members_within_the_sweep(cookies, swept):
    await Membership.objects.filter(user__username="carol", room__slug="general").adelete()
    async with socket(cookies["carol"]) as carol, socket(cookies["bob"]) as bob:
        await subscribe(carol, "general")
        await subscribe(bob, "general")
        await Room.objects.filter(slug="general").aupdate(is_public=False)
        notice = await carol.receive_json_from(timeout=2)
        assert (notice["type"], notice["code"], notice["room"]) == ("error", "not_found", "general")
        await assert_quiet(bob)  # members keep the stream


async def test_staff_taken_away_without_a_signal_loses_what_staff_may_see(demo, swept):
    from django.contrib.auth import get_user_model

    staff = await get_user_model().objects.acreate(username="ops-staff", is_staff=True)
    client = Client()
    await sync_to_async(client.force_login)(staff)
    async with socket(f"sessionid={client.cookies['sessionid'].value}".encode()) as comm:
        await subscribe(comm, "ops")  # private, but staff may read every room
        await get_user_model().objects.filter(pk=staff.pk).aupdate(is_staff=False)
        notice = await comm.receive_json_from(timeout=2)
        assert (notice["type"], notice["code"], notice["room"]) == ("error", "not_found", "ops")
        reply = await call(comm, {"type": "metrics.subscribe", "ref": 2})
        assert (reply["type"], reply["code"]) == ("error", "forbidden")


async def test_a_sweep_that_hangs_holds_up_none_of_the_other_chores(cookies, settings, monkeypatch):
    """A database that hangs the sweep must not stop the idle closes, the leases
    or the presence: the sweep runs beside them, not in their way."""
    import asyncio

    from realtime.ws import authsweep

    hung = asyncio.Event()

    async def never_ends(sockets):
        hung.set()
        await asyncio.Event().wait()

    monkeypatch.setattr(authsweep, "sweep", never_ends)
    settings.REALTIME = {**settings.REALTIME, "AUTH_SWEEP": 0.1, "IDLE_TIMEOUT": 1}
    async with socket(cookies["bob"]) as bob:
        await asyncio.wait_for(hung.wait(), 2)
        assert await closed_with(bob, timeout=3) == 4008  # the idle close came all the same
