"""The socket's address and subprotocols, and every error and close code: the one
source (static/realtime/codes.js is generated from it, and a test holds them equal)."""

from __future__ import annotations

import enum

PATH = "/ws/v1/"
SUBPROTOCOL_JSON = "rt.v1.json"
SUBPROTOCOL_MSGPACK = "rt.v1.msgpack"
SUBPROTOCOL_PROTOBUF = "rt.v1.protobuf"  # docs/protocol.proto (protocol/proto.py)
SUBPROTOCOLS = (SUBPROTOCOL_JSON, SUBPROTOCOL_MSGPACK, SUBPROTOCOL_PROTOBUF)


# A 4012's reason: "spread_ms=N". The window, in ms, over which the server wants
# the socket back: the client draws its moment uniformly in [0, N]. A drain closes
# its sockets in batches N ms apart, so its clients come back as evenly as they were
# closed, at the pace it chose (REALTIME_DRAIN_RATE), with no second of jitter on
# top. Without a hint (uvicorn's 1012, an older worker) the client keeps its own.
RESTART_SPREAD = "spread_ms"
RESTART_SPREAD_MAX_MS = 30_000  # what a client takes at most from a hint


def restart_reason(spread_ms: int) -> str:
    """The close reason of a 4012 that asks for the socket back within `spread_ms`."""
    return f"{RESTART_SPREAD}={int(spread_ms)}"


def restart_spread(reason: str | None) -> int | None:
    """The hint of a 4012's reason (restart_reason), in ms, at most
    RESTART_SPREAD_MAX_MS; None when there is none or it is malformed (what
    static/realtime/socket.js's restartSpread does)."""
    key, sep, value = (reason or "").partition("=")
    if not sep or key != RESTART_SPREAD or not value.isascii() or not value.isdigit() or len(value) > 9:
        return None
    return min(int(value), RESTART_SPREAD_MAX_MS)


class ErrorCode(enum.StrEnum):
    """The `code` of an `error` frame (and of REST error bodies)."""

    INVALID = "invalid"  # malformed frame, missing or wrongly typed field, bad value
    UNKNOWN_TYPE = "unknown_type"  # `type` names no client frame
    FORBIDDEN = "forbidden"  # the policy refuses this action, in a room the user can see
    NOT_FOUND = "not_found"  # no such room or message (a room the user may not see is none)
    RATE_LIMITED = "rate_limited"  # too many of this action, or the replay budget; retry after `retry_after` s
    TOO_LARGE = "too_large"  # a body or frame over its limit
    CONFLICT = "conflict"  # the request contradicts the state (e.g. client_id reused elsewhere)
    RECOVERY_FAILED = "recovery_failed"  # `since` is outside the replay window, or of another epoch: reload history
    INTERNAL = "internal"  # a server fault; nothing was changed


# How each error code answers over HTTP (REST, the long poll, docs/protocol.md).
HTTP_STATUS: dict[ErrorCode, int] = {
    ErrorCode.INVALID: 400,
    ErrorCode.UNKNOWN_TYPE: 400,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.TOO_LARGE: 413,
    ErrorCode.CONFLICT: 409,
    ErrorCode.RECOVERY_FAILED: 410,
    ErrorCode.INTERNAL: 500,
}


class CloseCode(enum.IntEnum):
    """Close codes the app decides (daphne only lets an app send 1000 and 3000-4999)."""

    NORMAL = 1000
    NOT_AUTHENTICATED = 4001  # not signed in, or the session ended (logout, password change, deactivation, expiry): log in
    FORBIDDEN = 4003  # disconnected by an operator (the realtime console): do not retry by itself
    POLICY = 4008  # bad origin after accept, abuse
    INTERNAL = 4011  # internal error
    SERVICE_RESTART = 4012  # reconnect now, spread over the reason's spread_ms (else with jitter)
    OVERLOADED = 4013  # reconnect with backoff
    RATE_LIMITED = 4029  # a flood, or sockets opened too often: wait retry_after
    PROTOCOL_VIOLATION = 4400  # the client broke the protocol


class TransportCode(enum.IntEnum):
    """Close codes the server or a proxy sends by itself (RFC 6455), which a client
    must understand as well."""

    GOING_AWAY = 1001  # reconnect with backoff
    ABNORMAL = 1006  # no close frame (a crash, a cut connection): reconnect with backoff
    TOO_LARGE = 1009  # a frame over the size limit
    SERVER_ERROR = 1011
    SERVER_RESTART = 1012  # like 4012 (uvicorn sends it on SIGTERM)
    TRY_AGAIN_LATER = 1013  # like 4013
