"""What each client action does: the rules, the writes, the events to broadcast.

The socket, the REST API and the admin call these same functions, so a rule is
written once. Each write runs in its own transaction in a worker thread and returns
the events it appended; the async entry points publish them after the commit
(`perform`), the sync ones through `broadcast.publish_on_commit` (`perform_sync`).
Nothing here imports consumers or the API.
"""

from __future__ import annotations

import unicodedata
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import msgspec

from channels.db import database_sync_to_async
from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.db.models import Count, F, OuterRef, Q, Subquery, Value
from django.db.models.functions import Coalesce
from django.utils import timezone

from realtime import protocol
from realtime.delivery import publish as broadcast
from realtime.models import Event, Membership, Message, ReadState, Room
from realtime.domain.policy import Action, can
from realtime.protocol import ErrorCode


class ActionError(Exception):
    """A refused or failed action; the socket and REST both translate it."""

    def __init__(self, code: ErrorCode, message: str, *, retry_after: float | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class RoomAccess:
    room: Room
    role: str | None


@dataclass(frozen=True, slots=True)
class MessageResult:
    room: str
    id: int
    seq: int


@dataclass(frozen=True, slots=True)
class Replay:
    room: str
    head: int
    events: list[protocol.RoomEvent]
    access: RoomAccess | None = None
    held_back: bool = False  # head_only: there were events after since, not read


def limits() -> dict[str, int]:
    return settings.REALTIME


# ---------------------------------------------------------------------------
# Running actions: transaction in a thread, publish after commit
# ---------------------------------------------------------------------------
async def perform(fn: Callable[..., tuple[Any, list[protocol.RoomEvent]]], **kwargs) -> Any:
    """Run a write in a worker thread (its own transaction), then publish its events."""
    result, events = await database_sync_to_async(fn)(**kwargs)
    await broadcast.publish(events)
    return result


def perform_sync(fn: Callable[..., tuple[Any, list[protocol.RoomEvent]]], **kwargs) -> Any:
    """Run a write from sync code; publish its events when the transaction commits."""
    result, events = fn(**kwargs)
    broadcast.publish_on_commit(events)
    return result


# ---------------------------------------------------------------------------
# Access
# ---------------------------------------------------------------------------
NO_SUCH_ROOM = "no such room"


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


def check(user, access: RoomAccess, action: Action) -> None:
    """Check `action` against an access already loaded; raise if refused.

    A room the user may not see does not exist for them: the refusal is the one a
    room that does not exist gets (not_found, "no such room"), so that a private
    room's name cannot be confirmed by asking. Only in a room they can see is a
    refused action `forbidden`."""
    if not can(user, Action.VIEW, is_public=access.room.is_public, role=access.role):
        raise ActionError(ErrorCode.NOT_FOUND, NO_SUCH_ROOM)
    if action is not Action.VIEW:
        decision = can(user, action, is_public=access.room.is_public, role=access.role)
        if not decision:
            raise ActionError(ErrorCode.FORBIDDEN, decision.reason)


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


@dataclass(frozen=True, slots=True)
class ReadResult:
    room: str
    seq: int  # what is stored now
    moved: bool  # whether this call moved it forward
    markers: bool  # whether the room shows read markers to its members


def mark_read(*, user, slug: str, seq: int) -> ReadResult:
    """Move the user's read position forward to `seq` (clamped to the room's head;
    never backwards). Anyone who may see the room may mark it read."""
    access = room_access(user=user, slug=slug, action=Action.VIEW)
    room = access.room
    target = min(seq, Room.objects.filter(pk=room.pk).values_list("last_seq", flat=True).get())
    with transaction.atomic():
        state, _ = ReadState.objects.get_or_create(room=room, user=user)
        # A conditional UPDATE: two tabs marking at once can only move it forward.
        moved = ReadState.objects.filter(pk=state.pk, seq__lt=target).update(seq=target) == 1
    stored = ReadState.objects.filter(pk=state.pk).values_list("seq", flat=True).get()
    return ReadResult(room=room.slug, seq=stored, moved=moved, markers=room.read_markers)


def read_markers(*, slug: str) -> dict[str, int]:
    """Everyone's read position in a room that shows read markers (username -> seq)."""
    return dict(
        ReadState.objects.filter(room__slug=slug, room__read_markers=True, seq__gt=0)
        .values_list("user__username", "seq")
    )


# ---------------------------------------------------------------------------
# The log
# ---------------------------------------------------------------------------
def _next_seq(room_id: int) -> int:
    """Take the room's next seq. The UPDATE locks the room's row until commit, so
    concurrent writers queue and seqs commit in order, with no gap."""
    with connection.cursor() as cursor:
        # One round trip (PostgreSQL and SQLite 3.35+ both have RETURNING).
        cursor.execute(f"UPDATE {ROOM_TABLE} SET last_seq = last_seq + 1 WHERE id = %s RETURNING last_seq", [room_id])
        row = cursor.fetchone()
    if row is None:  # deleted since its access was read
        raise ActionError(ErrorCode.NOT_FOUND, NO_SUCH_ROOM)
    return row[0]


ROOM_TABLE = Room._meta.db_table


POST_SQL = f"""
WITH taken AS (
    UPDATE {Room._meta.db_table} SET last_seq = last_seq + 1 WHERE id = %(room)s RETURNING last_seq
), posted AS (
    INSERT INTO {Message._meta.db_table} (room_id, author_id, body, client_id, seq, created_at)
    SELECT %(room)s, %(author)s, %(body)s, %(client_id)s, taken.last_seq, %(now)s FROM taken
    RETURNING id, seq
)
INSERT INTO {Event._meta.db_table} (room_id, seq, type, message_id, payload, created_at)
SELECT %(room)s, posted.seq, 'message.new', posted.id, %(payload)s || jsonb_build_object('id', posted.id), %(now)s
FROM posted
RETURNING message_id, seq
"""


def _append(room: Room, event: protocol.RoomEvent, message: Message | int | None = None) -> protocol.RoomEvent:
    data = protocol.event_to_dict(event)
    for key in ("type", "room", "seq"):
        del data[key]
    _insert(Event, room=room.pk, seq=event.seq, type=event.__struct_config__.tag, payload=data,
            message=getattr(message, "pk", message), created_at=timezone.now())
    return event


def _insert(model, returning: str | None = None, **values):
    """INSERT one row, each value prepared by its model field for this database (the
    same SQL the ORM writes, without building a model instance: this is the path
    every posted message takes, twice). Returns the `returning` column's value."""
    meta = model._meta
    quote = connection.ops.quote_name
    fields = [meta.get_field(name) for name in values]
    sql = (f"INSERT INTO {quote(meta.db_table)} ({', '.join(quote(f.column) for f in fields)}) "
           f"VALUES ({', '.join(['%s'] * len(fields))})")
    if returning:
        sql += f" RETURNING {quote(meta.get_field(returning).column)}"
    params = [field.get_db_prep_save(value, connection) for field, value in zip(fields, values.values())]
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchone()[0] if returning else None


def room_heads(*, slugs: list[str]) -> dict[str, int]:
    """The head seq of each named room (one query)."""
    return dict(Room.objects.filter(slug__in=slugs).values_list("slug", "last_seq"))


def _event_frame(room_slug: str, event: Event) -> protocol.RoomEvent:
    return protocol.event_from_dict({"type": event.type, "room": room_slug, "seq": event.seq, **event.payload})


def room_replay(*, user, slug: str, since: int | None, limit: int | None = None, head_only: bool = False) -> Replay:
    """The room's events after `since`, checked against the replay window.

    With since=None nothing is replayed and the head is returned: the caller
    goes live from there. A `since` ahead of the head, or further back than the
    window (REPLAY_MAX events, or pruned from the log), raises recovery_failed.
    With `limit`, at most that many events are returned (REST paging) and a longer
    backlog is not an error. With `head_only` (the user's replay budget is in
    debt) no event is read: `held_back` says whether there were any to read.
    """
    access = room_access(user=user, slug=slug, action=Action.VIEW)
    return dataclasses.replace(_replay(access.room, since, limit, head_only), access=access)


def _replay(room: Room, since: int | None, limit: int | None, head_only: bool = False) -> Replay:
    head = Room.objects.filter(pk=room.pk).values_list("last_seq", flat=True).get()
    if since is None or since == head:
        return Replay(room=room.slug, head=head, events=[])
    if head_only and since < head:
        return Replay(room=room.slug, head=head, events=[], held_back=True)
    if since > head:
        raise ActionError(ErrorCode.RECOVERY_FAILED, f"since={since} is ahead of the room's log (head {head})")
    window = limits()["REPLAY_MAX"]
    if limit is None and head - since > window:
        raise ActionError(
            ErrorCode.RECOVERY_FAILED, f"{head - since} events missed, more than the replay window of {window}"
        )
    take = min(limit or window, window)
    rows = list(Event.objects.filter(room=room, seq__gt=since).order_by("seq")[:take])
    if not rows or rows[0].seq != since + 1:
        raise ActionError(ErrorCode.RECOVERY_FAILED, f"events after seq {since} are no longer kept")
    return Replay(room=room.slug, head=max(head, rows[-1].seq), events=[_event_frame(room.slug, e) for e in rows])


def room_events_between(*, slug: str, after: int, upto: int) -> list[protocol.RoomEvent]:
    """Events after..upto of a room the caller is already subscribed to (gap repair)."""
    room = Room.objects.filter(slug=slug).first()
    if room is None:
        raise ActionError(ErrorCode.NOT_FOUND, NO_SUCH_ROOM)
    if upto - after > limits()["REPLAY_MAX"]:
        raise ActionError(ErrorCode.RECOVERY_FAILED, "too many events missed")
    rows = Event.objects.filter(room=room, seq__gt=after, seq__lte=upto).order_by("seq")
    events = [_event_frame(slug, e) for e in rows]
    if len(events) != upto - after:
        raise ActionError(ErrorCode.RECOVERY_FAILED, f"events after seq {after} are no longer kept")
    return events


def room_messages(*, user, slug: str, before: int | None = None, limit: int = 50) -> dict:
    """A page of the room's messages (newest last) and the head seq it is current to.

    The head is read first: any change after it arrives as an event with a higher
    seq, and applying such an event to a newer snapshot is harmless (events carry
    final values, keyed by message id).
    """
    access = room_access(user=user, slug=slug, action=Action.VIEW)
    room = access.room
    head = Room.objects.filter(pk=room.pk).values_list("last_seq", flat=True).get()
    limit = max(1, min(limit, limits()["HISTORY_PAGE_MAX"]))
    rows = Message.objects.filter(room=room, deleted_at__isnull=True).select_related("author")
    if before is not None:
        rows = rows.filter(seq__lt=before)
    page = list(rows.order_by("-seq")[: limit + 1])
    has_more = len(page) > limit
    page = page[:limit][::-1]
    return {
        "room": room.slug,
        "seq": head,
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


# ---------------------------------------------------------------------------
# Messages
# ---------------------------------------------------------------------------
_ALLOWED_CONTROL = {"\n", "\t"}


def clean_body(body: str) -> str:
    """Check a message body: not blank, within the length limit, no control characters."""
    if not isinstance(body, str) or not body.strip():
        raise ActionError(ErrorCode.INVALID, "the message body is empty")
    maximum = limits()["MAX_BODY_LENGTH"]
    if len(body) > maximum:
        raise ActionError(ErrorCode.TOO_LARGE, f"the message body is longer than {maximum} characters")
    for ch in body:
        if ch not in _ALLOWED_CONTROL and unicodedata.category(ch) in ("Cc", "Cs"):
            raise ActionError(ErrorCode.INVALID, "the message body contains control characters")
    return body


def message_send(*, user, slug: str, body: str, client_id: str, access: RoomAccess | None = None) -> tuple[MessageResult, list]:
    """Post a message. A repeat of (user, client_id) returns the original result and
    writes nothing; the same client_id in another room is a conflict.

    `access`: the room and role as the caller holds them (a socket's subscription,
    renewed whenever the room's memberships or visibility change); loaded if None."""
    body = clean_body(body)
    if access is None:
        access = room_access(user=user, slug=slug, action=Action.VIEW)
    else:
        check(user, access, Action.VIEW)
    room = access.room
    try:
        check(user, access, Action.POST)
    except ActionError:
        # A repeat is answered before the policy: the message exists whatever has
        # changed since, and the client only needs its ack.
        original = _original(user, client_id, room)
        if original is None:
            raise
        return original, _republish(room, original)
    # A first send (the usual case) is written straight away; a repeat of its
    # client_id fails the unique constraint and is answered with the original.
    now = timezone.now()
    try:
        if connection.vendor == "postgresql" and not connection.in_atomic_block:
            message_id, seq = _post_in_one_statement(room.pk, user.pk, body, client_id, now, user.get_username())
        else:
            with transaction.atomic():
                seq = _next_seq(room.pk)
                message_id = _insert(Message, returning="id", room=room.pk, author=user.pk, body=body,
                                     client_id=client_id, seq=seq, created_at=now)
                _append(room, message=message_id, event=_message_new(room.slug, seq, message_id, user.get_username(),
                                                                     body, client_id, now))
    except IntegrityError:
        # A repeat (a retry after a lost ack, or a concurrent one that won the race).
        original = _original(user, client_id, room)
        if original is None:
            raise
        return original, _republish(room, original)
    event = _message_new(room.slug, seq, message_id, user.get_username(), body, client_id, now)
    return MessageResult(room=room.slug, id=message_id, seq=seq), [event]


def message_send_many(*, user, sends: list[dict]) -> list[tuple[MessageResult | Exception, list]]:
    """message_send for each of `sends` (its keyword arguments), in order, in one
    call: a socket's queued sends take one trip to the database thread instead of
    one each. Each has its own checks, seq and outcome: an ActionError (or any
    other failure) is returned in that send's place and the others go on. On
    PostgreSQL, consecutive first sends to one room are written by one statement
    (_post_run); whatever that cannot settle (a refusal, a repeat) takes
    message_send's own path."""
    outcomes: list[tuple[MessageResult | Exception, list] | None] = [None] * len(sends)
    in_one_statement = connection.vendor == "postgresql" and not connection.in_atomic_block
    start = 0
    while start < len(sends):
        end = start + 1
        while end < len(sends) and sends[end]["slug"] == sends[start]["slug"]:
            end += 1
        if in_one_statement and end - start > 1:
            _post_run(user, sends, start, end, outcomes)
        # Before the next run: seqs follow the order the sends came in.
        for i in range(start, end):
            if outcomes[i] is None:
                try:
                    outcomes[i] = message_send(user=user, **sends[i])
                except Exception as exc:
                    outcomes[i] = (exc, [])
        start = end
    return outcomes  # type: ignore[return-value]


POST_RUN_SQL = f"""
WITH taken AS (
    UPDATE {Room._meta.db_table} SET last_seq = last_seq + %(n)s WHERE id = %(room)s
    RETURNING last_seq - %(n)s AS base
), input AS (
    SELECT * FROM unnest(%(bodies)s::text[], %(client_ids)s::text[], %(payloads)s::text[])
        WITH ORDINALITY AS t(body, client_id, payload, i)
), posted AS (
    INSERT INTO {Message._meta.db_table} (room_id, author_id, body, client_id, seq, created_at)
    SELECT %(room)s, %(author)s, input.body, input.client_id, taken.base + input.i, %(now)s
    FROM taken CROSS JOIN input ORDER BY input.i
    RETURNING id, seq
)
INSERT INTO {Event._meta.db_table} (room_id, seq, type, message_id, payload, created_at)
SELECT %(room)s, posted.seq, 'message.new', posted.id, input.payload::jsonb || jsonb_build_object('id', posted.id),
       %(now)s
FROM posted CROSS JOIN taken JOIN input ON posted.seq = taken.base + input.i
RETURNING message_id, seq
"""


def _post_run(user, sends: list[dict], start: int, end: int, outcomes: list) -> None:
    """PostgreSQL: post sends[start:end] (one room) in one statement, as
    _post_in_one_statement does for one: the room row's lock hands out n
    consecutive seqs, in the sends' order. Fills `outcomes` for the sends it
    wrote; leaves the rest (and all of them, when a repeat fails the statement's
    unique constraint) to message_send."""
    first = sends[start]
    try:
        access = first.get("access") or room_access(user=user, slug=first["slug"], action=Action.VIEW)
        check(user, access, Action.VIEW)
        check(user, access, Action.POST)
    except ActionError:
        return  # each send is refused (or found to be a repeat) on its own
    room = access.room
    author = user.get_username()
    now = timezone.now()
    run: list[tuple[int, str, str]] = []
    for i in range(start, end):
        try:
            run.append((i, clean_body(sends[i]["body"]), sends[i]["client_id"]))
        except ActionError:
            continue  # refused on its own
    if len(run) < 2:
        return
    payloads = []
    for _, body, client_id in run:
        payloads.append(msgspec.json.encode(_new_payload(author, body, client_id, now)).decode())
    try:
        with connection.cursor() as cursor:
            cursor.execute(POST_RUN_SQL, {
                "n": len(run), "room": room.pk, "author": user.pk,
                "bodies": [body for _, body, _ in run], "client_ids": [client_id for _, _, client_id in run],
                "payloads": payloads, "now": Message._meta.get_field("created_at").get_db_prep_save(now, connection),
            })
            rows = cursor.fetchall()
    except IntegrityError:
        return  # a repeat among them: nothing was written; one by one finds it
    if len(rows) != len(run):
        return  # the room is gone: nothing was written
    for (i, body, client_id), (message_id, seq) in zip(run, sorted(rows, key=lambda row: row[1])):
        outcomes[i] = (MessageResult(room=room.slug, id=message_id, seq=seq),
                       [_message_new(room.slug, seq, message_id, author, body, client_id, now)])


def _message_new(slug: str, seq: int, message_id: int, author: str, body: str, client_id: str, now) -> protocol.MessageNew:
    return protocol.MessageNew(room=slug, seq=seq, id=message_id, author=author, body=body, client_id=client_id, ts=now)


def _new_payload(author: str, body: str, client_id: str, now) -> dict:
    """A message.new event's stored payload: what the row does not hold in columns
    of its own (type, room, seq) and the id, which the statement adds."""
    payload = protocol.event_to_dict(_message_new("", 0, 0, author, body, client_id, now))
    for key in ("type", "room", "seq", "id"):
        del payload[key]
    return payload


def _post_in_one_statement(room_id: int, author_id: int, body: str, client_id: str, now, author: str) -> tuple[int, int]:
    """PostgreSQL: take the seq, insert the message and append its event in one
    statement, committed on its own (autocommit): one round trip where the
    portable path takes five (BEGIN, UPDATE, INSERT, INSERT, COMMIT), the larger
    part of a message's time in the database. The same rows and the same
    guarantees: the UPDATE locks the room's row until the statement commits, so
    seqs commit in order with no gap; a repeated client_id fails the unique
    constraint and nothing of the statement stays."""
    payload = _new_payload(author, body, client_id, now)
    with connection.cursor() as cursor:
        cursor.execute(POST_SQL, {
            "room": room_id, "author": author_id, "body": body, "client_id": client_id,
            "now": Message._meta.get_field("created_at").get_db_prep_save(now, connection),
            "payload": Event._meta.get_field("payload").get_db_prep_save(payload, connection),
        })
        row = cursor.fetchone()
    if row is None:  # deleted since its access was read
        raise ActionError(ErrorCode.NOT_FOUND, NO_SUCH_ROOM)
    return row[0], row[1]


def _republish(room: Room, original: MessageResult) -> list[protocol.RoomEvent]:
    """The original message.new again: a client retries when it saw no ack, which
    may mean the first broadcast never left (a crash between commit and publish).
    Subscribers that have it drop it by seq."""
    event = Event.objects.filter(room=room, seq=original.seq).first()
    return [_event_frame(room.slug, event)] if event is not None else []


def _original(user, client_id: str, room: Room) -> MessageResult | None:
    found = Message.objects.filter(author=user, client_id=client_id).values_list("id", "seq", "room_id").first()
    if found is None:
        return None
    message_id, seq, room_id = found
    if room_id != room.pk:
        raise ActionError(ErrorCode.CONFLICT, "this client_id was already used for a message in another room")
    return MessageResult(room=room.slug, id=message_id, seq=seq)


def _locked_message(room: Room, message_id: int) -> Message:
    message = Message.objects.select_for_update().filter(pk=message_id, room=room, deleted_at__isnull=True).first()
    if message is None:
        raise ActionError(ErrorCode.NOT_FOUND, "no such message in this room")
    return message


def message_edit(*, user, slug: str, message_id: int, body: str) -> tuple[MessageResult, list]:
    """Replace the body of one's own message; the event carries only what changed."""
    body = clean_body(body)
    access = room_access(user=user, slug=slug, action=Action.VIEW)
    room = access.room
    with transaction.atomic():
        # Check first, under the message's lock, so a refusal takes no seq.
        message = _locked_message(room, message_id)
        decision = can(user, Action.EDIT, is_public=room.is_public, role=access.role, author_id=message.author_id)
        if not decision:
            raise ActionError(ErrorCode.FORBIDDEN, decision.reason)
        seq = _next_seq(room.pk)
        message.body = body
        message.edited_at = timezone.now()
        message.save(update_fields=["body", "edited_at"])
        event = _append(
            room,
            protocol.MessageEdited(room=room.slug, seq=seq, id=message.pk, body=body, edited_at=message.edited_at),
            message,
        )
    return MessageResult(room=room.slug, id=message.pk, seq=seq), [event]


def message_delete(*, user, slug: str, message_id: int) -> tuple[MessageResult, list]:
    """Delete a message: its author (while allowed to post), a moderator or owner, or staff."""
    access = room_access(user=user, slug=slug, action=Action.VIEW)
    room = access.room
    with transaction.atomic():
        message = _locked_message(room, message_id)
        decision = can(user, Action.DELETE, is_public=room.is_public, role=access.role, author_id=message.author_id)
        if not decision:
            raise ActionError(ErrorCode.FORBIDDEN, decision.reason)
        seq = _next_seq(room.pk)
        message.body = ""
        message.deleted_at = timezone.now()
        message.save(update_fields=["body", "deleted_at"])
        # The text goes from the log too: a replay must not bring it back.
        for earlier in Event.objects.filter(message=message).exclude(payload__body=""):
            if "body" in earlier.payload:
                earlier.payload = {**earlier.payload, "body": ""}
                earlier.save(update_fields=["payload"])
        event = _append(room, protocol.MessageDeleted(room=room.slug, seq=seq, id=message.pk), message)
    return MessageResult(room=room.slug, id=message.pk, seq=seq), [event]
