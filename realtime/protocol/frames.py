"""Every frame type of protocol v1, declared once (msgspec Structs): validation
(unknown fields refused), and from the same declarations the codecs (codecs.py) and
the JSON Schema that docs/protocol.md is generated from. One file past 400 lines
on purpose: the whole wire protocol reads top to bottom in one place."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, ClassVar, Literal, Union

from msgspec import Meta, Struct

from realtime.protocol.codes import ErrorCode

# ---------------------------------------------------------------------------
# Field types
# ---------------------------------------------------------------------------
Ref = Union[Annotated[str, Meta(max_length=64)], Annotated[int, Meta(ge=-(2**53), le=2**53)], None]
# Room slugs: the model validates with the same pattern (realtime.models.Room.slug).
ROOM_SLUG_PATTERN = r"^[a-z0-9][a-z0-9_-]*$"
RoomSlug = Annotated[str, Meta(min_length=1, max_length=50, pattern=ROOM_SLUG_PATTERN)]
# A polling page's id (the long poll's `client`, the goodbye's body).
POLL_CLIENT_PATTERN = r"^[A-Za-z0-9_-]{8,64}$"
Seq = Annotated[int, Meta(ge=0, le=2**53)]
# Which history a room's seqs belong to (Room.epoch): a log started again has another.
Epoch = Annotated[str, Meta(min_length=1, max_length=16, pattern=r"^[A-Za-z0-9]+$")]
MessageId = Annotated[int, Meta(ge=1, le=2**53)]
ClientId = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")]
# The schema only bounds the body by the frame size; its configured limit is a
# policy checked by the action, answered with `too_large`.
Body = Annotated[str, Meta(min_length=1)]
# A reaction: a short string (an emoji, or a name like ":+1:"). What it may contain
# beyond the length (no spaces, no control or invisible formatting characters) is
# the action's rule (services.clean_emoji), answered with `invalid` as well.
Emoji = Annotated[str, Meta(min_length=1, max_length=32)]
# A client's trace id (e.g. the trace-id of a W3C traceparent); the server makes one
# when a frame has none.
TraceId = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9-]+$")]


class Frame(Struct, tag_field="type", forbid_unknown_fields=True, omit_defaults=True, kw_only=True):
    """Base of every frame: an object whose `type` names its schema."""

    direction: ClassVar[str]


# ---------------------------------------------------------------------------
# Client -> server
# ---------------------------------------------------------------------------
class Request(Frame, kw_only=True):
    direction: ClassVar[str] = "client"
    # Client-chosen id; a request that carries one gets exactly one reply with it.
    ref: Ref = None
    # Follows the action through the channel layer to every delivery and log line.
    trace: TraceId | None = None


class Subscribe(Request, tag="subscribe", kw_only=True):
    """Join a room's live stream, after replaying its events with seq > since."""

    room: RoomSlug
    since: Seq | None = None
    # The epoch `since` belongs to (from the ack or the snapshot that gave it). When
    # the room's log has another (it was started again: reset, restored, the room
    # made anew), the answer is recovery_failed: reload the room. Without it, `since`
    # is taken as it is.
    epoch: Epoch | None = None
    # Count this socket as present in the room, and send it presence.state and
    # presence.diff. Off for clients that show no presence (bots, tools).
    presence: bool = True


class Unsubscribe(Request, tag="unsubscribe", kw_only=True):
    """Leave a room's live stream."""

    room: RoomSlug


class MessageSend(Request, tag="message.send", kw_only=True):
    """Post a message; client_id makes a retry idempotent."""

    room: RoomSlug
    body: Body
    client_id: ClientId


class MessageEdit(Request, tag="message.edit", kw_only=True):
    """Replace the body of one's own message."""

    room: RoomSlug
    id: MessageId
    body: Body


class MessageDelete(Request, tag="message.delete", kw_only=True):
    """Delete a message (its author, or a moderator or owner of the room)."""

    room: RoomSlug
    id: MessageId


class Ping(Request, tag="ping", kw_only=True):
    """Application-level heartbeat (browsers cannot send protocol pings)."""

    t: Annotated[float, Meta(ge=0)] | None = None


class Typing(Request, tag="typing", kw_only=True):
    """The user is typing in the room: shown to the others for a few seconds.
    Throttled: at most one broadcast per user and room every 2 s; never stored."""

    room: RoomSlug


class Read(Request, tag="read", kw_only=True):
    """The user has read the room up to `seq` (clamped to the head; never backwards)."""

    room: RoomSlug
    seq: Seq


class PresenceList(Request, tag="presence.list", kw_only=True):
    """The next page of who is in a room this socket follows with presence: the page
    after the user named `after` (a presence.state's or presence.page's `next`), or
    the first without it. Answered by presence.page."""

    room: RoomSlug
    after: Annotated[str, Meta(min_length=1, max_length=150)] | None = None


class MetricsSubscribe(Request, tag="metrics.subscribe", kw_only=True):
    """Staff only: receive `metrics.tick` about once a second (others: `forbidden`)."""


class MetricsUnsubscribe(Request, tag="metrics.unsubscribe", kw_only=True):
    """Stop the `metrics.tick` frames."""


# --- Reactions (issue 17) ---------------------------------------------------
class ReactionAdd(Request, tag="reaction.add", kw_only=True):
    """React to a message with `emoji` (members who may post). Once per user,
    message and emoji: adding one you have already is acknowledged without `seq`
    and changes nothing. At most 20 different emoji on one message (`conflict`)."""

    room: RoomSlug
    id: MessageId
    emoji: Emoji


class ReactionRemove(Request, tag="reaction.remove", kw_only=True):
    """Take back one's own reaction; removing one you do not have is acknowledged
    without `seq` and changes nothing."""

    room: RoomSlug
    id: MessageId
    emoji: Emoji


class AuthRefresh(Request, tag="auth.refresh", kw_only=True):
    """A socket opened with a JWT: a fresh token for the same user, sent before the
    current one's `exp` (else the socket is closed with 4001 at `exp`)."""

    token: Annotated[str, Meta(min_length=1, max_length=4096)]


CLIENT_FRAMES: tuple[type[Request], ...] = (
    Subscribe, Unsubscribe, MessageSend, MessageEdit, MessageDelete, Typing, Read, Ping, MetricsSubscribe,
    MetricsUnsubscribe,
    ReactionAdd, ReactionRemove, PresenceList, AuthRefresh,
)
CLIENT_TYPES: dict[str, type[Request]] = {cls.__struct_config__.tag: cls for cls in CLIENT_FRAMES}
ClientFrame = Union[
    Subscribe, Unsubscribe, MessageSend, MessageEdit, MessageDelete, Typing, Read, Ping, MetricsSubscribe,
    MetricsUnsubscribe,
    ReactionAdd, ReactionRemove, PresenceList, AuthRefresh,
]


# ---------------------------------------------------------------------------
# Server -> client: replies
# ---------------------------------------------------------------------------
class Reply(Frame, kw_only=True):
    direction: ClassVar[str] = "server"


class SubscribeAck(Reply, tag="ack", kw_only=True):
    """Reply to `subscribe`, sent after the replay: `seq` is the last seq sent, of
    the log `epoch` (send both back to resume)."""

    ref: Ref = None
    room: RoomSlug
    seq: Seq
    epoch: Epoch
    replayed: int


class UnsubscribeAck(Reply, tag="ack", kw_only=True):
    """Reply to `unsubscribe`."""

    ref: Ref = None
    room: RoomSlug


class MessageAck(Reply, tag="ack", kw_only=True):
    """Reply to `message.send` (a repeat of a client_id returns the original ack),
    `message.edit` and `message.delete`: the message and the seq of its event."""

    ref: Ref = None
    room: RoomSlug
    id: MessageId
    seq: Seq


class Pong(Reply, tag="pong", kw_only=True):
    """Reply to `ping`, echoing `t`."""

    ref: Ref = None
    t: float | None = None


class AuthAck(Reply, tag="ack", kw_only=True):
    """Reply to `auth.refresh`: the socket now lives until `exp` (Unix seconds)."""

    ref: Ref = None
    exp: int


class TypingAck(Reply, tag="ack", kw_only=True):
    """Reply to `typing`: `sent` false when the throttle held it back."""

    ref: Ref = None
    room: RoomSlug
    sent: bool


class ReadAck(Reply, tag="ack", kw_only=True):
    """Reply to `read`: the stored read position (never lower than before)."""

    ref: Ref = None
    room: RoomSlug
    seq: Seq


class MetricsAck(Reply, tag="ack", kw_only=True):
    """Reply to `metrics.subscribe` (metrics true) and `metrics.unsubscribe` (false)."""

    ref: Ref = None
    metrics: bool


class ReactionAck(Reply, tag="ack", kw_only=True):
    """Reply to `reaction.add` and `reaction.remove`: `seq` is the seq of the
    `reaction.added` / `reaction.removed` event it caused; absent when nothing
    changed (the reaction was already there, or not there)."""

    ref: Ref = None
    room: RoomSlug
    id: MessageId
    emoji: str
    seq: Seq | None = None


class PresencePage(Reply, tag="presence.page", kw_only=True):
    """A page of who is in the room, in name order; `next` for the one after it
    (absent on the last); `count` how many are here in all."""

    ref: Ref = None
    room: RoomSlug
    users: list[str]
    count: Annotated[int, Meta(ge=0)]
    next: str | None = None


class Error(Reply, tag="error", kw_only=True):
    """A refused or failed request (or a connection-level problem when `ref` is absent)."""

    code: ErrorCode
    message: str
    ref: Ref = None
    # The room concerned, on errors about a subscription that arrive without a ref
    # (recovery_failed while live: reload the room and subscribe again).
    room: RoomSlug | None = None
    retry_after: float | None = None


# ---------------------------------------------------------------------------
# Server -> client: room events (each with the room's gap-free seq)
# ---------------------------------------------------------------------------
class RoomEvent(Frame, kw_only=True):
    direction: ClassVar[str] = "server"
    room: RoomSlug
    seq: Seq


class MessageNew(RoomEvent, tag="message.new", kw_only=True):
    """`mentions`: the users the body names with @ who may see the room (never its
    author; at most 20), by username; absent when none."""

    id: MessageId
    author: str
    body: str
    client_id: str
    ts: datetime
    mentions: list[str] = []


class MessageEdited(RoomEvent, tag="message.edited", kw_only=True):
    """A delta: only what changed. `mentions` are the new body's (absent: none)."""

    id: MessageId
    body: str
    edited_at: datetime
    mentions: list[str] = []


class MessageDeleted(RoomEvent, tag="message.deleted", kw_only=True):
    id: MessageId


# Membership changes: in the log like messages, so an open page updates live and a
# resume replays them. `by` names who made the change when it was not the user.
MemberRoleName = Literal["owner", "moderator", "member", "reader"]
Username = Annotated[str, Meta(min_length=1, max_length=150)]


class MemberJoined(RoomEvent, tag="member.joined", kw_only=True):
    """Someone became a member: joined (no `by`), was added by `by`, or came with
    the room (its creator, a direct message's people)."""

    user: Username
    role: MemberRoleName
    by: Username | None = None


class MemberLeft(RoomEvent, tag="member.left", kw_only=True):
    """Someone is a member no more: left (no `by`) or was removed by `by`. A
    removed member of a private room gets `error` not_found for the room instead,
    and their stream of it ends."""

    user: Username
    by: Username | None = None


class MemberRole(RoomEvent, tag="member.role", kw_only=True):
    """A member's role changed (by `by`)."""

    user: Username
    role: MemberRoleName
    by: Username | None = None



# --- Reactions (issue 17) ---------------------------------------------------
class ReactionAdded(RoomEvent, tag="reaction.added", kw_only=True):
    """`user` reacted to message `id` with `emoji` (a delta: add one to its count)."""

    id: MessageId
    emoji: str
    user: str


class ReactionRemoved(RoomEvent, tag="reaction.removed", kw_only=True):
    """`user` took back their `emoji` on message `id` (a delta). A deleted message's
    reactions go with it: `message.deleted` implies them, with no event each."""

    id: MessageId
    emoji: str
    user: str


ROOM_EVENTS: tuple[type[RoomEvent], ...] = (
    MessageNew, MessageEdited, MessageDeleted,
    MemberJoined, MemberLeft, MemberRole,
    ReactionAdded, ReactionRemoved,
)
ROOM_EVENT_TYPES: dict[str, type[RoomEvent]] = {cls.__struct_config__.tag: cls for cls in ROOM_EVENTS}
ServerEvent = Union[
    MessageNew, MessageEdited, MessageDeleted,
    MemberJoined, MemberLeft, MemberRole,
    ReactionAdded, ReactionRemoved,
]
REPLIES: tuple[type[Reply], ...] = (
    SubscribeAck, UnsubscribeAck, MessageAck, TypingAck, ReadAck, MetricsAck, Pong, Error,
    ReactionAck, PresencePage, AuthAck,
)


# ---------------------------------------------------------------------------
# Server -> client: pushes (no seq, not stored)
# ---------------------------------------------------------------------------
class WorkerFigures(Struct, kw_only=True):
    """One worker's figures over its last heartbeat interval (rates per second)."""

    worker: str
    pid: int
    uptime: float
    connections: int
    users: int
    messages_in: float
    delivered: float
    p50_ms: float | None = None
    p99_ms: float | None = None
    errors: dict[str, int]
    rate_limited: int
    rooms: dict[str, int]
    draining: bool = False


class MetricsTick(Frame, tag="metrics.tick", kw_only=True):
    """The cluster's figures, about once a second: every worker that heartbeated
    in the last few seconds (a worker that stops drops out)."""

    direction: ClassVar[str] = "server"
    t: float
    workers: list[WorkerFigures]


class Push(Frame, kw_only=True):
    direction: ClassVar[str] = "server"


class TypingNotice(Push, tag="typing", kw_only=True):
    """Someone else is typing in a room this socket follows (not sent to the typist)."""

    room: RoomSlug
    user: str


class PresenceState(Push, tag="presence.state", kw_only=True):
    """Who is in the room, sent on subscribe: how many (each user once, however many
    tabs) and the first page of their names in name order; `next`, when there are
    more, is the cursor for presence.list."""

    room: RoomSlug
    users: list[str]
    count: Annotated[int, Meta(ge=0)]
    next: str | None = None


class PresenceDiff(Push, tag="presence.diff", kw_only=True):
    """Who came and went since the last state or diff, and how many are here now.
    Coalesced: about one a second at most per room and worker, and a reload within a
    couple of seconds is neither a leave nor a join. `partial`: more came or went
    than the names listed (a page that shows names asks for them again). A socket
    hears of its own user's arrival too, after its presence.state: a diff sent
    before it joined (its user's earlier tab leaving) can reach it later, and the
    next one puts its user back."""

    room: RoomSlug
    joins: list[str]
    leaves: list[str]
    count: Annotated[int, Meta(ge=0)]
    partial: bool = False


class ReadPosition(Push, tag="read.state", kw_only=True):
    """To the user's own sockets: their read position in a room moved (another tab
    or device read it)."""

    room: RoomSlug
    seq: Seq


class ReadMarker(Push, tag="read.marker", kw_only=True):
    """In rooms that show read markers: a member read up to `seq`."""

    room: RoomSlug
    user: str
    seq: Seq


class ReadMarkers(Push, tag="read.markers", kw_only=True):
    """On subscribe, in rooms that show read markers: everyone's read position."""

    room: RoomSlug
    markers: dict[str, int]


class RoomsChanged(Push, tag="rooms.changed", kw_only=True):
    """To the user's own sockets: their list of rooms changed. `added`: someone
    added them to a room or opened a direct message with them, or they made or
    joined one in another tab; `removed`: they left or were removed, or the room
    was deleted. A page asks for its list again (GET rooms/)."""

    room: RoomSlug
    change: Literal["added", "removed"]


PUSHES: tuple[type[Frame], ...] = (
    TypingNotice, PresenceState, PresenceDiff, ReadPosition, ReadMarker, ReadMarkers, RoomsChanged, MetricsTick,
)


# ---------------------------------------------------------------------------
# REST request bodies that share the socket's field types
# ---------------------------------------------------------------------------
class MessagePost(Struct, forbid_unknown_fields=True, kw_only=True):
    """Body of `POST /api/v1/rooms/<slug>/messages/`: the socket's message.send fields."""

    body: Body
    client_id: ClientId


class MessagePatch(Struct, forbid_unknown_fields=True, kw_only=True):
    """Body of `PATCH /api/v1/rooms/<slug>/messages/<id>/`: the socket's message.edit body."""

    body: Body


class ReadPost(Struct, forbid_unknown_fields=True, kw_only=True):
    """Body of `POST /api/v1/rooms/<slug>/read/`: the socket's read frame."""

    seq: Seq


class ReactionPost(Struct, forbid_unknown_fields=True, kw_only=True):
    """Body of `POST` and `DELETE /api/v1/rooms/<slug>/messages/<id>/reactions/`: the
    socket's reaction.add / reaction.remove fields."""

    emoji: Emoji


class RoomCreate(Struct, forbid_unknown_fields=True, kw_only=True):
    """Body of `POST /api/v1/rooms/`. The name's and topic's bounds (80 and 250
    characters, plain text) are checked by the action, answered invalid or too_large."""

    name: str
    visibility: Literal["public", "private"]
    topic: str = ""


class MemberAdd(Struct, forbid_unknown_fields=True, kw_only=True):
    """Body of `POST /api/v1/rooms/<slug>/members/`."""

    username: Username
    role: MemberRoleName = "member"


class MemberPatch(Struct, forbid_unknown_fields=True, kw_only=True):
    """Body of `PATCH /api/v1/rooms/<slug>/members/<username>/`."""

    role: MemberRoleName


class PresenceLeave(Struct, forbid_unknown_fields=True, kw_only=True):
    """POST rooms/<slug>/presence/leave/: the polling page `client` is going."""

    client: Annotated[str, Meta(pattern=POLL_CLIENT_PATTERN)]


class DmOpen(Struct, forbid_unknown_fields=True, kw_only=True):
    """Body of `POST /api/v1/dms/`: the other people (usernames), 1 to 7 of them."""

    users: list[Username]


REST_BODIES: tuple[type[Struct], ...] = (MessagePost, MessagePatch, ReadPost, ReactionPost, RoomCreate, MemberAdd,
                                         MemberPatch, DmOpen, PresenceLeave)
