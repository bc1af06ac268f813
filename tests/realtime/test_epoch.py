"""The log's epoch beside its seq: a client resumes with (since, epoch), and a log
started again (reset_epoch after a restore, a room made anew) is recovery_failed
instead of a silent resume into another history. On both transports."""

from __future__ import annotations

import asyncio
import io
import json

import pytest
from channels.testing import HttpCommunicator
from django.core.management import CommandError, call_command

from realtime.delivery.fanout import fanout
from realtime.domain import services
from realtime.models import Room
from tests.conftest import HOST, assert_quiet, call, epoch, socket, subscribe, until

pytestmark = [pytest.mark.asyncio, pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("layer")]


async def post(user, body: str, client_id: str, slug: str = "general"):
    return await services.perform(services.message_send, user=user, slug=slug, body=body, client_id=client_id)


async def get(cookie: bytes, path: str, timeout: float = 5) -> tuple[int, dict]:
    from project.asgi import application

    path, _, query = path.partition("?")
    comm = HttpCommunicator(application, "GET", path, headers=[HOST, (b"cookie", cookie)])
    comm.scope["query_string"] = query.encode()
    res = await comm.get_response(timeout=timeout)
    return res["status"], json.loads(res["body"])


async def reset(*rooms: str) -> str:
    out = io.StringIO()
    from asgiref.sync import sync_to_async

    await sync_to_async(call_command)("reset_epoch", *rooms, stdout=out)
    return out.getvalue()


def subscriber_count(slug: str) -> int:
    return len(fanout().groups.get(f"room.{slug}", ()))


async def test_every_room_starts_its_own_epoch(demo):
    epochs = [e async for e in Room.objects.values_list("epoch", flat=True)]
    assert len(epochs) == 2 and len(set(epochs)) == 2
    assert all(len(e) == 8 and int(e, 16) >= 0 for e in epochs)


async def test_a_resume_in_the_same_epoch_replays(cookies, demo):
    await post(demo["alice"], "one", "e1")
    await post(demo["alice"], "two", "e2")
    async with socket(cookies["bob"]) as bob:
        await bob.send_json_to({"type": "subscribe", "room": "general", "ref": "r", "since": 1,
                                "epoch": await epoch(), "presence": False})
        assert (await bob.receive_json_from(timeout=5))["body"] == "two"
        assert await bob.receive_json_from(timeout=5) == {
            "type": "ack", "ref": "r", "room": "general", "seq": 2, "epoch": await epoch(), "replayed": 1}


async def test_a_resume_from_another_epoch_is_recovery_failed_and_joins_nothing(cookies, demo):
    await post(demo["alice"], "one", "e1")
    async with socket(cookies["bob"]) as bob:
        reply = await call(bob, {"type": "subscribe", "room": "general", "ref": "r", "since": 1,
                                 "epoch": "0ld0ld00", "presence": False})
        assert reply == {"type": "error", "ref": "r", "code": "recovery_failed",
                         "message": f"the room's log was started again (epoch {await epoch()}, not 0ld0ld00)"}
        assert subscriber_count("general") == 0
        await post(demo["alice"], "after", "e2")
        await assert_quiet(bob)  # not subscribed: nothing of the room arrives
        # The client's answer: subscribe afresh, from the head it reloaded.
        assert await subscribe(bob, "general", since=None) == []


async def test_an_epoch_without_since_is_ignored(cookies, demo):
    """No seq to resume from, nothing to check: the subscribe goes live from the head."""
    async with socket(cookies["bob"]) as bob:
        reply = await call(bob, {"type": "subscribe", "room": "general", "ref": "r", "epoch": "other", "presence": False})
        assert reply == {"type": "ack", "ref": "r", "room": "general", "seq": 0, "epoch": await epoch(), "replayed": 0}


async def test_a_malformed_epoch_is_invalid(cookies, demo):
    async with socket(cookies["bob"]) as bob:
        reply = await call(bob, {"type": "subscribe", "room": "general", "ref": "r", "since": 0, "epoch": "no-dashes"})
        assert (reply["type"], reply["code"], reply["ref"]) == ("error", "invalid", "r")
        assert subscriber_count("general") == 0


async def test_reset_epoch_tells_live_subscribers_to_reload(cookies, demo):
    old = await epoch()
    async with socket(cookies["bob"]) as bob, socket(cookies["carol"]) as carol:
        await subscribe(bob, "general")
        await subscribe(carol, "general")
        output = await reset("general")
        new = await epoch()
        assert new != old and output == f"general: epoch {old} -> {new}\n"
        for sock in (bob, carol):
            assert await sock.receive_json_from(timeout=5) == {
                "type": "error", "code": "recovery_failed", "room": "general",
                "message": f"the room's log was started again (epoch {new}); reload it and subscribe again"}
        # The subscription is gone: the room's next event reaches neither.
        await post(demo["alice"], "after the reset", "r1")
        await assert_quiet(bob)
        await assert_quiet(carol)
        # Resuming with the old epoch fails; with the new one it replays.
        reply = await call(bob, {"type": "subscribe", "room": "general", "ref": "o", "since": 0, "epoch": old,
                                 "presence": False})
        assert (reply["code"], reply["ref"]) == ("recovery_failed", "o")
        await bob.send_json_to({"type": "subscribe", "room": "general", "ref": "n", "since": 0, "epoch": new,
                                "presence": False})
        assert (await bob.receive_json_from(timeout=5))["body"] == "after the reset"
        assert (await bob.receive_json_from(timeout=5))["epoch"] == new


async def test_reset_epoch_leaves_other_rooms_alone(cookies, demo):
    ops = await epoch("ops")
    async with socket(cookies["alice"]) as alice:
        await subscribe(alice, "ops")
        await reset("general")
        assert await epoch("ops") == ops
        await assert_quiet(alice)


async def test_reset_epoch_needs_rooms_or_all(demo):
    with pytest.raises(CommandError, match="name the rooms, or give --all"):
        await reset()
    with pytest.raises(CommandError, match="no such room: nope"):
        await reset("nope")
    before = {r.slug: r.epoch async for r in Room.objects.all()}
    await reset("--all")
    after = {r.slug: r.epoch async for r in Room.objects.all()}
    assert set(after) == set(before) and all(after[s] != before[s] for s in before)


async def test_a_room_made_anew_has_another_epoch(cookies, demo):
    """Deleted and made again under the same slug: seqs start over, and a client
    holding the old room's seq must not resume into the new one."""
    for i in range(3):
        await post(demo["alice"], f"m{i}", f"old{i}")
    old = await epoch()
    room = await Room.objects.aget(slug="general")
    await room.adelete()
    await Room.objects.acreate(slug="general", title="General again", is_public=True)
    await post(demo["alice"], "new room", "new0")
    assert await epoch() != old
    async with socket(cookies["bob"]) as bob:
        reply = await call(bob, {"type": "subscribe", "room": "general", "ref": "r", "since": 0, "epoch": old,
                                 "presence": False})
        assert reply["code"] == "recovery_failed"


async def test_history_and_event_pages_carry_the_epoch(cookies, demo):
    await post(demo["alice"], "one", "e1")
    current = await epoch()
    status, page = await get(cookies["bob"], "/api/v1/rooms/general/messages/")
    assert (status, page["seq"], page["epoch"]) == (200, 1, current)
    status, page = await get(cookies["bob"], f"/api/v1/rooms/general/events/?since=0&epoch={current}")
    assert (status, [e["body"] for e in page["events"]], page["epoch"]) == (200, ["one"], current)
    status, page = await get(cookies["bob"], "/api/v1/rooms/general/events/?since=0&epoch=0ld0ld00")
    assert (status, page) == (410, {"code": "recovery_failed",
                                    "message": f"the room's log was started again (epoch {current}, not 0ld0ld00)"})
    status, page = await get(cookies["bob"], "/api/v1/rooms/general/events/?since=0&epoch=a-b")
    assert (status, page["code"]) == (400, "invalid")


async def test_a_held_long_poll_ends_with_recovery_failed_when_the_log_is_reset(cookies, demo):
    current = await epoch()
    poll = asyncio.ensure_future(get(cookies["bob"], f"/api/v1/rooms/general/events/?since=0&epoch={current}&wait=25"))
    # The poll is held: its waiter joined the room.
    await until(lambda: subscriber_count("general") > 0 or poll.done(), what="the poll waiting")
    assert not poll.done()
    await reset("general")
    status, body = await poll
    assert (status, body["code"]) == (410, "recovery_failed")
