"""ASGI entry point: Django for HTTP, the realtime socket for WebSocket."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
# Set up Django (apps, models) before anything imports them.
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter  # noqa: E402
from django.conf import settings  # noqa: E402

from accounts.middleware import SocketAuthMiddleware  # noqa: E402
from realtime.longpoll import LongPollRouter  # noqa: E402
from realtime.ops import OpsRouter  # noqa: E402
from realtime.proxies import ProxyHeadersMiddleware  # noqa: E402
from realtime.routing import SocketRouter, no_such_socket  # noqa: E402
from realtime.consumers import RealtimeConsumer  # noqa: E402

# The sockets there are: /ws/v1/, the full Origin checked before anything else
# (realtime/origins.py), then the session (or a ticket) fills scope["user"], both in
# one middleware (accounts/middleware.py: a few KiB less a socket than channels'
# stack). Any other path is refused (404, realtime/routing.py).
sockets = {"ws/v1/": SocketAuthMiddleware(RealtimeConsumer.as_asgi())}
if settings.REALTIME_BENCH:
    # The baseline the benchmarks compare against (bench/bare.py): a tutorial
    # consumer behind channels' own stack. Mounted only for `make bench`.
    from bench.bare import bare_socket  # noqa: E402

    sockets["ws/bench/bare/"] = bare_socket()

# The client's real address first (realtime/proxies.py), inside the protocol
# router: every limit and log line after it reads it from scope["client"]. (The
# router is the top-level app because servers that inspect the app, uvicorn among
# them, take anything but a coroutine function for ASGI 2.)
application = ProtocolTypeRouter(
    {
        # Long polls and the operations endpoints (/healthz, /readyz, /metrics) are
        # answered on the event loop, before Django (long polling, ops).
        "http": ProxyHeadersMiddleware(OpsRouter(LongPollRouter(django_asgi_app))),
        "websocket": ProxyHeadersMiddleware(SocketRouter(sockets, no_such_socket)),
    }
)
