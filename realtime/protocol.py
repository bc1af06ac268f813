"""Protocol v1: every frame type declared once, with its codecs, error and close codes.

One msgspec Struct per frame gives validation (unknown fields are refused), the JSON
and MessagePack codecs, and the JSON Schema that docs/protocol.md is generated from.
This module imports nothing of the app, so clients, tests and tools can use it alone.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Annotated, Any, ClassVar, Union

import msgspec
from msgspec import Meta, Struct

PATH = "/ws/v1/"
SUBPROTOCOL_JSON = "rt.v1.json"
SUBPROTOCOL_MSGPACK = "rt.v1.msgpack"
SUBPROTOCOLS = (SUBPROTOCOL_JSON, SUBPROTOCOL_MSGPACK)


class ErrorCode(enum.StrEnum):
    """The `code` of an `error` frame (and of REST error bodies)."""

    INVALID = "invalid"  # malformed frame, missing or wrongly typed field, bad value
    UNKNOWN_TYPE = "unknown_type"  # `type` names no client frame
    FORBIDDEN = "forbidden"  # the policy refuses this action, in a room the user can see
    NOT_FOUND = "not_found"  # no such room or message (a room the user may not see is none)
    RATE_LIMITED = "rate_limited"  # too many of this action, or the replay budget; retry after `retry_after` s
    TOO_LARGE = "too_large"  # a body or frame over its limit
    CONFLICT = "conflict"  # the request contradicts the state (e.g. client_id reused elsewhere)
    RECOVERY_FAILED = "recovery_failed"  # `since` is outside the replay window: reload history
    INTERNAL = "internal"  # a server fault; nothing was changed


# How each error code answers over HTTP (REST, the long poll, docs/protocol.md).
HTTP_STATUS: dict[ErrorCode, int] = {
    ErrorCode.INVALID: 400,
    ErrorCode.UNKNOWN_TYPE: 400,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.TOO_LARGE: 413,
    ErrorCode.CONFLICT: 409,
    ErrorCode.RECOVERY_FAILED: 410,
    ErrorCode.INTERNAL: 500,
}


class CloseCode(enum.IntEnum):
    """Close codes the app decides (daphne only lets an app send 1000 and 3000-4999)."""

    NORMAL = 1000
    NOT_AUTHENTICATED = 4001  # do not retry: log in
    FORBIDDEN = 4003  # session revoked or forbidden: do not retry
    POLICY = 4008  # bad origin after accept, abuse
    INTERNAL = 4011  # internal error
    SERVICE_RESTART = 4012  # reconnect now, with jitter
    OVERLOADED = 4013  # reconnect with backoff
    RATE_LIMITED = 4029  # a flood, or sockets opened too often: wait retry_after
    PROTOCOL_VIOLATION = 4400  # the client broke the protocol


# ---------------------------------------------------------------------------
# Field types
# ---------------------------------------------------------------------------
Ref = Union[Annotated[str, Meta(max_length=64)], Annotated[int, Meta(ge=-(2**53), le=2**53)], None]
# Room slugs: the model validates with the same pattern (realtime.models.Room.slug).
ROOM_SLUG_PATTERN = r"^[a-z0-9][a-z0-9_-]*$"
RoomSlug = Annotated[str, Meta(min_length=1, max_length=50, pattern=ROOM_SLUG_PATTERN)]
Seq = Annotated[int, Meta(ge=0, le=2**53)]
MessageId = Annotated[int, Meta(ge=1, le=2**53)]
ClientId = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")]
# The schema only bounds the body by the frame size; its configured limit is a
# policy checked by the action, answered with `too_large`.
Body = Annotated[str, Meta(min_length=1)]
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


class MetricsSubscribe(Request, tag="metrics.subscribe", kw_only=True):
    """Staff only: receive `metrics.tick` about once a second (others: `forbidden`)."""


class MetricsUnsubscribe(Request, tag="metrics.unsubscribe", kw_only=True):
    """Stop the `metrics.tick` frames."""


CLIENT_FRAMES: tuple[type[Request], ...] = (
    Subscribe, Unsubscribe, MessageSend, MessageEdit, MessageDelete, Typing, Read, Ping, MetricsSubscribe,
    MetricsUnsubscribe,
)
CLIENT_TYPES: dict[str, type[Request]] = {cls.__struct_config__.tag: cls for cls in CLIENT_FRAMES}
ClientFrame = Union[
    Subscribe, Unsubscribe, MessageSend, MessageEdit, MessageDelete, Typing, Read, Ping, MetricsSubscribe,
    MetricsUnsubscribe,
]


# ---------------------------------------------------------------------------
# Server -> client: replies
# ---------------------------------------------------------------------------
class Reply(Frame, kw_only=True):
    direction: ClassVar[str] = "server"


class SubscribeAck(Reply, tag="ack", kw_only=True):
    """Reply to `subscribe`, sent after the replay: `seq` is the last seq sent."""

    ref: Ref = None
    room: RoomSlug
    seq: Seq
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
    id: MessageId
    author: str
    body: str
    client_id: str
    ts: datetime


class MessageEdited(RoomEvent, tag="message.edited", kw_only=True):
    """A delta: only what changed."""

    id: MessageId
    body: str
    edited_at: datetime


class MessageDeleted(RoomEvent, tag="message.deleted", kw_only=True):
    id: MessageId


ROOM_EVENTS: tuple[type[RoomEvent], ...] = (MessageNew, MessageEdited, MessageDeleted)
ROOM_EVENT_TYPES: dict[str, type[RoomEvent]] = {cls.__struct_config__.tag: cls for cls in ROOM_EVENTS}
ServerEvent = Union[MessageNew, MessageEdited, MessageDeleted]
REPLIES: tuple[type[Reply], ...] = (SubscribeAck, UnsubscribeAck, MessageAck, TypingAck, ReadAck, MetricsAck, Pong, Error)


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
    """Who is in the room, sent on subscribe (each user once, however many tabs)."""

    room: RoomSlug
    users: list[str]


class PresenceDiff(Push, tag="presence.diff", kw_only=True):
    """Who came and went since the last state or diff (coalesced: a reload within a
    couple of seconds is neither)."""

    room: RoomSlug
    joins: list[str]
    leaves: list[str]


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


PUSHES: tuple[type[Frame], ...] = (
    TypingNotice, PresenceState, PresenceDiff, ReadPosition, ReadMarker, ReadMarkers, MetricsTick,
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


# ---------------------------------------------------------------------------
# Codecs
# ---------------------------------------------------------------------------
class ProtocolError(Exception):
    """A frame that could not be decoded into a request; carries the error reply."""

    def __init__(self, code: ErrorCode, message: str, ref: Any = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.ref = ref

    def reply(self) -> Error:
        return Error(code=self.code, message=self.message, ref=self.ref)


def _valid_ref(value: Any) -> Any:
    """The request's ref if it is one we may echo, else None."""
    try:
        return msgspec.convert(value, Ref)
    except msgspec.ValidationError:
        return None


class Codec:
    """One wire encoding: decodes client frames, encodes server frames."""

    name: str
    binary: bool

    def __init__(self, name: str, binary: bool, module: Any):
        self.name = name
        self.binary = binary
        self._module = module
        self._decoder = module.Decoder(ClientFrame)
        self._any_decoder = module.Decoder()
        self._encoder = module.Encoder()

    def encode(self, frame: Frame | dict) -> bytes:
        return self._encoder.encode(frame)

    def decode(self, data: bytes) -> Request:
        """Decode and validate one client frame, or raise ProtocolError."""
        try:
            return self._decoder.decode(data)
        except msgspec.DecodeError as exc:
            if not isinstance(exc, msgspec.ValidationError):
                raise ProtocolError(ErrorCode.INVALID, f"malformed {self.name} frame") from None
            validation = exc
        except RecursionError:
            raise ProtocolError(ErrorCode.INVALID, "frame nested too deeply") from None
        except UnicodeDecodeError:
            raise ProtocolError(ErrorCode.INVALID, "a string is not valid UTF-8") from None
        # Decode again without a schema to tell an unknown type from a bad field
        # and to find the ref to answer with. Only invalid frames take this path.
        try:
            raw = self._any_decoder.decode(data)
        except RecursionError:
            raise ProtocolError(ErrorCode.INVALID, "frame nested too deeply") from None
        except (msgspec.DecodeError, UnicodeDecodeError):
            # Valid for the schema's parser but not as plain data (e.g. 1e999, a
            # lone surrogate, a MessagePack string of invalid UTF-8 that the schema
            # refused before reading it): still just an invalid frame.
            raise ProtocolError(ErrorCode.INVALID, str(validation)) from None
        if not isinstance(raw, dict):
            raise ProtocolError(ErrorCode.INVALID, "a frame must be an object with a `type`")
        ref = _valid_ref(raw.get("ref"))
        frame_type = raw.get("type")
        if not isinstance(frame_type, str):
            raise ProtocolError(ErrorCode.INVALID, "a frame must have a string `type`", ref)
        if frame_type not in CLIENT_TYPES:
            raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown frame type {frame_type[:40]!r}", ref)
        raise ProtocolError(ErrorCode.INVALID, str(validation), ref)


JSON = Codec(SUBPROTOCOL_JSON, binary=False, module=msgspec.json)
MSGPACK = Codec(SUBPROTOCOL_MSGPACK, binary=True, module=msgspec.msgpack)
CODECS: dict[str, Codec] = {JSON.name: JSON, MSGPACK.name: MSGPACK}


def event_from_dict(data: dict) -> RoomEvent:
    """Build a room event frame from its stored form ({type, room, seq, ...payload})."""
    return msgspec.convert(data, ServerEvent)


def event_to_dict(event: RoomEvent) -> dict:
    """The JSON-ready form of a room event, as the REST API returns it."""
    return msgspec.to_builtins(event)


# ---------------------------------------------------------------------------
# JSON Schema (for docs/protocol.md)
# ---------------------------------------------------------------------------
def json_schemas() -> dict[str, dict]:
    """One JSON Schema per frame class, keyed by class name."""
    classes = CLIENT_FRAMES + REPLIES + ROOM_EVENTS + PUSHES + (WorkerFigures, MessagePost, MessagePatch, ReadPost)
    _, components = msgspec.json.schema_components(classes, ref_template="#/$defs/{name}")
    return {cls.__name__: components[cls.__name__] for cls in classes}


def websocket_frame(payload: bytes, binary: bool) -> bytes:
    """One unfragmented, unmasked server-to-client WebSocket message (RFC 6455 5.2)."""
    head = 0x82 if binary else 0x81
    n = len(payload)
    if n < 126:
        return bytes((head, n)) + payload
    if n < 65536:
        return bytes((head, 126)) + n.to_bytes(2, "big") + payload
    return bytes((head, 127)) + n.to_bytes(8, "big") + payload


def framed(message: dict, codec: Codec) -> bytes:
    """A layer message's payload for `codec` as a WebSocket frame, made on first use
    and kept in the message, which the fan-out shares among a worker's sockets."""
    key = FRAME_KEYS[codec.name]
    frame = message.get(key)
    if frame is None:
        payload = message[codec.name]
        frame = message[key] = websocket_frame(payload if codec.binary else payload.encode(), codec.binary)
    return frame


FRAME_KEYS = {name: f"frame:{name}" for name in CODECS}
