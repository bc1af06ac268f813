"""Reads: what a user may see of rooms and messages. Nothing here writes."""

from __future__ import annotations

from django.conf import settings
from django.db.models import Count, F, OuterRef, Q, Subquery, Value
from django.db.models.functions import Coalesce

from realtime.domain.access import room_access
from realtime.domain.policy import Action
from realtime.models import Membership, Message, ReadState, Room


def visible_rooms(*, user) -> list[dict]:
    """The rooms a user may see, with their role, the room's head seq, how far the
    user has read it, and how many messages by others are unread (one query)."""
    roles = dict(Membership.objects.filter(user=user).values_list("room_id", "role"))
    rooms = Room.objects.all() if user.is_staff else Room.objects.filter(Q(is_public=True) | Q(id__in=roles))
    read = ReadState.objects.filter(room=OuterRef("pk"), user=user).values("seq")[:1]
    rooms = rooms.annotate(read=Coalesce(Subquery(read), Value(0))).annotate(
        unread=Count(
            "messages",
            filter=Q(messages__seq__gt=F("read"), messages__deleted_at__isnull=True) & ~Q(messages__author=user),
        )
    )
    return [
        {
            "slug": room.slug,
            "title": room.title,
            "is_public": room.is_public,
            "role": roles.get(room.id),
            "seq": room.last_seq,
            "read": room.read,
            "unread": room.unread,
        }
        for room in rooms.order_by("slug")
    ]


def read_markers(*, slug: str) -> dict[str, int]:
    """Everyone's read position in a room that shows read markers (username -> seq)."""
    return dict(
        ReadState.objects.filter(room__slug=slug, room__read_markers=True, seq__gt=0)
        .values_list("user__username", "seq")
    )


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
            }
            for m in page
        ],
    }
