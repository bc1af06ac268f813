"""What a push into many sockets costs a worker (`python -m bench.pushes`): the
ephemeral frames (presence diffs, typing notices, read markers and positions) that
a room or a user's group is sent, each to every socket of it on the worker.

One worker (pinned to core 0, this process to core 1, as bench/run.py pins them), its own PostgreSQL and
Redis (bench/run.py's services). N sockets of one user are opened and subscribed to
the bench room; the sender posts M messages; then one of the N moves its read
position forward M times at R a second (`read` frames, seq 1 to M). Each move is
a `read.state` push to the user's group, for every socket of that user but the
reader's (which has its ack): N - 1 pushes a move, the same fan-out a presence
diff or a typing notice takes into a room of N. Reported: the pushes that
arrived (all of them, or the run says how many did not), and the worker's CPU
(user and system) from the first move to the last push received, per push. That
CPU includes the M reads themselves (a database write each), shared among
(N - 1) pushes each, and whatever the worker does meanwhile for its N sockets
(renewing their presence leases, its sweeps). The pushes here go to a user's
group and have no room; a room's (presence, typing) take the same path with a
subscription lookup more.

The bare consumer has nothing like it: this compares commits (bench/comparisons.md,
part fifteen), run in each checkout in turn.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.loadgen import Target, cpu_times, open_batched, raise_fd_limit  # noqa: E402
from bench.run import BenchWorker, free_port, pinned, services  # noqa: E402


async def count_frames(ws, kind: str | None, counts: list[int]) -> None:
    """Read `ws` until it closes, counting the frames of type `kind` in counts[0]
    (None: read and count nothing, so that the socket's frames do not pile up)."""
    needle = f'"type":"{kind}"' if kind is not None else None
    async for data in ws:
        if needle is not None and needle in data:
            counts[0] += 1


async def posted(target: Target, poster, moves: int) -> int:
    """Post `moves` messages from `poster`; the seq of the last (the poster follows
    the room: its own messages come back to it)."""
    for n in range(moves):
        await poster.send(target.frame(f"m{n}", n))
    seen, last = 0, 0
    while seen < moves:
        frame = json.loads(await asyncio.wait_for(poster.recv(), 30))
        if frame.get("type") == "message.new":
            seen, last = seen + 1, max(last, frame["seq"])
    return last


async def measure(port: int, worker_pid: int, member: str, sender: str, sockets: int, moves: int,
                  rate: float) -> dict:
    target = Target("full", [port], member, sender, "bench")
    opened: list = []  # every socket, closed at the end
    readers: list = []
    try:
        members = await open_batched(target, sockets)
        opened += members
        poster = await target.connect(sender=True)
        opened.append(poster)
        # The read positions moved: the messages just posted (an earlier run's
        # moves left the position at its own last; it never moves back).
        last = await posted(target, poster, moves)
        first = last - moves + 1
        pushed = [0]
        readers = [asyncio.ensure_future(count_frames(ws, "read.state", pushed)) for ws in members[1:]]
        readers += [asyncio.ensure_future(count_frames(ws, None, [0])) for ws in (poster, members[0])]
        await asyncio.sleep(3)  # the messages delivered before the timed window
        wanted = (sockets - 1) * moves
        before, began = cpu_times([worker_pid]), time.monotonic()
        for seq in range(first, last + 1):
            await members[0].send(json.dumps({"type": "read", "room": "bench", "seq": seq, "ref": f"r{seq}"}))
            await asyncio.sleep(1 / rate)
        while pushed[0] < wanted and time.monotonic() - began < 60:
            await asyncio.sleep(0.02)
        after = cpu_times([worker_pid])
        cpu = sum(a - b for a, b in zip(after, before))
        return {"sockets": sockets, "moves": moves, "pushes": pushed[0], "wanted": wanted, "worker_cpu_s": round(cpu, 3),
                "cpu_us_per_push": round(cpu / max(pushed[0], 1) * 1e6, 2),
                "seconds": round(time.monotonic() - began, 2)}
    finally:
        for task in readers:
            task.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        await asyncio.gather(*(ws.close() for ws in opened), return_exceptions=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sockets", type=int, default=2500)
    parser.add_argument("--moves", type=int, default=40, help="read positions moved, one push each to the others")
    parser.add_argument("--rate", type=float, default=10, help="moves a second")
    parser.add_argument("--runs", type=int, default=3, help="each on a fresh worker")
    args = parser.parse_args()
    if args.sockets < 2 or args.moves < 1 or args.rate <= 0:
        parser.error("--sockets 2 or more, --moves 1 or more, --rate above 0")
    raise_fd_limit()
    if pinned(1):
        os.sched_setaffinity(0, {1})  # the load generator's core (bench/run.py), the worker's is 0
    results = []
    with services() as (workdir, ctx, member, sender):
        for _ in range(args.runs):
            port, tls_port = free_port(), free_port()
            # (reads are rate-limited to 5 a second per user: lifted, as bench/run.py
            # lifts the sends')
            env = {**ctx["env"], "DJANGO_ALLOWED_ORIGINS": f"http://127.0.0.1:{port}",
                   "REALTIME_RATE_READ": "1000000/1000000"}
            worker = BenchWorker("bench0", env, workdir, port=port, tls_port=tls_port).start()
            try:
                results.append(asyncio.run(measure(port, worker.proc.pid, member, sender, args.sockets, args.moves,
                                                   args.rate)))
            finally:
                worker.stop()
            print(json.dumps(results[-1]), flush=True)
    short = [r for r in results if r["pushes"] < r["wanted"]]
    if short:
        sys.exit(f"{len(short)} run(s) did not receive every push: {json.dumps(short)}")


if __name__ == "__main__":
    main()
