"""The one policy: may USER do ACTION in ROOM, given their role there.

Pure predicates over already-loaded values (no queries), so the socket, the REST
API and the admin ask the same question the same way, and tests need no database.

Roles: owner > moderator > member > reader. In a public room a signed-in user with
no membership acts as a member (may read and post); an explicit `reader` membership
takes posting away. Private rooms exist for their members only. Staff may read and
moderate (delete in) every room, but post only where their role allows it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from realtime.models import Role

POSTING_ROLES = frozenset({Role.OWNER, Role.MODERATOR, Role.MEMBER})
MODERATING_ROLES = frozenset({Role.OWNER, Role.MODERATOR})


class Action(enum.StrEnum):
    VIEW = "view"  # subscribe, replay, history
    POST = "post"  # message.send
    EDIT = "edit"  # message.edit (own messages)
    DELETE = "delete"  # message.delete


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
) -> Decision:
    """Decide one action. `role` is the user's membership role in the room or None;
    `author_id` is the author of the message acted on (edit, delete)."""
    if not (user.is_authenticated and user.is_active):
        return Decision(False, "not signed in")
    acting = effective_role(is_public=is_public, role=role)
    if action is Action.VIEW:
        if acting is not None or user.is_staff:
            return ALLOW
        return Decision(False, "this room is private to its members")
    may_post = acting in POSTING_ROLES
    if action is Action.POST:
        return ALLOW if may_post else Decision(False, "your role in this room may not post")
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
