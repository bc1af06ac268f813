"""The one policy: may USER do ACTION in ROOM, given their role there.

Pure predicates over already-loaded values (no queries), so the socket, the REST
API and the admin ask the same question the same way, and tests need no database.

Roles: owner > moderator > member > reader. In a public room a signed-in user with
no membership acts as a member (may read and post); an explicit `reader` membership
takes posting away. Private rooms exist for their members only. Staff may read and
moderate (delete in) every room, but post only where their role allows it.
Reacting to a message (adding or taking back one's own reaction) is posting's
right: a reader may not, and staff react where they may post.

Rooms have a kind (Room.kind): a room people make, join and leave, or a direct
message (DM), the private room of a fixed set of people. A DM is seen by its people
only (staff included: no role, no view), and nobody joins, leaves or changes its
members; its people are all plain members.

Who manages members (add, remove, change a role): owners and moderators; only
owners give or take the owner and moderator roles, or act on an owner or a
moderator. Staff have no say here beyond their role (they use the admin). Joining
is for public rooms; anyone may leave (the last owner is stopped by the service,
which can count the owners).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from realtime.models import Role, RoomKind

POSTING_ROLES = frozenset({Role.OWNER, Role.MODERATOR, Role.MEMBER})
MODERATING_ROLES = frozenset({Role.OWNER, Role.MODERATOR})
# Roles only an owner gives, takes, or acts on.
OWNER_ONLY_ROLES = frozenset({Role.OWNER, Role.MODERATOR})
DM_FIXED = "the people in a direct message are fixed; start another one instead"


class Action(enum.StrEnum):
    VIEW = "view"  # subscribe, replay, history
    POST = "post"  # message.send
    EDIT = "edit"  # message.edit (own messages)
    DELETE = "delete"  # message.delete
    REACT = "react"  # reaction.add, reaction.remove (one's own)
    JOIN = "join"  # POST rooms/<slug>/join/ (public rooms)
    LEAVE = "leave"  # POST rooms/<slug>/leave/, or DELETE members/<oneself>/
    MANAGE_MEMBERS = "manage_members"  # add, remove, change the role of someone else


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.allowed


ALLOW = Decision(True)


def effective_role(*, is_public: bool, role: str | None) -> str | None:
    """The role a user acts with: their membership's, or member in a public room."""
    if role is not None:
        return role
    return Role.MEMBER if is_public else None


def can(
    user,
    action: Action,
    *,
    is_public: bool,
    role: str | None,
    author_id: int | None = None,
    kind: str = RoomKind.ROOM,
    target_role: str | None = None,
    new_role: str | None = None,
) -> Decision:
    """Decide one action. `role` is the user's membership role in the room or None;
    `author_id` is the author of the message acted on (edit, delete); `kind` the
    room's kind. For MANAGE_MEMBERS: `target_role` the role the other person has
    now (None: not a member yet) and `new_role` the one they are to have (None:
    removed)."""
    if not (user.is_authenticated and user.is_active):
        return Decision(False, "not signed in")
    acting = effective_role(is_public=is_public, role=role)
    if action is Action.VIEW:
        if kind == RoomKind.DM:
            return ALLOW if role is not None else Decision(False, "a direct message is for its people only")
        if acting is not None or user.is_staff:
            return ALLOW
        return Decision(False, "this room is private to its members")
    if action in (Action.JOIN, Action.LEAVE, Action.MANAGE_MEMBERS):
        return _membership(action, kind=kind, is_public=is_public, role=role, target_role=target_role,
                           new_role=new_role)
    may_post = acting in POSTING_ROLES
    if action is Action.POST:
        return ALLOW if may_post else Decision(False, "your role in this room may not post")
    if action is Action.REACT:
        return ALLOW if may_post else Decision(False, "your role in this room may not react")
    if action is Action.EDIT:
        if author_id != user.pk:
            return Decision(False, "only the author may edit a message")
        return ALLOW if may_post else Decision(False, "your role in this room may not edit")
    if action is Action.DELETE:
        if acting in MODERATING_ROLES or user.is_staff:
            return ALLOW
        if author_id == user.pk and may_post:
            return ALLOW
        return Decision(False, "only the author or a moderator may delete a message")
    raise ValueError(f"unknown action {action!r}")


def _membership(action: Action, *, kind: str, is_public: bool, role: str | None, target_role: str | None,
                new_role: str | None) -> Decision:
    if kind == RoomKind.DM:
        return Decision(False, DM_FIXED)
    if action is Action.JOIN:
        # Already a member: joining again changes nothing (a retry is answered the same).
        if role is not None or is_public:
            return ALLOW
        return Decision(False, "a private room is joined by invitation only")
    if action is Action.LEAVE:
        return ALLOW
    if role not in MODERATING_ROLES:
        return Decision(False, "only the room's owners and moderators manage its members")
    if role != Role.OWNER and (target_role in OWNER_ONLY_ROLES or new_role in OWNER_ONLY_ROLES):
        return Decision(False, "only an owner gives, takes or changes the owner and moderator roles")
    return ALLOW
