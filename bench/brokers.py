"""The broker engines side by side (`python -m bench.brokers`, part of `make bench`):
the cross-worker scenarios of bench/run.py (two workers, the sender on the first,
the members alternating) on every engine REALTIME_BROKER_URL can name, each broker
started as deploy/brokers/ starts it, and the bare Channels consumer (channels_redis
on the same machine) in the same run; plus one Redis against two and four shards.

Writes bench/brokers.md (bench/run.py puts it into RESULTS.md) and bench/brokers.png.
The workers are pinned to core 0; the load generator and every broker to core 1.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.loadgen import raise_fd_limit  # noqa: E402
from bench.run import one_run, pinned, services  # noqa: E402
from deploy import brokers  # noqa: E402

SCENARIOS = {
    # name: (loadgen arguments, metric, higher is better)
    "cross-worker fan-out, 500 members on 2 workers": (
        ["--scenario", "fanout", "--members", "500", "--messages", "60", "--window", "16"], "deliveries_per_s", True),
    "100 msg/s into 100 members on 2 workers, p99": (
        ["--scenario", "rate", "--members", "100", "--rate", "100", "--seconds", "10"], "p99_ms", False),
}
QUICK = {
    "cross-worker fan-out, 500 members on 2 workers": (
        ["--scenario", "fanout", "--members", "100", "--messages", "30", "--window", "16"], "deliveries_per_s", True),
    "100 msg/s into 100 members on 2 workers, p99": (
        ["--scenario", "rate", "--members", "50", "--rate", "50", "--seconds", "3"], "p99_ms", False),
}


class Shards:
    """n plain Redis, rooms sharded over them (deploy/brokers/redis.py)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __call__(self, workdir: Path):
        from deploy.brokers.redis import ShardedRedis

        directory = workdir / f"shards-{self.n}"
        directory.mkdir(exist_ok=True)
        return ShardedRedis(directory, shards=self.n)


def configurations(kinds: list[str]) -> list[tuple[str, object]]:
    """(label, broker maker or None for bare Channels) in the order measured."""
    found: list[tuple[str, object]] = [("bare Channels (channels_redis)", None)]
    labels = {"redis": "redis (one)", "redis-sharded": "redis, 2 shards"}
    for kind in kinds:
        found.append((labels.get(kind, kind), lambda workdir, kind=kind: brokers.server(kind, workdir)))
    if "redis-sharded" in kinds:
        found.append(("redis, 4 shards", Shards(4)))
    return found


def measure(kinds: list[str], scenarios: dict, runs: int) -> list[dict]:
    rows = []
    # This process and what it starts (the brokers) on core 1; the workers pin
    # themselves to core 0 (bench/run.py).
    if pinned(1):
        os.sched_setaffinity(0, {1})
    with services() as (workdir, ctx, member, sender):
        for label, make in configurations(kinds):
            server = None
            env = dict(ctx["env"])
            try:
                if make is not None:
                    server = make(workdir).start()
                    env["REALTIME_BROKER_URL"] = server.url
                row = {"engine": label, "results": {}}
                for name, (args, metric, higher) in scenarios.items():
                    values = []
                    for _ in range(runs):
                        result = one_run({**ctx, "env": env}, workdir, "bare" if make is None else "full", args,
                                         member, sender, workers=2)
                        values.append(result)
                    figures = [r.get(metric) for r in values if r.get(metric) is not None]
                    row["results"][name] = {
                        "metric": metric, "median": statistics.median(figures) if figures else None,
                        "runs": figures, "lost": sum(r.get("lost") or 0 for r in values),
                        "duplicated": sum(r.get("duplicated") or 0 for r in values),
                    }
                    print(f"{label}: {name}: {figures} (lost {row['results'][name]['lost']}, "
                          f"duplicated {row['results'][name]['duplicated']})", flush=True)
                rows.append(row)
            finally:
                if server is not None:
                    server.stop()
    return rows


def write(rows: list[dict], scenarios: dict, runs: int, command: str) -> str:
    names = list(scenarios)
    bare = rows[0]["results"]
    lines = [
        "## Brokers side by side (`python -m bench.brokers`)", "",
        f"`{command}`, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, median of {runs} run(s). Two workers on "
        "core 0, the load generator and the broker on core 1 (each broker started as `make cluster BROKER=...` "
        "starts it: a private server on this machine). The full pipeline on each engine; the first row is the bare "
        "Channels consumer on channels_redis in the same run. Ratio: against that row (above 1 is better). "
        "Kafka here is Tansu, a Kafka-protocol broker, not Apache Kafka (none can be had on these machines).", "",
        "| Engine | " + " | ".join(f"{n} | ratio" for n in names) + " | lost / duplicated |",
        "| --- | " + " | ".join("---: | ---:" for _ in names) + " | --- |",
    ]
    for row in rows:
        cells = []
        for n in names:
            got = row["results"][n]
            median, base = got["median"], bare[n]["median"]
            higher = scenarios[n][2]
            ratio = (median / base if higher else base / median) if median and base else None
            unit = " ms" if got["metric"].endswith("_ms") else "/s"
            cells.append(f"{median:,.1f}{unit}" if median is not None else "–")
            cells.append(f"{ratio:.2f}x" if ratio is not None else "–")
        lost = sum(r["lost"] for r in row["results"].values())
        dup = sum(r["duplicated"] for r in row["results"].values())
        lines.append(f"| {row['engine']} | " + " | ".join(cells) + f" | {lost} / {dup} |")
    lines += ["", "![brokers](brokers.png)", "", "Every run:", "", "```json", json.dumps(rows, indent=1), "```", ""]
    return "\n".join(lines)


def chart(rows: list[dict], scenarios: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(scenarios)
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4.5))
    for ax, name in zip(axes, names):
        labels = [row["engine"].replace(" (channels_redis)", "") for row in rows]
        values = [row["results"][name]["median"] or 0 for row in rows]
        colors = ["#999999"] + ["#2f6db5"] * (len(rows) - 1)
        ax.barh(labels, values, color=colors)
        ax.invert_yaxis()
        unit = "ms (lower is better)" if scenarios[name][1].endswith("_ms") else "deliveries/s (higher is better)"
        ax.set_title(name, fontsize=10)
        ax.set_xlabel(unit)
        for y, v in enumerate(values):
            ax.text(v, y, f" {v:,.0f}" if v >= 100 else f" {v:.1f}", va="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--engines", default=",".join(brokers.available()),
                        help="comma-separated kinds (deploy/brokers/); default: every one present")
    args = parser.parse_args()
    raise_fd_limit()
    scenarios = QUICK if args.quick else SCENARIOS
    runs = 1 if args.quick else args.runs
    kinds = [k for k in args.engines.split(",") if k]
    rows = measure(kinds, scenarios, runs)
    command = "python -m bench.brokers" + (" --quick" if args.quick else "") + (f" --runs {args.runs}" if args.runs != 3 else "")
    text = write(rows, scenarios, runs, command)
    (ROOT / "bench" / "brokers.md").write_text(text)
    chart(rows, scenarios, ROOT / "bench" / "brokers.png")
    print(text.split("Every run:")[0])


if __name__ == "__main__":
    main()
