"""WebSocket routes."""

import os

from django.urls import path

from .consumers import RealtimeConsumer

realtime_socket = RealtimeConsumer.as_asgi()

websocket_urlpatterns = [
    path("ws/v1/", realtime_socket),
]

if os.environ.get("REALTIME_BENCH") == "1":
    # The baseline the benchmarks compare against (bench/bare.py); never in production.
    from bench.bare import BareChatConsumer

    websocket_urlpatterns.append(path("ws/bench/bare/", BareChatConsumer.as_asgi()))


class SocketRouter:
    """The paths in `routes` (`ws/v1/`: as channels' URLRouter matches them, after
    the root path) straight to their app; any other to `other`.

    Not a coroutine function: it hands back the app's own awaitable, so that it
    keeps no frame of its own waiting for the socket's whole life."""

    def __init__(self, routes: dict, other):
        self.routes = routes
        self.other = other

    def __call__(self, scope, receive, send):
        route = scope.get("path", "")
        root = scope.get("root_path", "")
        if root and route.startswith(root):
            route = route[len(root):]
        return self.routes.get(route.lstrip("/"), self.other)(scope, receive, send)
