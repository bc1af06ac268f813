"""Is a socket's session still good? The same answer Django's auth gives a request."""

from importlib import import_module

from django.conf import settings
from django.contrib.auth import HASH_SESSION_KEY, SESSION_KEY, get_user_model
from django.utils.crypto import constant_time_compare


def session_user(session_key: str | None, user_id: int):
    """The user, as the database has them now, while the session exists, has not
    expired, still belongs to this user, the user is active, and the password has
    not changed since it was made; else None."""
    if not session_key:
        return None
    store = import_module(settings.SESSION_ENGINE).SessionStore(session_key)
    data = store.load()  # {} when missing or expired
    if str(data.get(SESSION_KEY)) != str(user_id):
        return None
    user = get_user_model().objects.filter(pk=user_id, is_active=True).first()
    if user is None or not constant_time_compare(data.get(HASH_SESSION_KEY, ""), user.get_session_auth_hash()):
        return None
    return user


def session_is_valid(session_key: str | None, user_id: int) -> bool:
    return session_user(session_key, user_id) is not None
