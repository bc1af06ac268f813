"""GET /api/v1/search/: only what the asker may read now, newest first, paged
without repeats or gaps, snippets as parts, hostile queries answered cleanly.

The module runs on the embedded SQLite (the word-regex fallback) and, through
test_the_same_tests_pass_on_postgresql, once more on a private PostgreSQL
(full-text search over the GIN index of migration 0007), where the index test
runs too.
"""

from __future__ import annotations

import pytest
from django.db import connection
from django.test import Client

from realtime.domain import search, services
from realtime.models import Membership, Message, Room
from tests.conftest import run_module_on_postgresql

pytestmark = pytest.mark.django_db

ON_POSTGRESQL = connection.vendor == "postgresql"



@pytest.fixture
def lift_search_limit(settings):
    settings.REALTIME = {**settings.REALTIME,
                         "RATE_LIMITS": {**settings.REALTIME["RATE_LIMITS"], "search": (1000, 1000)}}


def say(demo, who, room, body):
    result, _ = services.message_send(user=demo[who], slug=room, body=body, client_id=f"c{Message.objects.count()}")
    return result.id


def find(client, **params):
    return client.get("/api/v1/search/", params)


def hits(client, **params):
    response = find(client, **params)
    assert response.status_code == 200, response.content
    return [(r["room"], r["id"]) for r in response.json()["results"]]


def test_a_result_has_its_room_id_seq_author_time_and_snippet(clients, demo):
    mid = say(demo, "alice", "general", "deploy the parser today")
    body = find(clients["bob"], q="parser").json()
    message = Message.objects.get(pk=mid)
    assert body == {
        "results": [{
            "room": "general", "id": mid, "seq": message.seq, "author": "alice",
            "ts": message.created_at.isoformat().replace("+00:00", "Z"),
            "snippet": [{"text": "deploy the ", "match": False}, {"text": "parser", "match": True},
                        {"text": " today", "match": False}],
        }],
        "next": None,
    }


def test_a_private_room_is_searched_by_its_members_only(clients, demo):
    secret = say(demo, "alice", "ops", "the launch code is zebra")
    public = say(demo, "alice", "general", "zebra crossing")
    assert hits(clients["bob"], q="zebra") == [("general", public), ("ops", secret)]
    assert hits(clients["carol"], q="zebra") == [("general", public)]
    assert hits(clients["admin"], q="zebra") == [("general", public), ("ops", secret)]
    # Naming the room changes nothing: it does not exist for carol.
    response = find(clients["carol"], q="zebra", room="ops")
    assert (response.status_code, response.json()["code"]) == (404, "not_found")
    assert find(clients["carol"], q="zebra", room="nope").json() == response.json()


def test_a_removed_member_loses_the_room_at_once(clients, demo):
    say(demo, "alice", "ops", "quarterly numbers")
    assert len(hits(clients["bob"], q="quarterly")) == 1
    Membership.objects.filter(room__slug="ops", user=demo["bob"]).delete()
    assert hits(clients["bob"], q="quarterly") == []


def test_a_room_made_private_is_hidden_from_non_members_at_once(clients, demo):
    say(demo, "alice", "general", "quarterly numbers")
    assert len(hits(clients["carol"], q="quarterly")) == 1
    Room.objects.filter(slug="general").update(is_public=False)
    Membership.objects.filter(room__slug="general", user=demo["carol"]).delete()
    assert hits(clients["carol"], q="quarterly") == []


def test_a_deleted_message_is_never_found(clients, demo):
    gone = say(demo, "alice", "general", "typo here")
    kept = say(demo, "alice", "general", "typo there")
    services.message_delete(user=demo["alice"], slug="general", message_id=gone)
    assert hits(clients["bob"], q="typo") == [("general", kept)]
    # Even a row that kept its body (deleted_at alone decides).
    Message.objects.filter(pk=kept).update(deleted_at=Message.objects.get(pk=gone).deleted_at)
    assert hits(clients["bob"], q="typo") == []


def test_newest_first_and_narrowed_to_one_room(clients, demo):
    a = say(demo, "alice", "general", "alpha one")
    b = say(demo, "alice", "ops", "alpha two")
    c = say(demo, "bob", "general", "alpha three")
    assert hits(clients["alice"], q="alpha") == [("general", c), ("ops", b), ("general", a)]
    assert hits(clients["alice"], q="alpha", room="general") == [("general", c), ("general", a)]


def test_words_match_whole_words_all_of_them_and_not_the_excluded(clients, demo):
    both = say(demo, "alice", "general", "Red apples and green pears")
    say(demo, "alice", "general", "red wine")
    say(demo, "alice", "general", "redirect the apples")
    assert hits(clients["bob"], q="RED apples") == [("general", both)]
    assert hits(clients["bob"], q="red -wine -pears") == []
    assert [i for _, i in hits(clients["bob"], q="apples -green")] == [Message.objects.latest("id").id]


def test_pages_have_no_repeats_and_no_gaps(clients, demo, lift_search_limit):
    ids = [say(demo, "alice", "general" if i % 3 else "ops", f"needle number {i}") for i in range(23)]
    say(demo, "alice", "general", "haystack only")
    seen, before = [], None
    while True:
        params = {"q": "needle", "limit": 5, **({"before": before} if before else {})}
        body = find(clients["bob"], **params).json()
        seen += [r["id"] for r in body["results"]]
        assert len(body["results"]) <= 5
        before = body["next"]
        if before is None:
            break
        # New messages while paging do not shift later pages.
        say(demo, "alice", "general", "needle arriving late")
    assert seen == sorted(ids, reverse=True)


def test_a_long_body_gives_a_snippet_around_the_match(clients, demo):
    body = "lorem " * 100 + "the rare word " + "ipsum " * 100
    say(demo, "alice", "general", body)
    parts = find(clients["bob"], q="rare").json()["results"][0]["snippet"]
    assert parts[0]["text"].startswith("…") and parts[-1]["text"].endswith("…")
    assert [p["text"] for p in parts if p["match"]] == ["rare"]
    assert sum(len(p["text"]) for p in parts) <= search.SNIPPET_LENGTH + 2
    assert "".join(p["text"] for p in parts).strip("…") in body


def test_snippet_parts_mark_every_occurrence_and_keep_markup_as_text():
    terms = search.clean_query("cat DOG")[1]
    assert search.snippet("<b>Cat</b> & dog; concatenate cat", terms) == [
        {"text": "<b>", "match": False}, {"text": "Cat", "match": True}, {"text": "</b> & ", "match": False},
        {"text": "dog", "match": True}, {"text": "; concatenate ", "match": False}, {"text": "cat", "match": True},
    ]


@pytest.mark.parametrize(
    "params, status, code",
    [
        ({}, 400, "invalid"),
        ({"q": ""}, 400, "invalid"),
        ({"q": "   \t "}, 400, "invalid"),
        ({"q": "x" * 201}, 400, "invalid"),
        ({"q": "\"\" -- | & ! :* ()"}, 400, "invalid"),  # no word at all
        ({"q": "nul\x00byte"}, 400, "invalid"),
        ({"q": "ok", "limit": "0"}, 400, "invalid"),
        ({"q": "ok", "limit": "many"}, 400, "invalid"),
        ({"q": "ok", "before": "-3"}, 400, "invalid"),
        ({"q": "ok", "room": "<script>"}, 404, "not_found"),
        ({"q": "ok", "room": "x\x00"}, 404, "not_found"),
        ({"q": "ok", "room": "a" * 51}, 404, "not_found"),
    ],
)
def test_bad_queries_are_refused_with_a_clear_error(clients, params, status, code):
    response = find(clients["bob"], **params)
    assert (response.status_code, response.json()["code"]) == (status, code)


@pytest.mark.parametrize(
    "q",
    ["'; DROP TABLE realtime_message; --", "a & b | !c", "\"unclosed phrase", "back\\slash\\", "x:* & (y",
     "or OR or", "-", "((((((((((needle", "needle <-> needle", "ünïcødé ωμέγα needle", "needle " * 28],
)
def test_operators_quotes_and_backslashes_never_fail(clients, demo, q, lift_search_limit):
    say(demo, "alice", "general", "needle in the haystack")
    response = find(clients["bob"], q=q)
    assert response.status_code in (200, 400), response.content
    if response.status_code == 400:
        assert response.json()["code"] == "invalid"
    assert Message.objects.count() == 1


def test_limit_is_capped(clients, demo):
    for i in range(search.MAX_PAGE + 2):
        say(demo, "alice", "general", f"many {i}")
    body = find(clients["bob"], q="many", limit=1000).json()
    assert len(body["results"]) == search.MAX_PAGE and body["next"] is not None


def test_searching_is_rate_limited_per_user(clients, demo, settings):
    settings.REALTIME = {**settings.REALTIME, "RATE_LIMITS": {**settings.REALTIME["RATE_LIMITS"], "search": (0.01, 3)}}
    for _ in range(3):
        assert find(clients["bob"], q="hello").status_code == 200
    refused = find(clients["bob"], q="hello")
    assert refused.status_code == 429
    assert refused.json()["code"] == "rate_limited" and int(refused["Retry-After"]) >= 1
    # Another user has their own bucket; a refused query costs nothing.
    assert find(clients["alice"], q="hello").status_code == 200
    assert find(clients["carol"], q="").status_code == 400


def test_anonymous_is_refused(demo):
    assert Client().get("/api/v1/search/", {"q": "x"}).status_code == 403


# Defined on PostgreSQL only (not a skip): test_the_same_tests_pass_on_postgresql runs it.
if ON_POSTGRESQL:
    def test_postgresql_answers_from_the_gin_index(demo):
        for i in range(50):
            say(demo, "alice", "general", f"filler {i}")
        say(demo, "alice", "general", "the needle")
        q, terms = search.clean_query("needle")
        rows = search.search_queryset(user=demo["bob"], q=q, terms=terms)
        with connection.cursor() as cursor:
            cursor.execute("SET LOCAL enable_seqscan = off")
        plan = rows.explain()
        assert search.INDEX_NAME in plan, plan
        assert [m.body for m in rows] == ["the needle"]


# On SQLite only (the run it starts is the PostgreSQL one).
if not ON_POSTGRESQL:
    @pytest.mark.timeout(300)
    def test_the_same_tests_pass_on_postgresql():
        """This module again, on a private PostgreSQL, where the index test runs too."""
        run_module_on_postgresql(__file__, must_pass=("test_postgresql_answers_from_the_gin_index",))
