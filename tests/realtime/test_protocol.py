"""Protocol declarations: decoding, error classification, and the generated docs."""

from pathlib import Path

import msgspec
import pytest

from realtime import protocol
from realtime.management.commands.protocol_docs import render

DOCS = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"


def test_every_client_frame_has_a_unique_type():
    assert len(protocol.CLIENT_TYPES) == len(protocol.CLIENT_FRAMES)
    assert set(protocol.CLIENT_TYPES) == {"subscribe", "unsubscribe", "message.send", "message.edit", "message.delete", "ping",
                                          "typing", "read", "metrics.subscribe", "metrics.unsubscribe",
                                          "reaction.add", "reaction.remove", "presence.list", "auth.refresh"}


@pytest.mark.parametrize("codec", [protocol.JSON, protocol.MSGPACK])
def test_codecs_roundtrip_a_request(codec):
    frame = protocol.MessageSend(room="general", body="hi", client_id="c-1", ref="r")
    assert codec.decode(codec.encode(frame)) == frame


def test_unknown_fields_are_refused_with_the_ref():
    with pytest.raises(protocol.ProtocolError) as err:
        protocol.JSON.decode(b'{"type": "unsubscribe", "room": "general", "admin": true, "ref": 1}')
    assert err.value.code == "invalid" and err.value.ref == 1 and "admin" in err.value.message


def test_an_oversized_ref_is_not_echoed():
    with pytest.raises(protocol.ProtocolError) as err:
        protocol.JSON.decode(b'{"type": "nope", "ref": "' + b"x" * 65 + b'"}')
    assert err.value.code == "unknown_type" and err.value.ref is None


def test_deeply_nested_json_is_invalid_not_a_crash():
    with pytest.raises(protocol.ProtocolError) as err:
        protocol.JSON.decode(b"[" * 100_000 + b"]" * 100_000)
    assert err.value.code == "invalid"


def test_event_roundtrip_through_its_stored_form():
    event = protocol.event_from_dict(
        {"type": "message.edited", "room": "general", "seq": 4, "id": 2, "body": "b", "edited_at": "2026-01-01T00:00:00Z"}
    )
    assert isinstance(event, protocol.MessageEdited)
    assert protocol.event_to_dict(event)["edited_at"] == "2026-01-01T00:00:00Z"


def test_close_codes_are_in_the_range_daphne_can_send():
    for code in protocol.CloseCode:
        assert code == 1000 or 3000 <= code <= 4999


def test_json_schema_forbids_extra_fields():
    schemas = protocol.json_schemas()
    assert schemas["MessageSend"]["additionalProperties"] is False
    assert schemas["MessageSend"]["required"] == ["type", "room", "body", "client_id"]


def test_protocol_docs_are_generated_from_the_schemas():
    assert DOCS.read_text() == render(), "docs/protocol.md is stale: run `python manage.py protocol_docs`"


def test_msgspec_rejects_bool_as_int():
    with pytest.raises(protocol.ProtocolError):
        protocol.JSON.decode(b'{"type": "subscribe", "room": "general", "since": true}')
    assert msgspec.json.decode(b"1") == 1


def test_the_browser_codes_are_the_protocols():
    """static/realtime/codes.js is generated from realtime/protocol/codes.py (make docs)."""
    from pathlib import Path

    from realtime.management.commands.protocol_docs import render_js

    codes = Path(__file__).resolve().parents[2] / "static" / "realtime" / "codes.js"
    assert codes.read_text() == render_js(), "static/realtime/codes.js is stale: run `python manage.py protocol_docs`"
    assert "RATE_LIMITED: 4029," in codes.read_text() and 'NOT_FOUND: "not_found",' in codes.read_text()


def test_the_protobuf_schema_is_generated_from_the_declarations():
    """docs/protocol.proto is made from frames.py (protocol/proto.py), like protocol.md."""
    from realtime.protocol import proto

    path = DOCS.with_name("protocol.proto")
    assert path.read_text() == proto.render(), "docs/protocol.proto is stale: run `python manage.py protocol_docs`"
