"""The drain storm (`bench/loadgen.py --scenario drain`, run by bench/run.py on two
workers): N sockets in one room, spread over the two workers in turn, with a
sender on the second worker publishing R messages a second throughout; then the
first worker is told to go, and every one of its sockets has to come back to the
second, resume and catch up.

What is measured:
- `back_s`: from the signal to the moment the last of the first worker's sockets
  is back: reconnected to the surviving worker and, for the full pipeline,
  subscribed again with `since` (its last seq) and `epoch`, the replay of what it
  missed received and the subscribe's ack after it (the ack follows the replay, so
  a socket with its ack is caught up); for the bare consumer (no resume), its
  handshake accepted;
- `opened_p50_ms` / `caught_up_p50_ms`: the downtime's two parts, from the close
  to the 101 of the attempt that got back in, and from that 101 to back;
- `downtime_p50_ms` / `downtime_p99_ms`: per drained socket, from its close to it
  being back; `closes_first_s` / `closes_last_s`: when the first and last of them
  were closed (the server's spread);
- `lost` / `duplicated` (full pipeline only): after the sender stops, every member
  that is in, drained or not, must have every published message (one that any
  member or the sender's own subscription received; `not_published`: those
  written that no one ever got, which the server did not take in) exactly once
  (counted raw, as received, before any client-side dedupe by seq); `failed`:
  sockets never back within the deadline (a minute: the target is 5 s), with the
  reasons (never a silent zero), and `unreached`: the messages those sockets did
  not get;
  `listen_overflows`: the kernel's count of connections dropped for a full accept
  queue meanwhile;
- `attempts`: connection attempts the drained sockets made after their close (one
  each in a clean drain), `retries`: those beyond the first, `rate_limited`:
  subscribes answered `rate_limited`, and `survivors_closed`: sockets of the
  surviving worker closed meanwhile.

The full pipeline's worker gets SIGTERM: our launcher's graceful drain
(realtime/server/drain.py) stops listening and closes its sockets with 4012 in
shuffled batches over REALTIME_DRAIN_SPREAD s, or longer at REALTIME_DRAIN_RATE
sockets a second. The bare consumer has no drain and no resume: its worker is
killed (SIGKILL), its sockets drop (1006) and reconnect. With `--crash` (the crash
storm) the full pipeline's worker is killed too: no close frame, no spread, every
client back after its backoff, resuming from its last seq.

The clients behave like the browser client (static/realtime/socket.js and
state.js), not a retry loop: after a 4012 (or 1012) a socket comes back within
the close reason's `spread_ms` (our drain's: the time between two of its batches),
uniformly, or without one after the restart jitter, 100 to 1,000 ms, uniformly;
after any other loss (a killed worker's 1006: no close frame), or a failed
attempt, after the equal-jitter backoff (base 500 ms, cap 10 s, doubling with each
failure in a row); a 4029's `retry_after` is waited for; an attempt that has no
frame back within 10 s (the connect timeout) is dropped and counts as a failure. On
open it writes a ping and the subscribe with `since` and `epoch` at once (the
client's _socketOpened); a subscribe answered `rate_limited` is sent again after
`retry_after`, with `since` unchanged. The balancer's part (sending a reconnect to
a worker that is still there) is played by connecting to the surviving worker.

Every socket is a small WebSocket client of its own (Conn) on this process's
event loop: the frames are timed and read as their bytes arrive (as
loadgen.FrameReader does), so that thousands of sockets receiving R messages a
second each cost a few microseconds a frame, and nothing is left buffered inside a
library when a socket changes hands.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import json
import os
import random
import re
import signal
import sys
import time
import uuid

from bench.wsframes import pong, read_frames
from realtime.protocol.codes import restart_spread

SEQ = re.compile(rb'"seq":(\d+)')
RESTART_CODES = {4012, 1012}
STOP_CODES = {4001, 4003}
RESTART_JITTER = 1.0  # s (socket.js restartJitter)
# "1": a 4012's spread_ms is not read (the client before it), for an A/B.
IGNORE_HINT = os.environ.get("BENCH_IGNORE_HINT") == "1"
BACKOFF_BASE, BACKOFF_CAP = 0.5, 10.0  # s (client.js backoff)
CONNECT_TIMEOUT = 10.0  # s (socket.js connectTimeout)


def restart_delay(reason: str) -> float:
    """socket.js after a 4012 or 1012: within the reason's spread_ms (our drain's),
    uniformly, else after the restart jitter."""
    spread = None if IGNORE_HINT else restart_spread(reason)
    return RESTART_JITTER * (0.1 + 0.9 * random.random()) if spread is None else spread / 1000 * random.random()


def backoff(attempt: int) -> float:
    """state.js backoffDelay: equal jitter in [ceiling / 2, ceiling]."""
    ceiling = min(BACKOFF_CAP, BACKOFF_BASE * 2 ** min(attempt, 30))
    return ceiling / 2 + random.random() * ceiling / 2


class Closed(Exception):
    def __init__(self, code: int, why: str = "") -> None:
        super().__init__(f"closed: {code} {why}".strip())
        self.code, self.why = code, why  # why: a close frame's reason as sent


def fail(waiting: asyncio.Future | None, exc: BaseException) -> None:
    """Fail a future someone may no longer await (an attempt given up on): its
    exception is marked retrieved, the attempt's own error is what counts."""
    if waiting is not None and not waiting.done():
        waiting.set_exception(exc)
        waiting.exception()


class Conn(asyncio.Protocol):
    """One WebSocket client connection: the upgrade request, then RFC 6455 frames
    off the wire (server frames unmasked; ours masked with a zero key)."""

    def __init__(self, client: "Client", port: int, path: str, cookie: str, subprotocol: str | None) -> None:
        self.client, self.port, self.path, self.cookie, self.subprotocol = client, port, path, cookie, subprotocol
        self.transport = None
        self.buffer = bytearray()
        self.handshaking = True
        self.opened = asyncio.get_running_loop().create_future()
        self.ended = False

    def connection_made(self, transport) -> None:
        self.transport = transport
        lines = [f"GET {self.path} HTTP/1.1", f"Host: 127.0.0.1:{self.port}", "Upgrade: websocket",
                 "Connection: Upgrade", f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}",
                 "Sec-WebSocket-Version: 13", f"Origin: http://127.0.0.1:{self.port}"]
        if self.subprotocol:
            lines.append(f"Sec-WebSocket-Protocol: {self.subprotocol}")
        if self.cookie:
            lines.append(f"Cookie: {self.cookie}")
        transport.write(("\r\n".join(lines) + "\r\n\r\n").encode())

    def data_received(self, data: bytes) -> None:
        at = time.monotonic()
        buf = self.buffer
        buf += data
        if self.handshaking:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            status = bytes(buf[:end]).split(b"\r\n", 1)[0].split()
            del buf[:end + 4]
            if len(status) < 2 or status[1] != b"101":
                self._end(0, f"handshake refused: HTTP {status[1].decode() if len(status) > 1 else '?'}")
                return
            self.handshaking = False
            if not self.opened.done():
                self.opened.set_result(at)
        for opcode, payload in read_frames(buf):
            if opcode in (1, 2):
                self.client.frame(self, payload, at)
            elif opcode == 9:
                self.transport.write(pong(payload))
            elif opcode == 8:
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                self._end(code, payload[2:].decode(errors="replace"))
                return

    def connection_lost(self, exc) -> None:
        self._end(1006, "connection dropped (no close frame)")

    def _end(self, code: int, why: str) -> None:
        if self.ended:
            return
        self.ended = True
        fail(self.opened, Closed(code, why))
        if self.transport is not None:
            self.transport.close()
        self.client.lost(self, code, why)

    def send(self, payload: bytes, binary: bool = False) -> None:
        n = len(payload)
        head = bytes((0x82 if binary else 0x81,))
        if n < 126:
            head += bytes((0x80 | n,))
        elif n < 65536:
            head += bytes((0x80 | 126,)) + n.to_bytes(2, "big")
        else:
            head += bytes((0x80 | 127,)) + n.to_bytes(8, "big")
        self.transport.write(head + bytes(4) + payload)  # a zero mask key leaves the payload as it is

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
        self._end(4000, "dropped by the client (connect timeout)")


class Client:
    """One member: its socket, the room's last seq and epoch it has applied, the
    message numbers it received, and the browser client's reconnect policy."""

    def __init__(self, storm: "Storm", port: int) -> None:
        self.storm, self.port = storm, port
        self.conn: Conn | None = None
        self.last_seq: int | None = None
        self.epoch = None
        self.got: list[int] = []
        self.first_frame: asyncio.Future | None = None
        self.answer: asyncio.Future | None = None  # the subscribe's ack or error
        self.closed_at: float | None = None  # the last close, while coming back
        self.back_at: float | None = None
        self.opened_at: float | None = None  # the last attempt's 101
        self.closes: list[int] = []
        self.attempts = 0
        self.failures_in_a_row = 0
        self.task: asyncio.Task | None = None
        self.stopped: str | None = None  # why it gave up (a 4001, recovery_failed, the deadline)

    # -- frames ---------------------------------------------------------------
    def frame(self, conn: Conn, payload: bytes, at: float) -> None:
        if conn is not self.conn:
            return
        if self.first_frame is not None and not self.first_frame.done():
            self.first_frame.set_result(at)
        found = self.storm.pattern.search(payload)
        if found:
            self.got.append(int(found.group(1)))
            seq = SEQ.search(payload)
            if seq is not None:
                seq = int(seq.group(1))
                if self.last_seq is None or seq > self.last_seq:
                    self.last_seq = seq
            return
        if self.answer is not None and not self.answer.done() and b'"ref":"s"' in payload:
            self.answer.set_result((json.loads(payload), at))

    def lost(self, conn: Conn, code: int, why: str) -> None:
        if conn is not self.conn:
            return
        self.conn = None
        for waiting in (self.first_frame, self.answer):
            fail(waiting, Closed(code, why))
        if self.storm.stopping:
            return
        self.closes.append(code)
        if self.task is None or self.task.done():
            # Lost while live: come back (the attempt loop, when it is running,
            # handles a loss during an attempt itself).
            self.closed_at = time.monotonic()
            self.back_at = None
            self.task = asyncio.ensure_future(self.come_back(code, why))
            self.storm.tasks.add(self.task)

    # -- connecting -----------------------------------------------------------
    async def open(self) -> float:
        """Connect, subscribe from our seq, and wait for the ack: the time it came."""
        loop = asyncio.get_running_loop()
        storm = self.storm
        self.attempts += 1
        conn = Conn(self, self.port, storm.path, storm.cookie, storm.subprotocol)
        self.conn = conn
        self.first_frame = loop.create_future()
        self.answer = loop.create_future() if storm.full else None
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                await loop.create_connection(lambda: conn, "127.0.0.1", self.port)
                opened_at = self.opened_at = await conn.opened
                if not storm.full:
                    return opened_at
                # As the browser client does on open: a ping, and the subscribe at once.
                conn.send(json.dumps({"type": "ping"}).encode())
                self.send_subscribe()
                await self.first_frame
        except TimeoutError:
            conn.abort()
            raise Closed(0, "timed out (no frame within the connect timeout)") from None
        except OSError as exc:
            self.conn = None
            raise Closed(0, f"{type(exc).__name__}: {exc.strerror or exc}") from None
        while True:
            frame, at = await self.answer  # Closed if the socket is lost meanwhile
            if frame.get("type") == "ack":
                self.last_seq, self.epoch = frame["seq"], frame.get("epoch")
                return at
            if frame.get("code") == "rate_limited":
                storm.rate_limited += 1
                await asyncio.sleep(float(frame.get("retry_after") or 1))
                if self.conn is not conn:
                    raise Closed(1006, "lost while waiting to subscribe again")
                self.answer = loop.create_future()
                self.send_subscribe()
                continue
            self.stopped = f"subscribe answered {frame.get('code')}: {frame.get('message')}"
            raise Closed(-1, self.stopped)

    def send_subscribe(self) -> None:
        frame = {"type": "subscribe", "room": self.storm.room, "ref": "s"}
        if self.last_seq is not None:
            frame["since"] = self.last_seq
            if self.epoch is not None:
                frame["epoch"] = self.epoch
        self.conn.send(json.dumps(frame).encode())

    async def come_back(self, code: int, why: str) -> None:
        """socket.js backoffReconnect, connect, and its connect timeout, until in."""
        storm = self.storm
        while not storm.stopping:
            if code in STOP_CODES or code == -1:
                self.stopped = self.stopped or f"closed with {code} {why}: the client stops"
                storm.fail(self.stopped)
                return
            if code in RESTART_CODES:
                delay = restart_delay(why)
            else:
                delay = backoff(self.failures_in_a_row)
                self.failures_in_a_row += 1
            await asyncio.sleep(delay)
            try:
                self.back_at = await self.open()
                self.failures_in_a_row = 0
                storm.back(self)
                return
            except Closed as exc:
                storm.attempt_failed(str(exc))
                code, why = exc.code, exc.why


class Storm:
    def __init__(self, target, run: str) -> None:
        self.full = target.kind == "full"
        from bench.loadgen import PATHS

        self.path = PATHS[target.kind]
        self.cookie = target.cookie if self.full else ""
        self.subprotocol = "rt.v1.json" if self.full else None
        self.room = target.room
        self.pattern = re.compile(rf"{run}:(\d+):".encode())
        self.stopping = False
        self.tasks: set = set()
        self.failures: dict[str, int] = {}
        self.rate_limited = 0
        self.waiting = 0  # drained sockets not back yet
        self.all_back = asyncio.Event()
        self.drained: set[Client] = set()

    def fail(self, why: str) -> None:
        self.failures[why] = self.failures.get(why, 0) + 1

    def attempt_failed(self, why: str) -> None:
        self.failures[f"attempt: {why}"] = self.failures.get(f"attempt: {why}", 0) + 1

    def back(self, client: Client) -> None:
        if client in self.drained and client.closed_at is not None:
            self.waiting -= 1
            if self.waiting <= 0:
                self.all_back.set()


async def drain_storm(target, count: int, rate: float, pids: list[int], deadline: float = 60,
                      settle: float = 2.0, crash: bool = False) -> dict:
    """See the module's docstring. `pids`: the two workers', the first one drained
    (with `crash`, killed, whatever the target: a crash storm)."""
    if len(target.ports) != 2 or len(pids) != 2:
        raise SystemExit("drain: two workers (two ports and --worker-pids of both) are needed")
    run = uuid.uuid4().hex[:8]
    storm = Storm(target, run)
    drained_port, survivor = target.ports
    clients = [Client(storm, target.ports[k % 2]) for k in range(count)]
    for start in range(0, count, 50):  # opened in batches (a connect storm is another scenario)
        batch = clients[start:start + 50]
        results = await asyncio.gather(*(c.open() for c in batch), return_exceptions=True)
        bad = [r for r in results if isinstance(r, BaseException)]
        if bad:
            raise RuntimeError(f"drain: {len(bad)} of the first sockets did not get in: {bad[0]}")
    target.sender_port = survivor
    sender = await target.connect(sender=True)
    from bench.loadgen import Member

    echo = Member(sender, run, raw=False)  # reads (and drops) what comes back to the sender
    sent = 0
    stop_sending = asyncio.Event()

    async def send() -> None:
        nonlocal sent
        began = time.monotonic()
        while not stop_sending.is_set():
            delay = began + sent / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await sender.send(target.frame(f"{run}:{sent}:", sent))
            sent += 1

    gc.collect()
    gc.freeze()
    gc.disable()
    sending = asyncio.ensure_future(send())
    await asyncio.sleep(settle)
    ours = [c for c in clients if c.port == drained_port]
    storm.drained = set(ours)
    storm.waiting = len(ours)
    for c in ours:
        c.port = survivor  # where the balancer sends them now
    from bench.loadgen import listen_overflows

    overflows = listen_overflows()
    signalled = time.monotonic()
    os.kill(pids[0], signal.SIGTERM if storm.full and not crash else signal.SIGKILL)
    try:
        await asyncio.wait_for(storm.all_back.wait(), deadline)
    except TimeoutError:
        pass
    ended = time.monotonic()
    # The deadline is the end of the measurement: sockets still coming back stop
    # trying (those back later would be counted back, with downtimes past it).
    for task in storm.tasks:
        task.cancel()
    await asyncio.sleep(settle)
    stop_sending.set()
    await sending
    # Every member has every message, or 30 s have passed.
    until = time.monotonic() + 30
    while time.monotonic() < until and any(len(set(c.got)) < sent for c in clients if c.conn is not None):
        await asyncio.sleep(0.1)
    storm.stopping = True
    gc.enable()
    for task in storm.tasks:
        task.cancel()
    never = [c for c in ours if c.back_at is None or c.closed_at is None]
    for c in never:
        storm.fail(c.stopped or "not back within the deadline")
    returned = [c for c in ours if c.back_at is not None and c.closed_at is not None]
    back = sorted(c.back_at for c in returned)
    downtime = sorted(c.back_at - c.closed_at for c in returned)
    # Where the downtime went: from the close to the 101 of the attempt that got
    # back in (the wait, the connect, the handshake), and from that 101 to back
    # (for the full pipeline its connect's checks, the subscribe and the replay).
    to_open = sorted(c.opened_at - c.closed_at for c in returned)
    to_back = sorted(c.back_at - c.opened_at for c in returned)
    closes = sorted(c.closed_at - signalled for c in ours if c.closed_at is not None)
    from bench.loadgen import quantile_ms

    result = {
        "sockets": count,
        "drained": len(ours),
        "messages": sent,
        "back_s": round(back[-1] - signalled, 2) if back and not never else None,
        "back": len(back),
        "failed": len(never),
        "downtime_p50_ms": quantile_ms(downtime, 0.5, 1),
        "downtime_p99_ms": quantile_ms(downtime, 0.99, 1),
        "opened_p50_ms": quantile_ms(to_open, 0.5, 1),
        "caught_up_p50_ms": quantile_ms(to_back, 0.5, 1),
        "closes_first_s": round(closes[0], 2) if closes else None,
        "closes_last_s": round(closes[-1], 2) if closes else None,
        # Connection attempts of the drained sockets after their close (one each in a
        # clean drain), and those beyond the first (failed attempts, retried).
        "attempts": sum(c.attempts - 1 for c in ours),
        "retries": sum(c.attempts - 2 for c in ours if c.attempts > 1),
        "survivors_closed": sum(len(c.closes) for c in clients if c not in storm.drained),
        "rate_limited": storm.rate_limited,
        "waited_s": round(ended - signalled, 1),
    }
    if overflows is not None:
        # The kernel's count of handshakes dropped for a full accept queue (the
        # whole machine's), from the signal on: each is a connect retried later.
        result["listen_overflows"] = listen_overflows() - overflows
    if storm.full:
        # Published: the messages the server broadcast (any member, or the sender,
        # which is subscribed too, had it); a message written by the sender that no
        # one ever got was not taken in (`not_published`: a server that stopped
        # reading its sockets), not lost on the way. Lost: published messages
        # missing at sockets that were in at the end (back, or never closed); the
        # messages of sockets never back are counted apart (`unreached`), those
        # sockets are already `failed`.
        everything = set(n for c in clients for n in c.got) | {n for n, _ in echo.got}
        result["not_published"] = sent - len(everything)
        lost = duplicated = unreached = 0
        for c in clients:
            seen = set(c.got)
            duplicated += len(c.got) - len(seen)
            if c in never:
                unreached += len(everything - seen)
            else:
                lost += len(everything - seen)
        result["lost"], result["duplicated"], result["unreached"] = lost, duplicated, unreached
    if storm.failures:
        result["failed_reasons"] = storm.failures
        print(f"drain: {len(never)} of {len(ours)} drained sockets never back; attempts that failed and why: "
              f"{json.dumps(storm.failures)}", file=sys.stderr)
    await echo.close()
    for c in clients:
        if c.conn is not None and c.conn.transport is not None:
            c.conn.transport.close()
    return result
