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

A socket's message.sends take from a reserve (`take_up_to(..., reserve=True)`,
Reserves): when a take from Redis is granted, the worker is also given a few
tokens more (at most an eighth of the burst), which it spends on the sender's
next messages with no round trip, topping them up in the background. The bucket
counts what workers hold this way (`h`): it never refills past its burst less
what is held, so a user never has more than the bucket alone would give, on
however many workers. Each second a worker settles what it held: what it did not
spend goes back, and the count is released (and, for a sender still sending,
renewed in the same call). What the bucket cannot know is how much of a reserve
was spent until it is settled, so for up to that second a user can be refused a
little sooner than without reserves, never later. A worker that dies holding a
reserve leaves its count to run out by itself (RESERVE_HOLD + RESERVE_SLACK).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from django.conf import settings

from realtime.state import degraded, store

RESERVE_HOLD = 1.0  # seconds between a reserve's settlements
RESERVE_SLACK = 5.0  # a reserve's count in Redis outlives its hold by this (a worker that died)
RESERVE_SHARE = 8  # a reserve holds at most burst / RESERVE_SHARE tokens
RESERVE_MAX = 16  # and never more than this

# Both scripts: the bucket KEYS[1] refilled at ARGV[1] a second up to ARGV[2], as of
# ARGV[3] (now); ARGV[4] is what is asked of it.
# `held`: tokens workers hold in reserves (`h`, counted until `hu`, then nothing):
# the bucket refills to its burst less them, and never loses tokens by it.
_REFILL = """
local tokens = tonumber(redis.call('HGET', KEYS[1], 't'))
local stamp = tonumber(redis.call('HGET', KEYS[1], 's'))
local rate, burst, now, wanted = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local held = tonumber(redis.call('HGET', KEYS[1], 'h')) or 0
local held_until = tonumber(redis.call('HGET', KEYS[1], 'hu')) or 0
if now >= held_until then held = 0 end
if tokens == nil then tokens = burst; stamp = now end
local refilled = tokens + math.max(0, now - stamp) * rate
if refilled > burst - held then refilled = math.max(tokens, burst - held) end
tokens = refilled
"""

# Saves the bucket (and its reserves' count): kept while either may matter.
_SAVE = """
redis.call('HSET', KEYS[1], 't', tostring(tokens), 's', tostring(now), 'h', tostring(held), 'hu', tostring(held_until))
redis.call('EXPIRE', KEYS[1], math.ceil(math.max(burst / rate, held_until - now)) + 1)
"""

# Takes up to ARGV[4]; when all of them are granted, also up to ARGV[5] more for
# the caller's reserve, counted as held for ARGV[6] seconds. Returns {granted,
# tokens, reserved}.
_RESERVE = """
local function reserve(extra, hold)
  local reserved = math.max(0, math.min(extra, math.floor(tokens)))
  if reserved > 0 then
    tokens = tokens - reserved
    held = held + reserved
    held_until = math.max(held_until, now + hold)
  end
  return reserved
end
"""

_SCRIPT = _REFILL + _RESERVE + """
local granted = math.min(wanted, math.floor(tokens))
tokens = tokens - granted
local reserved = 0
if granted == wanted and tonumber(ARGV[5] or '0') > 0 then
  reserved = reserve(tonumber(ARGV[5]), tonumber(ARGV[6]))
end
""" + _SAVE + """
return {granted, tostring(tokens), reserved}
"""

# A reserve settled: ARGV[4] tokens it did not spend go back, the ARGV[5] it was
# given are no longer held; then up to ARGV[6] more for its next period (a sender
# still sending), held for ARGV[7] seconds. Returns {reserved, tokens}.
_SETTLE = _REFILL + _RESERVE + """
held = math.max(0, held - tonumber(ARGV[5]))
tokens = math.max(tokens, math.min(burst - held, tokens + wanted))
local reserved = reserve(tonumber(ARGV[6]), tonumber(ARGV[7]))
""" + _SAVE + """
return {reserved, tostring(tokens)}
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
        self.reserves = store.LoopLocal(lambda: Reserves(self))

    async def take(self, key: str, rate: float, burst: float, wanted: int) -> tuple[int, float]:
        try:
            granted, tokens, _ = await self.take_now(key, rate, burst, wanted)
        except Exception as exc:
            # Redis is down: fail open (state/degraded.py).
            degraded.tolerate(degraded.HANDSHAKE_LIMITS if key.startswith("handshake.") else degraded.RATE_LIMITS, exc)
            return wanted, 0.0
        return granted, tokens

    async def take_now(self, key: str, rate: float, burst: float, wanted: int, extra: int = 0) -> tuple[int, float, int]:
        """One take from the bucket in Redis (raising when Redis does): granted,
        tokens left, and how many of `extra` were reserved besides."""
        granted, tokens, reserved = await store.batched(self.url).eval(
            _SCRIPT, 1, f"rl:{key}", rate, burst, time.time(), wanted, extra, RESERVE_HOLD + RESERVE_SLACK)
        return int(granted), float(tokens), int(reserved)

    async def settle(self, key: str, rate: float, burst: float, unspent: int, released: int, extra: int) -> int:
        """A reserve settled (_SETTLE): how many of `extra` it holds for its next period."""
        reserved, _ = await store.batched(self.url).eval(
            _SETTLE, 1, f"rl:{key}", rate, burst, time.time(), unspent, released, extra, RESERVE_HOLD + RESERVE_SLACK)
        return int(reserved)

    async def take_reserved(self, key: str, rate: float, burst: float, wanted: int) -> tuple[int, float]:
        """take(), from this loop's reserve for `key` where it can (Reserves)."""
        return await self.reserves().take(key, rate, burst, wanted)

    async def debit(self, key: str, rate: float, burst: float, cost: float, force: bool) -> tuple[bool, float]:
        try:
            taken, tokens = await store.batched(self.url).eval(_DEBIT, 1, f"rl:{key}", rate, burst, time.time(), cost,
                                                               "1" if force else "0")
        except Exception as exc:
            degraded.tolerate(degraded.REPLAY_BUDGET, exc)  # fail open (state/degraded.py)
            return True, burst
        return bool(taken), float(tokens)


class Reserve:
    """Tokens one worker holds of a bucket for one period (Reserves)."""

    __slots__ = ("tokens", "given", "active", "topping_up")

    def __init__(self) -> None:
        self.tokens = 0  # to spend
        self.given = 0  # reserved by Redis for this period (released when it is settled)
        self.active = False  # taken from this period (renewed at its settlement)
        self.topping_up = False


class Reserves:
    """A loop's reserves of bucket tokens (the module doc says what they keep).
    For a bucket of `burst` tokens a reserve holds at most
    size = min(RESERVE_MAX, burst // RESERVE_SHARE): none for a small bucket, such
    as probation's.

    Taking: from the reserve what it holds, the rest from Redis as take() does,
    asking for the reserve's shortfall besides (granted only when the take is).
    When a take leaves the reserve below half its size, it is topped up in the
    background. RESERVE_HOLD after a reserve is first filled it is settled
    (Redis's _SETTLE) and begins a new period, refilled in the same call if it
    was taken from, else dropped."""

    def __init__(self, buckets: RedisBuckets) -> None:
        self.buckets = buckets
        self.held: dict[str, Reserve] = {}

    @staticmethod
    def size(burst: float) -> int:
        return min(RESERVE_MAX, int(burst) // RESERVE_SHARE)

    async def take(self, key: str, rate: float, burst: float, wanted: int) -> tuple[int, float]:
        size = self.size(burst)
        if size == 0:
            return await self.buckets.take(key, rate, burst, wanted)
        reserve = self.held.get(key)
        mine = 0
        if reserve is not None and reserve.tokens:
            reserve.active = True
            mine = min(wanted, reserve.tokens)
            reserve.tokens -= mine
            if mine == wanted:
                self._top_up(key, reserve, rate, burst, size)
                return wanted, float(reserve.tokens)
        try:
            granted, left, reserved = await self.buckets.take_now(
                key, rate, burst, wanted - mine, size - (reserve.tokens if reserve is not None else 0))
        except Exception as exc:
            degraded.tolerate(degraded.RATE_LIMITS, exc)
            return wanted, 0.0  # fail open, as take() does; nothing reserved
        self._add(key, reserved, rate, burst)
        return mine + granted, left

    def _add(self, key: str, reserved: int, rate: float, burst: float) -> None:
        """`reserved` tokens Redis now counts as held for `key` go into its reserve
        (made, with its settlement timed, if there is none)."""
        if not reserved:
            return
        reserve = self.held.get(key)
        if reserve is None:
            reserve = self.held[key] = Reserve()
            asyncio.get_running_loop().call_later(RESERVE_HOLD, self._settle, key, reserve, rate, burst)
        reserve.tokens += reserved
        reserve.given += reserved

    def _top_up(self, key: str, reserve: Reserve, rate: float, burst: float, size: int) -> None:
        if reserve.topping_up or reserve.tokens * 2 >= size:
            return
        reserve.topping_up = True
        asyncio.ensure_future(self._topping_up(key, reserve, rate, burst, size))

    async def _topping_up(self, key: str, reserve: Reserve, rate: float, burst: float, size: int) -> None:
        try:
            _, _, reserved = await self.buckets.take_now(key, rate, burst, 0, size - reserve.tokens)
        except Exception as exc:
            degraded.tolerate(degraded.RATE_LIMITS, exc)
            return  # a take that finds the reserve short asks Redis itself
        finally:
            reserve.topping_up = False
        if self.held.get(key) is reserve:
            self._add(key, reserved, rate, burst)
        elif reserved:
            # Settled meanwhile: these belong to no period; given back and released.
            await self._settled(key, rate, burst, reserved, reserved, 0)

    def _settle(self, key: str, reserve: Reserve, rate: float, burst: float) -> None:
        if self.held.get(key) is reserve:
            del self.held[key]
        # Renewed for a sender that took from it this period; else given back whole.
        renew = self.size(burst) if reserve.active else 0
        asyncio.ensure_future(self._settled(key, rate, burst, reserve.tokens, reserve.given, renew))

    async def _settled(self, key: str, rate: float, burst: float, unspent: int, given: int, renew: int) -> None:
        try:
            reserved = await self.buckets.settle(key, rate, burst, unspent, given, renew)
        except Exception as exc:
            # Not given back: the user has fewer tokens until the count runs out (never more).
            degraded.tolerate(degraded.RATE_LIMITS, exc)
            return
        self._add(key, reserved, rate, burst)


# The buckets in use: shared through Redis, or this process's own.
buckets = store.Chooser(RedisBuckets, MemoryBuckets)


async def take(who: int | str, action: str) -> Verdict:
    """Spend one token of `action` for `who` (a user id, or a client address for
    the handshake.address bucket); unknown actions are unlimited."""
    granted, retry_after = await take_up_to(who, action, 1)
    return Verdict(granted == 1, retry_after)


async def take_up_to(who: int | str, action: str, wanted: int, reserve: bool = False) -> tuple[int, float]:
    """Spend up to `wanted` tokens of `action` for `who` in one call: how many
    were granted (the first ones of the batch are allowed, the rest refused) and,
    when short, the seconds until the next token. `reserve`: from this loop's
    reserve where it can (Reserves; a socket's message.sends, on the worker's loop,
    which outlives the reserve's timers)."""
    limit = _limits().get(action)
    if limit is None:
        return wanted, 0.0
    rate, burst = limit
    chosen = buckets()
    take = chosen.take_reserved if reserve and isinstance(chosen, RedisBuckets) else chosen.take
    granted, tokens = await take(f"{action}:{who}", rate, burst, wanted)
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
