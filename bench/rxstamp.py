"""Deliveries timed by the members' kernel, not by the load generator's Python.

A helper process of the load generator (loadgen.py, `--procs`) holds a share of a
big room's members on core 1 (yielding, on either core: yield_cpu). Read through
the event loop, a delivery is timed when the helper's Python gets to its socket: in a room of 5,000 at 10 msg/s the
helpers read some 5,000 frames in a burst per message, and the last of them were
stamped tens of milliseconds after their bytes had arrived, behind the helpers'
own work on the other 4,999 (and behind PostgreSQL and Redis on the same core).
That delay is the load generator's, not the server's: on a real network each
member is a machine of its own.

So a member's socket asks its kernel for a receive timestamp (SO_TIMESTAMPNS),
which recvmsg() hands over with the bytes. The kernel takes it as it delivers the
segment to the member's socket (ip_local_deliver_finish: TCP's segments carry a
monotonic departure time until then, which the device's receive path leaves
alone). On loopback that is the receive softirq the worker's own send() runs on
its own core, some microseconds after the send: the moment the frame left the
server, before anything of the member's runs. (With bench/run.py
--steer-loopback that softirq runs on the load generator's core instead, and the
stamp waits for it.) A read that takes a frame of each of two messages carries
the later one's stamp for both: never early. Each delivery keeps both times, the
kernel's (`got`) and the moment the helper read it (`read`), and the load
generator reports both (`p99_ms` from the kernel's, `read_p99_ms` from the
reads), so what the change of stamp moved can be seen in every run.

The reading here is a plain loop, run by the helper once its members are open
and subscribed: the asyncio transports stop reading (nothing else runs in the
helper while it times deliveries). Every NAP it reads every socket that has
something, and it never waits in epoll_wait: a frame that arrives then wakes no
process, as a frame to another machine would not (bench/sendfloor.py --nap
measures the send loop against such a reader). Pings (and a Socket.IO target's)
are answered. The loop ends when the sender's END line has come in on stdin and
every member has every message or has closed, or at the drain's deadline.

Because the stamps are the kernel's, the reading need not be prompt, only
frequent enough that a member's socket holds one message's frame when it is read:
a read gets one stamp, the last segment's (TCP hands over the stamp of the last
segment read, and a segment that waits is merged into the one before it), so a
message with anything after it in the same read (the next message, a part of it,
a ping) is timed late. read_until counts the reads where that may have happened
(`merged`): a reader that fell a message behind makes them, and so does a server
that sent two messages in one burst, whose stamps are then late by only the
time between them; with none, no stamp was late. With `yield_cpu()` a helper
reads only when nothing else wants a core (SCHED_IDLE, on either core): the
workers can then have a core each (bench/run.py, the big room), as a member on
another machine takes nothing from the server's cores.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import time
import typing

from bench.wsframes import EIO_PING, read_frames, reply

SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)  # (Linux; Python does not name it)
SCM_TIMESTAMPNS = SO_TIMESTAMPNS
ANCILLARY = socket.CMSG_SPACE(16)  # one struct timespec
EIO_PING_PAYLOAD = EIO_PING.encode()
NAP = 0.002  # seconds between two reads of every ready socket (read_until)


class Stamped:
    """One member's socket, read here: its frames' (message number, time) pairs,
    by the kernel's stamp (`got`) and by the read (`read`)."""

    def __init__(self, sock: socket.socket, pattern) -> None:
        self.sock, self.pattern = sock, pattern
        self.buffer = bytearray()
        self.got: list[tuple[int, float]] = []
        self.read: list[tuple[int, float]] = []
        self.open = True

    def took(self, payload: bytes, at: float, read_at: float, start: int = 0) -> bool:
        """Whether `payload` (from `start`) is one of the run's messages: if so, its
        number is noted with the kernel's time and the read's."""
        found = self.pattern.search(payload, start)
        if found:
            n = int(found.group(1))
            self.got.append((n, at))
            self.read.append((n, read_at))
        return found is not None


TIMESPEC = struct.Struct("qq")


def kernel_stamp(ancdata, offset_ns: int) -> float | None:
    """The monotonic time (s) of the kernel's receive stamp in `ancdata`, or None.
    The stamp is on the realtime clock: `offset_ns` is realtime minus monotonic,
    taken at this nap's reads."""
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == SCM_TIMESTAMPNS and len(data) >= 16:
            sec, nsec = TIMESPEC.unpack_from(data)
            return (sec * 1_000_000_000 + nsec - offset_ns) / 1e9
    return None


def one_data_frame(data: bytes) -> int:
    """Where the payload of `data` starts if it is exactly one whole text or
    binary frame (what a member of a room at 10 msg/s reads nearly every time),
    else 0: read_frames takes it apart."""
    if len(data) < 2 or data[0] & 0x0F not in (1, 2):
        return 0
    n = data[1] & 0x7F
    if n < 126:
        # (a Socket.IO target's ping, "2", is left to the loop, which answers it)
        return 2 if len(data) == 2 + n and data[2:] != EIO_PING_PAYLOAD else 0
    if n == 126 and len(data) >= 4 and len(data) == 4 + ((data[2] << 8) | data[3]):
        return 4
    return 0


def adopt(transport, pattern) -> Stamped:
    """A member's socket taken from its asyncio transport (which stops reading it),
    stamped by the kernel from here on; the bytes its protocol had read and not yet
    made a frame of come along."""
    transport.pause_reading()
    sock = socket.socket(fileno=os.dup(transport.get_extra_info("socket").fileno()))
    sock.setblocking(False)
    sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    member = Stamped(sock, pattern)
    member.buffer += getattr(transport.get_protocol(), "buffer", b"")
    return member


class StdinClosed(Exception):
    """The sender's process went away before its END line."""


def yield_cpu() -> None:
    """This process runs only when nothing else wants a core (SCHED_IDLE), on any
    core: a worker waits for it rarely and briefly (a SCHED_IDLE task still gets a
    sliver of a busy core, and its own system calls run to their end)."""
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    os.sched_setaffinity(0, range(os.cpu_count() or 1))


class Reading(typing.NamedTuple):
    """What read_until saw besides the members' stamps."""

    line: str  # the sender's END line
    unstamped: int  # reads that carried no kernel stamp: 0 unless this kernel gives none
    complete: bool  # every member had every message
    merged: int  # reads that may have stamped a message late (something came after it in the read)


def read_until(members: list[Stamped], stdin_fd: int) -> Reading:
    """Read every member until the END line (stdin) has come and each member has
    its `total` messages or has closed, or the END line's drain has passed.
    StdinClosed if stdin ends before the END line."""
    poller = select.epoll()
    by_fd = {}
    for m in members:
        by_fd[m.sock.fileno()] = m
        poller.register(m.sock.fileno(), select.EPOLLIN)
    poller.register(stdin_fd, select.EPOLLIN)
    most = len(by_fd) + 1  # (epoll's poll() returns at most 1,023 events unless told)
    line = b""
    total = None
    deadline = None
    unstamped = merged = 0
    short: set[Stamped] = set(members)  # members short of `total` and open (known once `total` is)

    def closed(m: Stamped) -> None:
        poller.unregister(m.sock.fileno())
        m.open = False
        short.discard(m)

    try:
        while True:
            # Not waiting in epoll_wait while the frames come: a worker's send()
            # then wakes no process here (a wake-up costs the sending core a
            # cross-core call per frame, which on a real network is the member's
            # own machine's). The stamps are the kernel's: reading later changes
            # none of them.
            time.sleep(NAP)
            offset_ns = time.time_ns() - time.monotonic_ns()  # (the clocks' difference, for this nap's reads)
            for fd, _ in poller.poll(0, most):
                if fd == stdin_fd:
                    chunk = os.read(stdin_fd, 4096)
                    line += chunk
                    if b"\n" in line and total is None:
                        _, total_text, drain_text, _began = line.split(b"\n", 1)[0].decode().split()
                        total = int(total_text)
                        deadline = time.monotonic() + float(drain_text)
                        short = {m for m in members if m.open and len(m.got) < total}
                    if not chunk:
                        if total is None:
                            raise StdinClosed("stdin ended before the END line")
                        poller.unregister(stdin_fd)
                    continue
                m = by_fd[fd]
                if not m.open:
                    continue
                try:
                    data, ancdata, _, _ = m.sock.recvmsg(65536, ANCILLARY)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    data, ancdata = b"", []
                read_at = time.monotonic()
                if not data:
                    closed(m)
                    continue
                at = kernel_stamp(ancdata, offset_ns)
                if at is None:
                    unstamped += 1
                    at = read_at
                start = 0 if m.buffer else one_data_frame(data)
                if start:
                    # One whole data frame, nothing held before it: no buffering and
                    # no generator (the same outcome as the loop below, for less of
                    # the CPU that the helpers share with the workers).
                    m.took(data, at, read_at, start)
                else:
                    m.buffer += data
                    messages = 0
                    trailing = False  # a frame came after a message's in this read
                    for opcode, payload in read_frames(m.buffer):
                        trailing = trailing or messages > 0
                        answer = reply(opcode, payload)
                        if answer is not None:
                            try:
                                m.sock.sendall(answer)  # (a few bytes: the kernel takes them whole)
                            except OSError:
                                closed(m)
                                break
                        elif opcode in (1, 2):
                            messages += m.took(payload, at, read_at)
                        elif opcode == 8:
                            closed(m)
                            break
                    if messages > 1 or (messages and (trailing or m.buffer)):
                        merged += 1  # (stamped with what came after the message: maybe late)
                if total is not None and len(m.got) >= total:
                    short.discard(m)
            if total is not None and (not short or time.monotonic() >= deadline):
                return Reading(line.split(b"\n", 1)[0].decode(), unstamped,
                               all(len(m.got) >= total for m in members), merged)
    finally:
        poller.close()
