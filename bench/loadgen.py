"""The load generator: one asyncio process (pinned to its own core by bench/run.py)
that opens the members' sockets, sends, and times every delivery.

Targets:
- `full`: our pipeline at /ws/v1/ (session cookie, subscribe, message.send with a
  client_id; every guarantee on: schema, permissions, rate-limit check, persistence
  with seq, presence);
- `bare`: the tutorial consumer at /ws/bench/bare/ (bench/bare.py);
- `socketio`: a Socket.IO server (bench/peers.py: python-socketio, Node's
  socket.io) over its WebSocket transport, Engine.IO 4: a member joins the room
  with an acknowledged `join` event, the sender emits `message` (room, text) and
  the server emits it to the room; its pings ("2") are answered ("3").

Scenarios print one JSON object:
- `fanout`: R members, one sender publishing M messages with at most W in flight (a
  message is done when the sender's own copy comes back): deliveries per second,
  latency p50/p99, lost and duplicated deliveries;
- `rate`: R members, messages sent at a fixed rate for D seconds: latency
  p50/p99/max, lost;
- both also report, per message, when its first member had it (`first_*`: the
  sender's chain: rate limit, database, publish) and how long until its last did
  (`spread_*`: the fan-out), so that a tail can be traced to one or the other;
- `idle`: N sockets opened (and subscribed): the worker's memory per socket and the
  connect rate;
- `churn`: N sockets opened (as idle's) and all closed, --rounds times: the worker's
  resident memory after each round (what closed sockets leave behind);
- `storm`: N sockets opened into one worker as fast as they go, at most C handshakes
  in flight (--concurrency), each authenticated and subscribed to the room; a socket
  is in when its subscribe is answered with an ack (the full pipeline) or its
  handshake is accepted (the bare consumer, which has no subscribe): sockets in per
  second (over the whole storm, and over the first and last tenth of sockets to be
  in, by completion time), time to subscribed p50/p99, and the sockets refused,
  closed or timed out (`failed`, 0 in a valid run; the first reasons to stderr);
- `curve`: the connect rate against the sockets already open: the worker filled
  to each of --points (untimed), then the next --batch sockets timed (sockets a
  second at each point, `curve`);
- `drain`: the drain storm on two workers (bench/drain.py says what and how).
`fanout` and `rate` with --worker-pids also report the workers' CPU per delivery
(/proc/<pid>/stat utime + stime, from the first send to the last delivery); with
--procs N the members are held by N helper processes (`--helper`), each timing
its own deliveries, merged by this one, which only sends: a room of thousands
receiving tens of thousands of frames a second is more than one Python process
can time without being the bottleneck itself (`loadgen_cpu` counts them all).
A helper's deliveries are timed by its sockets' kernel receive stamps
(bench/rxstamp.py), and again when it read them (`read_*`); with
--yield-readers the helpers read only when no worker wants a core (SCHED_IDLE,
on every core; `merged_reads` counts the reads that may have stamped a message
late: something came after it in the read).
--codec json, msgpack or protobuf (rt.v1.protobuf, with the project's own codec).
Times are taken on this machine's monotonic clock, on both ends (CLOCK_MONOTONIC,
one clock for every process of the machine).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import re
import resource
import signal
import sys
import time
import uuid
from pathlib import Path

import msgspec
import websockets

from bench import rxstamp
from bench.wsframes import EIO_PING, EIO_PONG, read_frames, reply

PATHS = {"full": "/ws/v1/", "bare": "/ws/bench/bare/", "socketio": "/socket.io/?EIO=4&transport=websocket"}


def cpu_times(pids: list[int], missing_ok: bool = False) -> tuple[float, float]:
    """(user, system) CPU time of these processes so far (/proc/<pid>/stat utime
    and stime, fields 14 and 15), in seconds. With `missing_ok`, a process that has
    gone counts nothing instead of raising."""
    tick = os.sysconf("SC_CLK_TCK")
    user = system = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            if missing_ok:
                continue
            raise
        user += int(fields[11])
        system += int(fields[12])
    return user / tick, system / tick


def cpu_seconds(pids: list[int], missing_ok: bool = False) -> float:
    """User + system CPU time of these processes so far, in seconds (cpu_times)."""
    return sum(cpu_times(pids, missing_ok))


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class Target:
    """One or more workers: the sender on the first, members in turn on each."""

    def __init__(self, kind: str, ports: list[int], cookie: str, sender_cookie: str, room: str, codec: str = "json",
                 mention: str | None = None):
        self.mention = mention  # a username every body @mentions (the server resolves and records it)
        self.kind, self.ports, self.cookie, self.sender_cookie, self.room = kind, ports, cookie, sender_cookie, room
        self.opened = 0
        # rt.v1.json, rt.v1.msgpack or rt.v1.protobuf (the full pipeline; the bare
        # consumer speaks JSON). Protocol Buffers through the project's own codec
        # (realtime/protocol/proto.py): client frames built as its frame classes and
        # encoded by PROTOBUF.encode, server frames read by PROTOBUF.decode_any.
        self.codec = codec
        if codec == "protobuf":
            from realtime.protocol import CLIENT_TYPES, PROTOBUF

            self.encode = lambda frame: PROTOBUF.encode(
                CLIENT_TYPES[frame["type"]](**{k: v for k, v in frame.items() if k != "type"}))
            self.decode = PROTOBUF.decode_any
        elif codec == "msgpack":
            self.encode, self.decode = msgspec.msgpack.encode, msgspec.msgpack.decode
        else:
            self.encode, self.decode = (lambda frame: json.dumps(frame)), json.loads
        # Members go to ports[(port_offset + port_step * k) % len(ports)] for the k-th
        # member this Target opens (a helper process's share keeps the global turn).
        self.port_offset, self.port_step = 0, 1
        self.sender_port: int | None = None  # default: the first worker's

    async def connect(self, sender: bool = False):
        headers = {"Cookie": self.sender_cookie if sender else self.cookie} if self.kind == "full" else {}
        if sender:
            port = self.sender_port or self.ports[0]
        else:
            port = self.ports[(self.port_offset + self.port_step * self.opened) % len(self.ports)]
        if not sender:
            self.opened += 1
        ws = await websockets.connect(
            f"ws://127.0.0.1:{port}{PATHS[self.kind]}", subprotocols=[f"rt.v1.{self.codec}"] if self.kind == "full" else None,
            origin=f"http://127.0.0.1:{port}",
            additional_headers=headers, max_queue=None, open_timeout=30, ping_interval=None, compression=None,
        )
        if self.kind == "socketio":
            await socketio_join(ws, self.room)
        elif self.kind == "full":
            await ws.send(self.encode({"type": "subscribe", "room": self.room, "ref": "s"}))
            while True:
                frame = self.decode(await ws.recv())
                if frame.get("ref") == "s":
                    if frame.get("type") != "ack":
                        # An error frame (rate_limited, forbidden, ...): not subscribed.
                        await ws.close()
                        raise SubscribeRefused(frame)
                    break
        return ws

    def frame(self, text: str, n: int) -> str:
        if self.kind == "full":
            body = f"{text} @{self.mention}" if self.mention else text
            return self.encode({"type": "message.send", "room": self.room, "body": body, "client_id": f"b{uuid.uuid4().hex[:16]}"})
        if self.kind == "socketio":
            return "42" + json.dumps(["message", self.room, text])
        return json.dumps({"message": text})


async def socketio_join(ws, room: str) -> None:
    """Socket.IO's side of a member's start: Engine.IO's open packet ("0{...}"), the
    default namespace's connect ("40", answered "40{sid}"), then `join` with an
    acknowledgement id ("420[...]", answered "430[true]"). Pings met meanwhile
    are answered."""
    async def packet() -> str:
        while True:
            got = await ws.recv()
            if got == EIO_PING:
                await ws.send(EIO_PONG)
                continue
            return got

    opened = await packet()
    if not opened.startswith("0{"):
        raise SubscribeRefused({"type": "engine.io", "code": "no_open", "message": opened[:80]})
    await ws.send("40")
    connected = await packet()
    if not connected.startswith("40"):
        raise SubscribeRefused({"type": "socket.io", "code": "no_connect", "message": connected[:80]})
    await ws.send("420" + json.dumps(["join", room]))
    while True:
        answer = await packet()
        if answer.startswith("430"):
            if json.loads(answer[3:]) != [True]:
                raise SubscribeRefused({"type": "socket.io", "code": "join_refused", "message": answer[:80]})
            return


class SubscribeRefused(Exception):
    """The subscribe was answered with something other than an ack."""

    def __init__(self, frame: dict):
        super().__init__(f"subscribe answered with {frame.get('type')}: {frame.get('code')} {frame.get('message', '')}".strip())
        self.frame = frame


def reason(exc: BaseException) -> str:
    """One line on why a socket did not get in (for the failure counts)."""
    if isinstance(exc, websockets.ConnectionClosed):
        got = exc.rcvd
        return f"closed by the server: {got.code} {got.reason}".strip() if got else "connection dropped (no close frame)"
    if isinstance(exc, websockets.InvalidStatus):
        return f"handshake refused: HTTP {exc.response.status_code}"
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return "timed out"
    return f"{type(exc).__name__}: {exc}"


class Member:
    """Records (message number, receive time) for every message of this run.

    After its handshake and subscribe (through `websockets`), a member's socket is
    read by FrameReader: frames are timed as their bytes arrive, at a few
    microseconds each. Read through the library, the last of 100 members was
    timed some 3 ms late at every message by this process alone, which is not the
    server's latency."""

    def __init__(self, ws, run: str, raw: bool = True):
        self.ws = ws
        self.pattern = re.compile(rf"{run}:(\d+):".encode())
        self.got: list[tuple[int, float]] = []
        self.arrived: asyncio.Event | None = None  # set at each frame, for the sender's echo
        if raw:
            self.task = None
            ws.transport.set_protocol(FrameReader(ws.transport, self))
        else:
            self.task = asyncio.ensure_future(self.read())

    def frame(self, payload: bytes, at: float) -> None:
        found = self.pattern.search(payload)
        if found:
            self.got.append((int(found.group(1)), at))
            if self.arrived is not None:
                self.arrived.set()

    async def read(self):
        try:
            async for raw in self.ws:
                if raw == EIO_PING:  # (a Socket.IO target)
                    await self.ws.send(EIO_PONG)
                    continue
                self.frame(raw if isinstance(raw, bytes) else raw.encode(), time.monotonic())
        except websockets.ConnectionClosed:
            pass

    async def close(self) -> None:
        if self.task is None:
            self.ws.transport.close()
        else:
            await self.ws.close()


class FrameReader(asyncio.Protocol):
    """Server-to-client WebSocket frames (unmasked, RFC 6455 5.2) off the wire:
    data frames go to the member, pings are answered, a close ends it."""

    def __init__(self, transport, member: Member):
        self.transport, self.member, self.buffer = transport, member, bytearray()

    def data_received(self, data: bytes) -> None:
        at = time.monotonic()
        buf = self.buffer
        buf += data
        for opcode, payload in read_frames(buf):
            answer = reply(opcode, payload)
            if answer is not None:
                self.transport.write(answer)
            elif opcode in (1, 2):
                self.member.frame(payload, at)
            elif opcode == 8:
                self.transport.close()
                return

    def connection_lost(self, exc) -> None:
        pass


def summarize(sent: dict[int, float], members: list[Member], started: float) -> dict:
    latencies = []
    lost = duplicated = 0
    last = started
    for m in members:
        seen = set()
        for n, at in m.got:
            if n in seen:
                duplicated += 1
                continue
            seen.add(n)
            if n in sent:
                latencies.append(at - sent[n])
                last = max(last, at)
        lost += len(set(sent) - seen)
    latencies.sort()
    # Per message: when its first member had it, and how long until its last did.
    # The first is the sender's chain (rate limit, database, publish); the spread is
    # the fan-out. Their p99s tell which one makes the tail.
    first: dict[int, float] = {}
    final: dict[int, float] = {}
    for m in members:
        for n, at in m.got:
            if n in sent:
                first[n] = min(first.get(n, at), at)
                final[n] = max(final.get(n, at), at)
    firsts = sorted(first[n] - sent[n] for n in first)
    spreads = sorted(final[n] - first[n] for n in first)
    qs = quantile_ms
    q = lambda p: quantile_ms(latencies, p)  # noqa: E731
    span = max(last - started, 1e-6)
    return {
        "deliveries": len(latencies),
        "deliveries_per_s": round(len(latencies) / span, 1),
        "p50_ms": q(0.50),
        "p99_ms": q(0.99),
        "max_ms": round(latencies[-1] * 1000, 2) if latencies else None,
        "lost": lost,
        "duplicated": duplicated,
        "seconds": round(span, 2),
        "first_p50_ms": qs(firsts, 0.50),
        "first_p99_ms": qs(firsts, 0.99),
        "spread_p50_ms": qs(spreads, 0.50),
        "spread_p99_ms": qs(spreads, 0.99),
    }


async def open_members(target: Target, count: int, run: str) -> list[Member]:
    members = []
    for start in range(0, count, 50):  # in batches: a connect storm is another scenario
        sockets = await asyncio.gather(*(target.connect() for _ in range(start, min(count, start + 50))))
        members += [Member(ws, run) for ws in sockets]
    return members


async def publish(target: Target, members_n: int, total: int, *, window: int | None = None,
                  rate: float | None = None, drain: float = 60, worker_pids: list[int] | None = None,
                  procs: int = 1, yield_readers: bool = False) -> dict:
    """R members; one sender publishes `total` messages, paced either by a window of
    messages in flight (done when the sender's own copy comes back) or by a fixed
    rate; then wait for the deliveries (at most `drain` seconds) and summarize.

    With `procs` > 1 the members are held by that many helper processes (this one
    only sends): each times its own deliveries on the machine's monotonic clock,
    which all processes share, and hands them back at the end to be merged here.
    With `worker_pids`, the workers' CPU time from the first send to the last
    delivery, per delivery (`cpu_us_per_delivery`)."""
    run = uuid.uuid4().hex[:8]
    helpers: list[Helper] = []
    if procs > 1:
        helpers = await start_helpers(target, members_n, procs, run, yield_readers)
        members: list = []
    else:
        members = await open_members(target, members_n, run)
    sender_ws = await target.connect(sender=True)
    echo = Member(sender_ws, run, raw=False)
    echo.arrived = asyncio.Event()
    sent: dict[int, float] = {}
    await asyncio.sleep(0.5)
    # No collection of this process's garbage while it times deliveries: a full
    # collection (about 9 ms here, once in a 10 s run) stamped a whole message's
    # deliveries late. What is allocated meanwhile is freed by reference counting.
    gc.collect()
    gc.freeze()
    gc.disable()
    spy = await steady_profile(worker_pids)
    cpu_before = cpu_times(worker_pids) if worker_pids else None
    own_before = cpu_seconds([os.getpid()])
    started = time.monotonic()
    for n in range(total):
        if window is not None:
            while n - len(echo.got) >= window:
                # Woken by the echo (polling with a short sleep spun on uvloop,
                # which does not sleep below a millisecond, and took core 1's
                # time from PostgreSQL and Redis).
                echo.arrived.clear()
                await echo.arrived.wait()
        else:
            delay = started + n / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        sent[n] = time.monotonic()
        await sender_ws.send(target.frame(f"{run}:{n}:", n))
    if helpers:
        members = await finish_helpers(helpers, total, drain, started)
    else:
        deadline = time.monotonic() + drain
        while any(len(m.got) < total for m in members) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    cpu_after = cpu_times(worker_pids) if worker_pids else None
    own_after, ended = cpu_seconds([os.getpid()]), time.monotonic()
    await spy.stop()
    gc.enable()
    result = summarize(sent, members, started)
    if helpers:
        # The same deliveries timed when the helpers read them (bench/rxstamp.py):
        # the figures above less the load generator's own delay.
        read = summarize(sent, [Delivered(m.read) for m in members], started)
        result.update({f"read_{key}": read[key] for key in ("p50_ms", "p99_ms", "first_p99_ms", "spread_p99_ms")})
        result["stamped"] = "kernel" if not sum(h.unstamped for h in helpers) else "partly read"
        result["merged_reads"] = sum(h.merged for h in helpers)
    # The load generator's CPU while it sent and timed (all its processes, as a
    # share of one core; `loadgen_cpu` below is over its whole life, the sockets'
    # opening included): near 1.0 here, the load generator was the limit.
    window = own_after - own_before + sum(h.window_cpu_s for h in helpers)
    result["loadgen_cpu_sending"] = round(window / max(ended - started, 1e-6), 2)
    if cpu_before is not None and result["deliveries"]:
        # Includes the sender's own chain (one frame in, one database write, one
        # publish per message): all the CPU the workers spent on the messages.
        user, system = (after - before for after, before in zip(cpu_after, cpu_before))
        result["worker_cpu_s"] = round(user + system, 3)
        result["cpu_us_per_delivery"] = round((user + system) / result["deliveries"] * 1e6, 2)
        # The kernel's part of it (system time: the sockets' reads and writes).
        result["worker_system_share"] = round(system / max(user + system, 1e-9), 2)
    if helpers:
        result["loadgen_processes"] = len(helpers) + 1
        result["helper_cpu"] = [h.cpu for h in helpers]
        result["helper_cpu_s"] = round(sum(h.cpu_s for h in helpers), 2)
    await echo.close()
    await asyncio.gather(*(m.close() for m in members if hasattr(m, "close")), return_exceptions=True)
    return result


def py_spy(pid: int, out, *, gil: bool) -> list[str]:
    """The command that samples `pid` with py-spy at 250 Hz without pausing it, its
    collapsed stacks to `out`: with `gil`, only the thread holding the GIL; without,
    every thread not idle (bench/run.py --profile, and --steady's SteadyProfile)."""
    return [str(Path(sys.executable).with_name("py-spy")), "record", "--pid", str(pid), "--rate", "250",
            "--nonblocking", *(["--gil"] if gil else []), "--format", "raw", "--output", str(out)]


class SteadyProfile:
    """py-spy on the first worker from the first message sent to the last delivery
    (bench/run.py --profile NAME --steady): the steady state alone, without the
    members' connects and subscribes. Every thread that is not idle is sampled,
    the GIL held or not: a socket's send() releases it, and the kernel's time in
    it is what a big room's deliveries pay most."""

    def __init__(self, proc=None) -> None:
        self.proc = proc

    async def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGINT)
        if await self.proc.wait() != 0:
            raise RuntimeError(f"py-spy ended with {self.proc.returncode}: {(await self.proc.stderr.read()).decode()[-500:]}")


async def steady_profile(worker_pids: list[int] | None) -> SteadyProfile:
    out = os.environ.get("BENCH_STEADY_PROFILE")
    if not out or not worker_pids:
        return SteadyProfile()
    proc = await asyncio.create_subprocess_exec(*py_spy(worker_pids[0], out, gil=False),
                                                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    await asyncio.sleep(1)  # attached (it samples from its start; the first second is idle)
    if proc.returncode is not None:
        raise RuntimeError(f"py-spy did not start: {(await proc.stderr.read()).decode()[-500:]}")
    return SteadyProfile(proc)


class Helper:
    """A helper process of the load generator holding a share of the members
    (`python -m bench.loadgen --helper`): it opens them, says READY, and on
    `END total drain` waits for their deliveries and prints them as JSON."""

    def __init__(self, proc) -> None:
        self.proc = proc
        self.cpu = 0.0  # its CPU over its life, as a share of one core
        self.cpu_s = 0.0
        self.window_cpu_s = 0.0  # from the first message sent to its last delivery
        self.unstamped = 0  # reads without a kernel stamp (timed by the read instead)
        self.merged = 0  # reads that may have stamped a message late (rxstamp.Reading)

    async def line(self) -> str:
        raw = await self.proc.stdout.readline()
        if not raw:
            err = (await self.proc.stderr.read()).decode(errors="replace")
            raise RuntimeError(f"a load generator helper ended early (rc {await self.proc.wait()}): {err[-1500:]}")
        return raw.decode().strip()


class Delivered:
    """A helper's member, as merged here: its (message number, time) pairs, by its
    kernel's receive stamp (`got`) and by when the helper read it (`read`)."""

    def __init__(self, got: list, read: list = ()) -> None:
        self.got = [(n, at) for n, at in got]
        self.read = [(n, at) for n, at in read]


def helper_command(target: Target, share: int, k: int, procs: int, run: str, yield_readers: bool) -> list[str]:
    """The command of the k-th of `procs` helpers, holding `share` members."""
    return [sys.executable, "-m", "bench.loadgen", "--helper", "--target", target.kind,
            "--port", ",".join(map(str, target.ports)), "--members", str(share), "--room", target.room,
            "--codec", target.codec, "--run", run, "--port-offset", str(k), "--port-step", str(procs),
            *(["--yield-readers"] if yield_readers else [])]


async def start_helpers(target: Target, members_n: int, procs: int, run: str,
                        yield_readers: bool = False) -> list[Helper]:
    helpers = []
    for k in range(procs):
        share = len(range(k, members_n, procs))
        if not share:
            continue
        proc = await asyncio.create_subprocess_exec(
            *helper_command(target, share, k, procs, run, yield_readers),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            limit=1 << 30)
        helpers.append(Helper(proc))
    # Opened one after another would be fairer to the worker, but they open in
    # batches of 50 each; READY from every one before the first message.
    for h in helpers:
        line = await h.line()
        if line != "READY":
            raise RuntimeError(f"a load generator helper said {line!r} instead of READY")
    return helpers


async def finish_helpers(helpers: list[Helper], total: int, drain: float, began: float) -> list[Delivered]:
    for h in helpers:
        h.proc.stdin.write(f"END {total} {drain} {began}\n".encode())
        await h.proc.stdin.drain()
    members = []
    for h in helpers:
        out = json.loads(await h.line())
        rc = await h.proc.wait()
        if rc != 0:
            raise RuntimeError(f"a load generator helper exited with {rc}")
        h.cpu, h.cpu_s, h.window_cpu_s = out["cpu"], out["cpu_s"], out["window_cpu_s"]
        h.unstamped, h.merged = out["unstamped"], out["merged"]
        members += [Delivered(got, read) for got, read in zip(out["got"], out["read"])]
    return members


async def helper(target: Target, members_n: int, run: str, yield_readers: bool = False) -> None:
    """The helper process's side (see Helper). Its members are read by the kernel-
    stamped loop of bench/rxstamp.py from READY to the last delivery; with
    `yield_readers`, only when no worker wants a core (rxstamp.yield_cpu)."""
    wall = time.monotonic()
    members = await open_members(target, members_n, run)
    stamped = [rxstamp.adopt(m.ws.transport, m.pattern) for m in members]
    ready_cpu = cpu_seconds([os.getpid()])
    print("READY", flush=True)
    gc.collect()
    gc.freeze()
    gc.disable()
    if yield_readers:
        rxstamp.yield_cpu()
    reading = rxstamp.read_until(stamped, sys.stdin.fileno())
    # Its CPU from READY to its last delivery: before the first message (whose
    # time the line carries, on the shared monotonic clock) it only naps and polls
    # (NAP), so this is the CPU of the sending window and a little more.
    window_cpu_s = cpu_seconds([os.getpid()]) - ready_cpu
    gc.enable()
    used = resource.getrusage(resource.RUSAGE_SELF)
    cpu_s = used.ru_utime + used.ru_stime
    print(json.dumps({"got": [m.got for m in stamped], "read": [m.read for m in stamped], "unstamped": reading.unstamped,
                      "merged": reading.merged,
                      "cpu_s": round(cpu_s, 2), "window_cpu_s": round(window_cpu_s, 3),
                      "cpu": round(cpu_s / (time.monotonic() - wall), 2)}), flush=True)
    for m in stamped:
        m.sock.close()
    await asyncio.gather(*(m.close() for m in members), return_exceptions=True)


async def open_batched(target: Target, count: int) -> list:
    """`count` sockets opened (and subscribed), a hundred at a time."""
    sockets = []
    for start in range(0, count, 100):
        sockets += await asyncio.gather(*(target.connect() for _ in range(start, min(count, start + 100))))
    return sockets


async def idle(target: Target, count: int, worker_pid: int) -> dict:
    await asyncio.sleep(1)
    before = rss_kib(worker_pid)
    started = time.monotonic()
    sockets = await open_batched(target, count)
    elapsed = time.monotonic() - started
    await asyncio.sleep(2)
    after = rss_kib(worker_pid)
    result = {
        "connections": count,
        "kib_per_connection": round((after - before) / count, 1),
        "connects_per_s": round(count / elapsed, 1),
        # The worker's resident memory with every socket open, and before the first.
        "worker_mib": round(after / 1024, 1),
        "empty_worker_mib": round(before / 1024, 1),
    }
    await close_all(sockets)
    return result


async def churn(target: Target, count: int, rounds: int, worker_pid: int) -> dict:
    """`rounds` times over: `count` sockets opened (as `idle` opens them,
    subscribed) and then all closed; the worker's resident memory a second after
    each round's close. A worker that keeps what closed sockets leave (a leak, or
    garbage in cycles its collector has not reached yet) grows from round to
    round; one that frees it reuses the same memory for the next round."""
    if rounds < 1:
        raise SystemExit("churn: --rounds must be 1 or more")
    await asyncio.sleep(1)
    before = rss_kib(worker_pid)
    after: list[int] = []
    for _ in range(rounds):
        await close_all(await open_batched(target, count))
        await asyncio.sleep(1)
        after.append(rss_kib(worker_pid))
    return {
        "connections": count,
        "rounds": rounds,
        "empty_worker_mib": round(before / 1024, 1),
        "rounds_mib": [round(kib / 1024, 1) for kib in after],
        # After the last round; and what the rounds after the first added to it.
        "worker_mib": round(after[-1] / 1024, 1),
        "growth_mib": round((after[-1] - after[0]) / 1024, 1),
    }


async def storm(target: Target, count: int, concurrency: int, timeout: float, worker_pids: list[int] | None = None) -> dict:
    """`count` sockets at once into one worker, at most `concurrency` of them between
    their connect's start and their subscribe's answer: how fast they get in, and
    whether the rate holds as the worker fills (the first and last tenth). With
    `worker_pids`, the workers' CPU per socket in (`cpu_us_per_socket`), which a
    busy machine changes less than the rate."""
    await asyncio.sleep(0.5)
    sockets: list = []
    took: list[float] = []  # per socket: connect start to in
    done: list[float] = []  # per socket: the time it was in
    failures: dict[str, int] = {}
    first_failures: list[str] = []
    queue = iter(range(count))
    overflows = listen_overflows()
    # No collection of this process's garbage during the storm (thousands of
    # connection objects made at once): a collection's pause here is not the
    # server's. What is allocated meanwhile is freed by reference counting.
    gc.collect()
    gc.disable()

    def fail(why: str) -> None:
        failures[why] = failures.get(why, 0) + 1
        if len(first_failures) < 5:
            first_failures.append(why)

    async def opener() -> None:
        for _ in queue:
            began = time.monotonic()
            try:
                ws = await asyncio.wait_for(target.connect(), timeout)
            except Exception as exc:  # counted and reported, never dropped
                fail(reason(exc))
                continue
            at = time.monotonic()
            sockets.append(ws)
            took.append(at - began)
            done.append(at)

    cpu_before = cpu_times(worker_pids) if worker_pids else None
    started = time.monotonic()
    await asyncio.gather(*(opener() for _ in range(min(concurrency, count))))
    cpu_after = cpu_times(worker_pids) if worker_pids else None
    # Sockets that got in and were closed before the end (a cap, a sweep): failed too.
    await asyncio.sleep(1)
    closed = [ws for ws in sockets if ws.close_code is not None]
    for ws in closed:
        fail(f"closed after subscribe: {ws.close_code} {ws.close_reason or ''}".strip())
    gc.enable()
    n = len(done)
    done.sort()
    took.sort()
    tenth = max(1, n // 10)
    rate = lambda k, span: round(k / span, 1) if span > 0 else None  # noqa: E731
    q = lambda p: quantile_ms(took, p, digits=1)  # noqa: E731
    failed = sum(failures.values())
    result = {
        "sockets": count,
        "in": n - len(closed),
        "failed": failed,
        # Sockets in a second, from the first connect's start to the last socket in.
        "sockets_per_s": rate(n, done[-1] - started) if n else None,
        # The first tenth to get in, counted from the start; the last tenth, from
        # the time the socket before them got in.
        "first_tenth_per_s": rate(tenth, done[tenth - 1] - started) if n else None,
        "last_tenth_per_s": rate(tenth, done[-1] - (done[-tenth - 1] if n > tenth else started)) if n else None,
        "p50_ms": q(0.50),
        "p99_ms": q(0.99),
        "max_ms": round(took[-1] * 1000, 1) if took else None,
        "seconds": round(done[-1] - started, 2) if n else None,
        "concurrency": concurrency,
    }
    if cpu_before is not None and n:
        user, system = (after - before for after, before in zip(cpu_after, cpu_before))
        result["cpu_us_per_socket"] = round((user + system) / n * 1e6, 1)
        result["worker_system_share"] = round(system / max(user + system, 1e-9), 2)
    if overflows is not None:
        # The kernel's count of connections dropped for a full accept queue (on
        # the whole machine, this storm's the only traffic): each is a connect
        # retried a second or more later, seen in the p99.
        result["listen_overflows"] = listen_overflows() - overflows
    if failed:
        result["failed_reasons"] = failures
        print(f"storm: {failed} of {count} sockets failed; first reasons:", file=sys.stderr)
        for why in first_failures:
            print(f"  {why}", file=sys.stderr)
        print(f"storm: by reason: {json.dumps(failures)}", file=sys.stderr)
    await close_all(sockets)
    return result


async def connect_curve(target: Target, points: list[int], batch: int, concurrency: int, timeout: float) -> dict:
    """The connect rate against the sockets already open: for each point P (in
    increasing order) the worker is filled to P sockets (subscribed, not timed),
    then the next `batch` sockets are opened, at most `concurrency` in flight, and
    timed: sockets in a second. One worker fills up across the points."""
    await asyncio.sleep(0.5)
    sockets: list = []
    failures: dict[str, int] = {}
    curve = []
    gc.collect()
    gc.disable()

    async def fill(count: int) -> float:
        queue = iter(range(count))
        got = 0

        async def opener() -> None:
            nonlocal got
            for _ in queue:
                try:
                    sockets.append(await asyncio.wait_for(target.connect(), timeout))
                    got += 1
                except Exception as exc:  # counted and reported, never dropped
                    why = reason(exc)
                    failures[why] = failures.get(why, 0) + 1
        began = time.monotonic()
        await asyncio.gather(*(opener() for _ in range(min(concurrency, count))))
        return got / max(time.monotonic() - began, 1e-6)

    for point in points:
        if point > len(sockets):
            await fill(point - len(sockets))
            await asyncio.sleep(1)  # the fill's last sockets settled before the timed batch
        curve.append([len(sockets), round(await fill(batch), 1)])
    gc.enable()
    failed = sum(failures.values())
    result = {"curve": curve, "batch": batch, "concurrency": concurrency, "failed": failed,
              "rate_first": curve[0][1], "rate_last": curve[-1][1]}
    if failed:
        result["failed_reasons"] = failures
        print(f"curve: {failed} sockets failed: {json.dumps(failures)}", file=sys.stderr)
    await close_all(sockets)
    return result


def quantile_ms(values: list[float], p: float, digits: int = 2) -> float | None:
    """The p-quantile of sorted seconds, in ms (None for none)."""
    if not values:
        return None
    return round(values[min(len(values) - 1, int(p * len(values)))] * 1000, digits)


def listen_overflows() -> int | None:
    """TcpExt ListenOverflows from /proc/net/netstat (None where there is none)."""
    try:
        with open("/proc/net/netstat") as f:
            lines = [line.split() for line in f if line.startswith("TcpExt:")]
        return int(dict(zip(lines[0][1:], lines[1][1:]))["ListenOverflows"])
    except (OSError, IndexError, KeyError, ValueError):
        return None


def raise_fd_limit() -> None:
    """As many open files as the hard limit allows: a storm holds thousands of sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def close_all(sockets) -> None:
    await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", choices=sorted(PATHS), required=True)
    parser.add_argument("--port", required=True, help="the workers' ports, comma-separated")
    parser.add_argument("--scenario", choices=["fanout", "rate", "idle", "churn", "storm", "curve", "drain"])
    parser.add_argument("--members", type=int, default=100)
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--rate", type=float, default=100)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--rounds", type=int, default=5, help="churn: times the members are opened and closed")
    parser.add_argument("--concurrency", type=int, default=200, help="storm, curve: sockets between connect and subscribed at once")
    parser.add_argument("--connect-timeout", type=float, default=60, help="storm, curve: seconds a socket may take to get in")
    parser.add_argument("--points", default="0,1000,2500,5000", help="curve: sockets already open at each timed batch")
    parser.add_argument("--batch", type=int, default=500, help="curve: sockets timed at each point")
    parser.add_argument("--crash", action="store_true", help="drain: the first worker is killed (SIGKILL), the full "
                        "pipeline's too: a crash, not a drain")
    parser.add_argument("--worker-pid", type=int, default=0)
    parser.add_argument("--worker-pids", default="", help="every worker's pid, comma-separated (CPU per delivery; "
                        "drain: the first is the one drained)")
    parser.add_argument("--procs", type=int, default=1, help="fanout, rate: the members held by this many helper "
                        "processes (this one sends), their deliveries merged")
    parser.add_argument("--yield-readers", action="store_true",
                        help="with --procs: the helpers read only when no worker wants a core (SCHED_IDLE, on every "
                             "core), their deliveries timed by the kernel's stamps; bench/run.py then gives each "
                             "worker a core of its own")
    parser.add_argument("--room", default="bench")
    parser.add_argument("--codec", choices=["json", "msgpack", "protobuf"], default="json")
    parser.add_argument("--mention", metavar="USERNAME", help="every message @mentions this user (the full pipeline only)")
    # A helper process (start_helpers): opens --members sockets and reports their deliveries.
    parser.add_argument("--helper", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--run", help=argparse.SUPPRESS)
    parser.add_argument("--port-offset", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--port-step", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.helper and not args.scenario:
        parser.error("--scenario is required")
    raise_fd_limit()
    target = Target(args.target, [int(p) for p in args.port.split(",")], os.environ.get("BENCH_COOKIE", ""), os.environ.get("BENCH_SENDER_COOKIE", ""), args.room, args.codec, args.mention)
    target.port_offset, target.port_step = args.port_offset, args.port_step
    pids = [int(p) for p in args.worker_pids.split(",") if p] or ([args.worker_pid] if args.worker_pid else [])
    wall = time.monotonic()
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    # uvloop when installed (requirements-bench.txt): a frame is timed when its
    # socket's turn comes in the loop, and asyncio's own loop spent about 40 µs of
    # CPU a frame here (uvloop 17), so the last of 100 members was stamped
    # milliseconds after its bytes had arrived (p99 at 100 msg/s: 12.4 -> 9.3 ms,
    # the same worker code). Both targets are measured by the same load generator.
    run = asyncio.run
    with contextlib.suppress(ImportError):
        import uvloop

        run = uvloop.run
    if args.helper:
        run(helper(target, args.members, args.run, args.yield_readers))
        return
    if args.scenario == "fanout":
        result = run(publish(target, args.members, args.messages, window=args.window, worker_pids=pids, procs=args.procs,
                             yield_readers=args.yield_readers))
    elif args.scenario == "rate":
        result = run(publish(target, args.members, int(args.rate * args.seconds), rate=args.rate, drain=30,
                             worker_pids=pids, procs=args.procs, yield_readers=args.yield_readers))
    elif args.scenario == "storm":
        result = run(storm(target, args.members, args.concurrency, args.connect_timeout, pids))
    elif args.scenario == "curve":
        points = [int(p) for p in args.points.split(",")]
        result = run(connect_curve(target, points, args.batch, args.concurrency, args.connect_timeout))
    elif args.scenario == "drain":
        from bench.drain import drain_storm

        result = run(drain_storm(target, args.members, args.rate, pids, crash=args.crash))
    elif args.scenario == "churn":
        result = run(churn(target, args.members, args.rounds, args.worker_pid))
    else:
        result = run(idle(target, args.members, args.worker_pid))
    used = resource.getrusage(resource.RUSAGE_SELF)
    # How busy the load generator was: near 1.0 means it, not the server, was the limit
    # (with helper processes: all of them together, as a share of one core).
    own = (used.ru_utime - cpu.ru_utime) + (used.ru_stime - cpu.ru_stime)
    result["loadgen_cpu"] = round((own + result.get("helper_cpu_s", 0)) / (time.monotonic() - wall), 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
