"""Routes of the REST API v1 (mounted at /api/v1/)."""

from django.urls import path

from realtime.web.api import views

urlpatterns = [
    path("rooms/", views.RoomList.as_view(), name="api-rooms"),
    path("tickets/", views.Tickets.as_view(), name="api-tickets"),
    path("rooms/<slug:slug>/events/", views.RoomEvents.as_view(), name="api-room-events"),
    path("rooms/<slug:slug>/messages/", views.RoomMessages.as_view(), name="api-room-messages"),
    path("rooms/<slug:slug>/messages/<int:message_id>/", views.RoomMessage.as_view(), name="api-room-message"),
    path("rooms/<slug:slug>/read/", views.RoomRead.as_view(), name="api-room-read"),
]
