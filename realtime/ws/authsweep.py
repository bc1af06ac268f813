"""Changes made without a signal, seen within seconds.

Logout, a password change, deactivation, a removed membership or a room made
private, saved through the ORM, send a signal that reaches the user's sockets on
every worker at once (accounts/signals.py, realtime/signals.py). A change made
without one (a queryset `update()`, raw SQL, another program on the database) sent
nothing, and a socket found out only at its own periodic session check (60 s) or
when its cached access aged out (30 s).

Every REALTIME_AUTH_SWEEP seconds (4 by default) each worker reads, in three
queries on a thread of its own, what the database says now about the sockets it
holds, and compares:

- each user's auth stamp (a hash of the password hash, is_active, is_staff,
  is_superuser and the username) with the one the socket took when it opened:
  a difference sends the socket `auth.changed`, which checks its session again
  (closing with 4001 if it ended) and reloads the user and its rooms' access;
- each socket's session (database-backed sessions: present and not expired):
  gone sends `session.check`;
- each subscription's room visibility and the user's role in it with what the
  socket holds: a room it may no longer see, or a role or visibility different
  from its cached access, sends `access.check` for that room.

So a revocation made behind the ORM's back closes or narrows the socket within
twice the sweep period. The sweep's cost is per worker, not per socket: three
queries with IN lists of this worker's users, sessions and rooms (chunked).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field

from channels.db import database_sync_to_async
from django.conf import settings
from django.contrib.auth import get_user_model
from django.utils import timezone

from realtime.delivery import names
from realtime.delivery import publish as broadcast
from realtime.models import Membership, Room, RoomKind
from realtime.domain.policy import Action, can

log = logging.getLogger(__name__)

AUTH_CHANGED = names.AUTH_CHANGED
CHUNK = 500
DB_SESSIONS = {"django.contrib.sessions.backends.db", "django.contrib.sessions.backends.cached_db"}


def auth_stamp(password: str, is_active: bool, is_staff: bool, is_superuser: bool, username: str) -> int:
    """What a socket's standing depends on, of its user, as one small number."""
    text = "\x00".join((password, str(is_active), str(is_staff), str(is_superuser), username))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def stamp_of(user) -> int:
    return auth_stamp(user.password, user.is_active, user.is_staff, user.is_superuser, user.get_username())


def sweeps_sessions() -> bool:
    """Whether the sweep reads sessions (the engine keeps them in the database)."""
    return settings.SESSION_ENGINE in DB_SESSIONS


def _chunks(items: list) -> list[list]:
    return [items[i:i + CHUNK] for i in range(0, len(items), CHUNK)]


@dataclass(slots=True)
class Found:
    stamps: dict[int, int]  # user id -> auth stamp (active users only)
    staff: dict[int, bool]
    live_sessions: set[str] | None  # None: the session engine cannot be swept
    swept: set[str]  # the rooms asked about
    public: dict[str, bool]  # room slug -> is_public (rooms that exist)
    roles: dict[tuple[str, int], str]  # (room slug, user id) -> role
    kinds: dict[str, str] = field(default_factory=dict)  # room slug -> kind (a DM is for its people only)


def read(user_ids: list[int], session_keys: list[str], slugs: list[str]) -> Found:
    """What the database says now (on a thread: three queries, chunked)."""
    stamps, staff = {}, {}
    fields = ("pk", "password", "is_active", "is_staff", "is_superuser", get_user_model().USERNAME_FIELD)
    for chunk in _chunks(user_ids):
        for pk, password, active, is_staff, superuser, username in (
            get_user_model().objects.filter(pk__in=chunk, is_active=True).values_list(*fields)
        ):
            stamps[pk] = auth_stamp(password, active, is_staff, superuser, username)
            staff[pk] = is_staff
    live = None
    if sweeps_sessions():
        from django.contrib.sessions.models import Session

        live = set()
        now = timezone.now()
        for chunk in _chunks(session_keys):
            live.update(Session.objects.filter(session_key__in=chunk, expire_date__gt=now)
                        .values_list("session_key", flat=True))
    public, ids, kinds = {}, {}, {}
    for chunk in _chunks(slugs):
        for pk, slug, is_public, kind in Room.objects.filter(slug__in=chunk).values_list("pk", "slug", "is_public",
                                                                                          "kind"):
            public[slug], ids[pk], kinds[slug] = is_public, slug, kind
    roles = {}
    for rooms in _chunks(list(ids)):
        for users in _chunks(user_ids):
            for room_id, user_id, role in Membership.objects.filter(room_id__in=rooms, user_id__in=users).values_list(
                "room_id", "user_id", "role"
            ):
                roles[(ids[room_id], user_id)] = role
    return Found(stamps, staff, live, set(slugs), public, roles, kinds)


class _Viewer:
    """What the policy needs of a user: enough to decide VIEW from swept values."""

    __slots__ = ("pk", "is_staff")
    is_authenticated = True
    is_active = True

    def __init__(self, pk: int, is_staff: bool):
        self.pk, self.is_staff = pk, is_staff


def compare(sockets, found: Found) -> int:
    """Queue a check on each socket whose standing changed; how many were queued."""
    queued = 0
    for consumer in sockets:
        if not consumer.authenticated or consumer.revoked:
            continue
        uid = consumer.user.pk
        if found.stamps.get(uid) != consumer.auth_stamp:
            consumer.local_queue.put_nowait({"type": AUTH_CHANGED})
            queued += 1
            continue
        # (A token socket has no session: its user's stamp above is its check.)
        if found.live_sessions is not None and consumer.session_key and consumer.session_key not in found.live_sessions:
            consumer.local_queue.put_nowait({"type": broadcast.SESSION_CHECK})
            queued += 1
            continue
        viewer = _Viewer(uid, found.staff.get(uid, False))
        for slug, sub in consumer.subscriptions.items():
            if slug not in found.swept:
                continue  # subscribed since the read began
            is_public, role = found.public.get(slug), found.roles.get((slug, uid))
            visible = is_public is not None and can(viewer, Action.VIEW, is_public=is_public, role=role,
                                                     kind=found.kinds.get(slug, RoomKind.ROOM))
            cached = sub.access
            if not visible or (cached is not None and (cached.room.is_public, cached.role) != (is_public, role)):
                consumer.forget_access(slug)
                consumer.local_queue.put_nowait({"type": broadcast.ACCESS_CHECK, "room": slug})
                queued += 1
    return queued


async def sweep(sockets) -> int:
    """Read and compare for this worker's open sockets (housekeeper.py calls it)."""
    live = [c for c in sockets if c.authenticated and not c.revoked]
    if not live:
        return 0
    user_ids = sorted({c.user.pk for c in live})
    session_keys = sorted({c.session_key for c in live if c.session_key})
    slugs = sorted({slug for c in live for slug in c.subscriptions})
    # A thread of its own (not the one every socket's database work queues on).
    found = await database_sync_to_async(read, thread_sensitive=False)(user_ids, session_keys, slugs)
    return compare(live, found)

