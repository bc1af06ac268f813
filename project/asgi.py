"""ASGI entry point: Django for HTTP, the realtime socket for WebSocket."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
# Set up Django (apps, models) before anything imports them.
django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402

from accounts.middleware import SocketAuthMiddleware, TicketAuthMiddleware  # noqa: E402
from realtime.longpoll import LongPollRouter  # noqa: E402
from realtime.ops import OpsRouter  # noqa: E402
from realtime.origins import OriginValidator  # noqa: E402
from realtime.routing import SocketRouter, realtime_socket, websocket_urlpatterns  # noqa: E402

application = ProtocolTypeRouter(
    {
        # Long polls and the operations endpoints (/healthz, /readyz, /metrics) are
        # answered on the event loop, before Django (realtime/longpoll.py, ops.py).
        "http": OpsRouter(LongPollRouter(django_asgi_app)),
        # The full Origin is checked before anything else (realtime/origins.py);
        # then the session (or a ticket) fills scope["user"]. For /ws/v1/ both in
        # one middleware (accounts/middleware.py: a few KiB less a socket than
        # channels' stack); any other path (the bench's baseline) through
        # channels' stack as before.
        "websocket": SocketRouter(
            {"ws/v1/": SocketAuthMiddleware(realtime_socket)},
            OriginValidator(AuthMiddlewareStack(TicketAuthMiddleware(URLRouter(websocket_urlpatterns)))),
        ),
    }
)
