"""How many group messages each engine carries between processes
(`python -m bench.engines`, part of `make bench`): the figure docs/scaling.md
builds on, since the broker's load is counted in messages, not in sockets.

No worker and no socket: one publishing process sends room events (about 300 bytes,
the shape of a chat line's event) through the engine's `pack()` and `send()`, a
batch at a time, to G groups in turn, as fast as it goes for S seconds; R receiving
processes, each a worker's `Receiver` joined to every group, count what reaches
them. Reported: messages published a second, messages delivered a second (all
receivers together: what the broker carried), lost (published times receivers,
less delivered), and each process's CPU, which says which side was the limit: on
two cores the Python clients run out before Redis or NATS do, so these are the
rates one worker's engine client can publish and take in, with the broker below
them, not the broker's own ceiling.

The clients on core 0, the broker on core 1, each started as
`make cluster BROKER=...` starts it (deploy/brokers/). Writes bench/engines.md
(bench/run.py puts it into RESULTS.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LABELS = {"redis": "redis (one)", "redis-sharded": "redis, 2 shards"}


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def django_setup() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
    os.environ.setdefault("DJANGO_SECRET_KEY", os.urandom(16).hex())
    import django

    django.setup()


def event(group: str, seq: int) -> dict:
    """A room event as publish.py sends it: the chat line's payload and its seq."""
    return {
        "type": "room.event", "group": group, "room": group.rpartition(".")[2], "seq": seq, "epoch": 1,
        "event": {"type": "message.new", "id": 100000 + seq, "author": "someone", "author_id": 42,
                  "body": "a line of chat of a usual length, about eighty characters, sent to the room",
                  "created_at": "2026-12-03T10:00:00.000000+00:00", "client_id": f"c{seq:08d}", "mentions": []},
    }


class Counting:
    """What a Receiver talks to (delivery/fanout.Fanout's part of it): counts."""

    def __init__(self, groups: list[str]) -> None:
        self.groups = {group: set() for group in groups}
        self.count = 0
        self.first = self.last = 0.0
        self.failures = 0

    async def dispatch(self, message: dict) -> None:
        now = time.monotonic()
        if not self.count:
            self.first = now
        self.count += 1
        self.last = now

    def recovered(self) -> None:
        pass

    async def failed(self, exc: Exception, delay: float) -> float:
        self.failures += 1
        await asyncio.sleep(delay)
        return min(delay * 2, 2.0)


async def receive(url: str, groups: list[str], quiet: float) -> dict:
    from realtime.delivery.transport import engine_class

    engine = engine_class(url)(url)
    fan = Counting(groups)
    receiver = engine.receiver(fan)
    for group in groups:
        await receiver.join(group)
    print("ready", flush=True)
    started = own_cpu_seconds()
    # Until nothing has come for `quiet` seconds after the first message.
    while not fan.count or time.monotonic() - fan.last < quiet:
        await asyncio.sleep(0.1)
    seconds = max(fan.last - fan.first, 1e-9)
    return {"received": fan.count, "seconds": round(seconds, 3), "per_s": round(fan.count / seconds, 1),
            "cpu": round(own_cpu_seconds() - started, 2), "failures": fan.failures}


async def publish(url: str, groups: list[str], seconds: float, batch: int) -> dict:
    from realtime.delivery.transport import engine_class

    engine = engine_class(url)(url)
    seqs = dict.fromkeys(groups, 0)
    sent = 0
    turn = 0
    started, cpu = time.monotonic(), own_cpu_seconds()
    while time.monotonic() - started < seconds:
        messages = []
        for _ in range(batch):
            group = groups[turn % len(groups)]
            turn += 1
            seqs[group] += 1
            messages.append((group, event(group, seqs[group])))
        await engine.send(engine.pack(messages))
        sent += len(messages)
    took = time.monotonic() - started
    return {"sent": sent, "seconds": round(took, 3), "per_s": round(sent / took, 1),
            "cpu": round(own_cpu_seconds() - cpu, 2)}


def groups_of(n: int) -> list[str]:
    from realtime.delivery import names

    return [names.room_group(f"bench-{i}") for i in range(n)]


def role_main(args) -> None:
    django_setup()
    groups = groups_of(args.groups)
    if args.role == "receive":
        result = asyncio.run(receive(args.url, groups, args.quiet))
    else:
        result = asyncio.run(publish(args.url, groups, args.seconds, args.batch))
    print(json.dumps(result), flush=True)


def descendants(pid: int) -> list[int]:
    """Every process under `pid` (the brokers this bench started, their children too)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def one(url: str, env: dict, receivers: int, groups: int, seconds: float, batch: int, broker: list[int]) -> dict:
    from bench.loadgen import cpu_seconds
    from bench.run import pinned

    base = [*pinned(0), sys.executable, "-m", "bench.engines", "--url", url, "--groups", str(groups)]
    listening = [subprocess.Popen([*base, "--role", "receive"], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
                 for _ in range(receivers)]
    try:
        for proc in listening:
            line = proc.stdout.readline().strip()
            if line != "ready":
                raise RuntimeError(f"a receiver did not get ready on {url}: {line!r}")
        broker_cpu = cpu_seconds(broker, missing_ok=True)
        sent = subprocess.run([*base, "--role", "publish", "--seconds", str(seconds), "--batch", str(batch)],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=seconds + 120)
        if sent.returncode:
            raise RuntimeError(f"the publisher failed on {url}: {sent.stderr[-2000:]}")
        published = json.loads(sent.stdout.strip().splitlines()[-1])
        broker_cpu = cpu_seconds(broker, missing_ok=True) - broker_cpu
        got = []
        for proc in listening:
            out, _ = proc.communicate(timeout=seconds + 120)
            if proc.returncode:
                raise RuntimeError(f"a receiver failed on {url} (exit {proc.returncode})")
            got.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for proc in listening:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    delivered = sum(g["received"] for g in got)
    # The receivers' own window (first to last message), which the publisher's bounds.
    window = max(g["seconds"] for g in got)
    return {"published_per_s": published["per_s"], "delivered_per_s": round(delivered / window, 1),
            # Fewer than sent to each receiver: lost; more: extra (only Tansu has
            # shown any; a room event seen twice is dropped by seq in the fan-out).
            "lost": max(published["sent"] * receivers - delivered, 0),
            "extra": max(delivered - published["sent"] * receivers, 0),
            # CPU per message: to publish one, to take one in (a receiving worker), and
            # the broker's for each message it delivered.
            "publish_us": round(1e6 * published["cpu"] / published["sent"], 1),
            "receive_us": round(1e6 * sum(g["cpu"] for g in got) / max(delivered, 1), 1),
            "broker_us": round(1e6 * broker_cpu / max(delivered, 1), 1) if broker else None,
            "broker_cpu_share": round(broker_cpu / published["seconds"], 2) if broker else None,
            "sent": published["sent"]}


def measure(kinds: list[str], runs: int, receivers: int, groups: int, seconds: float, batch: int) -> list[dict]:
    from bench.brokers import Shards
    from bench.run import pin_tree, pinned
    from deploy import brokers

    if pinned(1):
        os.sched_setaffinity(0, {1})  # this process and the brokers it starts
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "REALTIME_"))}
    env.update({"DJANGO_SETTINGS_MODULE": "project.settings", "DJANGO_SECRET_KEY": os.urandom(16).hex(),
                "DJANGO_LOG_LEVEL": "WARNING", "PYTHONUNBUFFERED": "1"})
    makers = [(LABELS.get(kind, kind), lambda workdir, kind=kind: brokers.server(kind, workdir)) for kind in kinds]
    if "redis-sharded" in kinds:
        makers.append(("redis, 4 shards", Shards(4)))
    rows = []
    with tempfile.TemporaryDirectory(prefix="realtime-engines-") as tmp:
        workdir = Path(tmp)
        for label, make in makers:
            server = make(workdir).start()
            try:
                broker = descendants(os.getpid())  # the broker's processes: nothing else runs yet
                for pid in broker:
                    pin_tree(pid, 1)
                results = [one(server.url, {**env, "REDIS_URL": ""}, receivers, groups, seconds, batch, broker)
                           for _ in range(runs)]
            finally:
                server.stop()
            row = {"engine": label, "runs": results}
            for key in ("published_per_s", "delivered_per_s", "publish_us", "receive_us", "broker_us", "broker_cpu_share"):
                figures = [r[key] for r in results if r[key] is not None]
                row[key] = statistics.median(figures) if figures else None
            row["lost"] = sum(r["lost"] for r in results)
            row["extra"] = sum(r["extra"] for r in results)
            print(f"{label}: published {row['published_per_s']:,.0f}/s, delivered {row['delivered_per_s']:,.0f}/s, "
                  f"lost {row['lost']}, extra {row['extra']}, CPU µs a message: publish {row['publish_us']} receive {row['receive_us']} "
                  f"broker {row['broker_us']} (broker busy {row['broker_cpu_share']})",
                  flush=True)
            rows.append(row)
    return rows


def write(rows: list[dict], command: str, runs: int, receivers: int, groups: int, seconds: float, batch: int) -> str:
    lines = [
        "## Messages each engine carries (`python -m bench.engines`)", "",
        f"`{command}`, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, median of {runs} run(s) of {seconds:g} s. "
        f"One process publishes room events (~300 bytes) to {groups} groups in turn, {batch} a batch, through the "
        f"engine's pack() and send(); {receivers} processes, each a worker's Receiver joined to every group, count what "
        "reaches them. The clients share core 0 (three processes on one core: the rates are theirs, not the "
        "broker's ceiling), the broker has core 1. CPU per message: the publisher's for each message sent, the "
        "receivers' for each message taken in (what a worker pays per broker message), the broker's for each "
        "message it delivered, and how busy the broker's core was. Extra: messages received beyond those sent "
        "(only Tansu has shown any, in runs after the first on the same broker: the cause was not pinned down; a "
        "room event seen twice is dropped by seq in a worker's fan-out). Kafka is Tansu, not Apache Kafka.", "",
        "| Engine | published / s | delivered / s (all receivers) | lost / extra | publish µs CPU | receive µs CPU | "
        "broker µs CPU | broker core busy |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        broker = "–" if row["broker_us"] is None else f"{row['broker_us']:.1f}"
        busy = "–" if row["broker_cpu_share"] is None else f"{row['broker_cpu_share']:.2f}"
        lines.append(f"| {row['engine']} | {row['published_per_s']:,.0f} | {row['delivered_per_s']:,.0f} | {row['lost']} / {row['extra']} | "
                     f"{row['publish_us']:.1f} | {row['receive_us']:.1f} | {broker} | {busy} |")
    lines += ["", "Every run:", "", "```json", json.dumps(rows, indent=1), "```", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--role", choices=["receive", "publish"], help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--quiet", type=float, default=2.0, help=argparse.SUPPRESS)
    parser.add_argument("--groups", type=int, default=100)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--receivers", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--engines", default="", help="comma-separated kinds (deploy/brokers/); default: every one present")
    args = parser.parse_args()
    if args.role:
        return role_main(args)
    from bench.loadgen import raise_fd_limit
    from deploy import brokers

    raise_fd_limit()
    kinds = [k for k in (args.engines or ",".join(brokers.available())).split(",") if k]
    runs, seconds = (1, 1.0) if args.quick else (args.runs, args.seconds)
    rows = measure(kinds, runs, args.receivers, args.groups, seconds, args.batch)
    command = "python -m bench.engines" + (" --quick" if args.quick else "")
    text = write(rows, command, runs, args.receivers, args.groups, seconds, args.batch)
    (ROOT / "bench" / "engines.md").write_text(text)
    print(text.split("Every run:")[0])


if __name__ == "__main__":
    main()
