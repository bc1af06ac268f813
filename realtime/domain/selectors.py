"""Reads: what a user may see of rooms and messages. Nothing here writes."""

from __future__ import annotations

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db.models import Count, F, OuterRef, Q, Subquery, Value
from django.db.models.functions import Coalesce

from realtime.domain.access import room_access
from realtime.domain.errors import ActionError
from realtime.domain.policy import Action
from realtime.models import Membership, Mention, Message, Reaction, ReadState, Room, RoomKind
from realtime.protocol import ErrorCode


def visible_rooms(*, user, browse: bool = False, slug: str | None = None) -> list[dict]:
    """The rooms a user may see, with their role, the room's head seq, how far the
    user has read it, how many messages by others are unread, and how many of
    those mention the user (one query; the mentions are an index range of theirs,
    models.Mention), and one more for the names in the user's DMs.

    A DM is listed only to its people (staff too: it is nobody else's), with the
    title the asker sees: the other people's names. `browse`: only the public
    rooms the user is not a member of (the ones they could join). `slug`: only
    that room (the answer about a room just made)."""
    roles = dict(Membership.objects.filter(user=user).values_list("room_id", "role"))
    if browse:
        rooms = Room.objects.filter(kind=RoomKind.ROOM, is_public=True).exclude(id__in=roles)
    else:
        others = Q(kind=RoomKind.ROOM) if user.is_staff else Q(kind=RoomKind.ROOM, is_public=True)
        rooms = Room.objects.filter(others | Q(id__in=roles))
    if slug is not None:
        rooms = rooms.filter(slug=slug)
    read = ReadState.objects.filter(room=OuterRef("pk"), user=user).values("seq")[:1]
    mentioned = (Mention.objects.filter(user=user, room=OuterRef("pk"), seq__gt=OuterRef("read"))
                 .values("room").annotate(n=Count("*")).values("n"))
    rooms = rooms.annotate(read=Coalesce(Subquery(read), Value(0))).annotate(
        mentions=Coalesce(Subquery(mentioned), Value(0))).annotate(
        unread=Count(
            "messages",
            filter=Q(messages__seq__gt=F("read"), messages__deleted_at__isnull=True) & ~Q(messages__author=user),
        )
    )
    rooms = list(rooms.order_by("slug"))
    titles = _dm_titles(user, [room.pk for room in rooms if room.kind == RoomKind.DM])
    return [
        {
            "slug": room.slug,
            "title": titles.get(room.pk, room.title),
            "kind": room.kind,
            "topic": room.topic,
            "is_public": room.is_public,
            "role": roles.get(room.id),
            "seq": room.last_seq,
            "read": room.read,
            "unread": room.unread,
            "mentions": room.mentions,
        }
        for room in rooms
    ]


def _dm_titles(user, room_ids: list[int]) -> dict[int, str]:
    """Each DM's title as `user` sees it: the other people's names, sorted."""
    names: dict[int, list[str]] = {pk: [] for pk in room_ids}
    if room_ids:
        for room_id, username in (Membership.objects.filter(room_id__in=room_ids).exclude(user=user)
                                  .order_by("user__username").values_list("room_id", "user__username")):
            names[room_id].append(username)
    return {pk: ", ".join(people) for pk, people in names.items()}


def dm_title(*, user, room: Room) -> str:
    return _dm_titles(user, [room.pk])[room.pk]


def room_members(*, user, slug: str) -> dict:
    """The members of a room the user may see, with their roles (by name)."""
    access = room_access(user=user, slug=slug, action=Action.VIEW)
    rows = (Membership.objects.filter(room=access.room).order_by("user__username")
            .values_list("user__username", "role", "joined_at"))
    return {
        "room": access.room.slug,
        "kind": access.room.kind,
        "members": [{"user": name, "role": role, "joined_at": joined} for name, role, joined in rows],
    }


def read_markers(*, slug: str) -> dict[str, int]:
    """Everyone's read position in a room that shows read markers (username -> seq)."""
    return rooms_read_markers([slug])[slug]


def rooms_read_markers(slugs: list[str]) -> dict[str, dict[str, int]]:
    """read_markers of several rooms in one query."""
    found: dict = {slug: {} for slug in slugs}
    for slug, name, seq in (ReadState.objects.filter(room__slug__in=slugs, room__read_markers=True, seq__gt=0)
                            .values_list("room__slug", "user__username", "seq")):
        found[slug][name] = seq
    return found


def room_messages(*, user, slug: str, before: int | None = None, limit: int = 50) -> dict:
    """A page of the room's messages (newest last) and the head seq it is current to.

    The head is read first: any change after it arrives as an event with a higher
    seq, and applying such an event to a newer snapshot is harmless (events carry
    final values, keyed by message id).
    """
    access = room_access(user=user, slug=slug, action=Action.VIEW)
    room = access.room
    head, epoch = Room.objects.filter(pk=room.pk).values_list("last_seq", "epoch").get()
    limit = max(1, min(limit, settings.REALTIME["HISTORY_PAGE_MAX"]))
    rows = Message.objects.filter(room=room, deleted_at__isnull=True).select_related("author")
    if before is not None:
        rows = rows.filter(seq__lt=before)
    page = list(rows.order_by("-seq")[: limit + 1])
    has_more = len(page) > limit
    page = page[:limit][::-1]
    reactions, mentioned = _reactions_and_mentions([m.id for m in page])
    return {
        "room": room.slug,
        "seq": head,
        "epoch": epoch,
        "has_more": has_more,
        "messages": [
            {
                "id": m.id,
                "seq": m.seq,
                "author": m.author.get_username(),
                "body": m.body,
                "client_id": m.client_id,
                "ts": m.created_at,
                "edited_at": m.edited_at,
                "reactions": reactions.get(m.id, {}),
                "mentions": mentioned.get(m.id, []),
            }
            for m in page
        ],
    }


def _reactions_and_mentions(ids: list[int]) -> tuple[dict[int, dict[str, list[str]]], dict[int, list[str]]]:
    """For a page of messages (two queries): each message's reactions, emoji ->
    who reacted (emoji in the order first used, people in the order they reacted),
    and the usernames it mentions (in the order the body names them)."""
    reactions: dict[int, dict[str, list[str]]] = {}
    mentioned: dict[int, list[str]] = {}
    if not ids:
        return reactions, mentioned
    for message_id, emoji, name in (Reaction.objects.filter(message_id__in=ids).order_by("id")
                                    .values_list("message_id", "emoji", "user__username")):
        reactions.setdefault(message_id, {}).setdefault(emoji, []).append(name)
    for message_id, name in (Mention.objects.filter(message_id__in=ids).order_by("id")
                             .values_list("message_id", "user__username")):
        mentioned.setdefault(message_id, []).append(name)
    return reactions, mentioned


PEOPLE_MAX = 8  # names a people lookup answers with
PEOPLE_PREFIX_MAX = 150  # a username's longest (Django's)


def people_prefix(q: str) -> str:
    """A people lookup's `q`, checked: the start of a username (a leading @ dropped)."""
    prefix = q.strip().lstrip("@")
    if not prefix or len(prefix) > PEOPLE_PREFIX_MAX or not prefix.isprintable():
        raise ActionError(ErrorCode.INVALID, f"q: the start of a username, 1 to {PEOPLE_PREFIX_MAX} characters")
    return prefix


def people(*, user, prefix: str, limit: int = PEOPLE_MAX) -> list[str]:
    """The usernames of active people (not `user`) that start with `prefix`, without
    regard to case, in name order: who a DM or an invitation may name. Usernames
    are no secret between signed-in people (every message carries its author's),
    and this says nothing more about anyone."""
    prefix = people_prefix(prefix)
    User = get_user_model()
    return list(User.objects.filter(**{f"{User.USERNAME_FIELD}__istartswith": prefix}, is_active=True)
                .exclude(pk=user.pk).order_by(User.USERNAME_FIELD).values_list(User.USERNAME_FIELD, flat=True)[:limit])
