"""Writes: what each action does, and the only code that publishes room events.

The socket, the REST API and the admin call these same functions, so a rule is
written once. Each write runs in its own transaction (in a worker thread when
called from async code; a message.send on PostgreSQL from the event loop itself,
domain/loopdb.py) and appends its events to the room's log (domain/roomlog.py);
they are published once committed: `perform` and `send_messages` from async code,
`perform_sync` (on commit) from sync code. Nothing here imports the socket or the
web layer.

Rooms themselves (making one, joining, leaving, members, direct messages) are
written by domain/rooms.py in the same shape, (result, events), and published
through `perform` / `perform_sync` here like the rest.

Who may do what: domain/policy.py. A message.send is idempotent by its
`client_id`: a repeat is answered with the original's ack (and the original event
published again: the first publication may never have left).
"""

from __future__ import annotations

import logging
import os
import signal
import time
import unicodedata
from dataclasses import dataclass
from logging import WARNING
from typing import Any, Callable

import psycopg
from channels.db import database_sync_to_async
from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from realtime import protocol
from realtime.delivery import publish
from realtime.domain import loopdb, mentions, roomlog
from realtime.domain.access import RoomAccess, check, room_access
from realtime.domain.errors import ActionError
from realtime.domain.policy import Action, can
from realtime.observability import metrics, tracing
from realtime.observability.logs import event
from realtime.models import Event, Mention, Message, Reaction, ReadState, Room, new_epoch
from realtime.protocol import ErrorCode

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class MessageResult:
    room: str
    id: int
    seq: int


@dataclass(frozen=True, slots=True)
class ReactionResult:
    room: str
    id: int
    emoji: str
    seq: int | None  # the event's; None: nothing changed


@dataclass(frozen=True, slots=True)
class ReadResult:
    room: str
    seq: int  # what is stored now
    moved: bool  # whether this call moved it forward
    markers: bool  # whether the room shows read markers to its members


# ---------------------------------------------------------------------------
# Running writes: a transaction (in a thread from async code), publish after commit
# ---------------------------------------------------------------------------
async def perform(fn: Callable[..., tuple[Any, list[protocol.RoomEvent]]], **kwargs) -> Any:
    """Run a write in a worker thread (its own transaction), then publish its events."""
    result, events = await database_sync_to_async(fn)(**kwargs)
    await publish.publish(events)
    return result


def perform_sync(fn: Callable[..., tuple[Any, list[protocol.RoomEvent]]], **kwargs) -> Any:
    """Run a write from sync code; publish its events when the transaction commits."""
    result, events = fn(**kwargs)
    publish.publish_on_commit(events)
    return result


async def send_messages(*, user, sends: list[dict], traces: list[str]) -> list[MessageResult | Exception]:
    """message.send for each of `sends` (message_send's keyword arguments), in order,
    written together (on PostgreSQL from the loop's own connection, domain/loopdb.py;
    what that cannot settle, and everything elsewhere, in one trip to the database
    thread), then one publication of every event they appended, each with its frame's trace id. Each send's outcome, in order: its
    result, or the exception that refused it."""
    started = time.perf_counter()
    outcomes = await _send_on_loop(user, sends) if loopdb.enabled() else []
    if len(outcomes) < len(sends):
        outcomes += await database_sync_to_async(message_send_many)(user=user, sends=sends[len(outcomes):])
    written = time.perf_counter()
    metrics.SEND_STEP.labels("write").observe(written - started)
    _crash_point(sends)
    published = [(event, trace) for (_, events), trace in zip(outcomes, traces) for event in events]
    await publish.publish([event for event, _ in published], [trace for _, trace in published])
    metrics.SEND_STEP.labels("publish").observe(time.perf_counter() - written)
    return [result for result, _ in outcomes]


async def _send_on_loop(user, sends: list[dict]) -> list[tuple[MessageResult, list]]:
    """message_send_many's usual case without the database thread: sends whose
    checks pass from the access the caller holds (a socket's subscription), each
    run of one room written with one statement from the event loop
    (roomlog.write_messages_async). Stops at the first send it cannot settle that
    way (no access held, a refusal, a repeat's unique violation, a room gone, the
    database's error): nothing of that run was written, and it and the rest go to
    the database thread in order, whose answers are message_send's. Returns the
    outcomes of the sends it wrote, the first ones."""
    outcomes: list[tuple[MessageResult, list]] = []
    author = user.get_username()
    while len(outcomes) < len(sends):
        start = len(outcomes)
        first = sends[start]
        access = first.get("access")
        if access is None:
            break
        try:
            with tracing.span("realtime.permission", room=first["slug"], count=len(sends) - start):
                check(user, access, Action.POST)
        except ActionError:
            break
        run: list[tuple[str, str]] = []
        for send in sends[start:]:
            if send["slug"] != first["slug"]:
                break
            try:
                run.append((clean_body(send["body"]), send["client_id"]))
            except ActionError:
                break
        if not run:
            break
        room, now = access.room, timezone.now()
        try:
            with tracing.span("realtime.db.write", room=room.slug, count=len(run)) as span:
                written = await roomlog.write_messages_async(room, user, run, now)
                span.set_attribute("realtime.seq", written[-1].seq)
        except Exception as exc:
            # The database thread settles it (a repeat, a room gone) or fails it as it would.
            if isinstance(exc, psycopg.errors.UniqueViolation):
                reason = "repeat"
            elif isinstance(exc, ActionError):
                reason = "room_gone"
            else:
                reason = type(exc).__name__
            metrics.LOOP_WRITE_HANDED_OVER.labels(reason).inc()
            if reason not in ("repeat", "room_gone"):
                event(log, WARNING, "db.loop_write_handed_over", user_id=user.pk, room=room.slug, reason=reason)
            break
        for (body, client_id), (message_id, seq, named) in zip(run, written):
            outcomes.append((MessageResult(room=room.slug, id=message_id, seq=seq),
                             [roomlog.new_message(room.slug, seq, message_id, author, body, client_id, now, named)]))
    return outcomes


def _crash_point(sends: list[dict]) -> None:
    """Tests only (settings.REALTIME_TEST_CRASH_AFTER_COMMIT, off unless set): die
    here, committed and not yet published, with SIGKILL as a crashed worker would,
    when a send's body contains the marker."""
    marker = settings.REALTIME_TEST_CRASH_AFTER_COMMIT
    if marker and any(marker in send["body"] for send in sends):
        os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------------------
# Messages
# ---------------------------------------------------------------------------
_ALLOWED_CONTROL = {"\n", "\t"}


def clean_body(body: str) -> str:
    """Check a message body: not blank, within the length limit, no control characters."""
    if not isinstance(body, str) or not body.strip():
        raise ActionError(ErrorCode.INVALID, "the message body is empty")
    maximum = settings.REALTIME["MAX_BODY_LENGTH"]
    if len(body) > maximum:
        raise ActionError(ErrorCode.TOO_LARGE, f"the message body is longer than {maximum} characters")
    for ch in body:
        if ch not in _ALLOWED_CONTROL and unicodedata.category(ch) in ("Cc", "Cs"):
            raise ActionError(ErrorCode.INVALID, "the message body contains control characters")
    return body


def _posting_access(user, slug: str, access: RoomAccess | None) -> RoomAccess:
    """The room's access for a message.send: the caller's (a socket's subscription,
    renewed whenever the room's memberships or visibility change), checked again
    for VIEW, or loaded."""
    if access is None:
        return room_access(user=user, slug=slug, action=Action.VIEW)
    check(user, access, Action.VIEW)
    return access


def message_send(*, user, slug: str, body: str, client_id: str, access: RoomAccess | None = None) -> tuple[MessageResult, list]:
    """Post a message. A repeat of (user, client_id) returns the original result and
    writes nothing; the same client_id in another room is a conflict."""
    body = clean_body(body)
    with tracing.span("realtime.permission", room=slug):
        access = _posting_access(user, slug, access)
        room = access.room
        try:
            check(user, access, Action.POST)
        except ActionError:
            # A repeat is answered before the policy: the message exists whatever has
            # changed since, and the client only needs its ack.
            return _repeat(user, client_id, room)
    # A first send (the usual case) is written straight away; a repeat of its
    # client_id fails the unique constraint and is answered with the original.
    now = timezone.now()
    try:
        with tracing.span("realtime.db.write", room=slug, count=1) as span:
            [(message_id, seq, named)] = roomlog.write_messages(room, user, [(body, client_id)], now)
            span.set_attribute("realtime.seq", seq)
    except IntegrityError:
        # A repeat (a retry after a lost ack, or a concurrent one that won the race).
        return _repeat(user, client_id, room)
    event = roomlog.new_message(room.slug, seq, message_id, user.get_username(), body, client_id, now, named)
    return MessageResult(room=room.slug, id=message_id, seq=seq), [event]


def message_send_many(*, user, sends: list[dict]) -> list[tuple[MessageResult | Exception, list]]:
    """message_send for each of `sends` (its keyword arguments), in order, in one
    call. Each has its own checks, seq and outcome: an ActionError (or any other
    failure) is returned in that send's place and the others go on. Consecutive
    first sends to one room are written together (roomlog.write_messages: one
    statement on PostgreSQL); whatever that cannot settle (a refusal, a repeat)
    takes message_send's own path."""
    outcomes: list[tuple[MessageResult | Exception, list] | None] = [None] * len(sends)
    start = 0
    while start < len(sends):
        end = start + 1
        while end < len(sends) and sends[end]["slug"] == sends[start]["slug"]:
            end += 1
        if end - start > 1:
            _send_run(user, sends, start, end, outcomes)
        # Before the next run: seqs follow the order the sends came in.
        for i in range(start, end):
            if outcomes[i] is None:
                try:
                    outcomes[i] = message_send(user=user, **sends[i])
                except Exception as exc:
                    outcomes[i] = (exc, [])
        start = end
    return outcomes  # type: ignore[return-value]


def _send_run(user, sends: list[dict], start: int, end: int, outcomes: list) -> None:
    """Write sends[start:end] (one room) together. Fills `outcomes` for the sends it
    wrote; leaves the rest (and all of them, when a repeat fails the write's unique
    constraint) to message_send, one by one."""
    first = sends[start]
    try:
        with tracing.span("realtime.permission", room=first["slug"], count=end - start):
            access = _posting_access(user, first["slug"], first.get("access"))
            check(user, access, Action.POST)
    except ActionError:
        return  # each send is refused (or found to be a repeat) on its own
    run: list[tuple[int, str, str]] = []
    for i in range(start, end):
        try:
            run.append((i, clean_body(sends[i]["body"]), sends[i]["client_id"]))
        except ActionError:
            continue  # refused on its own
    if len(run) < 2:
        return
    room, author, now = access.room, user.get_username(), timezone.now()
    try:
        with tracing.span("realtime.db.write", room=room.slug, count=len(run)) as span:
            written = roomlog.write_messages(room, user, [(body, client_id) for _, body, client_id in run], now)
            span.set_attribute("realtime.seq", written[-1][1])
    except (IntegrityError, ActionError):
        return  # a repeat among them, or the room is gone: nothing was written
    for (i, body, client_id), (message_id, seq, named) in zip(run, written):
        outcomes[i] = (MessageResult(room=room.slug, id=message_id, seq=seq),
                       [roomlog.new_message(room.slug, seq, message_id, author, body, client_id, now, named)])


def _repeat(user, client_id: str, room: Room) -> tuple[MessageResult, list]:
    """A client_id already used: the original's result, and its event to publish
    again (a client retries when it saw no ack, which may mean the first
    publication never left: a crash between commit and publish; subscribers that
    have it drop it by seq). Not a repeat: the refusal that brought us here."""
    found = Message.objects.filter(author=user, client_id=client_id).values_list("id", "seq", "room_id").first()
    if found is None:
        raise
    message_id, seq, room_id = found
    if room_id != room.pk:
        raise ActionError(ErrorCode.CONFLICT, "this client_id was already used for a message in another room")
    return MessageResult(room=room.slug, id=message_id, seq=seq), roomlog.event_at(room, seq)


def _change(user, access: RoomAccess, message_id: int, action: Action) -> tuple[Message, int]:
    """Lock a live message of the room, check that `user` may `action` it, and take
    the room's next seq for the change (inside the caller's transaction). Checked
    under the lock and before the seq, so a refusal takes no seq."""
    room = access.room
    message = Message.objects.select_for_update().filter(pk=message_id, room=room, deleted_at__isnull=True).first()
    if message is None:
        raise ActionError(ErrorCode.NOT_FOUND, "no such message in this room")
    decision = can(user, action, is_public=room.is_public, role=access.role, author_id=message.author_id,
                   kind=room.kind)
    if not decision:
        raise ActionError(ErrorCode.FORBIDDEN, decision.reason)
    return message, roomlog.next_seq(room.pk)


def message_edit(*, user, slug: str, message_id: int, body: str) -> tuple[MessageResult, list]:
    """Replace the body of one's own message; the event carries only what changed,
    and the new body's mentions (which replace the old ones: a mention keeps the
    message's seq, so one added to a message the user has read does not count)."""
    body = clean_body(body)
    access = room_access(user=user, slug=slug, action=Action.VIEW)
    room = access.room
    [mentioned] = mentions.resolve(room, user, [body])
    with transaction.atomic():
        message, seq = _change(user, access, message_id, Action.EDIT)
        message.body = body
        message.edited_at = timezone.now()
        message.save(update_fields=["body", "edited_at"])
        Mention.objects.filter(message=message).delete()
        Mention.objects.bulk_create(
            Mention(message=message, user_id=user_id, room=room, seq=message.seq) for user_id, _ in mentioned)
        event = roomlog.append(
            room,
            protocol.MessageEdited(room=room.slug, seq=seq, id=message.pk, body=body, edited_at=message.edited_at,
                                   mentions=[name for _, name in mentioned]),
            message,
        )
    return MessageResult(room=room.slug, id=message.pk, seq=seq), [event]


def message_delete(*, user, slug: str, message_id: int) -> tuple[MessageResult, list]:
    """Delete a message: its author (while allowed to post), a moderator or owner, or
    staff. Its reactions and mentions go with it; `message.deleted` says so (no
    `reaction.removed` each: a client drops the message and all it held)."""
    access = room_access(user=user, slug=slug, action=Action.VIEW)
    room = access.room
    with transaction.atomic():
        message, seq = _change(user, access, message_id, Action.DELETE)
        message.body = ""
        message.deleted_at = timezone.now()
        message.save(update_fields=["body", "deleted_at"])
        Reaction.objects.filter(message=message).delete()
        Mention.objects.filter(message=message).delete()
        # The text goes from the log too (and whom it named): a replay must not bring it back.
        for earlier in Event.objects.filter(message=message).exclude(payload__body=""):
            if "body" in earlier.payload:
                earlier.payload = {key: value for key, value in earlier.payload.items() if key != "mentions"}
                earlier.payload["body"] = ""
                earlier.save(update_fields=["payload"])
        event = roomlog.append(room, protocol.MessageDeleted(room=room.slug, seq=seq, id=message.pk), message)
    return MessageResult(room=room.slug, id=message.pk, seq=seq), [event]


# ---------------------------------------------------------------------------
# Reactions
# ---------------------------------------------------------------------------
MAX_EMOJI_PER_MESSAGE = 20
# Invisible formatting characters allowed in an emoji: the zero-width joiner (family
# and profession emoji) and the tag characters of subdivision flags (Scotland's).
# Every other one (bidi overrides, zero-width spaces) would let two reactions look
# alike, or turn the text around them.
_EMOJI_FORMAT = {"\u200d", *map(chr, range(0xE0020, 0xE0080))}


def clean_emoji(emoji: str) -> str:
    """Check a reaction: 1 to 32 characters (after NFC), no whitespace or separators,
    no control, surrogate or invisible formatting characters (but those emoji use)."""
    emoji = unicodedata.normalize("NFC", emoji) if isinstance(emoji, str) else ""
    if not 1 <= len(emoji) <= 32:
        raise ActionError(ErrorCode.INVALID, "an emoji is 1 to 32 characters")
    for ch in emoji:
        category = unicodedata.category(ch)
        if category[0] == "Z" or category in ("Cc", "Cs") or (category == "Cf" and ch not in _EMOJI_FORMAT):
            raise ActionError(ErrorCode.INVALID, "an emoji may not contain spaces, control or invisible characters")
    return emoji


def _reacted_message(room: Room, message_id: int) -> Message:
    """Lock a live message of the room (inside the caller's transaction): the
    reactions to one message are decided one at a time, so the check for a
    duplicate and the cap on different emoji hold under concurrent requests."""
    message = Message.objects.select_for_update().filter(pk=message_id, room=room, deleted_at__isnull=True).first()
    if message is None:
        raise ActionError(ErrorCode.NOT_FOUND, "no such message in this room")
    return message


def reaction_add(*, user, slug: str, message_id: int, emoji: str) -> tuple[ReactionResult, list]:
    """React to a live message (REACT: those who may post). Idempotent: a reaction
    the user has already is acknowledged with no seq and no event."""
    emoji = clean_emoji(emoji)
    room = room_access(user=user, slug=slug, action=Action.REACT).room
    with transaction.atomic():
        message = _reacted_message(room, message_id)
        reactions = Reaction.objects.filter(message=message)
        if reactions.filter(user=user, emoji=emoji).exists():
            return ReactionResult(room=room.slug, id=message.pk, emoji=emoji, seq=None), []
        present = set(reactions.values_list("emoji", flat=True).distinct())
        if emoji not in present and len(present) >= MAX_EMOJI_PER_MESSAGE:
            raise ActionError(ErrorCode.CONFLICT,
                              f"this message has {MAX_EMOJI_PER_MESSAGE} different reactions already")
        seq = roomlog.next_seq(room.pk)
        Reaction.objects.create(message=message, user=user, emoji=emoji)
        event = roomlog.append(room, protocol.ReactionAdded(room=room.slug, seq=seq, id=message.pk, emoji=emoji,
                                                            user=user.get_username()), message)
    return ReactionResult(room=room.slug, id=message.pk, emoji=emoji, seq=seq), [event]


def reaction_remove(*, user, slug: str, message_id: int, emoji: str) -> tuple[ReactionResult, list]:
    """Take back one's own reaction (REACT). Idempotent: one the user does not
    have is acknowledged with no seq and no event."""
    emoji = clean_emoji(emoji)
    room = room_access(user=user, slug=slug, action=Action.REACT).room
    with transaction.atomic():
        message = _reacted_message(room, message_id)
        if not Reaction.objects.filter(message=message, user=user, emoji=emoji).delete()[0]:
            return ReactionResult(room=room.slug, id=message.pk, emoji=emoji, seq=None), []
        seq = roomlog.next_seq(room.pk)
        event = roomlog.append(room, protocol.ReactionRemoved(room=room.slug, seq=seq, id=message.pk, emoji=emoji,
                                                              user=user.get_username()), message)
    return ReactionResult(room=room.slug, id=message.pk, emoji=emoji, seq=seq), [event]


# ---------------------------------------------------------------------------
# The log's epoch
# ---------------------------------------------------------------------------
def reset_epoch(*, slugs: list[str] | None = None) -> dict[str, tuple[str, str]]:
    """Start the logs of these rooms (every room when None) on a new epoch: after a
    database is restored from a backup, the seqs clients hold count in a history
    that is gone. A client resuming with the old epoch gets recovery_failed and
    reloads; sockets following the room now are told the same once this commits.
    Returns {slug: (old epoch, new epoch)}."""
    changed = {}
    with transaction.atomic():
        rooms = Room.objects.select_for_update().order_by("pk")
        if slugs is not None:
            rooms = rooms.filter(slug__in=slugs)
        for room in rooms:
            epoch = new_epoch()
            Room.objects.filter(pk=room.pk).update(epoch=epoch)
            changed[room.slug] = (room.epoch, epoch)
            publish.log_reset_on_commit(room.slug, epoch)
    return changed


# ---------------------------------------------------------------------------
# Read positions
# ---------------------------------------------------------------------------
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
