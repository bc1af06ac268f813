"""Routes of the REST API v1 (mounted at /api/v1/)."""

from django.urls import path, re_path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerSplitView

from realtime.web.api import views

urlpatterns = [
    path("rooms/", views.RoomList.as_view(), name="api-rooms"),
    path("search/", views.Search.as_view(), name="api-search"),
    path("people/", views.People.as_view(), name="api-people"),
    # The OpenAPI 3 schema of this API, and Swagger UI over it (its script a file:
    # the page runs under the app's Content-Security-Policy).
    path("schema/", SpectacularAPIView.as_view(), name="api-schema"),
    path("docs/", SpectacularSwaggerSplitView.as_view(url_name="api-schema", template_name="api/docs.html"),
         name="api-docs"),
    path("tickets/", views.Tickets.as_view(), name="api-tickets"),
    path("rooms/<slug:slug>/events/", views.RoomEvents.as_view(), name="api-room-events"),
    path("rooms/<slug:slug>/messages/", views.RoomMessages.as_view(), name="api-room-messages"),
    path("rooms/<slug:slug>/messages/<int:message_id>/", views.RoomMessage.as_view(), name="api-room-message"),
    path("rooms/<slug:slug>/messages/<int:message_id>/reactions/", views.RoomReactions.as_view(),
         name="api-room-reactions"),
    path("rooms/<slug:slug>/read/", views.RoomRead.as_view(), name="api-room-read"),
    path("rooms/<slug:slug>/typing/", views.RoomTyping.as_view(), name="api-room-typing"),
    path("rooms/<slug:slug>/presence/leave/", views.RoomPresenceLeave.as_view(), name="api-room-presence-leave"),
    path("rooms/<slug:slug>/join/", views.RoomJoin.as_view(), name="api-room-join"),
    path("rooms/<slug:slug>/leave/", views.RoomLeave.as_view(), name="api-room-leave"),
    path("rooms/<slug:slug>/members/", views.RoomMembers.as_view(), name="api-room-members"),
    path("rooms/<slug:slug>/members/<str:username>/", views.RoomMember.as_view(), name="api-room-member"),
    path("dms/", views.DirectMessages.as_view(), name="api-dms"),
    # Anything else under /api/v1/ (a path whose slug or id does not parse): the
    # API's JSON 404, not the site's HTML page.
    re_path(r"^", views.no_such_endpoint, name="api-not-found"),
]
