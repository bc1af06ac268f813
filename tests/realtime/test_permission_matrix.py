"""Who may do what, where: the whole permission matrix, driven through the socket
(/ws/v1/ frames) and through REST (/api/v1/ and the pages), each cell its own test.

The tables below are the specification, written by hand: read a row as "in a
public room, a reader may view but may not post". The tests do not derive them
from realtime/domain/policy.py: they take each role, do each action the way a
client does, and check the answer and what it changed in the database.

Roles (a column each; each test makes the acting role's user in the `world` fixture):
  anonymous    not signed in
  outsider     signed in, no membership in the room
  reader       membership role reader (a member whose posting was taken away)
  member       membership role member
  moderator    membership role moderator
  owner        membership role owner
  staff        is_staff, no membership, no permissions
  operator     is_staff with realtime.operate_realtime (the admin's realtime console), no membership
  op_no_staff  realtime.operate_realtime without is_staff, no membership

Room kinds: a Room is public or private (`is_public`); that is the only room
property the policy reads for rooms of kind `room` (a DM, kind `dm`, is the private
room of a fixed set of people, seen by them only: its table is in test_dms.py) (`read_markers` changes what members are shown, not who
may do what). There is no read-only or announcement kind: a room is made
read-only for someone by giving them the reader role.

Every signed-in user has one message of their own in each room (for readers, staff
and outsiders: written while they were members, before their role changed or they
left), and `poster`, a member of both rooms, has one ("someone else's message"),
on which each signed-in user has reacted with a thumbs up (likewise).
Not a column: a deactivated user, whose session no longer names anyone (Django's
backend refuses inactive users), so they are `anonymous` here; see
test_session_revocation.py for what happens to their open sockets.

Everything runs on the embedded default (in-memory layer, buckets and presence);
the socket tests commit for real (the consumer reads the database from its own
thread), the REST writes run in a rolled-back transaction.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from channels.testing import HttpCommunicator
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.test import Client
from django.urls import get_resolver
from django.utils import timezone

from accounts import tickets
from realtime import protocol
from realtime.domain import roomlog
from realtime.domain.policy import Action
from realtime.models import Event, Membership, Message, Reaction, ReadState, Role, Room, RoomKind
from realtime.state import presence, ratelimit
from tests.conftest import HOST, assert_quiet, communicator, epoch, socket

# ---------------------------------------------------------------------------
# The matrix
# ---------------------------------------------------------------------------
OK = "ok"  # allowed, and it happened
FORBID = "forbidden"  # a room they can see, an action they may not do: socket error "forbidden", REST 403
HIDDEN = "not_found"  # the room does not exist for them: socket error "not_found", REST 404, "no such room"
LOGIN = "login"  # not signed in: the socket is accepted then closed with 4001, the API answers 403, a page
#                  redirects (302) to sign in
CONFLICT = "conflict"  # allowed, but the room's state forbids it (the last owner leaving): REST 409, nothing changed

ROLES = ("anonymous", "outsider", "reader", "member", "moderator", "owner", "staff", "operator", "op_no_staff")
KINDS = ("public", "private")

# What each room action is, on each channel (None: the channel has no such action).
ROOM_ACTIONS = {
    #               socket frame                                REST request
    "view":         ("subscribe since=0 (the replay)",          "GET messages/, events/, events/?wait (long poll), rooms/; the room page"),
    "presence":     ("subscribe presence=true (presence.state)", None),
    "post":         ("message.send",                            "POST messages/"),
    "edit_own":     ("message.edit of their own message",       "PATCH messages/<own>/"),
    "edit_other":   ("message.edit of poster's message",        "PATCH messages/<poster's>/"),
    "delete_own":   ("message.delete of their own message",     "DELETE messages/<own>/"),
    "delete_other": ("message.delete of poster's message",      "DELETE messages/<poster's>/"),
    "react":        ("reaction.add on poster's message",        "POST messages/<poster's>/reactions/"),
    "unreact":      ("reaction.remove of their own reaction",   "DELETE messages/<poster's>/reactions/"),
    "typing":       ("typing",                                  "POST typing/"),
    "mark_read":    ("read seq=head",                           "POST read/"),
    "unsubscribe":  ("unsubscribe",                             None),
    # Membership (REST only). The acting owner is the room's only owner.
    "members":      (None,                                      "GET members/"),
    "join":         (None,                                      "POST join/ (a member already: 200, nothing changes)"),
    "leave":        (None,                                      "POST leave/ (not a member: 200, nothing changes)"),
    "add_member":   (None,                                      "POST members/ {newbie}"),
    "add_moderator": (None,                                     "POST members/ {newbie, role moderator}"),
    "set_role":     (None,                                      "PATCH members/poster/ {role reader} (poster is a member)"),
    "remove_member": (None,                                     "DELETE members/poster/"),
}

ROOM_MATRIX = {
    "public": {
        #                anonymous outsider  reader    member    moderator owner     staff     operator  op_no_staff
        "view":         (LOGIN,    OK,       OK,       OK,       OK,       OK,       OK,       OK,       OK),
        "presence":     (LOGIN,    OK,       OK,       OK,       OK,       OK,       OK,       OK,       OK),
        # No membership in a public room acts as a member: outsiders and staff may post.
        "post":         (LOGIN,    OK,       FORBID,   OK,       OK,       OK,       OK,       OK,       OK),
        "edit_own":     (LOGIN,    OK,       FORBID,   OK,       OK,       OK,       OK,       OK,       OK),
        # Nobody edits someone else's words, not even owners and staff.
        "edit_other":   (LOGIN,    FORBID,   FORBID,   FORBID,   FORBID,   FORBID,   FORBID,   FORBID,   FORBID),
        # A reader may not delete even their own message: deleting your own needs the right to post.
        "delete_own":   (LOGIN,    OK,       FORBID,   OK,       OK,       OK,       OK,       OK,       OK),
        "delete_other": (LOGIN,    FORBID,   FORBID,   FORBID,   OK,       OK,       OK,       OK,       FORBID),
        # Reacting is posting's right: not readers (they may not take a reaction back either).
        "react":        (LOGIN,    OK,       FORBID,   OK,       OK,       OK,       OK,       OK,       OK),
        "unreact":      (LOGIN,    OK,       FORBID,   OK,       OK,       OK,       OK,       OK,       OK),
        "typing":       (LOGIN,    OK,       FORBID,   OK,       OK,       OK,       OK,       OK,       OK),
        "mark_read":    (LOGIN,    OK,       OK,       OK,       OK,       OK,       OK,       OK,       OK),
        "unsubscribe":  (LOGIN,    OK,       OK,       OK,       OK,       OK,       OK,       OK,       OK),
        "members":      (LOGIN,    OK,       OK,       OK,       OK,       OK,       OK,       OK,       OK),
        "join":         (LOGIN,    OK,       OK,       OK,       OK,       OK,       OK,       OK,       OK),
        # The last owner may not go: make someone else an owner first.
        "leave":        (LOGIN,    OK,       OK,       OK,       OK,       CONFLICT, OK,       OK,       OK),
        # Owners and moderators manage members; staff have no say beyond their role (they use the admin).
        "add_member":   (LOGIN,    FORBID,   FORBID,   FORBID,   OK,       OK,       FORBID,   FORBID,   FORBID),
        # Only owners give (take, or act on) the owner and moderator roles.
        "add_moderator": (LOGIN,   FORBID,   FORBID,   FORBID,   FORBID,   OK,       FORBID,   FORBID,   FORBID),
        "set_role":     (LOGIN,    FORBID,   FORBID,   FORBID,   OK,       OK,       FORBID,   FORBID,   FORBID),
        "remove_member": (LOGIN,   FORBID,   FORBID,   FORBID,   OK,       OK,       FORBID,   FORBID,   FORBID),
    },
    "private": {
        #                anonymous outsider  reader    member    moderator owner     staff     operator  op_no_staff
        "view":         (LOGIN,    HIDDEN,   OK,       OK,       OK,       OK,       OK,       OK,       HIDDEN),
        "presence":     (LOGIN,    HIDDEN,   OK,       OK,       OK,       OK,       OK,       OK,       HIDDEN),
        # Staff see every private room but post only by membership role, and they have none.
        "post":         (LOGIN,    HIDDEN,   FORBID,   OK,       OK,       OK,       FORBID,   FORBID,   HIDDEN),
        "edit_own":     (LOGIN,    HIDDEN,   FORBID,   OK,       OK,       OK,       FORBID,   FORBID,   HIDDEN),
        "edit_other":   (LOGIN,    HIDDEN,   FORBID,   FORBID,   FORBID,   FORBID,   FORBID,   FORBID,   HIDDEN),
        # Staff moderate everywhere: they may delete any message, their own included.
        "delete_own":   (LOGIN,    HIDDEN,   FORBID,   OK,       OK,       OK,       OK,       OK,       HIDDEN),
        "delete_other": (LOGIN,    HIDDEN,   FORBID,   FORBID,   OK,       OK,       OK,       OK,       HIDDEN),
        # Staff react where they may post: not here, without a membership.
        "react":        (LOGIN,    HIDDEN,   FORBID,   OK,       OK,       OK,       FORBID,   FORBID,   HIDDEN),
        "unreact":      (LOGIN,    HIDDEN,   FORBID,   OK,       OK,       OK,       FORBID,   FORBID,   HIDDEN),
        "typing":       (LOGIN,    HIDDEN,   FORBID,   OK,       OK,       OK,       FORBID,   FORBID,   HIDDEN),
        "mark_read":    (LOGIN,    HIDDEN,   OK,       OK,       OK,       OK,       OK,       OK,       HIDDEN),
        # unsubscribe checks nothing: leaving a room you cannot see (or one that does
        # not exist) is acknowledged like any other, so it tells nothing either.
        "unsubscribe":  (LOGIN,    OK,       OK,       OK,       OK,       OK,       OK,       OK,       OK),
        "members":      (LOGIN,    HIDDEN,   OK,       OK,       OK,       OK,       OK,       OK,       HIDDEN),
        # A private room is joined by invitation: staff, who see it, may not walk in.
        "join":         (LOGIN,    HIDDEN,   OK,       OK,       OK,       OK,       FORBID,   FORBID,   HIDDEN),
        "leave":        (LOGIN,    HIDDEN,   OK,       OK,       OK,       CONFLICT, OK,       OK,       HIDDEN),
        "add_member":   (LOGIN,    HIDDEN,   FORBID,   FORBID,   OK,       OK,       FORBID,   FORBID,   HIDDEN),
        "add_moderator": (LOGIN,   HIDDEN,   FORBID,   FORBID,   FORBID,   OK,       FORBID,   FORBID,   HIDDEN),
        "set_role":     (LOGIN,    HIDDEN,   FORBID,   FORBID,   OK,       OK,       FORBID,   FORBID,   HIDDEN),
        "remove_member": (LOGIN,   HIDDEN,   FORBID,   FORBID,   OK,       OK,       FORBID,   FORBID,   HIDDEN),
    },
}

# Actions that belong to no room (room kinds do not apply): what each is.
ACCOUNT_ACTIONS = {
    "ping":                ("socket", "ping"),
    "metrics.subscribe":   ("socket", "metrics.subscribe (the dashboard's metrics.tick frames)"),
    "metrics.unsubscribe": ("socket", "metrics.unsubscribe"),
    "ticket":              ("http", "POST /api/v1/tickets/ (a single-use socket ticket)"),
    "dashboard":           ("http", "GET /dashboard/"),
    "console":             ("http", "GET /admin/realtime/room/console/"),
    "create_room":         ("http", "POST /api/v1/rooms/ (a public room named after the role)"),
    "open_dm":             ("http", "POST /api/v1/dms/ with poster (who may and may not be in a DM: test_dms.py)"),
}

ACCOUNT_MATRIX = {
    #                       anonymous outsider  reader    member    moderator owner     staff     operator  op_no_staff
    "ping":                (LOGIN,    OK,       OK,       OK,       OK,       OK,       OK,       OK,       OK),
    # Staff only; the operate permission does not count.
    "metrics.subscribe":   (LOGIN,    FORBID,   FORBID,   FORBID,   FORBID,   FORBID,   OK,       OK,       FORBID),
    "metrics.unsubscribe": (LOGIN,    OK,       OK,       OK,       OK,       OK,       OK,       OK,       OK),
    "ticket":              (LOGIN,    OK,       OK,       OK,       OK,       OK,       OK,       OK,       OK),
    "dashboard":           (LOGIN,    FORBID,   FORBID,   FORBID,   FORBID,   FORBID,   OK,       OK,       FORBID),
    # The console is in the Django admin, which wants is_staff before any permission:
    # a signed-in user who is not staff is sent to the admin's sign-in page (302),
    # the operate permission notwithstanding; staff without it get 403.
    "console":             (LOGIN,    LOGIN,    LOGIN,    LOGIN,    LOGIN,    LOGIN,    FORBID,   OK,       LOGIN),
    "create_room":         (LOGIN,    OK,       OK,       OK,       OK,       OK,       OK,       OK,       OK),
    "open_dm":             (LOGIN,    OK,       OK,       OK,       OK,       OK,       OK,       OK,       OK),
}

MEMBERSHIP = {"reader": Role.READER, "member": Role.MEMBER, "moderator": Role.MODERATOR, "owner": Role.OWNER}
SOCKET_ROOM_ACTIONS = [a for a, (frame, _) in ROOM_ACTIONS.items() if frame]
REST_ROOM_ACTIONS = [a for a, (_, request) in ROOM_ACTIONS.items() if request]
POSTED, EDITED = "posted by the matrix", "edited by the matrix"
HAD, REACTED = "\N{THUMBS UP SIGN}", "\N{PARTY POPPER}"  # the reaction each user has; the one they add
REF = "act"


def expected(kind: str, action: str, role: str) -> str:
    return ROOM_MATRIX[kind][action][ROLES.index(role)]


def room_cells(actions):
    return [
        pytest.param(kind, action, role, ROOM_MATRIX[kind][action][i], id=f"{kind}-{action}-{role}")
        for kind in KINDS for action in actions for i, role in enumerate(ROLES)
    ]


def account_cells(channel: str):
    return [
        pytest.param(action, role, ACCOUNT_MATRIX[action][i], id=f"{action}-{role}")
        for action, (where, _) in ACCOUNT_ACTIONS.items() if where == channel for i, role in enumerate(ROLES)
    ]


# ---------------------------------------------------------------------------
# The world: two rooms, the acting user and poster, a message of each in each
# ---------------------------------------------------------------------------
@dataclass
class World:
    role: str
    user: object | None  # None: anonymous
    cookie: bytes | None
    own: dict[str, int]  # kind -> the acting user's message (anonymous: poster's)
    other: dict[str, int]  # kind -> poster's message


@pytest.fixture(autouse=True)
def embedded(settings):
    """The embedded default: in-memory layer, buckets, presence and typing throttle."""
    settings.REDIS_URL = ""
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    for reset in (ratelimit.reset, presence.backend.reset, presence._typing.clear):
        reset()
    yield
    for reset in (ratelimit.reset, presence.backend.reset, presence._typing.clear):
        reset()


def make_user(role: str):
    User = get_user_model()
    user = User.objects.create_user(username=role, is_staff=role in ("staff", "operator"))
    if role in ("operator", "op_no_staff"):
        user.user_permissions.add(Permission.objects.get(codename="operate_realtime"))
    return user


@pytest.fixture
def world(role) -> World:
    """Rooms `public` and `private`; `poster` (member of both) and the acting role's
    user, with their membership in both rooms and a message of each in each room."""
    now = timezone.now()
    poster = make_user("poster")
    make_user("newbie")  # in no room: the one added by add_member
    user = None if role == "anonymous" else make_user(role)
    own, other = {}, {}
    for kind in KINDS:
        room = Room.objects.create(slug=kind, title=kind.title(), is_public=kind == "public")
        Membership.objects.create(room=room, user=poster, role=Role.MEMBER)
        [(other[kind], _, _)] = roomlog.write_messages(room, poster, [("poster's words", f"poster-{kind}")], now)
        if user is None:
            own[kind] = other[kind]
            continue
        if role in MEMBERSHIP:
            Membership.objects.create(room=room, user=user, role=MEMBERSHIP[role])
        [(own[kind], _, _)] = roomlog.write_messages(room, user, [(f"{role}'s words", f"own-{kind}")], now)
        Reaction.objects.create(message_id=other[kind], user=user, emoji=HAD)
    cookie = None
    if user is not None:
        client = Client()
        client.force_login(user)
        cookie = f"sessionid={client.cookies['sessionid'].value}".encode()
    return World(role=role, user=user, cookie=cookie, own=own, other=other)


def snapshot() -> dict:
    """Everything an action could change: messages, the log, heads, read positions."""
    return {
        "messages": {
            id_: (slug, author, body, edited is not None, deleted is not None)
            for id_, slug, author, body, edited, deleted in Message.objects.values_list(
                "id", "room__slug", "author__username", "body", "edited_at", "deleted_at")
        },
        "events": {slug: sorted((seq, type_) for s, seq, type_ in Event.objects.values_list("room__slug", "seq", "type")
                                if s == slug) for slug in KINDS},
        "heads": dict(Room.objects.values_list("slug", "last_seq")),
        "reads": {(u, s): seq for u, s, seq in ReadState.objects.values_list("user__username", "room__slug", "seq")},
        "members": sorted(Membership.objects.values_list("user__username", "room__slug", "role")),
        "reactions": sorted(Reaction.objects.values_list("user__username", "message__room__slug", "message_id",
                                                         "emoji")),
    }


MEMBER_CHANGES = ("join", "leave", "add_member", "add_moderator", "set_role", "remove_member")


def member_change(world: World, kind: str, action: str):
    """What an allowed membership action does: (the membership row before, after,
    the event it logs), or None when it changes nothing."""
    mine = MEMBERSHIP.get(world.role)
    if action == "join":
        return None if mine else (None, (world.role, kind, "member"), "member.joined")
    if action == "leave":
        return ((world.role, kind, mine), None, "member.left") if mine else None
    if action == "add_member":
        return None, ("newbie", kind, "member"), "member.joined"
    if action == "add_moderator":
        return None, ("newbie", kind, "moderator"), "member.joined"
    if action == "set_role":
        return ("poster", kind, "member"), ("poster", kind, "reader"), "member.role"
    if action == "remove_member":
        return ("poster", kind, "member"), None, "member.left"
    raise AssertionError(action)


def target(world: World, kind: str, action: str) -> int:
    return world.other[kind] if action.endswith("_other") or action in ("react", "unreact") else world.own[kind]


def after_allowed(before: dict, world: World, kind: str, action: str, new_id: int | None) -> dict:
    """The snapshot an allowed action leaves: `before` with exactly its change."""
    after = copy.deepcopy(before)
    head = before["heads"][kind]
    if action == "post":
        after["messages"][new_id] = (kind, world.role, POSTED, False, False)
        after["events"][kind].append((head + 1, "message.new"))
    elif action.startswith("edit"):
        slug, author, *_ = before["messages"][target(world, kind, action)]
        after["messages"][target(world, kind, action)] = (slug, author, EDITED, True, False)
        after["events"][kind].append((head + 1, "message.edited"))
    elif action.startswith("delete"):
        slug, author, *_ = before["messages"][target(world, kind, action)]
        after["messages"][target(world, kind, action)] = (slug, author, "", False, True)
        after["events"][kind].append((head + 1, "message.deleted"))
        # Its reactions go with it.
        after["reactions"] = [r for r in after["reactions"] if r[2] != target(world, kind, action)]
    elif action == "react":
        after["reactions"] = sorted([*after["reactions"], (world.role, kind, world.other[kind], REACTED)])
        after["events"][kind].append((head + 1, "reaction.added"))
    elif action == "unreact":
        after["reactions"].remove((world.role, kind, world.other[kind], HAD))
        after["events"][kind].append((head + 1, "reaction.removed"))
    elif action == "mark_read":
        after["reads"][(world.role, kind)] = head  # the read position moves; the log does not
        return after
    elif action in MEMBER_CHANGES:
        change = member_change(world, kind, action)
        if change is None:
            return after  # joining when a member, leaving when not: nothing changes
        before_row, after_row, event = change
        if before_row:
            after["members"].remove(before_row)
        if after_row:
            after["members"] = sorted(after["members"] + [after_row])
        after["events"][kind].append((head + 1, event))
    else:
        return after  # view, presence, typing, unsubscribe: nothing stored
    after["heads"][kind] = head + 1
    return after


# ---------------------------------------------------------------------------
# Through the socket
# ---------------------------------------------------------------------------
def room_frame(world: World, kind: str, action: str, head: int) -> dict:
    frame = {
        "view": {"type": "subscribe", "since": 0, "presence": False},
        "presence": {"type": "subscribe", "presence": True},
        "post": {"type": "message.send", "body": POSTED, "client_id": "matrix-post"},
        "edit_own": {"type": "message.edit", "id": world.own[kind], "body": EDITED},
        "edit_other": {"type": "message.edit", "id": world.other[kind], "body": EDITED},
        "delete_own": {"type": "message.delete", "id": world.own[kind]},
        "delete_other": {"type": "message.delete", "id": world.other[kind]},
        "react": {"type": "reaction.add", "id": world.other[kind], "emoji": REACTED},
        "unreact": {"type": "reaction.remove", "id": world.other[kind], "emoji": HAD},
        "typing": {"type": "typing"},
        "mark_read": {"type": "read", "seq": head},
        "unsubscribe": {"type": "unsubscribe"},
    }[action]
    return {**frame, "room": kind, "ref": REF}


async def request(ws, frame: dict) -> tuple[dict, list[dict]]:
    """Send `frame`; return its reply (the frame with its ref) and what came before it."""
    await ws.send_json_to(frame)
    before = []
    while True:
        reply = await ws.receive_json_from(timeout=5)
        if reply.get("ref") == frame["ref"]:
            return reply, before
        before.append(reply)


async def assert_signed_out(cookie: bytes | None) -> None:
    """No user: the socket is accepted, then closed with 4001 before any frame."""
    comm = communicator(cookie)
    connected, _ = await comm.connect(timeout=5)
    assert connected
    assert await comm.receive_output(timeout=5) == {"type": "websocket.close", "code": 4001}
    await comm.disconnect()


def assert_refused(reply: dict, outcome: str) -> None:
    assert {k: v for k, v in reply.items() if k != "message"} == {"type": "error", "ref": REF, "code": outcome}
    if outcome == HIDDEN:
        assert reply["message"] == "no such room"  # word for word a missing room's answer


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("kind, action, role, outcome", room_cells(SOCKET_ROOM_ACTIONS))
async def test_room_action_over_the_socket(world, kind, action, role, outcome):
    before = await sync_to_async(snapshot)()
    if outcome == LOGIN:
        await assert_signed_out(world.cookie)
        assert await sync_to_async(snapshot)() == before
        return
    head = before["heads"][kind]
    async with socket(world.cookie) as ws:
        reply, earlier = await request(ws, room_frame(world, kind, action, head))
        new_id = None
        if outcome != OK:
            assert_refused(reply, outcome)
            assert earlier == []
        elif action == "view":
            assert reply == {"type": "ack", "ref": REF, "room": kind, "seq": head, "epoch": await epoch(kind),
                             "replayed": head}
            assert [(e["type"], e["seq"]) for e in earlier] == [("message.new", s) for s in range(1, head + 1)]
        elif action == "presence":
            assert reply == {"type": "ack", "ref": REF, "room": kind, "seq": head, "epoch": await epoch(kind),
                             "replayed": 0}
            assert earlier == [{"type": "presence.state", "room": kind, "users": [role], "count": 1}]
        elif action == "post":
            new_id = reply.get("id")
            assert reply == {"type": "ack", "ref": REF, "room": kind, "id": new_id, "seq": head + 1}
        elif action.startswith(("edit", "delete")):
            assert reply == {"type": "ack", "ref": REF, "room": kind, "id": target(world, kind, action),
                             "seq": head + 1}
        elif action in ("react", "unreact"):
            assert reply == {"type": "ack", "ref": REF, "room": kind, "id": world.other[kind],
                             "emoji": REACTED if action == "react" else HAD, "seq": head + 1}
        elif action == "typing":
            assert reply == {"type": "ack", "ref": REF, "room": kind, "sent": True}
        elif action == "mark_read":
            assert reply == {"type": "ack", "ref": REF, "room": kind, "seq": head}
        elif action == "unsubscribe":
            assert reply == {"type": "ack", "ref": REF, "room": kind}
        else:
            raise AssertionError(f"no check for {action}")
        if action == "presence":
            assert (role in (await presence.page(kind)).users) is (outcome == OK)
        if action == "typing":
            assert ((kind, world.user.pk) in presence._typing) is (outcome == OK)
        await assert_quiet(ws)
    after = await sync_to_async(snapshot)()
    assert after == (after_allowed(before, world, kind, action, new_id) if outcome == OK else before)


# ---------------------------------------------------------------------------
# Through REST (and the room page)
# ---------------------------------------------------------------------------
NOT_SIGNED_IN = {"code": "forbidden", "message": "Authentication credentials were not provided."}


def page_config(res) -> dict:
    found = re.search(r'<script id="realtime-config" type="application/json">(.*?)</script>', res.content.decode(), re.S)
    return json.loads(found.group(1))


def long_poll(client: Client, kind: str) -> tuple[int, dict]:
    """GET events/?wait=1: answered by realtime/web/longpoll.py (an ASGI app in front
    of Django), not by DRF. With events after since=0 it answers at once."""
    from project.asgi import application

    cookie = client.cookies.get("sessionid")
    headers = [HOST] + ([(b"cookie", f"sessionid={cookie.value}".encode())] if cookie else [])
    comm = HttpCommunicator(application, "GET", f"/api/v1/rooms/{kind}/events/", headers=headers)
    comm.scope["query_string"] = b"since=0&wait=1"
    res = async_to_sync(comm.get_response)(timeout=5)
    return res["status"], json.loads(res["body"])


@pytest.mark.django_db(transaction=True)  # the long poll reads the database from its own thread
@pytest.mark.parametrize("kind, action, role, outcome", room_cells(["view"]))
def test_room_view_over_rest(world, kind, action, role, outcome):
    client = Client()
    if world.user is not None:
        client.force_login(world.user)
    before = snapshot()
    head = before["heads"][kind]
    messages = client.get(f"/api/v1/rooms/{kind}/messages/")
    events = client.get(f"/api/v1/rooms/{kind}/events/")
    polled = long_poll(client, kind)
    rooms = client.get("/api/v1/rooms/")
    page = client.get(f"/rooms/{kind}/")
    assert snapshot() == before
    if outcome == LOGIN:
        for res in (messages, events, rooms):
            assert res.status_code == 403 and res.json() == NOT_SIGNED_IN
        # The long poll answers 401 on purpose (docs/protocol.md): the client stops polling.
        assert polled == (401, {"code": "forbidden", "message": "sign in first"})
        assert page.status_code == 302 and page["Location"] == f"/accounts/login/?next=/rooms/{kind}/"
        return
    listed = [room["slug"] for room in rooms.json()["rooms"]]
    if outcome == HIDDEN:
        for res in (messages, events):
            assert res.status_code == 404
            assert res.json() == {"code": "not_found", "message": "no such room"}
        assert polled == (404, {"code": "not_found", "message": "no such room"})
        assert kind not in listed
        assert page.status_code == 404
        return
    assert outcome == OK
    assert messages.status_code == 200
    assert [m["id"] for m in messages.json()["messages"]] == sorted({world.other[kind], world.own[kind]})
    assert messages.json()["seq"] == head
    seqs = [("message.new", s) for s in range(1, head + 1)]
    assert events.status_code == 200
    assert [(e["type"], e["seq"]) for e in events.json()["events"]] == seqs
    assert polled[0] == 200 and [(e["type"], e["seq"]) for e in polled[1]["events"]] == seqs
    assert kind in listed
    assert page.status_code == 200
    # The page tells the browser what to offer: it must agree with the matrix.
    config = page_config(page)
    assert config["canPost"] is (expected(kind, "post", role) == OK)
    assert config["canModerate"] is (expected(kind, "delete_other", role) == OK)


def rest_request(client: Client, world: World, kind: str, action: str, head: int):
    base = f"/api/v1/rooms/{kind}/"
    if action == "post":
        return client.post(base + "messages/", {"body": POSTED, "client_id": "matrix-post"},
                           content_type="application/json")
    if action.startswith("edit"):
        return client.patch(base + f"messages/{target(world, kind, action)}/", {"body": EDITED},
                            content_type="application/json")
    if action.startswith("delete"):
        return client.delete(base + f"messages/{target(world, kind, action)}/")
    if action == "mark_read":
        return client.post(base + "read/", {"seq": head}, content_type="application/json")
    if action == "typing":
        presence._typing.clear()  # (the 2 s throttle of an earlier cell's user of the same id)
        return client.post(base + "typing/")
    if action == "react":
        return client.post(base + f"messages/{world.other[kind]}/reactions/", {"emoji": REACTED},
                           content_type="application/json")
    if action == "unreact":
        return client.delete(base + f"messages/{world.other[kind]}/reactions/", {"emoji": HAD},
                             content_type="application/json")
    if action == "members":
        return client.get(base + "members/")
    if action in ("join", "leave"):
        return client.post(base + f"{action}/")
    if action in ("add_member", "add_moderator"):
        role = "moderator" if action == "add_moderator" else "member"
        return client.post(base + "members/", {"username": "newbie", "role": role}, content_type="application/json")
    if action == "set_role":
        return client.patch(base + "members/poster/", {"role": "reader"}, content_type="application/json")
    if action == "remove_member":
        return client.delete(base + "members/poster/")
    raise AssertionError(f"no request for {action}")


@pytest.mark.django_db
@pytest.mark.parametrize("kind, action, role, outcome", room_cells([a for a in REST_ROOM_ACTIONS if a != "view"]))
def test_room_action_over_rest(world, kind, action, role, outcome):
    client = Client()
    if world.user is not None:
        client.force_login(world.user)
    before = snapshot()
    head = before["heads"][kind]
    res = rest_request(client, world, kind, action, head)
    new_id = None
    if outcome == LOGIN:
        assert res.status_code == 403 and res.json() == NOT_SIGNED_IN
    elif outcome == FORBID:
        assert res.status_code == 403 and res.json()["code"] == "forbidden"
    elif outcome == HIDDEN:
        assert res.status_code == 404 and res.json() == {"code": "not_found", "message": "no such room"}
    elif outcome == CONFLICT:
        assert res.status_code == 409 and res.json()["code"] == "conflict"
    else:
        assert outcome == OK
        assert res.status_code == (201 if action.startswith("add_") else 200)
        if action == "mark_read":
            assert res.json() == {"room": kind, "seq": head}
        elif action == "typing":
            assert res.json() == {"room": kind, "sent": True}
        elif action in ("react", "unreact"):
            assert res.json() == {"room": kind, "id": world.other[kind], "emoji": REACTED if action == "react" else HAD,
                                  "seq": head + 1}
        elif action == "members":
            listed = [(m["user"], m["role"]) for m in res.json()["members"]]
            assert listed == sorted((u, r) for u, s, r in before["members"] if s == kind)
        elif action in MEMBER_CHANGES:
            change = member_change(world, kind, action)
            if change is None:
                user, role, seq = world.role, MEMBERSHIP.get(world.role), None
            else:
                before_row, after_row, _ = change
                user, role, seq = (after_row or before_row)[0], after_row and after_row[2], head + 1
            assert res.json() == {"room": kind, "user": user, "role": role, "seq": seq}
        else:
            new_id = res.json()["id"] if action == "post" else target(world, kind, action)
            assert res.json() == {"room": kind, "id": new_id, "seq": head + 1}
    after = snapshot()
    assert after == (after_allowed(before, world, kind, action, new_id) if outcome == OK else before)


# ---------------------------------------------------------------------------
# Actions of no room
# ---------------------------------------------------------------------------
@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("action, role, outcome", account_cells("socket"))
async def test_account_action_over_the_socket(world, action, role, outcome):
    if outcome == LOGIN:
        await assert_signed_out(world.cookie)
        return
    async with socket(world.cookie) as ws:
        reply, earlier = await request(ws, {"type": action, "ref": REF})
        assert earlier == []
        if outcome == FORBID:
            assert reply == {"type": "error", "ref": REF, "code": "forbidden", "message": "the metrics are for staff"}
            await assert_quiet(ws)  # and no metrics.tick follows
        elif action == "ping":
            assert reply == {"type": "pong", "ref": REF}
        elif action == "metrics.subscribe":
            assert reply == {"type": "ack", "ref": REF, "metrics": True}
            assert (await ws.receive_json_from(timeout=5))["type"] == "metrics.tick"
        elif action == "metrics.unsubscribe":
            assert reply == {"type": "ack", "ref": REF, "metrics": False}
        else:
            raise AssertionError(f"no check for {action}")


@pytest.mark.django_db
@pytest.mark.parametrize("action, role, outcome", account_cells("http"))
def test_account_action_over_http(world, action, role, outcome):
    client = Client()
    if world.user is not None:
        client.force_login(world.user)
    if action in ("create_room", "open_dm"):
        before = snapshot()
        if action == "create_room":
            res = client.post("/api/v1/rooms/", {"name": f"{role} made this", "visibility": "public"},
                              content_type="application/json")
        else:
            res = client.post("/api/v1/dms/", {"users": ["poster"]}, content_type="application/json")
        if outcome == LOGIN:
            assert res.status_code == 403 and res.json() == NOT_SIGNED_IN
            assert snapshot() == before
        else:
            assert outcome == OK and res.status_code == 201
            assert res.json()["kind"] == ("room" if action == "create_room" else "dm")
            assert (role, res.json()["slug"], "owner" if action == "create_room" else "member") in snapshot()["members"]
        return
    if action == "ticket":
        res = client.post("/api/v1/tickets/")
        if outcome == LOGIN:
            assert res.status_code == 403 and res.json() == NOT_SIGNED_IN
        else:
            assert outcome == OK and res.status_code == 201
            assert res.json()["expires_in"] == tickets.TICKET_TTL
            user, session_key = tickets.redeem(res.json()["ticket"])
            assert user == world.user and session_key == client.session.session_key
        return
    path, sign_in = {"dashboard": ("/dashboard/", "/accounts/login/"),
                     "console": ("/admin/realtime/room/console/", "/admin/login/")}[action]
    res = client.get(path)
    if outcome == LOGIN:
        assert res.status_code == 302 and res["Location"] == f"{sign_in}?next={path}"
    elif outcome == FORBID:
        assert res.status_code == 403
    else:
        assert outcome == OK and res.status_code == 200
        assert {"dashboard": "realtime/dashboard.js", "console": "Realtime console"}[action] in res.content.decode()


# ---------------------------------------------------------------------------
# The matrix leaves nothing out
# ---------------------------------------------------------------------------
def test_the_matrix_covers_every_role_frame_route_and_room_kind():
    for kind in KINDS:
        assert list(ROOM_MATRIX[kind]) == list(ROOM_ACTIONS)
        assert all(len(row) == len(ROLES) for row in ROOM_MATRIX[kind].values())
    assert list(ACCOUNT_MATRIX) == list(ACCOUNT_ACTIONS)
    assert all(len(row) == len(ROLES) for row in ACCOUNT_MATRIX.values())
    # Every action the policy knows is some row's (a new Action needs its rows here).
    policy_action = {"view": Action.VIEW, "presence": Action.VIEW, "post": Action.POST, "edit_own": Action.EDIT,
                     "edit_other": Action.EDIT, "delete_own": Action.DELETE, "delete_other": Action.DELETE,
                     "react": Action.REACT, "unreact": Action.REACT, "typing": Action.POST,
                     "mark_read": Action.VIEW, "unsubscribe": None, "members": Action.VIEW, "join": Action.JOIN,
                     "leave": Action.LEAVE, "add_member": Action.MANAGE_MEMBERS,
                     "add_moderator": Action.MANAGE_MEMBERS, "set_role": Action.MANAGE_MEMBERS,
                     "remove_member": Action.MANAGE_MEMBERS}
    assert list(policy_action) == list(ROOM_ACTIONS)
    assert set(policy_action.values()) - {None} == set(Action)
    # Every membership role has its column.
    assert set(MEMBERSHIP.values()) == set(Role)
    # Every client frame type is exercised by some action.
    exercised = {"subscribe", "message.send", "message.edit", "message.delete", "typing", "read", "unsubscribe",
                 "reaction.add", "reaction.remove",
                 # Answers only for a room the socket follows with presence (which took VIEW):
                 # tests/realtime/test_presence.py::test_a_joiner_gets_the_count_and_a_first_page_and_pages_the_rest.
                 "presence.list",
                 # Only a token socket may, and only with its own user's token (another's is
                 # forbidden): tests/accounts/test_bearer.py::test_the_socket_closes_at_exp_unless_refreshed.
                 "auth.refresh",
                 *(a for a, (where, _) in ACCOUNT_ACTIONS.items() if where == "socket")}
    assert exercised == set(protocol.CLIENT_TYPES)
    # Every REST route is exercised (rooms/, messages/, events/: view; message/: edit and delete; ...).
    api = {p.name for p in get_resolver("realtime.web.api.urls").url_patterns}
    assert api == {"api-rooms", "api-tickets", "api-room-events", "api-room-messages", "api-room-message",
                   "api-room-read", "api-room-typing", "api-room-reactions", "api-room-join", "api-room-leave", "api-room-members",
                   "api-room-member", "api-dms",
                   # Search's visibility rule has its own tests (tests/realtime/test_search.py: what the
                   # asker may read now); the schema and its docs page are for anyone signed in.
                   "api-search", "api-schema", "api-docs", "api-not-found",
                   # Names of active people by prefix, for anyone signed in (tests/realtime/test_people.py).
                   "api-people",
                   # A polling page's goodbye: only ever the asker's own lease
                   # (tests/realtime/test_longpoll_ephemeral.py).
                   "api-room-presence-leave"}
    # Every action of the policy has its rows.
    rows = {Action.VIEW: "view", Action.POST: "post", Action.EDIT: "edit_own", Action.DELETE: "delete_own",
            Action.REACT: "react", Action.JOIN: "join", Action.LEAVE: "leave", Action.MANAGE_MEMBERS: "add_member"}
    assert set(rows) == set(Action) and all(row in ROOM_ACTIONS for row in rows.values())
    # A new room property that could change who may do what needs a kind here.
    flags = {f.name for f in Room._meta.concrete_fields if f.get_internal_type() == "BooleanField"}
    assert flags == {"is_public", "read_markers"}
    # Room.kind: "room" is the two columns above; "dm" (fixed membership, its people
    # only, staff included) has its own table in test_dms.py
    # (test_a_dm_is_its_peoples_only_and_nobody_changes_who_is_in_it).
    assert set(RoomKind.values) == {"room", "dm"}
