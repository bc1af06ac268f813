"""Hostile input against a real worker: malformed frames at the byte level, floods,
memory pressure. The worker must stay up, answer each case with its documented
error or close code, store nothing, broadcast nothing, and keep its memory bounded
(realtime/server/bounded.py: at most 1 MiB or 256 frames waiting per socket on the way in,
1 MiB on the way out)."""

from __future__ import annotations

import asyncio
import json
import statistics
import threading
import time

import pytest

from tests.cluster import rawws
from tests.cluster.conftest import ONCE, login, open_socket, room_head

pytestmark = [pytest.mark.cluster, pytest.mark.asyncio]


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


class Listener:
    """A member subscribed to #general on the other worker, recording what arrives."""

    def __init__(self, base: str, cookie: str):
        self.base, self.cookie, self.frames = base, cookie, []

    async def __aenter__(self):
        self.ws = await open_socket(self.base, self.cookie)
        await self.ws.send(json.dumps({"type": "subscribe", "room": "general", "ref": "s"}))
        while json.loads(await self.ws.recv()).get("ref") != "s":
            pass
        self.task = asyncio.create_task(self._collect())
        return self

    async def _collect(self):
        async for raw in self.ws:
            self.frames.append(json.loads(raw))

    async def __aexit__(self, *exc):
        self.task.cancel()
        await self.ws.close()


def reply(opcode: int, payload: bytes) -> dict:
    if opcode == rawws.CLOSE:
        return {"closed": int.from_bytes(payload[:2], "big")}
    return json.loads(payload)


def raw_cases(port: int, cookie: str, origin: str) -> dict[str, object]:
    """Each case on its own socket; returns what the server answered."""
    results: dict[str, object] = {}

    def open_raw():
        return rawws.RawSocket(port, cookie, origin)

    def closed_by(data: bytes) -> int | None:
        s = open_raw()
        try:
            s.send(data)
            return s.close_code()
        finally:
            s.close()

    def answered(payloads: list[bytes], opcode=rawws.TEXT) -> list[dict]:
        s = open_raw()
        try:
            for p in payloads:
                s.send(rawws.frame(opcode, p))
            replies = [reply(*s.recv()) for _ in payloads]
            s.send_text(json.dumps({"type": "ping", "ref": "alive"}))
            replies.append(reply(*s.recv()))
            return replies
        finally:
            s.close()

    results["invalid utf-8"] = closed_by(rawws.frame(rawws.TEXT, b'{"type": "ping", "x": "\xff\xfe"}'))
    results["reserved opcode"] = closed_by(rawws.frame(0x3, b"{}"))
    results["reserved control opcode"] = closed_by(rawws.frame(0xB, b""))
    results["unmasked"] = closed_by(rawws.frame(rawws.TEXT, b'{"type": "ping"}', masked=False))
    results["reserved bits"] = closed_by(rawws.frame(rawws.TEXT, b'{"type": "ping"}', rsv=0b100))
    results["fragmented control frame"] = closed_by(rawws.frame(rawws.PING, b"x", fin=False))
    results["continuation without a start"] = closed_by(rawws.frame(rawws.CONTINUATION, b"{}"))
    results["oversize"] = closed_by(rawws.frame(rawws.TEXT, b"[" + b"1," * 40_000 + b"1]"))
    results["oversize in fragments"] = closed_by(
        b"".join(rawws.frame(rawws.TEXT if i == 0 else rawws.CONTINUATION, b" " * 20_000, fin=i == 3) for i in range(4))
    )
    results["frames"] = answered([
        b"[" * 30_000 + b"]" * 30_000,  # deeply nested, under the frame limit
        b"[" + b"1," * 20_000 + b"1]",  # large, valid JSON, wrong shape
        json.dumps({"type": "message.send", "room": "general", "body": "x" * 30_000, "client_id": "huge", "ref": 1}).encode(),
        json.dumps({"type": "message.send", "room": 7, "body": ["x"], "client_id": None}).encode(),
        json.dumps({"type": "room.event", "room": "general", "seq": 1, "json": "{}"}).encode(),
        json.dumps({"type": "websocket.disconnect", "code": 1000}).encode(),
        b"\x00\x01binary garbage",
        "{\"type\": \"message.send\", \"room\": \"general\", \"body\": \"\\ud800\", \"client_id\": \"lone\"}".encode(),
        b"not json at all",
    ]) + answered([b'{"type": "ping", "ref": 2}'], opcode=rawws.BINARY)
    return results


@ONCE
async def test_malformed_frames_get_their_documented_answer_and_change_nothing(cluster):
    a, b = cluster.workers
    alice = login(a.url, "alice")
    head = room_head(a.url, alice)
    async with Listener(b.url, login(b.url, "bob")) as bob:
        results = await asyncio.to_thread(raw_cases, a.port, alice, a.url)
        assert results.pop("invalid utf-8") == 1007
        assert results.pop("oversize") == 1009
        assert results.pop("oversize in fragments") == 1009
        # Protocol violations: autobahn closes with 1002.
        frames = results.pop("frames")
        assert set(results.values()) == {1002}, results
        codes = [f.get("code") for f in frames[:9]]
        assert codes == ["invalid", "invalid", "too_large", "invalid", "unknown_type", "unknown_type", "invalid",
                         "invalid", "invalid"], frames
        assert frames[9] == {"type": "pong", "ref": "alive"}  # the socket outlived every bad frame
        assert frames[10]["code"] == "invalid"  # binary where the json subprotocol expects text
        assert frames[11] == {"type": "pong", "ref": "alive"}
        await asyncio.sleep(0.5)
        # (The room may still tell bob of earlier tests' sockets leaving, and of his
        # own arrival: its presence changes go out once a second. Nothing else may
        # reach him.)
        earlier = [f for f in bob.frames if f.get("type") == "presence.diff" and set(f.get("joins")) <= {"bob"}]
        assert [f for f in bob.frames if f.get("type") != "pong" and f not in earlier] == [], \
            "nothing reached the other member"
    assert room_head(a.url, alice) == head, "nothing was stored"
    assert a.proc.poll() is None


def flood(port: int, cookie: str, origin: str, frames: int, payload: bytes) -> int | None:
    """Send `frames` copies of `payload` as fast as the socket takes them; the close
    code. What the server sends is read by a thread of its own, so that its close
    frame is read as it arrives (a sender that never read would lose it to the
    reset a server sends when it closes a connection with unread input)."""
    s = rawws.RawSocket(port, cookie, origin)
    data = rawws.frame(rawws.TEXT, payload)
    code: list[int | None] = []
    reader = threading.Thread(target=lambda: code.append(s.close_code()), daemon=True)
    reader.start()
    try:
        for _ in range(frames):
            if code:
                break
            s.send(data)
    except OSError:
        pass  # the worker dropped us mid-flood (after its close frame)
    reader.join(10)
    s.close()
    return code[0] if code else None


def burst(port: int, cookie: str, origin: str, frames: int) -> list[int]:
    """`frames` pings in one write; the opcodes of what comes back, up to the close."""
    s = rawws.RawSocket(port, cookie, origin)
    try:
        s.send(rawws.frame(rawws.TEXT, b'{"type": "ping"}') * frames)
        got = []
        while True:
            opcode, payload = s.recv()
            got.append(opcode)
            if opcode == rawws.CLOSE:
                return got + [int.from_bytes(payload[:2], "big")]
    finally:
        s.close()


@ONCE
async def test_frames_arriving_faster_than_handled_are_cut_off_with_4029(cluster):
    """daphne would queue every frame it reads for the application. 1,000 frames in
    one write overflow the 256-frame bound before the application has handled any:
    the close comes first, with nothing answered (the rate limit alone would
    answer 60 of them before closing)."""
    a = cluster.workers[0]
    got = await asyncio.to_thread(burst, a.port, login(a.url, "alice"), a.url, 1000)
    assert got[-1] == 4029
    assert got.count(rawws.TEXT) < 20, f"{got.count(rawws.TEXT)} frames answered before the close"


@ONCE
async def test_floods_are_closed_with_4029_and_memory_stays_bounded(cluster):
    """20 sockets each push 8 MB of 40 KB frames and read nothing. Unbounded, the
    worker would queue much of those 160 MB; with the bound each socket is closed
    once 1 MiB waits unhandled, so the worker grows by far less than was sent."""
    a = cluster.workers[0]
    cookie = login(a.url, "alice")
    before = rss_kib(a.proc.pid)
    codes = await asyncio.gather(*(asyncio.to_thread(flood, a.port, cookie, a.url, 200, b"x" * 40_000) for _ in range(20)))
    grew_mib = (rss_kib(a.proc.pid) - before) / 1024
    print(f"worker grew by {grew_mib:.1f} MiB")
    assert codes == [4029] * 20, codes
    assert grew_mib < 40, f"the worker grew by {grew_mib:.0f} MiB"
    # Thousands of small bad frames, sent one by one: refused, then closed with 4029.
    assert await asyncio.to_thread(flood, a.port, login(a.url, "bob"), a.url, 5000, b"{oops") == 4029
    ws = await open_socket(a.url, login(a.url, "bob"))
    await ws.send(json.dumps({"type": "ping", "ref": "after"}))
    assert json.loads(await ws.recv()) == {"type": "pong", "ref": "after"}
    await ws.close()
    assert a.proc.poll() is None


@ONCE
async def test_other_users_keep_normal_latency_while_one_floods(cluster):
    """While carol floods the worker (reconnecting each time she is cut off), bob's
    messages on the same worker still round-trip as before. The bound is loose on
    purpose (ten times the quiet median, at least 0.25 s): what it catches is a
    worker that stalls behind a flood, not a slow machine."""
    a = cluster.workers[0]
    bob = login(a.url, "bob")
    carol = login(a.url, "carol")

    async def round_trips(prefix: str, n: int) -> list[float]:
        times = []
        ws = await open_socket(a.url, bob)
        await ws.send(json.dumps({"type": "subscribe", "room": "general", "ref": "s"}))
        while json.loads(await ws.recv()).get("ref") != "s":
            pass
        for i in range(n):
            started = time.monotonic()
            ref = f"{prefix}{i}"
            await ws.send(json.dumps({"type": "message.send", "room": "general", "body": "lat", "client_id": ref, "ref": ref}))
            while json.loads(await ws.recv()).get("ref") != ref:
                pass
            times.append(time.monotonic() - started)
            await asyncio.sleep(0.05)
        await ws.close()
        return times

    quiet = statistics.median(await round_trips(f"quiet-{time.time()}-", 20))
    stop = threading.Event()
    floods: list[int | None] = []

    def flooder():
        while not stop.is_set():
            try:
                floods.append(flood(a.port, carol, a.url, 3000, b'{"type": "ping", "ref": 1}'))
            except (ConnectionError, OSError):
                time.sleep(0.05)

    thread = threading.Thread(target=flooder, daemon=True)
    thread.start()
    try:
        busy = await round_trips(f"busy-{time.time()}-", 30)
    finally:
        stop.set()
        await asyncio.to_thread(thread.join, 10)
    assert floods and set(floods) == {4029}, floods  # every flood was cut off
    assert statistics.median(busy) < max(10 * quiet, 0.25), (quiet, busy)
    assert a.proc.poll() is None
