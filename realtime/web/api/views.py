"""REST API v1: the same actions as the socket, over session-authenticated HTTP."""

from __future__ import annotations

import re

import msgspec
from django.http import JsonResponse
from asgiref.sync import async_to_sync
from rest_framework import status
from drf_spectacular.utils import extend_schema
from rest_framework.exceptions import APIException, ParseError
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from accounts import tickets
from accounts.models import probation_until, send_bucket

from realtime import protocol
from realtime.delivery import publish as broadcast
from realtime.domain import roomlog
from realtime.domain.access import room_access
from realtime.domain.policy import Action
from realtime.domain import rooms
from realtime.domain import search
from realtime.domain import selectors
from realtime.domain import services
from realtime.observability import metrics
from realtime.state import degraded
from realtime.state import ratelimit as buckets
from realtime.domain.errors import NO_SUCH_ROOM, ActionError
from realtime.web.api import schema as doc
from realtime.web.longpoll import epoch_arg, events_page, int_arg, poll_goodbye
from realtime.protocol import ROOM_SLUG_PATTERN, ErrorCode

# A room slug as the protocol declares it (anything else names no room).
SLUG = re.compile(ROOM_SLUG_PATTERN.replace("$", r"\Z"))


def error_response(code: ErrorCode, message: str, retry_after: float | None = None) -> Response:
    body = {"code": str(code), "message": message}
    headers = {}
    if retry_after is not None:
        body["retry_after"] = retry_after
        headers["Retry-After"] = str(max(1, round(retry_after)))
    return Response(body, status=protocol.HTTP_STATUS[code], headers=headers)


def int_param(request: Request, name: str, default: int | None, minimum: int = 0) -> int | None:
    return int_arg(request.query_params, name, default, minimum)


# DRF's own refusals (not signed in, CSRF, method, media type), as error codes.
DRF_CODES = {400: ErrorCode.INVALID, 401: ErrorCode.FORBIDDEN, 403: ErrorCode.FORBIDDEN,
             404: ErrorCode.NOT_FOUND, 413: ErrorCode.TOO_LARGE, 429: ErrorCode.RATE_LIMITED}


def no_such_endpoint(request, *args, **kwargs) -> JsonResponse:
    return JsonResponse({"code": str(ErrorCode.NOT_FOUND), "message": "no such endpoint"}, status=404)


class ActionView(APIView):
    """Translates ActionError, and DRF's own exceptions, into the one documented
    error body ({"code", "message", "retry_after"?}) and its status."""

    def handle_exception(self, exc):
        if isinstance(exc, ActionError):
            return error_response(exc.code, exc.message, exc.retry_after)
        response = super().handle_exception(exc)
        if isinstance(exc, APIException) and isinstance(response.data, dict) and "detail" in response.data:
            code = DRF_CODES.get(response.status_code, ErrorCode.INVALID)
            response.data = {"code": str(code), "message": str(response.data["detail"])}
        return response


class RoomList(ActionView):
    """GET: the rooms the user may see (`?browse=public`: the public rooms they
    could join). POST: make a room; its maker is its owner."""

    @extend_schema(summary="The rooms the user may see", parameters=[doc.BROWSE],
                   responses={200: doc.RoomList, **doc.errors()})
    def get(self, request: Request) -> Response:
        browse = request.query_params.get("browse")
        if browse not in (None, "public"):
            raise ActionError(ErrorCode.INVALID, "browse is public (the public rooms you are not in) or absent")
        return Response({"rooms": selectors.visible_rooms(user=request.user, browse=browse == "public")})

    @extend_schema(summary="Make a room (its maker is its owner)", request={"application/json": doc.ref("RoomCreate")},
                   responses={201: doc.Room, **doc.errors(409, 413, 415, 429)})
    def post(self, request: Request) -> Response:
        data = parse_body(request, protocol.RoomCreate)
        take_token(request, "room.create")
        room = services.perform_sync(rooms.room_create, user=request.user, name=data.name,
                                     visibility=data.visibility, topic=data.topic)
        [summary] = selectors.visible_rooms(user=request.user, slug=room.slug)
        return Response(summary, status=status.HTTP_201_CREATED)


class RoomJoin(ActionView):
    """POST: join a public room (already a member: the same answer, nothing changes)."""

    @extend_schema(summary="Join a public room", parameters=[doc.SLUG], request=None,
                   responses={200: doc.Membership, **doc.errors(404, 429)})
    def post(self, request: Request, slug: str) -> Response:
        take_token(request, "member.change")
        return Response(services.perform_sync(rooms.room_join, user=request.user, slug=slug).as_dict())


class RoomLeave(ActionView):
    """POST: leave a room (not a member: the same answer; the last owner: 409)."""

    @extend_schema(summary="Leave a room", parameters=[doc.SLUG], request=None,
                   responses={200: doc.Membership, **doc.errors(404, 409, 429)})
    def post(self, request: Request, slug: str) -> Response:
        take_token(request, "member.change")
        return Response(services.perform_sync(rooms.room_leave, user=request.user, slug=slug).as_dict())


class RoomMembers(ActionView):
    """GET: the room's members and their roles. POST {"username", "role"?}: add one."""

    @extend_schema(summary="The room's members", parameters=[doc.SLUG],
                   responses={200: doc.MemberList, **doc.errors(404)})
    def get(self, request: Request, slug: str) -> Response:
        return Response(selectors.room_members(user=request.user, slug=slug))

    @extend_schema(summary="Add a member", parameters=[doc.SLUG], request={"application/json": doc.ref("MemberAdd")},
                   responses={201: doc.Membership, **doc.errors(404, 409, 415, 429)})
    def post(self, request: Request, slug: str) -> Response:
        data = parse_body(request, protocol.MemberAdd)
        take_token(request, "member.change")
        result = services.perform_sync(rooms.member_add, user=request.user, slug=slug, username=data.username,
                                       role=data.role)
        return Response(result.as_dict(), status=status.HTTP_201_CREATED)


class RoomMember(ActionView):
    """PATCH {"role"}: change a member's role. DELETE: remove them (oneself: leave)."""

    @extend_schema(summary="Change a member's role", parameters=[doc.SLUG, doc.USERNAME],
                   request={"application/json": doc.ref("MemberPatch")},
                   responses={200: doc.Membership, **doc.errors(404, 409, 415, 429)})
    def patch(self, request: Request, slug: str, username: str) -> Response:
        data = parse_body(request, protocol.MemberPatch)
        take_token(request, "member.change")
        result = services.perform_sync(rooms.member_set_role, user=request.user, slug=slug, username=username,
                                       role=data.role)
        return Response(result.as_dict())

    @extend_schema(summary="Remove a member (oneself: leave)", parameters=[doc.SLUG, doc.USERNAME], request=None,
                   responses={200: doc.Membership, **doc.errors(404, 409, 429)})
    def delete(self, request: Request, slug: str, username: str) -> Response:
        take_token(request, "member.change")
        result = services.perform_sync(rooms.member_remove, user=request.user, slug=slug, username=username)
        return Response(result.as_dict())


class DirectMessages(ActionView):
    """POST {"users": [...]}: the one DM of exactly these people and the asker;
    201 when it was made now, 200 when it existed."""

    @extend_schema(summary="The direct message of these people and the asker",
                   request={"application/json": doc.ref("DmOpen")},
                   responses={200: doc.Room, 201: doc.Room, **doc.errors(404, 413, 415, 429)})
    def post(self, request: Request) -> Response:
        data = parse_body(request, protocol.DmOpen)
        take_token(request, "dm.open")
        room, created = services.perform_sync(rooms.dm_open, user=request.user, usernames=data.users)
        [summary] = selectors.visible_rooms(user=request.user, slug=room.slug)
        return Response(summary, status=status.HTTP_201_CREATED if created else status.HTTP_200_OK)


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

    @extend_schema(
        summary="The room's log after `since`",
        parameters=[doc.SLUG, doc.integer("since", "the last seq the client has (default 0)"),
                    doc.integer("limit", "events a page (default 500)", minimum=1),
                    doc.EPOCH, doc.integer("wait", "hold the request up to this many seconds (1 to 30) until the "
                                           "room has an event after since: a long poll", maximum=30),
                    doc.CLIENT, doc.PRESENCE_TAG],
        responses={200: doc.EVENT_PAGE, **doc.errors(401, 404, 410, 429)},
    )
    def get(self, request: Request, slug: str) -> Response:
        since = int_param(request, "since", 0)
        limit = int_param(request, "limit", 500, minimum=1)
        epoch = epoch_arg(request.query_params)
        return replayed(request, lambda: events_page(
            roomlog.room_replay(user=request.user, slug=slug, since=since, limit=limit, epoch=epoch), since))


class RoomMessages(ActionView):
    """GET: a page of history (newest last) with the seq it is current to.
    POST: send a message, with the socket's idempotency by client_id."""

    @extend_schema(
        summary="A page of history, newest last",
        parameters=[doc.SLUG, doc.integer("before", "only messages with a lower seq", minimum=1),
                    doc.integer("limit", "messages a page (default 50, at most REALTIME_HISTORY_PAGE_MAX)", minimum=1)],
        responses={200: doc.MessagePage, **doc.errors(404, 429)},
    )
    def get(self, request: Request, slug: str) -> Response:
        before = int_param(request, "before", None, minimum=1)
        limit = int_param(request, "limit", 50, minimum=1)
        return replayed(request, lambda: selectors.room_messages(user=request.user, slug=slug, before=before, limit=limit))

    @extend_schema(
        summary="Send a message (a repeat of its client_id returns the original)",
        parameters=[doc.SLUG], request={"application/json": doc.ref("MessagePost")},
        responses={200: doc.Ack, **doc.errors(404, 409, 413, 415, 429)},
    )
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

    @extend_schema(
        summary="Edit one's own message",
        parameters=[doc.SLUG, doc.MESSAGE_ID], request={"application/json": doc.ref("MessagePatch")},
        responses={200: doc.Ack, **doc.errors(404, 413, 415, 429)},
    )
    def patch(self, request: Request, slug: str, message_id: int) -> Response:
        data = parse_body(request, protocol.MessagePatch)
        take_token(request, "message.edit")
        result = services.perform_sync(
            services.message_edit, user=request.user, slug=slug, message_id=message_id, body=data.body
        )
        return ack(result)

    @extend_schema(
        summary="Delete a message (its author, or a moderator)",
        parameters=[doc.SLUG, doc.MESSAGE_ID], request=None,
        responses={200: doc.Ack, **doc.errors(404, 429)},
    )
    def delete(self, request: Request, slug: str, message_id: int) -> Response:
        take_token(request, "message.delete")
        result = services.perform_sync(services.message_delete, user=request.user, slug=slug, message_id=message_id)
        return ack(result)


class RoomReactions(ActionView):
    """POST {"emoji"}: the socket's reaction.add; DELETE {"emoji"}: reaction.remove.
    Same rules, rate limits and ack (`seq` absent when nothing changed)."""

    @extend_schema(summary="React to a message", parameters=[doc.SLUG, doc.MESSAGE_ID],
                   request={"application/json": doc.ref("ReactionPost")},
                   responses={200: doc.ReactionAck, **doc.errors(404, 409, 415, 429)})
    def post(self, request: Request, slug: str, message_id: int) -> Response:
        return self.react(request, slug, message_id, "reaction.add", services.reaction_add)

    @extend_schema(summary="Take back one's reaction", parameters=[doc.SLUG, doc.MESSAGE_ID],
                   request={"application/json": doc.ref("ReactionPost")},
                   responses={200: doc.ReactionAck, **doc.errors(404, 415, 429)})
    def delete(self, request: Request, slug: str, message_id: int) -> Response:
        return self.react(request, slug, message_id, "reaction.remove", services.reaction_remove)

    def react(self, request: Request, slug: str, message_id: int, action: str, fn) -> Response:
        data = parse_body(request, protocol.ReactionPost)
        take_token(request, action)
        result = services.perform_sync(fn, user=request.user, slug=slug, message_id=message_id, emoji=data.emoji)
        body = {"room": result.room, "id": result.id, "emoji": result.emoji}
        if result.seq is not None:
            body["seq"] = result.seq
        return Response(body)


class RoomRead(ActionView):
    """POST {"seq"}: the socket's `read` over HTTP (the long-polling fallback)."""

    @extend_schema(
        summary="Mark the room read up to seq",
        parameters=[doc.SLUG], request={"application/json": doc.ref("ReadPost")},
        responses={200: doc.ReadAck, **doc.errors(404, 415, 429)},
    )
    def post(self, request: Request, slug: str) -> Response:
        data = parse_body(request, protocol.ReadPost)
        take_token(request, "read")
        result = services.mark_read(user=request.user, slug=slug, seq=data.seq)
        async_to_sync(broadcast.publish_read)(result, request.user)
        return Response({"room": result.room, "seq": result.seq})


class RoomTyping(ActionView):
    """POST: the socket's `typing` over HTTP (the long-polling fallback): the same
    rule (only those who may post may type), bucket and throttle."""

    @extend_schema(
        summary="Tell the room you are typing",
        parameters=[doc.SLUG], request=None,
        responses={200: doc.TypingAck, **doc.errors(404, 429)},
    )
    def post(self, request: Request, slug: str) -> Response:
        take_token(request, "typing")
        room_access(user=request.user, slug=slug, action=Action.POST)
        sent = async_to_sync(broadcast.publish_typing)(request.user, slug)
        return Response({"room": slug, "sent": sent})


class RoomPresenceLeave(ActionView):
    """POST {"client": the page's poll id}: a polling page is going; it leaves the
    room's presence at once (longpoll.poll_goodbye). 204, whether or not it was there."""

    @extend_schema(
        summary="A polling page leaves the room's presence",
        parameters=[doc.SLUG], request={"application/json": doc.ref("PresenceLeave")},
        responses={204: None, **doc.errors(404, 413, 415, 429)},
    )
    def post(self, request: Request, slug: str) -> Response:
        data = parse_body(request, protocol.PresenceLeave)
        take_token(request, "poll")
        async_to_sync(poll_goodbye)(request.user, slug, data.client)
        return Response(status=status.HTTP_204_NO_CONTENT)


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


class Search(ActionView):
    """GET ?q=...[&room=slug][&before=id][&limit=n]: messages the user may read now
    that match q, newest first (domain/search.py), within the user's search bucket."""

    @extend_schema(
        summary="Search the messages one may read",
        parameters=doc.SEARCH, responses={200: doc.SearchPage, **doc.errors(404, 429)},
    )
    def get(self, request: Request) -> Response:
        params = request.query_params
        room = params.get("room") or None
        if room is not None and not (len(room) <= 50 and SLUG.match(room)):
            raise ActionError(ErrorCode.NOT_FOUND, NO_SUCH_ROOM)
        before = int_param(request, "before", None, minimum=1)
        limit = int_arg(params, "limit", search.DEFAULT_PAGE, 1, search.MAX_PAGE)
        search.clean_query(params.get("q", ""))  # a bad query costs no token
        take_token(request, "search")
        return Response(search.message_search(
            user=request.user, q=params.get("q", ""), room=room, before=before, limit=limit))


class People(ActionView):
    """GET ?q=<the start of a username>: the people a DM or an invitation may name
    (selectors.people), for the page's pickers."""

    @extend_schema(summary="People whose username starts so", parameters=doc.PEOPLE,
                   responses={200: doc.PeoplePage, **doc.errors(429)})
    def get(self, request: Request) -> Response:
        q = request.query_params.get("q", "")
        selectors.people_prefix(q)  # a bad prefix costs no token
        take_token(request, "people")
        return Response({"people": selectors.people(user=request.user, prefix=q)})


class Tickets(ActionView):
    """A single-use ticket, valid for 30 s, to open /ws/v1/?ticket=... without the
    session cookie. It stands for the session that asked for it."""

    @extend_schema(
        summary="A socket ticket", request=None,
        responses={201: doc.Ticket, **doc.errors(429, 503)},
    )
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
