"""Token buckets per user (or client address) and action, shared by every worker
through Redis (in process memory when there is no REDIS_URL).

A bucket holds up to `burst` tokens and refills at `rate` tokens a second; each
action takes one (a batch of n actions asks for n and gets what the bucket holds,
in order). The Redis version is one Lua script, so concurrent workers can never
both spend the last token. A socket's message.sends spend from a reserve of a
few tokens its worker holds (Reserves), asking Redis only to renew it.

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

import asyncio
import os
import time
from dataclasses import dataclass

from django.conf import settings

from realtime.state import degraded, store

RESERVE_HOLD = 1.0  # seconds a worker may spend a reserve; then it is settled
RESERVE_SLACK = 5.0  # a holder's count in Redis outlives its hold by this (a worker that died)
RESERVE_SHARE = 8  # a reserve holds at most burst / RESERVE_SHARE tokens
RESERVE_MAX = 16  # and never more than this

# Every script: the bucket KEYS[1] (a hash: `t` tokens, `s` when they were counted,
# `h:<holder>` = "count:until" for each worker's reserve), refilled at ARGV[1] a
# second up to ARGV[2], on Redis's own clock (one clock for every worker, and a
# stamp that never goes back); ARGV[3] is what is asked of it. Tokens held in
# live reserves count against the burst: the bucket refills to its burst less
# them, and never loses tokens by it; a count past its `until` (its worker died,
# or settled too late) is dropped.
_REFILL = """
local rate, burst, wanted = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local tokens, stamp, held, holds, last = nil, nil, 0, {}, now
local fields = redis.call('HGETALL', KEYS[1])
for i = 1, #fields, 2 do
  local field, value = fields[i], fields[i + 1]
  if field == 't' then tokens = tonumber(value)
  elseif field == 's' then stamp = tonumber(value)
  else
    local count, hold_until = string.match(value, '^(%d+):(.+)$')
    count, hold_until = tonumber(count), tonumber(hold_until)
    if count and hold_until and hold_until > now then
      holds[field] = {count, hold_until}
      held = held + count
      last = math.max(last, hold_until)
    else
      redis.call('HDEL', KEYS[1], field)
    end
  end
end
if tokens == nil then tokens = burst; stamp = now end
if stamp > now then now = stamp end
tokens = math.min(burst, tokens + (now - stamp) * rate, math.max(tokens, burst - held))
"""

# Saves the bucket, kept while it or a reserve's count may matter.
_SAVE = """
redis.call('HSET', KEYS[1], 't', tostring(tokens), 's', tostring(now))
redis.call('EXPIRE', KEYS[1], math.ceil(math.max((burst - math.min(0, tokens)) / rate, last - now)) + 1)
"""

# A reserve for holder ARGV[4]: up to `extra` more tokens out of the bucket, counted
# as that holder's for `hold` seconds (its earlier count's time renewed with them).
_RESERVE = """
local function reserve(holder, extra, hold)
  local reserved = math.max(0, math.min(extra, math.floor(tokens)))
  local field = 'h:' .. holder
  local mine = holds[field]
  if reserved == 0 and mine == nil then return 0 end
  local count = reserved + (mine and mine[1] or 0)
  tokens = tokens - reserved
  held = held + reserved
  last = math.max(last, now + hold)
  holds[field] = {count, now + hold}
  redis.call('HSET', KEYS[1], field, count .. ':' .. tostring(now + hold))
  return reserved
end
"""

# A take of ARGV[3] tokens; when all are granted and ARGV[4] names a holder, also up
# to ARGV[5] more for its reserve, held for ARGV[6] seconds. {granted, tokens, reserved}.
_SCRIPT = _REFILL + _RESERVE + """
local granted = math.min(wanted, math.floor(tokens))
tokens = tokens - granted
local reserved = 0
if granted == wanted and ARGV[4] and ARGV[4] ~= '' then
  reserved = reserve(ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6]))
end
""" + _SAVE + """
return {granted, tostring(tokens), reserved}
"""

# Holder ARGV[4]'s reserve settled: ARGV[3] tokens it did not spend go back (never
# past the burst less what is still held), ARGV[5] of its count are released (no
# more than it still has: a count that ran out released nothing, and no other
# holder's is touched); then up to ARGV[6] more for its next period, held for
# ARGV[7] seconds. {reserved, tokens}.
_SETTLE = _REFILL + _RESERVE + """
local field = 'h:' .. ARGV[4]
local mine = holds[field]
if mine then
  local released = math.min(mine[1], tonumber(ARGV[5]))
  held = held - released
  if mine[1] == released then
    holds[field] = nil
    redis.call('HDEL', KEYS[1], field)
  else
    holds[field] = {mine[1] - released, mine[2]}
    redis.call('HSET', KEYS[1], field, (mine[1] - released) .. ':' .. tostring(mine[2]))
  end
end
tokens = math.max(tokens, math.min(burst - held, tokens + wanted))
local reserved = reserve(ARGV[4], tonumber(ARGV[6]), tonumber(ARGV[7]))
""" + _SAVE + """
return {reserved, tostring(tokens)}
"""

# The replay budget: refill; unless ARGV[4] forces it, refuse when in debt (taking
# nothing); else take ARGV[3], which may leave it below zero. Returns {taken, tokens}.
_DEBIT = _REFILL + """
local taken = 0
if tokens > 0 or ARGV[4] == '1' then
  tokens = tokens - wanted
  taken = 1
end
""" + _SAVE + """
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

    async def take_now(self, key: str, rate: float, burst: float, wanted: int, holder: str = "",
                       extra: int = 0) -> tuple[int, float, int]:
        """One take from the bucket in Redis (raising when Redis does): granted,
        tokens left, and how many of `extra` were reserved besides for `holder`."""
        granted, tokens, reserved = await store.batched(self.url).eval(
            _SCRIPT, 1, f"rl:{key}", rate, burst, wanted, holder, extra, RESERVE_HOLD + RESERVE_SLACK)
        return int(granted), float(tokens), int(reserved)

    async def settle(self, key: str, rate: float, burst: float, holder: str, unspent: int, released: int,
                     extra: int) -> int:
        """`holder`'s reserve settled (_SETTLE): how many of `extra` it holds for its next period."""
        reserved, _ = await store.batched(self.url).eval(
            _SETTLE, 1, f"rl:{key}", rate, burst, unspent, holder, released, extra, RESERVE_HOLD + RESERVE_SLACK)
        return int(reserved)

    async def debit(self, key: str, rate: float, burst: float, cost: float, force: bool) -> tuple[bool, float]:
        try:
            taken, tokens = await store.batched(self.url).eval(_DEBIT, 1, f"rl:{key}", rate, burst, cost,
                                                               "1" if force else "0")
        except Exception as exc:
            degraded.tolerate(degraded.REPLAY_BUDGET, exc)  # fail open (state/degraded.py)
            return True, burst
        return bool(taken), float(tokens)


class Reserve:
    """Tokens one loop holds of one bucket for one period (Reserves)."""

    __slots__ = ("tokens", "given", "until", "spent_from", "topping_up")

    def __init__(self, until: float) -> None:
        self.tokens = 0  # left to spend
        self.given = 0  # counted in Redis as this holder's for this period: released when it is settled
        self.until = until  # the loop's time after which it is not spent (it is being settled)
        self.spent_from = False  # a take spent from it: renewed when it is settled
        self.topping_up = False  # one top-up at a time


class Reserves:
    """A loop's reserves of bucket tokens: the sender's chain without a round trip
    to Redis for each message.send.

    When a take from Redis is granted whole, the holder (this loop) asks for up to
    size = min(RESERVE_MAX, burst // RESERVE_SHARE) tokens more (none for a small
    bucket, such as probation's), which Redis counts as the holder's. Its next
    takes are spent from them, with a top-up in the background when half is gone.
    Each reserve is spent for RESERVE_HOLD seconds, then settled in one call:
    what is left goes back, the count is released, and, for a sender that spent
    from it, a reserve for the next period is given in the same call.

    Never more than the bucket alone: what is reserved left the bucket, which
    refills only to its burst less every live count, and a count lives
    RESERVE_SLACK longer than the reserve may be spent (a worker that dies
    holding one leaves it to run out; a settlement that comes later than that
    releases nothing of anyone else's). What the bucket cannot know is how much
    of a reserve is spent until it is settled, so for up to RESERVE_HOLD a user
    may be refused on one worker while another holds a few of their tokens:
    sooner than without reserves, never later."""

    def __init__(self, buckets: RedisBuckets) -> None:
        self.buckets = buckets
        self.holder = os.urandom(8).hex()
        self.held: dict[str, Reserve] = {}
        self.tasks: set[asyncio.Task] = set()
        self.loop = asyncio.get_running_loop()

    @staticmethod
    def size(burst: float) -> int:
        return min(RESERVE_MAX, int(burst) // RESERVE_SHARE)

    def current(self, key: str) -> Reserve | None:
        """`key`'s reserve, while it may be spent."""
        reserve = self.held.get(key)
        return reserve if reserve is not None and self.loop.time() < reserve.until else None

    async def take(self, key: str, rate: float, burst: float, wanted: int) -> tuple[int, float]:
        size = self.size(burst)
        if size == 0:
            return await self.buckets.take(key, rate, burst, wanted)
        reserve = self.current(key)
        mine = 0
        if reserve is not None and reserve.tokens:
            reserve.spent_from = True
            mine = min(wanted, reserve.tokens)
            reserve.tokens -= mine
            if mine == wanted:
                if reserve.tokens * 2 < size and not reserve.topping_up:
                    reserve.topping_up = True
                    self.spawn(self.top_up(key, reserve, rate, burst, size))
                return wanted, float(reserve.tokens)
        try:
            granted, left, reserved = await self.buckets.take_now(
                key, rate, burst, wanted - mine, self.holder, size - (reserve.tokens if reserve is not None else 0))
        except Exception as exc:
            degraded.tolerate(degraded.RATE_LIMITS, exc)
            return wanted, 0.0  # fail open, as take() does; nothing reserved
        self.add(key, reserved, rate, burst)
        return mine + granted, left

    def add(self, key: str, reserved: int, rate: float, burst: float) -> None:
        """`reserved` tokens Redis now counts as this holder's go into `key`'s
        reserve: the current one, or a new one with its settlement timed."""
        if not reserved:
            return
        reserve = self.current(key)
        if reserve is None:
            reserve = self.held[key] = Reserve(self.loop.time() + RESERVE_HOLD)
            self.loop.call_at(reserve.until, self.settle, key, reserve, rate, burst)
        reserve.tokens += reserved
        reserve.given += reserved

    async def top_up(self, key: str, reserve: Reserve, rate: float, burst: float, size: int) -> None:
        try:
            _, _, reserved = await self.buckets.take_now(key, rate, burst, 0, self.holder, size - reserve.tokens)
        except Exception as exc:
            degraded.tolerate(degraded.RATE_LIMITS, exc)
            return  # a take that finds the reserve short asks Redis itself
        finally:
            reserve.topping_up = False
        # Into the reserve it was for, or (that one settled meanwhile) a new one.
        self.add(key, reserved, rate, burst)

    def settle(self, key: str, reserve: Reserve, rate: float, burst: float) -> None:
        """The end of `reserve`'s period (a timer): settled once, in the background."""
        if self.held.get(key) is reserve:
            del self.held[key]
        unspent, reserve.tokens = reserve.tokens, 0
        renew = self.size(burst) if reserve.spent_from else 0
        self.spawn(self.settled(key, rate, burst, unspent, reserve.given, renew))

    async def settled(self, key: str, rate: float, burst: float, unspent: int, given: int, renew: int) -> None:
        try:
            reserved = await self.buckets.settle(key, rate, burst, self.holder, unspent, given, renew)
        except Exception as exc:
            # Not given back: the user has fewer tokens until the count runs out (never more).
            degraded.tolerate(degraded.RATE_LIMITS, exc)
            return
        self.add(key, reserved, rate, burst)

    def spawn(self, work) -> None:
        task = self.loop.create_task(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


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
    reserve where it can (Reserves: a socket's message.sends)."""
    limit = _limits().get(action)
    if limit is None:
        return wanted, 0.0
    rate, burst = limit
    chosen = buckets()
    take = chosen.reserves().take if reserve and isinstance(chosen, RedisBuckets) else chosen.take
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
