"""Metrics, health and readiness, the cluster view, structured logs and trace ids."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import time

import pytest
from channels.layers import get_channel_layer
from channels.testing import HttpCommunicator

import project.asgi  # noqa: F401  (its django.setup() reconfigures logging: done before caplog starts)
from realtime.state import heartbeat
from realtime.delivery import publish as broadcast
from realtime.observability.logs import ContextFilter
from tests.conftest import assert_quiet, call, socket, subscribe, until
from tests.services import RedisServer

pytestmark = [pytest.mark.django_db(transaction=True)]


async def http(path: str, headers=(), client=("127.0.0.1", 5555), timeout: float = 10) -> tuple[int, bytes]:
    from project.asgi import application

    comm = HttpCommunicator(application, "GET", path, headers=[(b"host", b"127.0.0.1"), *headers])
    comm.scope["client"] = client
    res = await comm.get_response(timeout=timeout)
    return res["status"], res["body"]


def sample(text: str, name: str, **labels) -> float:
    """One sample's value from Prometheus text (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.compile(rf"^{re.escape(name)}(\{{{re.escape(want)}\}})? (\S+)$" if want else rf"^{re.escape(name)} (\S+)$", re.M)
    match = pattern.search(text)
    return float(match.groups()[-1]) if match else 0.0


async def scrape() -> str:
    status, body = await http("/metrics")
    assert status == 200
    return body.decode()


@pytest.mark.asyncio
async def test_metrics_move_when_traffic_flows(cookies):
    before = await scrape()
    async with socket(cookies["alice"]) as alice, socket(cookies["bob"]) as bob:
        await subscribe(bob, "general")
        await call(alice, {"type": "message.send", "room": "general", "body": "hello", "client_id": "m1", "ref": 1})
        assert (await bob.receive_json_from(timeout=5))["type"] == "message.new"
        await call(alice, {"type": "nonsense"})
        during = await scrape()
        assert sample(during, "realtime_connections_active") - sample(before, "realtime_connections_active") == 2
    after = await scrape()
    moved = {
        ("realtime_connections_opened_total", ()): 2,
        ("realtime_frames_in_total", (("type", "message.send"),)): 1,
        ("realtime_frames_in_total", (("type", "invalid"),)): 1,
        ("realtime_frames_out_total", (("type", "message.new"),)): 1,
        ("realtime_errors_total", (("code", "unknown_type"),)): 1,
        ("realtime_frame_handling_seconds_count", (("type", "message.send"),)): 1,
        # The sender's chain, each step once (the send was alone).
        ("realtime_send_step_seconds_count", (("step", "rate_limit"),)): 1,
        ("realtime_send_step_seconds_count", (("step", "write"),)): 1,
        ("realtime_send_step_seconds_count", (("step", "publish"),)): 1,
        ("realtime_broadcast_latency_seconds_count", ()): 1,
        ("realtime_connections_closed_total", (("code", "1000"),)): 2,
    }
    for (name, labels), delta in moved.items():
        got = sample(after, name, **dict(labels)) - sample(before, name, **dict(labels))
        assert got == delta, f"{name}{dict(labels)} moved by {got}, expected {delta}"
    assert sample(after, "realtime_connections_active") == sample(before, "realtime_connections_active")
    for name in ("realtime_rate_limited_total", "realtime_replayed_events_total", "realtime_layer_send_failures_total"):
        assert f"# TYPE {name} counter" in after


@pytest.mark.parametrize("headers, client, status", [
    ((), ("127.0.0.1", 1), 200),
    ((), ("::1", 1), 200),
    (((b"x-forwarded-for", b"203.0.113.9"),), ("127.0.0.1", 1), 403),  # came through the proxy
    ((), ("203.0.113.9", 1), 403),
    (((b"authorization", b"Bearer wrong"),), ("203.0.113.9", 1), 403),
    (((b"authorization", b"Bearer s3cret-token"),), ("203.0.113.9", 1), 200),
])
@pytest.mark.asyncio
async def test_metrics_are_for_this_machine_or_the_token(settings, headers, client, status):
    settings.REALTIME_METRICS_TOKEN = "s3cret-token"
    assert (await http("/metrics", headers, client))[0] == status


@pytest.mark.asyncio
async def test_healthz_and_readyz_on_the_embedded_default(settings):
    settings.REDIS_URL = ""
    status, body = await http("/healthz")
    assert status == 200 and json.loads(body)["status"] == "ok"
    status, body = await http("/readyz")
    assert status == 200 and json.loads(body)["checks"] == {"database": "ok", "channel_layer": "ok", "broker": "ok"}


@pytest.mark.asyncio
async def test_readyz_fails_while_redis_is_down_or_hangs_and_recovers(settings, tmp_path):
    redis = RedisServer(tmp_path).start()
    settings.REDIS_URL = redis.url
    settings.REALTIME_READY_TIMEOUT = 1
    try:
        assert (await http("/readyz"))[0] == 200
        redis.stop()
        status, body = await http("/readyz")
        assert status == 503 and json.loads(body)["failing"] == ["channel_layer", "broker"]
        assert json.loads(body)["broker"] == "redis"
        redis.start()
        assert (await http("/readyz"))[0] == 200
        # A Redis that hangs (stopped, not gone) fails by the timeout, not forever.
        os.kill(redis.proc.pid, signal.SIGSTOP)
        try:
            status, body = await http("/readyz", timeout=5)
            assert status == 503
            assert json.loads(body)["checks"]["channel_layer"].startswith("timeout")
        finally:
            os.kill(redis.proc.pid, signal.SIGCONT)
        async def ready() -> bool:
            return (await http("/readyz"))[0] == 200

        await until(ready, what="ready again once the client reconnects")
    finally:
        redis.stop()


@pytest.mark.asyncio
async def test_a_worker_that_stops_heartbeating_leaves_the_cluster_view(settings, redis_server):
    settings.REDIS_URL = redis_server.url
    await heartbeat.publish_once()
    me = heartbeat.worker_id()
    assert me in [r["worker"] for r in await heartbeat.view()]
    from realtime.state import store

    client = store.client(redis_server.url)
    ghost = {**(await heartbeat.view())[0], "worker": "ghost", "t": 0}
    await client.set(heartbeat.record_key("ghost"), json.dumps(ghost))
    await client.zadd(heartbeat.WORKERS_KEY, {"ghost": 1.0})  # last seen long ago
    assert "ghost" not in [r["worker"] for r in await heartbeat.view()]


async def ticks_after(comm, t: float, n: int) -> None:
    """Read `comm`'s ticks until `n` of them were made after time `t`."""
    while n:
        tick = await comm.receive_json_from(timeout=5)
        assert tick["type"] == "metrics.tick", tick
        n -= tick["t"] > t


@pytest.mark.asyncio
async def test_metrics_subscribe_is_for_staff_and_ticks(cookies, settings, monkeypatch):
    """Ticks go to staff who asked, until they stop asking. That none come is shown
    by another staff socket's ticker, which ticks as often: in the time it ticks
    three times, a ticker left running would have ticked too."""
    settings.REDIS_URL = ""
    monkeypatch.setattr(heartbeat, "EVERY", 0.05)  # a tick (and a heartbeat) every 50 ms, not every second
    async with socket(cookies["bob"]) as bob, socket(cookies["admin"]) as admin, \
            socket(cookies["admin"]) as watcher, socket(cookies["alice"]) as alice:
        reply = await call(bob, {"type": "metrics.subscribe", "ref": "m"})
        assert (reply["type"], reply["code"]) == ("error", "forbidden")
        assert await call(admin, {"type": "metrics.subscribe", "ref": "m"}) == {"type": "ack", "ref": "m", "metrics": True}
        await call(alice, {"type": "message.send", "room": "general", "body": "x", "client_id": "t1", "ref": 1})
        ticks = [await admin.receive_json_from(timeout=5) for _ in range(3)]
        assert all(t["type"] == "metrics.tick" for t in ticks)
        workers = ticks[-1]["workers"]
        assert [w["worker"] for w in workers] == [heartbeat.worker_id()]
        assert workers[0]["connections"] >= 2 and set(workers[0]) >= {"p50_ms", "p99_ms", "messages_in", "delivered", "errors", "rooms"}
        await assert_quiet(bob)  # no ticks for non-staff, while staff had three

        assert await call(watcher, {"type": "metrics.subscribe", "ref": "w"}) == {"type": "ack", "ref": "w", "metrics": True}
        await admin.send_json_to({"type": "metrics.unsubscribe", "ref": "u"})
        while (frame := await admin.receive_json_from(timeout=5))["type"] == "metrics.tick":
            pass  # made before the unsubscribe
        assert frame == {"type": "ack", "ref": "u", "metrics": False}
        await ticks_after(watcher, time.time(), 3)
        await assert_quiet(admin)


@pytest.mark.asyncio
async def test_force_disconnect_closes_the_users_sockets(cookies, demo):
    async with socket(cookies["bob"]) as bob, socket(cookies["alice"]) as alice:
        await broadcast.force_disconnect(demo["bob"].pk)
        assert await bob.receive_output(timeout=5) == {"type": "websocket.close", "code": 4003}
        assert (await call(alice, {"type": "ping", "ref": 1}))["type"] == "pong"


# -- logs --------------------------------------------------------------------------
SECRETS = ("body-secret-6f3a", "demo-password")


@pytest.mark.asyncio
async def test_logs_are_json_events_with_trace_ids_and_no_secrets(cookies, demo, caplog):
    from django.test import AsyncClient
    from pythonjsonlogger.json import JsonFormatter

    caplog.set_level(logging.DEBUG)
    layer = get_channel_layer()
    watcher = await layer.new_channel()
    await layer.group_add(broadcast.room_group("general"), watcher)
    async with socket(cookies["alice"]) as alice, socket(cookies["bob"]) as bob:
        await subscribe(bob, "general")
        await call(alice, {"type": "message.send", "room": "general", "body": SECRETS[0], "client_id": "s1",
                           "ref": 1, "trace": "trace-abc-123"})
        delivered = await bob.receive_json_from(timeout=5)
        assert delivered["body"] == SECRETS[0]
    published = await layer.receive(watcher)
    assert published["trace"] == "trace-abc-123"

    # Over HTTP: sign in with a password, take a ticket, post with a traceparent.
    http_client = AsyncClient()
    res = await http_client.post("/accounts/login/", {"username": "carol", "password": SECRETS[1]})
    assert res.status_code == 302
    ticket = (await http_client.post("/api/v1/tickets/")).json()["ticket"]
    res = await AsyncClient().get("/", headers={"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"})
    assert res["X-Trace-Id"] == "0af7651916cd43dd8448eb211c80319c"
    # A message posted over REST carries the request's trace id to the layer.
    poster = AsyncClient()
    await poster.aforce_login(demo["alice"])
    res = await poster.post("/api/v1/rooms/general/messages/", {"body": "over rest", "client_id": "r1"},
                            content_type="application/json",
                            headers={"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"})
    assert res.status_code == 200
    assert (await layer.receive(watcher))["trace"] == "4bf92f3577b34da6a3ce929d0e0e4736"

    formatter = JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s")
    add_context = ContextFilter()
    lines = []
    for record in caplog.records:
        add_context.filter(record)
        lines.append(formatter.format(record))
    ours = [json.loads(line) for line in lines if "realtime." in line]
    assert ours and all("event" in entry for entry in ours if entry["name"].startswith("realtime.ws.consumer"))
    delivery = [e for e in ours if e.get("event") == "ws.deliver"]
    assert [(d["trace_id"], d["seq"], d["room"]) for d in delivery] == [("trace-abc-123", 1, "general")]
    handled = [e for e in ours if e.get("event") == "ws.frame" and e.get("frame") == "message.send"]
    assert [h["trace_id"] for h in handled] == ["trace-abc-123"] and 0 < handled[0]["ms"] < 5000
    everything = "\n".join(lines) + caplog.text
    session_keys = [c.decode().split("=", 1)[1] for c in cookies.values()]
    for secret in (*SECRETS, ticket, *session_keys):
        assert secret not in everything, "a secret reached the logs"


@pytest.mark.asyncio
async def test_a_frames_trace_id_is_its_own_and_ends_with_its_handling(cookies, monkeypatch):
    """While a frame is handled its trace id is the socket's; once it is answered,
    what the socket does next (here a session check from the housekeeper) carries
    none, and the task's context keeps nothing of it."""
    import gc

    from realtime.observability.logs import TRACE
    from realtime.ws.consumer import RealtimeConsumer

    seen = []

    async def look(self, message):
        seen.append(TRACE.get())

    monkeypatch.setattr(RealtimeConsumer, "session_check", look)
    async with socket(cookies["alice"]) as alice:
        reply = await call(alice, {"type": "ping", "t": 1, "ref": 1, "trace": "trace-xyz-1"})
        assert reply["ref"] == 1
        consumer = next(o for o in gc.get_objects() if type(o) is RealtimeConsumer and o.authenticated)
        consumer.local_queue.put_nowait({"type": "session.check"})
        await until(lambda: seen)
    assert seen == [None]


def test_the_alert_rules_use_metrics_that_exist():
    from pathlib import Path

    from prometheus_client import REGISTRY

    rules = (Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "alerts.yml").read_text()
    used = set(re.findall(r"\b(realtime_[a-z_]+)", rules))
    known = set()
    for family in REGISTRY.collect():
        known.update({family.name, f"{family.name}_total", f"{family.name}_bucket"})
    assert used and used <= known, used - known
    for alert in ("RealtimeWorkerMissing", "RealtimeErrorRate", "RealtimeConnectionDrop", "RealtimeLatencyP99"):
        assert f"alert: {alert}" in rules


def test_collector_pauses_are_counted_by_generation_without_garbage():
    """realtime_gc_pause_seconds (metrics.CollectorPauses, watched from the worker's
    start-up): a young and a full collection each land in their generation's
    histogram, with their time; the callback itself leaves no object behind
    that the collector tracks (it runs after every collection)."""
    import gc

    from prometheus_client.exposition import generate_latest
    from prometheus_client.registry import CollectorRegistry

    from realtime.observability import metrics

    pauses = metrics.CollectorPauses()
    gc.disable()  # (only the two collections below: none set off by allocations meanwhile)
    gc.callbacks.append(pauses)
    try:
        gc.collect(0)
        gc.collect(2)
    finally:
        gc.callbacks.remove(pauses)
        gc.enable()
    registry = CollectorRegistry()
    registry.register(pauses)
    text = generate_latest(registry).decode()

    def sample(name: str, generation: int, le: str | None = None) -> float:
        labels = f'generation="{generation}"' + (f',le="{le}"' if le else "")
        line = next(line for line in text.splitlines() if line.startswith(f"realtime_gc_pause_seconds_{name}{{{labels}}}"))
        return float(line.split()[1])

    assert sample("count", 0) == 1 and sample("count", 1) == 0 and sample("count", 2) == 1
    assert sample("sum", 2) > 0 and sample("bucket", 2, "+Inf") == 1
    # Cumulative: every bucket from the first that held it on counts it.
    buckets = [sample("bucket", 2, str(b)) for b in metrics.GC_PAUSE_BUCKETS]
    assert buckets == sorted(buckets) and buckets[-1] == 1

    info = {"generation": 2, "collected": 0, "uncollectable": 0}
    gc.disable()
    try:
        before = gc.get_count()[0]
        for _ in range(100):
            pauses("start", info)
            pauses("stop", info)
        made = gc.get_count()[0] - before
    finally:
        gc.enable()
    assert made == 0
    assert sample("count", 2) == 1  # (the text was read before)
    assert sum(pauses.counts[2]) == 101


def test_the_collectors_pauses_are_exported_once_and_counted_again_if_dropped(monkeypatch):
    """metrics.watch_collector (the worker's start-up): a second call exports
    nothing twice (prometheus would refuse the duplicate names), and the callback
    is put back where gc.callbacks lost it."""
    import gc

    from prometheus_client.registry import CollectorRegistry

    from realtime.observability import metrics

    registry = CollectorRegistry(auto_describe=True)  # (as prometheus_client's REGISTRY: names checked)
    monkeypatch.setattr(metrics, "REGISTRY", registry)
    monkeypatch.setattr(metrics, "_pauses_exported", False)
    monkeypatch.setattr(gc, "callbacks", [])
    metrics.watch_collector()
    metrics.watch_collector()
    assert gc.callbacks == [metrics.GC_PAUSES]
    gc.callbacks.clear()
    metrics.watch_collector()
    assert gc.callbacks == [metrics.GC_PAUSES]
    assert registry.get_sample_value("realtime_gc_pause_seconds_count", {"generation": "0"}) is not None


def test_a_labelled_child_is_looked_up_once_and_counts_in_the_registry(monkeypatch):
    """metrics.labelled: the child of a label value is made by prometheus_client
    once, then reused (no checks and lock per count), and what it counts is what
    /metrics exports."""
    from prometheus_client import REGISTRY

    from realtime.observability import metrics

    made = []
    real = type(metrics.CLOSED).labels
    monkeypatch.setattr(type(metrics.CLOSED), "labels", lambda self, *v: made.append(v) or real(self, *v))
    before = REGISTRY.get_sample_value("realtime_connections_closed_total", {"code": "labelled-test"}) or 0
    for _ in range(3):
        metrics.labelled(metrics.CLOSED, "labelled-test").inc()
    assert made == [("labelled-test",)]
    assert REGISTRY.get_sample_value("realtime_connections_closed_total", {"code": "labelled-test"}) == before + 3
    assert metrics.labelled(metrics.CLOSED, "labelled-test") is metrics.CLOSED.labels("labelled-test")
