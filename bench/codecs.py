"""rt.v1.json, rt.v1.msgpack and rt.v1.protobuf on the same schemas: bytes on the
wire, and the CPU to encode a server frame and to decode (and validate) a client
frame, for representative frames. Run in-process (no server): `python -m bench.codecs`.

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


def rows() -> list[tuple]:
    """(frame, JSON bytes, MessagePack bytes, protobuf bytes, and µs for each)."""
    from realtime.protocol import PROTOBUF

    out = []
    codecs = (protocol.JSON, protocol.MSGPACK, PROTOBUF)
    for name, frame in SERVER_FRAMES.items():
        sizes = [len(codec.encode(frame)) for codec in codecs]
        times = [per_frame_us(lambda codec=codec: codec.encode(frame), 5000) for codec in codecs]
        out.append((f"{name}, encode", *sizes, *times))
    for name, raw in CLIENT_FRAMES.items():
        frame = protocol.JSON.decode(protocol.JSON.encode(raw))
        data = [protocol.JSON.encode(raw), protocol.MSGPACK.encode(raw), PROTOBUF_client(frame)]
        for codec, one in zip(codecs, data):
            codec.decode(one)  # each valid
        times = [per_frame_us(lambda codec=codec, one=one: codec.decode(one), 5000) for codec, one in zip(codecs, data)]
        out.append((f"{name}, decode + validate", *[len(one) for one in data], *times))
    return out


def PROTOBUF_client(frame) -> bytes:
    """A client frame as a protobuf client sends it."""
    from realtime.protocol import proto

    envelope = proto._classes()()
    proto._fill(getattr(envelope, proto._snake(type(frame).__name__)), __import__("msgspec").to_builtins(frame))
    return envelope.SerializeToString()


def table() -> str:
    lines = [
        "| Frame | JSON bytes | MessagePack bytes | Protobuf bytes | JSON µs | MessagePack µs | Protobuf µs |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, jb, mb, pb, jt, mt, pt in rows():
        lines.append(f"| {name} | {jb} | {mb} ({mb / jb:.2f}) | {pb} ({pb / jb:.2f}) | {jt:.2f} | {mt:.2f} ({mt / jt:.1f}x) "
                     f"| {pt:.2f} ({pt / jt:.1f}x) |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
