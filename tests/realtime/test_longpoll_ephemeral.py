"""What a long-polling page sees and shows besides events: presence, typing and read
markers (issue 17, defect 7), on the in-memory and the Redis layer.

A poll with `client=<page id>` makes the page present in the room (a lease of the
wait plus POLL_GRACE, renewed by each poll) and its answer carries `ephemeral`:
presence.state when the page's `presence_tag` is not the room's, read.markers on
the first poll, then the typing and read.marker pushes collected while held (or
parked between two polls)."""

from __future__ import annotations

import asyncio
import json

import pytest
from asgiref.testing import ApplicationCommunicator
from channels.testing import HttpCommunicator
from django.test import AsyncClient

from realtime.delivery import publish as broadcast
from realtime.delivery.fanout import fanout
from realtime.models import Membership
from realtime.protocol import TypingNotice
from realtime.state import presence
from realtime.web import longpoll
from realtime.web.longpoll import Waiter
from tests.conftest import HOST, call, presence_settled, socket, until

pytestmark = [pytest.mark.asyncio, pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("layer")]

PAGE = "page-alice-0001"  # alice's page's poll id
OTHER = "page-admin-0001"


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    monkeypatch.setattr(presence, "GRACE", 0.2)
    monkeypatch.setattr(presence, "FIRST", 0.05)
    monkeypatch.setattr(presence, "EVERY", 0.2)
    presence.backend.reset()
    presence._typing.clear()
    longpoll.PARKED.clear()
    yield
    longpoll.PARKED.clear()
    presence.backend.reset()


def events_path(slug: str, since: int, wait: int, client: str | None = None, known: str | None = None) -> str:
    path = f"/api/v1/rooms/{slug}/events/?since={since}&wait={wait}"
    if client:
        path += f"&client={client}"
    if known:
        path += f"&presence_tag={known}"
    return path


async def get(cookie: bytes, path: str, timeout: float = 5) -> tuple[int, dict]:
    from project.asgi import application

    path, _, query = path.partition("?")
    comm = HttpCommunicator(application, "GET", path, headers=[HOST, (b"cookie", cookie)])
    comm.scope["query_string"] = query.encode()
    res = await comm.get_response(timeout=timeout)
    return res["status"], json.loads(res["body"])


def held(slug: str, conn_id: str) -> bool:
    """A poll of that page holds (or has parked) its waiter in the room's group."""
    return any(isinstance(c, Waiter) and c.conn_id == conn_id for c in fanout().groups.get(f"room.{slug}", ()))


def holding(slug: str, client: str) -> bool:
    """That page's poll is held right now (not answered, not parked)."""
    return any(w.room == slug and w.conn_id == f"poll-{client}" for w in longpoll.HELD)


async def start(cookie: bytes, slug: str, since: int, client: str, known: str | None, wait: int = 25):
    """A poll held in a task: (task, its answer later)."""
    task = asyncio.ensure_future(get(cookie, events_path(slug, since, wait, client, known), timeout=wait + 5))
    await until(lambda: holding(slug, client) or task.done(), what="the poll held")
    return task


async def first(cookie: bytes, slug: str = "general", client: str = PAGE) -> dict:
    """A page's first poll: answered at once with the room's presence."""
    status, body = await get(cookie, events_path(slug, 0, 25, client), timeout=3)
    assert status == 200, body
    return body


async def pushes(comm, wait: float = 0.3) -> list[dict]:
    found = []
    while not await comm.receive_nothing(timeout=wait):
        found.append(await comm.receive_json_from())
    return found


async def join(comm, room: str = "general") -> list[str]:
    """Subscribe with presence: the users of the presence.state (once the diff of
    this arrival, which this socket hears too, has come)."""
    await comm.send_json_to({"type": "subscribe", "room": room, "ref": "s"})
    users = None
    while True:
        frame = await comm.receive_json_from(timeout=5)
        if frame["type"] == "presence.state":
            users = frame["users"]
        if frame.get("ref") == "s":
            assert frame["type"] == "ack", frame
            await presence_settled(room)
            await pushes(comm, wait=0.2)
            return users


async def head(slug: str = "general") -> int:
    from realtime.models import Room

    return (await Room.objects.aget(slug=slug)).last_seq


async def rest(user):
    client = AsyncClient()
    await client.aforce_login(user)
    return client


async def test_a_poller_and_a_socket_user_see_each_other_here(cookies, demo):
    seq = await head()
    async with socket(cookies["bob"]) as bob:
        assert await join(bob) == ["bob"]
        body = await first(cookies["alice"])
        tag = presence.tag(presence.Page(["alice", "bob"], 2))
        assert body == {"events": [], "seq": seq, "epoch": body["epoch"], "has_more": False, "presence_tag": tag,
                        "ephemeral": [{"type": "presence.state", "room": "general", "users": ["alice", "bob"],
                                       "count": 2}]}
        assert await pushes(bob) == [{"type": "presence.diff", "room": "general", "joins": ["alice"], "leaves": [],
                                      "count": 2}]
        # The next poll says what it has: no news is held, not answered.
        poll = await start(cookies["alice"], "general", seq, PAGE, tag)
        assert not poll.done()
        # Someone comes: the held poll answers with the room's new presence.
        async with socket(cookies["carol"]) as carol:
            assert await join(carol) == ["alice", "bob", "carol"]
            status, body = await poll
            assert status == 200 and body["events"] == []
            assert body["ephemeral"] == [{"type": "presence.state", "room": "general",
                                          "users": ["alice", "bob", "carol"], "count": 3}]
            assert body["presence_tag"] == presence.tag(presence.Page(["alice", "bob", "carol"], 3))


async def test_a_poller_leaves_when_its_ttl_runs_out_or_at_once_when_it_hangs_up(cookies, demo, clock, monkeypatch):
    monkeypatch.setattr(presence, "SWEEP", 0.1)
    async with socket(cookies["bob"]) as bob:
        await join(bob)
        await get(cookies["alice"], events_path("general", 0, 2, PAGE), timeout=3)  # and no poll after it
        assert await pushes(bob) == [{"type": "presence.diff", "room": "general", "joins": ["alice"], "leaves": [], "count": 2}]
        clock.advance(2 + longpoll.POLL_GRACE - 1)
        assert (await presence.page("general")).users == ["alice", "bob"], "still within the wait and the grace"
        clock.advance(2)
        assert await bob.receive_json_from(timeout=3) == {
            "type": "presence.diff", "room": "general", "joins": [], "leaves": ["alice"], "count": 1}
        # A page that hangs up its held poll (closed, or back on a socket) leaves at once.
        body = await first(cookies["alice"])
        assert await pushes(bob) == [{"type": "presence.diff", "room": "general", "joins": ["alice"], "leaves": [], "count": 2}]
        from project.asgi import application

        comm = ApplicationCommunicator(application, {
            "type": "http", "method": "GET", "path": "/api/v1/rooms/general/events/", "headers": [
                HOST, (b"cookie", cookies["alice"])],
            "query_string": f"since={body['seq']}&wait=25&client={PAGE}&presence_tag={body['presence_tag']}".encode()})
        await comm.send_input({"type": "http.request", "body": b""})
        await until(lambda: holding("general", PAGE), what="the poll held")
        await comm.send_input({"type": "http.disconnect"})
        await comm.wait(timeout=3)
        clock.advance(presence.GRACE)  # (the leave's grace runs on the presence clock)
        assert await bob.receive_json_from(timeout=3) == {
            "type": "presence.diff", "room": "general", "joins": [], "leaves": ["alice"], "count": 1}
        assert not held("general", f"poll-{PAGE}"), "its waiter left the room's group"


async def test_typing_reaches_pollers_from_sockets_and_sockets_and_pollers_from_pollers(cookies, demo):
    seq = await head()
    async with socket(cookies["bob"]) as bob:
        await join(bob)
        await first(cookies["alice"])
        tag = (await first(cookies["admin"], client=OTHER))["presence_tag"]
        assert tag == presence.tag(presence.Page(["admin", "alice", "bob"], 3))
        await pushes(bob)
        # A socket user types: the held poll answers with it.
        poll = await start(cookies["alice"], "general", seq, PAGE, tag)
        assert await call(bob, {"type": "typing", "room": "general", "ref": "t"}) == {
            "type": "ack", "ref": "t", "room": "general", "sent": True}
        status, body = await poll
        assert (status, body["events"], body["ephemeral"]) == (200, [], [{"type": "typing", "room": "general",
                                                                          "user": "bob"}])
        # The other poller, between polls meanwhile, has it in its next answer.
        status, body = await get(cookies["admin"], events_path("general", seq, 25, OTHER, tag), timeout=3)
        assert body["ephemeral"] == [{"type": "typing", "room": "general", "user": "bob"}]
        # A poller types over REST: the socket user and the other poller hear it, the typist does not.
        mine = await start(cookies["alice"], "general", seq, PAGE, tag, wait=2)
        theirs = await start(cookies["admin"], "general", seq, OTHER, tag)
        res = await (await rest(demo["alice"])).post("/api/v1/rooms/general/typing/")
        assert (res.status_code, res.json()) == (200, {"room": "general", "sent": True})
        assert await pushes(bob) == [{"type": "typing", "room": "general", "user": "alice"}]
        status, body = await theirs
        assert body["ephemeral"] == [{"type": "typing", "room": "general", "user": "alice"}]
        # The throttle is the socket's: a second notice within 2 s is not sent.
        res = await (await rest(demo["alice"])).post("/api/v1/rooms/general/typing/")
        assert res.json() == {"room": "general", "sent": False}
        status, body = await mine  # when its wait ends
        assert (status, body["ephemeral"]) == (200, []), "the typist's poll never hears its own typing"


async def test_typing_over_rest_obeys_the_sockets_rules(cookies, demo, settings):
    carol = await rest(demo["carol"])  # a reader of general
    res = await carol.post("/api/v1/rooms/general/typing/")
    assert (res.status_code, res.json()["code"]) == (403, "forbidden")
    res = await carol.post("/api/v1/rooms/ops/typing/")
    assert (res.status_code, res.json()) == (404, {"code": "not_found", "message": "no such room"})
    settings.REALTIME = {**settings.REALTIME, "RATE_LIMITS": {**settings.REALTIME["RATE_LIMITS"], "typing": (1, 2)}}
    alice = await rest(demo["alice"])
    assert [(await alice.post("/api/v1/rooms/general/typing/")).status_code for _ in range(3)] == [200, 200, 429]


async def test_a_poller_sees_read_markers_and_its_reads_reach_sockets(cookies, demo):
    async with socket(cookies["alice"]) as alice_ws:
        for i in range(3):
            await call(alice_ws, {"type": "message.send", "room": "general", "body": f"m{i}", "client_id": f"rm{i}",
                                  "ref": i})
    seq = await head()
    async with socket(cookies["bob"]) as bob:
        await join(bob)
        assert (await call(bob, {"type": "read", "room": "general", "seq": 1, "ref": "r"}))["seq"] == 1
        # The first poll has everyone's read position, as a subscribe does.
        body = await first(cookies["alice"])
        assert body["ephemeral"][1:] == [{"type": "read.markers", "room": "general", "markers": {"bob": 1}}]
        await pushes(bob)
        poll = await start(cookies["alice"], "general", seq, PAGE, body["presence_tag"])
        await call(bob, {"type": "read", "room": "general", "seq": 3, "ref": "r2"})
        status, body = await poll
        assert body["ephemeral"] == [{"type": "read.marker", "room": "general", "user": "bob", "seq": 3}]
        # The poller's own read (REST) reaches the socket user as a marker.
        res = await (await rest(demo["alice"])).post("/api/v1/rooms/general/read/", {"seq": 2},
                                                     content_type="application/json")
        assert res.status_code == 200
        assert await pushes(bob) == [{"type": "read.marker", "room": "general", "user": "alice", "seq": 2}]


async def test_what_comes_between_two_polls_is_in_the_next(cookies, demo):
    seq = await head()
    async with socket(cookies["bob"]) as bob:
        await join(bob)
        tag = (await first(cookies["alice"]))["presence_tag"]
        assert held("general", f"poll-{PAGE}"), "the answered poll's waiter is parked for the next"
        await call(bob, {"type": "typing", "room": "general", "ref": "t"})  # while alice has no poll
        status, body = await get(cookies["alice"], events_path("general", seq, 25, PAGE, tag), timeout=3)
        assert body["ephemeral"] == [{"type": "typing", "room": "general", "user": "bob"}]


async def test_a_typing_flood_wakes_a_poll_once_per_coalescing_window(cookies, demo, monkeypatch):
    monkeypatch.setattr(longpoll, "COALESCE", 0.25)
    seq = await head()
    tag = (await first(cookies["alice"]))["presence_tag"]
    stop = asyncio.Event()
    sent = 0

    async def flood():
        nonlocal sent
        while not stop.is_set():
            await broadcast.publish_push("room.general", TypingNotice(room="general", user=f"u{sent % 80}"),
                                         room="general")
            sent += 1
            await asyncio.sleep(0.002)

    flooding = asyncio.ensure_future(flood())
    loop = asyncio.get_running_loop()
    began, answers = loop.time(), 0
    while loop.time() - began < 1.0:
        status, body = await get(cookies["alice"], events_path("general", seq, 25, PAGE, tag), timeout=3)
        assert status == 200 and body["events"] == []
        answers += 1
        assert 1 <= len(body["ephemeral"]) <= longpoll.MAX_EPHEMERAL
        users = [f["user"] for f in body["ephemeral"]]
        assert len(users) == len(set(users)), "the newest notice per typist only"
    elapsed = loop.time() - began
    stop.set()
    await flooding
    assert sent > 100
    assert answers <= elapsed / longpoll.COALESCE + 1, (answers, sent)


async def test_a_removed_member_gets_nothing_ephemeral(cookies, demo):
    seq = await head("ops")
    async with socket(cookies["alice"]) as alice:
        await join(alice, "ops")
        tag = (await first(cookies["bob"], "ops"))["presence_tag"]
        assert tag == presence.tag(presence.Page(["alice", "bob"], 2))
        await pushes(alice)
        # Bob is removed while between polls; alice types and reads meanwhile.
        await Membership.objects.filter(room__slug="ops", user=demo["bob"]).adelete()
        await call(alice, {"type": "typing", "room": "ops", "ref": "t"})
        status, body = await get(cookies["bob"], events_path("ops", seq, 25, PAGE, tag), timeout=3)
        assert (status, body) == (404, {"code": "not_found", "message": "no such room"})
        async def alice_alone():
            return (await presence.page("ops")).users == ["alice"]

        await until(alice_alone, what="bob no longer here (after the leave's grace)")
        assert not held("ops", f"poll-{PAGE}")


async def test_a_bad_client_or_tag_is_invalid_and_a_poll_without_client_is_as_before(cookies, demo):
    for query in ("client=short", "client=" + "x" * 65, f"client={PAGE}&presence_tag=NOTHEX", "client=a%20b%20c%20d%20e"):
        status, body = await get(cookies["alice"], f"/api/v1/rooms/general/events/?since=0&wait=5&{query}")
        assert (status, body["code"]) == (400, "invalid"), query
    status, body = await get(cookies["alice"], events_path("general", await head(), 1))
    assert "ephemeral" not in body and "presence_tag" not in body
    assert (await presence.page("general")).users == [], "a poll without client is nobody"


async def test_a_page_that_says_goodbye_leaves_at_once_with_no_poll_held(cookies, demo):
    """Closing between two polls, no hang-up tells the server: the page's goodbye
    (sent as it unloads, or when it goes back to a socket) does."""
    async with socket(cookies["bob"]) as bob:
        await join(bob)
        await first(cookies["alice"])  # present, and no poll after it
        assert await pushes(bob) == [{"type": "presence.diff", "room": "general", "joins": ["alice"], "leaves": [],
                                      "count": 2}]
        alice = await rest(demo["alice"])
        path = "/api/v1/rooms/general/presence/leave/"
        bad = await alice.post(path, {"client": "no"}, content_type="application/json")
        assert (bad.status_code, bad.json()["code"]) == (400, "invalid")
        assert await pushes(bob) == []
        goodbye = await alice.post(path, {"client": PAGE}, content_type="application/json")
        assert goodbye.status_code == 204
        assert await bob.receive_json_from(timeout=3) == {
            "type": "presence.diff", "room": "general", "joins": [], "leaves": ["alice"], "count": 1}
        # Again, or from someone who was never here: nothing changes.
        assert (await alice.post(path, {"client": PAGE}, content_type="application/json")).status_code == 204
        carol = await rest(demo["carol"])
        assert (await carol.post(path, {"client": PAGE}, content_type="application/json")).status_code == 204
        assert await pushes(bob, wait=0.6) == []
        assert (await presence.page("general")).users == ["bob"]
