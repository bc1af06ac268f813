"""What state/store.Batched's Redis round trips cost the worker's loop
(`python -m bench.batched`): the rate limits, leases and presence that a connect
storm's handshakes ask Redis for, several commands a socket, sent together.

This process (pinned to core 0) plays the worker; a private Redis (core 1, as
bench/run.py pins it) answers. Each round, --batch callers each ask for one
command at once, as that many handshakes waiting together do: an EVAL of a token
bucket script (one key, four arguments, like ratelimit's) or, with --plain, a
SET. Reported: this process's CPU (user and system) per command over --rounds
rounds, and the commands a second. The bare consumer asks Redis nothing; this
compares commits (bench/comparisons.md, part twenty-two), run in each checkout
in turn (`--code DIR` takes realtime/ from another checkout).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

BUCKET = """
local t = tonumber(redis.call('HGET', KEYS[1], 't') or ARGV[2])
local now = tonumber(ARGV[3])
local last = tonumber(redis.call('HGET', KEYS[1], 'at') or now)
t = math.min(tonumber(ARGV[2]), t + (now - last) * tonumber(ARGV[1]))
local ok = 0
if t >= tonumber(ARGV[4]) then t = t - tonumber(ARGV[4]); ok = 1 end
redis.call('HSET', KEYS[1], 't', t, 'at', now)
redis.call('PEXPIRE', KEYS[1], 60000)
return {ok, tostring(t)}
"""


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def measure(url: str, batch: int, rounds: int, plain: bool) -> dict:
    from realtime.state import store

    batched = store.batched(url)

    async def ask(i: int):
        # A coroutine, as the callers are (ratelimit, leases, presence), each its task.
        if plain:
            return await batched.execute_command("SET", f"bench:batched:{i}", i)
        return await batched.eval(BUCKET, 1, f"bench:bucket:{i}", 10, 1000, time.time(), 1)

    for _ in range(20):  # warm: connections made, the script loaded
        await asyncio.gather(*(ask(i) for i in range(batch)))
    began, began_cpu = time.perf_counter(), cpu()
    for _ in range(rounds):
        answers = await asyncio.gather(*(ask(i) for i in range(batch)))
    elapsed, used = time.perf_counter() - began, cpu() - began_cpu
    assert len(answers) == batch and all(a is not None for a in answers)
    commands = batch * rounds
    return {"commands": commands, "batch": batch, "command": "SET" if plain else "EVAL",
            "cpu_us_per_command": round(used / commands * 1e6, 2),
            "commands_per_s": round(commands / elapsed)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=200, help="callers waiting together (a storm's handshakes)")
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--plain", action="store_true", help="SET instead of a script")
    parser.add_argument("--code", type=Path, default=ROOT, help="the checkout whose realtime/ is measured")
    parser.add_argument("--redis-url", help="an existing Redis (else a private one on core 1)")
    args = parser.parse_args()
    from bench.run import services  # (which puts this checkout first on the path)

    sys.path.insert(0, str(args.code.resolve()))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {0})

    def runs(url: str) -> list[dict]:
        return [asyncio.run(measure(url, args.batch, args.rounds, args.plain)) for _ in range(args.runs)]

    if args.redis_url:
        results = runs(args.redis_url)
    else:
        with services() as (_, ctx, _, _):
            results = runs(ctx["redis"].url)
    from realtime.state import store

    results.sort(key=lambda r: r["cpu_us_per_command"])
    print(json.dumps({"code": str(Path(store.__file__).parents[2]), "median": results[len(results) // 2], "runs": results}, indent=1))


if __name__ == "__main__":
    main()
