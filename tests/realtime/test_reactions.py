"""Reactions: reaction.add / reaction.remove over the socket (on the in-memory layer
and on Redis, the `layer` fixture) and over REST, each a room event with a seq,
idempotent, validated, checked against the policy, replayed after a reconnect, and
shown whole in history pages. Who may react, role by role: test_permission_matrix.py.

Demo data (tests/conftest.py): general is public (alice owner, bob member, carol
reader); ops is private (alice owner, bob member); admin is staff.
"""

from __future__ import annotations

import pytest
from asgiref.sync import sync_to_async
from django.contrib.auth import get_user_model

from realtime.domain import services
from realtime.models import Event, Message, Reaction, Room
from realtime.state import ratelimit
from tests.conftest import assert_quiet, call, socket, subscribe

THUMBS = "\N{THUMBS UP SIGN}"
PARTY = "\N{PARTY POPPER}"
FAMILY = "\N{MAN}\u200d\N{WOMAN}\u200d\N{GIRL}"  # joined by zero-width joiners
SCOTLAND = "\N{WAVING BLACK FLAG}" + "".join(chr(0xE0000 + ord(c)) for c in "gbsct") + "\U000E007F"  # tag characters
SKIN = "\N{THUMBS UP SIGN}\N{EMOJI MODIFIER FITZPATRICK TYPE-4}"

socket_tests = [pytest.mark.asyncio, pytest.mark.django_db(transaction=True)]


def add(message_id: int, emoji: str = THUMBS, ref: str = "r", room: str = "general") -> dict:
    return {"type": "reaction.add", "room": room, "id": message_id, "emoji": emoji, "ref": ref}


def remove(message_id: int, emoji: str = THUMBS, ref: str = "r", room: str = "general") -> dict:
    return {"type": "reaction.remove", "room": room, "id": message_id, "emoji": emoji, "ref": ref}


def post_message(user, room: str = "general", body: str = "react to me", client_id: str = "m1") -> int:
    return services.perform_sync(services.message_send, user=user, slug=room, body=body, client_id=client_id).id


def stored() -> list[tuple[int, str, str]]:
    return sorted(Reaction.objects.values_list("message_id", "user__username", "emoji"))


def log() -> list[tuple[int, str]]:
    return list(Event.objects.order_by("room_id", "seq").values_list("seq", "type"))


@sync_to_async
def a_stored():
    return stored()


@sync_to_async
def a_log():
    return log()


# ---------------------------------------------------------------------------
# Over the socket, on both transports
# ---------------------------------------------------------------------------
@pytest.mark.usefixtures("layer")
class TestSocket:
    pytestmark = socket_tests

    async def test_a_reaction_is_acked_with_its_seq_and_reaches_every_subscriber_as_a_delta(self, cookies, demo):
        mid = await sync_to_async(post_message)(demo["alice"])
        async with socket(cookies["alice"]) as alice, socket(cookies["bob"]) as bob:
            await subscribe(alice, "general", since=1)
            await subscribe(bob, "general", since=1)
            assert await call(bob, add(mid)) == {"type": "ack", "ref": "r", "room": "general", "id": mid,
                                                 "emoji": THUMBS, "seq": 2}
            added = {"type": "reaction.added", "room": "general", "seq": 2, "id": mid, "emoji": THUMBS, "user": "bob"}
            for comm in (alice, bob):
                assert await comm.receive_json_from(timeout=5) == added
            assert await call(bob, remove(mid, ref="x")) == {"type": "ack", "ref": "x", "room": "general", "id": mid,
                                                             "emoji": THUMBS, "seq": 3}
            removed = {"type": "reaction.removed", "room": "general", "seq": 3, "id": mid, "emoji": THUMBS,
                       "user": "bob"}
            for comm in (alice, bob):
                assert await comm.receive_json_from(timeout=5) == removed
                await assert_quiet(comm)
        assert await a_stored() == []
        assert await a_log() == [(1, "message.new"), (2, "reaction.added"), (3, "reaction.removed")]

    async def test_adding_twice_and_removing_what_is_not_there_are_acked_without_seq_or_event(self, cookies, demo):
        mid = await sync_to_async(post_message)(demo["alice"])
        async with socket(cookies["alice"]) as alice, socket(cookies["bob"]) as bob:
            await subscribe(alice, "general", since=1)
            await call(bob, add(mid))
            assert (await alice.receive_json_from(timeout=5))["type"] == "reaction.added"
            # The same again: acknowledged, nothing written, nothing sent.
            assert await call(bob, add(mid, ref="again")) == {"type": "ack", "ref": "again", "room": "general",
                                                              "id": mid, "emoji": THUMBS}
            # One bob never added, and one of alice's that is not bob's to take back.
            await call(alice, add(mid, emoji=PARTY))
            assert (await alice.receive_json_from(timeout=5))["seq"] == 3
            assert await call(bob, remove(mid, emoji=PARTY, ref="none")) == {
                "type": "ack", "ref": "none", "room": "general", "id": mid, "emoji": PARTY}
            await assert_quiet(alice)
        assert await a_stored() == [(mid, "alice", PARTY), (mid, "bob", THUMBS)]
        assert await a_log() == [(1, "message.new"), (2, "reaction.added"), (3, "reaction.added")]

    async def test_refusals_change_nothing_and_send_nothing(self, cookies, demo):
        mid = await sync_to_async(post_message)(demo["alice"])
        in_ops = await sync_to_async(post_message)(demo["alice"], room="ops", client_id="m2")
        gone = await sync_to_async(post_message)(demo["alice"], client_id="m3")
        await sync_to_async(services.perform_sync)(services.message_delete, user=demo["alice"], slug="general",
                                                   message_id=gone)
        before = await a_log()
        async with socket(cookies["carol"]) as carol, socket(cookies["bob"]) as bob, \
                socket(cookies["alice"]) as alice:
            await subscribe(alice, "general", since=3)
            await subscribe(alice, "ops", since=1)
            # A reader may read, not react.
            assert await call(carol, add(mid)) == {"type": "error", "ref": "r", "code": "forbidden",
                                                   "message": "your role in this room may not react"}
            assert await call(carol, remove(mid)) == {"type": "error", "ref": "r", "code": "forbidden",
                                                      "message": "your role in this room may not react"}
            # A room carol cannot see is one that does not exist.
            for room in ("ops", "nowhere"):
                assert await call(carol, add(in_ops, room=room)) == {"type": "error", "ref": "r", "code": "not_found",
                                                                      "message": "no such room"}
            no_message = {"type": "error", "ref": "r", "code": "not_found", "message": "no such message in this room"}
            # A deleted message, a message of another room, one that never was.
            for target in (gone, in_ops, 10**9):
                assert await call(bob, add(target)) == no_message
                assert await call(bob, remove(target)) == no_message
            await assert_quiet(alice)
        assert await a_stored() == []
        assert await a_log() == before

    async def test_bad_emoji_are_invalid_and_change_nothing(self, cookies, demo):
        mid = await sync_to_async(post_message)(demo["alice"])
        async with socket(cookies["bob"]) as bob, socket(cookies["alice"]) as alice:
            await subscribe(alice, "general", since=1)
            for i, emoji in enumerate(["", "x" * 33, 7, None]):  # the schema's
                reply = await call(bob, add(mid, emoji=emoji, ref=f"s{i}"))
                assert (reply["type"], reply["ref"], reply["code"]) == ("error", f"s{i}", "invalid")
            rule = "an emoji may not contain spaces, control or invisible characters"
            for i, emoji in enumerate(["a b", " ", "\t", "x\n", "\x07", "\u202e" + THUMBS, THUMBS + "\u200b",
                                       "\u2028", "\u3000"]):
                assert await call(bob, add(mid, emoji=emoji, ref=i)) == {"type": "error", "ref": i,
                                                                         "code": "invalid", "message": rule}
                assert await call(bob, remove(mid, emoji=emoji, ref=i)) == {"type": "error", "ref": i,
                                                                            "code": "invalid", "message": rule}
            await assert_quiet(alice)
        assert await a_stored() == []
        assert await a_log() == [(1, "message.new")]

    async def test_reactions_are_replayed_after_a_reconnect(self, cookies, demo):
        mid = await sync_to_async(post_message)(demo["alice"])
        async with socket(cookies["bob"]) as bob:
            await subscribe(bob, "general", since=1)
            async with socket(cookies["alice"]) as alice:
                for frame in (add(mid), add(mid, emoji=PARTY), remove(mid)):
                    assert (await call(alice, frame))["type"] == "ack"
            got = [await bob.receive_json_from(timeout=5) for _ in range(3)]
        # bob comes back with the last seq he applied before the last two.
        async with socket(cookies["bob"]) as bob:
            replayed = await subscribe(bob, "general", since=2)
            await assert_quiet(bob)
        expected = [
            {"type": "reaction.added", "room": "general", "seq": 2, "id": mid, "emoji": THUMBS, "user": "alice"},
            {"type": "reaction.added", "room": "general", "seq": 3, "id": mid, "emoji": PARTY, "user": "alice"},
            {"type": "reaction.removed", "room": "general", "seq": 4, "id": mid, "emoji": THUMBS, "user": "alice"},
        ]
        assert got == expected
        assert replayed == expected[1:]

    async def test_a_deleted_messages_reactions_go_with_it_under_message_deleted(self, cookies, demo):
        mid = await sync_to_async(post_message)(demo["alice"])
        async with socket(cookies["bob"]) as bob, socket(cookies["alice"]) as alice:
            await subscribe(alice, "general", since=1)
            await call(bob, add(mid))
            await call(bob, add(mid, emoji=PARTY))
            assert [(await alice.receive_json_from(timeout=5))["seq"] for _ in range(2)] == [2, 3]
            assert (await call(alice, {"type": "message.delete", "room": "general", "id": mid, "ref": "d"}))["seq"] == 4
            # message.deleted alone: no reaction.removed for each reaction it took along.
            assert await alice.receive_json_from(timeout=5) == {"type": "message.deleted", "room": "general",
                                                                "seq": 4, "id": mid}
            await assert_quiet(alice)
        assert await a_stored() == []
        assert await a_log() == [(1, "message.new"), (2, "reaction.added"), (3, "reaction.added"),
                                 (4, "message.deleted")]

    async def test_reaction_frames_are_rate_limited_per_user(self, cookies, demo, settings):
        """A bucket for each frame type (REALTIME_RATE_REACTION: 5 a second, a burst
        of 20): the 21st at once is refused with a retry hint. (The refill is slowed
        here, so that a slow machine does not earn a token meanwhile.)"""
        limits = settings.REALTIME["RATE_LIMITS"]
        assert limits["reaction.add"] == limits["reaction.remove"] == (5, 20)
        settings.REALTIME = {**settings.REALTIME, "RATE_LIMITS": {
            **limits, **{action: (0.001, limits[action][1]) for action in ("reaction.add", "reaction.remove")}}}
        mid = await sync_to_async(post_message)(demo["alice"])
        async with socket(cookies["bob"]) as bob:
            for frame in (remove, add):
                replies = [await call(bob, frame(mid, ref=i)) for i in range(21)]
                assert [r["type"] for r in replies] == ["ack"] * 20 + ["error"]
                assert replies[20]["code"] == "rate_limited" and replies[20]["retry_after"] > 0
        assert await a_stored() == [(mid, "bob", THUMBS)]


# ---------------------------------------------------------------------------
# The rules, at the service (no socket needed)
# ---------------------------------------------------------------------------
@pytest.mark.django_db
def test_a_message_holds_at_most_20_different_emoji(demo):
    mid = post_message(demo["alice"])
    User = get_user_model()
    for i in range(20):
        Reaction.objects.create(message_id=mid, user=User.objects.create_user(f"u{i}"), emoji=f":e{i}:")
    head = Room.objects.get(slug="general").last_seq
    with pytest.raises(services.ActionError) as refused:
        services.reaction_add(user=demo["bob"], slug="general", message_id=mid, emoji=THUMBS)
    assert (refused.value.code, refused.value.message) == ("conflict", "this message has 20 different reactions already")
    assert Room.objects.get(slug="general").last_seq == head and Reaction.objects.count() == 20
    # One of the 20 that are there: bob may add his to its count.
    result, events = services.reaction_add(user=demo["bob"], slug="general", message_id=mid, emoji=":e3:")
    assert result.seq == head + 1 and [e.user for e in events] == ["bob"]


@pytest.mark.django_db
@pytest.mark.parametrize("emoji", [THUMBS, SKIN, FAMILY, SCOTLAND, ":+1:", "ok", "x" * 32, "\N{HEAVY BLACK HEART}\uFE0F"])
def test_emoji_and_short_names_are_accepted(demo, emoji):
    mid = post_message(demo["alice"])
    result, [event] = services.reaction_add(user=demo["bob"], slug="general", message_id=mid, emoji=emoji)
    assert (result.emoji, event.emoji) == (emoji, emoji)
    assert stored() == [(mid, "bob", emoji)]


@pytest.mark.django_db
def test_an_emoji_is_compared_in_its_nfc_form(demo):
    mid = post_message(demo["alice"])
    services.reaction_add(user=demo["bob"], slug="general", message_id=mid, emoji="e\u0301")  # e + combining acute
    result, events = services.reaction_add(user=demo["bob"], slug="general", message_id=mid, emoji="\u00e9")
    assert (result.seq, events) == (None, [])
    assert stored() == [(mid, "bob", "\u00e9")]


@pytest.mark.django_db
def test_staff_react_where_they_may_post(demo):
    public = post_message(demo["alice"])
    private = post_message(demo["alice"], room="ops", client_id="m2")
    assert services.reaction_add(user=demo["admin"], slug="general", message_id=public, emoji=THUMBS)[0].seq == 2
    with pytest.raises(services.ActionError) as refused:
        services.reaction_add(user=demo["admin"], slug="ops", message_id=private, emoji=THUMBS)
    assert refused.value.code == "forbidden"


# ---------------------------------------------------------------------------
# REST (the long-polling fallback)
# ---------------------------------------------------------------------------
def url(message_id: int, room: str = "general") -> str:
    return f"/api/v1/rooms/{room}/messages/{message_id}/reactions/"


@pytest.mark.django_db
def test_rest_reactions_have_the_sockets_ack_rules_and_events(clients, demo, django_capture_on_commit_callbacks):
    mid = post_message(demo["alice"])
    bob = clients["bob"]
    with django_capture_on_commit_callbacks(execute=False) as published:
        res = bob.post(url(mid), {"emoji": THUMBS}, content_type="application/json")
    assert (res.status_code, res.json()) == (200, {"room": "general", "id": mid, "emoji": THUMBS, "seq": 2})
    assert len(published) == 1  # published once committed
    res = bob.post(url(mid), {"emoji": THUMBS}, content_type="application/json")
    assert (res.status_code, res.json()) == (200, {"room": "general", "id": mid, "emoji": THUMBS})
    res = bob.delete(url(mid), {"emoji": THUMBS}, content_type="application/json")
    assert (res.status_code, res.json()) == (200, {"room": "general", "id": mid, "emoji": THUMBS, "seq": 3})
    res = bob.delete(url(mid), {"emoji": THUMBS}, content_type="application/json")
    assert (res.status_code, res.json()) == (200, {"room": "general", "id": mid, "emoji": THUMBS})
    events = bob.get("/api/v1/rooms/general/events/?since=1").json()["events"]
    assert events == [
        {"type": "reaction.added", "room": "general", "seq": 2, "id": mid, "emoji": THUMBS, "user": "bob"},
        {"type": "reaction.removed", "room": "general", "seq": 3, "id": mid, "emoji": THUMBS, "user": "bob"},
    ]


@pytest.mark.django_db
@pytest.mark.parametrize("user, room, which, body, status, code", [
    ("carol", "general", "live", {"emoji": THUMBS}, 403, "forbidden"),  # a reader
    ("carol", "ops", "ops", {"emoji": THUMBS}, 404, "not_found"),  # a room she cannot see
    ("bob", "nowhere", "live", {"emoji": THUMBS}, 404, "not_found"),
    ("bob", "general", "deleted", {"emoji": THUMBS}, 404, "not_found"),
    ("bob", "general", "ops", {"emoji": THUMBS}, 404, "not_found"),  # a message of another room
    ("bob", "general", "live", {}, 400, "invalid"),
    ("bob", "general", "live", {"emoji": THUMBS, "extra": 1}, 400, "invalid"),
    ("bob", "general", "live", {"emoji": "x" * 33}, 400, "invalid"),
    ("bob", "general", "live", {"emoji": "a b"}, 400, "invalid"),
    ("bob", "general", "live", {"emoji": ["x"]}, 400, "invalid"),
])
@pytest.mark.parametrize("method", ["post", "delete"])
def test_rest_reaction_refusals(clients, demo, method, user, room, which, body, status, code):
    ids = {"live": post_message(demo["alice"]), "ops": post_message(demo["alice"], room="ops", client_id="m2"),
           "deleted": post_message(demo["alice"], client_id="m3")}
    services.message_delete(user=demo["alice"], slug="general", message_id=ids["deleted"])
    Reaction.objects.create(message_id=ids["live"], user=demo["bob"], emoji=THUMBS)
    Reaction.objects.create(message_id=ids["live"], user=demo["carol"], emoji=THUMBS)
    before = (stored(), log())
    res = getattr(clients[user], method)(url(ids[which], room), body, content_type="application/json")
    assert (res.status_code, res.json()["code"]) == (status, code)
    if room == "ops" and user == "carol" or room == "nowhere":
        assert res.json()["message"] == "no such room"
    assert (stored(), log()) == before


@pytest.mark.django_db
def test_rest_reactions_share_the_sockets_bucket(clients, demo, settings):
    settings.REALTIME = {**settings.REALTIME,
                         "RATE_LIMITS": {**settings.REALTIME["RATE_LIMITS"], "reaction.add": (0.01, 2)}}
    mid = post_message(demo["alice"])
    codes = [clients["bob"].post(url(mid), {"emoji": f":e{i}:"}, content_type="application/json") for i in range(3)]
    assert [r.status_code for r in codes] == [200, 200, 429]
    assert codes[2].json()["code"] == "rate_limited" and int(codes[2]["Retry-After"]) >= 1
    assert [emoji for _, _, emoji in stored()] == [":e0:", ":e1:"]


@pytest.mark.django_db
def test_history_pages_show_each_messages_reactions_whole(clients, demo):
    first = post_message(demo["alice"], body="one")
    second = post_message(demo["alice"], body="two", client_id="m2")
    for user, emoji in (("bob", PARTY), ("alice", THUMBS), ("bob", THUMBS), ("admin", PARTY)):
        services.reaction_add(user=demo[user], slug="general", message_id=first, emoji=emoji)
    services.reaction_remove(user=demo["admin"], slug="general", message_id=first, emoji=PARTY)
    page = clients["carol"].get("/api/v1/rooms/general/messages/").json()
    assert [(m["id"], m["reactions"]) for m in page["messages"]] == [
        (first, {PARTY: ["bob"], THUMBS: ["alice", "bob"]}),  # emoji in the order first used, then who
        (second, {}),
    ]


@pytest.mark.django_db
def test_reaction_events_keep_the_message_they_belong_to_when_it_is_deleted(demo):
    """The log keeps a reaction's event after its message is deleted (a replay may
    bring it; the client holds no such message and ignores it): what it says is who
    reacted with what, never the message's text."""
    mid = post_message(demo["alice"], body="secret words")
    services.reaction_add(user=demo["bob"], slug="general", message_id=mid, emoji=THUMBS)
    services.message_delete(user=demo["alice"], slug="general", message_id=mid)
    payloads = list(Event.objects.order_by("seq").values_list("type", "payload"))
    assert payloads[1] == ("reaction.added", {"id": mid, "emoji": THUMBS, "user": "bob"})
    assert all("secret" not in str(payload) for _, payload in payloads)
    assert Message.objects.get(pk=mid).reactions.count() == 0
