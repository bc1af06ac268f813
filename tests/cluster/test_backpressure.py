"""A client that stops reading cannot make a worker buffer without bound: past
REALTIME_MAX_SEND_BUFFER of unsent bytes its socket is closed (4013), while the
other members of the room get every message; a replay larger than the bound is
cut between two events, and resuming brings the rest."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket

import pytest
import websockets

from tests.cluster.conftest import assert_all_caught_up, followers, login, open_socket, room_head, send_messages

pytestmark = [pytest.mark.cluster, pytest.mark.asyncio]


def stuck_socket(port: int, cookie: str) -> socket.socket:
    """A WebSocket that subscribes to #general and then never reads again."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # no autotuning: fills fast
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET /ws/v1/ HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: rt.v1.json\r\n"
            f"Origin: http://127.0.0.1:{port}\r\nCookie: {cookie}\r\n\r\n"
        ).encode()
    )
    response = b""
    while b"\r\n\r\n" not in response:
        response += sock.recv(1024)
    assert response.startswith(b"HTTP/1.1 101"), response[:80]
    payload = b'{"type":"subscribe","room":"general"}'
    mask = os.urandom(4)
    sock.sendall(bytes([0x81, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
    return sock


def read_until_closed(sock: socket.socket, timeout: float = 20) -> tuple[int, bool]:
    """Read what the server left for us; returns (bytes read, closed by the server)."""
    sock.settimeout(timeout)
    total = 0
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return total, True
            total += len(chunk)
    except ConnectionResetError:
        return total, True
    except socket.timeout:
        return total, False


async def test_a_client_that_stops_reading_is_closed_and_the_rest_get_everything(cluster):
    worker = cluster.workers[0]
    stuck = stuck_socket(worker.port, login(worker.url, "carol"))
    start = room_head(worker.url, login(worker.url, "bob"))
    try:
        async with followers(worker.url, [("bob", "127.0.0.1")], start=start) as clients:
            await asyncio.sleep(0.3)  # the stuck socket's subscribe is handled
            body = "x" * 3900
            count = 2500  # about 10 MB of frames: far more than kernel buffers plus the 1 MiB cap
            acks = await send_messages(worker.url, login(worker.url, "alice"), "general", count, "bp", window=16,
                                       body=body)
            await assert_all_caught_up(clients, acks[-1]["seq"], timeout=60)
            assert clients[0].reconnects == 0
        received, closed = await asyncio.to_thread(read_until_closed, stuck)
        assert closed, "the server must close a socket that stopped reading"
        assert received < count * len(body) / 2, f"the stuck socket was sent {received} bytes: the backlog was not cut"
        assert worker.proc.poll() is None
    finally:
        stuck.close()


async def test_a_replay_past_the_send_bound_is_cut_between_events_and_resumed(cluster):
    """A replay larger than REALTIME_MAX_SEND_BUFFER (a client that was away while
    the room took megabytes) is not all or nothing: the events that fit arrive,
    whole and in order, then 4013; subscribing again from the last of them brings
    the rest. Every event once, in order, over the sockets it took."""
    worker = cluster.workers[0]
    bob = login(worker.url, "bob")
    start = room_head(worker.url, bob)
    acks = await send_messages(worker.url, login(worker.url, "alice"), "general", 400, "big", window=16,
                               body="y" * 3900)  # about 1.6 MB of frames: more than the 1 MiB bound
    head = acks[-1]["seq"]
    got, codes, since = [], [], start
    for _ in range(10):
        if since == head:
            break
        ws = await open_socket(worker.url, bob)
        await ws.send(json.dumps({"type": "subscribe", "room": "general", "since": since, "ref": "s",
                                  "presence": False}))
        try:
            async for raw in ws:
                frame = json.loads(raw)
                if frame.get("type") == "message.new":
                    got.append(frame["seq"])
                    since = frame["seq"]
                elif frame.get("ref") == "s":
                    assert frame["type"] == "ack" and frame["seq"] == head, frame
                    break
        except websockets.ConnectionClosed as closed:
            codes.append(closed.rcvd.code if closed.rcvd else None)
        await ws.close()
    assert got == list(range(start + 1, head + 1)), "an event lost, doubled or out of order"
    assert codes and set(codes) == {4013}, codes  # (cut at least once, and only for the bound)
    assert worker.proc.poll() is None
