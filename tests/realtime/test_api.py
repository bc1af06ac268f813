"""REST API v1: the same rules and shapes as the socket."""

import pytest
from channels.layers import get_channel_layer
from asgiref.sync import async_to_sync
from django.test import Client

from realtime.delivery import publish as broadcast
from realtime.domain import services
from realtime.models import Event, Message, Room

pytestmark = pytest.mark.django_db



def post(client, room, body="hi", client_id="c1"):
    return client.post(f"/api/v1/rooms/{room}/messages/", {"body": body, "client_id": client_id}, content_type="application/json")


def test_anonymous_is_refused(demo):
    for path in ("/api/v1/rooms/", "/api/v1/rooms/general/events/", "/api/v1/rooms/general/messages/"):
        assert Client().get(path).status_code == 403


def test_rooms_lists_what_each_user_may_see(clients):
    def slugs(name):
        return [(r["slug"], r["role"]) for r in clients[name].get("/api/v1/rooms/").json()["rooms"]]

    assert slugs("alice") == [("general", "owner"), ("ops", "owner")]
    assert slugs("carol") == [("general", "reader")]
    assert slugs("admin") == [("general", None), ("ops", None)]


def test_post_is_idempotent_and_matches_the_socket_ack(clients):
    first = post(clients["alice"], "general")
    assert first.status_code == 200
    body = first.json()
    assert body == {"room": "general", "id": Message.objects.get().id, "seq": 1}
    assert post(clients["alice"], "general").json() == body
    assert Message.objects.count() == 1 and Event.objects.count() == 1


@pytest.mark.parametrize(
    "user, room, payload, status, code",
    [
        ("carol", "general", {"body": "x", "client_id": "a"}, 403, "forbidden"),
        ("carol", "ops", {"body": "x", "client_id": "a"}, 404, "not_found"),  # private: as if it did not exist
        ("alice", "nope", {"body": "x", "client_id": "a"}, 404, "not_found"),
        ("alice", "general", {"body": "x"}, 400, "invalid"),
        ("alice", "general", {"body": "x", "client_id": "a", "extra": 1}, 400, "invalid"),
        ("alice", "general", {"body": "x" * 4001, "client_id": "a"}, 413, "too_large"),
        ("alice", "general", {"body": "  ", "client_id": "a"}, 400, "invalid"),
    ],
)
def test_post_refusals(clients, user, room, payload, status, code):
    res = clients[user].post(f"/api/v1/rooms/{room}/messages/", payload, content_type="application/json")
    assert res.status_code == status
    assert res.json()["code"] == code
    assert Message.objects.count() == 0


def test_post_broadcasts_after_commit(clients, django_capture_on_commit_callbacks):
    layer = get_channel_layer()
    channel = async_to_sync(layer.new_channel)()
    async_to_sync(layer.group_add)(broadcast.room_group("general"), channel)
    with django_capture_on_commit_callbacks(execute=True):
        post(clients["alice"], "general", body="over rest")
    message = async_to_sync(layer.receive)(channel)
    assert message["seq"] == 1 and '"body":"over rest"' in message["rt.v1.json"]


def test_events_since_returns_the_socket_shapes(clients):
    for i in range(3):
        post(clients["alice"], "general", body=f"m{i}", client_id=f"c{i}")
    data = clients["bob"].get("/api/v1/rooms/general/events/?since=1").json()
    assert data["seq"] == 3
    assert [(e["type"], e["seq"], e["body"]) for e in data["events"]] == [("message.new", 2, "m1"), ("message.new", 3, "m2")]
    assert set(data["events"][0]) == {"type", "room", "seq", "id", "author", "body", "client_id", "ts"}
    assert clients["bob"].get("/api/v1/rooms/general/events/?since=3").json() == {
        "events": [], "seq": 3, "epoch": Room.objects.get(slug="general").epoch, "has_more": False}
    paged = clients["bob"].get("/api/v1/rooms/general/events/?since=0&limit=2").json()
    assert [e["seq"] for e in paged["events"]] == [1, 2] and paged["has_more"] is True
    rest = clients["bob"].get("/api/v1/rooms/general/events/?since=2&limit=2").json()
    assert [e["seq"] for e in rest["events"]] == [3] and rest["has_more"] is False


@pytest.mark.parametrize("query, status, code", [("since=9", 410, "recovery_failed"), ("since=x", 400, "invalid"), ("since=-1", 400, "invalid")])
def test_events_bad_since(clients, query, status, code):
    res = clients["bob"].get(f"/api/v1/rooms/general/events/?{query}")
    assert res.status_code == status and res.json()["code"] == code


def test_a_private_room_is_answered_as_if_it_did_not_exist(clients):
    for path in ("/api/v1/rooms/{}/events/?since=0", "/api/v1/rooms/{}/messages/"):
        hidden, missing = (clients["carol"].get(path.format(room)) for room in ("ops", "nope"))
        assert hidden.status_code == missing.status_code == 404
        assert hidden.json() == missing.json() == {"code": "not_found", "message": "no such room"}


def test_messages_history_pages_newest_last_without_deleted(clients, demo):
    ids = [post(clients["alice"], "general", body=f"m{i}", client_id=f"c{i}").json()["id"] for i in range(5)]
    services.perform_sync(services.message_delete, user=demo["alice"], slug="general", message_id=ids[4])
    data = clients["bob"].get("/api/v1/rooms/general/messages/?limit=2").json()
    assert data["seq"] == 6 and data["has_more"] is True
    assert [m["body"] for m in data["messages"]] == ["m2", "m3"]
    older = clients["bob"].get(f"/api/v1/rooms/general/messages/?limit=5&before={data['messages'][0]['seq']}").json()
    assert [m["body"] for m in older["messages"]] == ["m0", "m1"] and older["has_more"] is False


def test_edit_and_delete_over_rest_follow_the_sockets_rules(clients):
    """The long-polling fallback edits and deletes through these."""
    mid = post(clients["bob"], "general", body="first").json()["id"]
    url = f"/api/v1/rooms/general/messages/{mid}/"
    # Someone else's message: refused, nothing changes.
    res = clients["alice"].patch(url, {"body": "hijack"}, content_type="application/json")
    assert (res.status_code, res.json()["code"]) == (403, "forbidden")
    res = clients["bob"].patch(url, {"body": "x", "extra": 1}, content_type="application/json")
    assert (res.status_code, res.json()["code"]) == (400, "invalid")
    res = clients["bob"].patch(url, {"body": "second"}, content_type="application/json")
    assert res.status_code == 200 and res.json() == {"room": "general", "id": mid, "seq": 2}
    assert Message.objects.get(pk=mid).body == "second"
    assert clients["carol"].delete(url).status_code == 403  # a reader
    res = clients["alice"].delete(url)  # the owner may moderate
    assert res.status_code == 200 and res.json()["seq"] == 3
    assert Message.objects.get(pk=mid).deleted_at is not None
    assert [e.type for e in Event.objects.order_by("seq")] == ["message.new", "message.edited", "message.deleted"]
    assert clients["alice"].delete("/api/v1/rooms/general/messages/999999/").status_code == 404


def test_rest_edits_share_the_sockets_bucket(clients, settings):
    settings.REALTIME = {**settings.REALTIME, "RATE_LIMITS": {**settings.REALTIME["RATE_LIMITS"], "message.edit": (0.01, 1)}}
    mid = post(clients["bob"], "general", body="first").json()["id"]
    url = f"/api/v1/rooms/general/messages/{mid}/"
    assert clients["bob"].patch(url, {"body": "one"}, content_type="application/json").status_code == 200
    res = clients["bob"].patch(url, {"body": "two"}, content_type="application/json")
    assert res.status_code == 429 and res.json()["code"] == "rate_limited" and "Retry-After" in res


def test_read_over_rest_moves_forward_only(clients):
    for i in range(2):
        post(clients["alice"], "general", body=f"m{i}", client_id=f"rr{i}")
    res = clients["bob"].post("/api/v1/rooms/general/read/", {"seq": 1}, content_type="application/json")
    assert res.status_code == 200 and res.json() == {"room": "general", "seq": 1}
    assert clients["bob"].post("/api/v1/rooms/general/read/", {"seq": 0}, content_type="application/json").json()["seq"] == 1
    assert clients["bob"].post("/api/v1/rooms/general/read/", {"seq": 50}, content_type="application/json").json()["seq"] == 2
    assert clients["carol"].post("/api/v1/rooms/ops/read/", {"seq": 1}, content_type="application/json").status_code == 404
    assert clients["bob"].post("/api/v1/rooms/general/read/", {"seq": -1}, content_type="application/json").status_code == 400


HOSTILE_BODIES = [
    ("application/json", b"[" * 50_000 + b"]" * 50_000),           # RecursionError in Python's json
    ("application/json", b'{"body": ' + b"[" * 5_000 + b"]" * 5_000 + b', "client_id": "x"}'),
    ("application/json", b"\xff\xfe not utf-8"),
    ("application/json", b'{"body": "hi", "client_id": "x"'),      # cut short
    ("application/json", b'["body", "hi"]'),                         # the wrong shape
    ("application/json", b'"just a string"'),
    ("application/json", b'{"body": 1e999999, "client_id": "x"}'),
    ("application/json", b'{"body": "\\ud800", "client_id": "x"}'),  # a lone surrogate
    ("multipart/form-data; boundary=x", b"--x\r\nnonsense"),
    ("multipart/form-data", b"no boundary at all"),
    ("application/x-www-form-urlencoded", b"body=%ff%fe&client_id=%"),
    ("text/plain", b"hello"),
]


@pytest.mark.parametrize("content_type, data", HOSTILE_BODIES, ids=range(len(HOSTILE_BODIES)))
def test_hostile_bodies_are_answered_4xx_with_one_warning_and_store_nothing(clients, caplog, content_type, data):
    import logging

    caplog.set_level(logging.WARNING)
    res = clients["bob"].generic("POST", "/api/v1/rooms/general/messages/", data, content_type=content_type)
    assert res.status_code == (415 if content_type == "text/plain" else 400), res.content
    assert Message.objects.count() == 0
    assert [r.levelname for r in caplog.records] == ["WARNING"], [r.getMessage()[:200] for r in caplog.records]


@pytest.mark.parametrize("path", ["/no/such/page/", "/api/v1/nothing/", "/api/v1/rooms/general/messages/x/",
                                  "/rooms/Not A Slug/"])
def test_unknown_paths_are_404_with_one_warning(clients, caplog, path):
    import logging

    caplog.set_level(logging.WARNING)
    assert clients["bob"].get(path).status_code == 404
    assert [r.levelname for r in caplog.records] == ["WARNING"]
