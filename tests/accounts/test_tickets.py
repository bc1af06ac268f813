"""Connection tickets for non-browser clients: single use, 30 s, never logged."""

from __future__ import annotations

import logging

import pytest
from asgiref.sync import sync_to_async
from django.test import Client

from accounts import tickets
from tests.conftest import call, communicator, epoch

pytestmark = [pytest.mark.django_db(transaction=True)]


@pytest.fixture
def bob_client(demo):
    client = Client()
    client.force_login(demo["bob"])
    return client


def new_ticket(client) -> str:
    res = client.post("/api/v1/tickets/")
    assert res.status_code == 201
    body = res.json()
    assert body["expires_in"] == 30 and len(body["ticket"]) >= 32
    return body["ticket"]


def test_tickets_need_a_signed_in_user(demo):
    assert Client().post("/api/v1/tickets/").status_code == 403


async def open_with(ticket: str):
    comm = communicator(None, path=f"/ws/v1/?ticket={ticket}")
    connected, _ = await comm.connect(timeout=5)
    assert connected
    return comm


@pytest.mark.asyncio
async def test_a_ticket_opens_one_socket_once(bob_client, caplog):
    caplog.set_level(logging.DEBUG)
    ticket = await sync_to_async(new_ticket)(bob_client)
    first = await open_with(ticket)
    assert await call(first, {"type": "subscribe", "room": "general", "ref": 1, "presence": False}) == {
        "type": "ack", "ref": 1, "room": "general", "seq": 0, "epoch": await epoch(), "replayed": 0,
    }
    again = await open_with(ticket)
    assert await again.receive_output(timeout=5) == {"type": "websocket.close", "code": 4001}
    await again.disconnect()
    await first.disconnect()
    assert ticket not in caplog.text, "a ticket must never reach the logs"


@pytest.mark.asyncio
async def test_forged_and_expired_tickets_are_refused(bob_client, clock):
    forged = await open_with("not-a-ticket-at-all-0123456789abcdef")
    assert await forged.receive_output(timeout=5) == {"type": "websocket.close", "code": 4001}
    await forged.disconnect()
    early, late = [await sync_to_async(new_ticket)(bob_client) for _ in range(2)]
    clock.advance(tickets.TICKET_TTL - 1)
    fresh = await open_with(early)  # a second before it expires
    assert await call(fresh, {"type": "ping", "ref": 1}) == {"type": "pong", "ref": 1}
    await fresh.disconnect()
    clock.advance(1)
    expired = await open_with(late)
    assert await expired.receive_output(timeout=5) == {"type": "websocket.close", "code": 4001}
    await expired.disconnect()


@pytest.mark.asyncio
async def test_a_ticket_socket_closes_when_its_session_logs_out(bob_client):
    ticket = await sync_to_async(new_ticket)(bob_client)
    comm = await open_with(ticket)
    assert await call(comm, {"type": "ping", "ref": 1}) == {"type": "pong", "ref": 1}
    await sync_to_async(bob_client.post)("/accounts/logout/")
    assert await comm.receive_output(timeout=2) == {"type": "websocket.close", "code": 4001}
    await comm.disconnect()


async def refused_with_4001(ticket: str) -> None:
    comm = await open_with(ticket)
    assert await comm.receive_output(timeout=5) == {"type": "websocket.close", "code": 4001}
    await comm.disconnect()


@pytest.mark.asyncio
@pytest.mark.parametrize("end", ["logout", "password", "deactivate", "session_deleted"])
async def test_a_ticket_dies_with_its_session(bob_client, demo, end):
    """A ticket taken before the session ended opens nothing afterwards, and is gone
    from the store (not merely refused when redeemed)."""
    from django.contrib.auth import get_user_model
    from django.contrib.sessions.models import Session
    from django.core.cache import cache

    ticket = await sync_to_async(new_ticket)(bob_client)
    other = Client()
    await sync_to_async(other.force_login)(demo["bob"])  # another session of bob's: its ticket lives on
    kept = await sync_to_async(new_ticket)(other)
    bob = demo["bob"]

    def finish() -> None:
        if end == "logout":
            bob_client.post("/accounts/logout/")
        elif end == "password":
            bob.set_password("a-brand-new-passphrase-7")
            bob.save()
        elif end == "deactivate":
            bob.is_active = False
            bob.save()
        else:
            Session.objects.filter(session_key=bob_client.session.session_key).delete()

    await sync_to_async(finish)()
    assert await sync_to_async(cache.get)(tickets._key(ticket)) is None
    await refused_with_4001(ticket)
    if end in ("logout", "session_deleted"):
        comm = await open_with(kept)
        assert await call(comm, {"type": "ping", "ref": 1}) == {"type": "pong", "ref": 1}
        await comm.disconnect()
    else:
        await refused_with_4001(kept)  # every session of bob's ended


@pytest.mark.asyncio
@pytest.mark.parametrize("end", ["password", "deactivate", "session_deleted"])
async def test_redeeming_checks_the_session_even_without_a_signal(bob_client, demo, end):
    """A change made with queryset.update() or raw SQL sends no signal: the ticket is
    still in the store, and redeeming it refuses all the same."""
    from django.contrib.auth import get_user_model
    from django.contrib.auth.hashers import make_password
    from django.contrib.sessions.models import Session

    ticket = await sync_to_async(new_ticket)(bob_client)
    users = get_user_model().objects.filter(pk=demo["bob"].pk)

    def finish() -> None:
        if end == "password":
            users.update(password=make_password("changed-elsewhere-9"))
        elif end == "deactivate":
            users.update(is_active=False)
        else:
            Session.objects.filter(session_key=bob_client.session.session_key)._raw_delete("default")

    await sync_to_async(finish)()
    await refused_with_4001(ticket)
