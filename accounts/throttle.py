"""Sign-in throttling that stops password guessing without locking anyone else out.

Three counters of failed sign-ins, each a django-ratelimit window in the shared
cache (Redis in production), each keyed so that an attacker fills only their own:

- per client address (LOGIN_RATE_LIMIT): guessing from one address, at any
  accounts, stops there. The address is the client's real one (realtime/web/proxies.py),
  never the load balancer's, so one address's failures never block another's.
- per account, from browsers that never signed in to it (LOGIN_ACCOUNT_RATE_LIMIT):
  guessing one password from many addresses stops. This is the counter an
  attacker could use against the account's owner, so it does not apply to:
- a browser that signed in to the account before: a successful sign-in leaves a
  signed device cookie naming the account, and that browser's failures are counted
  per device (LOGIN_DEVICE_RATE_LIMIT) instead. Someone hammering alice's account
  from elsewhere locks out the unknown browsers, not alice's own.

Past a limit the form answers 429 with Retry-After and says how long to wait; the
password is not checked at all (a right guess does not get through). Only failed
attempts count; the counters' windows end by themselves. Sign-ups are counted per
client address the same way (every attempt). Addresses are counted IPv6 by /64.
While the cache cannot be reached, each process keeps the same counters in its own
memory (LocalCounters): the limits then hold per worker process, not in all, and
no request fails for the outage.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import threading
import time
import unicodedata
from dataclasses import dataclass

from django.conf import settings
from django.core import signing
from django.http import HttpRequest, HttpResponse
from django_ratelimit.core import _split_rate, get_usage

from realtime.observability.logs import event
from realtime.state import degraded
from realtime.web.proxies import rate_subject

log = logging.getLogger(__name__)

DEVICE_COOKIE = "rt_device"
DEVICE_SALT = "accounts.throttle.device"
DEVICE_MAX_AGE = 180 * 24 * 3600


def account_key(username: str) -> str:
    """One counter for every spelling that reaches the same account: Django's form
    normalises a username with NFKC before it looks the user up (`ａｌｉｃｅ` and
    `𝐚𝐥𝐢𝐜𝐞` sign in as alice), and case is folded on top (a stricter grouping)."""
    return unicodedata.normalize("NFKC", username).strip().casefold()[:150]


@dataclass(frozen=True, slots=True)
class Refusal:
    reason: str  # "address", "account" or "device"
    retry_after: int  # seconds
    message: str


# A rate as (count, seconds), read by django-ratelimit's own parser, so the local
# counters take every rate its cache counters do ("20/10m", "10/h", "20/600").
parse_rate = _split_rate
clock = time.monotonic  # (the local counters' clock: tests put one they move in its place)


class LocalCounters:
    """The counters of this process alone, for while the shared cache cannot be
    reached: each (group, key) a fixed window from its first count, as
    django-ratelimit's usage (count, limit, should_limit, time_left). At most
    MAX windows are kept, each under a 16-byte digest of its group and key (an
    account's key may be 150 characters): past MAX the ended ones go, then the
    least recently counted (a flood of new keys costs the oldest counters, some
    200 bytes each at most, not the process's memory)."""

    MAX = 100_000

    def __init__(self) -> None:
        self.windows: dict[bytes, tuple[float, int]] = {}  # digest -> (window end, count)
        self.lock = threading.Lock()  # (sign-in views run in a thread pool)

    @staticmethod
    def digest(group: str, key: str) -> bytes:
        return hashlib.blake2b(f"{group}\0{key}".encode(), digest_size=16).digest()

    def usage(self, group: str, rate: str, key: str, increment: bool) -> dict:
        limit, period = parse_rate(rate)
        name = self.digest(group, key)
        now = clock()
        with self.lock:
            end, count = self.windows.get(name, (0.0, 0))
            if now >= end:
                end, count = now + period, 0
            if increment:
                count += 1
                self.windows.pop(name, None)  # (to the end: the most recently counted)
                self.windows[name] = (end, count)
                if len(self.windows) > self.MAX:
                    self._prune(now)
        return {"count": count, "limit": limit, "should_limit": count > limit, "time_left": max(1, round(end - now))}

    def _prune(self, now: float) -> None:
        self.windows = {k: v for k, v in self.windows.items() if v[0] > now}
        for k in list(self.windows)[:max(0, len(self.windows) - self.MAX * 9 // 10)]:
            del self.windows[k]


local_counters = LocalCounters()


def _usage(request: HttpRequest, group: str, rate: str, value: str, increment: bool) -> dict | None:
    """A counter's state: in the shared cache (Redis), or while it raises, in this
    process's own (LocalCounters: no 500, and the limits hold on each worker;
    django-ratelimit's RATELIMIT_FAIL_OPEN does not cover a cache that raises).
    None, let through: django-ratelimit counted nothing (no rate, or with
    RATELIMIT_FAIL_OPEN a cache that answered without a count)."""
    try:
        return get_usage(request, group=group, key=lambda _group, _request: value, rate=rate, increment=increment)
    except Exception as exc:
        degraded.tolerate(degraded.SIGN_IN_COUNTERS, exc)
        return local_counters.usage(group, rate, value, increment)


def _address(request: HttpRequest) -> str:
    """The client's address (realtime/web/proxies.py), IPv6 by its /64."""
    return rate_subject(request.META.get("REMOTE_ADDR", ""))


def known_device(request: HttpRequest, username: str) -> str | None:
    """The device id of this browser's cookie, if it signed in to `username` before."""
    raw = request.COOKIES.get(DEVICE_COOKIE)
    if not raw:
        return None
    try:
        data = signing.loads(raw, salt=DEVICE_SALT, max_age=DEVICE_MAX_AGE)
    except signing.BadSignature:
        return None
    if not isinstance(data, dict) or data.get("a") != account_key(username):
        return None
    device = data.get("d")
    return device if isinstance(device, str) else None


def _counters(request: HttpRequest, username: str) -> list[tuple[str, str, str]]:
    """(group, rate, key) of each counter this attempt is counted under."""
    counters = [("login.address", settings.LOGIN_RATE_LIMIT, _address(request))]
    device = known_device(request, username)
    if device is not None:
        counters.append(("login.device", settings.LOGIN_DEVICE_RATE_LIMIT, device))
    elif username:
        counters.append(("login.account", settings.LOGIN_ACCOUNT_RATE_LIMIT, account_key(username)))
    return counters


MESSAGES = {
    "address": "Too many failed sign-ins from your network. Try again in {wait}.",
    "account": "Too many failed sign-ins to this account from browsers it has not been used on. "
               "Try again in {wait}, or from a browser you signed in with before.",
    "device": "Too many failed sign-ins from this browser. Try again in {wait}.",
}


def _wait_text(seconds: int) -> str:
    minutes = (seconds + 59) // 60
    return f"{minutes} minute{'s' if minutes != 1 else ''}" if seconds > 60 else f"{max(1, seconds)} seconds"


def refusal(request: HttpRequest, username: str) -> Refusal | None:
    """Whether this attempt may not even be checked: a counter it falls under is full."""
    for group, rate, key in _counters(request, username):
        usage = _usage(request, group, rate, key, increment=False)
        if usage is not None and usage["limit"] and usage["count"] >= usage["limit"]:
            reason = group.split(".", 1)[1]
            wait = max(1, usage["time_left"])
            return Refusal(reason, wait, MESSAGES[reason].format(wait=_wait_text(wait)))
    return None


def signup_refusal(request: HttpRequest) -> bool:
    """Whether this address has used up its sign-ups (and count this one if not)."""
    usage = _usage(request, "signup.address", settings.SIGNUP_RATE_LIMIT, _address(request), increment=True)
    return usage is not None and usage["should_limit"]


def failed(request: HttpRequest, username: str) -> None:
    """Count a failed sign-in under each of its counters."""
    for group, rate, key in _counters(request, username):
        _usage(request, group, rate, key, increment=True)
    event(log, logging.INFO, "login.failed", addr=_address(request))


def refused(request: HttpRequest, found: Refusal) -> None:
    event(log, logging.WARNING, "login.throttled", addr=_address(request), reason=found.reason)


def remember_device(request: HttpRequest, response: HttpResponse, username: str) -> None:
    """After a successful sign-in: this browser is now known to the account (a new
    device id each time, so a stolen cookie's failures stay its own)."""
    value = signing.dumps({"a": account_key(username), "d": secrets.token_urlsafe(12)}, salt=DEVICE_SALT)
    response.set_cookie(
        DEVICE_COOKIE, value, max_age=DEVICE_MAX_AGE, path="/accounts/", secure=settings.SESSION_COOKIE_SECURE,
        httponly=True, samesite="Lax",
    )
