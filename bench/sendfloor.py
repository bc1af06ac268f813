"""The floor under a big room's fan-out on this machine (`python -m bench.sendfloor`):
what writing one small frame to each of N loopback TCP sockets costs when nothing
else is done, no framework, no Python beyond the loop of send() calls.

A reader process (pinned to core 1, as the load generator is) holds N sockets and
reads them with uvloop (or, with --nap MS, as the big room's helpers do: every MS,
never waiting in epoll_wait, so a send wakes no reader; bench/rxstamp.py); this process (pinned to core 0, as the workers are)
accepts them and, R times at a fixed rate, sends a 300-byte frame to each in one
loop: a message into an N-member room as our fan-out writes it (bench/run.py's
5,000-member room: 10 a second), with the frame made once. Reported per round:
the wall time of the loop (the last member's send after the first's), its CPU
(user and system, /proc/self/stat), and per send. Where the workers' CPU a
delivery in the big room comes near this, what is left is the kernel's
loopback, not our code. With --steer-loopback (bench/run.py's loopback_steered)
the receiving half of that loopback runs on the reader's core, as the members'
own kernels would on a real network: what is left on core 0 is the sending half.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.loadgen import cpu_times, raise_fd_limit  # noqa: E402
from bench.run import loopback_steered, pinned, steering_checked, steering_option  # noqa: E402

FRAME = b"\x81\x7e\x01\x28" + b"x" * 296  # a 296-byte text frame, 300 bytes with its header


async def reader(port: int, count: int) -> None:
    """The members: `count` connections, each read and thrown away until closed."""

    class Drain(asyncio.Protocol):
        def data_received(self, data: bytes) -> None:
            pass

    loop = asyncio.get_running_loop()
    for _ in range(count):
        await loop.create_connection(Drain, "127.0.0.1", port)
    print("READY", flush=True)
    await loop.create_future()  # until terminated


def napping_reader(port: int, count: int, nap_ms: float) -> None:
    """The members as bench/rxstamp.py reads them: no one waits in epoll_wait while
    the frames come; every `nap_ms` the ready sockets are read, all at once. A
    send then wakes no reading process on the other core (on a real network the
    members' wake-ups are on their own machines)."""
    import select

    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(count)]
    poller = select.epoll()
    for s in socks:
        s.setblocking(False)
        poller.register(s.fileno(), select.EPOLLIN)
    by_fd = {s.fileno(): s for s in socks}
    print("READY", flush=True)
    while True:
        time.sleep(nap_ms / 1000)
        for fd, _ in poller.poll(0, len(by_fd)):  # (1,023 at most unless told)
            try:
                by_fd[fd].recv(65536)
            except BlockingIOError:
                pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--rate", type=float, default=10)
    parser.add_argument("--reader", type=int, help=argparse.SUPPRESS)  # the reader process: the port
    parser.add_argument("--nap", type=float, default=0, metavar="MS",
                        help="the reader sleeps MS between reads instead of waiting in epoll (napping_reader)")
    steering_option(parser)
    args = parser.parse_args()
    raise_fd_limit()
    if args.reader:
        if args.nap:
            napping_reader(args.reader, args.members, args.nap)
            return
        import uvloop

        uvloop.run(reader(args.reader, args.members))
        return
    with loopback_steered(steering_checked(parser, args)):
        measure(args)


def measure(args) -> None:
    if pinned(0):
        os.sched_setaffinity(0, {0})
    listener = socket.create_server(("127.0.0.1", 0), backlog=4096)
    port = listener.getsockname()[1]
    proc = subprocess.Popen([*pinned(1), sys.executable, "-m", "bench.sendfloor", "--reader", str(port),
                             "--members", str(args.members), "--nap", str(args.nap)], cwd=ROOT, stdout=subprocess.PIPE)
    members = []
    while len(members) < args.members:
        conn, _ = listener.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.setblocking(False)
        members.append(conn)
    assert proc.stdout.readline().strip() == b"READY"
    walls, users, systems = [], [], []
    started = time.monotonic()
    me = [os.getpid()]
    for n in range(args.rounds):
        delay = started + n / args.rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        user, system = cpu_times(me)
        began = time.perf_counter()
        for conn in members:
            conn.send(FRAME)
        walls.append(time.perf_counter() - began)
        after = cpu_times(me)
        users.append(after[0] - user)
        systems.append(after[1] - system)
    proc.terminate()
    proc.wait()
    for conn in members:
        conn.close()
    per = lambda seconds: round(seconds / args.members * 1e6, 2)  # noqa: E731
    cpu = sum(users) + sum(systems)
    print(json.dumps({
        "members": args.members, "rounds": args.rounds, "rate": args.rate, "steered": args.steer_loopback,
        "reader_nap_ms": args.nap,
        "round_ms_p50": round(statistics.median(walls) * 1000, 2),
        "round_ms_max": round(max(walls) * 1000, 2),
        "us_per_send_p50": per(statistics.median(walls)),
        "cpu_us_per_send": round(cpu / (args.members * args.rounds) * 1e6, 2),
        "system_share": round(sum(systems) / cpu, 2) if cpu else None,
    }))


if __name__ == "__main__":
    main()
