"""JWT at the handshake, for clients without a Django session (services, bots,
mobile apps): `Authorization: Bearer <token>` on the upgrade, or `?access_token=`
for a client that cannot set headers.

Configured by REALTIME_JWT_KEYS, a comma-separated list of keys by id (`kid`):
`kid:secret` is an HS256 key (at least 32 bytes), `kid:@path` a PEM public key file
(RSA: RS256; EC P-256: ES256; P-384: ES384). Each key's algorithm is pinned by the
key, never read from the token: a token that names `none`, or another algorithm
than its key's (the HS/RS confusion), is refused. A token must carry `kid` in its
header, and `exp`, `sub` (the user's id), `aud` (REALTIME_JWT_AUDIENCE) and `iss`
(REALTIME_JWT_ISSUER) in its claims; it may live at most REALTIME_JWT_MAX_LIFETIME
seconds (from `iat` when it has one, and from now). Keys rotate by `kid`: list the
new key beside the old, have the issuer sign with the new one, and drop the old once
its last tokens have expired (minutes).

A socket opened with a token lives until the token's `exp`: the client sends a
fresh token in an `auth.refresh` frame before then, or the socket is closed with
4001. The user behind the token is checked as a session's is: deactivated, or a
password changed, closes the socket (4001) at the next signal or sweep.

A token is never logged: a refusal logs its reason (and the key id, if any).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import jwt
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

log = logging.getLogger(__name__)

MAX_TOKEN = 4096  # bytes: a larger token is refused unread
MIN_SECRET = 32  # bytes of an HS256 key


@dataclass(frozen=True)
class Key:
    kid: str
    algorithm: str
    key: object  # an HMAC secret (bytes) or a public key object


@dataclass(frozen=True)
class Grant:
    """What a verified token grants: the user, until `exp` (Unix seconds)."""

    user_id: int
    exp: float
    kid: str


class Refused(Exception):
    """A token that does not pass; `reason` is a short word for the log line."""

    def __init__(self, reason: str, kid: str | None = None) -> None:
        super().__init__(reason)
        self.reason, self.kid = reason, kid


def _public_key(kid: str, path: str):
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        key = load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        raise ImproperlyConfigured(f"REALTIME_JWT_KEYS: key {kid!r}: cannot read a PEM public key from {path} "
                                   f"({type(exc).__name__})") from None
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < 2048:
            raise ImproperlyConfigured(f"REALTIME_JWT_KEYS: key {kid!r}: RSA keys of fewer than 2048 bits are refused")
        return "RS256", key
    if isinstance(key, ec.EllipticCurvePublicKey):
        algorithm = {"secp256r1": "ES256", "secp384r1": "ES384"}.get(key.curve.name)
        if algorithm is None:
            raise ImproperlyConfigured(f"REALTIME_JWT_KEYS: key {kid!r}: curve {key.curve.name} is not supported "
                                       "(P-256 or P-384)")
        return algorithm, key
    raise ImproperlyConfigured(f"REALTIME_JWT_KEYS: key {kid!r}: an RSA or EC public key is needed")


@lru_cache(maxsize=4)
def parse_keys(text: str) -> dict[str, Key]:
    """REALTIME_JWT_KEYS as {kid: Key}; ImproperlyConfigured naming the setting for
    anything it cannot use."""
    keys: dict[str, Key] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        kid, sep, value = item.partition(":")
        kid = kid.strip()
        if not sep or not kid or not value:
            raise ImproperlyConfigured("REALTIME_JWT_KEYS: each key is `kid:secret` or `kid:@path/to/public.pem`")
        if kid in keys:
            raise ImproperlyConfigured(f"REALTIME_JWT_KEYS: key id {kid!r} is listed twice")
        if value.startswith("@"):
            algorithm, key = _public_key(kid, value[1:])
        else:
            secret = value.encode()
            if len(secret) < MIN_SECRET:
                raise ImproperlyConfigured(f"REALTIME_JWT_KEYS: key {kid!r}: an HS256 secret needs at least "
                                           f"{MIN_SECRET} bytes")
            if b"-----BEGIN" in secret:
                raise ImproperlyConfigured(f"REALTIME_JWT_KEYS: key {kid!r}: a PEM key as an HMAC secret; "
                                           "give a public key as @path")
            algorithm, key = "HS256", secret
        keys[kid] = Key(kid, algorithm, key)
    return keys


def keys() -> dict[str, Key]:
    return parse_keys(getattr(settings, "REALTIME_JWT_KEYS", ""))


def enabled() -> bool:
    return bool(keys())


def check_settings() -> None:
    """At start-up: the keys parse, and the audience and issuer are set with them."""
    if not enabled():
        return
    for name in ("REALTIME_JWT_AUDIENCE", "REALTIME_JWT_ISSUER"):
        if not getattr(settings, name, ""):
            raise ImproperlyConfigured(f"{name} is required with REALTIME_JWT_KEYS")


REASONS = (
    (jwt.ExpiredSignatureError, "expired"),
    (jwt.InvalidAudienceError, "audience"),
    (jwt.InvalidIssuerError, "issuer"),
    (jwt.InvalidAlgorithmError, "algorithm"),
    (jwt.InvalidSignatureError, "signature"),
    (jwt.ImmatureSignatureError, "not-yet-valid"),
    (jwt.MissingRequiredClaimError, "missing-claim"),
    (jwt.InvalidKeyError, "algorithm"),
    (jwt.DecodeError, "malformed"),
    (jwt.InvalidTokenError, "invalid"),
)


def verify(token: str, now: float | None = None) -> Grant:
    """The grant of a valid token; Refused (with a reason) for anything else."""
    found = keys()
    if not found:
        raise Refused("not-configured")
    if not token or len(token) > MAX_TOKEN:
        raise Refused("malformed")
    try:
        header = jwt.get_unverified_header(token)
    except jwt.InvalidTokenError:
        raise Refused("malformed") from None
    kid = header.get("kid")
    if not isinstance(kid, str) or kid not in found:
        raise Refused("unknown-kid")
    key = found[kid]
    if header.get("alg") != key.algorithm:
        raise Refused("algorithm", kid)
    leeway = settings.REALTIME_JWT_LEEWAY
    try:
        claims = jwt.decode(
            token, key.key, algorithms=[key.algorithm], audience=settings.REALTIME_JWT_AUDIENCE,
            issuer=settings.REALTIME_JWT_ISSUER, leeway=leeway,
            options={"require": ["exp", "sub", "aud", "iss"], "verify_sub": True},
        )
    except jwt.PyJWTError as exc:
        reason = next((word for kind, word in REASONS if isinstance(exc, kind)), "invalid")
        raise Refused(reason, kid) from None
    now = time.time() if now is None else now
    exp, longest = float(claims["exp"]), settings.REALTIME_JWT_MAX_LIFETIME
    iat = claims.get("iat")
    if exp - now > longest + leeway or (isinstance(iat, (int, float)) and exp - iat > longest):
        raise Refused("lifetime", kid)
    sub = claims["sub"]
    if not (isinstance(sub, str) and sub.isdigit() and 0 < int(sub) < 2**63) or not math.isfinite(exp):
        raise Refused("subject", kid)
    return Grant(int(sub), exp, kid)


def refused_log(reason: str, kid: str | None, addr: str | None = None) -> None:
    """One line for a refused token: why, and its key id; never the token."""
    from realtime.observability.logs import event

    event(log, logging.INFO, "auth.token_refused", reason=reason, kid=kid, addr=addr)


def token_of(scope) -> str | None:
    """The bearer token of a handshake's scope: the Authorization header, or else
    the access_token query parameter; None without either."""
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, rest = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer":
                return rest.strip()
    from urllib.parse import parse_qs

    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    return query["access_token"][0] if "access_token" in query else None
