"""Seeds a public room with many messages fast, for the history tests: one bulk
INSERT of the messages and their message.new events, with consecutive seqs, and
the room's last_seq to match (what realtime/domain/roomlog.py would have written).

Run inside the app's environment: `manage.py shell -c "..."` calling seed()."""

from __future__ import annotations

import json
from datetime import timedelta

from django.contrib.auth import get_user_model
from django.db import connection, transaction
from django.utils import timezone

from realtime.domain import roomlog
from realtime.models import Event, Message, ReadState, Room


def seed(slug: str, count: int, *, spacing_s: float = 30.0, read: dict[str, int] | None = None) -> None:
    users = list(get_user_model().objects.filter(username__in=["alice", "bob"]).order_by("username"))
    now = timezone.now()
    quote = connection.ops.quote_name
    with transaction.atomic():
        room = Room.objects.create(slug=slug, title=f"{slug.title()} ({count:,} messages)", is_public=True)
        start = (Message.objects.order_by("-id").values_list("id", flat=True).first() or 0) + 1
        messages, events = [], []
        for i in range(count):
            seq, author = i + 1, users[i % 2]
            at = now - timedelta(seconds=spacing_s * (count - i))
            body, client_id = f"message {seq}", f"seed-{slug}-{seq}"
            frame = roomlog.new_message(slug, seq, start + i, author.username, body, client_id, at)
            messages.append((start + i, room.pk, author.pk, body, client_id, seq, at.isoformat(), None, None))
            events.append((room.pk, seq, "message.new", start + i, json.dumps(roomlog.stored_payload(frame)), at.isoformat()))
        # Plain executemany: the ORM's bulk_create takes most of a minute for 100,000 rows.
        table = lambda model: quote(model._meta.db_table)  # noqa: E731
        with connection.cursor() as cursor:
            cursor.executemany(
                f"INSERT INTO {table(Message)} (id, room_id, author_id, body, client_id, seq, created_at, edited_at, deleted_at)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)", messages)
            cursor.executemany(
                f"INSERT INTO {table(Event)} (room_id, seq, type, message_id, payload, created_at)"
                " VALUES (%s, %s, %s, %s, %s, %s)", events)
        Room.objects.filter(pk=room.pk).update(last_seq=count)
        for username, seq in (read or {}).items():
            ReadState.objects.create(room=room, user=get_user_model().objects.get(username=username), seq=seq)
    if connection.vendor == "sqlite":
        with connection.cursor() as cursor:
            cursor.execute("ANALYZE")
