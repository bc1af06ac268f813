"""GET /api/v1/people/?q=: the people a DM or an invitation may name, by the start
of their username (the page's pickers): active people only, never the asker, any
case, at most 8 in name order; LIKE's wildcards are plain characters; a bad `q` is
invalid and costs no token; the lookup has its own bucket.

Demo data (tests/conftest.py): alice, bob, carol, admin.
"""

from __future__ import annotations

import pytest
from django.contrib.auth import get_user_model
from django.test import Client

pytestmark = pytest.mark.django_db


def people(client, **params):
    return client.get("/api/v1/people/", params)


@pytest.mark.parametrize("q, found", [
    ("b", ["bob"]),
    ("BO", ["bob"]),
    ("@bo", ["bob"]),  # as typed after an @
    ("  car ", ["carol"]),
    ("a", ["admin"]),  # alice asks: never herself
    ("bobby", []),
    ("%", []),  # a wildcard is a character
    ("_ob", []),
])
def test_people_whose_name_starts_so(clients, q, found):
    response = people(clients["alice"], q=q)
    assert response.status_code == 200, response.content
    assert response.json() == {"people": found}


def test_active_people_only_at_most_eight_in_name_order(clients):
    User = get_user_model()
    for i in (9, 3, 0, 7, 1, 8, 2, 6, 5, 4):
        User.objects.create_user(f"pat{i}")
    User.objects.create_user("pa_gone", is_active=False)
    User.objects.create_user("pa%cent")
    assert people(clients["bob"], q="pa").json() == {"people": ["pa%cent", *(f"pat{i}" for i in range(7))]}
    assert people(clients["bob"], q="pa%").json() == {"people": ["pa%cent"]}
    assert people(clients["bob"], q="pa_").json() == {"people": []}


@pytest.mark.parametrize("params", [{}, {"q": ""}, {"q": "   "}, {"q": "@"}, {"q": "x" * 151}, {"q": "nul\x00"},
                                    {"q": "tab\tbed"}])
def test_a_bad_q_is_invalid_and_costs_no_token(clients, params, settings):
    settings.REALTIME = {**settings.REALTIME, "RATE_LIMITS": {**settings.REALTIME["RATE_LIMITS"], "people": (0.001, 1)}}
    response = people(clients["alice"], **params)
    assert response.status_code == 400
    assert response.json()["code"] == "invalid"
    assert people(clients["alice"], q="b").status_code == 200  # the one token was still there


def test_the_lookup_has_its_own_bucket(clients, settings):
    settings.REALTIME = {**settings.REALTIME, "RATE_LIMITS": {**settings.REALTIME["RATE_LIMITS"], "people": (0.001, 3)}}
    assert [people(clients["alice"], q="b").status_code for _ in range(4)] == [200, 200, 200, 429]
    assert people(clients["alice"], q="b").json()["code"] == "rate_limited"
    assert people(clients["bob"], q="a").status_code == 200  # bob's bucket is his own


def test_signed_out_is_refused():
    response = people(Client(), q="b")
    assert response.status_code == 403
