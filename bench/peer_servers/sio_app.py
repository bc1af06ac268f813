"""python-socketio as bench/peers.py measures it: an ASGI app under uvicorn (its
uvloop, httptools and websockets), one process, its default in-memory manager,
the WebSocket transport only. What it does is what bench/peer_servers/server.js does
for Node: an acknowledged `join` enters the room; `message` (room, text) is
emitted to the whole room, the sender included."""

import socketio

sio = socketio.AsyncServer(async_mode="asgi", transports=["websocket"], cors_allowed_origins="*",
                           max_http_buffer_size=65536, logger=False, engineio_logger=False)


@sio.on("join")
async def join(sid, room):
    if not isinstance(room, str):
        return False
    await sio.enter_room(sid, room)
    return True


@sio.on("message")
async def message(sid, room, text):
    if isinstance(room, str):
        await sio.emit("message", text, room=room)


app = socketio.ASGIApp(sio)
