"""WebSocket authentication.

- SocketAuthMiddleware: the /ws/v1/ socket's handshake in one middleware: the
  Origin check, then the user from a ticket (`/ws/v1/?ticket=...`), a JWT
  (`Authorization: Bearer`, or `?access_token=`; accounts/bearer.py) or else the
  session cookie, in the scope it was given.
- TicketAuthMiddleware: the ticket alone, for a stack of channels' middleware
  (the bench's baseline route keeps that stack: project/asgi.py).
A socket with a ticket is that ticket's user and session; a socket with a token
is the token's user, with no session, until the token's `exp` (scope["grant"]).
"""

from __future__ import annotations

from urllib.parse import parse_qs

from channels.db import database_sync_to_async
from channels.security.websocket import WebsocketDenier
from django.conf import settings
from django.contrib.auth.models import AnonymousUser
from django.http.cookie import parse_cookie

from realtime.state import degraded, ratelimit
from realtime.web.origins import origin_allowed, origin_of, refuse_log
from realtime.web.proxies import rate_subject, scope_address

from accounts import bearer, identities, tickets


async def _token_identity(scope, token: str) -> dict:
    """The scope keys of a socket opened with a bearer token: its user (active) and
    grant, or an anonymous socket (accepted, then 4001) with one log line saying
    why, never the token. The token leaves the scope either way."""
    scope["query_string"] = b""  # (access_token): nothing keeps it for the socket's life
    try:
        grant = bearer.verify(token)
    except bearer.Refused as refused:
        bearer.refused_log(refused.reason, refused.kid, scope_address(scope))
        return {"user": AnonymousUser(), "session": SessionRef(None)}
    user = await identities.active_user(grant.user_id)
    if user is None:
        bearer.refused_log("user", grant.kid, scope_address(scope))
        return {"user": AnonymousUser(), "session": SessionRef(None)}
    return {"user": user, "session": SessionRef(None), "grant": grant}


class SessionRef:
    """What the consumer reads of a socket's session: its key. The session itself
    (its store and decoded data) is not kept for the socket's life."""

    __slots__ = ("session_key",)

    def __init__(self, session_key: str | None):
        self.session_key = session_key


async def _ticket_identity(ticket: str) -> dict:
    """The scope keys of a socket opened with `ticket`. A bad, reused or expired
    ticket is an anonymous socket: accepted, then 4001. While the ticket store
    (Redis) is down the socket is closed with 4013, to retry (state/degraded.py)."""
    try:
        user, session_key = await database_sync_to_async(tickets.redeem)(ticket)
    except Exception as exc:
        degraded.tolerate(degraded.TICKETS, exc)
        return {"user": AnonymousUser(), "session": SessionRef(None), "ticket": True, "unavailable": True}
    return {"user": user or AnonymousUser(), "session": SessionRef(session_key), "ticket": True}


def _ticket(scope) -> str | None:
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    return query["ticket"][0] if "ticket" in query else None


class TicketAuthMiddleware:
    def __init__(self, inner):
        self.inner = inner

    async def __call__(self, scope, receive, send):
        ticket = _ticket(scope)
        if ticket is None:
            return await self.inner(scope, receive, send)
        return await self.inner({**scope, **await _ticket_identity(ticket)}, receive, send)


class SocketAuthMiddleware:
    """OriginValidator(AuthMiddlewareStack(TicketAuthMiddleware(inner))) in one:
    the same checks and the same scope["user"], with scope["session"] a SessionRef.

    Each of channels' layers copies the scope and stays suspended in `await
    inner(...)` for the socket's life, the session wrapper re-reads the session at
    every message sent, and the scope keeps the decoded session: some 6 KiB an idle
    socket (bench/memprobe.py). This adds its keys to the scope it is given (the
    server's, which nothing else keeps), and keeps no frame of its own for the
    socket's life: an inner app that takes the admission (`after_admission`,
    RealtimeConsumer.as_asgi) runs `admit` first in its own coroutine, which then
    serves the socket; any other inner app is awaited after it (admit_then).
    """

    # (__call__ hands back the app's coroutine: ASGI 3, though not a coroutine function)
    _asgi_single_callable = True

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, scope, receive, send):
        after_admission = getattr(self.inner, "after_admission", None)
        if after_admission is not None:
            return after_admission(self.admit, scope, receive, send)
        return self.admit_then(scope, receive, send)

    async def admit_then(self, scope, receive, send):
        refusal = await self.admit(scope)
        if refusal is not None:
            return await refusal(scope, receive, send)
        return await self.inner(scope, receive, send)

    async def admit(self, scope):
        """The handshake's checks: None when the socket goes on to the consumer,
        with the user in the scope (anonymous, throttled or unavailable sockets
        included: the consumer accepts, then closes them with their code); else
        the app that refuses the handshake (a foreign Origin: HTTP 403)."""
        origin = origin_of(scope)
        if not origin_allowed(origin):
            refuse_log(origin)
            return WebsocketDenier()
        # Handshakes per client address, before the session is even read: a
        # reconnect loop or a flood of anonymous upgrades costs a token each.
        verdict = await ratelimit.take(rate_subject(scope_address(scope)), "handshake.address")
        if not verdict.allowed:
            scope.update({"user": AnonymousUser(), "session": SessionRef(None), "throttled": verdict.retry_after})
            return None
        scope.update(await self.identify(scope))
        return None

    @staticmethod
    async def identify(scope) -> dict:
        ticket = _ticket(scope)
        if ticket is not None:
            return await _ticket_identity(ticket)
        token = bearer.token_of(scope)
        if token is not None:
            return await _token_identity(scope, token)
        cookies = {}
        for name, value in scope.get("headers", ()):
            if name == b"cookie":
                cookies = parse_cookie(value.decode("latin1"))
                break
        # channels' SessionMiddleware and AuthMiddleware on their own, read together
        # with the other handshakes waiting (accounts/identities.py).
        user, session_key = await identities.session_user(cookies.get(settings.SESSION_COOKIE_NAME))
        return {"user": user, "session": SessionRef(session_key)}
