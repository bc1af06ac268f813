"""Long polling (GET /api/v1/rooms/<slug>/events/?since=N&wait=S), on the in-memory
and the Redis channel layer."""

from __future__ import annotations

import asyncio
import json

import pytest
from channels.testing import HttpCommunicator

from realtime.delivery.fanout import fanout
from realtime.domain import services
from realtime.models import Room
from realtime.web.longpoll import Waiter
from tests.conftest import HOST, epoch, until

pytestmark = [pytest.mark.asyncio, pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("layer")]


async def get(cookie: bytes | None, path: str, timeout: float = 5) -> tuple[int, dict, dict]:
    from project.asgi import application

    headers = [HOST] + ([(b"cookie", cookie)] if cookie else [])
    path, _, query = path.partition("?")
    comm = HttpCommunicator(application, "GET", path, headers=headers)
    comm.scope["query_string"] = query.encode()
    res = await comm.get_response(timeout=timeout)
    return res["status"], json.loads(res["body"]), dict(res["headers"])


async def head(slug: str = "general") -> int:
    return (await Room.objects.aget(slug=slug)).last_seq


def held(slug: str) -> bool:
    """A poll of the room is held: its waiter has joined the room's group in this
    worker's fan-out."""
    return any(isinstance(c, Waiter) for c in fanout().groups.get(f"room.{slug}", ()))


async def post(user, body: str, client_id: str, slug: str = "general"):
    return await services.perform(services.message_send, user=user, slug=slug, body=body, client_id=client_id)


async def test_a_poll_is_held_until_an_event_arrives(cookies, demo):
    seq = await head()
    assert not held("general")
    poll = asyncio.ensure_future(get(cookies["bob"], f"/api/v1/rooms/general/events/?since={seq}&wait=25", timeout=4))
    await until(lambda: held("general") or poll.done(), what="the poll waiting")
    assert not poll.done(), "nothing new: the request is held"
    await post(demo["alice"], "wake up", "lp1")
    status, body, headers = await poll  # long before the 25 s wait ends
    assert status == 200
    assert [(e["type"], e["seq"], e["body"]) for e in body["events"]] == [("message.new", seq + 1, "wake up")]
    assert body["seq"] == seq + 1 and body["has_more"] is False
    assert headers[b"cache-control"] == b"no-store"


async def test_a_poll_behind_the_head_answers_at_once_in_pages(cookies, demo):
    seq = await head()
    for i in range(5):
        await post(demo["alice"], f"m{i}", f"page{i}")
    status, body, _ = await get(cookies["bob"], f"/api/v1/rooms/general/events/?since={seq}&wait=25&limit=3", timeout=2)
    assert status == 200 and [e["seq"] for e in body["events"]] == [seq + 1, seq + 2, seq + 3]
    assert body["has_more"] is True and body["seq"] == seq + 5
    status, body, _ = await get(cookies["bob"], f"/api/v1/rooms/general/events/?since={seq + 3}&wait=25", timeout=2)
    assert [e["body"] for e in body["events"]] == ["m3", "m4"] and body["has_more"] is False


async def test_a_quiet_room_answers_empty_when_the_wait_ends(cookies):
    seq = await head()
    status, body, _ = await get(cookies["bob"], f"/api/v1/rooms/general/events/?since={seq}&wait=1", timeout=4)
    assert (status, body) == (200, {"events": [], "seq": seq, "epoch": await epoch(), "has_more": False})


async def test_a_poll_obeys_the_same_rules_as_the_socket(cookies, demo):
    assert (await get(None, "/api/v1/rooms/general/events/?since=0&wait=5"))[0] == 401
    status, body, _ = await get(cookies["carol"], "/api/v1/rooms/ops/events/?since=0&wait=5")
    assert (status, body) == (404, {"code": "not_found", "message": "no such room"})
    status, body, _ = await get(cookies["bob"], "/api/v1/rooms/general/events/?since=x&wait=5")
    assert (status, body["code"]) == (400, "invalid")
    status, body, _ = await get(cookies["bob"], "/api/v1/rooms/general/events/?since=99999&wait=5")
    assert (status, body["code"]) == (410, "recovery_failed")


async def test_a_held_poll_ends_with_not_found_when_access_goes(cookies, demo):
    """A member removed from a private room while polling gets no more of it."""
    from realtime.models import Membership

    seq = await head("ops")
    assert not held("ops")
    poll = asyncio.ensure_future(get(cookies["bob"], f"/api/v1/rooms/ops/events/?since={seq}&wait=25", timeout=4))
    await until(lambda: held("ops") or poll.done(), what="the poll waiting")
    assert not poll.done(), "nothing new: the request is held"
    await Membership.objects.filter(room__slug="ops", user=demo["bob"]).adelete()
    await post(demo["alice"], "after bob left", "lp-ops")
    status, body, _ = await poll
    assert (status, body) == (404, {"code": "not_found", "message": "no such room"})


async def test_polls_are_rate_limited(cookies, demo, settings):
    settings.REALTIME = {**settings.REALTIME, "RATE_LIMITS": {**settings.REALTIME["RATE_LIMITS"], "poll": (1, 2)}}
    await post(demo["alice"], "something to read", "rl")
    seq = await head()
    path = f"/api/v1/rooms/general/events/?since={seq - 1}&wait=5"
    assert (await get(cookies["bob"], path))[0] == 200
    assert (await get(cookies["bob"], path))[0] == 200
    status, body, headers = await get(cookies["bob"], path)
    assert (status, body["code"]) == (429, "rate_limited") and body["retry_after"] > 0
    assert b"retry-after" in headers


async def test_without_wait_it_is_the_plain_rest_endpoint(cookies):
    seq = await head()
    status, body, _ = await get(cookies["bob"], f"/api/v1/rooms/general/events/?since={seq}", timeout=2)
    assert (status, body) == (200, {"events": [], "seq": seq, "epoch": await epoch(), "has_more": False})
