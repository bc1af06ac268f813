"""The cluster view: every worker publishes its figures every second, and whoever
reads the view (the dashboard's ticks, the admin console) sees each worker that
published within the last TTL seconds; a worker that stops drops out by itself.

With REDIS_URL the records live in Redis (`rt:{hb}:<worker>` with a TTL, and the set
`rt:workers` scored by time); without it, in this process (one worker). The
records are read together (MGET): their hash tag `{hb}` keeps them in one slot,
so the view works on a Redis Cluster too.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections import Counter

from realtime.state import degraded, store
from realtime.observability import metrics

log = logging.getLogger(__name__)

EVERY = 1.0  # seconds between heartbeats
TTL = 5.0  # seconds after which a silent worker leaves the view
WORKERS_KEY = "rt:workers"


def record_key(worker: str) -> str:
    """A worker's record (one hash slot for all of them: `{hb}`)."""
    return f"rt:{{hb}}:{worker}"


_local: dict[str, dict] = {}

# This process's sockets, for the admin console: conn_id -> (user id, username).
SOCKETS: dict[str, tuple[int, str]] = {}
draining = False


def worker_id() -> str:
    from django.conf import settings

    return settings.REALTIME_WORKER_ID


def record() -> dict:
    """This worker's figures for the last interval (taken from metrics.WINDOW)."""
    figures = metrics.WINDOW.take()
    users = Counter(uid for uid, _ in SOCKETS.values())
    names = {uid: name for uid, name in SOCKETS.values()}
    return {
        "worker": worker_id(),
        "pid": os.getpid(),
        "uptime": round(time.time() - metrics.WINDOW.started, 1),
        "connections": len(SOCKETS),
        "users": len(users),
        "messages_in": figures["messages_in"],
        "delivered": figures["delivered"],
        "p50_ms": figures["p50_ms"],
        "p99_ms": figures["p99_ms"],
        "errors": figures["errors"],
        "rate_limited": figures["rate_limited"],
        "rooms": figures["rooms"],
        "draining": draining,
        # For the admin console: who is connected here (the 200 with most sockets).
        "sockets_by_user": {str(uid): [names[uid], n] for uid, n in users.most_common(200)},
        "t": time.time(),
    }


async def publish_once() -> None:
    rec = record()
    url = store.redis_url()
    if not url:
        _local.clear()
        _local[rec["worker"]] = rec
        return
    client = store.client(url)
    key = record_key(rec["worker"])
    pipe = client.pipeline(transaction=False)
    pipe.set(key, json.dumps(rec), ex=int(TTL))
    pipe.zadd(WORKERS_KEY, {rec["worker"]: rec["t"]})
    pipe.zremrangebyscore(WORKERS_KEY, "-inf", rec["t"] - 3600)
    await pipe.execute()


async def beat() -> None:
    """One heartbeat; while Redis is down the view misses this worker (state/degraded.py)."""
    try:
        await publish_once()
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        degraded.tolerate(degraded.HEARTBEAT, exc)


async def _loop() -> None:
    while True:
        await beat()
        await asyncio.sleep(EVERY)


def ensure_started() -> None:
    """Start this process's heartbeat (once per event loop)."""
    store.start_once("heartbeat", _loop)


async def view() -> list[dict]:
    """Every worker that heartbeated within TTL seconds, by name."""
    now = time.time()
    url = store.redis_url()
    if not url:
        return [r for r in _local.values() if now - r["t"] <= TTL]
    client = store.client(url)
    names = await client.zrangebyscore(WORKERS_KEY, now - TTL, "+inf")
    if not names:
        return []
    raw = await client.mget([record_key(n.decode() if isinstance(n, bytes) else n) for n in names])
    records = [json.loads(r) for r in raw if r]
    return sorted((r for r in records if now - r["t"] <= TTL), key=lambda r: r["worker"])
