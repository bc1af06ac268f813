"""How many sockets each user holds open, across every worker.

Each open socket holds a lease: an entry (its connection id) with an expiry time in
a per-user sorted set in Redis (a dict in process memory without REDIS_URL). A
socket's lease is renewed every LEASE_RENEW seconds (all of a worker's in one round
trip, by realtime/state/housekeeper.py) and given back when it closes; a worker
that dies (kill -9) gives nothing back, and its leases run out after LEASE_TTL.

`acquire` is one Lua script, so two workers can never both hand out the last place.
While Redis is unreachable each worker counts its own sockets instead (MemoryLeases,
as the rate limits keep their buckets meanwhile, state/ratelimit.py): the cap then
holds per worker, not in all (a user may hold the cap on each worker), rather than
not at all. The sockets a worker opened during the outage are counted at once; those
it held before it, from the first renewal that fails (within LEASE_RENEW and
Redis's timeout). Each of those local leases lasts LEASE_TTL from its last local
renewal, so a Redis that comes and goes within that time finds them still counted
(a socket opened through Redis between two failures is not among them: at worst
twice the cap a worker while Redis flaps).
"""

from __future__ import annotations

import logging
import math
import time

from django.conf import settings

from realtime.state import degraded, store

log = logging.getLogger(__name__)

LEASE_TTL = 30.0  # seconds a lease lives without renewal
LEASE_RENEW = 10.0  # seconds between renewals by a live socket

# The clocks leases are timed by (tests put one they move in their place): wall time
# in Redis, where every worker compares the scores; this process's monotonic clock
# for its own.
wall_clock = time.time
local_clock = time.monotonic

_ACQUIRE = """
local now, ttl, cap = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZSCORE', KEYS[1], ARGV[4]) == false and redis.call('ZCARD', KEYS[1]) >= cap then
  return 0
end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[4])
redis.call('EXPIRE', KEYS[1], math.ceil(ttl) + 1)
return 1
"""


def _key(user_id: int) -> str:
    return f"rt:conns:{user_id}"


class MemoryLeases:
    def __init__(self) -> None:
        self.leases: dict[int, dict[str, float]] = {}

    def _live(self, user_id: int, now: float) -> dict[str, float]:
        """A user's leases that have not run out."""
        return {c: t for c, t in self.leases.get(user_id, {}).items() if t > now}

    async def acquire(self, user_id: int, conn_id: str, cap: int) -> bool:
        now = local_clock()
        mine = self._live(user_id, now)
        if conn_id not in mine and len(mine) >= cap:
            self.leases[user_id] = mine
            return False
        mine[conn_id] = now + LEASE_TTL
        self.leases[user_id] = mine
        return True

    async def renew(self, held: list[tuple[int, str]]) -> None:
        expiry = local_clock() + LEASE_TTL
        for user_id, conn_id in held:
            self.leases.setdefault(user_id, {})[conn_id] = expiry

    async def release(self, user_id: int, conn_id: str) -> None:
        mine = self.leases.get(user_id)
        if mine is not None:
            mine.pop(conn_id, None)
            if not mine:
                del self.leases[user_id]

    def drop_ended(self) -> None:
        """Forget the leases that have run out (each user's, all at once)."""
        now = local_clock()
        for user_id in list(self.leases):
            mine = self._live(user_id, now)
            if mine:
                self.leases[user_id] = mine
            else:
                del self.leases[user_id]

    async def count(self, user_id: int) -> int:
        now = local_clock()
        return sum(1 for t in self.leases.get(user_id, {}).values() if t > now)


class RedisLeases:
    def __init__(self, url: str) -> None:
        self.url = url
        # This worker's own count, kept only while Redis cannot be reached (acquire,
        # renew): empty but for the sockets of an outage, each let go as it closes
        # or LEASE_TTL after its last local renewal.
        self.local = MemoryLeases()
        # While a renewal waits on Redis: the sockets released meanwhile (not to be
        # renewed locally if it fails).
        self.released_meanwhile: set[str] | None = None

    async def acquire(self, user_id: int, conn_id: str, cap: int) -> bool:
        try:
            return bool(await store.batched(self.url).eval(_ACQUIRE, 1, _key(user_id), wall_clock(), LEASE_TTL, cap, conn_id))
        except Exception as exc:
            degraded.tolerate(degraded.LEASES, exc)  # counted by this worker alone (state/degraded.py)
            return await self.local.acquire(user_id, conn_id, cap)

    async def renew(self, held: list[tuple[int, str]]) -> None:
        self.released_meanwhile = released = set()
        try:
            await store.renew_scores(self.url, [(_key(user_id), conn_id) for user_id, conn_id in held], LEASE_TTL,
                                     now=wall_clock(), key_ttl=math.ceil(LEASE_TTL) + 1)
        except Exception:
            # Every socket this worker still holds, counted by it while Redis is away
            # (the caller tolerates the failure under LEASES).
            await self.local.renew([(user_id, conn_id) for user_id, conn_id in held if conn_id not in released])
            raise
        finally:
            self.released_meanwhile = None
        if self.local.leases:
            self.local.drop_ended()  # (after an outage: each goes LEASE_TTL after its last local renewal)

    async def release(self, user_id: int, conn_id: str) -> None:
        if self.released_meanwhile is not None:
            self.released_meanwhile.add(conn_id)
        await self.local.release(user_id, conn_id)
        try:
            await store.batched(self.url).execute_command("ZREM", _key(user_id), conn_id)
        except Exception as exc:
            degraded.tolerate(degraded.LEASES, exc)  # the lease runs out by itself

    async def count(self, user_id: int) -> int:
        client = store.client(self.url)
        return int(await client.zcount(_key(user_id), wall_clock(), "+inf"))


# The leases in use: shared through Redis, or this process's own.
leases = store.Chooser(RedisLeases, MemoryLeases)


async def acquire(user_id: int, conn_id: str) -> bool:
    """Take (or renew) this socket's place; False when the user already holds
    MAX_CONNECTIONS_PER_USER other live sockets."""
    return await leases().acquire(user_id, conn_id, settings.REALTIME["MAX_CONNECTIONS_PER_USER"])


async def renew(held: list[tuple[int, str]]) -> None:
    """Extend the leases (user id, conn id) of live sockets, in one round trip."""
    await leases().renew(held)


async def release(user_id: int, conn_id: str) -> None:
    await leases().release(user_id, conn_id)
