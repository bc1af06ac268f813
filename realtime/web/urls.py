"""Page routes."""

from django.urls import path

from realtime.web import pages as views

urlpatterns = [
    path("", views.home, name="home"),
    path("rooms/<slug:slug>/", views.room, name="room"),
    path("dashboard/", views.dashboard, name="dashboard"),
]
