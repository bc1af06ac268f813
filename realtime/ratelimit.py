"""Token buckets per user and action, shared by every worker through Redis (in
process memory when there is no REDIS_URL).

A bucket holds up to `burst` tokens and refills at `rate` tokens a second; each
action takes one. The Redis version is one Lua script, so concurrent workers can
never both spend the last token.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from django.conf import settings

from . import store

_SCRIPT = """
local tokens = tonumber(redis.call('HGET', KEYS[1], 't'))
local stamp = tonumber(redis.call('HGET', KEYS[1], 's'))
local rate, burst, now = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
if tokens == nil then tokens = burst; stamp = now end
tokens = math.min(burst, tokens + math.max(0, now - stamp) * rate)
local allowed = 0
if tokens >= 1 then tokens = tokens - 1; allowed = 1 end
redis.call('HSET', KEYS[1], 't', tostring(tokens), 's', tostring(now))
redis.call('EXPIRE', KEYS[1], math.ceil(burst / rate) + 1)
return {allowed, tostring(tokens)}
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

    async def take(self, key: str, rate: float, burst: float) -> Verdict:
        now = time.monotonic()
        tokens, stamp = self.buckets.get(key, (burst, now))
        tokens = min(burst, tokens + (now - stamp) * rate)
        if tokens >= 1:
            self.buckets[key] = (tokens - 1, now)
            return Verdict(True)
        self.buckets[key] = (tokens, now)
        return Verdict(False, _retry_after(tokens, rate))


class RedisBuckets:
    """Buckets in Redis, shared by every worker."""

    def __init__(self, url: str) -> None:
        self.url = url

    async def take(self, key: str, rate: float, burst: float) -> Verdict:
        try:
            allowed, tokens = await store.client(self.url).eval(_SCRIPT, 1, f"rl:{key}", rate, burst, time.time())
        except Exception:
            # Redis is down: fail open (the other limits still hold) rather than
            # refuse every action while the layer recovers.
            return Verdict(True)
        if int(allowed):
            return Verdict(True)
        return Verdict(False, _retry_after(float(tokens), rate))


# The buckets in use: shared through Redis, or this process's own.
buckets = store.Chooser(RedisBuckets, MemoryBuckets)


async def take(user_id: int, action: str) -> Verdict:
    """Spend one token of `action` for this user (unknown actions are unlimited)."""
    limit = _limits().get(action)
    if limit is None:
        return Verdict(True)
    rate, burst = limit
    return await buckets().take(f"{action}:{user_id}", rate, burst)
