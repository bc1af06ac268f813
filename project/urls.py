"""URL routes."""

from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    path("accounts/", include("accounts.urls")),
    path("admin/", admin.site.urls),
    path("api/v1/", include("realtime.web.api.urls")),
    path("", include("realtime.web.urls")),
]
