"""URL routes."""

from django.contrib import admin
from django.templatetags.static import static
from django.urls import include, path
from django.views.generic import RedirectView


class FaviconView(RedirectView):
    """Browsers ask for /favicon.ico on pages that name no icon (the admin's, the API's):
    send them to the app's SVG icon instead of a 404. Resolved per request, so a
    hashed static storage would be followed too."""

    permanent = True

    def get_redirect_url(self, *args, **kwargs) -> str:
        return static("realtime/favicon.svg")


urlpatterns = [
    path("accounts/", include("accounts.urls")),
    path("admin/", admin.site.urls),
    path("api/v1/", include("realtime.web.api.urls")),
    path("favicon.ico", FaviconView.as_view(), name="favicon"),
    path("", include("realtime.web.urls")),
]
