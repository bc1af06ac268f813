"""Who is in each room, across every worker, and right after a worker crashes.

Each subscribed socket holds a lease in its room's sorted set in Redis
(`rt:pres:<room>`: member `<user id>:<username>:<conn id>`, score = expiry). A live
socket's leases are renewed every RENEW seconds (all of a worker's at once, by
realtime/state/housekeeper.py); a socket that closes removes its own;
a worker killed with -9 removes nothing and its leases run out after TTL seconds.

A user is present while any of their sockets holds a lease, so several tabs or
devices count once. What the room has been told is the set `rt:pres:ann:<room>`;
`reconcile` compares it with who is present now and returns the difference as
joins and leaves (one Lua script, so two workers reconciling at once cannot both
announce the same change). Joins are reconciled at once; leaves after GRACE seconds,
so a tab that reloads (leave, then join within a second or two) announces nothing.
Every worker also reconciles the rooms its own sockets follow every SWEEP seconds,
which is how a dead worker's users leave: within TTL + SWEEP = 25 s of its death.

Without REDIS_URL the same happens in this process's memory.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import Counter

from realtime.state import degraded, store

log = logging.getLogger(__name__)

TTL = 20.0
RENEW = 8.0
GRACE = 2.5
SWEEP = 5.0
BOUND = TTL + SWEEP  # the longest a crashed worker's users stay present

# The clocks the presence leases are timed by (tests put one they move in their place): wall time
# in Redis, where every worker compares the scores; this process's monotonic clock
# for its own.
wall_clock = time.time
local_clock = time.monotonic

# Rooms followed by this process's sockets (room -> number of sockets), for the sweep.
LOCAL_ROOMS: Counter[str] = Counter()

_RECONCILE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
local present = {}
for _, member in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  present[string.match(member, '^(.*):[^:]*$')] = true
end
local joins, leaves = {}, {}
for user, _ in pairs(present) do
  if redis.call('SISMEMBER', KEYS[2], user) == 0 then
    table.insert(joins, user)
    redis.call('SADD', KEYS[2], user)
  end
end
for _, user in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  if not present[user] then
    table.insert(leaves, user)
    redis.call('SREM', KEYS[2], user)
  end
end
redis.call('EXPIRE', KEYS[2], 86400)
return {joins, leaves}
"""


def _keys(room: str) -> tuple[str, str]:
    return f"rt:pres:{room}", f"rt:pres:ann:{room}"


def _member(user_id: int, username: str, conn_id: str) -> str:
    return f"{user_id}:{username}:{conn_id}"


def _name(user: str) -> str:
    """The username of a `<id>:<username>` entry."""
    return user.split(":", 1)[1]


class MemoryPresence:
    def __init__(self) -> None:
        self.leases: dict[str, dict[str, float]] = {}
        self.announced: dict[str, set[str]] = {}

    async def join(self, room: str, member: str, ttl: float | None = None) -> None:
        self.leases.setdefault(room, {})[member] = local_clock() + (ttl or TTL)

    async def renew(self, pairs: list[tuple[str, str]]) -> None:
        for room, member in pairs:
            if member in self.leases.get(room, {}):
                self.leases[room][member] = local_clock() + TTL

    async def leave(self, room: str, member: str) -> None:
        self.leases.get(room, {}).pop(member, None)

    def _present(self, room: str) -> set[str]:
        now = local_clock()
        live = {m: t for m, t in self.leases.get(room, {}).items() if t > now}
        self.leases[room] = live
        return {m.rsplit(":", 1)[0] for m in live}

    async def present(self, room: str) -> set[str]:
        return self._present(room)

    async def reconcile(self, room: str) -> tuple[list[str], list[str]]:
        present = self._present(room)
        announced = self.announced.setdefault(room, set())
        joins, leaves = sorted(present - announced), sorted(announced - present)
        announced.update(joins)
        announced.difference_update(leaves)
        return joins, leaves


class RedisPresence:
    def __init__(self, url: str) -> None:
        self.url = url

    async def join(self, room: str, member: str, ttl: float | None = None) -> None:
        key, _ = _keys(room)
        client = store.client(self.url)
        pipe = client.pipeline(transaction=False)
        pipe.zadd(key, {member: wall_clock() + (ttl or TTL)})
        pipe.expire(key, 86400)
        await pipe.execute()

    async def renew(self, pairs: list[tuple[str, str]]) -> None:
        # Only leases still held: one given back by a closing socket stays gone.
        await store.renew_scores(self.url, [(_keys(room)[0], member) for room, member in pairs], TTL,
                                 now=wall_clock(), only_existing=True)

    async def leave(self, room: str, member: str) -> None:
        await store.client(self.url).zrem(_keys(room)[0], member)

    async def present(self, room: str) -> set[str]:
        members = await store.client(self.url).zrangebyscore(_keys(room)[0], wall_clock(), "+inf")
        return {(m.decode() if isinstance(m, bytes) else m).rsplit(":", 1)[0] for m in members}

    async def reconcile(self, room: str) -> tuple[list[str], list[str]]:
        joins, leaves = await store.client(self.url).eval(_RECONCILE, 2, *_keys(room), wall_clock())
        decode = lambda items: sorted(i.decode() if isinstance(i, bytes) else i for i in items)  # noqa: E731
        return decode(joins), decode(leaves)


# The presence store in use: shared through Redis, or this process's own.
backend = store.Chooser(RedisPresence, MemoryPresence)


# -- what the consumer calls ----------------------------------------------------------
async def names(room: str) -> list[str]:
    """The usernames present in the room now (none known while Redis is down)."""
    try:
        return sorted({_name(user) for user in await backend().present(room)})
    except Exception as exc:
        degraded.tolerate(degraded.PRESENCE, exc)
        return []


async def changes(room: str) -> tuple[list[str], list[str]] | None:
    """Reconcile the room; the (joins, leaves) usernames to announce, if any."""
    joins, leaves = await backend().reconcile(room)
    if not joins and not leaves:
        return None
    return [_name(u) for u in joins], [_name(u) for u in leaves]


async def join(room: str, user_id: int, username: str, conn_id: str) -> None:
    """Present in the room from now (skipped while Redis is down: the housekeeper's
    renewal makes it so once Redis is back, and the sweep announces it)."""
    LOCAL_ROOMS[room] += 1
    try:
        await backend().join(room, _member(user_id, username, conn_id))
    except Exception as exc:
        degraded.tolerate(degraded.PRESENCE, exc)


async def leave(room: str, user_id: int, username: str, conn_id: str) -> None:
    """Gone from the room (skipped while Redis is down: the lease runs out by itself)."""
    LOCAL_ROOMS[room] -= 1
    if LOCAL_ROOMS[room] <= 0:
        del LOCAL_ROOMS[room]
    try:
        await backend().leave(room, _member(user_id, username, conn_id))
    except Exception as exc:
        degraded.tolerate(degraded.PRESENCE, exc)


async def poll_join(room: str, user_id: int, username: str, conn_id: str, ttl: float) -> None:
    """A long poll's page is present in the room for `ttl` seconds (its wait plus a
    grace): each poll renews it, a page that stops polling runs out. Not counted in
    LOCAL_ROOMS: realtime/web/longpoll.py names the rooms its polls follow to the sweep."""
    try:
        await backend().join(room, _member(user_id, username, conn_id), ttl=ttl)
    except Exception as exc:
        degraded.tolerate(degraded.PRESENCE, exc)


async def poll_leave(room: str, user_id: int, username: str, conn_id: str) -> None:
    """A polling page is gone (it hung up a held poll, or lost the room)."""
    try:
        await backend().leave(room, _member(user_id, username, conn_id))
    except Exception as exc:
        degraded.tolerate(degraded.PRESENCE, exc)


def tag(users: list[str]) -> str:
    """A short digest of who is present (sorted usernames): a poller sends back the one
    it has, and gets presence.state again only when it no longer matches."""
    return hashlib.blake2s("\n".join(users).encode(), digest_size=6).hexdigest()


async def renew_all(held: list[tuple[str, int, str, str]]) -> None:
    """Renew the leases (room, user id, username, conn id) of this process's sockets,
    in one round trip (realtime/state/housekeeper.py)."""
    await backend().renew([(room, _member(user_id, username, conn_id)) for room, user_id, username, conn_id in held])


# -- announcing -------------------------------------------------------------------
async def announce(room: str, skip_conn: str | None = None) -> None:
    """Tell the room's subscribers who came and went, if anyone did (not the socket
    `skip_conn`, which is about to get the whole presence.state)."""
    from realtime import protocol
    from realtime.delivery import publish as broadcast

    try:
        diff = await changes(room)
    except Exception as exc:  # Redis away: the next sweep tells them
        degraded.tolerate(degraded.PRESENCE, exc)
        return
    if diff is not None:
        joins, leaves = diff
        await broadcast.publish_push(
            broadcast.room_group(room), protocol.PresenceDiff(room=room, joins=joins, leaves=leaves),
            room=room, skip_conn=skip_conn,
        )


def announce_later(room: str) -> None:
    """A leave is announced after GRACE seconds, unless the user is back by then."""
    loop = asyncio.get_running_loop()
    loop.call_later(GRACE, lambda: asyncio.ensure_future(announce(room)))


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
