"""Who is in each room, across every worker, and right after a worker crashes;
what a join costs does not grow with the room.

Each subscribed socket holds a lease (`<username>:<user id>:<conn id>`, scored by
its expiry) in its room's sorted set in Redis; a live socket's leases are renewed
every RENEW seconds (all of a worker's at once, by realtime/state/housekeeper.py), a
socket that closes gives its own back, and a worker killed with -9 gives back
nothing: its leases run out after TTL seconds. Beside the leases, per room (keys
`rt:pres:{<room>}:...`, one hash slot for Redis Cluster):

- `:c`, a hash user -> how many leases they hold (several tabs count once);
- `:a`, the users the room has been told are here (a sorted set with one score,
  so it reads in name order): its size is the count, and a page of it is one
  ZRANGEBYLEX, whatever the room's size;
- `:d`, users whose last lease went, scored by when: their leave is announced after
  GRACE seconds, unless they are back by then (a reload is neither a leave nor a join).

A join is one script (one round trip): the lease, the user's count, and when it is
their first lease and they were not announced, the announcement; it answers the
room's count and first page for the joiner's presence.state. A leave is one script
too. `reconcile` gives back the leases that ran out and settles the due leaves: its
work is the number of changes, not the room's size. Every worker reconciles the
rooms its own sockets follow every SWEEP seconds (how a dead worker's users leave:
within TTL + SWEEP = 25 s of its death).

The room hears of joins and leaves in presence.diff frames, coalesced per room on
each worker: the first change after a quiet spell waits FIRST seconds for company,
then at most one diff every EVERY seconds, with up to DIFF_NAMES names each way and
the count (`partial` when there were more names: a page that shows names asks for
the first page again). A diff goes to every subscriber, the joiner among them (a
diff naming its recipient is no news to the client). The joiner's presence.state
is not the last word it hears: a diff sent before its join (its own earlier tab's
leave, settled after GRACE) can reach it after its presence.state, queued while
it subscribed, and only the diff of its arrival puts it back on its own page.
A diff tells only what is still so as it goes (read with the count, in one
script): workers send their diffs on their own timers, and a leave held back
here while the user's new tab joined on another worker, whose diff went first,
would otherwise reach the room last and drop them from every page.
So people arriving by the thousand cost each subscriber a diff a second, not one
per arrival, and a joiner gets PAGE names and the count, not the whole room; the
rest it pages with presence.list.

Without REDIS_URL the same happens in this process's memory.
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import logging
import time
from collections import Counter
from dataclasses import dataclass, field

from realtime.state import degraded, store

log = logging.getLogger(__name__)

TTL = 20.0
RENEW = 8.0
GRACE = 2.5
SWEEP = 5.0
BOUND = TTL + SWEEP  # the longest a crashed worker's users stay present
PAGE = 100  # names in a presence.state or a presence.page
DIFF_NAMES = 50  # names a presence.diff carries each way; more: partial
FIRST = 0.2  # s a room's first change waits for others before its diff goes
EVERY = 1.0  # s between a room's diffs from one worker, at least
BATCH = 1000  # leases run out and leaves settled per reconcile (the rest next time)
KEY_TTL = 86400

# The clocks the presence leases are timed by (tests put one they move in their place): wall time
# in Redis, where every worker compares the scores; this process's monotonic clock
# for its own.
wall_clock = time.time
local_clock = time.monotonic

# Rooms followed by this process's sockets (room -> number of sockets), for the sweep.
LOCAL_ROOMS: Counter[str] = Counter()


@dataclass(frozen=True, slots=True)
class Page:
    """A page of who is here: `users` in name order, how many there are in all, and
    the cursor of the next page (None: this was the last)."""

    users: list[str]
    count: int
    next: str | None = None


def _keys(room: str) -> tuple[str, str, str, str]:
    """Leases, counts, announced, due to leave (one hash slot: `{room}`)."""
    base = f"rt:pres:{{{room}}}"
    return f"{base}:l", f"{base}:c", f"{base}:a", f"{base}:d"


def _user(user_id: int, username: str) -> str:
    return f"{username}:{user_id}"


def _member(user_id: int, username: str, conn_id: str) -> str:
    return f"{_user(user_id, username)}:{conn_id}"


def _name(user: str) -> str:
    """The username of a `<username>:<id>` entry (usernames hold no `:`)."""
    return user.rsplit(":", 1)[0]


def _after(cursor: str | None) -> str:
    """The ZRANGEBYLEX start of the page after the user named `cursor`: past every
    `<cursor>:<id>` entry (\xff sorts after any digit)."""
    return "-" if cursor is None else f"({cursor}:\xff"


def _page(entries: list[str], count: int, limit: int) -> Page:
    names = [_name(e) for e in entries[:limit]]
    return Page(names, count, names[-1] if len(entries) > limit else None)


_JOIN = """
local joined = 0
if redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1]) == 1 then
  if redis.call('HINCRBY', KEYS[2], ARGV[2], 1) == 1 and not redis.call('ZSCORE', KEYS[3], ARGV[2]) then
    redis.call('ZADD', KEYS[3], 0, ARGV[2])
    joined = 1
  end
end
for i = 1, 3 do redis.call('EXPIRE', KEYS[i], ARGV[4]) end
return {joined, redis.call('ZCARD', KEYS[3]), redis.call('ZRANGEBYLEX', KEYS[3], '-', '+', 'LIMIT', 0, ARGV[5])}
"""
_LEAVE = """
if redis.call('ZREM', KEYS[1], ARGV[1]) == 1 then
  if redis.call('HINCRBY', KEYS[2], ARGV[2], -1) <= 0 then
    redis.call('HDEL', KEYS[2], ARGV[2])
    redis.call('ZADD', KEYS[4], ARGV[3], ARGV[2])
    redis.call('EXPIRE', KEYS[4], ARGV[4])
  end
end
"""
_RECONCILE = """
local now, due = tonumber(ARGV[1]), tonumber(ARGV[1]) - tonumber(ARGV[2])
for _, member in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, ARGV[3])) do
  redis.call('ZREM', KEYS[1], member)
  local user = string.match(member, '^(.*):[^:]*$')
  if redis.call('HINCRBY', KEYS[2], user, -1) <= 0 then
    redis.call('HDEL', KEYS[2], user)
    redis.call('ZADD', KEYS[4], due, user)
  end
end
local joins, leaves = {}, {}
local dirty = redis.call('ZRANGE', KEYS[4], 0, tonumber(ARGV[3]) - 1, 'WITHSCORES')
for i = 1, #dirty, 2 do
  local user, since = dirty[i], tonumber(dirty[i + 1])
  local announced = redis.call('ZSCORE', KEYS[3], user)
  if redis.call('HEXISTS', KEYS[2], user) == 1 then
    if not announced then
      redis.call('ZADD', KEYS[3], 0, user)
      table.insert(joins, user)
    end
    redis.call('ZREM', KEYS[4], user)
  elseif since <= due then
    if announced then
      redis.call('ZREM', KEYS[3], user)
      table.insert(leaves, user)
    end
    redis.call('ZREM', KEYS[4], user)
  end
end
return {joins, leaves}
"""


_TOLD = """
local here = {}
for i = 1, #ARGV do
  if redis.call('ZSCORE', KEYS[1], ARGV[i]) then table.insert(here, ARGV[i]) end
end
return {redis.call('ZCARD', KEYS[1]), here}
"""


def _text(items) -> list[str]:
    return [i.decode() if isinstance(i, bytes) else i for i in items]


class _Names:
    """A room's announced names in name order (as the sorted set in Redis): a join
    or a leave and a page cost a bisection, not a sort of the room."""

    __slots__ = ("ordered",)

    def __init__(self) -> None:
        self.ordered: list[str] = []

    def __contains__(self, name: str) -> bool:
        i = bisect.bisect_left(self.ordered, name)
        return i < len(self.ordered) and self.ordered[i] == name

    def __len__(self) -> int:
        return len(self.ordered)

    def add(self, name: str) -> None:
        if name not in self:
            bisect.insort(self.ordered, name)

    def discard(self, name: str) -> None:
        if name in self:
            del self.ordered[bisect.bisect_left(self.ordered, name)]

    def after(self, key: str | None, limit: int) -> list[str]:
        start = 0 if key is None else bisect.bisect_right(self.ordered, key)
        return self.ordered[start:start + limit]


class MemoryPresence:
    """The same bookkeeping in this process's memory (no REDIS_URL)."""

    def __init__(self) -> None:
        self.leases: dict[str, dict[str, float]] = {}
        self.counts: dict[str, Counter[str]] = {}
        self.announced: dict[str, _Names] = {}
        self.due: dict[str, dict[str, float]] = {}

    def _gone(self, room: str, user: str, at: float) -> None:
        counts = self.counts.setdefault(room, Counter())
        counts[user] -= 1
        if counts[user] <= 0:
            del counts[user]
            self.due.setdefault(room, {})[user] = at

    def _first(self, room: str, after: str | None, limit: int) -> Page:
        names = self.announced.get(room) or _Names()
        return _page(names.after(None if after is None else f"{after}:\xff", limit + 1), len(names), limit)

    async def join(self, room: str, member: str, user: str, ttl: float | None = None) -> tuple[bool, Page]:
        leases = self.leases.setdefault(room, {})
        joined = False
        if member not in leases:
            counts = self.counts.setdefault(room, Counter())
            counts[user] += 1
            announced = self.announced.setdefault(room, _Names())
            if counts[user] == 1 and user not in announced:
                announced.add(user)
                joined = True
        leases[member] = local_clock() + (ttl or TTL)
        return joined, self._first(room, None, PAGE)

    async def renew(self, pairs: list[tuple[str, str]]) -> None:
        for room, member in pairs:
            if member in self.leases.get(room, {}):
                self.leases[room][member] = local_clock() + TTL

    async def leave(self, room: str, member: str, user: str) -> None:
        if self.leases.get(room, {}).pop(member, None) is not None:
            self._gone(room, user, local_clock())

    async def reconcile(self, room: str) -> tuple[list[str], list[str]]:
        now = local_clock()
        leases = self.leases.get(room, {})
        for member in [m for m, t in leases.items() if t <= now]:
            del leases[member]
            self._gone(room, member.rsplit(":", 1)[0], now - GRACE)
        counts, announced = self.counts.get(room, Counter()), self.announced.setdefault(room, _Names())
        joins, leaves = [], []
        due = self.due.get(room, {})
        for user, since in sorted(due.items(), key=lambda item: item[1]):
            if counts[user] > 0:
                if user not in announced:
                    announced.add(user)
                    joins.append(user)
                del due[user]
            elif since <= now - GRACE:
                if user in announced:
                    announced.discard(user)
                    leaves.append(user)
                del due[user]
        return joins, leaves

    async def page(self, room: str, after: str | None, limit: int) -> Page:
        return self._first(room, after, limit)

    async def told(self, room: str, users: list[str]) -> tuple[int, set[str]]:
        announced = self.announced.get(room) or _Names()
        return len(announced), {user for user in users if user in announced}


class RedisPresence:
    def __init__(self, url: str) -> None:
        self.url = url

    async def join(self, room: str, member: str, user: str, ttl: float | None = None) -> tuple[bool, Page]:
        joined, count, first = await store.batched(self.url).eval(
            _JOIN, 3, *_keys(room)[:3], member, user, wall_clock() + (ttl or TTL), KEY_TTL, PAGE + 1)
        return bool(joined), _page(_text(first), count, PAGE)

    async def renew(self, pairs: list[tuple[str, str]]) -> None:
        """Only leases still held (one given back by a closing socket stays gone),
        and each room's keys kept another KEY_TTL: a room whose sockets stay for
        days with nobody joining keeps its presence."""
        leases, room_keys = [], {}
        for room, member in pairs:
            keys = room_keys.get(room)
            if keys is None:
                keys = room_keys[room] = _keys(room)
            leases.append((keys[0], member))
        # (the leases, then the counts and the announced names kept with them)
        await store.renew_scores(self.url, leases, TTL, now=wall_clock(), only_existing=True, key_ttl=KEY_TTL,
                                 also_kept={keys[0]: keys[1:3] for keys in room_keys.values()})

    async def leave(self, room: str, member: str, user: str) -> None:
        await store.batched(self.url).eval(_LEAVE, 4, *_keys(room), member, user, wall_clock(), KEY_TTL)

    async def reconcile(self, room: str) -> tuple[list[str], list[str]]:
        joins, leaves = await store.batched(self.url).eval(_RECONCILE, 4, *_keys(room), wall_clock(), GRACE, BATCH)
        return _text(joins), _text(leaves)

    async def page(self, room: str, after: str | None, limit: int) -> Page:
        pipe = store.client(self.url).pipeline(transaction=False)
        key = _keys(room)[2]
        pipe.zrangebylex(key, _after(after), "+", start=0, num=limit + 1)
        pipe.zcard(key)
        entries, count = await pipe.execute()
        return _page(_text(entries), count, limit)

    async def told(self, room: str, users: list[str]) -> tuple[int, set[str]]:
        count, here = await store.batched(self.url).eval(_TOLD, 1, _keys(room)[2], *users)
        return count, set(_text(here))


# The presence store in use: shared through Redis, or this process's own.
backend = store.Chooser(RedisPresence, MemoryPresence)


# -- what the consumer calls ----------------------------------------------------------
async def join(room: str, user_id: int, username: str, conn_id: str) -> Page:
    """Present in the room from now; the room's first page and count, for this
    socket's presence.state (with it in them). The room hears of a first arrival
    in its next diff. Redis down: an empty page (the housekeeper's renewal cannot
    bring back a lease never taken; the next subscribe does)."""
    LOCAL_ROOMS[room] += 1
    return await _take(room, user_id, username, conn_id, None)


async def _take(room: str, user_id: int, username: str, conn_id: str, ttl: float | None) -> Page:
    try:
        joined, first = await backend().join(room, _member(user_id, username, conn_id), _user(user_id, username),
                                             ttl=ttl)
    except Exception as exc:
        degraded.tolerate(degraded.PRESENCE, exc)
        return Page([], 0)
    if joined:
        coalescer().add(room, joins=[_user(user_id, username)])
    return first


async def leave(room: str, user_id: int, username: str, conn_id: str) -> None:
    """Gone from the room; the room hears of it after GRACE seconds unless the user
    is back (skipped while Redis is down: the lease runs out by itself)."""
    LOCAL_ROOMS[room] -= 1
    if LOCAL_ROOMS[room] <= 0:
        del LOCAL_ROOMS[room]
    await _give_back(room, user_id, username, conn_id)


async def _give_back(room: str, user_id: int, username: str, conn_id: str) -> None:
    try:
        await backend().leave(room, _member(user_id, username, conn_id), _user(user_id, username))
    except Exception as exc:
        degraded.tolerate(degraded.PRESENCE, exc)
        return
    announce_later(room)


async def poll_join(room: str, user_id: int, username: str, conn_id: str, ttl: float) -> Page:
    """A long poll's page is present in the room for `ttl` seconds (its wait plus a
    grace): each poll renews it, a page that stops polling runs out. Not counted in
    LOCAL_ROOMS: realtime/web/longpoll.py names the rooms its polls follow to the sweep.
    The room's first page and count, as `join`."""
    return await _take(room, user_id, username, conn_id, ttl)


async def poll_leave(room: str, user_id: int, username: str, conn_id: str) -> None:
    """A polling page is gone (it hung up a held poll, or lost the room)."""
    await _give_back(room, user_id, username, conn_id)


async def page(room: str, after: str | None = None, limit: int | None = None) -> Page:
    """Who is here, a page (PAGE names) in name order after `after` (none known while
    Redis is down)."""
    try:
        return await backend().page(room, after, limit or PAGE)
    except Exception as exc:
        degraded.tolerate(degraded.PRESENCE, exc)
        return Page([], 0)


def state_frame(room: str, first: Page):
    """The presence.state of `first` (a joiner's, a poll's)."""
    from realtime import protocol

    return protocol.PresenceState(room=room, users=first.users, count=first.count, next=first.next)


def tag(first: Page) -> str:
    """A short digest of who is here (the first page and the count): a poller sends
    back the one it has, and gets presence.state again only when it no longer matches."""
    return hashlib.blake2s(f"{first.count}\n".encode() + "\n".join(first.users).encode(), digest_size=6).hexdigest()


async def renew_all(held: list[tuple[str, int, str, str]]) -> None:
    """Renew the leases (room, user id, username, conn id) of this process's sockets,
    in one round trip (realtime/state/housekeeper.py)."""
    await backend().renew([(room, _member(user_id, username, conn_id)) for room, user_id, username, conn_id in held])


# -- announcing -------------------------------------------------------------------
async def announce(room: str) -> None:
    """Settle the room's due changes (leases run out, leaves past their grace) and
    queue them for the room's next diff."""
    try:
        joins, leaves = await backend().reconcile(room)
    except Exception as exc:  # Redis away: the next sweep tells them
        degraded.tolerate(degraded.PRESENCE, exc)
        return
    if joins or leaves:
        coalescer().add(room, joins=joins, leaves=leaves)


# room -> when the latest leave there is due (loop time), for the running loop: one
# timer per room however many leave at once (a drain closes thousands together).
_due_at = store.LoopLocal(dict)


def announce_later(room: str) -> None:
    """A leave is settled after GRACE seconds, unless the user is back by then. One
    reconcile per room for a burst of leaves: a timer already set for the room is
    moved on to the latest leave's time when it fires."""
    loop = asyncio.get_running_loop()
    due = _due_at()
    at = loop.time() + GRACE + 0.05
    waiting = room in due
    due[room] = at
    if not waiting:
        loop.call_at(at, _settle, room)


def _settle(room: str) -> None:
    loop = asyncio.get_running_loop()
    due = _due_at()
    at = due.get(room)
    if at is not None and at > loop.time() + 0.001:
        loop.call_at(at, _settle, room)  # a leave came after this timer was set
        return
    due.pop(room, None)
    asyncio.ensure_future(announce(room))


@dataclass
class _Pending:
    # Users (`<username>:<id>`, as announced) who came and went: ordered sets.
    joins: dict[str, None] = field(default_factory=dict)
    leaves: dict[str, None] = field(default_factory=dict)
    timer: asyncio.TimerHandle | None = None


class Coalescer:
    """This worker's presence diffs, per room: changes gathered, then sent as one
    presence.diff FIRST seconds after the first, and at most one every EVERY seconds."""

    def __init__(self) -> None:
        self.pending: dict[str, _Pending] = {}
        self.last: dict[str, float] = {}  # room -> when its last diff went (loop time)

    def add(self, room: str, joins: list[str] = (), leaves: list[str] = ()) -> None:
        pending = self.pending.get(room)
        if pending is None:
            pending = self.pending[room] = _Pending()
        for name in joins:
            if name in pending.leaves:
                del pending.leaves[name]  # back before the room heard they left: nothing to tell
            else:
                pending.joins[name] = None
        for name in leaves:
            if name in pending.joins:
                del pending.joins[name]  # came and went before the room heard of it
            else:
                pending.leaves[name] = None
        if pending.timer is None:
            loop = asyncio.get_running_loop()
            at = max(loop.time() + FIRST, self.last.get(room, float("-inf")) + EVERY)
            pending.timer = loop.call_at(at, lambda: asyncio.ensure_future(self.flush(room)))

    async def flush(self, room: str) -> None:
        from realtime import protocol
        from realtime.delivery import publish as broadcast

        pending = self.pending.pop(room, None)
        self.last[room] = asyncio.get_running_loop().time()
        if len(self.last) > 10_000:
            self.last = {r: t for r, t in self.last.items() if r in self.pending or r in LOCAL_ROOMS}
        if pending is None or not (pending.joins or pending.leaves):
            return
        try:
            count, here = await backend().told(room, [*pending.joins, *pending.leaves])
        except Exception as exc:
            degraded.tolerate(degraded.PRESENCE, exc)
            return
        # Only what is still so as it goes: another worker's diff about the same
        # user (a leave here, their new tab's join there) may have gone out first,
        # and the room hears the workers' diffs in the order they are sent.
        joins = sorted(_name(user) for user in pending.joins if user in here)
        leaves = sorted(_name(user) for user in pending.leaves if user not in here)
        if not (joins or leaves):
            return
        await broadcast.publish_push(
            broadcast.room_group(room),
            protocol.PresenceDiff(room=room, joins=joins[:DIFF_NAMES], leaves=leaves[:DIFF_NAMES], count=count,
                                  partial=len(joins) > DIFF_NAMES or len(leaves) > DIFF_NAMES),
            room=room,
        )


# The running loop's coalescer (its timers belong to that loop; tests run a loop per test).
coalescer = store.LoopLocal(Coalescer)


async def _sweep() -> None:
    from realtime.web import longpoll  # (which imports this module)

    while True:
        await asyncio.sleep(SWEEP)
        for room in sorted(set(LOCAL_ROOMS) | longpoll.polled_rooms()):
            await announce(room)


def ensure_started() -> None:
    """Start this process's presence sweep (once per event loop)."""
    store.start_once("presence-sweep", _sweep)


# -- typing throttle --------------------------------------------------------------
TYPING_EVERY = 2.0
_typing: dict[tuple[str, int], float] = {}


async def typing_allowed(room: str, user_id: int) -> bool:
    """At most one typing broadcast per user and room every TYPING_EVERY seconds
    (across workers with Redis)."""
    url = store.redis_url()
    if url:
        try:
            return bool(await store.client(url).set(f"rt:typing:{room}:{user_id}", 1, nx=True, px=int(TYPING_EVERY * 1000)))
        except Exception as exc:
            degraded.tolerate(degraded.PUSH, exc)  # typing notices are the first thing to go
            return False
    now = time.monotonic()
    if _typing.get((room, user_id), 0) > now:
        return False
    if len(_typing) > 10_000:
        for key in [k for k, t in _typing.items() if t <= now]:
            del _typing[key]
    _typing[(room, user_id)] = now + TYPING_EVERY
    return True
