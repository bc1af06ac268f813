"""The room's log: the ordered events every delivery guarantee rests on.

Every room event (a message posted, edited or deleted) is appended here with the
room's next seq, inside the transaction that makes the change, and only then
published (domain/services.py). Seqs are gap-free per room: the next one is taken
by an UPDATE of the room's row, which locks it until commit, so concurrent writers
queue and their seqs commit in order (an auto-increment could commit out of order
and make a resume skip an event).

Each room's log has an epoch beside its seqs (Room.epoch): a client resumes with
both, and a log that was started again (`reset_epoch` below, after a database is
restored from a backup; a room deleted and made anew) answers recovery_failed
instead of replaying another history from the same seq.

Reading it back: `room_replay` (a subscribe's `since`, REST event pages, the long
poll) and `room_events_between` (gap repair of a live stream), each bounded by the
replay window, and answering `recovery_failed` when what was asked for is no longer
kept. An event's stored payload is what its frame holds beyond the columns of its
row (type, room, seq), built one way (`stored_payload`) for every event.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

import msgspec
from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import connection, transaction
from django.utils import timezone

from realtime import protocol
from realtime.domain import loopdb, mentions
from realtime.domain.access import RoomAccess, room_access, room_accesses
from realtime.domain.errors import NO_SUCH_ROOM, ActionError
from realtime.domain.policy import Action
from realtime.models import Event, Membership, Mention, Message, Room
from realtime.protocol import ErrorCode

ROOM_TABLE = Room._meta.db_table


@dataclass(frozen=True, slots=True)
class Replay:
    room: str
    head: int
    epoch: str
    events: list[protocol.RoomEvent]
    access: RoomAccess | None = None
    held_back: bool = False  # head_only: there were events after since, not read
    # With defer: the events are still to read, (room id, epoch, since, head): read_range
    # reads them, and identical concurrent reads can be one (ws/replays.py).
    pending: tuple[int, str, int, int] | None = None


# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------
def next_seq(room_id: int) -> int:
    """Take the room's next seq (module doc: the row's lock orders the writers)."""
    with connection.cursor() as cursor:
        # One round trip (PostgreSQL and SQLite 3.35+ both have RETURNING).
        cursor.execute(f"UPDATE {ROOM_TABLE} SET last_seq = last_seq + 1 WHERE id = %s RETURNING last_seq", [room_id])
        row = cursor.fetchone()
    if row is None:  # deleted since its access was read
        raise ActionError(ErrorCode.NOT_FOUND, NO_SUCH_ROOM)
    return row[0]


def stored_payload(event: protocol.RoomEvent, *, without: tuple[str, ...] = ()) -> dict:
    """What an event's row keeps in `payload`: its frame without the columns the row
    has (type, room, seq), and without `without` (a field the writer adds itself)."""
    payload = protocol.event_to_dict(event)
    for key in ("type", "room", "seq", *without):
        payload.pop(key, None)
    return payload


def append(room: Room, event: protocol.RoomEvent, message: Message | int | None = None) -> protocol.RoomEvent:
    """Add `event` (already given its seq) to the room's log."""
    insert(Event, room=room.pk, seq=event.seq, type=event.__struct_config__.tag, payload=stored_payload(event),
           message=getattr(message, "pk", message), created_at=timezone.now())
    return event


def insert(model, returning: str | None = None, **values):
    """INSERT one row, each value prepared by its model field for this database (the
    same SQL the ORM writes, without building a model instance: the path every
    posted message takes, twice, on SQLite). Returns the `returning` column's value."""
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


def new_message(slug: str, seq: int, message_id: int, author: str, body: str, client_id: str, now,
                mentions: list[str] = ()) -> protocol.MessageNew:
    return protocol.MessageNew(room=slug, seq=seq, id=message_id, author=author, body=body, client_id=client_id, ts=now,
                               mentions=list(mentions))


class Written(NamedTuple):
    message_id: int
    seq: int
    mentions: list[str]  # the usernames the message names (domain/mentions.py)


USER = get_user_model()
USERNAME_COLUMN = USER._meta.get_field(USER.USERNAME_FIELD).column

# PostgreSQL: n messages to one room in one statement. The room row's UPDATE takes
# n consecutive seqs under its lock; each message's row and its message.new event
# are inserted in input order; the event's payload gets the new row's id. When a
# message has @names, MENTIONS_CTE resolves them (domain/mentions.py: an active
# user other than the author who may see the room, the policy's answer for them
# read from %(may_view)s), adds their Mention rows and their usernames to the
# event's payload, all in the same statement.
POST_SQL = f"""
WITH taken AS (
    UPDATE {ROOM_TABLE} SET last_seq = last_seq + %(n)s WHERE id = %(room)s
    RETURNING last_seq - %(n)s AS base
), input AS (
    SELECT * FROM unnest(%(bodies)s::text[], %(client_ids)s::text[], %(payloads)s::text[])
        WITH ORDINALITY AS t(body, client_id, payload, i)
), posted AS (
    INSERT INTO {Message._meta.db_table} (room_id, author_id, body, client_id, seq, created_at)
    SELECT %(room)s, %(author)s, input.body, input.client_id, taken.base + input.i, %(now)s
    FROM taken CROSS JOIN input ORDER BY input.i
    RETURNING id, seq
){{mentions}}
INSERT INTO {Event._meta.db_table} (room_id, seq, type, message_id, payload, created_at)
SELECT %(room)s, posted.seq, 'message.new', posted.id,
       input.payload::jsonb || jsonb_build_object('id', posted.id){{named}}, %(now)s
FROM posted CROSS JOIN taken JOIN input ON posted.seq = taken.base + input.i
RETURNING message_id, seq{{returning}}
"""
MENTIONS_CTE = f""", named AS (
    SELECT m.i, m.k, u.id AS user_id, u.{USERNAME_COLUMN} AS username
    FROM unnest(%(mention_i)s::bigint[], %(mention_name)s::text[]) WITH ORDINALITY AS m(i, name, k)
    JOIN {USER._meta.db_table} u ON UPPER(u.{USERNAME_COLUMN}::text) = UPPER(m.name)
    LEFT JOIN {Membership._meta.db_table} ms ON ms.room_id = %(room)s AND ms.user_id = u.id
    WHERE u.is_active AND u.id <> %(author)s
      AND COALESCE(ms.role, '') || ':' || CASE WHEN u.is_staff THEN 't' ELSE 'f' END = ANY(%(may_view)s)
), mentioned AS (
    INSERT INTO {Mention._meta.db_table} (message_id, user_id, room_id, seq)
    SELECT posted.id, named.user_id, %(room)s, posted.seq
    FROM named CROSS JOIN taken JOIN posted ON posted.seq = taken.base + named.i
    ORDER BY named.k, named.username
)"""
NAMED_PAYLOAD = """ || COALESCE((SELECT jsonb_build_object('mentions', jsonb_agg(named.username ORDER BY named.k, named.username))
                  FROM named WHERE named.i = input.i HAVING count(*) > 0), '{}'::jsonb)"""
POST_PLAIN = POST_SQL.format(mentions="", named="", returning="")
POST_MENTIONING = POST_SQL.format(mentions=MENTIONS_CTE, named=NAMED_PAYLOAD, returning=", payload -> 'mentions'")


def write_messages(room: Room, author, items: list[tuple[str, str]], now) -> list[Written]:
    """Post `items` ((body, client_id), already checked) to one room, in order: for
    each its seq, its row, its message.new event, and the users its @names mention
    (domain/mentions.py) with a Mention row each. Returns what was written, in order.

    PostgreSQL: one statement, committed on its own (autocommit), names resolved
    inside it: one round trip where the portable path takes 2 + 3n (BEGIN, UPDATE,
    INSERT, INSERT each, COMMIT) and a query for the names, the larger part of a
    message's time in the database. Elsewhere (or inside a caller's transaction):
    one transaction. Either way all or nothing: a repeated client_id fails the
    unique constraint (IntegrityError) and nothing is written; a room deleted
    meanwhile is not_found."""
    if connection.vendor == "postgresql" and not connection.in_atomic_block:
        sql, params = _post_statement(room, author, items, now)
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            return _posted(cursor.fetchall(), items, sql)
    name = author.get_username()
    written = []
    with transaction.atomic():
        resolved = mentions.resolve(room, author, [body for body, _ in items])
        for (body, client_id), mentioned in zip(items, resolved):
            seq = next_seq(room.pk)
            message_id = insert(Message, returning="id", room=room.pk, author=author.pk, body=body,
                                client_id=client_id, seq=seq, created_at=now)
            names = [username for _, username in mentioned]
            append(room, new_message(room.slug, seq, message_id, name, body, client_id, now, names),
                   message=message_id)
            for user_id, _ in mentioned:
                insert(Mention, message=message_id, user=user_id, room=room.pk, seq=seq)
            written.append(Written(message_id, seq, names))
    return written


async def write_messages_async(room: Room, author, items: list[tuple[str, str]], now) -> list[Written]:
    """write_messages's PostgreSQL statement, sent from the event loop on the
    worker's own connection (domain/loopdb.py) instead of from the database
    thread; the same rows, the same answers (the database's own errors are
    psycopg's, not Django's)."""
    sql, params = _post_statement(room, author, items, now)
    return _posted(await loopdb.fetchall(sql, params), items, sql)


def _post_statement(room: Room, author, items: list[tuple[str, str]], now) -> tuple[str, dict]:
    """POST_SQL for `items`, and its parameters."""
    name = author.get_username()
    payloads = [msgspec.json.encode(stored_payload(new_message("", 0, 0, name, body, client_id, now),
                                                   without=("id",))).decode()
                for body, client_id in items]
    params = {
        "n": len(items), "room": room.pk, "author": author.pk,
        "bodies": [body for body, _ in items], "client_ids": [client_id for _, client_id in items],
        "payloads": payloads, "now": now,
    }
    wanted = [(i, found) for i, (body, _) in enumerate(items, 1) for found in mentions.names_in(body)]
    if not wanted:
        return POST_PLAIN, params
    params["mention_i"], params["mention_name"] = [i for i, _ in wanted], [found for _, found in wanted]
    params["may_view"] = list(mentions.may_view(is_public=room.is_public, kind=room.kind))
    return POST_MENTIONING, params


def _posted(rows: list[tuple], items: list[tuple[str, str]], sql: str) -> list[Written]:
    """What POST_SQL returned, as write_messages answers it."""
    if len(rows) != len(items):
        raise ActionError(ErrorCode.NOT_FOUND, NO_SUCH_ROOM)
    # Django reads jsonb as text (its JSONField decodes it), and so does loopdb: so do we.
    named = sql is POST_MENTIONING
    return sorted((Written(row[0], row[1], msgspec.json.decode(row[2]) if named and row[2] else [])
                   for row in rows), key=lambda written: written.seq)


# ---------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------
def event_frame(room_slug: str, event: Event) -> protocol.RoomEvent:
    """A stored event as the frame every client gets."""
    return protocol.event_from_dict({"type": event.type, "room": room_slug, "seq": event.seq, **event.payload})


def room_heads(*, slugs: list[str]) -> dict[str, int]:
    """The head seq of each named room (one query)."""
    return dict(Room.objects.filter(slug__in=slugs).values_list("slug", "last_seq"))


def room_replay(*, user, slug: str, since: int | None, limit: int | None = None, head_only: bool = False,
                epoch: str | None = None, defer: bool = False) -> Replay:
    """The room's events after `since`, checked against the replay window.

    With since=None nothing is replayed and the head is returned: the caller
    goes live from there. A `since` ahead of the head, or further back than the
    window (REPLAY_MAX events, or pruned from the log), raises recovery_failed.
    With `limit`, at most that many events are returned (REST paging) and a longer
    backlog is not an error. With `head_only` (the user's replay budget is in
    debt) no event is read: `held_back` says whether there were any to read.
    With `epoch` (the one `since` belongs to), a log of another epoch raises
    recovery_failed: `since` counts in a history that is gone. With `defer` (and no
    `limit`), the checks are made but the events are not read: `pending` names the
    range for read_range (up to the head read here: what a subscriber that joined
    the stream first must be sent from the log).
    """
    access = room_access(user=user, slug=slug, action=Action.VIEW)
    return dataclasses.replace(_replay(access.room, since, limit, head_only, epoch, defer), access=access)


@dataclass(frozen=True, slots=True, eq=False)
class ReplayAsk:
    """One subscribe's room_replay, to be read with others (room_replays); each ask
    is its own (compared by identity), whoever its user."""

    user: object
    slug: str
    since: int | None
    head_only: bool = False
    epoch: str | None = None


def room_replays(asks: list[ReplayAsk]) -> dict[ReplayAsk, Replay | ActionError]:
    """room_replay(defer=True) for many subscribes at once: the rooms and roles in
    two queries for all of them (access.room_accesses), the checks each its own. A
    refusal is the answer's ActionError."""
    accesses = room_accesses([(ask.user, ask.slug, Action.VIEW) for ask in asks])
    found: dict = {}
    for ask, access in zip(asks, accesses):
        if isinstance(access, ActionError):
            found[ask] = access
            continue
        try:
            found[ask] = dataclasses.replace(
                _replay(access.room, ask.since, None, ask.head_only, ask.epoch, defer=True), access=access)
        except ActionError as exc:
            found[ask] = exc
    return found


def _replay(room: Room, since: int | None, limit: int | None, head_only: bool = False,
            epoch: str | None = None, defer: bool = False) -> Replay:
    # The head is the room row room_access just read (in this call, after the
    # caller joined the stream): as fresh as a read of its own, one query fewer.
    head, current = room.last_seq, room.epoch
    if since is not None and epoch is not None and epoch != current:
        raise ActionError(ErrorCode.RECOVERY_FAILED, f"the room's log was started again (epoch {current}, not {epoch})")
    if since is None or since == head:
        return Replay(room=room.slug, head=head, epoch=current, events=[])
    if head_only and since < head:
        return Replay(room=room.slug, head=head, epoch=current, events=[], held_back=True)
    if since > head:
        raise ActionError(ErrorCode.RECOVERY_FAILED, f"since={since} is ahead of the room's log (head {head})")
    window = settings.REALTIME["REPLAY_MAX"]
    if limit is None and head - since > window:
        raise ActionError(
            ErrorCode.RECOVERY_FAILED, f"{head - since} events missed, more than the replay window of {window}"
        )
    if defer and limit is None:
        return Replay(room=room.slug, head=head, epoch=current, events=[], pending=(room.pk, current, since, head))
    take = min(limit or window, window)
    rows = list(Event.objects.filter(room=room, seq__gt=since).order_by("seq")[:take])
    if not rows or rows[0].seq != since + 1:
        raise ActionError(ErrorCode.RECOVERY_FAILED, f"events after seq {since} are no longer kept")
    return Replay(room=room.slug, head=max(head, rows[-1].seq), epoch=current,
                  events=[event_frame(room.slug, e) for e in rows])


def room_events_between(*, slug: str, after: int, upto: int) -> list[protocol.RoomEvent]:
    """Events after..upto of a room the caller is already subscribed to (gap repair)."""
    room_id = Room.objects.filter(slug=slug).values_list("pk", flat=True).first()
    if room_id is None:
        raise ActionError(ErrorCode.NOT_FOUND, NO_SUCH_ROOM)
    if upto - after > settings.REALTIME["REPLAY_MAX"]:
        raise ActionError(ErrorCode.RECOVERY_FAILED, "too many events missed")
    return read_range(room_id=room_id, slug=slug, after=after, upto=upto)


def read_range(*, room_id: int, slug: str, after: int, upto: int) -> list[protocol.RoomEvent]:
    """The room's events after..upto, every one of them (the log is gap-free), or
    recovery_failed when some are no longer kept. No access check: the caller has
    made it (a subscribe's room_replay, a subscription's gap repair)."""
    rows = Event.objects.filter(room_id=room_id, seq__gt=after, seq__lte=upto).order_by("seq")
    events = [event_frame(slug, e) for e in rows]
    if len(events) != upto - after:
        raise ActionError(ErrorCode.RECOVERY_FAILED, f"events after seq {after} are no longer kept")
    return events


def event_at(room: Room, seq: int) -> list[protocol.RoomEvent]:
    """The room's event at `seq`, as a list (empty if it is no longer kept)."""
    event = Event.objects.filter(room=room, seq=seq).first()
    return [event_frame(room.slug, event)] if event is not None else []
