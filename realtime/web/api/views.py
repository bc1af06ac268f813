"""REST API v1: the same actions as the socket, over session-authenticated HTTP."""

from __future__ import annotations

import msgspec
from asgiref.sync import async_to_sync
from rest_framework import status
from rest_framework.exceptions import ParseError
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from accounts import tickets
from accounts.models import probation_until, send_bucket

from realtime import protocol
from realtime.delivery import publish as broadcast
from realtime.domain import roomlog
from realtime.domain import selectors
from realtime.domain import services
from realtime.observability import metrics
from realtime.state import degraded
from realtime.state import ratelimit as buckets
from realtime.domain.errors import ActionError
from realtime.web.longpoll import epoch_arg, events_page, int_arg
from realtime.protocol import ErrorCode

def error_response(code: ErrorCode, message: str, retry_after: float | None = None) -> Response:
    body = {"code": str(code), "message": message}
    headers = {}
    if retry_after is not None:
        body["retry_after"] = retry_after
        headers["Retry-After"] = str(max(1, round(retry_after)))
    return Response(body, status=protocol.HTTP_STATUS[code], headers=headers)


def int_param(request: Request, name: str, default: int | None, minimum: int = 0) -> int | None:
    return int_arg(request.query_params, name, default, minimum)


class ActionView(APIView):
    """Translates ActionError into the documented error body and status."""

    def handle_exception(self, exc):
        if isinstance(exc, ActionError):
            return error_response(exc.code, exc.message, exc.retry_after)
        return super().handle_exception(exc)


class RoomList(ActionView):
    def get(self, request: Request) -> Response:
        return Response({"rooms": selectors.visible_rooms(user=request.user)})


def replayed(request: Request, read):
    """A page read from the log, within the user's replay budget (ratelimit.py):
    refused while this worker knows the user in debt, else its size (as JSON) is
    taken before it is sent, which a user found in debt then is refused."""
    budget = buckets.replay_check(request.user.pk)
    if not budget.allowed:
        raise ActionError(ErrorCode.RATE_LIMITED, "reading history too fast; wait", retry_after=budget.retry_after)
    page = read()
    verdict = buckets.replay_take_sync(request.user.pk, len(msgspec.json.encode(page)))
    if not verdict.allowed:
        raise ActionError(ErrorCode.RATE_LIMITED, "reading history too fast; wait", retry_after=verdict.retry_after)
    return Response(page)


class RoomEvents(ActionView):
    """The room's log after `since`: the same event shapes as the socket. With
    `wait`, the request is a long poll, answered by realtime/web/longpoll.py before it
    reaches Django."""

    def get(self, request: Request, slug: str) -> Response:
        since = int_param(request, "since", 0)
        limit = int_param(request, "limit", 500, minimum=1)
        epoch = epoch_arg(request.query_params)
        return replayed(request, lambda: events_page(
            roomlog.room_replay(user=request.user, slug=slug, since=since, limit=limit, epoch=epoch), since))


class RoomMessages(ActionView):
    """GET: a page of history (newest last) with the seq it is current to.
    POST: send a message, with the socket's idempotency by client_id."""

    def get(self, request: Request, slug: str) -> Response:
        before = int_param(request, "before", None, minimum=1)
        limit = int_param(request, "limit", 50, minimum=1)
        return replayed(request, lambda: selectors.room_messages(user=request.user, slug=slug, before=before, limit=limit))

    def post(self, request: Request, slug: str) -> Response:
        data = parse_body(request, protocol.MessagePost)
        take_token(request, send_bucket(probation_until(request.user.pk)))
        result = services.perform_sync(
            services.message_send, user=request.user, slug=slug, body=data.body, client_id=data.client_id
        )
        metrics.WINDOW.message_in(result.room)
        return ack(result)


class RoomMessage(ActionView):
    """PATCH: edit a message; DELETE: delete it. The socket's message.edit and
    message.delete, with the same rules, rate limits and ack."""

    def patch(self, request: Request, slug: str, message_id: int) -> Response:
        data = parse_body(request, protocol.MessagePatch)
        take_token(request, "message.edit")
        result = services.perform_sync(
            services.message_edit, user=request.user, slug=slug, message_id=message_id, body=data.body
        )
        return ack(result)

    def delete(self, request: Request, slug: str, message_id: int) -> Response:
        take_token(request, "message.delete")
        result = services.perform_sync(services.message_delete, user=request.user, slug=slug, message_id=message_id)
        return ack(result)


class RoomRead(ActionView):
    """POST {"seq"}: the socket's `read` over HTTP (the long-polling fallback)."""

    def post(self, request: Request, slug: str) -> Response:
        data = parse_body(request, protocol.ReadPost)
        take_token(request, "read")
        result = services.mark_read(user=request.user, slug=slug, seq=data.seq)
        async_to_sync(broadcast.publish_read)(result, request.user)
        return Response({"room": result.room, "seq": result.seq})


def parse_body(request: Request, shape):
    try:
        return msgspec.convert(request.data, shape)
    except (msgspec.ValidationError, ParseError) as exc:
        raise ActionError(ErrorCode.INVALID, str(exc)) from None


def take_token(request: Request, action: str) -> None:
    """The socket's token bucket for this action, shared with the REST call."""
    verdict = async_to_sync(buckets.take)(request.user.pk, action)
    if not verdict.allowed:
        raise ActionError(ErrorCode.RATE_LIMITED, "too many; slow down", retry_after=verdict.retry_after)


def ack(result) -> Response:
    """The same fields as the socket's ack."""
    return Response({"room": result.room, "id": result.id, "seq": result.seq})


class Tickets(ActionView):
    """A single-use ticket, valid for 30 s, to open /ws/v1/?ticket=... without the
    session cookie. It stands for the session that asked for it."""

    def post(self, request: Request) -> Response:
        take_token(request, "ticket")
        try:
            ticket = tickets.issue(user_id=request.user.pk, session_key=request.session.session_key)
        except Exception as exc:
            # The ticket store (Redis) is down (state/degraded.py): try again shortly.
            degraded.tolerate(degraded.TICKETS, exc)
            return Response({"code": str(ErrorCode.INTERNAL), "message": "tickets are unavailable; try again shortly",
                             "retry_after": 5}, status=503, headers={"Retry-After": "5"})
        return Response({"ticket": ticket, "expires_in": tickets.TICKET_TTL}, status=status.HTTP_201_CREATED)
