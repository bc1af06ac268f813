"""@name in a message body: which users it names, resolved when the message is
sent or edited (domain/services.py), so that every reader sees the same answer and
the event is encoded once for the whole room.

A mention is `@` at the start of the body or after a character that is neither a
word character nor `@` (so `bob@example.com` and `@@bob` name no one), followed by a
username: word characters, with `.`, `+` and `-` inside it (so `@bob.` and `@bob,`
name bob). The first MAX_PER_MESSAGE different names are looked up, without regard
to case; a name counts when it is an active user who may see the room (VIEW in
domain/policy.py: anyone in a public room; members and staff in a private one) and
is not the author. Anyone else (a non-member of a private room, a deactivated or
unknown name) is left out: they are not in the event's `mentions`, get no Mention
row, and so learn nothing and count nothing.

The common case costs nothing: a body without `@` is not even scanned. A batch of
sends looks its names up in one query (`resolve`), or, on PostgreSQL's one-statement
write (domain/roomlog.py), inside that statement: there the policy's answer comes
from `may_view`, a table of the (role, staff) pairs that may see the room, asked of
`can` itself, so the SQL holds no second copy of the rule.
"""

from __future__ import annotations

import re
from functools import cache, reduce
from operator import or_
from types import SimpleNamespace

from django.contrib.auth import get_user_model
from django.db.models import OuterRef, Q, Subquery

from realtime.domain.policy import Action, can
from realtime.models import Membership, Role, Room

MAX_PER_MESSAGE = 20
MENTION = re.compile(r"(?<![\w@])@(\w(?:[\w.+-]*\w)?)")

# A resolved mention: (user id, username).
Mentioned = tuple[int, str]


def names_in(body: str) -> list[str]:
    """The @names of a body, in order of first appearance, each once (compared
    without case), at most MAX_PER_MESSAGE."""
    if "@" not in body:
        return []
    found: dict[str, str] = {}
    for match in MENTION.finditer(body):
        name = match.group(1)
        found.setdefault(name.lower(), name)
        if len(found) == MAX_PER_MESSAGE:
            break
    return list(found.values())


def resolve(room: Room, author, bodies: list[str]) -> list[list[Mentioned]]:
    """For each body (all to `room`, by `author`), the users it mentions who may
    see the room, in order of first mention: one query for all of them, none when
    no body names anyone."""
    wanted = [names_in(body) for body in bodies]
    names = {name for found in wanted for name in found}
    if not names:
        return [[] for _ in bodies]
    role = Membership.objects.filter(room=room, user=OuterRef("pk")).values("role")[:1]
    users = (get_user_model().objects.filter(reduce(or_, (Q(username__iexact=name) for name in names)), is_active=True)
             .exclude(pk=author.pk).annotate(room_role=Subquery(role)).order_by("username"))
    by_name: dict[str, list[Mentioned]] = {}
    for user in users:
        if can(user, Action.VIEW, is_public=room.is_public, role=user.room_role, kind=room.kind):
            by_name.setdefault(user.get_username().lower(), []).append((user.pk, user.get_username()))
    result = []
    for found in wanted:
        mentioned: list[Mentioned] = []
        for name in found:
            for pair in by_name.get(name.lower(), ()):
                if pair not in mentioned:
                    mentioned.append(pair)
        result.append(mentioned)
    return result


@cache
def may_view(*, is_public: bool, kind: str) -> tuple[str, ...]:
    """Who may see a room of this visibility and kind, as `role:staff` keys (`role`
    empty for no membership, `staff` t or f) for every active user: the policy's
    own answers (`can`), tabulated once, for SQL to compare a candidate's key with."""
    keys = []
    for role in (None, *Role.values):
        for staff in (False, True):
            someone = SimpleNamespace(is_authenticated=True, is_active=True, is_staff=staff, pk=None)
            if can(someone, Action.VIEW, is_public=is_public, role=role, kind=kind):
                keys.append(f"{role or ''}:{'t' if staff else 'f'}")
    return tuple(keys)
