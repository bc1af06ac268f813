"""The baseline: a tutorial-style Channels chat consumer (group_add on connect,
group_send per message, one channel-layer send, receive and JSON encode per member).
Served by the same worker as the real pipeline, at /ws/bench/bare/, only when
REALTIME_BENCH=1 (project/asgi.py), so that both are measured in the same run.
No auth, no schema, no permissions, no persistence: it is what we must beat while
keeping all of those."""

import json

from channels.generic.websocket import AsyncWebsocketConsumer

GROUP = "bench.bare"


class BareChatConsumer(AsyncWebsocketConsumer):
    async def connect(self):
        await self.channel_layer.group_add(GROUP, self.channel_name)
        await self.accept()

    async def disconnect(self, code):
        await self.channel_layer.group_discard(GROUP, self.channel_name)

    async def receive(self, text_data=None, bytes_data=None):
        message = json.loads(text_data)["message"]
        await self.channel_layer.group_send(GROUP, {"type": "chat.message", "message": message})

    async def chat_message(self, event):
        await self.send(text_data=json.dumps({"message": event["message"]}))


def bare_socket():
    """The consumer behind channels' own stack, as a tutorial mounts it (origin
    check, session and auth, a ticket, the URL router): what project/asgi.py
    mounts at /ws/bench/bare/ for `make bench`."""
    from channels.auth import AuthMiddlewareStack
    from channels.routing import URLRouter
    from django.urls import path

    from accounts.middleware import TicketAuthMiddleware
    from realtime.web.origins import OriginValidator

    return OriginValidator(AuthMiddlewareStack(TicketAuthMiddleware(
        URLRouter([path("ws/bench/bare/", BareChatConsumer.as_asgi())]))))
