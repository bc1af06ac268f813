"""Message search: what a user may read now that matches a query, newest first.

Visibility is part of the query itself, not a filter applied to its results: the
rows come from `readable_rooms(user)` (public rooms, the user's memberships, every
room for staff: the policy's VIEW rule written as SQL), so a private room's text
never leaves the database for a non-member, and a member removed a moment ago
loses it on their next search. Deleted messages (their row stays, without a body)
never match.

PostgreSQL: full-text search over `to_tsvector('simple', body)`, served by the GIN
expression index of migration 0007 (the expression here must stay exactly the
index's, or the planner cannot use it). The 'simple' configuration lowercases and
splits words but neither stems nor drops stop words: a chat mixes languages, and
a stemmer for one mangles the others. The user's text goes through
`websearch_to_tsquery`, which never raises on syntax: "quoted phrases", `-word`,
`or` work, any other punctuation is ignored.

SQLite (the embedded default): each word of the query must appear as a whole word
(case-insensitive regex with word boundaries), a `-word` must not; phrases and
`or` are read as plain words. The same response shape and the same permission
filter, without an index.

Pages go newest first by message id (ids grow with time), and the cursor is the
last id of a page (`before`): a page is `id < before`, so paging never repeats or
skips a message that existed when the first page was read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from django.db import connection
from django.db.models import Q
from django.db.models.expressions import RawSQL

from realtime.domain.access import room_access
from realtime.domain.errors import ActionError
from realtime.domain.policy import Action, can
from realtime.models import Membership, Message, Room
from realtime.protocol import ErrorCode

MAX_QUERY_LENGTH = 200
MAX_PAGE = 50
DEFAULT_PAGE = 20
# Characters of body around the first match that a snippet shows.
SNIPPET_LENGTH = 160
SNIPPET_LEAD = 50

# The text-search configuration of the index (migration 0007) and of the queries.
TS_CONFIG = "simple"
INDEX_NAME = "message_body_search"

WORD = re.compile(r"\w+")
# A word of the query and whether it is negated (`-word`); websearch syntax.
QUERY_WORD = re.compile(r"(-?)(\w+)")


@dataclass(frozen=True, slots=True)
class Terms:
    """The words a query asks for and the ones it excludes (lowercased)."""

    wanted: tuple[str, ...]
    excluded: tuple[str, ...]


def clean_query(raw: str) -> tuple[str, Terms]:
    """The query, validated: `invalid` when empty, blank, without a single word,
    with control characters (PostgreSQL refuses NUL) or over MAX_QUERY_LENGTH."""
    q = raw.strip()
    if not q:
        raise ActionError(ErrorCode.INVALID, "q is required")
    if len(q) > MAX_QUERY_LENGTH:
        raise ActionError(ErrorCode.INVALID, f"q is longer than {MAX_QUERY_LENGTH} characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in q):
        raise ActionError(ErrorCode.INVALID, "q contains control characters")
    wanted, excluded = [], []
    for minus, word in QUERY_WORD.findall(q):
        word = word.lower()
        if word == "or" and not minus:
            continue
        (excluded if minus else wanted).append(word)
    if not wanted:
        raise ActionError(ErrorCode.INVALID, "q has no word to search for")
    return q, Terms(tuple(dict.fromkeys(wanted)), tuple(dict.fromkeys(excluded)))


def readable_rooms(user):
    """The ids of the rooms `user` may read now, as a subquery (the policy's VIEW)."""
    if user.is_staff:
        return Room.objects.values("id")
    member_of = Membership.objects.filter(user_id=user.pk).values("room_id")
    return Room.objects.filter(Q(is_public=True) | Q(id__in=member_of)).values("id")


def word_regex(word: str) -> str:
    return rf"(^|\W){re.escape(word)}(\W|$)"


def matching(rows, q: str, terms: Terms):
    if connection.vendor == "postgresql":
        # The matching ids come from the GIN index first, as a set the newest-first
        # walk checks each row against. "OFFSET 0" keeps the planner from folding
        # the subquery into the outer query, where for a rare word it would rather
        # walk the ids backwards computing to_tsvector(body) on every row until a
        # page is full: the whole table for a word in a handful of messages
        # (bench/search.py: p95 895 ms over 100,000 messages before this).
        hits = RawSQL(
            f"SELECT id FROM {Message._meta.db_table} WHERE deleted_at IS NULL AND "
            f"to_tsvector('{TS_CONFIG}'::regconfig, body) @@ websearch_to_tsquery('{TS_CONFIG}'::regconfig, %s) "
            "OFFSET 0", [q])
        return rows.filter(id__in=hits)
    for word in terms.wanted:
        rows = rows.filter(body__iregex=word_regex(word))
    for word in terms.excluded:
        rows = rows.exclude(body__iregex=word_regex(word))
    return rows


def search_queryset(*, user, q: str, terms: Terms, room_id: int | None = None, before: int | None = None):
    """The matching messages `user` may read, newest first (not yet sliced)."""
    rows = Message.objects.filter(room_id__in=readable_rooms(user), deleted_at__isnull=True)
    if room_id is not None:
        rows = rows.filter(room_id=room_id)
    if before is not None:
        rows = rows.filter(id__lt=before)
    rows = matching(rows, q, terms)
    return rows.order_by("-id")


def snippet(body: str, terms: Terms) -> list[dict]:
    """A part of `body` around its first match, as parts: [{"text", "match"}, ...],
    so that a client shows the highlight without parsing markup."""
    pattern = re.compile(
        r"(?<!\w)(" + "|".join(re.escape(w) for w in sorted(terms.wanted, key=len, reverse=True)) + r")(?!\w)",
        re.IGNORECASE,
    )
    first = pattern.search(body)
    start = 0
    if first is not None and first.start() > SNIPPET_LEAD:
        start = first.start() - SNIPPET_LEAD
        space = body.find(" ", start, first.start())
        start = space + 1 if space != -1 else start
    end = min(len(body), start + SNIPPET_LENGTH)
    if first is not None and first.end() > end:
        end = first.end()
    window = body[start:end]
    parts: list[dict] = []
    if start > 0:
        parts.append({"text": "…", "match": False})
    cursor = 0
    for found in pattern.finditer(window):
        if found.start() > cursor:
            parts.append({"text": window[cursor:found.start()], "match": False})
        parts.append({"text": found.group(0), "match": True})
        cursor = found.end()
    if cursor < len(window):
        parts.append({"text": window[cursor:], "match": False})
    if end < len(body):
        parts.append({"text": "…", "match": False})
    # Merge neighbours of the same kind ("…" with the text after it).
    merged: list[dict] = []
    for part in parts:
        if merged and merged[-1]["match"] == part["match"]:
            merged[-1] = {"text": merged[-1]["text"] + part["text"], "match": part["match"]}
        else:
            merged.append(part)
    return merged


def message_search(
    *, user, q: str, room: str | None = None, before: int | None = None, limit: int = DEFAULT_PAGE
) -> dict:
    """One page of results and the cursor of the next (None on the last page).

    `room` narrows the search to one room, answered `not_found` when the user may
    not see it (like a room that does not exist)."""
    if not can(user, Action.VIEW, is_public=True, role=None):
        raise ActionError(ErrorCode.FORBIDDEN, "not signed in")
    q, terms = clean_query(q)
    room_id = None
    if room is not None:
        room_id = room_access(user=user, slug=room, action=Action.VIEW).room.pk
    limit = max(1, min(limit, MAX_PAGE))
    rows = search_queryset(user=user, q=q, terms=terms, room_id=room_id, before=before)
    page = list(
        rows.select_related("room", "author").only(
            "id", "seq", "body", "created_at", "room__slug", "author__username"
        )[: limit + 1]
    )
    more = len(page) > limit
    page = page[:limit]
    return {
        "results": [
            {
                "room": m.room.slug,
                "id": m.id,
                "seq": m.seq,
                "author": m.author.get_username(),
                "ts": m.created_at,
                "snippet": snippet(m.body, terms),
            }
            for m in page
        ],
        "next": page[-1].id if more else None,
    }
