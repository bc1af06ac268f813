"""Short-lived, single-use connection tickets for clients that cannot send the
session cookie on a WebSocket handshake (scripts, native apps).

A ticket stands for the session that asked for it: a socket opened with it is
closed like that session's other sockets (logout, password change, deactivation).
Only a hash of the ticket is stored; the ticket itself is never logged.
"""

from __future__ import annotations

import hashlib
import secrets

from django.contrib.auth import get_user_model
from django.core.cache import cache

TICKET_TTL = 30  # seconds


def _key(ticket: str) -> str:
    return "ticket:" + hashlib.sha256(ticket.encode()).hexdigest()


def issue(*, user_id: int, session_key: str) -> str:
    ticket = secrets.token_urlsafe(32)
    cache.set(_key(ticket), {"user": user_id, "session": session_key}, TICKET_TTL)
    return ticket


def redeem(ticket: str) -> tuple[object | None, str | None]:
    """(user, session_key) for a valid unused ticket, else (None, None). The cache's
    delete answers True to exactly one caller, which makes the ticket single-use."""
    if not ticket or len(ticket) > 100:
        return None, None
    key = _key(ticket)
    data = cache.get(key)
    if not data or not cache.delete(key):
        return None, None
    user = get_user_model().objects.filter(pk=data["user"], is_active=True).first()
    return (user, data["session"]) if user is not None else (None, None)
