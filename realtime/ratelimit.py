"""Token buckets per user and action, shared by every worker through Redis (in
process memory when there is no REDIS_URL).

A bucket holds up to `burst` tokens and refills at `rate` tokens a second; each
action takes one (a batch of n actions asks for n and gets what the bucket holds,
in order). The Redis version is one Lua script, so concurrent workers can never
both spend the last token.
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


# The buckets in use: shared through Redis, or this process's own.
buckets = store.Chooser(RedisBuckets, MemoryBuckets)


async def take(user_id: int, action: str) -> Verdict:
    """Spend one token of `action` for this user (unknown actions are unlimited)."""
    granted, retry_after = await take_up_to(user_id, action, 1)
    return Verdict(granted == 1, retry_after)


async def take_up_to(user_id: int, action: str, wanted: int) -> tuple[int, float]:
    """Spend up to `wanted` tokens of `action` for this user in one call: how many
    were granted (the first ones of the batch are allowed, the rest refused) and,
    when short, the seconds until the next token."""
    limit = _limits().get(action)
    if limit is None:
        return wanted, 0.0
    rate, burst = limit
    granted, tokens = await buckets().take(f"{action}:{user_id}", rate, burst, wanted)
    return granted, (_retry_after(tokens, rate) if granted < wanted else 0.0)
