"""Membership changes made over REST, seen live: the room's subscribers get each
member event with its seq, a resume replays them, and a member removed from a
private room loses its stream (socket and long poll) at once. On the in-memory and
the Redis transport."""

from __future__ import annotations

import asyncio
import json

import pytest
from asgiref.sync import sync_to_async
from channels.testing import HttpCommunicator
from django.test import Client

from realtime.models import Room
from tests.conftest import HOST, assert_quiet, call, socket, subscribe, until

pytestmark = [pytest.mark.asyncio, pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("layer")]
JSON = "application/json"


def do(client: Client, method: str, path: str, body: dict | None = None):
    """A REST call from async code, on a thread as a worker would run it."""
    kwargs = {"content_type": JSON} if body is not None else {}
    args = (path, body) if body is not None else (path,)
    return sync_to_async(getattr(client, method))(*args, **kwargs)


async def next_event(comm) -> dict:
    return await comm.receive_json_from(timeout=5)


NOT_FOUND = {"type": "error", "code": "not_found", "message": "no such room", "room": "ops"}


def changed(change: str, room: str = "ops") -> dict:
    return {"type": "rooms.changed", "room": room, "change": change}


async def next_frames(comm, n: int) -> list[dict]:
    """The next n frames, by type: a stream's end (after a read of access) and the
    rooms.changed push (sent at once) may come in either order."""
    return sorted([await next_event(comm) for _ in range(n)], key=lambda f: f["type"])


async def test_member_events_reach_the_rooms_subscribers_live(cookies, clients):
    async with socket(cookies["bob"]) as bob:
        await subscribe(bob, "general")
        res = await do(clients["alice"], "patch", "/api/v1/rooms/general/members/carol/", {"role": "member"})
        assert res.status_code == 200
        assert await next_event(bob) == {"type": "member.role", "room": "general", "seq": 1, "user": "carol",
                                         "role": "member", "by": "alice"}
        res = await do(clients["admin"], "post", "/api/v1/rooms/general/join/")
        assert res.json()["seq"] == 2
        assert await next_event(bob) == {"type": "member.joined", "room": "general", "seq": 2, "user": "admin",
                                         "role": "member"}
        res = await do(clients["admin"], "post", "/api/v1/rooms/general/leave/")
        assert await next_event(bob) == {"type": "member.left", "room": "general", "seq": 3, "user": "admin"}
        # A refused change sends nothing.
        res = await do(clients["carol"], "delete", "/api/v1/rooms/general/members/bob/")
        assert res.status_code == 403
        await assert_quiet(bob)


async def test_a_resume_replays_the_member_events(cookies, clients):
    async with socket(cookies["bob"]) as bob:
        await subscribe(bob, "general")
    await do(clients["alice"], "patch", "/api/v1/rooms/general/members/carol/", {"role": "member"})
    await do(clients["admin"], "post", "/api/v1/rooms/general/join/")
    async with socket(cookies["bob"]) as bob:
        replayed = await subscribe(bob, "general", since=0)
        assert replayed == [
            {"type": "member.role", "room": "general", "seq": 1, "user": "carol", "role": "member", "by": "alice"},
            {"type": "member.joined", "room": "general", "seq": 2, "user": "admin", "role": "member"},
        ]


async def test_a_removed_member_loses_the_private_rooms_stream_at_once(cookies, clients):
    async with socket(cookies["bob"]) as bob, socket(cookies["alice"]) as alice:
        await subscribe(bob, "ops")
        await subscribe(alice, "ops")
        res = await do(clients["alice"], "delete", "/api/v1/rooms/ops/members/bob/")
        assert res.json() == {"room": "ops", "user": "bob", "role": None, "seq": 1}
        assert await next_frames(bob, 2) == [NOT_FOUND, changed("removed")]
        # The others see the change; bob, no longer following, does not.
        assert await next_event(alice) == {"type": "member.left", "room": "ops", "seq": 1, "user": "bob",
                                           "by": "alice"}
        reply = await call(alice, {"type": "message.send", "room": "ops", "body": "secret", "client_id": "s1",
                                   "ref": 1})
        assert reply["type"] == "ack"
        await assert_quiet(bob)
        # Subscribing again is refused as for any room bob cannot see.
        again = await call(bob, {"type": "subscribe", "room": "ops", "ref": 2})
        assert again == {"type": "error", "ref": 2, "code": "not_found", "message": "no such room"}


async def test_leaving_a_private_room_ends_ones_own_stream(cookies, clients):
    async with socket(cookies["bob"]) as bob:
        await subscribe(bob, "ops")
        res = await do(clients["bob"], "post", "/api/v1/rooms/ops/leave/")
        assert res.status_code == 200
        assert await next_frames(bob, 2) == [NOT_FOUND, changed("removed")]
        await assert_quiet(bob)


async def test_a_member_added_to_a_private_room_may_follow_it(cookies, clients):
    async with socket(cookies["carol"]) as carol:
        refused = await call(carol, {"type": "subscribe", "room": "ops", "ref": 1})
        assert refused["code"] == "not_found"
        await do(clients["alice"], "post", "/api/v1/rooms/ops/members/", {"username": "carol"})
        # Her pages hear of it at once (they ask for their room list again).
        assert await next_event(carol) == changed("added")
        replayed = await subscribe(carol, "ops", since=0)
        assert replayed == [{"type": "member.joined", "room": "ops", "seq": 1, "user": "carol", "role": "member",
                             "by": "alice"}]


async def get(cookie: bytes, path: str, timeout: float = 5) -> tuple[int, dict]:
    from project.asgi import application

    path, _, query = path.partition("?")
    comm = HttpCommunicator(application, "GET", path, headers=[HOST, (b"cookie", cookie)])
    comm.scope["query_string"] = query.encode()
    res = await comm.get_response(timeout=timeout)
    return res["status"], json.loads(res["body"])


async def test_a_removed_members_long_poll_ends_with_not_found(cookies, clients):
    from realtime.delivery.fanout import fanout
    from realtime.web.longpoll import Waiter

    def held() -> bool:
        return any(isinstance(c, Waiter) for c in fanout().groups.get("room.ops", ()))

    head = (await Room.objects.aget(slug="ops")).last_seq
    poll = asyncio.ensure_future(get(cookies["bob"], f"/api/v1/rooms/ops/events/?since={head}&wait=25"))
    await until(lambda: held() or poll.done(), what="the poll waiting")
    assert not poll.done(), "nothing new: the request is held"
    res = await do(clients["alice"], "delete", "/api/v1/rooms/ops/members/bob/")
    assert res.status_code == 200
    assert await poll == (404, {"code": "not_found", "message": "no such room"})


async def test_the_member_event_alone_ends_the_stream_when_the_access_check_is_lost(cookies, clients, monkeypatch):
    """The access.check the membership's signal sends may come after the event
    (it is another publication) or be lost: the member.left about this user makes
    the socket read its access before sending it or anything later."""
    from realtime.delivery import publish

    monkeypatch.setattr(publish, "access_check_on_commit", lambda slug: None)
    async with socket(cookies["bob"]) as bob, socket(cookies["alice"]) as alice:
        await subscribe(bob, "ops")
        await subscribe(alice, "ops")
        await do(clients["alice"], "delete", "/api/v1/rooms/ops/members/bob/")
        assert await next_frames(bob, 2) == [NOT_FOUND, changed("removed")]
        assert (await next_event(alice))["type"] == "member.left"
        await call(alice, {"type": "message.send", "room": "ops", "body": "secret", "client_id": "s2", "ref": 1})
        await assert_quiet(bob)


async def test_a_demoted_member_keeps_the_stream_and_sees_the_change(cookies, clients):
    async with socket(cookies["bob"]) as bob:
        await subscribe(bob, "ops")
        await do(clients["alice"], "patch", "/api/v1/rooms/ops/members/bob/", {"role": "reader"})
        assert await next_event(bob) == {"type": "member.role", "room": "ops", "seq": 1, "user": "bob",
                                         "role": "reader", "by": "alice"}
        refused = await call(bob, {"type": "message.send", "room": "ops", "body": "x", "client_id": "r1", "ref": 1})
        assert (refused["type"], refused["code"]) == ("error", "forbidden")


async def test_nothing_of_the_room_overtakes_a_pending_access_check(cookies, demo, monkeypatch):
    """While a socket reads its access to a room again (an access.check: here a
    membership deleted in the admin, no member event), the room's live events wait
    behind the check instead of taking the fast path: a message posted in that
    moment (here: during the read itself) never reaches the removed member."""
    from asgiref.sync import async_to_sync

    from realtime.delivery import publish
    from realtime.domain import services
    from realtime.models import Membership
    from realtime.ws import stream

    real, posted = stream.room_access, []

    def access_with_a_post_meanwhile(**kwargs):
        if kwargs["user"].get_username() == "bob" and not posted:
            _, events = services.message_send(user=demo["alice"], slug="ops", body="secret", client_id="pending")
            async_to_sync(publish.publish)(events)
            posted.append(events[0].seq)
        return real(**kwargs)

    async with socket(cookies["bob"]) as bob:
        await subscribe(bob, "ops")
        monkeypatch.setattr(stream, "room_access", access_with_a_post_meanwhile)
        await Membership.objects.filter(room__slug="ops", user=demo["bob"]).adelete()
        assert await next_frames(bob, 2) == [NOT_FOUND, changed("removed")]
        assert posted == [1]
        await assert_quiet(bob)


async def test_a_persons_pages_hear_at_once_that_their_room_list_changed(cookies, clients):
    """rooms.changed to the person's own sockets (every tab, subscribed to the room
    or not): added by someone, a DM opened with them, a room made or joined in
    another tab, removed; nothing to anyone else, nothing for a refused change or
    a role change."""
    async with socket(cookies["carol"]) as carol, socket(cookies["carol"]) as other_tab, \
            socket(cookies["bob"]) as bob:
        res = await do(clients["alice"], "post", "/api/v1/rooms/ops/members/", {"username": "carol"})
        assert res.status_code == 201
        assert await next_event(carol) == changed("added")
        assert await next_event(other_tab) == changed("added")
        await do(clients["alice"], "patch", "/api/v1/rooms/ops/members/carol/", {"role": "reader"})
        res = await do(clients["carol"], "delete", "/api/v1/rooms/ops/members/alice/")
        assert res.status_code == 403
        res = await do(clients["alice"], "delete", "/api/v1/rooms/ops/members/carol/")
        assert res.status_code == 200
        assert await next_event(carol) == changed("removed")
        res = await do(clients["bob"], "post", "/api/v1/dms/", {"users": ["carol"]})
        dm = res.json()["slug"]
        assert [await next_event(carol), await next_event(bob)] == [changed("added", dm)] * 2
        # Asking for the same DM again changes nothing.
        await do(clients["bob"], "post", "/api/v1/dms/", {"users": ["carol"]})
        res = await do(clients["carol"], "post", "/api/v1/rooms/", {"name": "Carol's corner", "visibility": "public"})
        corner = res.json()["slug"]
        assert await next_event(carol) == changed("added", corner)
        assert [await next_event(other_tab) for _ in range(3)] == [
            changed("removed"), changed("added", dm), changed("added", corner)]
        # (Published after anything the second DM ask could have sent bob.)
        await assert_quiet(bob)
        await assert_quiet(other_tab)
