"""Where an idle socket's memory goes: `python bench/memprobe.py [--sockets 500]`.

For each target (bare, full) two fresh workers (bench/memworker.py) on the bench's
private PostgreSQL and Redis: one plain (RSS, malloc and pymalloc totals), one with
tracemalloc. Each gets WARM sockets first (lazy imports, pools, caches), a probe,
N more sockets (as bench/loadgen.py opens them, subscribed for `full`), a probe;
the difference over N is the cost of one more socket. Prints per socket: RSS,
Python-traced bytes, the top allocation tracebacks, the gc type histogram, and one
socket's object graph (protocol attributes, coroutine chain with its frames' locals).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.loadgen import Target  # noqa: E402
from bench.run import BenchWorker, free_port, services  # noqa: E402


class ProbeWorker(BenchWorker):
    def command(self) -> list[str]:
        cmd = super().command()
        cmd[cmd.index("realtime.server")] = "bench.memworker"
        return cmd


def probe(worker: ProbeWorker, out: str, k: int) -> dict:
    done = Path(f"{out}.{k}.done")
    worker.proc.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + 300
    while not done.exists():
        if time.monotonic() > deadline:
            raise RuntimeError("no probe")
        time.sleep(0.1)
    return json.loads(Path(f"{out}.{k}.json").read_text())


async def open_sockets(target: Target, count: int, batch: int = 100) -> list:
    sockets = []
    for start in range(0, count, batch):
        sockets += await asyncio.gather(*(target.connect() for _ in range(start, min(count, start + batch))))
    return sockets


def short(tb: tracemalloc.Traceback, frames: int) -> str:
    keep = []
    for frame in reversed(tb):  # most recent first (a Traceback lists the oldest first)
        name = frame.filename
        for cut in ("site-packages/", f"{ROOT}/", "lib/python3.11/"):
            if cut in name:
                name = name.split(cut, 1)[1]
        keep.append(f"{name}:{frame.lineno}")
    return " < ".join(keep[:frames])


def run_one(ctx, workdir: Path, kind: str, member: str, sender: str, n: int, warm: int, trace: int, frames: int,
            top: int, env_extra: dict, settle: float = 2.0, keep: str | None = None) -> dict:
    port, tls_port = free_port(), free_port()
    out = str(workdir / f"probe-{kind}-{trace}-{time.monotonic_ns()}")
    env = {**ctx["env"], "DJANGO_ALLOWED_ORIGINS": f"http://127.0.0.1:{port}", "MEMPROBE_OUT": out, **env_extra}
    if trace:
        env["MEMPROBE_TRACE"] = str(trace)
    worker = ProbeWorker(f"probe-{kind}", env, workdir, port=port, tls_port=tls_port).start()
    target = Target(kind, [port], member, sender, "bench")
    result: dict = {}
    try:
        async def go():
            first = await open_sockets(target, warm)
            await asyncio.sleep(2)
            a = probe(worker, out, 0)
            more = await open_sockets(target, n, 10 if trace else 100)
            await asyncio.sleep(settle)
            b = probe(worker, out, 1)
            await asyncio.gather(*(ws.close() for ws in first + more), return_exceptions=True)
            return a, b
        a, b = asyncio.run(go())
        result["rss_kib"] = (b["rss_kib"] - a["rss_kib"]) / n
        ma, mb = a["mallinfo"], b["mallinfo"]
        if ma:
            result["malloc_in_use_kib"] = (mb["uordblks"] - ma["uordblks"]) / n / 1024
            result["malloc_mmapped_kib"] = (mb["hblkhd"] - ma["hblkhd"]) / n / 1024
            result["malloc_heap_kib"] = (mb["arena"] - ma["arena"]) / n / 1024
        pa, pb = a["pymalloc"], b["pymalloc"]
        for key in ("bytes in allocated blocks", "bytes in available blocks", "bytes in arenas"):
            k2 = next((k for k in pb if k.startswith(key)), None)
            if k2:
                result[f"pymalloc {key} kib"] = (pb[k2] - pa.get(k2, 0)) / n / 1024
        result["blocks"] = (b["blocks"] - a["blocks"]) / n
        types = []
        for name, (count, size) in b["types"].items():
            c0, s0 = a["types"].get(name, (0, 0))
            if size - s0 > n * 16 or count - c0 >= n:
                types.append((name, (count - c0) / n, (size - s0) / n))
        types.sort(key=lambda t: -t[2])
        result["gc_types"] = types[:top]
        result["gc_total_kib"] = sum(t[2] for t in types) / 1024
        result["one_socket"] = b.get("one_socket")
        if trace:
            result["traced_kib"] = (b["traced"] - a["traced"]) / n / 1024
            if keep:
                import shutil
                Path(keep).mkdir(parents=True, exist_ok=True)
                for k in (0, 1):
                    shutil.copy(f"{out}.{k}.snap", Path(keep) / f"{kind}.{k}.snap")
            s0 = tracemalloc.Snapshot.load(f"{out}.0.snap")
            s1 = tracemalloc.Snapshot.load(f"{out}.1.snap")
            filters = [tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, "<frozen importlib._bootstrap>")]
            s0, s1 = s0.filter_traces(filters), s1.filter_traces(filters)
            lines = s1.compare_to(s0, "lineno")
            result["by_line"] = [(short(st.traceback, 1), st.size_diff / n, st.count_diff / n) for st in lines[:top]]
            tbs = s1.compare_to(s0, "traceback")
            result["by_traceback"] = [(short(st.traceback, frames), st.size_diff / n, st.count_diff / n) for st in tbs[:top]]
            # Who asked: the innermost frame outside the standard library (asyncio's
            # Queue is charged to whoever made the queue), with the allocating line.
            owners: dict[str, list[float]] = {}
            for st in tbs:
                frames_ = list(reversed(st.traceback))
                owner = next((f for f in frames_ if "site-packages" in f.filename or f.filename.startswith(f"{ROOT}/")), frames_[0])
                key = f"{short([owner], 1)}  [{short([frames_[0]], 1)}]" if owner is not frames_[0] else short([owner], 1)
                entry = owners.setdefault(key, [0.0, 0.0])
                entry[0] += st.size_diff / n
                entry[1] += st.count_diff / n
            result["by_owner"] = sorted(((k, v[0], v[1]) for k, v in owners.items()), key=lambda t: -t[1])[:top * 2]
    except Exception:
        print(worker.log.read_text()[-3000:], file=sys.stderr)
        raise
    finally:
        worker.stop()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sockets", type=int, default=500)
    parser.add_argument("--warm", type=int, default=50)
    parser.add_argument("--targets", default="bare,full")
    parser.add_argument("--trace", type=int, default=12, help="tracemalloc frames (0: no traced run)")
    parser.add_argument("--no-plain", action="store_true", help="skip the run without tracemalloc")
    parser.add_argument("--frames", type=int, default=6)
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--json", help="write everything here too")
    parser.add_argument("--keep", help="copy the tracemalloc snapshots to this folder (KIND.0.snap, KIND.1.snap)")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds between the last socket and the probe "
                        "(bench/loadgen.py waits 2)")
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE for the worker")
    args = parser.parse_args()
    env_extra = dict(e.split("=", 1) for e in args.env)
    results = {}
    with services() as (workdir, ctx, member, sender):
        for kind in args.targets.split(","):
            if not args.no_plain:
                results[f"{kind} plain"] = run_one(ctx, workdir, kind, member, sender, args.sockets, args.warm, 0,
                                                   args.frames, args.top, env_extra, args.settle)
            if args.trace:
                results[f"{kind} traced"] = run_one(ctx, workdir, kind, member, sender, args.sockets, args.warm,
                                                    args.trace, args.frames, args.top, env_extra, args.settle, args.keep)
    for name, r in results.items():
        print(f"\n===== {name}: per socket =====")
        for key, value in r.items():
            if isinstance(value, float):
                print(f"  {key}: {value:.2f}")
        if "gc_types" in r:
            print("  -- gc-tracked objects (count/socket, bytes/socket by sys.getsizeof):")
            for t, c, s in r["gc_types"][:25]:
                print(f"    {s:8.0f} B  {c:5.2f}x  {t}")
        for key in ("by_line", "by_traceback", "by_owner"):
            if key in r:
                print(f"  -- tracemalloc {key} (bytes/socket, blocks/socket):")
                for where, size, count in r[key]:
                    print(f"    {size:8.0f} B  {count:5.2f}  {where}")
        if r.get("one_socket"):
            print("  -- one socket's graph:")
            print("    " + json.dumps(r["one_socket"], indent=1).replace("\n", "\n    "))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
