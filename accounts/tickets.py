"""Short-lived, single-use connection tickets for clients that cannot send the
session cookie on a WebSocket handshake (scripts, native apps).

A ticket stands for the session that asked for it, and lives no longer than it:
- redeeming checks that session as a request would (it exists, has not expired,
  belongs to the user, who is active, and whose password has not changed since);
- ending the session (logout, session deletion, password change, deactivation)
  deletes its unredeemed tickets (accounts/signals.py), so nothing of it is left
  to redeem even for the seconds a ticket lives;
- a socket opened with it is closed like that session's other sockets.
Only a hash of the ticket is stored; the ticket itself is never logged.
"""

from __future__ import annotations

import hashlib
import math
import secrets
import time

from django.contrib.auth import get_user_model
from django.core.cache import cache

from accounts.sessions import session_is_valid

TICKET_TTL = 30  # seconds

# The clock a ticket's age is read by (tests put one they move in its place): wall
# time, as tickets are shared by every worker through the cache.
wall_clock = time.time


def _key(ticket: str) -> str:
    return "ticket:" + hashlib.sha256(ticket.encode()).hexdigest()


def _index(user_id: int) -> str:
    """The user's unredeemed tickets: {ticket key: session key}."""
    return f"tickets-of:{user_id}"


def issue(*, user_id: int, session_key: str) -> str:
    ticket = secrets.token_urlsafe(32)
    key = _key(ticket)
    # It expires by its own timestamp (the cache's timeout clears it away as well).
    cache.set(key, {"user": user_id, "session": session_key, "expires": wall_clock() + TICKET_TTL}, TICKET_TTL)
    index = cache.get(_index(user_id)) or {}
    index = {k: s for k, s in index.items() if cache.has_key(k)}  # redeemed or expired ones go
    index[key] = session_key
    cache.set(_index(user_id), index, TICKET_TTL)
    return ticket


def redeem(ticket: str) -> tuple[object | None, str | None]:
    """(user, session_key) for a valid unused ticket whose session is still good,
    else (None, None). The cache's delete answers True to exactly one caller,
    which makes the ticket single-use."""
    if not ticket or len(ticket) > 100:
        return None, None
    key = _key(ticket)
    data = cache.get(key)
    if not data or not cache.delete(key):
        return None, None
    if wall_clock() >= data.get("expires", math.inf):  # (one issued before "expires": the cache's timeout)
        return None, None
    if not session_is_valid(data["session"], data["user"]):
        return None, None
    user = get_user_model().objects.filter(pk=data["user"], is_active=True).first()
    return (user, data["session"]) if user is not None else (None, None)


def revoke_session(user_id: int, session_key: str) -> None:
    """Delete the unredeemed tickets that stand for this session."""
    index = cache.get(_index(user_id)) or {}
    doomed = [k for k, s in index.items() if s == session_key]
    if doomed:
        cache.delete_many(doomed)
        cache.set(_index(user_id), {k: s for k, s in index.items() if s != session_key}, TICKET_TTL)


def revoke_ended(user_id: int) -> None:
    """Delete the user's unredeemed tickets whose session is no longer good (after a
    password change or a deactivation)."""
    index = cache.get(_index(user_id)) or {}
    for session_key in set(index.values()):
        if not session_is_valid(session_key, user_id):
            revoke_session(user_id, session_key)
