"""rt.v1.json against rt.v1.msgpack on the same schemas: bytes on the wire, and the
CPU to encode a server frame and to decode (and validate) a client frame, for
representative frames. Run in-process (no server): `python -m bench.codecs`.

CPU is the best of 5 repeats of a timed loop, in microseconds per frame; sizes
are exact. Prints a Markdown table (bench/run.py adds it to RESULTS.md).
"""

from __future__ import annotations

import os
import sys
import timeit
from datetime import datetime, timezone

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")

from realtime import protocol  # noqa: E402

NOW = datetime(2026, 11, 26, 12, 0, 0, 123456, tzinfo=timezone.utc)
BODY = "Deploy of api-7 finished; error rate back under 0.1% (was 2.3% at peak). Rolling the canary next."

SERVER_FRAMES = {
    "message.new (typical chat line)": protocol.MessageNew(
        room="ops-incidents", seq=184467, id=9_876_543, author="alice.smith", body=BODY, client_id="c-5f2a9e7b1d", ts=NOW
    ),
    "message.edited (delta)": protocol.MessageEdited(room="ops-incidents", seq=184468, id=9_876_543, body=BODY[:40], edited_at=NOW),
    "ack": protocol.MessageAck(ref="r-1042", room="ops-incidents", id=9_876_543, seq=184467),
    "presence.diff": protocol.PresenceDiff(room="ops-incidents", joins=["bob", "carol"], leaves=["dave"], count=12),
    "metrics.tick (2 workers)": protocol.MetricsTick(t=1_795_000_000.25, workers=[
        protocol.WorkerFigures(worker=f"w{i}", pid=4000 + i, uptime=3600.5, connections=1200, users=900,
                               messages_in=85.5, delivered=9100.25, p50_ms=1.2, p99_ms=7.9, errors={}, rate_limited=0,
                               rooms={"ops-incidents": 40, "general": 12}, draining=False)
        for i in range(2)
    ]),
}
CLIENT_FRAMES = {
    "message.send": {"type": "message.send", "room": "ops-incidents", "body": BODY, "client_id": "c-5f2a9e7b1d", "ref": "r-1042"},
    "subscribe": {"type": "subscribe", "room": "ops-incidents", "since": 184400, "ref": "s-1"},
    "ping": {"type": "ping", "ref": "p-77", "t": 1_795_000_000.25},
}


def per_frame_us(fn, number: int = 20000) -> float:
    return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6


def rows() -> list[tuple[str, int, int, float, float]]:
    out = []
    for name, frame in SERVER_FRAMES.items():
        j, m = protocol.JSON.encode(frame), protocol.MSGPACK.encode(frame)
        out.append((f"{name}, encode", len(j), len(m),
                    per_frame_us(lambda: protocol.JSON.encode(frame)), per_frame_us(lambda: protocol.MSGPACK.encode(frame))))
    for name, raw in CLIENT_FRAMES.items():
        j, m = protocol.JSON.encode(raw), protocol.MSGPACK.encode(raw)
        protocol.JSON.decode(j), protocol.MSGPACK.decode(m)  # both valid
        out.append((f"{name}, decode + validate", len(j), len(m),
                    per_frame_us(lambda: protocol.JSON.decode(j)), per_frame_us(lambda: protocol.MSGPACK.decode(m))))
    return out


def table() -> str:
    lines = [
        "| Frame | JSON bytes | MessagePack bytes | size ratio | JSON µs | MessagePack µs | CPU ratio |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, jb, mb, jt, mt in rows():
        lines.append(f"| {name} | {jb} | {mb} | {mb / jb:.2f} | {jt:.2f} | {mt:.2f} | {mt / jt:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
