"""The client's real address, for every limit and log line.

Behind a load balancer every connection comes from the balancer's own address, so
a limit keyed on the TCP peer would put every client in one bucket. The balancer
says who the client is in `X-Forwarded-For`, but anyone can send that header, so
it is believed only as far as it was written by a proxy we trust:

- the peer is not a trusted proxy: the client is the peer, whatever the headers say;
- the peer is a trusted proxy: walk `X-Forwarded-For` from the right (each proxy
  appends the address it saw), skipping trusted proxies; the first address that
  is not one is the client. A malformed entry ends the walk: the client is the
  last hop that was vouched for.

REALTIME_TRUSTED_PROXIES (environment: the same name) lists the trusted proxies'
addresses or networks (`127.0.0.1`, `10.0.0.0/8`, `::1`), and `unix` for a
balancer that reaches the worker over a UNIX socket (no peer address at all);
empty by default, which is right for a worker that faces the clients itself.

`ProxyHeadersMiddleware` applies this to every HTTP and WebSocket scope before
anything reads it: `scope["client"]` becomes the client's address (so Django's
REMOTE_ADDR, django-ratelimit's `key="ip"`, the socket's limits and the logs all
see it), and the TCP peer is kept in `scope["peer"]`. From a peer that is not
trusted, `X-Forwarded-Proto` is dropped, so that a client cannot make Django
believe a plain-http request came over https (settings.SECURE_PROXY_SSL_HEADER).
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache

from django.conf import settings

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(entries: list[str]) -> tuple[Network, ...]:
    """The networks of REALTIME_TRUSTED_PROXIES (ValueError names a bad entry)."""
    networks = []
    for entry in entries:
        try:
            networks.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError:
            raise ValueError(f"{entry!r} is not an IP address or network (e.g. 10.0.0.1 or 10.0.0.0/8)") from None
    return tuple(networks)


UNIX = "unix"


@lru_cache(maxsize=8)
def _trusted(entries: tuple[str, ...]) -> tuple[Network, ...]:
    return parse_networks([entry for entry in entries if entry != UNIX])


def trusted_networks() -> tuple[Network, ...]:
    return _trusted(tuple(settings.REALTIME_TRUSTED_PROXIES))


def _ip(value: str):
    value = value.strip()
    if value.startswith("[") and "]" in value:  # [v6]:port
        value = value[1:value.index("]")]
    elif value.count(":") == 1:  # v4:port
        value = value.split(":", 1)[0]
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        return None
    mapped = getattr(address, "ipv4_mapped", None)
    return mapped or address


def is_trusted(address, networks: tuple[Network, ...]) -> bool:
    return address is not None and any(address in network for network in networks)


def peer_trusted(peer: str) -> bool:
    """Whether the TCP peer (or, with no address, a UNIX-socket peer) is a trusted proxy."""
    if not peer:
        return UNIX in settings.REALTIME_TRUSTED_PROXIES
    return _peer_trusted(peer, tuple(settings.REALTIME_TRUSTED_PROXIES))


@lru_cache(maxsize=4096)
def _peer_trusted(peer: str, entries: tuple[str, ...]) -> bool:
    """peer_trusted, remembered for the last 4,096 peers: each connection asks twice
    (the connection guard, the proxy headers), and an address's parse and the
    networks' walk cost more than the rest of either."""
    return is_trusted(_ip(peer), _trusted(entries))


def client_address(peer: str, forwarded_for: list[str], networks: tuple[Network, ...] | None = None,
                   trusted_peer: bool | None = None) -> str:
    """The client's address: `peer` unless it is a trusted proxy, else the rightmost
    address of `forwarded_for` (the header's values, in order) that is not one."""
    networks = trusted_networks() if networks is None else networks
    if trusted_peer is None:
        trusted_peer = is_trusted(_ip(peer), networks)
    if not trusted_peer:
        return peer
    current = peer
    hops = [hop for value in forwarded_for for hop in value.split(",")]
    for hop in reversed(hops):
        address = _ip(hop)
        if address is None:
            break  # garbage (or an attacker's text): the last vouched-for hop is the client
        current = str(address)
        if not is_trusted(address, networks):
            break
    return current


class ProxyHeadersMiddleware:
    """ASGI middleware: scope["client"] is the client's real address (module doc).

    The scope is changed in place (the server made it for this connection alone;
    a copy would cost every open socket a second dict). Not a coroutine function
    (it hands back the app's own awaitable): the flag tells asgiref it is ASGI 3."""

    _asgi_single_callable = True

    def __init__(self, app):
        self.app = app

    def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            self.resolve(scope)
        return self.app(scope, receive, send)

    @staticmethod
    def resolve(scope) -> None:
        client = scope.get("client")
        peer = client[0] if client else ""
        if not peer_trusted(peer):
            headers = scope.get("headers")
            if headers:
                names = {name for name, _ in headers}
                if b"x-forwarded-proto" in names:
                    scope["headers"] = [(n, v) for n, v in headers if n != b"x-forwarded-proto"]
                if b"x-forwarded-for" in names:
                    _untrusted_forwarder(peer or UNIX)
            return
        forwarded = [v.decode("latin-1") for n, v in scope.get("headers", ()) if n == b"x-forwarded-for"]
        if not forwarded:
            return
        address = client_address(peer, forwarded, trusted_networks(), trusted_peer=True)
        if address != peer:
            scope["peer"] = client
            scope["client"] = [address, 0]


_warned: set[str] = set()


def _untrusted_forwarder(peer: str) -> None:
    """A peer that forwards (a proxy we were not told of, or a client forging the
    header): say so once per peer address (at most 20), so that an operator who
    forgot REALTIME_TRUSTED_PROXIES finds out before every client shares one address."""
    if peer in _warned or len(_warned) >= 20:
        return
    _warned.add(peer)
    import logging

    from realtime.observability.logs import event

    event(logging.getLogger(__name__), logging.WARNING, "proxy.untrusted", addr=peer,
          reason="X-Forwarded-For from a peer not in REALTIME_TRUSTED_PROXIES: ignored")


@lru_cache(maxsize=4096)
def rate_subject(address: str) -> str:
    """The key a limit per client address uses: the address, or for IPv6 its /64
    (one host's share; a /128 each would give a single attacker 2^64 buckets).
    Remembered for the last 4,096 addresses: each socket asks three times (the
    connection guard twice, the handshake's limit once), and a parse costs more
    than the rest of the guard."""
    found = _ip(address)
    if isinstance(found, ipaddress.IPv6Address):
        return str(ipaddress.ip_network(f"{found}/64", strict=False).network_address) + "/64"
    return str(found) if found is not None else address


def scope_address(scope) -> str:
    """The client's address of a scope that went through ProxyHeadersMiddleware."""
    client = scope.get("client")
    return client[0] if client else ""
