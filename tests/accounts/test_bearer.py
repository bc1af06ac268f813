"""JWT at the handshake (accounts/bearer.py): what a token must be, what every kind
of bad one gets (4001 and a log line without the token), the socket's life until
`exp` and `auth.refresh`, key rotation, and revocation as for a session."""

from __future__ import annotations

import contextlib
import logging
import time

import jwt
import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from django.core.exceptions import ImproperlyConfigured
from django.test import Client

from accounts import bearer
from tests.conftest import HOST, ORIGIN, call, subscribe

SECRET = "s" * 40
OLD_SECRET = "o" * 40
AUD, ISS = "realtime-tests", "https://issuer.example"


@pytest.fixture
def jwt_settings(settings):
    settings.REALTIME_JWT_KEYS = f"k1:{SECRET}"
    settings.REALTIME_JWT_AUDIENCE, settings.REALTIME_JWT_ISSUER = AUD, ISS
    settings.REALTIME_JWT_MAX_LIFETIME, settings.REALTIME_JWT_LEEWAY = 900, 5
    return settings


def token(sub="2", kid="k1", key=SECRET, alg="HS256", lifetime=300, now=None, **claims) -> str:
    now = time.time() if now is None else now
    payload = {"sub": sub, "aud": AUD, "iss": ISS, "iat": int(now), "exp": int(now + lifetime), **claims}
    payload = {k: v for k, v in payload.items() if v is not None}
    headers = {"kid": kid} if kid is not None else {}
    return jwt.encode(payload, key, algorithm=alg, headers=headers)


def pem_pair(kind: str, tmp_path):
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048) if kind == "rsa" \
        else ec.generate_private_key(ec.SECP256R1())
    public = private.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    path = tmp_path / f"{kind}.pem"
    path.write_bytes(public)
    return private, path, public


# -- what a token must be ----------------------------------------------------------
def test_a_good_token_grants_its_user_until_exp(jwt_settings):
    now = time.time()
    grant = bearer.verify(token(sub="7", now=now), now=now)
    assert (grant.user_id, grant.exp, grant.kid) == (7, int(now + 300), "k1")


@pytest.mark.parametrize("make, reason", [
    (lambda: token(lifetime=-60), "expired"),
    (lambda: token(aud="someone-else"), "audience"),
    (lambda: token(iss="https://evil.example"), "issuer"),
    (lambda: token(kid="k9"), "unknown-kid"),
    (lambda: token(kid=None), "unknown-kid"),
    (lambda: token(key="x" * 40), "signature"),
    (lambda: token(lifetime=3600), "lifetime"),
    (lambda: token(exp=None), "missing-claim"),
    (lambda: token(sub="alice"), "subject"),
    (lambda: token(nbf=int(time.time() + 600)), "not-yet-valid"),
    (lambda: "not.a.token", "malformed"),
    (lambda: "x" * 5000, "malformed"),
    # alg none: unsigned, naming a key that is HS256.
    (lambda: jwt.encode({"sub": "2", "aud": AUD, "iss": ISS, "exp": int(time.time() + 60)}, None, algorithm="none",
                        headers={"kid": "k1"}), "algorithm"),
])
def test_every_kind_of_bad_token_is_refused_with_its_reason(jwt_settings, make, reason):
    with pytest.raises(bearer.Refused) as refused:
        bearer.verify(make())
    assert refused.value.reason == reason


def test_the_algorithm_is_the_keys_hs_rs_confusion_refused(jwt_settings, tmp_path):
    private, path, public = pem_pair("rsa", tmp_path)
    jwt_settings.REALTIME_JWT_KEYS = f"rs:@{path}"
    assert bearer.verify(token(kid="rs", key=private, alg="RS256")).user_id == 2
    # The public key (which anyone may have) used as an HMAC secret: refused by the
    # key's pinned algorithm, before any signature check. (PyJWT itself also refuses
    # to sign HS256 with a PEM, so the token is made by hand.)
    import base64
    import hashlib
    import hmac
    import json

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    head = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "rs"}).encode())
    body = b64(json.dumps({"sub": "2", "aud": AUD, "iss": ISS, "exp": int(time.time() + 60)}).encode())
    forged = f"{head}.{body}." + b64(hmac.new(public, f"{head}.{body}".encode(), hashlib.sha256).digest())
    with pytest.raises(bearer.Refused) as refused:
        bearer.verify(forged)
    assert refused.value.reason == "algorithm"


def test_es256_keys_and_rotation_by_kid(jwt_settings, tmp_path):
    private, path, _ = pem_pair("ec", tmp_path)
    jwt_settings.REALTIME_JWT_KEYS = f"old:{OLD_SECRET},new:@{path}"
    old = token(kid="old", key=OLD_SECRET)
    new = token(kid="new", key=private, alg="ES256", sub="3")
    assert (bearer.verify(old).user_id, bearer.verify(new).user_id) == (2, 3)
    # The old key dropped once its tokens have expired: its tokens are refused.
    jwt_settings.REALTIME_JWT_KEYS = f"new:@{path}"
    with pytest.raises(bearer.Refused, match="unknown-kid"):
        bearer.verify(old)
    assert bearer.verify(new).user_id == 3


@pytest.mark.parametrize("value, says", [
    ("k1:short", "at least 32 bytes"),
    ("k1:" + "a" * 40 + ",k1:" + "b" * 40, "listed twice"),
    ("k1:@/nonexistent/key.pem", "cannot read a PEM public key"),
    ("nocolon", "each key is"),
    ("k1:-----BEGIN PUBLIC KEY-----" + "a" * 40, "a PEM key as an HMAC secret"),
])
def test_keys_it_cannot_use_stop_start_up_naming_the_setting(value, says):
    with pytest.raises(ImproperlyConfigured) as caught:
        bearer.parse_keys(value)
    assert str(caught.value).startswith("REALTIME_JWT_KEYS: ") and says in str(caught.value)


def test_keys_without_audience_or_issuer_stop_start_up(settings):
    settings.REALTIME_JWT_KEYS, settings.REALTIME_JWT_AUDIENCE, settings.REALTIME_JWT_ISSUER = f"k1:{SECRET}", "", ISS
    with pytest.raises(ImproperlyConfigured, match="REALTIME_JWT_AUDIENCE is required"):
        bearer.check_settings()


def test_tokens_are_refused_when_no_keys_are_configured(settings):
    settings.REALTIME_JWT_KEYS = ""
    with pytest.raises(bearer.Refused, match="not-configured"):
        bearer.verify(token())


# -- sockets ---------------------------------------------------------------------
def token_socket(value: str, how: str = "header"):
    from project.asgi import application

    headers = [HOST, ORIGIN]
    path = "/ws/v1/"
    if how == "header":
        headers.append((b"authorization", f"Bearer {value}".encode()))
    else:
        path += f"?access_token={value}"
    return WebsocketCommunicator(application, path, headers=headers, subprotocols=["rt.v1.json"])


@contextlib.asynccontextmanager
async def opened(value: str, how: str = "header"):
    comm = token_socket(value, how)
    connected, _ = await comm.connect(timeout=5)
    assert connected
    try:
        yield comm
    finally:
        await comm.disconnect()


async def closed_with(comm, timeout: float = 3) -> int:
    while True:
        output = await comm.receive_output(timeout=timeout)
        if output["type"] == "websocket.close":
            return output["code"]


pytestmark_sockets = [pytest.mark.asyncio, pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("layer")]


@pytest.mark.parametrize("how", ["header", "query"])
@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("layer")
async def test_a_token_socket_is_its_users_and_chats(jwt_settings, demo, how):
    bob = demo["bob"]
    async with opened(token(sub=str(bob.pk)), how) as comm:
        await subscribe(comm, "general")
        ack = await call(comm, {"type": "message.send", "room": "general", "body": "from a bot", "client_id": "b1",
                                "ref": 1})
        assert ack["type"] == "ack"
        new = await comm.receive_json_from(timeout=5)
        assert (new["type"], new["author"]) == ("message.new", "bob")


@pytest.mark.parametrize("bad", ["expired", "audience", "unknown-kid", "algorithm", "malformed", "inactive"])
@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("layer")
async def test_a_bad_token_gets_4001_and_a_log_line_without_it(jwt_settings, demo, bad, caplog):
    bob = demo["bob"]
    if bad == "inactive":
        bob.is_active = False
        await bob.asave()
    value = {
        "expired": lambda: token(sub=str(bob.pk), lifetime=-60),
        "audience": lambda: token(sub=str(bob.pk), aud="other"),
        "unknown-kid": lambda: token(sub=str(bob.pk), kid="zz"),
        "algorithm": lambda: jwt.encode({"sub": str(bob.pk), "aud": AUD, "iss": ISS, "exp": int(time.time() + 60)},
                                        None, algorithm="none", headers={"kid": "k1"}),
        "malformed": lambda: "garbage",
        "inactive": lambda: token(sub=str(bob.pk)),
    }[bad]()
    caplog.set_level(logging.DEBUG)
    async with opened(value) as comm:
        assert await closed_with(comm) == 4001
    refused = [r for r in caplog.records if getattr(r, "event", None) == "auth.token_refused"]
    assert [r.reason for r in refused] == [{"inactive": "user"}.get(bad, bad)]
    # Not the token, nor any part of it, in any field of any record.
    parts = [part for part in [value, *value.split(".")] if len(part) > 8]
    fields = [str(v) for r in caplog.records for v in r.__dict__.values()]
    assert not [part for part in parts for f in fields if part in f]


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("layer")
async def test_the_socket_closes_at_exp_unless_refreshed(jwt_settings, demo):
    bob, alice = demo["bob"], demo["alice"]
    jwt_settings.REALTIME_JWT_LEEWAY = 0
    async with opened(token(sub=str(bob.pk), lifetime=2)) as comm:
        await subscribe(comm, "general")
        # A refused refresh changes nothing; another user's token is forbidden.
        reply = await call(comm, {"type": "auth.refresh", "token": token(sub=str(bob.pk), aud="x"), "ref": "r0"})
        assert (reply["type"], reply["code"], reply["ref"]) == ("error", "invalid", "r0")
        reply = await call(comm, {"type": "auth.refresh", "token": token(sub=str(alice.pk)), "ref": "r1"})
        assert (reply["type"], reply["code"]) == ("error", "forbidden")
        fresh = token(sub=str(bob.pk), lifetime=4)
        reply = await call(comm, {"type": "auth.refresh", "token": fresh, "ref": "r2"})
        assert reply == {"type": "ack", "ref": "r2", "exp": jwt.decode(fresh, options={"verify_signature": False})["exp"]}
        started = time.time()
        # Still open past the first token's exp (2 s), closed at the fresh one's.
        assert await closed_with(comm, timeout=8) == 4001
        assert time.time() - started >= 2.5
    async with opened(token(sub=str(bob.pk), lifetime=1)) as comm:
        assert await closed_with(comm, timeout=5) == 4001


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("layer")
async def test_a_session_socket_cannot_refresh_a_token(jwt_settings, cookies):
    from tests.conftest import socket

    async with socket(cookies["bob"]) as comm:
        reply = await call(comm, {"type": "auth.refresh", "token": token(), "ref": 1})
        assert (reply["type"], reply["code"]) == ("error", "invalid")


@pytest.mark.parametrize("change", ["deactivate", "password"])
@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("layer")
async def test_revoking_the_user_closes_their_token_sockets(jwt_settings, demo, change):
    bob = demo["bob"]
    async with opened(token(sub=str(bob.pk))) as comm:
        await subscribe(comm, "general")
        if change == "deactivate":
            bob.is_active = False
        else:
            await sync_to_async(bob.set_password)("a-new-long-password")
        await bob.asave()
        assert await closed_with(comm) == 4001


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("layer")
async def test_a_logout_elsewhere_leaves_a_token_socket_open(jwt_settings, demo):
    bob = demo["bob"]
    browser = Client()
    await sync_to_async(browser.force_login)(bob)
    async with opened(token(sub=str(bob.pk))) as comm:
        await subscribe(comm, "general")
        await sync_to_async(browser.post)("/accounts/logout/")
        assert await call(comm, {"type": "ping", "ref": 1}) == {"type": "pong", "ref": 1}
