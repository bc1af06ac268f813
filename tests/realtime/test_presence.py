"""Presence, typing and read state: on the in-memory layer and on Redis (where the
state is shared by every worker, as two sockets of this process show)."""

from __future__ import annotations

import contextlib

import pytest
from django.test import Client

from realtime.state import presence
from realtime.models import Membership, ReadState
from tests.conftest import assert_quiet, call, presence_settled, socket, until

pytestmark = [pytest.mark.django_db(transaction=True)]


@pytest.fixture(params=["memory", "redis"])
def shared(request, settings, monkeypatch):
    """Presence, typing throttle and channel layer in memory, or all in Redis."""
    if request.param == "redis":
        server = request.getfixturevalue("redis_server")
        settings.REDIS_URL = server.url
        settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels_redis.core.RedisChannelLayer",
                                               "CONFIG": {"hosts": [{"address": server.url, "socket_timeout": None}]}}}
    else:
        settings.REDIS_URL = ""
        settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    monkeypatch.setattr(presence, "GRACE", 0.3)
    monkeypatch.setattr(presence, "FIRST", 0.05)  # the coalescing's own test keeps the real timing
    monkeypatch.setattr(presence, "EVERY", 0.2)
    presence.backend.reset()
    presence._typing.clear()
    yield request.param
    presence.backend.reset()
    if request.param == "redis":
        from asgiref.sync import async_to_sync
        from channels.layers import get_channel_layer

        import redis

        redis.Redis.from_url(settings.REDIS_URL).flushall()
        async_to_sync(get_channel_layer().flush)()


async def join(comm, room="general") -> dict:
    """Subscribe with presence; returns the presence.state once the room's diff
    about this arrival has gone (so the next arrival makes a diff of its own), and
    has reached this socket too (it is not skipped: see presence.py)."""
    await comm.send_json_to({"type": "subscribe", "room": room, "ref": "s"})
    state = None
    while True:
        frame = await comm.receive_json_from(timeout=5)
        if frame["type"] == "presence.state":
            state = frame
        if frame.get("ref") == "s":
            assert frame["type"] == "ack", frame
            await presence_settled(room)
            await pushes(comm, wait=0.2)
            return state


async def pushes(comm, wait: float = 0.5) -> list[dict]:
    found = []
    while not await comm.receive_nothing(timeout=wait):
        found.append(await comm.receive_json_from())
    return found


@pytest.mark.asyncio
async def test_presence_state_then_diffs_and_several_tabs_count_once(cookies, shared):
    async with socket(cookies["bob"]) as bob:
        assert await join(bob) == {"type": "presence.state", "room": "general", "users": ["bob"], "count": 1}
        async with socket(cookies["alice"]) as tab1:
            assert await join(tab1) == {"type": "presence.state", "room": "general", "users": ["alice", "bob"],
                                        "count": 2}
            assert await pushes(bob) == [{"type": "presence.diff", "room": "general", "joins": ["alice"], "leaves": [],
                                          "count": 2}]
            async with socket(cookies["alice"]) as tab2:
                assert (await join(tab2))["users"] == ["alice", "bob"]
                assert await pushes(bob) == [], "a second tab is no news"
            assert await pushes(bob) == [], "nor is closing one of two"
        # The last tab is gone: alice leaves, once, after the grace period.
        assert await pushes(bob, wait=1.5) == [{"type": "presence.diff", "room": "general", "joins": [], "leaves": ["alice"],
                                                "count": 1}]


@pytest.mark.asyncio
async def test_a_reload_within_the_grace_period_is_neither_a_leave_nor_a_join(cookies, shared, monkeypatch):
    monkeypatch.setattr(presence, "GRACE", 1.0)
    async with socket(cookies["bob"]) as bob:
        await join(bob)
        async with socket(cookies["alice"]) as before:
            await join(before)
        assert (await pushes(bob))[0]["joins"] == ["alice"]
        async with socket(cookies["alice"]) as after:  # the reloaded tab
            await join(after)
            assert await pushes(bob, wait=1.5) == []


@pytest.mark.asyncio
async def test_subscribers_without_presence_are_neither_counted_nor_told(cookies, shared):
    async with socket(cookies["bob"]) as bob, socket(cookies["alice"]) as bot:
        await join(bob)
        await call(bot, {"type": "subscribe", "room": "general", "ref": "s", "presence": False})
        assert await pushes(bob) == []
        async with socket(cookies["carol"]) as carol:
            await join(carol)
            assert await pushes(bot) == [], "no presence frames for a socket that opted out"


@pytest.mark.asyncio
async def test_a_crashed_sockets_presence_runs_out(cookies, shared, demo, monkeypatch):
    """What a worker killed with -9 leaves behind: leases nobody renews. The sweep of
    any worker with subscribers in the room announces the leave once they expire:
    the sweep runs by itself (every 0.2 s here), nothing calls it."""
    monkeypatch.setattr(presence, "SWEEP", 0.2)
    async with socket(cookies["bob"]) as bob:
        await join(bob)
        monkeypatch.setattr(presence, "TTL", 0.5)  # the dead socket's lease only
        await presence.join("general", demo["alice"].pk, "alice", "dead-conn")
        assert await bob.receive_json_from(timeout=3) == {
            "type": "presence.diff", "room": "general", "joins": ["alice"], "leaves": [], "count": 2}
        assert await bob.receive_json_from(timeout=3) == {
            "type": "presence.diff", "room": "general", "joins": [], "leaves": ["alice"], "count": 1}


@pytest.mark.asyncio
async def test_a_joiner_gets_the_count_and_a_first_page_and_pages_the_rest(cookies, shared, monkeypatch):
    """However big the room, a joiner is sent PAGE names and the count; presence.list
    pages the rest in name order, for a room the socket follows with presence only."""
    monkeypatch.setattr(presence, "PAGE", 2)
    for i, name in enumerate(["dan", "eve", "fay", "gus", "hal"]):
        await presence.join("general", 100 + i, name, f"c{i}")
    await presence_settled()
    async with socket(cookies["bob"]) as bob, socket(cookies["alice"]) as bot:
        assert await join(bob) == {"type": "presence.state", "room": "general", "users": ["bob", "dan"], "count": 6,
                                   "next": "dan"}
        await pushes(bob)  # (the five's diff, if it is still on its way)
        ask = {"type": "presence.list", "room": "general", "ref": "p"}
        assert await call(bob, {**ask, "after": "dan"}) == {
            "type": "presence.page", "ref": "p", "room": "general", "users": ["eve", "fay"], "count": 6, "next": "fay"}
        assert await call(bob, {**ask, "after": "fay"}) == {
            "type": "presence.page", "ref": "p", "room": "general", "users": ["gus", "hal"], "count": 6}
        assert await call(bob, ask) == {
            "type": "presence.page", "ref": "p", "room": "general", "users": ["bob", "dan"], "count": 6, "next": "dan"}
        # Not following the room with presence: nothing to page.
        await call(bot, {"type": "subscribe", "room": "general", "ref": "s", "presence": False})
        for who, room in ((bob, "ops"), (bot, "general")):
            refused = await call(who, {**ask, "room": room})
            assert (refused["type"], refused["code"]) == ("error", "not_found")
        bad = await call(bob, {**ask, "after": ""})
        assert (bad["type"], bad["code"]) == ("error", "invalid")


@pytest.mark.asyncio
async def test_a_burst_of_arrivals_is_one_diff_and_diffs_come_a_second_apart(cookies, shared, monkeypatch):
    """Coalesced per room: the first change waits FIRST for company, then a diff at
    most every EVERY seconds, with at most DIFF_NAMES names each way (partial: more
    came) and the count."""
    import asyncio

    monkeypatch.setattr(presence, "FIRST", 0.2)
    monkeypatch.setattr(presence, "EVERY", 1.0)
    monkeypatch.setattr(presence, "DIFF_NAMES", 3)
    async with socket(cookies["bob"]) as bob:
        await join(bob)
        for i in range(10):
            await presence.join("general", 200 + i, f"p{i:02}", f"c{i}")
        first = await bob.receive_json_from(timeout=3)
        sent = asyncio.get_running_loop().time()
        assert first == {"type": "presence.diff", "room": "general", "joins": ["p00", "p01", "p02"], "leaves": [],
                         "count": 11, "partial": True}
        for i in (10, 11):
            await presence.join("general", 200 + i, f"p{i}", f"c{i}")
        await presence.leave("general", 200, "p00", "c0")
        # p00's leave waits out its grace (0.3 s here), within the second diff's wait.
        assert await bob.receive_json_from(timeout=3) == {
            "type": "presence.diff", "room": "general", "joins": ["p10", "p11"], "leaves": ["p00"], "count": 12}
        assert asyncio.get_running_loop().time() - sent >= 0.9, "a second diff within EVERY of the first"
        assert await pushes(bob) == []


@pytest.mark.asyncio
async def test_typing_reaches_the_others_throttled_never_the_typist(cookies, shared):
    async with socket(cookies["bob"]) as bob, socket(cookies["alice"]) as alice, socket(cookies["alice"]) as alice2:
        for comm in (bob, alice, alice2):
            await join(comm)
        for comm in (bob, alice, alice2):
            await pushes(comm)  # presence, which is not what this is about
        acks = [await call(alice, {"type": "typing", "room": "general", "ref": i}) for i in range(10)]
        # One broadcast per 2 s however many frames; past the typing bucket's burst
        # the frames are refused outright (rate_limited).
        assert acks[0]["sent"] is True
        assert all(a.get("sent") is False or a.get("code") == "rate_limited" for a in acks[1:]), acks
        assert any(a.get("code") == "rate_limited" for a in acks)
        assert await pushes(bob) == [{"type": "typing", "room": "general", "user": "alice"}]
        assert await pushes(alice2) == [], "not the typist's own tabs"


@pytest.mark.asyncio
async def test_refused_typing_and_reads_broadcast_nothing(cookies, shared):
    async with socket(cookies["bob"]) as bob, socket(cookies["carol"]) as carol:
        await join(bob)
        await join(carol)
        await pushes(bob)
        await pushes(carol)  # (the room's diff of carol's arrival, which may still be on its way to her)
        reply = await call(carol, {"type": "typing", "room": "general", "ref": 1})  # a reader may not type
        assert (reply["type"], reply["code"]) == ("error", "forbidden")
        reply = await call(carol, {"type": "read", "room": "ops", "seq": 1, "ref": 2})  # a private room
        assert (reply["type"], reply["code"]) == ("error", "not_found")
        assert await pushes(bob) == []
        assert not await ReadState.objects.filter(room__slug="ops").aexists()


@pytest.mark.asyncio
async def test_read_moves_forward_only_is_clamped_and_reaches_own_tabs_and_markers(cookies, shared, demo):
    async with socket(cookies["alice"]) as alice:
        for i in range(3):
            await call(alice, {"type": "message.send", "room": "general", "body": f"m{i}", "client_id": f"r{i}", "ref": i})
    async with socket(cookies["bob"]) as bob, socket(cookies["bob"]) as bob2, socket(cookies["alice"]) as alice:
        await join(bob)
        await join(alice)
        await pushes(bob)
        assert await call(bob, {"type": "read", "room": "general", "seq": 2, "ref": "a"}) == {
            "type": "ack", "ref": "a", "room": "general", "seq": 2}
        assert await pushes(bob2) == [{"type": "read.state", "room": "general", "seq": 2}], "the user's other socket"
        assert {"type": "read.marker", "room": "general", "user": "bob", "seq": 2} in await pushes(alice)
        # Backwards: the stored value stays, nothing is sent.
        assert (await call(bob, {"type": "read", "room": "general", "seq": 1, "ref": "b"}))["seq"] == 2
        # Past the head: clamped to it.
        assert (await call(bob, {"type": "read", "room": "general", "seq": 999, "ref": "c"}))["seq"] == 3
        assert await pushes(alice) == [{"type": "read.marker", "room": "general", "user": "bob", "seq": 3}]
        assert [f for f in await pushes(bob2)] == [{"type": "read.state", "room": "general", "seq": 3}]
    assert await ReadState.objects.filter(user=demo["bob"], room__slug="general").values_list("seq", flat=True).aget() == 3
    # A new subscriber learns everyone's read position.
    async with socket(cookies["carol"]) as carol:
        await carol.send_json_to({"type": "subscribe", "room": "general", "ref": "s", "presence": False})
        assert await carol.receive_json_from(timeout=5) == {"type": "read.markers", "room": "general", "markers": {"bob": 3}}


@contextlib.asynccontextmanager
async def alice_posted_then_bob_joined(cookies, client_id: str):
    """alice posts one message to #general, then both join with presence; the
    pushes so far are read off, so the test sees only what follows."""
    async with socket(cookies["alice"]) as alice:
        await call(alice, {"type": "message.send", "room": "general", "body": "x", "client_id": client_id, "ref": 0})
        await join(alice)
        async with socket(cookies["bob"]) as bob:
            await join(bob)
            await pushes(alice)
            yield alice, bob


@pytest.mark.asyncio
async def test_rooms_without_read_markers_keep_reads_private(cookies, shared, demo):
    from realtime.models import Room

    await Room.objects.filter(slug="general").aupdate(read_markers=False)
    async with alice_posted_then_bob_joined(cookies, "p") as (alice, bob):
        assert (await call(bob, {"type": "read", "room": "general", "seq": 1, "ref": 1}))["seq"] == 1
        assert await pushes(alice) == []


def test_rooms_list_counts_unread_messages_by_others(demo):
    from realtime.domain import services

    for i in range(3):
        services.perform_sync(services.message_send, user=demo["alice"], slug="general", body=f"m{i}", client_id=f"u{i}")
    services.perform_sync(services.message_send, user=demo["bob"], slug="general", body="mine", client_id="u-bob")
    ops = services.perform_sync(services.message_send, user=demo["alice"], slug="ops", body="o", client_id="u-ops")
    services.perform_sync(services.message_delete, user=demo["alice"], slug="ops", message_id=ops.id)
    bob = Client()
    bob.force_login(demo["bob"])

    def rooms():
        return {r["slug"]: (r["read"], r["unread"]) for r in bob.get("/api/v1/rooms/").json()["rooms"]}

    assert rooms() == {"general": (0, 3), "ops": (0, 0)}  # own and deleted messages do not count
    services.mark_read(user=demo["bob"], slug="general", seq=2)
    assert rooms()["general"] == (2, 1)
    assert Membership.objects.filter(user=demo["bob"]).count() == 2  # reading changed no membership


@pytest.mark.asyncio
async def test_a_read_over_rest_reaches_own_sockets_and_the_room(cookies, shared, demo):
    """The long-polling fallback marks read over REST: the same pushes as the socket."""
    from django.test import AsyncClient

    async with alice_posted_then_bob_joined(cookies, "rest-read") as (alice, bob):
        client = AsyncClient()
        await client.aforce_login(demo["bob"])
        res = await client.post("/api/v1/rooms/general/read/", {"seq": 1}, content_type="application/json")
        assert res.status_code == 200
        assert await pushes(bob) == [{"type": "read.state", "room": "general", "seq": 1}]
        assert await pushes(alice) == [{"type": "read.marker", "room": "general", "user": "bob", "seq": 1}]


@pytest.mark.asyncio
async def test_a_live_sockets_leases_outlive_their_ttl(cookies, shared, demo, monkeypatch, clock):
    """The housekeeper renews every local socket's connection lease and presence
    (in one round trip each): a socket that stays is neither dropped from the
    room nor from its user's socket count, however long it stays (here, more than
    twice either TTL of a clock the test moves)."""
    from realtime.state import leases as connections

    monkeypatch.setattr(presence, "RENEW", 0.05)
    monkeypatch.setattr(connections, "LEASE_RENEW", 0.05)  # the housekeeper renews every 50 ms
    renewed: dict[str, list[float]] = {"presence": [], "leases": []}  # the clock's time at each renewal

    def recorded(name, renew):
        async def recording(held):
            now = clock()
            await renew(held)
            if held:
                renewed[name].append(now)
        return recording

    monkeypatch.setattr(presence, "renew_all", recorded("presence", presence.renew_all))
    monkeypatch.setattr(connections, "renew", recorded("leases", connections.renew))
    connections.leases.reset()
    async with socket(cookies["bob"]) as bob, socket(cookies["alice"]) as alice:
        await join(bob)
        await join(alice)
        assert await bob.receive_json_from(timeout=5) == {"type": "presence.diff", "room": "general", "joins": ["alice"],
                                                          "leaves": [], "count": 2}
        start, step = clock(), 0.9 * min(presence.TTL, connections.LEASE_TTL)  # less than either TTL
        while clock() - start <= 2 * max(presence.TTL, connections.LEASE_TTL):
            clock.advance(step)
            await until(lambda: all(times and times[-1] == clock() for times in renewed.values()),
                        what="the housekeeper renewing the leases")
            await presence.announce("general")  # what a sweep does: anyone gone would be announced
        await assert_quiet(bob)  # nobody left
        assert (await presence.page("general")).users == ["alice", "bob"]
        assert await connections.leases().count(demo["bob"].pk) == 1
    # Closed: the leases are given back at once.
    assert await connections.leases().count(demo["bob"].pk) == 0
    connections.leases.reset()


@pytest.mark.asyncio
async def test_a_burst_of_leaves_is_settled_by_one_reconcile_of_the_room(shared, monkeypatch):
    """A drain closes thousands of sockets together: their leaves are settled by one
    reconcile of the room after the grace, not one each."""
    for i in range(20):
        await presence.join("general", 300 + i, f"q{i:02}", f"c{i}")
    store = presence.backend()
    calls = []
    real = store.reconcile

    async def counted(room):
        calls.append(room)
        return await real(room)

    monkeypatch.setattr(store, "reconcile", counted)
    for i in range(20):
        await presence.leave("general", 300 + i, f"q{i:02}", f"c{i}")

    async def everyone_gone():
        return (await presence.page("general")).count == 0

    await until(everyone_gone, what="the leaves settled")
    assert calls == ["general"]


@pytest.mark.asyncio
async def test_the_renewal_keeps_a_rooms_presence_keys_however_long_nobody_joins(redis_server, settings):
    """The keys' one-day expiry is set on a join; the housekeeper's renewal sets it
    again, so a room of sockets that stay for days keeps its presence (Redis: in
    memory only leases expire)."""
    import redis

    settings.REDIS_URL = redis_server.url
    presence.backend.reset()
    await presence.join("general", 400, "ida", "c400")
    client = redis.Redis.from_url(settings.REDIS_URL)
    keys = presence._keys("general")[:3]
    for key in keys:
        client.expire(key, 60)
    await presence.renew_all([("general", 400, "ida", "c400")])
    assert all(client.ttl(key) > presence.KEY_TTL - 60 for key in keys), [client.ttl(key) for key in keys]
    client.flushall()
    presence.backend.reset()


@pytest.mark.asyncio
async def test_a_renewal_sets_a_keys_members_in_one_zadd_of_up_to_a_chunk(redis_server, settings):
    """The housekeeper's renewal of 1,201 sockets of one room is three ZADDs (of
    up to RENEW_CHUNK members each), not 1,201; a socket's lease given back stays
    gone, and every member held is renewed."""
    import redis

    from realtime.state import store

    settings.REDIS_URL = redis_server.url
    presence.backend.reset()
    client = redis.Redis.from_url(settings.REDIS_URL)
    lease_key = presence._keys("general")[0]
    held = [("general", n, f"u{n}", f"c{n}") for n in range(1201)]
    members = [presence._member(n, username, conn) for _, n, username, conn in held]
    client.zadd(lease_key, dict.fromkeys(members[1:], 1))  # (the first: given back)
    client.config_resetstat()
    assert store.RENEW_CHUNK == 500
    await presence.renew_all(held)
    calls = {name: stats["calls"] for name, stats in client.info("commandstats").items()}
    assert calls["cmdstat_zadd"] == 3
    assert client.zcard(lease_key) == 1200 and client.zscore(lease_key, members[0]) is None
    assert min(score for _, score in client.zrange(lease_key, 0, -1, withscores=True)) > 1
    client.flushall()
    presence.backend.reset()


@pytest.mark.asyncio
async def test_a_user_back_just_as_their_leave_goes_out_is_told_they_are_here(cookies, shared, monkeypatch):
    """bob's page closes, and his next one subscribes as his leave's diff goes out:
    that diff reaches the new socket after its presence.state (it was queued while the
    socket read the log, having joined the room's stream first). The diff of his
    arrival must reach that socket too, or its page shows the room without him ("Here
    now: alice and 1 other" once alice comes: tests/e2e/test_chat_browser.py)."""
    import asyncio

    async with socket(cookies["bob"]) as before:
        await join(before)
    await until(lambda: "general" in presence.coalescer().pending, what="bob's leave settled")
    real_join = presence.join

    async def join_once_the_leave_is_out(*args):  # (a slow log read)
        await until(lambda: "general" not in presence.coalescer().pending, what="bob's leave sent")
        await asyncio.sleep(0.05)
        return await real_join(*args)

    monkeypatch.setattr(presence, "join", join_once_the_leave_is_out)
    async with socket(cookies["bob"]) as bob:
        frames = [await call(bob, {"type": "subscribe", "room": "general", "ref": "s"})]
        while frames[-1].get("ref") != "s":
            frames.append(await bob.receive_json_from(timeout=5))
        monkeypatch.setattr(presence, "join", real_join)
        await presence_settled()
        frames += await pushes(bob)
        async with socket(cookies["alice"]) as alice:  # a diff of its own, a second later
            await join(alice)
            frames += await pushes(bob)
    # What static/realtime/ui/presence.js makes of them.
    present, count = set(), 0
    for frame in frames:
        if frame["type"] == "presence.state":
            present, count = set(frame["users"]), frame["count"]
        elif frame["type"] == "presence.diff":
            present, count = (present | set(frame["joins"])) - set(frame["leaves"]), frame["count"]
    assert (sorted(present), count) == (["alice", "bob"], 2), frames


@pytest.mark.asyncio
async def test_a_diff_tells_only_what_is_still_so_when_it_goes(cookies, shared, monkeypatch):
    """bob's tab on this worker closes: his leave is settled and waits for the room's
    next diff from here (one a second at most). Meanwhile his new tab on another
    worker has joined, and that worker's diff went first. This worker's diff must
    not tell the room he left: the room would hear it last, and every page would
    drop him for good."""
    from asgiref.sync import sync_to_async
    from django.contrib.auth import get_user_model

    monkeypatch.setattr(presence, "EVERY", 1.0)
    bob_id = await sync_to_async(lambda: get_user_model().objects.get(username="bob").pk)()
    async with socket(cookies["alice"]) as alice:
        await join(alice)
        async with socket(cookies["bob"]) as bob:
            await join(bob)
        await until(lambda: bool(getattr(presence.coalescer().pending.get("general"), "leaves", None)),
                    what="bob's leave settled, held back by the diff of his arrival")
        # His new tab, on another worker (its diff is that worker's).
        joined, _ = await presence.backend().join("general", f"bob:{bob_id}:elsewhere", f"bob:{bob_id}")
        assert joined
        await presence_settled()
        frames = await pushes(alice, wait=0.5)
    assert [f for f in frames if f["type"] == "presence.diff" and "bob" in f["leaves"]] == [], frames
