"""The REST API's shapes for its OpenAPI schema (drf-spectacular; /api/v1/schema/).

Each view in views.py carries its own `@extend_schema(...)` built from these, so an
endpoint's description sits beside its code. What a client sends, and the room
events it reads, are declared once in realtime/protocol (msgspec Structs): their
JSON Schema is taken from there (added to the document by the hook
`add_protocol_components`) and referred to by name, so a field
added to a frame reaches the schema without a second declaration. The answers
built here in Python (pages, acks) are described by the documentation-only
serializers below; the schemathesis fuzz (tests/realtime/test_openapi.py) fails
when an answer leaves them.

Every error, from the actions or from DRF itself (not signed in, CSRF, a method
not allowed), is the body `Error` (views.ActionView.handle_exception).
"""

from __future__ import annotations

import msgspec
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse
from rest_framework import serializers

from realtime import protocol
from realtime.domain import search, selectors
from realtime.protocol import ErrorCode


def _from_protocol() -> tuple[dict, dict]:
    (*_, event), components = msgspec.json.schema_components(
        [*protocol.REST_BODIES, protocol.ServerEvent],
        ref_template="#/components/schemas/{name}",
    )
    return event, components


# A room event (any of protocol.ROOM_EVENTS, told apart by `type`), and the
# components its schema and the request bodies' refer to.
EVENT, COMPONENTS = _from_protocol()


def add_protocol_components(result, generator, request, public):
    """A drf-spectacular postprocessing hook (SPECTACULAR_SETTINGS)."""
    result.setdefault("components", {}).setdefault("schemas", {}).update(COMPONENTS)
    return result


def ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


class Error(serializers.Serializer):
    code = serializers.ChoiceField(choices=[c.value for c in ErrorCode])
    message = serializers.CharField()
    retry_after = serializers.FloatField(required=False, help_text="seconds to wait (with Retry-After), on 429 and 503")


WHY = {
    400: "invalid: a malformed parameter or body",
    401: "not signed in",
    403: "not signed in, CSRF refused, or the room's policy refuses the action (forbidden)",
    404: "no such room or message (a private room the user may not see is none)",
    405: "method not allowed",
    409: "conflict: the request contradicts the state (a client_id used in another room, a room name taken, "
         "a member already, the last owner leaving, a 21st emoji)",
    410: "recovery_failed: `since` is outside the log or of another epoch; reload history",
    413: "too_large: a body, room name or topic over its limit, or too many people for a DM",
    415: "unsupported media type: send application/json",
    429: "rate_limited: wait retry_after seconds (Retry-After)",
    503: "a dependency (Redis) is unavailable; try again after retry_after seconds",
}


def errors(*statuses: int) -> dict:
    """The Error response for each status, plus the ones every endpoint may give."""
    return {status: OpenApiResponse(Error, description=WHY[status]) for status in sorted({400, 403, *statuses})}


# ---------------------------------------------------------------------------
# Answers
# ---------------------------------------------------------------------------
class Room(serializers.Serializer):
    slug = serializers.CharField()
    title = serializers.CharField(help_text="a DM's: the other people's names")
    kind = serializers.ChoiceField(choices=["room", "dm"])
    topic = serializers.CharField(allow_blank=True)
    is_public = serializers.BooleanField()
    role = serializers.ChoiceField(choices=["owner", "moderator", "member", "reader"], allow_null=True)
    seq = serializers.IntegerField(help_text="the room's head in its log")
    read = serializers.IntegerField(help_text="the seq this user has read to")
    unread = serializers.IntegerField(help_text="messages by others after `read`")
    mentions = serializers.IntegerField(help_text="of those, the ones that mention the user")


class RoomList(serializers.Serializer):
    rooms = Room(many=True)


class Message(serializers.Serializer):
    id = serializers.IntegerField()
    seq = serializers.IntegerField()
    author = serializers.CharField()
    body = serializers.CharField(allow_blank=True)
    client_id = serializers.CharField()
    ts = serializers.DateTimeField()
    edited_at = serializers.DateTimeField(allow_null=True)
    reactions = serializers.DictField(child=serializers.ListField(child=serializers.CharField()),
                                      help_text="emoji -> the usernames that reacted with it")
    mentions = serializers.ListField(child=serializers.CharField(), help_text="usernames the body mentions")


class MessagePage(serializers.Serializer):
    room = serializers.CharField()
    seq = serializers.IntegerField(help_text="the room's head this page is current to")
    epoch = serializers.CharField()
    has_more = serializers.BooleanField(help_text="older messages exist: ask with before=<first seq>")
    messages = Message(many=True, help_text="oldest first")


EVENT_PAGE = {
    "type": "object",
    "properties": {
        "events": {"type": "array", "items": EVENT, "description": "room events in seq order"},
        "seq": {"type": "integer", "description": "the room's head in the log `epoch`"},
        "epoch": {"type": "string"},
        "has_more": {"type": "boolean", "description": "ask again with since=<last event's seq>"},
        "ephemeral": {"type": "array", "description": "a long poll with `client` only: the room's pushes, as the "
                      "socket gets them (presence.state when `presence_tag` is not the room's, read.markers on a "
                      "first poll, then typing and read.marker frames)",
                      "items": {"type": "object", "properties": {"type": {"type": "string"}, "room": {"type": "string"}},
                                "required": ["type", "room"]}},
        "presence_tag": {"type": "string", "description": "a long poll with `client` only: send it back as "
                         "`presence_tag` in the next poll"},
    },
    "required": ["events", "seq", "epoch", "has_more"],
}


class Ack(serializers.Serializer):
    room = serializers.CharField()
    id = serializers.IntegerField()
    seq = serializers.IntegerField()


class ReactionAck(serializers.Serializer):
    room = serializers.CharField()
    id = serializers.IntegerField()
    emoji = serializers.CharField()
    seq = serializers.IntegerField(required=False, help_text="absent when nothing changed (already so)")


class Membership(serializers.Serializer):
    room = serializers.CharField()
    user = serializers.CharField()
    role = serializers.ChoiceField(choices=["owner", "moderator", "member", "reader"], allow_null=True)
    seq = serializers.IntegerField(allow_null=True, help_text="the member.* event's; null when nothing changed")


class Member(serializers.Serializer):
    user = serializers.CharField()
    role = serializers.ChoiceField(choices=["owner", "moderator", "member", "reader"])
    joined_at = serializers.DateTimeField()


class MemberList(serializers.Serializer):
    room = serializers.CharField()
    kind = serializers.ChoiceField(choices=["room", "dm"])
    members = Member(many=True)


class ReadAck(serializers.Serializer):
    room = serializers.CharField()
    seq = serializers.IntegerField()


class TypingAck(serializers.Serializer):
    room = serializers.CharField()
    sent = serializers.BooleanField(help_text="false: a notice of yours went out less than 2 s ago (nothing sent)")


class Ticket(serializers.Serializer):
    ticket = serializers.CharField()
    expires_in = serializers.IntegerField(help_text="seconds")


class SnippetPart(serializers.Serializer):
    text = serializers.CharField()
    match = serializers.BooleanField(help_text="a word of the query: show it highlighted")


class SearchResult(serializers.Serializer):
    room = serializers.CharField()
    id = serializers.IntegerField()
    seq = serializers.IntegerField()
    author = serializers.CharField()
    ts = serializers.DateTimeField()
    snippet = SnippetPart(many=True, help_text="the body around its first match, in parts (text, never markup)")


class SearchPage(serializers.Serializer):
    results = SearchResult(many=True, help_text="newest first")
    next = serializers.IntegerField(allow_null=True, help_text="the `before` of the next page; null on the last")


class PeoplePage(serializers.Serializer):
    people = serializers.ListField(child=serializers.CharField(), help_text=(
        f"usernames in name order, at most {selectors.PEOPLE_MAX}, never the asker's"))


# ---------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------
def integer(name: str, description: str, minimum: int = 0, maximum: int | None = None) -> OpenApiParameter:
    schema = {"type": "integer", "minimum": minimum, "maximum": maximum or 2**53}
    return OpenApiParameter(name, {**schema}, OpenApiParameter.QUERY, description=description)


SLUG = OpenApiParameter("slug", {"type": "string", "pattern": r"^[-a-zA-Z0-9_]+$"}, OpenApiParameter.PATH,
                        description="the room's slug")
USERNAME = OpenApiParameter("username", {"type": "string"}, OpenApiParameter.PATH, description="a member's username")
BROWSE = OpenApiParameter("browse", {"type": "string", "enum": ["public"]}, OpenApiParameter.QUERY,
                          description="public: the public rooms the user is not in")
MESSAGE_ID = OpenApiParameter("message_id", {"type": "integer", "minimum": 0}, OpenApiParameter.PATH)
CLIENT = OpenApiParameter("client", {"type": "string", "pattern": protocol.POLL_CLIENT_PATTERN}, OpenApiParameter.QUERY,
                          description="with wait: the page's poll id; the page is present in the room while it "
                                      "polls, and the answer carries `ephemeral` and `presence_tag`")
PRESENCE_TAG = OpenApiParameter("presence_tag", {"type": "string", "pattern": "^[0-9a-f]{1,32}$"},
                                OpenApiParameter.QUERY,
                                description="with client: the `presence_tag` of the previous answer (absent: the "
                                            "first poll, answered at once with the room's presence and read markers)")
EPOCH = OpenApiParameter("epoch", {"type": "string", "pattern": "^[A-Za-z0-9]{1,16}$"}, OpenApiParameter.QUERY,
                         description="the epoch `since` counts in (a different one: 410)")
PEOPLE = [
    OpenApiParameter("q", {"type": "string", "minLength": 1, "maxLength": selectors.PEOPLE_PREFIX_MAX},
                     OpenApiParameter.QUERY, required=True,
                     description="the start of a username, any case (a leading @ is ignored)"),
]
SEARCH = [
    OpenApiParameter("q", {"type": "string", "minLength": 1, "maxLength": search.MAX_QUERY_LENGTH},
                     OpenApiParameter.QUERY, required=True,
                     description="words to find; \"a phrase\", -word and `or` work (websearch syntax)"),
    OpenApiParameter("room", str, OpenApiParameter.QUERY, description="only this room"),
    integer("before", "the `next` of the previous page", minimum=1),
    integer("limit", f"results a page (default {search.DEFAULT_PAGE}, at most {search.MAX_PAGE})", minimum=1),
]
