"""Long polling, for clients whose WebSockets are blocked:
`GET /api/v1/rooms/<slug>/events/?since=N&wait=S`. (Past the rule of about 400
lines on purpose: the held request, its Waiter in the fan-out and the parking
between a page's polls are one mechanism, and each part's timing is the others'.)

With `wait` (1 to 30 seconds) the request is held until the room has an event
after `since`, or the wait ends; the answer has the same shape as without it:
`{"events": [...], "seq": head, "has_more": bool}`. Posting goes through
`POST /api/v1/rooms/<slug>/messages/` (realtime/web/api/views.py).

It is an ASGI app of its own, in front of Django (project/asgi.py), because a held
request must not hold a thread: Django would run a sync-only middleware (WhiteNoise)
around an async view in asgiref's single thread-sensitive thread, so one long poll
would stall every other request's database work for its whole wait. Here the wait
is a wait on the worker's fan-out (realtime/delivery/fanout.py); only the log reads go to the thread.

The order is the socket's: join the room's group first, then read the log, then
wait for a broadcast and read the log again. An event committed in between is in
the second read; a broadcast lost on the way is found by the re-read every
RECHECK seconds. Every read checks the user's access to the room again.

With `client=<page id>` the poll is also the page's presence and its ear for the
room's pushes: the page is present (presence.poll_join: a lease of the wait plus
POLL_GRACE, renewed by each poll; it leaves at once when it hangs up a held poll or
loses the room), and the answer adds `ephemeral` (presence.state when the page's
`presence_tag` is stale, read.markers on its first poll, then the typing and
read.marker pushes its Waiter collected) and `presence_tag`. Pushes wake a held
poll only COALESCE s after the first of them; an answered poll's Waiter stays in
the group LINGER s (PARKED) so that what comes before the page's next poll is in it.

A draining worker (server/drain.py) answers its held polls at once with what they
have (200, the usual page, usually empty), as it closes its sockets with 4012: the
client polls again with its since, and the balancer sends that to a worker that
stays. A poll that reaches a draining worker is not held either.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from urllib.parse import parse_qs

import msgspec
from channels.auth import AuthMiddlewareStack
from channels.db import database_sync_to_async
from django.conf import settings
from django.http.request import split_domain_port, validate_host

from realtime import protocol
from realtime.state import degraded, heartbeat, presence, ratelimit
from realtime.delivery import publish as broadcast
from realtime.domain import roomlog, selectors
from realtime.delivery.fanout import fanout, running
from realtime.web.middleware import worker_header
from realtime.domain.errors import ActionError
from realtime.observability import metrics
from realtime.protocol import HTTP_STATUS, ErrorCode

log = logging.getLogger(__name__)

EVENTS_PATH = re.compile(r"^/api/v1/rooms/(?P<slug>[-a-zA-Z0-9_]+)/events/$")
MAX_WAIT = 30  # seconds; proxies in deploy/ allow 60 for /api/
RECHECK = 5.0  # seconds between log reads while waiting (a lost broadcast costs this)
PAGE_MAX = 500
# A page's poll id (`client`): the page is present in the room while it polls, and
# hears the room's ephemeral frames (typing, presence, read markers).
CLIENT = re.compile(protocol.POLL_CLIENT_PATTERN)
PRESENCE_TAG = re.compile(r"^[0-9a-f]{1,32}$")
POLL_GRACE = 10.0  # s a polling page stays present past its poll's wait (the next poll renews it)
COALESCE = 0.5  # s the first ephemeral frame waits for others before it wakes a held poll
LINGER = 5.0  # s an answered poll's waiter keeps collecting for the page's next poll
MAX_EPHEMERAL = 50  # frames one answer carries at most (the newest per kind and user)
MAX_PARKED = 10_000  # parked waiters per worker at most (memory is bounded)

def query(scope) -> dict[str, str]:
    return {k: v[-1] for k, v in parse_qs(scope.get("query_string", b"").decode("latin-1")).items()}


def wants_long_poll(scope) -> bool:
    """A GET of a room's events with a `wait` (anything else goes to Django)."""
    if scope["type"] != "http" or scope.get("method") != "GET" or not EVENTS_PATH.match(scope.get("path", "")):
        return False
    wait = query(scope).get("wait", "")
    return wait not in ("", "0")


def int_arg(args, name: str, default: int | None, low: int, high: int | None = None) -> int | None:
    """An integer query parameter (a default when absent), or error invalid."""
    raw = args.get(name, "")
    if raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ActionError(ErrorCode.INVALID, f"{name} must be an integer") from None
    if value < low:
        raise ActionError(ErrorCode.INVALID, f"{name} must be at least {low}")
    return min(value, high) if high is not None else value


EPOCH = re.compile(r"^[A-Za-z0-9]{1,16}$")


def epoch_arg(args) -> str | None:
    """The `epoch` query parameter (the one `since` counts in), or None."""
    raw = args.get("epoch", "")
    if raw == "":
        return None
    if not EPOCH.match(raw):
        raise ActionError(ErrorCode.INVALID, "epoch must be 1 to 16 letters and digits")
    return raw


async def poll_goodbye(user, slug: str, client: str) -> None:
    """A polling page is going (closed, or back on a socket): it leaves the room's
    presence now, not when its lease runs out (its last poll may not be held at that
    moment, so no hang-up tells us). Only the asker's own lease can be named: the
    lease's key is built from the user. Leaving a room one was not in changes nothing.
    `client` is checked by the body's type (protocol.PresenceLeave)."""
    await presence.poll_leave(slug, user.pk, user.get_username(), f"poll-{client}")


def client_args(args) -> tuple[str | None, str | None]:
    """`client` (the page's poll id) and `presence_tag` (the presence it has), or error invalid."""
    client, known = args.get("client") or None, args.get("presence_tag") or None
    if client is not None and not CLIENT.match(client):
        raise ActionError(ErrorCode.INVALID, "client must be 8 to 64 letters, digits, - or _")
    if known is not None and not PRESENCE_TAG.match(known):
        raise ActionError(ErrorCode.INVALID, "presence_tag must be the tag of an earlier answer")
    return client, known


def events_page(replay: roomlog.Replay, since: int) -> dict:
    """The answer of GET .../events/ (with or without wait)."""
    events = [msgspec.to_builtins(e) for e in replay.events]
    last = events[-1]["seq"] if events else since
    # `seq` is the room's head in the log `epoch`; when has_more, ask again with
    # since=<last event's seq> (and the epoch).
    return {"events": events, "seq": replay.head, "epoch": replay.epoch, "has_more": last < replay.head}


async def wait_for_events(user, slug: str, since: int, wait: float, limit: int, epoch: str | None = None,
                          client: str | None = None, known: str | None = None) -> dict:
    """The answer of a long poll. With `client` (the page's poll id) the page is also
    present in the room and hears its ephemeral frames (see Waiter); `known` is the
    presence tag of the presence.state it has (None: it has none yet)."""
    verdict = await ratelimit.take(user.pk, "poll")
    if not verdict.allowed:
        raise ActionError(ErrorCode.RATE_LIMITED, "polling too often; slow down", retry_after=verdict.retry_after)
    read = database_sync_to_async(roomlog.room_replay)
    group = broadcast.room_group(slug)
    conn_id = f"poll-{client}" if client else None
    key = (user.pk, client, slug) if client else None
    waiter = adopt(key) if key else None  # the page's previous poll's, with what came since
    subscribed = waiter is not None
    if waiter is None:
        waiter = Waiter(user.pk, conn_id, slug)
    held = waiter
    HELD.add(held)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    present = gone = lost = False
    try:
        if not subscribed:
            try:
                await fanout().add(group, waiter)
                subscribed = True
                waiter.fan = fanout()
            except Exception as exc:
                # No transport (Redis down): read the log every second instead.
                degraded.tolerate(degraded.LONG_POLL, exc)
        users: presence.Page | None = None
        while True:
            waiter.woken.clear()  # what arrives during the read wakes the next wait
            # The replay budget: in debt, the head alone is read, and a poll that
            # would bring events is refused (one that waits for them may wait).
            budget = ratelimit.replay_check(user.pk)
            try:
                replay = await read(user=user, slug=slug, since=since, limit=limit, head_only=not budget.allowed,
                                    epoch=epoch)
            except ActionError as exc:
                lost = exc.code in (ErrorCode.NOT_FOUND, ErrorCode.FORBIDDEN)
                raise
            if replay.held_back:
                raise ActionError(ErrorCode.RATE_LIMITED, "reading history too fast; wait",
                                  retry_after=budget.retry_after)
            if client and not present:
                # Access checked by the read: present from now, for the wait and a grace.
                present = True
                presence.ensure_started()
                users = await presence.poll_join(slug, user.pk, user.get_username(), conn_id, wait + POLL_GRACE)
            elif client and waiter.ripe and waiter.presence_changed:
                users = await presence.page(slug)
            remaining = deadline - loop.time()
            if replay.events or remaining <= 0 or heartbeat.draining:
                return await answer_page(replay, since, waiter, slug, known, bool(client))
            if client:
                if users is not None and presence.tag(users) != known:
                    return await answer_page(replay, since, waiter, slug, known, True)
                if waiter.ripe:
                    if waiter.frames:
                        return await answer_page(replay, since, waiter, slug, known, True)
                    waiter.settle()  # (presence moved and came back: nothing to say)
            if not subscribed:
                await asyncio.sleep(min(remaining, 1.0))
                continue
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(waiter.woken.wait(), min(remaining, RECHECK))
    except asyncio.CancelledError:
        gone = True  # the client hung up (closed the page, or stopped polling the room)
        raise
    finally:
        HELD.discard(held)
        if key is not None and subscribed and not (gone or lost):
            park(key, waiter)
        elif subscribed:
            with contextlib.suppress(Exception):
                await fanout().discard(group, waiter)
        if client and (gone or lost):
            await presence.poll_leave(slug, user.pk, user.get_username(), conn_id)


async def answer_page(replay: roomlog.Replay, since: int, waiter: "Waiter", slug: str, known: str | None,
                      ephemeral: bool) -> dict:
    """The page, and for a poll with `client`: `ephemeral` (presence.state when it is
    not the one the page has, read.markers on its first poll, then the typing and
    read.marker frames collected while held) and `presence_tag`."""
    page = events_page(replay, since)
    if not ephemeral:
        return page
    first = await presence.page(slug)
    tag = presence.tag(first)
    frames = []
    if tag != known:
        frames.append(msgspec.to_builtins(presence.state_frame(slug, first)))
    if known is None:
        markers = await database_sync_to_async(selectors.read_markers)(slug=slug)
        if markers:
            frames.append({"type": "read.markers", "room": slug, "markers": markers})
    frames.extend(waiter.take())
    page["ephemeral"] = frames
    page["presence_tag"] = tag
    return page


def end_held_polls() -> None:
    """The worker drains (heartbeat.draining is set): wake every held poll, which
    then answers with what it has instead of waiting on."""
    for waiter in list(HELD):
        waiter.woken.set()


# The polls this worker holds (end_held_polls wakes them).
HELD: set["Waiter"] = set()
metrics.LONG_POLLS_HELD.set_function(lambda: len(HELD))

# Answered polls' waiters, kept LINGER seconds for the page's next poll of the room:
# (user id, client, room) -> Waiter. What arrives between two polls is not lost.
PARKED: dict[tuple[int, str, str], "Waiter"] = {}


def park(key: tuple[int, str, str], waiter: "Waiter") -> None:
    """Keep the answered poll's waiter in the room's group for the page's next poll."""
    old = PARKED.pop(key, None)
    if old is not None and old is not waiter:
        old.release()
    if len(PARKED) >= MAX_PARKED:
        waiter.release()
        return
    PARKED[key] = waiter
    waiter.expiry = asyncio.get_running_loop().call_later(LINGER, _expire, key, waiter)


def _expire(key, waiter: "Waiter") -> None:
    if PARKED.get(key) is waiter:
        del PARKED[key]
        waiter.release()


def adopt(key: tuple[int, str, str]) -> "Waiter | None":
    """The page's parked waiter for the room, if it is still there (on this worker,
    this event loop)."""
    waiter = PARKED.pop(key, None)
    if waiter is None:
        return None
    if waiter.expiry is not None:
        waiter.expiry.cancel()
        waiter.expiry = None
    if waiter.fan is not running():
        return None  # another loop's (tests run one loop each)
    return waiter


def polled_rooms() -> set[str]:
    """The rooms this worker's polling pages follow (presence's sweep reconciles them)."""
    return {w.room for w in (*HELD, *PARKED.values()) if w.conn_id is not None and w.fan is running()}


class Waiter:
    """A held poll as the worker's fan-out sees it: a room event, an access check, a
    catch-up after a layer failure wakes it, and it reads the log again.

    A poll with `client` also collects the room's ephemeral pushes (not its own
    user's, nor those addressed past it): typing and read.marker frames (the newest
    per kind and user, at most MAX_EPHEMERAL), and whether presence moved. They wake
    the poll only COALESCE seconds after the first of them (`ripe`), so a typing storm
    costs a page one answer per COALESCE, not one per notice."""

    __slots__ = ("woken", "user_id", "conn_id", "room", "frames", "presence_changed", "ripe", "timer", "expiry",
                 "fan")

    def __init__(self, user_id: int | None = None, conn_id: str | None = None, room: str | None = None) -> None:
        self.woken = asyncio.Event()
        self.user_id = user_id
        self.conn_id = conn_id
        self.room = room
        self.frames: dict[tuple[str, str], dict] = {}
        self.presence_changed = False
        self.ripe = False
        self.timer: asyncio.TimerHandle | None = None
        self.expiry: asyncio.TimerHandle | None = None
        self.fan = None

    async def deliver(self, message: dict) -> bool:
        self.put_nowait(message)
        return True

    def put_nowait(self, message: dict) -> None:
        if message.get("type") != broadcast.PUSH:
            self.woken.set()
        elif self.conn_id is not None:
            self.collect(message)

    def collect(self, message: dict) -> None:
        if (message.get("room") != self.room or message.get("skip_user") == self.user_id
                or message.get("skip_conn") == self.conn_id):
            return
        frame = message.get("_frame")
        if frame is None:
            frame = message["_frame"] = msgspec.json.decode(message[protocol.JSON.name])
        kind = frame.get("type")
        if kind in ("presence.diff", "presence.state"):
            self.presence_changed = True
        elif kind in ("typing", "read.marker"):
            key = (kind, frame.get("user"))
            self.frames.pop(key, None)
            self.frames[key] = frame
            while len(self.frames) > MAX_EPHEMERAL:
                del self.frames[next(iter(self.frames))]
        else:
            return
        if self.timer is None and not self.ripe:
            self.timer = asyncio.get_running_loop().call_later(COALESCE, self._ripen)

    def _ripen(self) -> None:
        self.timer = None
        self.ripe = True
        self.woken.set()

    def settle(self) -> None:
        """Start collecting afresh (what was collected has been answered, or was nothing)."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.ripe = self.presence_changed = False

    def take(self) -> list[dict]:
        frames = list(self.frames.values())
        self.frames.clear()
        self.settle()
        return frames

    def release(self) -> None:
        """Leave the room's group (a parked waiter nobody adopted)."""
        self.settle()
        if self.expiry is not None:
            self.expiry.cancel()
            self.expiry = None
        fan = self.fan
        if fan is not None and fan is running():
            asyncio.ensure_future(fan.discard(broadcast.room_group(self.room), self))

    @property
    def local_queue(self) -> "Waiter":
        return self


class LongPoll:
    """The ASGI app that answers a long poll (scope["user"] from AuthMiddlewareStack)."""

    async def __call__(self, scope, receive, send):
        # Read the request to its end; then watch for the client going away.
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            if not message.get("more_body"):
                break
        work = asyncio.ensure_future(self.answer(scope))
        gone = asyncio.ensure_future(self._disconnected(receive))
        done, _ = await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        if work not in done:
            work.cancel()  # the client left: stop waiting (the finally leaves the group)
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await work
            return
        gone.cancel()
        status, body, extra = work.result()
        headers = [
            (b"content-type", b"application/json"),
            (b"cache-control", b"no-store"),
            (b"x-content-type-options", b"nosniff"),
            *extra,
        ]
        worker = worker_header()
        if worker:
            headers.append((b"x-realtime-worker", worker.encode()))
        data = msgspec.json.encode(body)
        if status == 200 and body.get("events"):
            verdict = await ratelimit.replay_take(scope["user"].pk, len(data))
            if not verdict.allowed:
                status, body = HTTP_STATUS[ErrorCode.RATE_LIMITED], {
                    "code": ErrorCode.RATE_LIMITED, "message": "reading history too fast; wait",
                    "retry_after": verdict.retry_after}
                headers.append((b"retry-after", str(max(1, round(verdict.retry_after))).encode()))
                data = msgspec.json.encode(body)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": data})

    @staticmethod
    async def _disconnected(receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    async def answer(self, scope) -> tuple[int, dict, list]:
        host = dict(scope.get("headers", ())).get(b"host", b"").decode("latin-1")
        domain, _ = split_domain_port(host)
        if not domain or not validate_host(domain, settings.ALLOWED_HOSTS):
            return 400, {"code": ErrorCode.INVALID, "message": "bad Host header"}, []
        user = scope.get("user")
        if user is None or not user.is_authenticated or not user.is_active:
            # 401, unlike a forbidden room: the client stops and sends the person to sign in.
            return 401, {"code": ErrorCode.FORBIDDEN, "message": "sign in first"}, []
        slug = EVENTS_PATH.match(scope["path"])["slug"]
        try:
            args = query(scope)
            since = int_arg(args, "since", 0, 0)
            wait = int_arg(args, "wait", 0, 0, MAX_WAIT)
            limit = int_arg(args, "limit", PAGE_MAX, 1, PAGE_MAX)
            client, known = client_args(args)
            return 200, await wait_for_events(user, slug, since, wait, limit, epoch_arg(args), client, known), []
        except ActionError as exc:
            body = {"code": exc.code, "message": exc.message}
            extra = []
            if exc.retry_after is not None:
                body["retry_after"] = exc.retry_after
                extra.append((b"retry-after", str(max(1, round(exc.retry_after))).encode()))
            return HTTP_STATUS[exc.code], body, extra
        except Exception:
            log.exception("long poll failed user=%s room=%s", user.pk, slug)
            return 500, {"code": ErrorCode.INTERNAL, "message": "internal error"}, []


class LongPollRouter:
    """Sends long polls to LongPoll and everything else to Django."""

    def __init__(self, django_app):
        self.django_app = django_app
        self.long_poll = AuthMiddlewareStack(LongPoll())

    async def __call__(self, scope, receive, send):
        if wants_long_poll(scope):
            return await self.long_poll(scope, receive, send)
        return await self.django_app(scope, receive, send)
