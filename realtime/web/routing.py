"""WebSocket routes: `/ws/v1/`, and nothing else.

An unknown path is refused before the handshake completes, with one warning
line: HTTP 404 where the server offers the ASGI WebSocket denial response
extension (`websocket.http.response`: our daphne launcher, realtime/server/bounded.py),
else the close-before-accept every ASGI server answers with 403. Never a
traceback (channels' URLRouter raises for an unknown path: a 500 and an ERROR
log line per request).
"""

import logging

log = logging.getLogger(__name__)


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


async def no_such_socket(scope, receive, send) -> None:
    """Refuse a socket on a path that has none: 404 where the server can say so."""
    from realtime.observability.logs import event

    event(log, logging.WARNING, "ws.refused", reason="path", frame=str(scope.get("path", ""))[:100],
          addr=(scope.get("client") or [""])[0])
    message = await receive()
    if message["type"] != "websocket.connect":
        return
    if "websocket.http.response" in (scope.get("extensions") or {}):
        await send({"type": "websocket.http.response.start", "status": 404,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8")]})
        await send({"type": "websocket.http.response.body", "body": b"no such socket\n"})
    else:
        await send({"type": "websocket.close"})
