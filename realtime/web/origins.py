"""Which pages may open the socket: an exact match of full origins.

Channels' AllowedHostsOriginValidator compares the Origin's host name with
ALLOWED_HOSTS and ignores its scheme and port, so `http://app.test:9999` passes
for an app served at `https://app.test`. Cross-site WebSocket hijacking rides on
the user's cookies, so the socket must know exactly which pages it serves.

REALTIME_ALLOWED_ORIGINS (environment: DJANGO_ALLOWED_ORIGINS) lists full origins,
`scheme://host[:port]`. An Origin is allowed when its scheme, host and port equal
one of them (default ports are implied: `https://app.test` is
`https://app.test:443`). A missing Origin, `null`, anything with a path, user
info or an unknown scheme is refused. With DEBUG on and no list, any http(s)
origin whose host is in ALLOWED_HOSTS passes (any port: development servers move);
`*` allows everything and is refused at start-up with DEBUG off (settings.py).

A refused handshake is closed before it is accepted: the browser sees HTTP 403.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from urllib.parse import urlsplit

from channels.security.websocket import WebsocketDenier
from django.conf import settings
from django.http.request import validate_host

log = logging.getLogger(__name__)

DEFAULT_PORTS = {"http": 80, "https": 443}


def parse_origin(value: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of a serialized origin, or None if it is not one."""
    try:
        parts = urlsplit(value.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS or not parts.hostname:
        return None
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username or parts.password:
        return None
    return scheme, parts.hostname.lower(), port or DEFAULT_PORTS[scheme]


# A handshake's Origin and the allowed list, parsed once each instead of at every
# handshake (a URL split each, a list's worth for the list): the last 1,024
# origins of at most ORIGIN_CACHED characters (a real one is far shorter; a
# longer one, the client's choice up to the 16 KiB of headers, is parsed each
# time rather than kept), the list while it stays.
ORIGIN_CACHED = 256
_parsed = lru_cache(maxsize=1024)(parse_origin)


@lru_cache(maxsize=8)
def _allowed(entries: tuple[str, ...]) -> frozenset:
    return frozenset(parse_origin(entry) for entry in entries)


def origin_allowed(origin: str | None) -> bool:
    allowed = settings.REALTIME_ALLOWED_ORIGINS
    if "*" in allowed:
        return True
    if origin is None:
        return False
    parsed = _parsed(origin) if len(origin) <= ORIGIN_CACHED else parse_origin(origin)
    if parsed is None:
        return False
    if allowed:
        return parsed in _allowed(tuple(allowed))
    # No list (DEBUG only; settings refuses this otherwise): the host names of
    # ALLOWED_HOSTS, on any port, over http or https.
    host = f"[{parsed[1]}]" if ":" in parsed[1] else parsed[1]
    return settings.DEBUG and validate_host(host, settings.ALLOWED_HOSTS)


def origin_of(scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"origin":
            return value.decode("latin-1")
    return None


def refuse_log(origin: str | None) -> None:
    # The Origin is no secret, but it is attacker-chosen: log a bounded repr.
    log.info("ws refused reason=origin origin=%r", (origin or "")[:100] if origin is not None else None)


class OriginValidator:
    """ASGI middleware for the websocket scope: refuse foreign origins at the handshake."""

    def __init__(self, application):
        self.application = application

    async def __call__(self, scope, receive, send):
        origin = origin_of(scope)
        if origin_allowed(origin):
            return await self.application(scope, receive, send)
        refuse_log(origin)
        denier = WebsocketDenier()
        return await denier(scope, receive, send)
