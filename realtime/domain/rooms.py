"""Writes about rooms themselves: making a room, joining and leaving it, managing its
members, and opening a direct message (DM).

Like every write in domain/services.py, each runs in its own transaction and returns
(result, events): the membership events (member.joined, member.left, member.role)
take the room's next seq in the same transaction, and the caller publishes them
after commit through services.perform / perform_sync, the one way room events
leave. A membership saved or deleted here also sends the room's subscribers an
access.check on commit (realtime/signals.py), so a member removed from a private
room loses its stream at once.

Who may do what: domain/policy.py (JOIN, LEAVE, MANAGE_MEMBERS). What only a count
can decide (the last owner may not go) is checked here, under the room row's lock,
so two owners leaving at once cannot both succeed.
"""

from __future__ import annotations

import re
import secrets
import unicodedata
from dataclasses import dataclass

from django.contrib.auth import get_user_model
from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils.text import slugify

from realtime import protocol
from realtime.delivery import publish
from realtime.domain import roomlog
from realtime.domain.access import RoomAccess, check, room_access
from realtime.domain.errors import ActionError
from realtime.domain.policy import Action
from realtime.models import ROOM_NAME_MAX, ROOM_TOPIC_MAX, Membership, Role, Room, RoomKind
from realtime.protocol import ErrorCode

SLUG_BASE_MAX = 40  # leaves room for "-NNN" within the slug's 50
DM_MAX_PEOPLE = 8  # the asker included
NO_SUCH_USER = "no such user: {}"
LAST_OWNER = "the room's last owner may not leave or stop being an owner; make someone else an owner first"


@dataclass(frozen=True, slots=True)
class MemberResult:
    room: str
    user: str
    role: str | None  # None: not a member (any more)
    seq: int | None  # the event's seq; None when nothing changed

    def as_dict(self) -> dict:
        return {"room": self.room, "user": self.user, "role": self.role, "seq": self.seq}


# ---------------------------------------------------------------------------
# Names and topics
# ---------------------------------------------------------------------------
def _has_control(text: str, allowed: frozenset[str] = frozenset()) -> bool:
    # Cf too: bidi overrides and invisible characters make one name look like another.
    return any(ch not in allowed and unicodedata.category(ch) in ("Cc", "Cs", "Cf") for ch in text)


def clean_name(name: str) -> str:
    """A room name: plain text on one line, 1..80 characters once spaces are
    collapsed, with at least one letter or digit (the slug is made from it)."""
    if not isinstance(name, str):
        raise ActionError(ErrorCode.INVALID, "the room name must be a string")
    if _has_control(name):
        raise ActionError(ErrorCode.INVALID, "the room name contains control characters")
    name = " ".join(name.split())
    if not name:
        raise ActionError(ErrorCode.INVALID, "the room name is empty")
    if len(name) > ROOM_NAME_MAX:
        raise ActionError(ErrorCode.TOO_LARGE, f"the room name is longer than {ROOM_NAME_MAX} characters")
    if "<" in name or ">" in name:
        raise ActionError(ErrorCode.INVALID, "room names are plain text: < and > are not allowed")
    if not any(ch.isalnum() for ch in name):
        raise ActionError(ErrorCode.INVALID, "the room name needs at least one letter or digit")
    return name


def clean_topic(topic: str) -> str:
    """A room topic: plain text on one line, at most 250 characters (may be empty)."""
    if not isinstance(topic, str):
        raise ActionError(ErrorCode.INVALID, "the topic must be a string")
    if _has_control(topic):
        raise ActionError(ErrorCode.INVALID, "the topic contains control characters")
    topic = " ".join(topic.split())
    if len(topic) > ROOM_TOPIC_MAX:
        raise ActionError(ErrorCode.TOO_LARGE, f"the topic is longer than {ROOM_TOPIC_MAX} characters")
    return topic


def slug_base(name: str) -> str:
    """The slug a name asks for: "Team Alpha!" -> "team-alpha". A name with no
    Latin letter or digit ("Équipe" keeps its e; "日本語" has none) gets "room"."""
    base = slugify(name)[:SLUG_BASE_MAX].strip("-_")
    return base or "room"


def _free_slug(base: str) -> str:
    """`base`, or `base-2`, `base-3`, ... : the first no room has (any room: slugs
    are one namespace)."""
    pattern = re.compile(rf"^{re.escape(base)}(?:-(\d+))?$")
    taken = {slug for slug in Room.objects.filter(slug__startswith=base).values_list("slug", flat=True)
             if pattern.match(slug)}
    if base not in taken:
        return base
    n = 2
    while f"{base}-{n}" in taken:
        n += 1
    return f"{base}-{n}"


# ---------------------------------------------------------------------------
# Making a room
# ---------------------------------------------------------------------------
def room_create(*, user, name: str, visibility: str, topic: str = "") -> tuple[Room, list]:
    """Make a room; its creator is its owner (the log's first event says so).

    A name that a room the user can see already has (compared without case) is a
    conflict: two rooms the same person can pick from should not look the same.
    Rooms they cannot see do not count, so the answer tells nothing about private
    rooms. Slugs are unique across all rooms: a taken one gets a number."""
    if not (user.is_authenticated and user.is_active):
        raise ActionError(ErrorCode.FORBIDDEN, "not signed in")
    name, topic = clean_name(name), clean_topic(topic)
    if visibility not in ("public", "private"):
        raise ActionError(ErrorCode.INVALID, "visibility is public or private")
    seen = Room.objects.filter(kind=RoomKind.ROOM, title__iexact=name)
    if not user.is_staff:
        seen = seen.filter(Q(is_public=True) | Q(memberships__user=user))
    if seen.exists():
        raise ActionError(ErrorCode.CONFLICT, f"a room named {name!r} exists already; pick another name")
    base = slug_base(name)
    for _ in range(5):
        try:
            with transaction.atomic():
                room = Room.objects.create(slug=_free_slug(base), title=name, topic=topic,
                                           is_public=visibility == "public", kind=RoomKind.ROOM)
                Membership.objects.create(room=room, user=user, role=Role.OWNER)
                event = _log(room, protocol.MemberJoined, user=user.get_username(), role=Role.OWNER)
            return room, [event]
        except IntegrityError:
            continue  # another request took that slug meanwhile: the next number
    raise ActionError(ErrorCode.CONFLICT, "could not find a free address for this room; try again")


def _log(room: Room, frame, **fields) -> protocol.RoomEvent:
    """Append a membership event with the room's next seq (inside the caller's
    transaction)."""
    seq = roomlog.next_seq(room.pk)
    return roomlog.append(room, frame(room=room.slug, seq=seq, **{k: v for k, v in fields.items() if v is not None}))


def _locked(access: RoomAccess) -> None:
    """Lock the room's row for the rest of the transaction (PostgreSQL; SQLite has
    one writer at a time anyway): membership checks and changes of one room queue."""
    Room.objects.select_for_update().filter(pk=access.room.pk).values_list("pk", flat=True).first()


def _owners_left(room: Room, without: int) -> int:
    return Membership.objects.filter(room=room, role=Role.OWNER).exclude(user_id=without).count()


# ---------------------------------------------------------------------------
# Joining and leaving
# ---------------------------------------------------------------------------
def room_join(*, user, slug: str) -> tuple[MemberResult, list]:
    """Join a public room as a member. Already a member: nothing changes (a retry
    gets the same answer). A private room is joined by invitation only; one the
    user cannot see is not found."""
    with transaction.atomic():
        access = room_access(user=user, slug=slug, action=Action.VIEW)
        _locked(access)
        access = room_access(user=user, slug=slug, action=Action.JOIN)  # as of the lock
        name = user.get_username()
        if access.role is not None:
            return MemberResult(access.room.slug, name, access.role, None), []
        Membership.objects.create(room=access.room, user=user, role=Role.MEMBER)
        event = _log(access.room, protocol.MemberJoined, user=name, role=Role.MEMBER)
    return MemberResult(access.room.slug, name, Role.MEMBER, event.seq), [event]


def room_leave(*, user, slug: str) -> tuple[MemberResult, list]:
    """Leave a room. Not a member: nothing changes. The last owner may not leave
    (conflict): a room without an owner could never be managed again."""
    with transaction.atomic():
        access = room_access(user=user, slug=slug, action=Action.VIEW)
        _locked(access)
        access = room_access(user=user, slug=slug, action=Action.LEAVE)
        return _remove(access, user, by=None)


def _remove(access: RoomAccess, target, by) -> tuple[MemberResult, list]:
    room, name = access.room, target.get_username()
    role = Membership.objects.filter(room=room, user=target).values_list("role", flat=True).first()
    if role is None:
        return MemberResult(room.slug, name, None, None), []
    if role == Role.OWNER and _owners_left(room, without=target.pk) == 0:
        raise ActionError(ErrorCode.CONFLICT, LAST_OWNER)
    Membership.objects.filter(room=room, user=target).delete()
    event = _log(room, protocol.MemberLeft, user=name, by=by.get_username() if by is not None else None)
    return MemberResult(room.slug, name, None, event.seq), [event]


# ---------------------------------------------------------------------------
# Managing members
# ---------------------------------------------------------------------------
def _person(username: str):
    """An active user by exact username; a deactivated one is answered as missing."""
    found = get_user_model().objects.filter(username=username, is_active=True).first()
    if found is None:
        raise ActionError(ErrorCode.NOT_FOUND, NO_SUCH_USER.format(username))
    return found


def _managing(user, slug: str) -> RoomAccess:
    """The room, locked, for a members change: visible to `user` (else not_found)."""
    access = room_access(user=user, slug=slug, action=Action.VIEW)
    _locked(access)
    return room_access(user=user, slug=slug, action=Action.VIEW)


def member_add(*, user, slug: str, username: str, role: str = Role.MEMBER) -> tuple[MemberResult, list]:
    """Add someone (owners and moderators; owners only for the owner and moderator
    roles). Someone already a member is a conflict: change a role with member_set_role."""
    with transaction.atomic():
        access = _managing(user, slug)
        check(user, access, Action.MANAGE_MEMBERS, target_role=None, new_role=role)
        target = _person(username)
        if Membership.objects.filter(room=access.room, user=target).exists():
            raise ActionError(ErrorCode.CONFLICT, f"{username} is a member already; change their role instead")
        Membership.objects.create(room=access.room, user=target, role=role)
        event = _log(access.room, protocol.MemberJoined, user=username, role=role, by=user.get_username())
    return MemberResult(access.room.slug, username, role, event.seq), [event]


def member_set_role(*, user, slug: str, username: str, role: str) -> tuple[MemberResult, list]:
    """Change a member's role. The same role again changes nothing. The last owner
    may not stop being one (conflict)."""
    with transaction.atomic():
        access = _managing(user, slug)
        target, current = _member(access, username)
        check(user, access, Action.MANAGE_MEMBERS, target_role=current, new_role=role)
        if current is None:
            raise _not_a_member(username)
        if current == role:
            return MemberResult(access.room.slug, username, role, None), []
        if current == Role.OWNER and _owners_left(access.room, without=target.pk) == 0:
            raise ActionError(ErrorCode.CONFLICT, LAST_OWNER)
        membership = Membership.objects.get(room=access.room, user=target)
        membership.role = role
        membership.save(update_fields=["role"])  # its signal re-checks the room's sockets
        event = _log(access.room, protocol.MemberRole, user=username, role=role, by=user.get_username())
    return MemberResult(access.room.slug, username, role, event.seq), [event]


def member_remove(*, user, slug: str, username: str) -> tuple[MemberResult, list]:
    """Remove a member (owners and moderators; owners only for owners and
    moderators). Removing oneself is leaving (room_leave's rules)."""
    if username == user.get_username():
        return room_leave(user=user, slug=slug)
    with transaction.atomic():
        access = _managing(user, slug)
        target, current = _member(access, username)
        check(user, access, Action.MANAGE_MEMBERS, target_role=current, new_role=None)
        if current is None:
            raise _not_a_member(username)
        return _remove(access, target, by=user)


def _member(access: RoomAccess, username: str):
    """(user, role in the room): (None, None) for no such user, (user, None) for
    someone who is not a member. The caller asks the policy first, so that whoever
    may not manage members is told so whatever name they send."""
    target = get_user_model().objects.filter(username=username).first()
    if target is None:
        return None, None
    return target, Membership.objects.filter(room=access.room, user=target).values_list("role", flat=True).first()


def _not_a_member(username: str) -> ActionError:
    return ActionError(ErrorCode.NOT_FOUND, f"{username} is not a member of this room")


# ---------------------------------------------------------------------------
# Direct messages
# ---------------------------------------------------------------------------
def dm_key(user_ids) -> str:
    return ".".join(str(pk) for pk in sorted(set(user_ids)))


def _find_dm(key: str) -> Room | None:
    return Room.objects.filter(dm_key=key).first()


def dm_open(*, user, usernames: list[str]) -> tuple[tuple[Room, bool], list]:
    """The one private room of exactly the asker and `usernames`: made on the first
    ask (True), found on every later one, in any order (False). Everyone in it is a
    member. Refused, with nothing made: no one but oneself, a name twice, more than
    DM_MAX_PEOPLE people in all (too_large), an unknown or deactivated user
    (not_found, the same answer for both)."""
    if not (user.is_authenticated and user.is_active):
        raise ActionError(ErrorCode.FORBIDDEN, "not signed in")
    me = user.get_username()
    others = [name for name in usernames if name != me]
    if len(others) + 1 > DM_MAX_PEOPLE:
        raise ActionError(ErrorCode.TOO_LARGE, f"a direct message has at most {DM_MAX_PEOPLE} people, you included")
    if len(set(usernames)) != len(usernames):
        raise ActionError(ErrorCode.INVALID, "a name is listed twice")
    if not others:
        raise ActionError(ErrorCode.INVALID, "a direct message needs someone besides you")
    people = {u.username: u for u in get_user_model().objects.filter(username__in=others, is_active=True)}
    for name in others:
        if name not in people:
            raise ActionError(ErrorCode.NOT_FOUND, NO_SUCH_USER.format(name))
    key = dm_key([user.pk, *(u.pk for u in people.values())])
    found = _find_dm(key)
    if found is not None:
        return (found, False), []
    everyone = sorted([user, *people.values()], key=lambda u: u.username)
    for _ in range(3):
        try:
            with transaction.atomic():
                room = Room.objects.create(slug=f"dm-{secrets.token_hex(5)}", kind=RoomKind.DM, is_public=False,
                                           title=", ".join(u.username for u in everyone), dm_key=key)
                Membership.objects.bulk_create([Membership(room=room, user=u, role=Role.MEMBER) for u in everyone])
                for u in everyone:  # (bulk_create sends no post_save: realtime/signals.py)
                    publish.rooms_changed_on_commit(u.pk, room.slug, "added")
                events = [_log(room, protocol.MemberJoined, user=u.username, role=Role.MEMBER) for u in everyone]
            return (room, True), events
        except IntegrityError:
            # The same people asked at the same moment and won (the unique dm_key):
            # theirs is the room. (Or a random slug was taken: try another.)
            found = _find_dm(key)
            if found is not None:
                return (found, False), []
    raise ActionError(ErrorCode.INTERNAL, "could not open the direct message; try again")
