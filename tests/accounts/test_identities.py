"""The handshake's session read (accounts/identities.py): Django's own answer for
every kind of cookie, read for many handshakes at once."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from asgiref.sync import sync_to_async
from django.contrib.auth import get_user_model
from django.contrib.sessions.models import Session
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from accounts import identities

User = get_user_model()


def signed_in(user) -> str:
    client = Client()
    client.force_login(user)
    return client.cookies["sessionid"].value


def answer(result: tuple) -> tuple:
    user, key = result
    return (user.get_username() if user.is_authenticated else None, key)


@pytest.fixture
def people(db):
    made = {name: User.objects.create_user(name, password="pw-" + name * 3) for name in
            ("ann", "ben", "cid", "dee", "eve")}
    return made


@pytest.mark.django_db
def test_every_kind_of_cookie_gets_djangos_answer(people, settings):
    keys = {name: signed_in(user) for name, user in people.items()}
    # ben: deactivated; cid: password changed since (the hash no longer matches);
    # dee: session expired; eve: her session names a backend no longer configured.
    User.objects.filter(pk=people["ben"].pk).update(is_active=False)
    people["cid"].set_password("another-one-entirely")
    User.objects.filter(pk=people["cid"].pk).update(password=people["cid"].password)
    Session.objects.filter(session_key=keys["dee"]).update(expire_date=timezone.now() - timedelta(seconds=1))
    store = Session.objects.get(session_key=keys["eve"])
    data = store.get_decoded()
    data["_auth_user_backend"] = "somewhere.else.Backend"
    Session.objects.filter(session_key=keys["eve"]).update(
        session_data=identities.import_module(identities.DB_ENGINE).SessionStore().encode(data))

    asked = [keys["ann"], keys["ben"], keys["cid"], keys["dee"], keys["eve"], "x" * 32, "short", "", None]
    found = identities.resolve(asked)
    assert {k: answer(v) for k, v in found.items()} == {
        keys["ann"]: ("ann", keys["ann"]),
        keys["ben"]: (None, keys["ben"]),  # inactive: anonymous, the session kept (as Django)
        keys["cid"]: (None, None),  # a stale hash: anonymous, and Django flushed the session
        keys["dee"]: (None, None),
        keys["eve"]: (None, keys["eve"]),
        "x" * 32: (None, None), "short": (None, None), "": (None, None), None: (None, None),
    }
    assert not Session.objects.filter(session_key=keys["cid"]).exists()
    # The same, key by key, from Django itself (cid's session is gone now: anonymous).
    for key in asked:
        assert answer(identities.one(key)) == answer(found[key]), key


@pytest.mark.django_db
def test_a_batch_of_plain_sessions_is_two_queries(people):
    keys = [signed_in(user) for user in people.values()]
    with CaptureQueriesContext(connection) as queries:
        found = identities.resolve(keys)
    assert [answer(found[k])[0] for k in keys] == list(people)
    assert len(queries) == 2  # the sessions, the users


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_handshakes_waiting_together_are_read_together(people, monkeypatch):
    keys = [await sync_to_async(signed_in)(user) for user in people.values()] * 4
    batches = []
    real = identities.resolve

    def counted(asked):
        batches.append(len(asked))
        return real(asked)

    monkeypatch.setattr(identities._batcher, "resolve", counted)
    results = await asyncio.gather(*(identities.session_user(key) for key in keys))
    assert [answer(r)[0] for r in results] == list(people) * 4
    assert batches == [5]  # twenty handshakes, five cookies: one read
    # Alone, a handshake is read at once, on its own.
    assert answer(await identities.session_user(keys[0]))[0] == "ann"
    assert batches == [5, 1]


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_a_failed_read_fails_its_batch_and_the_next_reads_afresh(people, monkeypatch):
    key = await sync_to_async(signed_in)(people["ann"])
    real = identities.resolve
    failing = [True]

    def flaky(asked):
        if failing.pop() if failing else False:
            raise RuntimeError("database away")
        return real(asked)

    monkeypatch.setattr(identities._batcher, "resolve", flaky)
    outcomes = await asyncio.gather(identities.session_user(key), identities.session_user(key), return_exceptions=True)
    assert [type(o).__name__ for o in outcomes] == ["RuntimeError", "RuntimeError"]
    assert answer(await identities.session_user(key)) == ("ann", key)
