"""Frames that were already waiting when the socket took its next one (a client
with several sends in flight): message.sends among them are handled as one batch,
with every guarantee of a single send, and replies in the frames' order. Run on
the embedded default and with REDIS_URL (Redis buckets, pub/sub fan-out, one
pipelined publish)."""

from __future__ import annotations

import pytest

from realtime.domain import services
from realtime.models import Event, Message, Room
from tests.conftest import socket, subscribe, assert_quiet

pytestmark = [pytest.mark.asyncio, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def batches(monkeypatch):
    """The sizes of the batches that reached the database thread."""
    sizes: list[int] = []
    real = services.message_send_many

    def counted(*, user, sends):
        sizes.append(len(sends))
        return real(user=user, sends=sends)

    monkeypatch.setattr(services, "message_send_many", counted)
    return sizes


def send(i, room="general", client_id=None, body=None):
    return {"type": "message.send", "room": room, "body": body or f"m{i}", "client_id": client_id or f"b{i}",
            "ref": f"r{i}"}


async def replies(comm, n: int) -> list[dict]:
    return [await comm.receive_json_from(timeout=5) for _ in range(n)]


async def test_queued_sends_are_one_batch_each_acked_in_order_and_delivered_once(cookies, transport, batches):
    async with socket(cookies["alice"]) as alice, socket(cookies["bob"]) as bob:
        await subscribe(alice, "general")
        await subscribe(bob, "general")
        for i in range(10):  # all queued before the consumer takes the first
            await alice.send_json_to(send(i))
        acks = await replies(alice, 10)
        assert [(a["type"], a["ref"], a["seq"]) for a in acks] == [("ack", f"r{i}", i + 1) for i in range(10)]
        assert max(batches) > 1, "the queued sends were handled one by one"
        for comm in (alice, bob):
            got = await replies(comm, 10)
            assert [(e["type"], e["seq"], e["body"]) for e in got] == [("message.new", i + 1, f"m{i}") for i in range(10)]
            await assert_quiet(comm)
    assert await Message.objects.acount() == 10
    assert await Event.objects.acount() == 10


async def test_a_burst_keeps_each_frames_outcome_and_order(cookies, transport, batches):
    await Room.objects.acreate(slug="hidden", title="Hidden", is_public=False)
    async with socket(cookies["bob"]) as bob, socket(cookies["alice"]) as alice:
        await subscribe(alice, "general")
        frames = [
            send(0),
            send(1, client_id="b0", body="a retry of b0"),  # a repeat in the same batch: the original's ack
            send(2, room="hidden"),  # bob is no member of it: not_found (as if it did not exist), nothing stored
            send(3, body="bell\x07"),  # a control character: invalid
            {"type": "ping", "ref": "p"},  # between two batches
            "{not json",  # answered in its turn
            send(4),
            send(5, room="nowhere"),
        ]
        for frame in frames:
            await (bob.send_to(text_data=frame) if isinstance(frame, str) else bob.send_json_to(frame))
        got = await replies(bob, len(frames))
        assert [(r["type"], r.get("ref"), r.get("code"), r.get("seq")) for r in got] == [
            ("ack", "r0", None, 1),
            ("ack", "r1", None, 1),
            ("error", "r2", "not_found", None),
            ("error", "r3", "invalid", None),
            ("pong", "p", None, None),
            ("error", None, "invalid", None),
            ("ack", "r4", None, 2),
            ("error", "r5", "not_found", None),
        ]
        assert got[0]["id"] == got[1]["id"]
        assert batches[:2] == [4, 2]
        events = await replies(alice, 2)
        assert [(e["seq"], e["body"]) for e in events] == [(1, "m0"), (2, "m4")]
        await assert_quiet(alice)  # a repeat or a refusal was broadcast
    assert await Message.objects.acount() == 2


async def test_a_batch_spends_one_token_per_send_and_refuses_the_rest(cookies, transport, batches, settings):
    settings.REALTIME = {
        **settings.REALTIME,
        "RATE_LIMITS": {**settings.REALTIME["RATE_LIMITS"], "message.send": (1, 3)},
        "FLOOD_CLOSE_AFTER": 5,
    }
    async with socket(cookies["bob"]) as bob:
        for i in range(5):
            await bob.send_json_to(send(i))
        got = await replies(bob, 5)
        assert [(r["type"], r.get("code")) for r in got] == [("ack", None)] * 3 + [("error", "rate_limited")] * 2
        assert all(0 < r["retry_after"] <= 1 for r in got[3:])
        assert batches == [3], "refused sends reached the database"
    assert await Message.objects.acount() == 3
