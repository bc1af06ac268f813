"""Our full pipeline against the Socket.IO servers a team would otherwise pick
(`python -m bench.peers`, part of `make bench`), in the same run, measured by the
same load generator (bench/loadgen.py, `--target socketio`):

- python-socketio (bench/peer_servers/sio_app.py) under uvicorn with uvloop, httptools
  and websockets;
- Node's socket.io (bench/peer_servers/server.js, `npm ci --prefix bench/peer_servers`).

Each peer runs as one process with its default in-memory adapter and the
WebSocket transport only, pinned to core 0 as our worker is; the load generator,
PostgreSQL and Redis on core 1. The peers do what a chat room needs at its least:
an acknowledged join, and a message emitted to the whole room. They check no
session, no origin, no schema, no permission, no rate limit, and store nothing;
our pipeline does all of that on every frame (bench/run.py's module doc), the
message written to PostgreSQL with its seq before it is sent, and published
through Redis.

Scenarios (each a bench/run.py scenario of the same name and arguments):
- 100 msg/s into 100 members: delivery latency p50 / p99 (issue 18's target: our
  p99 no worse than python-socketio's);
- fan-out into 100 members, 16 messages in flight: deliveries a second;
- connect storm, 2,000 sockets into one room (200 handshakes in flight): sockets
  a second, each in when its join (ours: its subscribe) is acknowledged.

The targets' runs take turns (full, python-socketio, Node, full, ...), three of
each by default; the median is reported, with every run in the raw results.
Writes bench/peers.md (bench/run.py puts it into RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.loadgen import raise_fd_limit  # noqa: E402
from bench.run import SCENARIOS, fmt, one_run, pinned, representative, services  # noqa: E402
from deploy.cluster import free_port, stop_process, wait_port  # noqa: E402

PEERS_DIR = ROOT / "bench" / "peer_servers"
RATE = "100 msg/s into 100 members, p99"
FANOUT = "fan-out, 100 members"
STORM = "connect storm, 2,000 sockets into one room"
# name: (bench/run.py's scenario, metric, higher is better, the other figures shown)
SHOWN = {
    RATE: ("p99_ms", False, ("p50_ms", "first_p99_ms", "cpu_us_per_delivery")),
    FANOUT: ("deliveries_per_s", True, ("p99_ms", "cpu_us_per_delivery")),
    STORM: ("sockets_per_s", True, ("p99_ms", "failed")),
}
QUICK = {  # --quick: small, one run (a smoke test of the machinery)
    RATE: ["--scenario", "rate", "--members", "50", "--rate", "50", "--seconds", "3"],
    FANOUT: ["--scenario", "fanout", "--members", "50", "--messages", "50", "--window", "16"],
    STORM: ["--scenario", "storm", "--members", "300", "--concurrency", "100"],
}
QUICK_NOTE = " (smaller scenarios than their names say: bench/peers.py's QUICK)"
TARGETS = ("full", "python-socketio", "node-socketio")
LABELS = {"full": "our full pipeline (daphne)", "python-socketio": "python-socketio (uvicorn)",
          "node-socketio": "Node socket.io"}


class Peer:
    """One Socket.IO server process on a free port of 127.0.0.1, pinned to core 0."""

    def __init__(self, kind: str, workdir: Path) -> None:
        self.kind, self.port = kind, free_port()
        self.log = workdir / f"{kind}.log"
        self.proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        if self.kind == "node-socketio":
            return [*pinned(0), "node", str(PEERS_DIR / "server.js"), str(self.port)]
        return [*pinned(0), sys.executable, "-m", "uvicorn", "bench.peer_servers.sio_app:app", "--host", "127.0.0.1",
                "--port", str(self.port), "--ws", "websockets", "--ws-per-message-deflate", "false",
                "--lifespan", "off", "--log-level", "warning", "--no-access-log", "--backlog", "2048"]

    def __enter__(self) -> "Peer":
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.command(), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        wait_port(self.port, timeout=30, proc=self.proc)
        return self

    def __exit__(self, *exc) -> None:
        stop_process(self.proc)


def peer_run(kind: str, workdir: Path, args: list[str]) -> dict:
    """A fresh peer server, the load generator on core 1: one result."""
    with Peer(kind, workdir) as peer:
        time.sleep(0.5)
        out = subprocess.run(
            [*pinned(1), sys.executable, "-m", "bench.loadgen", "--target", "socketio", "--port", str(peer.port),
             "--worker-pid", str(peer.proc.pid), "--worker-pids", str(peer.proc.pid), *args],
            cwd=ROOT, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"loadgen failed: {out.stderr[-2000:]}")
    if out.stderr.strip():
        print(f"  loadgen [{kind}]: {out.stderr.strip()[-2000:]}", file=sys.stderr, flush=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def median(results: list[dict], metric: str):
    values = [r[metric] for r in results if r.get(metric) is not None]
    return statistics.median(values) if values else None


def table(results: dict, runs: int, command: str) -> str:
    lines = [
        "# Against the Socket.IO servers (`python -m bench.peers`)", "",
        f"`{command}`{QUICK_NOTE if '--quick' in command else ''}, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, median of {runs} run(s), the targets' "
        "runs taking turns, each on a fresh server pinned to core 0 (the load generator, PostgreSQL and Redis on "
        "core 1). The peers are one process each with their default in-memory adapter; they check and store "
        "nothing, where our pipeline authenticates, checks, rate-limits and writes every message to PostgreSQL "
        "with its seq before sending it, and publishes it through Redis (bench/peers.py says what each does).", "",
        "| Scenario | Metric | " + " | ".join(LABELS[t] for t in TARGETS) + " | Ours against python-socketio "
        "| Ours against Node | Target |",
        "| --- | --- | " + " | ".join("---:" for _ in TARGETS) + " | ---: | ---: | --- |",
    ]
    for name, per_target in results.items():
        metric, higher, _ = SHOWN[name]
        m = {t: median(per_target[t], metric) for t in TARGETS}

        def ratio(other):
            if not (m["full"] and m[other]):
                return "–"
            return f"{(m['full'] / m[other] if higher else m[other] / m['full']):.2f}x"

        target = "–"
        if name == RATE:
            if m["full"] is None or m["python-socketio"] is None:
                target = "p99 no worse than python-socketio's: not measured"
            else:
                target = ("p99 no worse than python-socketio's: "
                          + ("met" if m["full"] <= m["python-socketio"] else "not met"))
        cells = " | ".join(fmt(m[t], ",.2f" if metric.endswith("_ms") else ",.1f") for t in TARGETS)
        lines.append(f"| {name} | {metric} | {cells} | {ratio('python-socketio')} | {ratio('node-socketio')} | {target} |")
    lines += ["", "Ratios above 1 are better for us (rates divided, latency inverted).", "",
              "The run of the median, in more detail:", "",
              "| Scenario | Target | p50 ms | p99 ms | first member p99 ms | server CPU µs a delivery | lost / doubled "
              "| failed sockets | load generator CPU |", "| --- | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: |"]
    for name, per_target in results.items():
        metric = SHOWN[name][0]
        for t in TARGETS:
            r = representative(per_target[t], metric)
            if "error" in r:
                lines.append(f"| {name} | {LABELS[t]} | error: {r['error'][-120:]} | | | | | | |")
                continue
            lost = f"{r['lost']} / {r['duplicated']}" if "lost" in r else "–"
            lines.append(f"| {name} | {LABELS[t]} | {fmt(r.get('p50_ms'), ',.2f')} | {fmt(r.get('p99_ms'), ',.2f')} | "
                         f"{fmt(r.get('first_p99_ms'), ',.2f')} | {fmt(r.get('cpu_us_per_delivery'), '.1f')} | {lost} | "
                         f"{fmt(r.get('failed'), 'd')} | {fmt(r.get('loadgen_cpu'), '.2f')} |")
    lines += ["", "Every run:", "", "```json", json.dumps(results, indent=1), "```", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="small scenarios, one run (a smoke test)")
    parser.add_argument("--only", metavar="TEXT", help="only the scenarios whose name contains TEXT")
    parser.add_argument("--out", default=str(ROOT / "bench" / "peers.md"))
    args = parser.parse_args()
    if not shutil.which("node") or not (PEERS_DIR / "node_modules" / "socket.io").exists():
        sys.exit("bench.peers needs node and bench/peer_servers/node_modules: npm ci --prefix bench/peer_servers (make bench does)")
    raise_fd_limit()
    runs = 1 if args.quick else args.runs
    chosen = {name: (QUICK[name] if args.quick else SCENARIOS[name][0]) for name in SHOWN
              if not args.only or args.only in name}
    results: dict = {}
    errors = []
    with services() as (workdir, ctx, member, sender):
        for name, loadgen_args in chosen.items():
            results[name] = {t: [] for t in TARGETS}
            for _ in range(runs):
                for t in TARGETS:
                    try:
                        got = (one_run(ctx, workdir, "full", loadgen_args, member, sender) if t == "full"
                               else peer_run(t, workdir, loadgen_args))
                    except (RuntimeError, subprocess.TimeoutExpired, json.JSONDecodeError, TimeoutError) as exc:
                        print(f"peers: {name} [{t}]: ERROR {exc}", file=sys.stderr, flush=True)
                        got = {"error": str(exc)[-1000:]}
                        errors.append(f"{name} [{t}]")
                    results[name][t].append(got)
                    print(f"peers: {name} [{t}]: {got.get(SHOWN[name][0])}", flush=True)
    command = " ".join(["python -m bench.peers"] + (["--quick"] if args.quick else [])
                       + ([f"--runs {args.runs}"] if args.runs != 3 and not args.quick else [])
                       + ([f"--only '{args.only}'"] if args.only else []))
    text = table(results, runs, command)
    Path(args.out).write_text(text)
    print(text.split("Every run:")[0])
    if errors:
        print(f"{len(errors)} run(s) ended in an error: " + "; ".join(errors), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
