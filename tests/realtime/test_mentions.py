"""Mentions: @name resolved by the server at send and edit, carried by message.new
and message.edited as `mentions`, counted per user and room after their read
position (GET /api/v1/rooms/), cleared by reading; nothing for someone who cannot
see the room. The send fast path stays as it was for a body without `@`, resolves
a batch's names in one query, and on PostgreSQL resolves and writes them inside
its one statement (the module runs again there: test_the_same_tests_pass_on_postgresql).

Demo data (tests/conftest.py): general is public (alice owner, bob member, carol
reader); ops is private (alice owner, bob member); admin is staff.
"""

from __future__ import annotations

import pytest
from asgiref.sync import sync_to_async
from django.contrib.auth import get_user_model
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext

from realtime.domain import mentions, rooms, selectors, services
from realtime.models import Event, Membership, Mention, Message, Role, Room
from tests.conftest import assert_quiet, call, run_module_on_postgresql, socket, subscribe


def send(user, body: str, room: str = "general", client_id: str = "m1") -> int:
    return services.perform_sync(services.message_send, user=user, slug=room, body=body, client_id=client_id).id


def counts(user) -> dict[str, tuple[int, int]]:
    """slug -> (unread, mentions) in the user's room list."""
    return {r["slug"]: (r["unread"], r["mentions"]) for r in selectors.visible_rooms(user=user)}


def rows() -> list[tuple[int, str, str, int]]:
    return list(Mention.objects.order_by("id").values_list("message_id", "user__username", "room__slug", "seq"))


# ---------------------------------------------------------------------------
# What counts as a mention
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("body, names", [
    ("no one here", []),
    ("hi @bob", ["bob"]),
    ("@bob at the start", ["bob"]),
    ("@bob, @Carol. (@dave) @eve's @frank!", ["bob", "Carol", "dave", "eve", "frank"]),
    ("@bob @BOB @Bob", ["bob"]),  # once, whatever the case
    ("mail bob@example.com or x@bob", []),  # an address, a mid-word @
    ("@@bob", []),
    ("@ bob", []),
    ("@bob.smith and @a-b and @c+d and @e_f", ["bob.smith", "a-b", "c+d", "e_f"]),
    ("@bob.", ["bob"]),
    ("@x", ["x"]),
])
def test_names_in_a_body(body, names):
    assert mentions.names_in(body) == names


def test_at_most_20_names_are_looked_up():
    body = " ".join(f"@u{i}" for i in range(25)) + " @u0"
    assert mentions.names_in(body) == [f"u{i}" for i in range(20)]


# ---------------------------------------------------------------------------
# Over the socket, on both transports
# ---------------------------------------------------------------------------
@pytest.mark.usefixtures("layer")
class TestSocket:
    pytestmark = [pytest.mark.asyncio, pytest.mark.django_db(transaction=True)]

    async def test_message_new_names_those_mentioned_who_may_see_the_room(self, cookies):
        body = "hi @bob, @CAROL and @nobody; mail alice@example.com or @alice"
        async with socket(cookies["alice"]) as alice, socket(cookies["bob"]) as bob:
            await subscribe(bob, "general")
            ack = await call(alice, {"type": "message.send", "room": "general", "body": body, "client_id": "c",
                                     "ref": "s"})
            frame = await bob.receive_json_from(timeout=5)
            assert frame.pop("ts").endswith("Z")
            # Never the author; an unknown name is left out; the usernames as they are spelt.
            assert frame == {"type": "message.new", "room": "general", "seq": 1, "id": ack["id"], "author": "alice",
                             "body": body, "client_id": "c", "mentions": ["bob", "carol"]}
            # No @: no `mentions` at all (the frame as before mentions existed).
            await call(alice, {"type": "message.send", "room": "general", "body": "plain", "client_id": "d",
                               "ref": "t"})
            frame = await bob.receive_json_from(timeout=5)
            assert "mentions" not in frame and frame["body"] == "plain"
            await assert_quiet(bob)

    async def test_a_private_rooms_mention_of_an_outsider_names_and_tells_them_nothing(self, cookies, demo):
        dave = await sync_to_async(get_user_model().objects.create_user)("dave", is_active=False)
        await Membership.objects.acreate(room=await Room.objects.aget(slug="ops"), user=dave, role=Role.MEMBER)
        body = "@carol @dave @admin @bob look"
        async with socket(cookies["alice"]) as alice, socket(cookies["bob"]) as bob, \
                socket(cookies["carol"]) as carol:
            await subscribe(bob, "ops")
            await subscribe(carol, "general")
            await call(alice, {"type": "message.send", "room": "ops", "body": body, "client_id": "c", "ref": "s"})
            frame = await bob.receive_json_from(timeout=5)
            # carol is no member (not named), dave is deactivated; admin is staff, who see every room.
            assert frame["mentions"] == ["admin", "bob"]
            await assert_quiet(carol)
        assert await sync_to_async(rows)() == [(frame["id"], "admin", "ops", 1), (frame["id"], "bob", "ops", 1)]
        carols = await sync_to_async(counts)(demo["carol"])
        assert carols == {"general": (0, 0)}

    async def test_an_edit_replaces_the_mentions(self, cookies, demo):
        mid = await sync_to_async(send)(demo["alice"], "for @bob")
        async with socket(cookies["alice"]) as alice, socket(cookies["bob"]) as bob:
            await subscribe(bob, "general", since=1)
            edit = {"type": "message.edit", "room": "general", "id": mid, "ref": "e"}
            assert (await call(alice, {**edit, "body": "for @carol now"}))["seq"] == 2
            frame = await bob.receive_json_from(timeout=5)
            assert frame.pop("edited_at").endswith("Z")
            assert frame == {"type": "message.edited", "room": "general", "seq": 2, "id": mid,
                             "body": "for @carol now", "mentions": ["carol"]}
            assert await sync_to_async(rows)() == [(mid, "carol", "general", 1)]
            await call(alice, {**edit, "body": "for no one"})
            frame = await bob.receive_json_from(timeout=5)
            assert "mentions" not in frame and frame["body"] == "for no one"
            await assert_quiet(bob)
        assert await sync_to_async(rows)() == []

    async def test_the_read_frame_clears_the_count(self, cookies, demo):
        for i in range(3):
            await sync_to_async(send)(demo["alice"], f"@bob {i}", client_id=f"m{i}")
        assert (await sync_to_async(counts)(demo["bob"]))["general"] == (3, 3)
        async with socket(cookies["bob"]) as bob:
            assert await call(bob, {"type": "read", "room": "general", "seq": 2, "ref": "r"}) == {
                "type": "ack", "ref": "r", "room": "general", "seq": 2}
            assert (await sync_to_async(counts)(demo["bob"]))["general"] == (1, 1)
            await call(bob, {"type": "read", "room": "general", "seq": 3, "ref": "r"})
        assert (await sync_to_async(counts)(demo["bob"]))["general"] == (0, 0)

    async def test_queued_sends_resolve_each_ones_mentions_in_one_batch(self, cookies, demo, monkeypatch):
        sizes = []
        real = services.message_send_many
        monkeypatch.setattr(services, "message_send_many",
                            lambda *, user, sends: sizes.append(len(sends)) or real(user=user, sends=sends))
        bodies = ["m0 @bob", "m1", "m2 @carol and @bob", "m3 @nobody", "m4"]
        async with socket(cookies["alice"]) as alice, socket(cookies["bob"]) as bob:
            await subscribe(bob, "general")
            for i, body in enumerate(bodies):  # all queued before the consumer takes the first
                await alice.send_json_to({"type": "message.send", "room": "general", "body": body,
                                          "client_id": f"b{i}", "ref": i})
            acks = [await alice.receive_json_from(timeout=5) for _ in bodies]
            assert [(a["ref"], a["seq"]) for a in acks] == [(i, i + 1) for i in range(5)]
            got = [await bob.receive_json_from(timeout=5) for _ in bodies]
            assert [(e["body"], e.get("mentions")) for e in got] == [
                ("m0 @bob", ["bob"]), ("m1", None), ("m2 @carol and @bob", ["carol", "bob"]), ("m3 @nobody", None),
                ("m4", None)]
            await assert_quiet(bob)
        assert max(sizes) > 1, "the queued sends were handled one by one"
        ids = [a["id"] for a in acks]
        assert await sync_to_async(rows)() == [(ids[0], "bob", "general", 1), (ids[2], "carol", "general", 3),
                                               (ids[2], "bob", "general", 3)]


# ---------------------------------------------------------------------------
# Counts, history, deletes
# ---------------------------------------------------------------------------
@pytest.mark.django_db
def test_mention_counts_per_room_in_the_room_list_clear_as_the_user_reads(demo):
    alice, bob = demo["alice"], demo["bob"]
    send(alice, "@bob one")
    send(alice, "no one", client_id="m2")
    send(alice, "@bob two", client_id="m3")
    send(alice, "in ops, @bob", room="ops", client_id="m4")
    send(bob, "me, @bob, and @alice", client_id="m5")  # bob names himself: not his mention
    client = Client()
    client.force_login(bob)
    listed = {r["slug"]: r for r in client.get("/api/v1/rooms/").json()["rooms"]}
    assert listed["general"] == {"slug": "general", "title": listed["general"]["title"], "kind": "room",
                                 "topic": listed["general"]["topic"], "is_public": True,
                                 "role": "member", "seq": 4, "read": 0, "unread": 3, "mentions": 2}
    assert (listed["ops"]["unread"], listed["ops"]["mentions"]) == (1, 1)
    assert counts(alice)["general"] == (1, 1)  # bob's last names her
    assert client.post("/api/v1/rooms/general/read/", {"seq": 1}, content_type="application/json").status_code == 200
    assert counts(bob) == {"general": (2, 1), "ops": (1, 1)}
    client.post("/api/v1/rooms/general/read/", {"seq": 4}, content_type="application/json")
    assert counts(bob) == {"general": (0, 0), "ops": (1, 1)}


@pytest.mark.django_db
def test_a_deleted_message_takes_its_mentions_along_from_the_count_and_the_log(demo):
    mid = send(demo["alice"], "secret for @bob")
    assert counts(demo["bob"])["general"] == (1, 1)
    services.message_delete(user=demo["alice"], slug="general", message_id=mid)
    assert counts(demo["bob"])["general"] == (0, 0)
    assert rows() == []
    # A replay of the message.new no longer says whom it named, nor what.
    assert Event.objects.get(seq=1).payload == {"id": mid, "author": "alice", "body": "", "client_id": "m1",
                                                "ts": Event.objects.get(seq=1).payload["ts"]}


@pytest.mark.django_db
def test_history_pages_carry_each_messages_mentions(demo):
    first = send(demo["alice"], "@carol @bob")
    second = send(demo["alice"], "nobody", client_id="m2")
    client = Client()
    client.force_login(demo["carol"])
    page = client.get("/api/v1/rooms/general/messages/").json()
    assert [(m["id"], m["mentions"]) for m in page["messages"]] == [(first, ["carol", "bob"]), (second, [])]


@pytest.mark.django_db
def test_at_most_20_users_are_mentioned(demo):
    User = get_user_model()
    for i in range(25):
        User.objects.create_user(f"u{i}")
    send(demo["alice"], " ".join(f"@u{i}" for i in range(25)))
    assert Event.objects.get().payload["mentions"] == [f"u{i}" for i in range(20)]
    assert Mention.objects.count() == 20


# ---------------------------------------------------------------------------
# The send path's cost
# ---------------------------------------------------------------------------
def user_queries(captured) -> list[str]:
    return [q["sql"] for q in captured.captured_queries if "auth_user" in q["sql"] or "realtime_mention" in q["sql"]]


@pytest.mark.django_db
def test_a_body_without_at_costs_no_query_for_mentions(demo):
    send(demo["alice"], "warm up")
    with CaptureQueriesContext(connection) as plain:
        send(demo["alice"], "hello there", client_id="m2")
    assert user_queries(plain) == []
    sends = [{"slug": "general", "body": f"m{i}", "client_id": f"b{i}"} for i in range(4)]
    with CaptureQueriesContext(connection) as batch:
        services.message_send_many(user=demo["alice"], sends=sends)
    assert user_queries(batch) == []


@pytest.mark.django_db
def test_a_batch_looks_its_names_up_in_one_query(demo):
    sends = [{"slug": "general", "body": body, "client_id": f"b{i}"}
             for i, body in enumerate(["@bob", "none", "@carol @bob", "@nobody"])]
    with CaptureQueriesContext(connection) as batch:
        outcomes = services.message_send_many(user=demo["alice"], sends=sends)
    lookups = [sql for sql in user_queries(batch) if sql.lstrip().upper().startswith("SELECT") and "auth_user" in sql]
    assert len(lookups) == 1
    assert [events[0].mentions for _, events in outcomes] == [["bob"], [], ["carol", "bob"], []]


# ---------------------------------------------------------------------------
# Who is named, in every kind of room, on both write paths
# ---------------------------------------------------------------------------
@pytest.mark.django_db(transaction=True)  # autocommit: on PostgreSQL the one-statement write (roomlog.POST_MENTIONING)
def test_who_is_named_in_each_kind_of_room(demo):
    """The same answers from PostgreSQL's one statement (names resolved inside it,
    the policy read from mentions.may_view) and from the portable path
    (mentions.resolve), which this module's run on SQLite takes."""
    User = get_user_model()
    alice = demo["alice"]
    User.objects.create_user("dave", is_active=False)
    eves = [User.objects.create_user(name) for name in ("eve", "Eve")]  # two users, one name without case
    club = Room.objects.create(slug="club", title="Club", is_public=False)
    for user, role in ((alice, Role.OWNER), (demo["carol"], Role.READER), *((eve, Role.MEMBER) for eve in eves)):
        Membership.objects.create(room=club, user=user, role=role)
    (dm, _), _ = rooms.dm_open(user=alice, usernames=["bob"])
    body = "@carol @admin @bob @dave @nobody @ALICE @EVE"
    # Public: anyone active but the author. Private: members (a reader too) and staff.
    # A DM: its people only (staff are no exception).
    expected = {"general": ["carol", "admin", "bob", "Eve", "eve"], "ops": ["admin", "bob"],
                "club": ["carol", "admin", "Eve", "eve"], dm.slug: ["bob"]}
    for slug, names in expected.items():
        sends = [{"slug": slug, "body": b, "client_id": f"{slug}-{i}"} for i, b in enumerate([body, "plain", body])]
        with CaptureQueriesContext(connection) as batch:
            outcomes = services.message_send_many(user=alice, sends=sends)
        assert [events[0].mentions for _, events in outcomes] == [names, [], names], slug
        _, [single] = services.message_send(user=alice, slug=slug, body=f"again {body}", client_id=f"{slug}-s")
        assert single.mentions == names, slug
        lookups = [q for q in user_queries(batch) if q.lstrip().upper().startswith("SELECT")]
        # PostgreSQL resolves the batch's names inside its write; elsewhere one query does.
        assert len(lookups) == (0 if connection.vendor == "postgresql" else 1), lookups
        seqs = [result.seq for result, _ in outcomes]
        stored = Event.objects.filter(room__slug=slug, seq__in=seqs).order_by("seq")
        assert [e.payload.get("mentions") for e in stored] == [names, None, names], slug
        assert list(Mention.objects.filter(room__slug=slug, seq__in=seqs).order_by("seq", "id")
                    .values_list("seq", "user__username")) == [(seqs[0], n) for n in names] + [(seqs[2], n) for n in names]


# On SQLite only (the run it starts is the PostgreSQL one).
if connection.vendor != "postgresql":
    @pytest.mark.timeout(300)
    def test_the_same_tests_pass_on_postgresql():
        """This module again, on a private PostgreSQL: the socket tests and the one
        above take the one-statement write there."""
        run_module_on_postgresql(__file__)
