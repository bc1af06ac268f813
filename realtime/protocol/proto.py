"""Protocol Buffers for protocol v1 (`rt.v1.protobuf`): the schema is made from the
frame declarations (frames.py), not written beside them.

`file_descriptor()` walks every frame class (msgspec's type info) into one proto3
file, package `rt.v1`: a message per frame class, and `Frame`, the envelope every
WebSocket message is, with a `oneof frame` holding exactly one of them. The same
descriptor gives docs/protocol.proto (`render()`, written by `manage.py
protocol_docs`; a test fails when it is stale) and, through protobuf's own
runtime, the classes this codec encodes and decodes with. No protoc, no generated
Python code to keep in step.

How declarations map:
- str, an enum, a literal, a datetime (ISO 8601, as in JSON) -> string; int -> sint64;
  float -> double; bool -> bool; a struct -> its message; list -> repeated;
  dict[str, int] -> map<string, sint64>.
- A field that may be absent (it has a default, or may be null) is proto3
  `optional`, so absent and zero stay different; `ref` (a string or an integer) is a
  `oneof ref { string ref_text; sint64 ref_number; }`.
- Field numbers follow declaration order (the base class's `ref` and `trace`
  first); envelope numbers follow the frame lists, client frames from 1, replies
  from 100, room events from 200, pushes from 300. So a new field or frame goes at
  the END of its class or list: inserting one renumbers those after it (the stale
  test shows the diff).

Decoding a client frame turns it into the dict its JSON form would be and validates
that with the same msgspec schema, so a protobuf frame that does not parse, carries
a field number the schema does not know (or a known one with the wrong wire type,
which protobuf keeps as unknown), or a value the schema refuses gets the same
`invalid` (or `unknown_type`) error as JSON.
"""

from __future__ import annotations

import functools
from datetime import datetime
from typing import Any

import msgspec
import msgspec.inspect as mi

from realtime.protocol.codes import SUBPROTOCOL_PROTOBUF, ErrorCode
from realtime.protocol.frames import CLIENT_FRAMES, PUSHES, REPLIES, ROOM_EVENTS, ClientFrame, Frame, Request

PACKAGE = "rt.v1"
# Envelope field numbers: each list starts at its own base (module doc).
SECTIONS = ((CLIENT_FRAMES, 1), (REPLIES, 100), (ROOM_EVENTS, 200), (PUSHES, 300))


def _snake(name: str) -> str:
    out = []
    for i, ch in enumerate(name):
        if ch.isupper() and i:
            out.append("_")
        out.append(ch.lower())
    return "".join(out)


def envelope_fields() -> list[tuple[str, int, type]]:
    """(oneof field name, number, frame class) of the envelope, in order."""
    found = []
    for classes, base in SECTIONS:
        for offset, cls in enumerate(classes):
            found.append((_snake(cls.__name__), base + offset, cls))
    return found


def _strip(t):
    while isinstance(t, mi.Metadata):
        t = t.type
    return t


def _scalar(t) -> int | None:
    """The FieldDescriptorProto type of a scalar msgspec type, or None."""
    from google.protobuf.descriptor_pb2 import FieldDescriptorProto as F

    t = _strip(t)
    if isinstance(t, (mi.StrType, mi.EnumType, mi.LiteralType, mi.DateTimeType)):
        return F.TYPE_STRING
    if isinstance(t, mi.IntType):
        return F.TYPE_SINT64
    if isinstance(t, mi.FloatType):
        return F.TYPE_DOUBLE
    if isinstance(t, mi.BoolType):
        return F.TYPE_BOOL
    return None


@functools.lru_cache(maxsize=1)
def file_descriptor():
    """The FileDescriptorProto of protocol v1 (module doc)."""
    from google.protobuf.descriptor_pb2 import DescriptorProto, FieldDescriptorProto as F, FileDescriptorProto

    proto = FileDescriptorProto(name="rt/v1/protocol.proto", package=PACKAGE, syntax="proto3")
    done: dict[type, DescriptorProto] = {}

    def message_for(cls) -> str:
        if cls in done:
            return f".{PACKAGE}.{cls.__name__}"
        message = proto.message_type.add(name=cls.__name__)
        done[cls] = message
        number = 1
        for field in mi.type_info(cls).fields:
            t = _strip(field.type)
            members = [_strip(x) for x in t.types] if isinstance(t, mi.UnionType) else [t]
            nullable = any(isinstance(x, mi.NoneType) for x in members)
            members = [x for x in members if not isinstance(x, mi.NoneType)]
            if len(members) == 2 and {type(x) for x in members} == {mi.StrType, mi.IntType}:
                # `ref`: a string or an integer.
                index = len(message.oneof_decl)
                message.oneof_decl.add(name=field.name)
                message.field.add(name=f"{field.name}_text", number=number, type=F.TYPE_STRING,
                                  label=F.LABEL_OPTIONAL, oneof_index=index)
                message.field.add(name=f"{field.name}_number", number=number + 1, type=F.TYPE_SINT64,
                                  label=F.LABEL_OPTIONAL, oneof_index=index)
                number += 2
                continue
            if len(members) != 1:
                raise TypeError(f"{cls.__name__}.{field.name}: no protobuf form for {field.type}")
            (inner,) = members
            optional = nullable or not field.required
            entry = message.field.add(name=field.name, number=number, label=F.LABEL_OPTIONAL)
            number += 1
            if isinstance(inner, mi.ListType):
                entry.label = F.LABEL_REPEATED
                item = _strip(inner.item_type)
                if isinstance(item, mi.StructType):
                    entry.type, entry.type_name = F.TYPE_MESSAGE, message_for(item.cls)
                else:
                    entry.type = _scalar(item)
                continue
            if isinstance(inner, mi.DictType):
                # map<string, V>: a nested entry message, as protoc makes it.
                entry_name = "".join(part.title() for part in field.name.split("_")) + "Entry"
                nested = message.nested_type.add(name=entry_name)
                nested.options.map_entry = True
                nested.field.add(name="key", number=1, type=_scalar(inner.key_type), label=F.LABEL_OPTIONAL)
                nested.field.add(name="value", number=2, type=_scalar(inner.value_type), label=F.LABEL_OPTIONAL)
                entry.label, entry.type = F.LABEL_REPEATED, F.TYPE_MESSAGE
                entry.type_name = f".{PACKAGE}.{cls.__name__}.{entry_name}"
                continue
            if isinstance(inner, mi.StructType):
                entry.type, entry.type_name = F.TYPE_MESSAGE, message_for(inner.cls)
                continue
            entry.type = _scalar(inner)
            if entry.type is None:
                raise TypeError(f"{cls.__name__}.{field.name}: no protobuf form for {field.type}")
            if optional:
                # proto3 `optional`: a synthetic oneof of its own (presence kept).
                entry.proto3_optional = True
                entry.oneof_index = len(message.oneof_decl)
                message.oneof_decl.add(name=f"_{field.name}")
        return f".{PACKAGE}.{cls.__name__}"

    envelope_names = []
    for name, number, cls in envelope_fields():
        envelope_names.append((name, number, message_for(cls)))
    envelope = proto.message_type.add(name="Frame")
    envelope.oneof_decl.add(name="frame")
    for name, number, type_name in envelope_names:
        envelope.field.add(name=name, number=number, label=F.LABEL_OPTIONAL, type=F.TYPE_MESSAGE,
                           type_name=type_name, oneof_index=0)
    return proto


@functools.lru_cache(maxsize=1)
def _classes():
    from google.protobuf import descriptor_pool, message_factory

    pool = descriptor_pool.DescriptorPool()
    pool.Add(file_descriptor())
    envelope = message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{PACKAGE}.Frame"))
    return envelope


# ---------------------------------------------------------------------------
# docs/protocol.proto
# ---------------------------------------------------------------------------
def render() -> str:
    """The .proto text of file_descriptor()."""
    from google.protobuf.descriptor_pb2 import FieldDescriptorProto as F

    names = {F.TYPE_STRING: "string", F.TYPE_SINT64: "sint64", F.TYPE_DOUBLE: "double", F.TYPE_BOOL: "bool"}
    proto = file_descriptor()
    docs = {cls.__name__: (cls.__doc__ or "").strip() for _, _, cls in envelope_fields()}
    lines = [
        "// Protocol v1 as Protocol Buffers: subprotocol rt.v1.protobuf, one Frame per binary WebSocket message.",
        "// Generated from realtime/protocol/frames.py by `python manage.py protocol_docs`; do not edit by hand",
        "// (a test fails when this file and the declarations disagree). docs/protocol.md says what each",
        "// frame means; the fields are the JSON form's, datetimes as ISO 8601 strings.",
        "",
        'syntax = "proto3";',
        "",
        f"package {PACKAGE};",
        "",
    ]

    def type_of(field) -> str:
        if field.type == F.TYPE_MESSAGE:
            return field.type_name.rsplit(".", 1)[-1]
        return names[field.type]

    for message in proto.message_type:
        doc = docs.get(message.name, "")
        for line in doc.splitlines():
            lines.append(f"// {line.strip()}".rstrip())
        lines.append(f"message {message.name} {{")
        maps = {nested.name: nested for nested in message.nested_type if nested.options.map_entry}
        oneofs: dict[int, list] = {}
        for field in message.field:
            if field.HasField("oneof_index") and not field.proto3_optional:
                oneofs.setdefault(field.oneof_index, []).append(field)
        emitted: set[int] = set()
        for field in message.field:
            if field.HasField("oneof_index") and not field.proto3_optional:
                index = field.oneof_index
                if index in emitted:
                    continue
                emitted.add(index)
                lines.append(f"  oneof {message.oneof_decl[index].name} {{")
                for member in oneofs[index]:
                    lines.append(f"    {type_of(member)} {member.name} = {member.number};")
                lines.append("  }")
                continue
            if field.type == F.TYPE_MESSAGE and field.type_name.rsplit(".", 1)[-1] in maps:
                entry = maps[field.type_name.rsplit(".", 1)[-1]]
                key, value = entry.field
                lines.append(f"  map<{names[key.type]}, {names[value.type]}> {field.name} = {field.number};")
                continue
            label = "repeated " if field.label == F.LABEL_REPEATED else "optional " if field.proto3_optional else ""
            lines.append(f"  {label}{type_of(field)} {field.name} = {field.number};")
        lines.append("}")
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Encoding and decoding
# ---------------------------------------------------------------------------
def _fill(message, data: dict) -> None:
    """Set `message`'s fields from a frame's builtins form (its JSON form)."""
    from google.protobuf.descriptor import FieldDescriptor as FD

    fields = message.DESCRIPTOR.fields_by_name
    for key, value in data.items():
        if value is None or key == "type":
            continue
        field = fields.get(key)
        if field is None:
            if f"{key}_text" not in fields:
                raise KeyError(f"{message.DESCRIPTOR.name} has no field {key!r}")
            # `ref`: a string or an integer.
            field = fields[f"{key}_number"] if isinstance(value, int) and not isinstance(value, bool) else fields[f"{key}_text"]
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            getattr(message, field.name).update(value)
        elif field.is_repeated:
            if field.message_type is not None:
                for item in value:
                    _fill(getattr(message, field.name).add(), item)
            else:
                getattr(message, field.name).extend(value)
        elif field.message_type is not None:
            _fill(getattr(message, field.name), value)
        else:
            if isinstance(value, datetime):
                value = msgspec.json.encode(value)[1:-1].decode()  # as the JSON form writes it
            setattr(message, field.name, value)


@functools.lru_cache(maxsize=None)
def _shape(cls) -> dict[str, tuple[bool, type | None]]:
    """{field: (required, the struct class of a message field or of a list's items)}."""
    found = {}
    for field in mi.type_info(cls).fields:
        t = _strip(field.type)
        members = [_strip(x) for x in t.types] if isinstance(t, mi.UnionType) else [t]
        nested = None
        for member in members:
            if isinstance(member, mi.ListType) and isinstance(_strip(member.item_type), mi.StructType):
                nested = _strip(member.item_type).cls
            elif isinstance(member, mi.StructType):
                nested = member.cls
        found[field.name] = (field.required, nested)
    return found


@functools.lru_cache(maxsize=None)
def _plan(descriptor, cls) -> tuple:
    """How to read a message of `descriptor` as `cls`: one entry a field, made once."""
    shape = _shape(cls)
    steps = []
    for field in descriptor.fields:
        oneof = field.containing_oneof
        if oneof is not None and not oneof.name.startswith("_"):
            steps.append(("oneof", field.name, oneof.name, False, None))
        elif field.message_type is not None and field.message_type.GetOptions().map_entry:
            steps.append(("map", field.name, field.name, shape[field.name][0], None))
        elif field.is_repeated:
            steps.append(("list", field.name, field.name, shape[field.name][0], shape[field.name][1]))
        elif field.message_type is not None:
            steps.append(("message", field.name, field.name, False, shape[field.name][1]))
        elif field.has_presence:
            steps.append(("optional", field.name, field.name, False, None))
        else:
            steps.append(("plain", field.name, field.name, True, None))
    return tuple(steps)


def _read(message, cls) -> dict:
    """A message as the dict its frame's JSON form would decode to."""
    out: dict[str, Any] = {}
    for kind, name, key, required, nested in _plan(message.DESCRIPTOR, cls):
        if kind == "plain":
            out[key] = getattr(message, name)
        elif kind == "optional" or kind == "oneof":
            if message.HasField(name):
                out[key] = getattr(message, name)
        elif kind == "list":
            values = getattr(message, name)
            if values or required:
                out[key] = [_read(v, nested) for v in values] if nested is not None else list(values)
        elif kind == "map":
            value = getattr(message, name)
            if value or required:
                out[key] = dict(value)
        elif message.HasField(name):
            out[key] = _read(getattr(message, name), nested)
    return out


def _unknown(message) -> bool:
    """Whether `message` or any message in it carries fields its schema lacks."""
    from google.protobuf.descriptor import FieldDescriptor as FD
    from google.protobuf.unknown_fields import UnknownFieldSet

    if len(UnknownFieldSet(message)):
        return True
    for field, value in message.ListFields():
        if field.message_type is None or field.message_type.GetOptions().map_entry:
            continue
        items = value if field.is_repeated else [value]
        if any(_unknown(item) for item in items):
            return True
    return False


class ProtobufCodec:
    """The rt.v1.protobuf codec: the same interface as codecs.Codec."""

    name = SUBPROTOCOL_PROTOBUF
    binary = True

    def __init__(self) -> None:
        self._by_class = {cls: name for name, _, cls in envelope_fields()}
        self._by_field = {name: cls for name, _, cls in envelope_fields()}
        self._validator = msgspec.json.Decoder(ClientFrame)

    def encode(self, frame: Frame | dict) -> bytes:
        """A server frame (a Frame, or a room event's or push's builtins dict with
        its class named by `type` and, where the tag is shared, by `_class`)."""
        envelope = _classes()()
        if isinstance(frame, dict):
            cls = self.class_of(frame)
            data = frame
        else:
            cls, data = type(frame), msgspec.to_builtins(frame)
        _fill(getattr(envelope, self._by_class[cls]), data)
        return envelope.SerializeToString()

    @functools.cached_property
    def _by_tag(self) -> dict[str, type]:
        found: dict[str, type] = {}
        for cls in ROOM_EVENTS + PUSHES:
            found.setdefault(cls.__struct_config__.tag, cls)
        return found

    def class_of(self, data: dict) -> type:
        return self._by_tag[data["type"]]

    def decode(self, data: bytes) -> Request:
        """Decode and validate one client frame, or raise ProtocolError (the same
        codes and messages as JSON where they can be the same)."""
        from google.protobuf.message import DecodeError

        from realtime.protocol.codecs import JSON, ProtocolError

        envelope = _classes()()
        try:
            envelope.ParseFromString(data)
        except (DecodeError, RecursionError, ValueError):
            raise ProtocolError(ErrorCode.INVALID, f"malformed {self.name} frame") from None
        which = envelope.WhichOneof("frame")
        if which is None:
            if len(__import__("google.protobuf.unknown_fields", fromlist=["x"]).UnknownFieldSet(envelope)):
                raise ProtocolError(ErrorCode.UNKNOWN_TYPE, "unknown frame type (an envelope field this version "
                                                            "does not know)")
            raise ProtocolError(ErrorCode.INVALID, "a frame must hold one frame type")
        cls = self._by_field[which]
        inner = getattr(envelope, which)
        body = _read(inner, cls)
        ref = body.get("ref")
        if not issubclass(cls, Request):
            raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"{cls.__struct_config__.tag!r} is not a client frame", ref)
        if _unknown(envelope):
            raise ProtocolError(ErrorCode.INVALID, "a field this version does not know (or of the wrong type)", ref)
        body["type"] = cls.__struct_config__.tag
        # The JSON form's validation, rules and messages: one schema for every codec.
        return JSON.decode(msgspec.json.encode(body))

    def decode_any(self, data: bytes) -> dict:
        """Any frame, as the dict of its JSON form with its `type` (for clients: the
        tests' Python client reads the server's frames with it)."""
        envelope = _classes()()
        envelope.ParseFromString(data)
        which = envelope.WhichOneof("frame")
        cls = self._by_field[which]
        return {"type": cls.__struct_config__.tag, **_read(getattr(envelope, which), cls)}

    def event_payload(self, message: dict) -> bytes:
        """A layer message's event or push for this codec, from its MessagePack
        form (made once per event and worker, kept in the message by the caller)."""
        from realtime.protocol.codecs import MSGPACK

        data = msgspec.msgpack.decode(message[MSGPACK.name])
        return self.encode(data)


PROTOBUF = ProtobufCodec()
