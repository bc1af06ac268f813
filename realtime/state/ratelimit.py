"""Token buckets per user (or client address) and action, shared by every worker
through Redis (in process memory when there is no REDIS_URL, and in each worker's
own memory while Redis is down: the same limits a worker, never none).

A bucket holds up to `burst` tokens and refills at `rate` tokens a second; each
action takes one (a batch of n actions asks for n and gets what the bucket holds,
in order). On Redis each step is one Lua script (a take, a reserve's settlement,
a debit), so concurrent workers can never both spend the last token. A socket's
message.sends spend from a reserve of a few tokens its worker holds (Reserves),
asking Redis when the reserve runs short or its period ends.

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
import itertools
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
# and `h:<holder>:<period>` = "count:until" for each period of a worker's
# reserves), refilled at ARGV[1] a second up to ARGV[2], on Redis's own clock (one
# clock for every worker, and a stamp that never goes back); ARGV[3] is what is
# asked of it. Tokens held in live reserves count against the burst: the bucket
# refills to its burst less them, and never loses tokens by it; a count past its
# `until` (its worker died, or its settlement was lost) is dropped.
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
      holds[field] = count
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

# Up to `extra` more tokens out of the bucket for the reserve period `period`
# (holder:number), counted as its own for `hold` seconds from now.
_RESERVE = """
local function reserve(period, extra, hold)
  local reserved = math.max(0, math.min(extra, math.floor(tokens)))
  if reserved == 0 then return 0 end
  local field = 'h:' .. period
  local count = reserved + (holds[field] or 0)
  tokens = tokens - reserved
  held = held + reserved
  last = math.max(last, now + hold)
  holds[field] = count
  redis.call('HSET', KEYS[1], field, count .. ':' .. tostring(now + hold))
  return reserved
end
"""

# A take of ARGV[3] tokens; when all are granted and ARGV[4] names a reserve
# period, also up to ARGV[5] more for it, held for ARGV[6] seconds.
# {granted, tokens, reserved}.
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

# Reserve period ARGV[4] settled: its whole count released and the ARGV[3] tokens
# it did not spend given back (never more than the count it had, nor past the
# burst less what is still held); a period whose count ran out gives nothing
# back, and no other period is touched. Then, when ARGV[5] names the holder's
# next period, up to ARGV[6] for it, held for ARGV[7] seconds. {reserved, tokens}.
_SETTLE = _REFILL + _RESERVE + """
local field = 'h:' .. ARGV[4]
local count = holds[field]
if count then
  held = held - count
  holds[field] = nil
  redis.call('HDEL', KEYS[1], field)
  tokens = math.max(tokens, math.min(burst - held, tokens + math.min(wanted, count)))
end
local reserved = 0
if ARGV[5] and ARGV[5] ~= '' then
  reserved = reserve(ARGV[5], tonumber(ARGV[6]), tonumber(ARGV[7]))
end
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
    """One process's buckets: the embedded default's, and a Redis worker's own while
    Redis is down (RedisBuckets.local). A bucket that has refilled to its burst is
    the same as none: past PRUNE_AT buckets, those are dropped (a flood of client
    addresses does not grow it for ever); when most are still refilling, the next
    prune waits until it holds twice as many (its cost spread over the buckets
    added meanwhile)."""

    PRUNE_AT = 10_000

    def __init__(self) -> None:
        # key -> (tokens, when counted, when it is full again)
        self.buckets: dict[str, tuple[float, float, float]] = {}
        self.prune_at = self.PRUNE_AT  # twice what a prune left, at least PRUNE_AT: a prune a bucket at most

    def _refilled(self, key: str, rate: float, burst: float, now: float) -> float:
        tokens, stamp, _ = self.buckets.get(key, (burst, now, now))
        return min(burst, tokens + (now - stamp) * rate)

    def _store(self, key: str, tokens: float, rate: float, burst: float, now: float) -> None:
        if key not in self.buckets and len(self.buckets) >= self.prune_at:
            self.buckets = {k: v for k, v in self.buckets.items() if v[2] > now}
            self.prune_at = max(self.PRUNE_AT, 2 * len(self.buckets))
        self.buckets[key] = (tokens, now, now + max(0.0, burst - tokens) / rate)

    async def take(self, key: str, rate: float, burst: float, wanted: int) -> tuple[int, float]:
        now = time.monotonic()
        tokens = self._refilled(key, rate, burst, now)
        granted = min(wanted, int(tokens))
        self._store(key, tokens - granted, rate, burst, now)
        return granted, tokens - granted

    async def debit(self, key: str, rate: float, burst: float, cost: float, force: bool) -> tuple[bool, float]:
        now = time.monotonic()
        tokens = self._refilled(key, rate, burst, now)
        taken = tokens > 0 or force
        if taken:
            tokens -= cost
        self._store(key, tokens, rate, burst, now)
        return taken, tokens


class RedisBuckets:
    """Buckets in Redis, shared by every worker."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.reserves = store.LoopLocal(lambda: Reserves(self))
        # While Redis is down, each worker counts on its own (state/degraded.py):
        # the same limits, one bucket per worker instead of one for them all.
        self.local = MemoryBuckets()

    async def take(self, key: str, rate: float, burst: float, wanted: int) -> tuple[int, float]:
        try:
            granted, tokens, _ = await self.take_now(key, rate, burst, wanted)
        except Exception as exc:
            degraded.tolerate(degraded.HANDSHAKE_LIMITS if key.startswith("handshake.") else degraded.RATE_LIMITS, exc)
            return await self.local.take(key, rate, burst, wanted)
        return granted, tokens

    async def take_now(self, key: str, rate: float, burst: float, wanted: int, period: str = "",
                       extra: int = 0) -> tuple[int, float, int]:
        """One take from the bucket in Redis (raising when Redis does): granted,
        tokens left, and how many of `extra` were reserved besides for the
        reserve period `period` (Reserves)."""
        granted, tokens, reserved = await store.batched(self.url).eval(
            _SCRIPT, 1, f"rl:{key}", rate, burst, wanted, period, extra, RESERVE_HOLD + RESERVE_SLACK)
        return int(granted), float(tokens), int(reserved)

    async def settle(self, key: str, rate: float, burst: float, period: str, unspent: int, next_period: str = "",
                     extra: int = 0) -> int:
        """Reserve period `period` settled (_SETTLE): how many of `extra` are
        reserved for `next_period`."""
        reserved, _ = await store.batched(self.url).eval(
            _SETTLE, 1, f"rl:{key}", rate, burst, unspent, period, next_period, extra, RESERVE_HOLD + RESERVE_SLACK)
        return int(reserved)

    async def debit(self, key: str, rate: float, burst: float, cost: float, force: bool) -> tuple[bool, float]:
        try:
            taken, tokens = await store.batched(self.url).eval(_DEBIT, 1, f"rl:{key}", rate, burst, cost,
                                                               "1" if force else "0")
        except Exception as exc:
            degraded.tolerate(degraded.REPLAY_BUDGET, exc)  # this worker's own budget meanwhile
            return await self.local.debit(key, rate, burst, cost, force)
        return bool(taken), float(tokens)


class Reserve:
    """Tokens one loop holds of one bucket for one period (Reserves)."""

    __slots__ = ("period", "until", "tokens", "asked", "counted", "spent_from", "topping_up", "settled")

    def __init__(self, period: str, until: float) -> None:
        self.period = period  # its count's name in Redis: holder:number
        self.until = until  # the loop's time after which it is not spent (it is being settled)
        self.tokens = 0  # left to spend
        self.asked = 0  # asked of Redis, the answer not yet come
        self.counted = False  # Redis may count tokens as its own (an answer gave some, or did not come)
        self.spent_from = False  # a take spent from it: its holder's next period is reserved when it is settled
        self.topping_up = False  # one top-up at a time
        self.settled = False  # its settlement is sent: what Redis still gives it is left there


class Reserves:
    """A loop's reserves of bucket tokens: the sender's chain without a round trip
    to Redis for each message.send.

    A take from Redis asks, besides what it wants, for up to size =
    min(RESERVE_MAX, burst // RESERVE_SHARE) tokens (none for a small bucket,
    such as probation's) for this loop's current period of that bucket, which
    Redis counts under the period's own name. The next takes spend from them,
    with a top-up in the background when half is gone. A period is spent for
    RESERVE_HOLD seconds from when it was first asked for (a reply that comes
    late does not lengthen it), then settled in one call: its whole count is
    released, what is left goes back, and, for a sender that spent from it, the
    next period's reserve is given in the same call.

    Never more than the bucket alone (while Redis answers: meanwhile each worker
    counts in its own MemoryBuckets): what is reserved left the bucket, which
    refills only to its burst less every live count, and a count lives
    RESERVE_HOLD + RESERVE_SLACK from its period's last ask to Redis (a take
    or a top-up), so RESERVE_SLACK or a little more past its period's end. A worker that dies
    holding one, a settlement or an answer that is lost (a cancelled socket, a
    Redis timeout), leaves a count that runs out by itself; a settlement that
    comes after that gives nothing back, and touches no other period's count.
    What the bucket cannot know is how much of a reserve is spent until it is
    settled, so for up to RESERVE_HOLD a user may be refused on one worker while
    another holds a few of their tokens: sooner than without reserves, never later."""

    def __init__(self, buckets: RedisBuckets) -> None:
        self.buckets = buckets
        self.holder = os.urandom(8).hex()
        self.periods = itertools.count()
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

    def open(self, key: str, rate: float, burst: float) -> Reserve:
        """A new period for `key`, its settlement timed from now."""
        reserve = self.held[key] = Reserve(f"{self.holder}:{next(self.periods)}", self.loop.time() + RESERVE_HOLD)
        self.loop.call_at(reserve.until, self.settle, key, reserve, rate, burst)
        return reserve

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
        if reserve is None:
            reserve = self.open(key, rate, burst)
        answer = await self.ask(key, rate, burst, reserve, wanted - mine, max(0, size - reserve.tokens - reserve.asked))
        if answer is None:
            granted, left = await self.buckets.local.take(key, rate, burst, wanted - mine)  # as take() does
        else:
            granted, left = answer
        return mine + granted, left

    async def ask(self, key: str, rate: float, burst: float, reserve: Reserve, wanted: int,
                  extra: int) -> tuple[int, float] | None:
        """One take of `wanted` from Redis that also asks for up to `extra` tokens
        for `reserve`'s period: granted and tokens left, or None when Redis failed
        (tolerated). An answer that does not come (an error, a cancellation) leaves
        the period to be settled, whatever Redis counted for it."""
        reserve.asked += extra
        try:
            granted, left, reserved = await self.buckets.take_now(key, rate, burst, wanted, reserve.period, extra)
        except Exception as exc:
            reserve.counted = True
            degraded.tolerate(degraded.RATE_LIMITS, exc)
            return None
        except BaseException:
            reserve.counted = True
            raise
        finally:
            reserve.asked -= extra
        self.add(reserve, reserved)
        return granted, left

    def add(self, reserve: Reserve, reserved: int) -> None:
        """`reserved` tokens Redis now counts as `reserve`'s: spent from it while
        it may be, given back when it is settled. Once its settlement is sent they
        are left to it (released with the period, not given back)."""
        if reserved:
            reserve.counted = True
            if not reserve.settled:
                reserve.tokens += reserved

    async def top_up(self, key: str, reserve: Reserve, rate: float, burst: float, size: int) -> None:
        """`reserve` filled up again in the background (when it fails, a take that
        finds the reserve short asks Redis itself). Not once its period is over (a
        loop that stalled): a count that may have run out is not made again."""
        try:
            extra = size - reserve.tokens - reserve.asked
            if not reserve.settled and self.loop.time() < reserve.until and extra > 0:
                await self.ask(key, rate, burst, reserve, 0, extra)
        finally:
            reserve.topping_up = False

    def settle(self, key: str, reserve: Reserve, rate: float, burst: float) -> None:
        """The end of `reserve`'s period (its timer): settled once, in the
        background, with the next period's reserve asked for in the same call
        for a sender that spent from it. A period that Redis counts nothing
        for (a refused sender's: every answer came, and gave none) has nothing
        to settle."""
        reserve.settled = True
        unspent, reserve.tokens = reserve.tokens, 0
        following, extra = None, 0
        if self.held.get(key) is reserve:
            del self.held[key]
            if reserve.spent_from:
                following, extra = self.open(key, rate, burst), self.size(burst)
                following.asked += extra
                following.counted = True
        if reserve.counted or reserve.asked or following is not None:
            self.spawn(self.settled(key, rate, burst, reserve.period, unspent, following, extra))

    async def settled(self, key: str, rate: float, burst: float, period: str, unspent: int,
                      following: Reserve | None, extra: int) -> None:
        try:
            reserved = await self.buckets.settle(key, rate, burst, period, unspent,
                                                 following.period if following is not None else "", extra)
        except Exception as exc:
            # Not given back: the user has fewer tokens until the count runs out (never more).
            degraded.tolerate(degraded.RATE_LIMITS, exc)
            return
        finally:
            if following is not None:
                following.asked -= extra
        if following is not None:
            self.add(following, reserved)

    def spawn(self, work) -> None:
        task = self.loop.create_task(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


# The buckets in use: shared through Redis, or this process's own.
buckets = store.Chooser(RedisBuckets, MemoryBuckets)

# Actions each worker counts per user on its own, in its memory, with Redis or
# without (in RedisBuckets.local, where every action is counted while Redis is
# down): no round trip. A ping concerns its own socket (its answer, and a catch-up
# check of that socket's rooms: a read of their heads), and asks nothing of other
# workers. Counted here, a user gets the bucket once per worker it has sockets on
# (and no more for holding many sockets on one, nor for reconnecting to it).
WORKER_LOCAL = frozenset({"ping"})


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
    if action in WORKER_LOCAL and isinstance(chosen, RedisBuckets):
        chosen = chosen.local
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
