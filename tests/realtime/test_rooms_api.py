"""Rooms people make, join, leave and manage (POST /api/v1/rooms/, join/, leave/,
members/): every endpoint, every refusal (exact status and code, nothing changed),
and the membership events in the room's log.

Demo data: alice owns general (public) and ops (private); bob is a member of both;
carol is a reader in general; admin is staff and a member of nothing. The live
side (events over the socket, a removed member's stream and long poll ending) is
in test_rooms_live.py.
"""

from __future__ import annotations

import pytest
from django.contrib.auth import get_user_model
from django.test import Client

from realtime.models import Event, Membership, Role, Room

pytestmark = pytest.mark.django_db

JSON = "application/json"



def create(client, name="Team Alpha!", visibility="public", **extra):
    return client.post("/api/v1/rooms/", {"name": name, "visibility": visibility, **extra}, content_type=JSON)


def state() -> dict:
    """Everything a room write could change."""
    return {
        "rooms": sorted(Room.objects.values_list("slug", "title", "kind", "topic", "is_public", "last_seq")),
        "members": sorted(Membership.objects.values_list("room__slug", "user__username", "role")),
        "events": sorted(Event.objects.values_list("room__slug", "seq", "type", "payload")),
    }


def log(slug: str) -> list[tuple[int, str, dict]]:
    return list(Event.objects.filter(room__slug=slug).order_by("seq").values_list("seq", "type", "payload"))


def members(slug: str) -> dict[str, str]:
    return dict(Membership.objects.filter(room__slug=slug).values_list("user__username", "role"))


# ---------------------------------------------------------------------------
# Making a room
# ---------------------------------------------------------------------------
def test_a_new_room_is_answered_whole_and_its_maker_owns_it(clients):
    res = create(clients["bob"], "Team Alpha!", "private", topic="  launch   planning ")
    assert res.status_code == 201
    assert res.json() == {"slug": "team-alpha", "title": "Team Alpha!", "kind": "room", "topic": "launch planning",
                          "is_public": False, "role": "owner", "seq": 1, "read": 0, "unread": 0, "mentions": 0}
    assert members("team-alpha") == {"bob": "owner"}
    assert log("team-alpha") == [(1, "member.joined", {"user": "bob", "role": "owner"})]
    # It is bob's: alice does not see it; bob lists it.
    assert "team-alpha" not in [r["slug"] for r in clients["alice"].get("/api/v1/rooms/").json()["rooms"]]
    assert "team-alpha" in [r["slug"] for r in clients["bob"].get("/api/v1/rooms/").json()["rooms"]]


@pytest.mark.parametrize("name, slug", [
    ("Team Alpha!", "team-alpha"),
    ("  Équipe   Été ", "equipe-ete"),
    ("日本語", "room"),  # no Latin letter or digit: the fallback
    ("__init__", "init"),
    ("a" * 80, "a" * 40),
])
def test_the_slug_is_made_from_the_name(clients, name, slug):
    res = create(clients["alice"], name)
    assert res.status_code == 201 and res.json()["slug"] == slug


def test_a_taken_slug_gets_the_next_number(clients):
    assert create(clients["alice"], "Team Alpha!").json()["slug"] == "team-alpha"
    assert create(clients["alice"], "Team Alpha?").json()["slug"] == "team-alpha-2"
    assert create(clients["bob"], "team  alpha.").json()["slug"] == "team-alpha-3"
    assert create(clients["bob"], "General!").json()["slug"] == "general-2"


@pytest.mark.parametrize("body, status, code, message", [
    ({"name": "", "visibility": "public"}, 400, "invalid", "the room name is empty"),
    ({"name": "   \u3000 ", "visibility": "public"}, 400, "invalid", "the room name is empty"),
    ({"name": "x" * 81, "visibility": "public"}, 413, "too_large", "the room name is longer than 80 characters"),
    ({"name": "<b>bold</b>", "visibility": "public"}, 400, "invalid",
     "room names are plain text: < and > are not allowed"),
    ({"name": "!!! ??? ...", "visibility": "public"}, 400, "invalid",
     "the room name needs at least one letter or digit"),
    ({"name": "tab\there", "visibility": "public"}, 400, "invalid", "the room name contains control characters"),
    ({"name": "evil\u202egnp.exe", "visibility": "public"}, 400, "invalid",
     "the room name contains control characters"),
    ({"name": "ok", "visibility": "public", "topic": "t" * 251}, 413, "too_large",
     "the topic is longer than 250 characters"),
    ({"name": "ok", "visibility": "public", "topic": "two\nlines"}, 400, "invalid",
     "the topic contains control characters"),
    ({"name": "ok", "visibility": "secret"}, 400, "invalid", None),
    ({"name": "ok"}, 400, "invalid", None),
    ({"visibility": "public"}, 400, "invalid", None),
    ({"name": 5, "visibility": "public"}, 400, "invalid", None),
    ({"name": "ok", "visibility": "public", "slug": "mine"}, 400, "invalid", None),
    ({"name": "general", "visibility": "private"}, 409, "conflict",
     "a room named 'general' exists already; pick another name"),
    ({"name": "GENERAL", "visibility": "public"}, 409, "conflict",
     "a room named 'GENERAL' exists already; pick another name"),
])
def test_bad_rooms_are_refused_and_nothing_is_made(clients, body, status, code, message):
    before = state()
    res = clients["carol"].post("/api/v1/rooms/", body, content_type=JSON)
    assert res.status_code == status
    assert res.json()["code"] == code
    if message is not None:
        assert res.json() == {"code": code, "message": message}
    assert state() == before


def test_a_name_only_a_private_room_has_is_free_and_tells_nothing(clients):
    """carol cannot see ops ("Operations"): making a room of that name succeeds, so
    the answer says nothing about the private room (a taken slug only gets a number)."""
    res = create(clients["carol"], "Operations", "private")
    assert res.status_code == 201 and res.json()["slug"] == "operations"
    assert create(clients["carol"], "ops").json()["slug"] == "ops-2"
    # alice sees ops: for her the name is taken.
    assert create(clients["alice"], "OPERATIONS").json()["code"] == "conflict"


def test_anonymous_cannot_make_a_room(demo):
    before = state()
    res = create(Client())
    assert res.status_code == 403
    assert state() == before


def test_making_rooms_is_rate_limited(clients, settings):
    settings.REALTIME = {**settings.REALTIME,
                         "RATE_LIMITS": {**settings.REALTIME["RATE_LIMITS"], "room.create": (1 / 60, 2)}}
    assert create(clients["bob"], "one").status_code == 201
    assert create(clients["bob"], "two").status_code == 201
    before = state()
    res = create(clients["bob"], "three")
    assert res.status_code == 429 and res.json()["code"] == "rate_limited"
    assert 0 < res.json()["retry_after"] <= 60 and int(res["Retry-After"]) >= 1
    assert state() == before
    assert create(clients["alice"], "four").status_code == 201  # per user


# ---------------------------------------------------------------------------
# Listing and browsing
# ---------------------------------------------------------------------------
def test_browse_lists_the_public_rooms_one_could_join(clients):
    create(clients["alice"], "Lobby", topic="say hi")
    create(clients["alice"], "Hidden", "private")

    def slugs(name, query=""):
        return [r["slug"] for r in clients[name].get(f"/api/v1/rooms/{query}").json()["rooms"]]

    assert slugs("admin", "?browse=public") == ["general", "lobby"]
    assert slugs("carol", "?browse=public") == ["lobby"]  # carol is in general already
    assert slugs("alice", "?browse=public") == []
    lobby = clients["carol"].get("/api/v1/rooms/?browse=public").json()["rooms"][0]
    assert lobby == {"slug": "lobby", "title": "Lobby", "kind": "room", "topic": "say hi", "is_public": True,
                     "role": None, "seq": 1, "read": 0, "unread": 0, "mentions": 0}
    res = clients["carol"].get("/api/v1/rooms/?browse=private")
    assert res.status_code == 400 and res.json()["code"] == "invalid"


# ---------------------------------------------------------------------------
# Joining and leaving
# ---------------------------------------------------------------------------
def test_joining_a_public_room_once(clients):
    res = clients["admin"].post("/api/v1/rooms/general/join/")
    assert res.status_code == 200
    assert res.json() == {"room": "general", "user": "admin", "role": "member", "seq": 1}
    assert members("general")["admin"] == "member"
    assert log("general") == [(1, "member.joined", {"user": "admin", "role": "member"})]
    before = state()
    again = clients["admin"].post("/api/v1/rooms/general/join/")
    assert again.status_code == 200
    assert again.json() == {"room": "general", "user": "admin", "role": "member", "seq": None}
    assert state() == before
    # A reader joining again stays a reader.
    assert clients["carol"].post("/api/v1/rooms/general/join/").json()["role"] == "reader"


@pytest.mark.parametrize("who, slug, status, body", [
    ("carol", "ops", 404, {"code": "not_found", "message": "no such room"}),  # cannot see it: as if missing
    ("carol", "nope", 404, {"code": "not_found", "message": "no such room"}),
    ("admin", "ops", 403, {"code": "forbidden", "message": "a private room is joined by invitation only"}),
])
def test_private_rooms_are_not_joined(clients, who, slug, status, body):
    before = state()
    res = clients[who].post(f"/api/v1/rooms/{slug}/join/")
    assert (res.status_code, res.json()) == (status, body)
    assert state() == before


def test_leaving(clients):
    res = clients["bob"].post("/api/v1/rooms/ops/leave/")
    assert res.status_code == 200
    assert res.json() == {"room": "ops", "user": "bob", "role": None, "seq": 1}
    assert members("ops") == {"alice": "owner"}
    assert log("ops") == [(1, "member.left", {"user": "bob"})]
    # ops is private: bob no longer sees it at all.
    assert clients["bob"].get("/api/v1/rooms/ops/messages/").status_code == 404
    assert clients["bob"].post("/api/v1/rooms/ops/leave/").status_code == 404
    # Leaving a public room one is not in changes nothing.
    before = state()
    res = clients["admin"].post("/api/v1/rooms/general/leave/")
    assert res.json() == {"room": "general", "user": "admin", "role": None, "seq": None}
    assert state() == before


def test_the_last_owner_may_not_leave(clients, demo):
    before = state()
    res = clients["alice"].post("/api/v1/rooms/general/leave/")
    assert res.status_code == 409
    assert res.json() == {"code": "conflict", "message": "the room's last owner may not leave or stop being an owner; "
                                                         "make someone else an owner first"}
    assert state() == before
    # With another owner, she may.
    Membership.objects.filter(room__slug="general", user=demo["bob"]).update(role=Role.OWNER)
    assert clients["alice"].post("/api/v1/rooms/general/leave/").status_code == 200
    assert members("general") == {"bob": "owner", "carol": "reader"}


# ---------------------------------------------------------------------------
# Members
# ---------------------------------------------------------------------------
def test_members_are_listed_to_whoever_may_see_the_room(clients):
    res = clients["carol"].get("/api/v1/rooms/general/members/")
    assert res.status_code == 200
    body = res.json()
    assert body["room"] == "general" and body["kind"] == "room"
    assert [(m["user"], m["role"]) for m in body["members"]] == [("alice", "owner"), ("bob", "member"),
                                                                 ("carol", "reader")]
    assert all(m["joined_at"] for m in body["members"])
    assert clients["admin"].get("/api/v1/rooms/ops/members/").status_code == 200  # staff see every room
    res = clients["carol"].get("/api/v1/rooms/ops/members/")
    assert (res.status_code, res.json()) == (404, {"code": "not_found", "message": "no such room"})


def add(client, slug, username, role=None):
    body = {"username": username} | ({"role": role} if role else {})
    return client.post(f"/api/v1/rooms/{slug}/members/", body, content_type=JSON)


def test_an_owner_adds_a_member(clients):
    res = add(clients["alice"], "ops", "carol")
    assert res.status_code == 201
    assert res.json() == {"room": "ops", "user": "carol", "role": "member", "seq": 1}
    assert members("ops")["carol"] == "member"
    assert log("ops") == [(1, "member.joined", {"user": "carol", "role": "member", "by": "alice"})]
    assert clients["carol"].get("/api/v1/rooms/ops/messages/").status_code == 200


@pytest.fixture
def moderated(demo):
    """bob moderates ops; dave (an active user) is in no room; eve is deactivated."""
    Membership.objects.filter(room__slug="ops", user=demo["bob"]).update(role=Role.MODERATOR)
    User = get_user_model()
    User.objects.create_user("dave")
    User.objects.create_user("eve", is_active=False)


@pytest.mark.parametrize("who, username, role, status, body", [
    ("bob", "dave", None, 201, {"room": "ops", "user": "dave", "role": "member", "seq": 1}),
    ("bob", "dave", "reader", 201, {"room": "ops", "user": "dave", "role": "reader", "seq": 1}),
    ("alice", "dave", "moderator", 201, {"room": "ops", "user": "dave", "role": "moderator", "seq": 1}),
    ("alice", "dave", "owner", 201, {"room": "ops", "user": "dave", "role": "owner", "seq": 1}),
    ("bob", "dave", "moderator", 403,
     {"code": "forbidden", "message": "only an owner gives, takes or changes the owner and moderator roles"}),
    ("bob", "dave", "owner", 403,
     {"code": "forbidden", "message": "only an owner gives, takes or changes the owner and moderator roles"}),
    ("alice", "nobody", None, 404, {"code": "not_found", "message": "no such user: nobody"}),
    ("alice", "eve", None, 404, {"code": "not_found", "message": "no such user: eve"}),  # deactivated: the same
    ("alice", "bob", None, 409, {"code": "conflict", "message": "bob is a member already; change their role instead"}),
    ("carol", "dave", None, 404, {"code": "not_found", "message": "no such room"}),
    ("admin", "dave", None, 403,
     {"code": "forbidden", "message": "only the room's owners and moderators manage its members"}),
])
def test_who_may_add_whom(clients, moderated, who, username, role, status, body):
    before = state()
    res = add(clients[who], "ops", username, role)
    assert (res.status_code, res.json()) == (status, body)
    if status == 201:
        assert members("ops")[username] == body["role"]
        assert log("ops") == [(1, "member.joined", {"user": username, "role": body["role"], "by": who})]
    else:
        assert state() == before


def test_members_and_readers_add_nobody(clients, demo):
    User = get_user_model()
    User.objects.create_user("dave")
    before = state()
    for who in ("bob", "carol"):
        res = add(clients[who], "general", "dave")
        assert (res.status_code, res.json()) == (
            403, {"code": "forbidden", "message": "only the room's owners and moderators manage its members"})
    assert state() == before


@pytest.mark.parametrize("body", [{"username": "dave", "role": "admin"}, {"username": ""}, {}, {"user": "dave"},
                                  {"username": "dave", "extra": 1}])
def test_bad_member_bodies_are_invalid(clients, moderated, body):
    before = state()
    res = clients["alice"].post("/api/v1/rooms/ops/members/", body, content_type=JSON)
    assert res.status_code == 400 and res.json()["code"] == "invalid"
    assert state() == before


def patch(client, slug, username, role):
    return client.patch(f"/api/v1/rooms/{slug}/members/{username}/", {"role": role}, content_type=JSON)


@pytest.mark.parametrize("who, username, role, status, body", [
    ("alice", "carol", "member", 200, {"room": "general", "user": "carol", "role": "member", "seq": 1}),
    ("alice", "bob", "moderator", 200, {"room": "general", "user": "bob", "role": "moderator", "seq": 1}),
    ("dave", "carol", "member", 200, {"room": "general", "user": "carol", "role": "member", "seq": 1}),
    ("dave", "bob", "reader", 200, {"room": "general", "user": "bob", "role": "reader", "seq": 1}),
    ("alice", "carol", "reader", 200, {"room": "general", "user": "carol", "role": "reader", "seq": None}),
    ("dave", "bob", "moderator", 403,
     {"code": "forbidden", "message": "only an owner gives, takes or changes the owner and moderator roles"}),
    ("dave", "alice", "member", 403,
     {"code": "forbidden", "message": "only an owner gives, takes or changes the owner and moderator roles"}),
    ("dave", "dave", "member", 403,
     {"code": "forbidden", "message": "only an owner gives, takes or changes the owner and moderator roles"}),
    ("bob", "carol", "member", 403,
     {"code": "forbidden", "message": "only the room's owners and moderators manage its members"}),
    ("bob", "nobody", "member", 403,
     {"code": "forbidden", "message": "only the room's owners and moderators manage its members"}),
    ("alice", "admin", "member", 404, {"code": "not_found", "message": "admin is not a member of this room"}),
    ("alice", "nobody", "member", 404, {"code": "not_found", "message": "nobody is not a member of this room"}),
    ("alice", "alice", "member", 409,
     {"code": "conflict", "message": "the room's last owner may not leave or stop being an owner; "
                                     "make someone else an owner first"}),
])
def test_who_may_change_whose_role(clients, demo, who, username, role, status, body):
    """dave moderates general."""
    dave = get_user_model().objects.create_user("dave")
    Membership.objects.create(room=Room.objects.get(slug="general"), user=dave, role=Role.MODERATOR)
    client = Client()
    client.force_login(dave)
    clients["dave"] = client
    before = state()
    res = patch(clients[who], "general", username, role)
    assert (res.status_code, res.json()) == (status, body)
    if body.get("seq"):
        assert members("general")[username] == role
        assert log("general") == [(1, "member.role", {"user": username, "role": role, "by": who})]
    else:
        assert state() == before


def test_an_owner_may_step_down_when_another_owner_remains(clients, demo):
    Membership.objects.filter(room__slug="general", user=demo["bob"]).update(role=Role.OWNER)
    res = patch(clients["alice"], "general", "alice", "member")
    assert res.json() == {"room": "general", "user": "alice", "role": "member", "seq": 1}


@pytest.mark.parametrize("body", [{"role": "king"}, {}, {"role": None}, {"role": "member", "x": 1}])
def test_bad_role_bodies_are_invalid(clients, body):
    before = state()
    res = clients["alice"].patch("/api/v1/rooms/general/members/bob/", body, content_type=JSON)
    assert res.status_code == 400 and res.json()["code"] == "invalid"
    assert state() == before


def remove(client, slug, username):
    return client.delete(f"/api/v1/rooms/{slug}/members/{username}/")


@pytest.mark.parametrize("who, username, status, body", [
    ("alice", "bob", 200, {"room": "general", "user": "bob", "role": None, "seq": 1}),
    ("dave", "carol", 200, {"room": "general", "user": "carol", "role": None, "seq": 1}),
    ("dave", "alice", 403,
     {"code": "forbidden", "message": "only an owner gives, takes or changes the owner and moderator roles"}),
    ("bob", "carol", 403, {"code": "forbidden", "message": "only the room's owners and moderators manage its members"}),
    ("alice", "admin", 404, {"code": "not_found", "message": "admin is not a member of this room"}),
    ("carol", "carol", 200, {"room": "general", "user": "carol", "role": None, "seq": 1}),  # oneself: leave
    ("alice", "alice", 409,
     {"code": "conflict", "message": "the room's last owner may not leave or stop being an owner; "
                                     "make someone else an owner first"}),
])
def test_who_may_remove_whom(clients, who, username, status, body):
    dave = get_user_model().objects.create_user("dave")
    Membership.objects.create(room=Room.objects.get(slug="general"), user=dave, role=Role.MODERATOR)
    clients["dave"] = Client()
    clients["dave"].force_login(dave)
    before = state()
    res = remove(clients[who], "general", username)
    assert (res.status_code, res.json()) == (status, body)
    if status == 200:
        assert username not in members("general")
        by = {} if who == username else {"by": who}
        assert log("general") == [(1, "member.left", {"user": username, **by})]
    else:
        assert state() == before


def test_membership_changes_are_rate_limited(clients, settings):
    settings.REALTIME = {**settings.REALTIME,
                         "RATE_LIMITS": {**settings.REALTIME["RATE_LIMITS"], "member.change": (1 / 60, 2)}}
    assert clients["admin"].post("/api/v1/rooms/general/join/").status_code == 200
    assert clients["admin"].post("/api/v1/rooms/general/leave/").status_code == 200
    before = state()
    for res in (clients["admin"].post("/api/v1/rooms/general/join/"),
                clients["admin"].post("/api/v1/rooms/general/leave/"),
                add(clients["admin"], "general", "bob"),
                patch(clients["admin"], "general", "bob", "reader"),
                remove(clients["admin"], "general", "bob")):
        assert res.status_code == 429 and res.json()["code"] == "rate_limited" and "Retry-After" in res
    assert state() == before


def test_every_membership_event_replays_from_the_log(clients, demo):
    """The REST event page (and so the long poll and a socket's resume) carries them."""
    get_user_model().objects.create_user("dave")
    add(clients["alice"], "ops", "dave", "reader")
    patch(clients["alice"], "ops", "dave", "member")
    remove(clients["alice"], "ops", "dave")
    clients["bob"].post("/api/v1/rooms/ops/leave/")
    events = clients["alice"].get("/api/v1/rooms/ops/events/?since=0").json()["events"]
    assert events == [
        {"type": "member.joined", "room": "ops", "seq": 1, "user": "dave", "role": "reader", "by": "alice"},
        {"type": "member.role", "room": "ops", "seq": 2, "user": "dave", "role": "member", "by": "alice"},
        {"type": "member.left", "room": "ops", "seq": 3, "user": "dave", "by": "alice"},
        {"type": "member.left", "room": "ops", "seq": 4, "user": "bob"},
    ]
