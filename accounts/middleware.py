"""WebSocket authentication by ticket (`/ws/v1/?ticket=...`), in front of the
session middleware: a socket with a ticket is that ticket's user and session."""

from __future__ import annotations

from urllib.parse import parse_qs

from channels.db import database_sync_to_async
from django.contrib.auth.models import AnonymousUser

from . import tickets


class _TicketSession:
    """What the consumer reads of a session: its key."""

    def __init__(self, session_key: str | None):
        self.session_key = session_key


class TicketAuthMiddleware:
    def __init__(self, inner):
        self.inner = inner

    async def __call__(self, scope, receive, send):
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        if "ticket" not in query:
            return await self.inner(scope, receive, send)
        user, session_key = await database_sync_to_async(tickets.redeem)(query["ticket"][0])
        # A bad, reused or expired ticket is an anonymous socket: accepted, then 4001.
        scope = {**scope, "user": user or AnonymousUser(), "session": _TicketSession(session_key), "ticket": True}
        return await self.inner(scope, receive, send)
