"""What a worker counts, for Prometheus (/metrics) and the live dashboard.

One set of metrics per process (each daphne worker is scraped on its own port).
Label values are bounded sets: frame types, error codes, close codes and actions
come from protocol.py and settings, never from the client (an unknown frame type is
counted as "invalid"). Per-room figures, whose label set is unbounded, are kept only
in the in-process window the dashboard reads (`Window.rooms`), not in Prometheus.
"""

from __future__ import annotations

import gc
import random
import threading
import time
from bisect import bisect_left
from collections import Counter as Tally
from itertools import accumulate

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import HistogramMetricFamily

from realtime import protocol

# -- Prometheus ---------------------------------------------------------------------
CONNECTIONS = Gauge("realtime_connections_active", "Open, authenticated sockets on this worker")
OPENED = Counter("realtime_connections_opened_total", "Sockets accepted and authenticated")
CLOSED = Counter("realtime_connections_closed_total", "Sockets closed, by close code", ["code"])
FRAMES_IN = Counter("realtime_frames_in_total", "Client frames received, by type", ["type"])
FRAMES_OUT = Counter("realtime_frames_out_total", "Frames sent to clients, by type", ["type"])
ERRORS = Counter("realtime_errors_total", "Error frames sent, by code", ["code"])
RATE_LIMITED = Counter("realtime_rate_limited_total", "Actions refused by a rate limit, by action", ["action"])
HANDLING = Histogram(
    "realtime_frame_handling_seconds", "Time from a frame's arrival to its reply, by type", ["type"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
# The sender's chain, step by step (ws/intake.py, domain/services.py): a batch of
# message.sends from one socket is one observation of each step.
SEND_STEP = Histogram(
    "realtime_send_step_seconds", "The sender's chain, by step: the rate-limit call, the database write (the trip "
    "to the database thread or the loop's own statement included), the publication (this worker's own sockets handed the events, then the "
    "transport)", ["step"],
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.05, 0.25, 1),
)
# message.send batches the event loop's own statement (domain/loopdb.py) handed to the
# database thread: by what stopped it (repeat: a client_id already used; room_gone: the
# room was deleted; the exception's type otherwise, also logged).
LOOP_WRITE_HANDED_OVER = Counter(
    "realtime_loop_write_handed_over_total", "message.send writes the event loop handed to the database thread, by "
    "reason", ["reason"],
)
LATENCY = Histogram(
    "realtime_broadcast_latency_seconds",
    "Time from a room event's publication (after commit) to its delivery; one observation per event and worker "
    "for the sockets it was written to together (the last of them)",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
LONG_POLLS_HELD = Gauge("realtime_long_polls_held", "Long polls (GET .../events/?wait=) this worker holds open now")
REPLAYED = Counter("realtime_replayed_events_total", "Room events sent from the log (subscribe replay, catch-up)")
REPLAY_READS_SHARED = Counter("realtime_replay_reads_shared_total",
                              "Subscribe replays and gap repairs answered by an identical read already under way "
                              "(ws/replays.py)")
BROKER_INFO = Gauge("realtime_broker_info", "The broker engine this worker uses (1), by engine", ["engine"])
BROKER_MESSAGES = Counter("realtime_broker_messages_total", "Group messages this worker published to or received "
                          "from the broker, by engine and direction", ["engine", "direction"])
BROKER_FAILURES = Counter("realtime_broker_failures_total", "Times this worker's broker connection failed and was "
                          "made again (every socket then catches up from the log), by engine", ["engine"])
LAYER_FAILURES = Counter("realtime_layer_send_failures_total", "Channel-layer sends that failed, by kind", ["kind"])
DEGRADED = Counter("realtime_degraded_total", "Redis calls that failed and were tolerated as state/degraded.py's table "
                   "says, by its row", ["feature"])
GC_FROZEN = Gauge("realtime_gc_frozen_objects", "Objects made at start-up and kept out of the garbage collector's walks "
                  "(gc.freeze, realtime/server/launcher.py)")
GC_FROZEN.set_function(gc.get_freeze_count)

GC_FULL_AFTER = Gauge("realtime_gc_full_after", "Collections of generation 1 before a full one may run: the "
                      "collector's third threshold (REALTIME_GC_FULL_AFTER under realtime.server)")
GC_FULL_AFTER.set_function(lambda: gc.get_threshold()[2])

GC_PAUSE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class CollectorPauses:
    """realtime_gc_pause_seconds: each garbage collection's pause, by generation
    (a collection stops every socket of the worker; a full one walks every
    object the sockets made). Counted in the collector's own callback
    (gc.callbacks) in plain lists, and read as a histogram when Prometheus
    scrapes: prometheus_client's values take a plain Lock, and a collection that
    began on a thread inside one would wait on itself. The callback leaves no
    object behind that the collector tracks."""

    def __init__(self) -> None:
        self.started = 0.0
        self.counts = [[0] * (len(GC_PAUSE_BUCKETS) + 1) for _ in range(3)]  # per bucket, then above the last
        self.sums = [0.0, 0.0, 0.0]

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self.started = time.perf_counter()
            return
        took = time.perf_counter() - self.started
        generation = info["generation"]
        self.counts[generation][bisect_left(GC_PAUSE_BUCKETS, took)] += 1
        self.sums[generation] += took

    def collect(self):
        family = HistogramMetricFamily(
            "realtime_gc_pause_seconds", "Garbage collections on this worker, by generation, and how long each "
            "stopped it (a full collection, generation 2, walks every object its sockets hold)",
            labels=["generation"])
        for generation in range(3):
            cumulative = list(accumulate(self.counts[generation]))
            family.add_metric([str(generation)], list(zip([*map(str, GC_PAUSE_BUCKETS), "+Inf"], cumulative)),
                              self.sums[generation])
        yield family


GC_PAUSES = CollectorPauses()


_pauses_exported = False


def watch_collector() -> None:
    """Count the collector's pauses from now on (the worker's start-up calls it):
    exported once per process, and counted again if gc.callbacks lost it."""
    global _pauses_exported
    if not _pauses_exported:
        REGISTRY.register(GC_PAUSES)
        _pauses_exported = True
    if GC_PAUSES not in gc.callbacks:
        gc.callbacks.append(GC_PAUSES)

_KNOWN_TYPES = set(protocol.CLIENT_TYPES)


def frame_type(tag: str | None) -> str:
    return tag if tag in _KNOWN_TYPES else "invalid"


# -- the dashboard's window ---------------------------------------------------------
LATENCY_SAMPLE = 2048


class Window:
    """Per-second figures of this worker since the last `take()`: what the
    heartbeat publishes (every second or two) and the dashboard draws."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.started = time.time()
        self._reset(time.monotonic())

    def _reset(self, now: float) -> None:
        self.since = now
        self.messages_in = 0
        self.delivered = 0
        self.observed = 0  # latencies seen (one per event and worker, written together)
        self.errors: Tally[str] = Tally()
        self.rate_limited = 0
        self.latencies: list[float] = []
        self.rooms: Tally[str] = Tally()

    def message_in(self, room: str) -> None:
        with self.lock:
            self.messages_in += 1
            self.rooms[room] += 1

    def delivery(self, latency: float | None, count: int = 1) -> None:
        with self.lock:
            self.delivered += count
            if latency is None:
                return
            self.observed += 1
            if len(self.latencies) < LATENCY_SAMPLE:
                self.latencies.append(latency)
            else:
                # A uniform sample of the interval's latencies (reservoir): the
                # quantiles stay honest while the heartbeat's sort stays short.
                slot = random.randrange(self.observed)
                if slot < LATENCY_SAMPLE:
                    self.latencies[slot] = latency

    def error(self, code: str) -> None:
        with self.lock:
            self.errors[code] += 1

    def limited(self) -> None:
        with self.lock:
            self.rate_limited += 1

    def take(self) -> dict:
        """The figures since the last take, as rates per second, and start anew."""
        now = time.monotonic()
        with self.lock:
            span = max(now - self.since, 1e-3)
            latencies = sorted(self.latencies)
            figures = {
                "span": round(span, 3),
                "messages_in": round(self.messages_in / span, 2),
                "delivered": round(self.delivered / span, 2),
                "p50_ms": _quantile(latencies, 0.50),
                "p99_ms": _quantile(latencies, 0.99),
                "errors": dict(self.errors),
                "rate_limited": self.rate_limited,
                "rooms": dict(self.rooms.most_common(10)),
            }
            self._reset(now)
        return figures


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return round(values[min(len(values) - 1, int(q * len(values)))] * 1000, 2)


WINDOW = Window()


_children: dict[tuple, object] = {}


def labelled(metric, *values):
    """`metric.labels(*values)`, looked up once: prometheus_client's labels()
    checks and converts the values and takes the metric's lock on every call (3%
    of a storm's worker as sockets closed, one close counted each). Only for
    values from a small fixed set (frame types, close codes, error codes)."""
    key = (metric, *values)
    child = _children.get(key)
    if child is None:
        child = _children[key] = metric.labels(*values)
    return child


def delivered(message: dict, count: int = 1) -> None:
    """Count one room event written to `count` sockets: the frame counter, the
    publish-to-write latency histogram (once: the last of those writes) and the
    dashboard's window."""
    kind = message.get("event", "room.event")
    labelled(FRAMES_OUT, kind).inc(count)
    published = message.get("t")
    latency = max(0.0, time.time() - published) if published else None
    if latency is not None:
        LATENCY.observe(latency)
    WINDOW.delivery(latency, count)
