"""Direct messages (POST /api/v1/dms/): the one private room of a set of people,
asked for in any order; every refusal exact and changing nothing; a DM's membership
fixed; a DM for its people only (staff included)."""

from __future__ import annotations

import pytest
from django.contrib.auth import get_user_model
from django.test import Client

from realtime.domain import rooms
from realtime.models import Event, Membership, Room

pytestmark = pytest.mark.django_db
JSON = "application/json"



def dm(client, users):
    return client.post("/api/v1/dms/", {"users": users}, content_type=JSON)


def state() -> dict:
    return {
        "rooms": sorted(Room.objects.values_list("slug", "kind", "dm_key", "last_seq")),
        "members": sorted(Membership.objects.values_list("room__slug", "user__username", "role")),
        "events": Event.objects.count(),
    }


def test_a_dm_is_made_once_and_found_after(clients, demo):
    res = dm(clients["alice"], ["bob"])
    assert res.status_code == 201
    slug = res.json()["slug"]
    assert slug.startswith("dm-")
    assert res.json() == {"slug": slug, "title": "bob", "kind": "dm", "topic": "", "is_public": False,
                          "role": "member", "seq": 2, "read": 0, "unread": 0, "mentions": 0}
    room = Room.objects.get(slug=slug)
    assert room.dm_key == f"{min(demo['alice'].pk, demo['bob'].pk)}.{max(demo['alice'].pk, demo['bob'].pk)}"
    assert dict(Membership.objects.filter(room=room).values_list("user__username", "role")) == {
        "alice": "member", "bob": "member"}
    assert list(Event.objects.filter(room=room).order_by("seq").values_list("seq", "type", "payload")) == [
        (1, "member.joined", {"user": "alice", "role": "member"}),
        (2, "member.joined", {"user": "bob", "role": "member"}),
    ]
    before = state()
    again = dm(clients["alice"], ["bob"])
    assert again.status_code == 200 and again.json()["slug"] == slug
    # bob asking for alice is the same room, titled from his side.
    theirs = dm(clients["bob"], ["alice"])
    assert theirs.status_code == 200
    assert theirs.json() | {"title": None} == again.json() | {"title": None}
    assert theirs.json()["title"] == "alice"
    assert state() == before


def test_a_group_dm_is_one_room_whatever_the_order(clients):
    first = dm(clients["alice"], ["carol", "bob"])
    assert first.status_code == 201 and first.json()["title"] == "bob, carol"
    for who, users in (("bob", ["alice", "carol"]), ("carol", ["bob", "alice"]), ("alice", ["bob", "carol"])):
        res = dm(clients[who], users)
        assert res.status_code == 200 and res.json()["slug"] == first.json()["slug"]
    listed = {r["slug"]: (r["kind"], r["title"]) for r in clients["carol"].get("/api/v1/rooms/").json()["rooms"]}
    assert listed == {"general": ("room", "General"), first.json()["slug"]: ("dm", "alice, bob")}
    # A different set is another room.
    assert dm(clients["alice"], ["bob"]).status_code == 201


def test_listing_yourself_among_others_is_the_same_dm(clients):
    slug = dm(clients["alice"], ["bob"]).json()["slug"]
    res = dm(clients["alice"], ["alice", "bob"])
    assert res.status_code == 200 and res.json()["slug"] == slug


def test_eight_people_at_most(clients):
    User = get_user_model()
    for i in range(8):
        User.objects.create_user(f"p{i}")
    assert dm(clients["alice"], [f"p{i}" for i in range(7)]).status_code == 201  # 8 with alice
    before = state()
    res = dm(clients["alice"], [f"p{i}" for i in range(8)])
    assert (res.status_code, res.json()) == (
        413, {"code": "too_large", "message": "a direct message has at most 8 people, you included"})
    assert state() == before


@pytest.mark.parametrize("users, status, body", [
    (["alice"], 400, {"code": "invalid", "message": "a direct message needs someone besides you"}),
    ([], 400, {"code": "invalid", "message": "a direct message needs someone besides you"}),
    (["bob", "bob"], 400, {"code": "invalid", "message": "a name is listed twice"}),
    (["alice", "alice"], 400, {"code": "invalid", "message": "a name is listed twice"}),
    (["bob", "nobody"], 404, {"code": "not_found", "message": "no such user: nobody"}),
    (["gone"], 404, {"code": "not_found", "message": "no such user: gone"}),  # deactivated: as if missing
    (["Bob"], 404, {"code": "not_found", "message": "no such user: Bob"}),  # names are exact
    (["x"] * 9, 413, {"code": "too_large", "message": "a direct message has at most 8 people, you included"}),
])
def test_bad_dms_are_refused_and_nothing_is_made(clients, users, status, body):
    get_user_model().objects.create_user("gone", is_active=False)
    before = state()
    res = dm(clients["alice"], users)
    assert (res.status_code, res.json()) == (status, body)
    assert state() == before


@pytest.mark.parametrize("body", [{}, {"users": "bob"}, {"users": [1]}, {"users": [""]}, {"users": ["bob"], "x": 1}])
def test_malformed_dm_bodies_are_invalid(clients, body):
    before = state()
    res = clients["alice"].post("/api/v1/dms/", body, content_type=JSON)
    assert res.status_code == 400 and res.json()["code"] == "invalid"
    assert state() == before


def test_anonymous_opens_no_dm(demo):
    before = state()
    assert dm(Client(), ["bob"]).status_code == 403
    assert state() == before


def test_opening_dms_is_rate_limited(clients, settings):
    settings.REALTIME = {**settings.REALTIME, "RATE_LIMITS": {**settings.REALTIME["RATE_LIMITS"], "dm.open": (0.01, 1)}}
    assert dm(clients["alice"], ["bob"]).status_code == 201
    before = state()
    res = dm(clients["alice"], ["carol"])
    assert res.status_code == 429 and res.json()["code"] == "rate_limited" and int(res["Retry-After"]) >= 1
    assert state() == before


def test_two_requests_at_once_make_one_dm(demo, monkeypatch):
    """The race: both requests look, find nothing, and insert; the unique dm_key
    lets one in, and the other answers with the winner's room, making nothing.
    (Forced here: the second request's look happens before the first commits.)"""
    (first, created), _ = rooms.dm_open(user=demo["alice"], usernames=["bob"])
    assert created
    before = state()
    real = rooms._find_dm
    calls = []

    def too_early(key):
        calls.append(key)
        return None if len(calls) == 1 else real(key)

    monkeypatch.setattr(rooms, "_find_dm", too_early)
    (second, created), events = rooms.dm_open(user=demo["bob"], usernames=["alice"])
    assert (second.pk, created, events) == (first.pk, False, [])
    assert len(calls) == 2  # looked, lost the insert, looked again
    assert state() == before


def test_a_dm_is_its_peoples_only_and_nobody_changes_who_is_in_it(clients, demo):
    slug = dm(clients["alice"], ["bob"]).json()["slug"]
    before = state()
    fixed = {"code": "forbidden", "message": "the people in a direct message are fixed; start another one instead"}
    hidden = {"code": "not_found", "message": "no such room"}
    for who, method, path, body, expected in [
        ("alice", "post", "join/", None, (403, fixed)),
        ("alice", "post", "leave/", None, (403, fixed)),
        ("alice", "post", "members/", {"username": "carol"}, (403, fixed)),
        ("alice", "patch", "members/bob/", {"role": "reader"}, (403, fixed)),
        ("alice", "delete", "members/bob/", None, (403, fixed)),
        ("alice", "delete", "members/alice/", None, (403, fixed)),
        ("carol", "post", "join/", None, (404, hidden)),
        ("carol", "get", "members/", None, (404, hidden)),
        ("carol", "get", "messages/", None, (404, hidden)),
        # Staff see every room but a DM: it is nobody else's.
        ("admin", "get", "messages/", None, (404, hidden)),
        ("admin", "post", "join/", None, (404, hidden)),
        ("admin", "get", "members/", None, (404, hidden)),
    ]:
        kwargs = {"content_type": JSON} if body is not None else {}
        args = (f"/api/v1/rooms/{slug}/{path}",) + ((body,) if body is not None else ())
        res = getattr(clients[who], method)(*args, **kwargs)
        assert (res.status_code, res.json()) == expected, (who, method, path)
    assert state() == before
    assert slug not in [r["slug"] for r in clients["admin"].get("/api/v1/rooms/").json()["rooms"]]
    assert slug not in [r["slug"] for r in clients["carol"].get("/api/v1/rooms/?browse=public").json()["rooms"]]
    assert clients["admin"].get(f"/rooms/{slug}/").status_code == 404
    # Its people read, post and list its members.
    assert clients["bob"].post(f"/api/v1/rooms/{slug}/messages/", {"body": "hi", "client_id": "d1"},
                               content_type=JSON).status_code == 200
    assert [m["user"] for m in clients["bob"].get(f"/api/v1/rooms/{slug}/members/").json()["members"]] == [
        "alice", "bob"]


def test_the_room_page_says_what_kind_of_room_it_is(clients):
    import json
    import re

    def config(client, slug):
        page = client.get(f"/rooms/{slug}/")
        found = re.search(r'<script id="realtime-config" type="application/json">(.*?)</script>',
                          page.content.decode(), re.S)
        return json.loads(found.group(1))

    slug = dm(clients["alice"], ["bob", "carol"]).json()["slug"]
    mine = config(clients["alice"], slug)
    assert (mine["kind"], mine["title"], mine["topic"], mine["canPost"], mine["canManageMembers"], mine["role"]) == (
        "dm", "bob, carol", "", True, False, "member")
    assert config(clients["bob"], slug)["title"] == "alice, carol"
    general = config(clients["alice"], "general")
    assert (general["kind"], general["canManageMembers"], general["role"]) == ("room", True, "owner")
    assert config(clients["bob"], "general")["canManageMembers"] is False
