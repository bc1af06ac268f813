"""Long polling, for clients whose WebSockets are blocked:
`GET /api/v1/rooms/<slug>/events/?since=N&wait=S`.

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

from realtime.state import degraded, heartbeat, ratelimit
from realtime.delivery import publish as broadcast
from realtime.domain import roomlog
from realtime.delivery.fanout import fanout
from realtime.web.middleware import worker_header
from realtime.domain.errors import ActionError
from realtime.observability import metrics
from realtime.protocol import HTTP_STATUS, ErrorCode

log = logging.getLogger(__name__)

EVENTS_PATH = re.compile(r"^/api/v1/rooms/(?P<slug>[-a-zA-Z0-9_]+)/events/$")
MAX_WAIT = 30  # seconds; proxies in deploy/ allow 60 for /api/
RECHECK = 5.0  # seconds between log reads while waiting (a lost broadcast costs this)
PAGE_MAX = 500

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


def events_page(replay: roomlog.Replay, since: int) -> dict:
    """The answer of GET .../events/ (with or without wait)."""
    events = [msgspec.to_builtins(e) for e in replay.events]
    last = events[-1]["seq"] if events else since
    # `seq` is the room's head in the log `epoch`; when has_more, ask again with
    # since=<last event's seq> (and the epoch).
    return {"events": events, "seq": replay.head, "epoch": replay.epoch, "has_more": last < replay.head}


async def wait_for_events(user, slug: str, since: int, wait: float, limit: int, epoch: str | None = None) -> dict:
    verdict = await ratelimit.take(user.pk, "poll")
    if not verdict.allowed:
        raise ActionError(ErrorCode.RATE_LIMITED, "polling too often; slow down", retry_after=verdict.retry_after)
    read = database_sync_to_async(roomlog.room_replay)
    group = broadcast.room_group(slug)
    waiter = held = Waiter()
    HELD.add(held)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    try:
        try:
            await fanout().add(group, waiter)
        except Exception as exc:
            # No transport (Redis down): read the log every second instead.
            degraded.tolerate(degraded.LONG_POLL, exc)
            waiter = None
        while True:
            if waiter is not None:
                waiter.woken.clear()  # what arrives during the read wakes the next wait
            # The replay budget: in debt, the head alone is read, and a poll that
            # would bring events is refused (one that waits for them may wait).
            budget = ratelimit.replay_check(user.pk)
            replay = await read(user=user, slug=slug, since=since, limit=limit, head_only=not budget.allowed,
                                epoch=epoch)
            if replay.held_back:
                raise ActionError(ErrorCode.RATE_LIMITED, "reading history too fast; wait",
                                  retry_after=budget.retry_after)
            remaining = deadline - loop.time()
            if replay.events or remaining <= 0 or heartbeat.draining:
                return events_page(replay, since)
            if waiter is None:
                await asyncio.sleep(min(remaining, 1.0))
                continue
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(waiter.woken.wait(), min(remaining, RECHECK))
    finally:
        HELD.discard(held)
        if waiter is not None:
            with contextlib.suppress(Exception):
                await fanout().discard(group, waiter)


def end_held_polls() -> None:
    """The worker drains (heartbeat.draining is set): wake every held poll, which
    then answers with what it has instead of waiting on."""
    for waiter in list(HELD):
        waiter.woken.set()


# The polls this worker holds (end_held_polls wakes them).
HELD: set["Waiter"] = set()
metrics.LONG_POLLS_HELD.set_function(lambda: len(HELD))


class Waiter:
    """A held poll as the worker's fan-out sees it: anything for the room (an
    event, an access check, a catch-up after a layer failure) wakes it, and it
    reads the log again."""

    __slots__ = ("woken",)

    def __init__(self) -> None:
        self.woken = asyncio.Event()

    async def deliver(self, message: dict) -> bool:
        self.woken.set()
        return True

    def put_nowait(self, message: dict) -> None:
        self.woken.set()

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
            return 200, await wait_for_events(user, slug, since, wait, limit, epoch_arg(args)), []
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
