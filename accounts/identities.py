"""Whose session cookie is this? For many handshakes at once.

A socket's handshake reads its session and its user, as channels' AuthMiddleware
does: two queries on the worker's one database thread. In a reconnect storm
(a drain, a crash: every socket of a worker back within seconds) that was a sixth
of the thread's work, and the thread the storm's pace. Here the handshakes that
wait together are read together (realtime/state/batches.py): one query for their
sessions, one for their users.

The answer is Django's own (django.contrib.auth.get_user): the session must exist,
be unexpired and name a backend still configured; the user must exist and be
allowed to authenticate by it; the session's auth hash must match the user's now.
The batched read decides only the plain cases (database sessions, a backend that
reads users as ModelBackend does, a hash that matches or a session that does not
exist); anything else (another engine or backend, a hash made with a fallback
secret, one that no longer matches: Django flushes that session) is asked of
Django's get_user itself, key by key, inside the same trip.
"""

from __future__ import annotations

from importlib import import_module
from types import SimpleNamespace

from django.conf import settings
from django.contrib import auth
from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY, get_user_model
from django.contrib.auth.backends import ModelBackend
from django.contrib.auth.models import AnonymousUser
from django.utils import timezone
from django.utils.crypto import constant_time_compare

from realtime.state.batches import Batcher

DB_ENGINE = "django.contrib.sessions.backends.db"


def one(session_key: str | None) -> tuple:
    """Django's answer for one cookie: (user or AnonymousUser, the session's key or
    None when there is no such session)."""
    store = import_module(settings.SESSION_ENGINE).SessionStore(session_key)
    user = auth.get_user(SimpleNamespace(session=store))
    return user, store.session_key


def _plain_backend(path: str | None) -> bool:
    """Whether the session's backend is configured and reads users as ModelBackend
    does (by primary key, then user_can_authenticate)."""
    if path not in settings.AUTHENTICATION_BACKENDS:
        return False
    backend = auth.load_backend(path)
    return (isinstance(backend, ModelBackend) and type(backend).get_user is ModelBackend.get_user
            and type(backend).user_can_authenticate is ModelBackend.user_can_authenticate)


def resolve(keys: list) -> dict:
    """{cookie: (user, session key)} for every cookie in `keys` (module doc)."""
    found: dict = {}
    if settings.SESSION_ENGINE != DB_ENGINE:
        return {key: one(key) for key in keys}
    from django.contrib.sessions.models import Session

    store_class = import_module(DB_ENGINE).SessionStore
    valid = [key for key in keys if key and store_class()._validate_session_key(key)]
    rows = Session.objects.filter(session_key__in=valid, expire_date__gt=timezone.now()).values_list(
        "session_key", "session_data")
    sessions = {key: store_class().decode(data) for key, data in rows}
    model = get_user_model()
    wanted = {}
    for key, data in sessions.items():
        try:
            wanted[key] = model._meta.pk.to_python(data[SESSION_KEY])
        except Exception:
            continue  # no user in it, or not a key: Django's own answer below
    users = {user.pk: user for user in model._default_manager.filter(pk__in=set(wanted.values()))}
    plain: dict = {}
    for key in keys:
        data = sessions.get(key)
        if data is None:
            found[key] = (AnonymousUser(), None)  # no such session (or expired)
            continue
        user = users.get(wanted.get(key))
        path = data.get(BACKEND_SESSION_KEY)
        if path not in plain:
            plain[path] = _plain_backend(path)
        if (
            user is not None and plain[path]
            and ModelBackend().user_can_authenticate(user)
            and data.get(HASH_SESSION_KEY) and constant_time_compare(data[HASH_SESSION_KEY], user.get_session_auth_hash())
        ):
            found[key] = (user, key)
        else:
            found[key] = one(key)
    return found


_batcher = Batcher("session_user", resolve)


async def session_user(session_key: str | None) -> tuple:
    """(user, session key) for one socket's cookie, read with the others waiting."""
    return await _batcher.get(session_key)


def active_users(ids: list) -> dict:
    """{user id: the active user, or None} for every id in `ids` (a token's `sub`),
    in one query."""
    model = get_user_model()
    users = {user.pk: user for user in model._default_manager.filter(pk__in=set(ids), is_active=True)}
    return {pk: users.get(pk) for pk in ids}


_active = Batcher("active_user", active_users)


async def active_user(user_id: int):
    """The active user with this id, or None: a token socket's user, read with the
    other handshakes' waiting."""
    return await _active.get(user_id)
