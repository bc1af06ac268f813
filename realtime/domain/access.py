"""A user's access to a room, loaded once and checked against the policy
(domain/policy.py decides; this loads what it decides on).

Who may do what is the policy's: a private room the user may not see does not
exist for them (`not_found`, "no such room"), and `forbidden` is the answer only
for an action refused in a room the user can see.
"""

from __future__ import annotations

from dataclasses import dataclass

from django.db.models import OuterRef, Subquery

from realtime.domain.errors import NO_SUCH_ROOM, ActionError
from realtime.domain.policy import Action, can
from realtime.models import Membership, Room
from realtime.protocol import ErrorCode


@dataclass(frozen=True, slots=True)
class RoomAccess:
    room: Room
    role: str | None


def room_access(*, user, slug: str, action: Action) -> RoomAccess:
    """Load the room and the user's role, and check `action`; raise if refused."""
    if not (user.is_authenticated and user.is_active):
        raise ActionError(ErrorCode.FORBIDDEN, "not signed in")
    # One query: the room with the user's role in it.
    role_of = Membership.objects.filter(room=OuterRef("pk"), user_id=user.pk).values("role")[:1]
    room = Room.objects.filter(slug=slug).annotate(member_role=Subquery(role_of)).first()
    if room is None:
        raise ActionError(ErrorCode.NOT_FOUND, NO_SUCH_ROOM)
    access = RoomAccess(room=room, role=room.member_role)
    check(user, access, action)
    return access


def room_accesses(asks: list[tuple]) -> list[RoomAccess | ActionError]:
    """room_access for many (user, slug, action) at once, in their order: two
    queries in all (the rooms, the roles of these users in them), each answer
    decided for its own user object as room_access decides it; a refusal is the
    answer's ActionError."""
    slugs = {slug for _, slug, _ in asks}
    user_ids = {user.pk for user, _, _ in asks if user.is_authenticated}
    if len(user_ids) == 1:
        # One user (a subscribe alone, or one person's tabs): one query, as room_access.
        (user_id,) = user_ids
        role_of = Membership.objects.filter(room=OuterRef("pk"), user_id=user_id).values("role")[:1]
        rooms = {room.slug: room for room in Room.objects.filter(slug__in=slugs).annotate(member_role=Subquery(role_of))}
        roles = {(room.pk, user_id): room.member_role for room in rooms.values()}
    else:
        rooms = {room.slug: room for room in Room.objects.filter(slug__in=slugs)}
        roles = {(room_id, user_id): role for room_id, user_id, role in Membership.objects.filter(
            room__in=list(rooms.values()), user_id__in=user_ids).values_list("room_id", "user_id", "role")} if rooms and user_ids else {}
    found: list = []
    for user, slug, action in asks:
        try:
            if not (user.is_authenticated and user.is_active):
                raise ActionError(ErrorCode.FORBIDDEN, "not signed in")
            room = rooms.get(slug)
            if room is None:
                raise ActionError(ErrorCode.NOT_FOUND, NO_SUCH_ROOM)
            access = RoomAccess(room=room, role=roles.get((room.pk, user.pk)))
            check(user, access, action)
            found.append(access)
        except ActionError as exc:
            found.append(exc)
    return found


def check(user, access: RoomAccess, action: Action, **details) -> None:
    """Check `action` against an access already loaded; raise if refused.

    A room the user may not see does not exist for them: the refusal is the one a
    room that does not exist gets (not_found, "no such room"), so that a private
    room's name cannot be confirmed by asking. Only in a room they can see is a
    refused action `forbidden`. `details`: the policy's other arguments
    (target_role, new_role for MANAGE_MEMBERS)."""
    room = access.room
    if not can(user, Action.VIEW, is_public=room.is_public, role=access.role, kind=room.kind):
        raise ActionError(ErrorCode.NOT_FOUND, NO_SUCH_ROOM)
    if action is not Action.VIEW:
        decision = can(user, action, is_public=room.is_public, role=access.role, kind=room.kind, **details)
        if not decision:
            raise ActionError(ErrorCode.FORBIDDEN, decision.reason)
