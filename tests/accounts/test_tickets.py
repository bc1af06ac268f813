"""Connection tickets for non-browser clients: single use, 30 s, never logged."""

from __future__ import annotations

import asyncio
import logging

import pytest
from asgiref.sync import sync_to_async
from django.test import Client

from accounts import tickets
from tests.conftest import call, communicator

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
        "type": "ack", "ref": 1, "room": "general", "seq": 0, "replayed": 0,
    }
    again = await open_with(ticket)
    assert await again.receive_output(timeout=5) == {"type": "websocket.close", "code": 4001}
    await again.disconnect()
    await first.disconnect()
    assert ticket not in caplog.text, "a ticket must never reach the logs"


@pytest.mark.asyncio
async def test_forged_and_expired_tickets_are_refused(bob_client, monkeypatch):
    forged = await open_with("not-a-ticket-at-all-0123456789abcdef")
    assert await forged.receive_output(timeout=5) == {"type": "websocket.close", "code": 4001}
    await forged.disconnect()
    monkeypatch.setattr(tickets, "TICKET_TTL", 1)
    ticket = await sync_to_async(lambda: bob_client.post("/api/v1/tickets/").json()["ticket"])()
    await asyncio.sleep(1.2)
    expired = await open_with(ticket)
    assert await expired.receive_output(timeout=5) == {"type": "websocket.close", "code": 4001}
    await expired.disconnect()


@pytest.mark.asyncio
async def test_a_ticket_socket_closes_when_its_session_logs_out(bob_client):
    ticket = await sync_to_async(new_ticket)(bob_client)
    comm = await open_with(ticket)
    assert await call(comm, {"type": "ping", "ref": 1}) == {"type": "pong", "ref": 1}
    await sync_to_async(bob_client.post)("/accounts/logout/")
    assert await comm.receive_output(timeout=2) == {"type": "websocket.close", "code": 4003}
    await comm.disconnect()
