"""Token buckets per user (or client address) and action, shared by every worker
through Redis (in process memory when there is no REDIS_URL).

A bucket holds up to `burst` tokens and refills at `rate` tokens a second; each
action takes one (a batch of n actions asks for n and gets what the bucket holds,
in order). The Redis version is one Lua script, so concurrent workers can never
both spend the last token.

The replay budget is a bucket of bytes that may go into debt: a replay's size is
known only once it is read, so a replay may start while the user is not in debt,
and its size is taken afterwards (`replay_check`, `replay_spend`). Taking it
answers the budget left, shared by every worker; a worker that sees a user in
debt refuses that user's replays until it is paid off, with no round trip to ask
(a subscribe that replays nothing costs nothing). A user in debt can so get one
more replay through on each worker that has not yet seen them in debt.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from django.conf import settings

from . import store

_SCRIPT = """
local tokens = tonumber(redis.call('HGET', KEYS[1], 't'))
local stamp = tonumber(redis.call('HGET', KEYS[1], 's'))
local rate, burst, now, wanted = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
if tokens == nil then tokens = burst; stamp = now end
tokens = math.min(burst, tokens + math.max(0, now - stamp) * rate)
local granted = math.min(wanted, math.floor(tokens))
tokens = tokens - granted
redis.call('HSET', KEYS[1], 't', tostring(tokens), 's', tostring(now))
redis.call('EXPIRE', KEYS[1], math.ceil(burst / rate) + 1)
return {granted, tostring(tokens)}
"""

# The replay budget: refill, then take ARGV[4] (which may leave it below zero);
# with ARGV[4] = 0 a look that changes nothing but the refill.
_DEBIT = """
local tokens = tonumber(redis.call('HGET', KEYS[1], 't'))
local stamp = tonumber(redis.call('HGET', KEYS[1], 's'))
local rate, burst, now, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
if tokens == nil then tokens = burst; stamp = now end
tokens = math.min(burst, tokens + math.max(0, now - stamp) * rate) - cost
redis.call('HSET', KEYS[1], 't', tostring(tokens), 's', tostring(now))
redis.call('EXPIRE', KEYS[1], math.ceil((burst - math.min(0, tokens)) / rate) + 1)
return tostring(tokens)
"""


@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    retry_after: float = 0.0


def _limits() -> dict[str, tuple[float, float]]:
    return settings.REALTIME["RATE_LIMITS"]


def _retry_after(tokens: float, rate: float) -> float:
    return round(max(0.0, 1.0 - tokens) / rate, 3)


class MemoryBuckets:
    """One process's buckets (the embedded default)."""

    def __init__(self) -> None:
        self.buckets: dict[str, tuple[float, float]] = {}

    async def take(self, key: str, rate: float, burst: float, wanted: int) -> tuple[int, float]:
        now = time.monotonic()
        tokens, stamp = self.buckets.get(key, (burst, now))
        tokens = min(burst, tokens + (now - stamp) * rate)
        granted = min(wanted, int(tokens))
        self.buckets[key] = (tokens - granted, now)
        return granted, tokens - granted

    async def debit(self, key: str, rate: float, burst: float, cost: float) -> float:
        now = time.monotonic()
        tokens, stamp = self.buckets.get(key, (burst, now))
        tokens = min(burst, tokens + (now - stamp) * rate) - cost
        self.buckets[key] = (tokens, now)
        return tokens


class RedisBuckets:
    """Buckets in Redis, shared by every worker."""

    def __init__(self, url: str) -> None:
        self.url = url

    async def take(self, key: str, rate: float, burst: float, wanted: int) -> tuple[int, float]:
        try:
            granted, tokens = await store.client(self.url).eval(_SCRIPT, 1, f"rl:{key}", rate, burst, time.time(), wanted)
        except Exception:
            # Redis is down: fail open (the other limits still hold) rather than
            # refuse every action while the layer recovers.
            return wanted, 0.0
        return int(granted), float(tokens)

    async def debit(self, key: str, rate: float, burst: float, cost: float) -> float:
        try:
            return float(await store.client(self.url).eval(_DEBIT, 1, f"rl:{key}", rate, burst, time.time(), cost))
        except Exception:
            return burst  # fail open, as take() does


# The buckets in use: shared through Redis, or this process's own.
buckets = store.Chooser(RedisBuckets, MemoryBuckets)


async def take(who: int | str, action: str) -> Verdict:
    """Spend one token of `action` for `who` (a user id, or a client address for
    the handshake.address bucket); unknown actions are unlimited."""
    granted, retry_after = await take_up_to(who, action, 1)
    return Verdict(granted == 1, retry_after)


async def take_up_to(who: int | str, action: str, wanted: int) -> tuple[int, float]:
    """Spend up to `wanted` tokens of `action` for `who` in one call: how many
    were granted (the first ones of the batch are allowed, the rest refused) and,
    when short, the seconds until the next token."""
    limit = _limits().get(action)
    if limit is None:
        return wanted, 0.0
    rate, burst = limit
    granted, tokens = await buckets().take(f"{action}:{who}", rate, burst, wanted)
    return granted, (_retry_after(tokens, rate) if granted < wanted else 0.0)


def _replay_budget() -> tuple[float, float]:
    return settings.REALTIME["REPLAY_BUDGET"]


# user id -> when (time.monotonic()) their replay debt is paid, as this worker
# last learnt it; only users in debt are here.
_in_debt: dict[int, float] = {}


def replay_check(user_id: int) -> Verdict:
    """May this user start a replay now? No, while this worker knows them in debt."""
    until = _in_debt.get(user_id)
    if until is None:
        return Verdict(True)
    left = until - time.monotonic()
    if left <= 0:
        _in_debt.pop(user_id, None)
        return Verdict(True)
    return Verdict(False, round(max(0.1, left), 3))


async def replay_spend(user_id: int, size: int) -> None:
    """Take a replay's size (bytes sent) from the user's budget, and remember a debt."""
    if size <= 0:
        return
    rate, burst = _replay_budget()
    tokens = await buckets().debit(f"replay:{user_id}", rate, burst, size)
    if tokens < 0:
        _in_debt[user_id] = time.monotonic() + -tokens / rate
    else:
        _in_debt.pop(user_id, None)


def replay_spend_sync(user_id: int, size: int) -> None:
    """replay_spend, from a synchronous view."""
    from asgiref.sync import async_to_sync

    async_to_sync(replay_spend)(user_id, size)


def reset() -> None:
    """Forget every bucket and debt of this process (tests)."""
    buckets.reset()
    _in_debt.clear()
