"""HTML pages: the room list, the chat and the staff dashboard."""

from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

from realtime import protocol
from realtime.domain.access import room_access
from realtime.domain import selectors
from realtime.domain.errors import ActionError
from realtime.domain.policy import Action, can
from realtime.models import RoomKind


@login_required
def home(request: HttpRequest) -> HttpResponse:
    return render(request, "realtime/home.html", {"rooms": selectors.visible_rooms(user=request.user)})


@login_required
def room(request: HttpRequest, slug: str) -> HttpResponse:
    try:
        access = room_access(user=request.user, slug=slug, action=Action.VIEW)
    except ActionError as exc:
        # The site's own page with the way back, whatever DEBUG says: a person
        # following a link to a room they cannot open is not a developer. A private
        # room looks exactly like a missing one.
        if exc.code == protocol.ErrorCode.NOT_FOUND:
            return render(request, "404.html", status=404)
        return render(request, "403.html", status=403)
    room = access.room
    if room.kind == RoomKind.DM:
        # Its title as this person sees it: the others' names (shown, never saved).
        room.title = selectors.dm_title(user=request.user, room=room)
    rooms = selectors.visible_rooms(user=request.user)
    config = {
        "room": room.slug,
        # A DM ("dm") lists apart from rooms and has no join, leave or invite.
        "kind": room.kind,
        "title": room.title,
        "topic": room.topic,
        "user": request.user.get_username(),
        "canPost": bool(can(request.user, Action.POST, is_public=room.is_public, role=access.role, kind=room.kind)),
        "canModerate": bool(
            can(request.user, Action.DELETE, is_public=room.is_public, role=access.role, author_id=None, kind=room.kind)
        ),
        # Whether to offer adding members (and changing the member and reader roles).
        "canManageMembers": bool(
            can(request.user, Action.MANAGE_MEMBERS, is_public=room.is_public, role=access.role, kind=room.kind)
        ),
        "role": access.role,
        "isPublic": room.is_public,
        # The room list (rooms and DMs, with unread and mention counts): the sidebar
        # draws it, and asks GET rooms/ again as it goes.
        "rooms": rooms,
        "wsPath": protocol.PATH,
        "maxBodyLength": settings.REALTIME["MAX_BODY_LENGTH"],
        "apiBase": "/api/v1/",
        "loginUrl": "/accounts/login/",
        # How far this user has read the room: the page opens at the first unread message.
        "read": next((r["read"] for r in rooms if r["slug"] == access.room.slug), 0),
    }
    return render(
        request,
        "realtime/room.html",
        {"room": access.room, "role": access.role, "rooms": rooms, "config": config},
    )


@login_required
def dashboard(request: HttpRequest) -> HttpResponse:
    """The live operations dashboard (staff only; fed by metrics.tick over the socket)."""
    if not request.user.is_staff:
        raise PermissionDenied("the dashboard is for staff")
    config = {"user": request.user.get_username(), "wsPath": protocol.PATH, "loginUrl": "/accounts/login/"}
    return render(request, "realtime/dashboard.html", {"config": config})
