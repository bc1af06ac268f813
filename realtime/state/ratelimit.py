"""Token buckets per user (or client address) and action, shared by every worker
through Redis (in process memory when there is no REDIS_URL).

A bucket holds up to `burst` tokens and refills at `rate` tokens a second; each
action takes one (a batch of n actions asks for n and gets what the bucket holds,
in order). The Redis version is one Lua script, so concurrent workers can never
both spend the last token.

The replay budget is a bucket of bytes that may go into debt: a replay's size is
known only once it is read, so a replay is allowed while the user is not in debt
and its whole size is taken, in one atomic step before it is sent
(`replay_take`); concurrent replays of one user (twenty sockets at once, on any
workers) can overshoot by the last one allowed, no more. A worker that sees a
user in debt remembers until when (`replay_check`, no round trip): it then reads
only the room's head, refusing a replay that would send anything without reading
it, and letting one that would send nothing go ahead.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from django.conf import settings

from realtime.state import degraded, store

# Both scripts: the bucket KEYS[1] refilled at ARGV[1] a second up to ARGV[2], as of
# ARGV[3] (now); ARGV[4] is what is asked of it.
_REFILL = """
local tokens = tonumber(redis.call('HGET', KEYS[1], 't'))
local stamp = tonumber(redis.call('HGET', KEYS[1], 's'))
local rate, burst, now, wanted = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
if tokens == nil then tokens = burst; stamp = now end
tokens = math.min(burst, tokens + math.max(0, now - stamp) * rate)
"""

_SCRIPT = _REFILL + """
local granted = math.min(wanted, math.floor(tokens))
tokens = tokens - granted
redis.call('HSET', KEYS[1], 't', tostring(tokens), 's', tostring(now))
redis.call('EXPIRE', KEYS[1], math.ceil(burst / rate) + 1)
return {granted, tostring(tokens)}
"""

# The replay budget: refill; unless ARGV[5] forces it, refuse when in debt (taking
# nothing); else take ARGV[4], which may leave it below zero. Returns {taken, tokens}.
_DEBIT = _REFILL + """
local taken = 0
if tokens > 0 or ARGV[5] == '1' then
  tokens = tokens - wanted
  taken = 1
end
redis.call('HSET', KEYS[1], 't', tostring(tokens), 's', tostring(now))
redis.call('EXPIRE', KEYS[1], math.ceil((burst - math.min(0, tokens)) / rate) + 1)
return {taken, tostring(tokens)}
"""


@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    retry_after: float = 0.0


ALLOWED = Verdict(True)


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

    async def debit(self, key: str, rate: float, burst: float, cost: float, force: bool) -> tuple[bool, float]:
        now = time.monotonic()
        tokens, stamp = self.buckets.get(key, (burst, now))
        tokens = min(burst, tokens + (now - stamp) * rate)
        taken = tokens > 0 or force
        if taken:
            tokens -= cost
        self.buckets[key] = (tokens, now)
        return taken, tokens


class RedisBuckets:
    """Buckets in Redis, shared by every worker."""

    def __init__(self, url: str) -> None:
        self.url = url

    async def take(self, key: str, rate: float, burst: float, wanted: int) -> tuple[int, float]:
        try:
            granted, tokens = await store.batched(self.url).eval(_SCRIPT, 1, f"rl:{key}", rate, burst, time.time(), wanted)
        except Exception as exc:
            # Redis is down: fail open (state/degraded.py).
            degraded.tolerate(degraded.HANDSHAKE_LIMITS if key.startswith("handshake.") else degraded.RATE_LIMITS, exc)
            return wanted, 0.0
        return int(granted), float(tokens)

    async def debit(self, key: str, rate: float, burst: float, cost: float, force: bool) -> tuple[bool, float]:
        try:
            taken, tokens = await store.batched(self.url).eval(_DEBIT, 1, f"rl:{key}", rate, burst, time.time(), cost,
                                                               "1" if force else "0")
        except Exception as exc:
            degraded.tolerate(degraded.REPLAY_BUDGET, exc)  # fail open (state/degraded.py)
            return True, burst
        return bool(taken), float(tokens)


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
    """Is this user in debt, as far as this worker knows (no round trip)?"""
    until = _in_debt.get(user_id)
    if until is None:
        return ALLOWED
    left = until - time.monotonic()
    if left <= 0:
        _in_debt.pop(user_id, None)
        return ALLOWED
    return Verdict(False, round(max(0.1, left), 3))


async def replay_take(user_id: int, size: int, *, force: bool = False) -> Verdict:
    """Take a replay's size (the bytes it is about to send) from the user's budget,
    unless the user is in debt (then nothing is taken and the replay must not be
    sent), or `force` (gap repair: always taken, never refused). Remembers a debt."""
    if size <= 0:
        return ALLOWED
    rate, burst = _replay_budget()
    taken, tokens = await buckets().debit(f"replay:{user_id}", rate, burst, size, force)
    if tokens < 0:
        _in_debt[user_id] = time.monotonic() + -tokens / rate
    else:
        _in_debt.pop(user_id, None)
    if taken:
        return ALLOWED
    return Verdict(False, round(max(0.1, -tokens / rate), 3))


def replay_take_sync(user_id: int, size: int) -> Verdict:
    """replay_take, from a synchronous view."""
    from asgiref.sync import async_to_sync

    return async_to_sync(replay_take)(user_id, size)


def reset() -> None:
    """Forget every bucket and debt of this process (tests)."""
    buckets.reset()
    _in_debt.clear()
