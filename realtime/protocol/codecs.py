"""The wire encodings (JSON in text frames, MessagePack in binary ones), decoding
with exact errors, the stored form of room events, the JSON Schema export, and the
prebuilt WebSocket frame the fan-out writes as is."""

from __future__ import annotations

from typing import Any

import msgspec

from realtime.protocol.codes import SUBPROTOCOL_JSON, SUBPROTOCOL_MSGPACK, ErrorCode
from realtime.protocol.frames import (
    CLIENT_FRAMES, CLIENT_TYPES, PUSHES, REPLIES, ROOM_EVENTS, ClientFrame, Error, Frame, MessagePatch, MessagePost,
    ReactionPost, ReadPost, Ref, Request, REST_BODIES, RoomEvent, ServerEvent, WorkerFigures,
)

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


def _protobuf():
    from realtime.protocol.proto import PROTOBUF

    return PROTOBUF


PROTOBUF = _protobuf()
CODECS: dict[str, Codec] = {JSON.name: JSON, MSGPACK.name: MSGPACK, PROTOBUF.name: PROTOBUF}


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
    classes = CLIENT_FRAMES + REPLIES + ROOM_EVENTS + PUSHES + (WorkerFigures,) + REST_BODIES
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


def payload(message: dict, codec: Codec):
    """A layer message's event or push as `codec` encodes it: JSON and MessagePack
    are made once upstream (publish.layer_message); Protocol Buffers on first use
    on each worker, from the MessagePack form, and kept in the message, which the
    fan-out shares among the worker's sockets (never encoded per socket)."""
    found = message.get(codec.name)
    if found is None:
        found = message[codec.name] = codec.event_payload(message)
    return found


def framed(message: dict, codec: Codec) -> bytes:
    """A layer message's payload for `codec` as a WebSocket frame, made on first use
    and kept in the message, which the fan-out shares among a worker's sockets."""
    key = FRAME_KEYS[codec.name]
    frame = message.get(key)
    if frame is None:
        data = payload(message, codec)
        frame = message[key] = websocket_frame(data if codec.binary else data.encode(), codec.binary)
    return frame


FRAME_KEYS = {name: f"frame:{name}" for name in CODECS}


class EventFrames(dict):
    """codec -> a layer message's frame (framed()), for the fan-out's loop over a
    worker's sockets: made when the first socket of a codec needs it, then one
    dict lookup for each of the others (no call per socket)."""

    __slots__ = ("message",)

    def __init__(self, message: dict) -> None:
        super().__init__()
        self.message = message

    def __missing__(self, codec: Codec) -> bytes:
        frame = self[codec] = framed(self.message, codec)
        return frame
