"""WebSocket routes."""

import os

from django.urls import path

from .consumers import RealtimeConsumer

websocket_urlpatterns = [
    path("ws/v1/", RealtimeConsumer.as_asgi()),
]

if os.environ.get("REALTIME_BENCH") == "1":
    # The baseline the benchmarks compare against (bench/bare.py); never in production.
    from bench.bare import BareChatConsumer

    websocket_urlpatterns.append(path("ws/bench/bare/", BareChatConsumer.as_asgi()))
