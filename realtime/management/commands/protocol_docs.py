"""Write docs/protocol.md and static/realtime/codes.js from the declarations in
realtime/protocol/ (the one source of frames, error codes and close codes)."""

import json
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand

from realtime import protocol

CLOSE_MEANING = {
    protocol.CloseCode.NORMAL: "normal close",
    protocol.CloseCode.NOT_AUTHENTICATED: "not signed in, or the session ended (logout in another tab, password change, deactivation, expiry), or the socket's token was refused or expired without an `auth.refresh`: do not retry, log in (or get a fresh token)",
    protocol.CloseCode.FORBIDDEN: "disconnected by an operator (the realtime console): do not retry by itself; offer the person a reconnect",
    protocol.CloseCode.POLICY: "policy: too many sockets for this user (REALTIME_MAX_CONNECTIONS_PER_USER), or silent past REALTIME_IDLE_TIMEOUT. Reconnect with backoff",
    protocol.CloseCode.INTERNAL: "internal error: reconnect with backoff",
    protocol.CloseCode.SERVICE_RESTART: (
        "service restart (a drain): reconnect now. The reason `spread_ms=N` asks for the socket back within N ms: wait a "
        "moment drawn uniformly in [0, N] (N at most 30,000), then resume with `since`. Without it, wait 100 to 1,000 ms"),
    protocol.CloseCode.OVERLOADED: (
        "overloaded: reconnect with backoff. The worker could not take the socket (its broker or ticket store unreachable), "
        "or more than REALTIME_MAX_SEND_BUFFER waited unsent: a client that stopped reading, or a replay "
        "larger than that (every event before the close is whole: resume from the last one)"),
    protocol.CloseCode.RATE_LIMITED: "rate-limited: too many refused frames in a row, too many frames waiting, or too many sockets opened (per user or per client address). The `error` frame before the close says `retry_after`: wait that long",
    protocol.CloseCode.PROTOCOL_VIOLATION: "protocol violation",
}

ERROR_MEANING = {  # the HTTP status of each comes from protocol.HTTP_STATUS
    protocol.ErrorCode.INVALID: "malformed frame, missing or wrongly typed field, bad value, empty body",
    protocol.ErrorCode.UNKNOWN_TYPE: "`type` names no client frame",
    protocol.ErrorCode.FORBIDDEN: "the policy refuses this action, in a room the user can see; nothing changed",
    protocol.ErrorCode.NOT_FOUND: "no such room or message. A room the user may not see gets exactly this answer (`no such room`), so a private room cannot be told from a missing one; a deleted message is not found",
    protocol.ErrorCode.RATE_LIMITED: "too many of this action (a bucket per user and action; pings are counted by each worker on its own), or, on `subscribe` and REST history and event pages, the user's replay budget is in debt; retry after `retry_after` seconds. Also the `error` before a 4029 close of a socket opened too often",
    protocol.ErrorCode.TOO_LARGE: "a body, room name or topic over its length limit, too many rooms on one connection, or too many people for a direct message",
    protocol.ErrorCode.CONFLICT: "the request contradicts the state: the client_id was already used for a message in another room; a room you can see has that name; the person is a member already; the room's last owner would leave or stop being an owner; a `reaction.add` of a new emoji to a message that has 20 different ones already",
    protocol.ErrorCode.RECOVERY_FAILED: "`since` is ahead of the log, outside the replay window or of an epoch the log no longer has: reload history",
    protocol.ErrorCode.INTERNAL: "a server fault; nothing was changed",
}

INTRO = """\
# Protocol v1

Generated from `realtime/protocol/` by `python manage.py protocol_docs`; do not edit
by hand (a test fails when this file and the declarations disagree).

## Transport

- One WebSocket per client at `{path}`, same origin as the pages; signed in by the
  Django session cookie.
- Subprotocol `{json}` (JSON in text frames), `{msgpack}` (MessagePack in binary
  frames) or `rt.v1.protobuf` (Protocol Buffers in binary frames: one `Frame` of
  [protocol.proto](protocol.proto) each, its `oneof` naming the frame type, made from
  the same declarations); all carry the same schemas, and a frame one of them
  refuses gets the same error from the others. A client that offers none of them
  is refused at the handshake (HTTP 403); one that offers no subprotocol gets JSON.
- Anonymous sockets are accepted and then closed with 4001, so a browser can tell why.
- A client without a session (a service, a bot, a mobile app) may sign in with a JWT
  where the server is configured for it (REALTIME_JWT_KEYS): `Authorization: Bearer
  <token>` on the upgrade, or `?access_token=<token>` when it cannot set headers.
  The token names its key (`kid`), the user (`sub`, the user's id), the audience and
  issuer the server expects, and expires (`exp`) within minutes. A token refused for
  any reason (malformed, expired, wrong audience or issuer, an algorithm other than
  its key's, an unknown `kid`) gives 4001. The socket lives until `exp`: send
  `auth.refresh` with a fresh token before then (answered with `AuthAck` and the new
  `exp`, or `error` `invalid` for a token refused, `forbidden` for another user's),
  or the socket is closed with 4001 at `exp`.
- A socket opened too often (per user, or per client address) is accepted, sent
  `{{"type": "error", "code": "rate_limited", "retry_after": S}}` and closed with 4029:
  wait S seconds before the next attempt. The limits fit every socket of a user
  coming back at once after a 4012 (a drain or a restart).
- Any path other than `{path}` is refused at the handshake (HTTP 404 under our
  daphne launcher, 403 under other ASGI servers).
- A replay (`subscribe` with `since`, REST history and event pages) costs bytes
  from a budget per user; in debt, `subscribe` answers `rate_limited` with
  `retry_after` and the client subscribes again after it (`since` unchanged).
- Every frame is an object whose `type` names its schema; unknown fields are refused.
- A request may carry `ref` (a string of at most 64 characters, or an integer); each
  request gets exactly one reply (`ack`, `error`, `pong` or `presence.page`) carrying the same `ref`.
  A frame too broken to read a `ref` from gets an `error` without one.
- Replies come in the order the requests were sent. A client may pipeline requests
  (several `message.send`s in flight, within its rate limit): the server handles
  those already waiting together, each with its own checks, seq and reply.
- A bad frame never closes the socket: it is answered with `error` and nothing
  is stored or broadcast.

## Delivery

Every room event has the room's `seq`, gap-free and assigned on write. Subscribe with
the last seq you applied as `since`: the server first sends every event after it, in
order, then the `ack` (its `seq` is the last seq sent), then live events. The server
never sends a seq twice on one subscription and repairs gaps in its live stream from
the log. Drop any event with a seq you have; on a gap, subscribe again with `since`.
`since` ahead of the head, or more events back than the replay window (REALTIME_REPLAY_MAX,
default 1000),
is `recovery_failed`: reload the room through `GET /api/v1/rooms/<slug>/messages/`
and subscribe with the `seq` it returns. Subscribing without `since` goes live from the
current head with no replay.

Seqs count within the room log's `epoch` (the `ack`, history and event pages carry
it). Resume with both, `since` and `epoch`: if the log was started again since (the
database restored from a backup and `manage.py reset_epoch` run, or the room deleted
and made anew), the answer is `recovery_failed` and you reload, instead of resuming
into another history from the same number. A socket following a room whose log is
started again gets an `error` `recovery_failed` with the room, and is no longer
subscribed to it. Without `epoch`, `since` is taken as it is.

Every subscribed connection receives the room's events, the sender's own included.

`message.send` is idempotent per user and `client_id`: a repeat writes nothing and
returns the original ack, and the original event is published again (the first
publication may never have left; subscribers that have it drop it by seq). The same
`client_id` in another room is `conflict`.

## Reactions and mentions

`reaction.add` / `reaction.remove` `{{"room", "id", "emoji"}}` react to a live message
(those who may post: not readers; staff where they may post), or take one's own
reaction back. One reaction per user, message and emoji: adding one you have, or
removing one you do not, is acknowledged without `seq` and changes nothing (no
event). An emoji is 1 to 32 characters (after NFC normalisation) with no whitespace,
control or invisible formatting characters (the zero-width joiner and the tag
characters of flags excepted): `invalid` otherwise. A message holds at most 20
different emoji (`conflict` for a 21st). A deleted message, or one in another room,
is `not_found`; in a room the user may only read, `forbidden`; in a room they cannot
see, `not_found` ("no such room"). Each change is a room event with a seq,
`reaction.added` / `reaction.removed` `{{"id", "emoji", "user"}}`: a delta, one person's
reaction; history pages give each message's `reactions` whole, `{{emoji: [usernames]}}`.
A deleted message's reactions go with it: `message.deleted` implies them, with no
`reaction.removed` each, and a client ignores reaction events for a message it does
not hold (a replay may bring them for one deleted since).

`@name` in a body is resolved by the server when the message is sent or edited:
`@` at the start or after a character that is not a letter, digit, `_` or `@`
(`bob@example.com` names no one), then a username (letters, digits, `_`, and `.`,
`+`, `-` inside it: `@bob.` names bob), compared without case; the first 20 names
are looked up. It names an active user who may see the room, never the author;
anyone else is left out and learns nothing. `message.new` and `message.edited`
carry `mentions` (their usernames, in the order the body names them; absent when
none, and an edit's list replaces the message's). `GET rooms/` counts, per room, the
messages after the user's read position that mention them (`mentions`); reading
(`read`, `POST rooms/<slug>/read/`) clears them.
"""

REST = """\
## REST API (`/api/v1/`, session-authenticated; anonymous requests get 403)

| Method and path | Answer |
| --- | --- |
| `GET rooms/` | `{{"rooms": [{{"slug", "title", "kind", "topic", "is_public", "role", "seq", "read", "unread", "mentions"}}]}}`: the rooms the user may see (`kind` `room` or `dm`: list DMs apart; a DM's `title` is the other people's names, as the asker sees it; `role` null when not a member; `seq` the room's head; `read` how far the user has read; `unread` messages by others after that; `mentions` those of them that mention the user). DMs are listed to their people only, staff included |
| `GET rooms/?browse=public` | the same shape: the public rooms (kind `room`) the user is not a member of, the ones to offer for joining. Any other `browse` is 400 `invalid` |
| `POST rooms/` `{{"name", "visibility": "public"\\|"private", "topic"?}}` | 201 with the room as `GET rooms/` lists it (`role` `owner`): the maker is its owner, and its log starts with `member.joined`. `slug` is made from the name ("Team Alpha!" -> `team-alpha`; taken: `team-alpha-2`, ...; no Latin letter or digit: `room`). The name is plain text, 1 to 80 characters once spaces are collapsed, with a letter or digit, no `<` or `>`, no control or invisible format characters (400 `invalid`; over 80: 413 `too_large`); the same name (any case) as a room the user can see is 409 `conflict` (rooms they cannot see do not count); the topic at most 250 (413). Rate-limited per user (`room.create`, one a minute, burst 10: 429 with `Retry-After`) |
| `POST rooms/<slug>/join/` | `{{"room", "user", "role", "seq"}}`: join a public room as a member (`seq` the `member.joined` event's). Already a member: 200, nothing changes, `seq` null. A private room one can see: 403; one one cannot: 404 as a missing room; a DM: 403 |
| `POST rooms/<slug>/leave/` | `{{"room", "user", "role": null, "seq"}}`: leave (`member.left`). Not a member: 200, `seq` null. The last owner: 409 `conflict` (make someone else an owner first). A DM: 403 |
| `GET rooms/<slug>/members/` | `{{"room", "kind", "members": [{{"user", "role", "joined_at"}}]}}`, by name: for anyone who may see the room |
| `POST rooms/<slug>/members/` `{{"username", "role"?}}` | 201 `{{"room", "user", "role", "seq"}}`: add someone (`member.joined` with `by`). Owners and moderators add members and readers; only owners add owners and moderators (else 403). Unknown or deactivated user: 404 `no such user: NAME`; a member already: 409. A DM: 403 |
| `PATCH rooms/<slug>/members/<username>/` `{{"role"}}` | `{{"room", "user", "role", "seq"}}` (`member.role`): owners and moderators switch members and readers; only owners give, take or change the owner and moderator roles. The same role: 200, `seq` null. Not a member: 404; the last owner's own demotion: 409 |
| `DELETE rooms/<slug>/members/<username>/` | `{{"room", "user", "role": null, "seq"}}` (`member.left` with `by`): the same who-may as PATCH (moderators remove members and readers, owners anyone). One's own name: leave. Not a member: 404. The removed person's sockets and long polls lose a private room at once (`error` `not_found`) |
| `POST dms/` `{{"users": ["bob", ...]}}` | the one direct message (a private room of kind `dm`) of exactly these people and the asker, as `GET rooms/` lists it: 201 when made now (its log starts with a `member.joined` for each), 200 when it existed (any order of names gives the same room). Everyone in it is a member; nobody joins, leaves or is added (403). At most 8 people, the asker included (413 `too_large`); a name twice, or nobody but oneself: 400 `invalid`; an unknown or deactivated user: 404 `no such user: NAME`; nothing is made on any error. Rate-limited (`dm.open`, one every 2 s, burst 20) |
| `GET rooms/<slug>/events/?since=N[&epoch=E][&limit=L]` | `{{"events": [...], "seq": head, "epoch": E, "has_more": bool}}`: the room's events after N (at most L, default 500), the same shapes as the socket's room events; when `has_more`, ask again with `since` = the last event's seq. With `epoch` (the one N counts in), a log started again is 410 `recovery_failed` |
| `GET rooms/<slug>/events/?since=N&wait=S` | the long poll (the fallback when WebSockets are blocked): the same answer (and `epoch` checked the same way), but held until the room has an event after N, its log is started again (410), or S seconds pass (at most 30; then `events` is empty). Rate-limited per user (`poll`, 5/s, burst 20: 429); anonymous: 401 |
| `GET rooms/<slug>/events/?since=N&wait=S&client=C[&presence_tag=T]` | the long poll of a page that shows presence, typing and read markers. `C` is the page's poll id (8 to 64 letters, digits, `-`, `_`; random, the same for all its polls): while it polls, the page is present in the room like a subscribed socket (a lease of S + 10 s that each poll renews; hanging up a held poll, or losing the room, leaves at once, after the usual 2.5 s grace). The answer adds `"ephemeral": [frames]`, the socket's pushes for the room (`presence.state`, `read.markers`, `typing`, `read.marker`; never the poller's own typing or reads), and `"presence_tag"`: send it back as `presence_tag`. Without T (the first poll) it answers at once with `presence.state` and, in rooms that show read markers, `read.markers`; after that `presence.state` comes again whenever who is here no longer matches T. Typing and read markers that arrive while the poll is held, or between two polls of the page (kept 5 s), are collected (the newest per person, at most 50) and answered 0.5 s after the first of them, so a typing storm costs one answer per 0.5 s; an event answers at once, with whatever is collected. Access is checked by every poll's log read before anything is handed over. A bad C or T: 400 `invalid` |
| `GET rooms/<slug>/messages/?[before=SEQ][&limit=L]` | `{{"room", "seq", "epoch", "has_more", "messages": [{{"id", "seq", "author", "body", "client_id", "ts", "edited_at", "reactions", "mentions"}}]}}`: a page of messages, newest last (L at most REALTIME_HISTORY_PAGE_MAX, default 200); `seq` is the head the page is current to; `reactions` is `{{emoji: [usernames]}}` (emoji in the order first used, people in the order they reacted; `{{}}` when none), `mentions` the usernames the body names (`[]` when none) |
| `POST rooms/<slug>/messages/` `{{"body", "client_id"}}` | `{{"room", "id", "seq"}}`: the same as `message.send`'s ack, with the same idempotency and rate limit (429 with `Retry-After`) |
| `PATCH rooms/<slug>/messages/<id>/` `{{"body"}}` | `{{"room", "id", "seq"}}`: `message.edit` over HTTP, same rules, rate limit and ack |
| `DELETE rooms/<slug>/messages/<id>/` | `{{"room", "id", "seq"}}`: `message.delete` over HTTP |
| `POST rooms/<slug>/messages/<id>/reactions/` `{{"emoji"}}` | `{{"room", "id", "emoji"[, "seq"]}}`: `reaction.add` over HTTP, same rules, rate limit and ack (`seq` absent when the reaction was there already) |
| `DELETE rooms/<slug>/messages/<id>/reactions/` `{{"emoji"}}` | `{{"room", "id", "emoji"[, "seq"]}}`: `reaction.remove` over HTTP (the emoji in a JSON body, as for POST; `seq` absent when there was none to remove) |
| `POST rooms/<slug>/read/` `{{"seq"}}` | `{{"room", "seq"}}`: `read` over HTTP (forward only, clamped to the head) |
| `POST rooms/<slug>/typing/` | `{{"room", "sent"}}`: `typing` over HTTP (the long-polling fallback): only those who may post (403 `forbidden`), the same bucket (`typing`, 429) and the same throttle (`sent` false: a notice of yours went out less than 2 s ago). Socket subscribers and polling pages of the room get `typing`, the typist's own pages do not |
| `POST rooms/<slug>/presence/leave/` `{{"client": C}}` | 204: the polling page C is going (the page sends it as it unloads, with `keepalive`, and when it goes back to a socket): it leaves the room's presence now, after the usual 2.5 s grace, instead of when its lease runs out (its last poll may not be held at that moment, so no hang-up would tell). Only the asker's own page can be named; a page that was not there changes nothing. A bad C: 400 `invalid`; the `poll` bucket (429) |
| `GET search/?q=Q[&room=SLUG][&before=ID][&limit=L]` | `{{"results": [{{"room", "id", "seq", "author", "ts", "snippet": [{{"text", "match"}}]}}], "next": ID or null}}`: messages matching Q in the rooms the user may read now (public rooms, their memberships; every room for staff), newest first, deleted ones never; L at most 50 (default 20); the next page is `before` = `next`. `snippet` is the body around its first match in parts, `match` true on a word of the query (text, never markup). Q is words, `"a phrase"`, `-word`, `or` (PostgreSQL's websearch syntax; other punctuation is ignored); empty, without a word, with control characters or over 200 characters: 400 `invalid`. A `room` the user may not see: 404. Rate-limited per user (`search`, 1/s, burst 10: 429 with `Retry-After`) |
| `GET people/?q=PREFIX` | `{{"people": [USERNAME, ...]}}`: active people whose username starts with PREFIX (any case; a leading `@` ignored), never the asker, at most 8 in name order (the page's DM and "Add someone" pickers). PREFIX empty, over 150 characters or with control characters: 400 `invalid` (costs no token). Rate-limited per user (`people`, 5/s, burst 30) |
| `GET schema/`, `GET docs/` | the OpenAPI 3.1 schema of these endpoints (drf-spectacular; open to anyone), and Swagger UI over it |
| `POST tickets/` | 201 `{{"ticket", "expires_in": 30}}`: a single-use ticket for `/ws/v1/?ticket=...` (for clients that cannot send the session cookie; they must still send an allowed `Origin`) |

Errors answer `{{"code", "message"[, "retry_after"]}}` with the status in the error table; so do DRF's own
refusals (not signed in or CSRF: 403 `forbidden`; a method not allowed: 405 `invalid`) and any other path
under `/api/v1/` (404 `not_found`).

Rooms and membership: every change of who is in a room is a room event with a seq
(`member.joined`, `member.left`, `member.role`; `by` names who made it when it was
not the member), so subscribers see it live and a resume or an event page replays it.
A member removed from a private room (or who left it) gets, on every socket following
it, `error` `not_found` with the room before anything more of it, and that
subscription ends; their held long poll answers 404. Join, leave and the members
writes share one bucket per user (`member.change`, 1/s, burst 30). Room kinds: `room`
(made with `POST rooms/`) and `dm` (`POST dms/`): a DM is seen by its people only,
staff included, and its people are fixed.
"""


def _schema_block(name: str, schema: dict) -> str:
    doc = schema.get("description", "")
    body = json.dumps(schema, indent=2, sort_keys=True)
    return f"### `{name}`\n\n{doc}\n\n```json\n{body}\n```\n" if doc else f"### `{name}`\n\n```json\n{body}\n```\n"


def _fields(schema: dict) -> str:
    required = set(schema.get("required", []))
    parts = []
    for field in schema["properties"]:
        if field == "type":
            continue
        parts.append(field if field in required else f"{field}?")
    return ", ".join(parts)


def render() -> str:
    schemas = protocol.json_schemas()
    out = [
        INTRO.format(
            path=protocol.PATH,
            json=protocol.SUBPROTOCOL_JSON,
            msgpack=protocol.SUBPROTOCOL_MSGPACK,
        )
    ]
    sections = [
        ("Client to server", protocol.CLIENT_FRAMES),
        ("Server to client: replies", protocol.REPLIES),
        ("Server to client: room events", protocol.ROOM_EVENTS),
        ("Server to client: pushes (no seq, not stored)", protocol.PUSHES),
    ]
    out.append("## Frames at a glance\n")
    out.append("| Frame | `type` | Fields (`?` optional) |\n| --- | --- | --- |")
    for _, classes in sections:
        for cls in classes:
            out.append(f"| `{cls.__name__}` | `{cls.__struct_config__.tag}` | {_fields(schemas[cls.__name__])} |")
    out.append("")
    out.append("Which `ack` answers which request: `subscribe` -> `SubscribeAck`; `unsubscribe` -> "
               "`UnsubscribeAck`; `message.send`, `message.edit`, `message.delete` -> `MessageAck`; "
               "`reaction.add`, `reaction.remove` -> `ReactionAck`; `ping` -> `Pong`; `metrics.subscribe`, `metrics.unsubscribe` -> `MetricsAck`; `auth.refresh` -> `AuthAck`. Every client frame "
               "may carry `trace` (letters, digits, dashes; at most 64): the action's trace id, which the "
               "events it causes carry to every delivery and log line.\n")
    out.append("## Error codes\n\n| code | HTTP | meaning |\n| --- | --- | --- |")
    for code, meaning in ERROR_MEANING.items():
        out.append(f"| `{code}` | {protocol.HTTP_STATUS[code]} | {meaning} |")
    out.append("")
    out.append("## Close codes\n\n| code | meaning |\n| --- | --- |")
    for code, meaning in CLOSE_MEANING.items():
        out.append(f"| {int(code)} | {meaning} |")
    out.append(
        "| 1001, 1006, 1009, 1011 | sent by the server or a proxy itself: going away, no close frame, "
        "frame too large, server error. Reconnect with backoff |\n"
        "| 1012, 1013 | treat like 4012 and 4013 |\n\n"
        "Browser code imports every code from `static/realtime/codes.js`, generated from the same declarations.\n"
    )
    out.append(REST.format())
    for title, classes in sections:
        out.append(f"## {title}\n")
        for cls in classes:
            out.append(_schema_block(cls.__name__, schemas[cls.__name__]))
    out.append(_schema_block("WorkerFigures", schemas["WorkerFigures"]))
    out.append("## REST bodies\n")
    for cls in protocol.REST_BODIES:
        out.append(_schema_block(cls.__name__, schemas[cls.__name__]))
    return "\n".join(out).rstrip() + "\n"


def render_js() -> str:
    """static/realtime/codes.js: the close and error codes for the browser client."""
    def block(name: str, pairs: list[tuple[str, object]]) -> str:
        rows = "\n".join(f"  {key}: {json.dumps(value)}," for key, value in pairs)
        return f"export const {name} = Object.freeze({{\n{rows}\n}});\n"

    close = [(c.name, int(c)) for c in protocol.CloseCode] + [(c.name, int(c)) for c in protocol.TransportCode]
    errors = [(c.name, str(c)) for c in protocol.ErrorCode]
    return (
        "// Generated from realtime/protocol/codes.py by `python manage.py protocol_docs`; do not edit.\n"
        "// A test fails when it differs from what the protocol declares.\n\n"
        "// Close codes: the app's (4000s) and those the server or a proxy sends by itself.\n"
        + block("Close", close) + "\n// The `code` of an `error` frame.\n" + block("ErrorCode", errors)
        + "\n// A 4012's reason `spread_ms=N`: come back within N ms (at most the MAX_MS).\n"
        + block("RestartSpread", [("KEY", protocol.RESTART_SPREAD), ("MAX_MS", protocol.RESTART_SPREAD_MAX_MS)])
    )


def render_proto() -> str:
    from realtime.protocol import proto

    return proto.render()


DOCS = ("docs/protocol.md", render), ("static/realtime/codes.js", render_js), ("docs/protocol.proto", render_proto)


class Command(BaseCommand):
    help = "Write docs/protocol.md, docs/protocol.proto and static/realtime/codes.js from realtime/protocol/."

    def handle(self, *args, **options):
        for path, make in DOCS:
            target = Path(settings.BASE_DIR) / path
            target.write_text(make())
            self.stdout.write(f"wrote {path}")
