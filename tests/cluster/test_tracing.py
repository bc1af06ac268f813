"""Tracing across real workers (realtime/observability/tracing.py): two daphne
workers export to a small OTLP/HTTP receiver (deploy/otlp.py). A message sent on
worker a and received on worker b is one trace holding spans of both, in order,
over the socket and over REST; a receiver that never answers slows no socket."""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from deploy.otlp import OtlpReceiver
from tests.cluster.conftest import login, open_socket, send_messages
from tests.conftest import missing
from tests.services import Cluster

pytestmark = [pytest.mark.cluster, pytest.mark.asyncio]


@pytest.fixture(scope="module")
def receiver():
    r = OtlpReceiver().start()
    yield r
    r.stop()


@pytest.fixture(scope="module")
def traced_cluster(receiver):
    """Two workers behind nginx, every span sampled and exported to `receiver`."""
    workdir = Path(tempfile.mkdtemp(prefix="realtime-tracing-"))
    workdir.chmod(0o755)  # nginx's workers read the static files
    c = Cluster(workdir, workers=2, balancer="nginx", extra_env={
        "REALTIME_RATE_MESSAGE_SEND": "100000/100000",
        "DJANGO_LOGIN_RATE_LIMIT": "10000/m",
        "REALTIME_EXPOSE_WORKER": "1",
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
        "OTEL_TRACES_SAMPLER": "always_on",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        # Small enough for a burst to fill while an export hangs (the last test);
        # an export that gets no answer hangs 30 s (seconds in this SDK).
        "OTEL_BSP_MAX_QUEUE_SIZE": "512",
        "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "64",
        "OTEL_EXPORTER_OTLP_TIMEOUT": "30",
    })
    try:
        c.start()
    except FileNotFoundError as exc:
        missing(str(exc))
    yield c
    receiver.answer()  # no export left unanswered while the workers stop
    c.stop()
    artifacts = Path(__file__).resolve().parents[2] / "test-artifacts" / "cluster-tracing"
    artifacts.mkdir(parents=True, exist_ok=True)
    for log in workdir.glob("worker-*.log"):
        shutil.copy(log, artifacts / log.name)
    shutil.rmtree(workdir, ignore_errors=True)


async def subscribed(base: str, user: str):
    ws = await open_socket(base, login(base, user))
    await ws.send(json.dumps({"type": "subscribe", "room": "general", "ref": "s"}))
    while json.loads(await ws.recv()).get("ref") != "s":
        pass
    return ws


async def next_message(ws, timeout: float = 15) -> dict:
    while True:
        frame = json.loads(await asyncio.wait_for(ws.recv(), timeout))
        if frame.get("type") == "message.new":
            return frame


async def wait_for(predicate, timeout: float = 30, what: str = "the spans"):
    deadline = time.monotonic() + timeout
    while not (found := predicate()):
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        await asyncio.sleep(0.1)
    return found


def seq_of(span) -> int | None:
    for kv in span.attributes:
        if kv.key == "realtime.seq":
            return kv.value.int_value
    return None


# Every span of a message's trace (its root aside); the workers export each as it
# ends, so a test waits for all of them.
STEPS = {"realtime.permission", "realtime.db.write", "realtime.publish", "realtime.broker", "realtime.fanout",
         "realtime.ws.write"}


def assert_one_trace_across_workers(receiver, root) -> None:
    """The trace of `root` (a span on a: the frame's, or the HTTP request's), in the
    order tracing.py's module doc draws: permission, write and publish on a under
    the root, then the broker hop, the fan-out and the socket writes on b."""
    spans = receiver.trace(root.trace_id)
    where = {span.name: resource["service.instance.id"] for resource, span in spans}
    by_name: dict[str, list] = {}
    for _, span in spans:
        by_name.setdefault(span.name, []).append(span)

    def only(name):
        found = by_name.get(name, [])
        assert len(found) == 1, f"{name}: {len(found)} spans in {sorted(by_name)}"
        return found[0]

    assert where[root.name] == "a"
    assert {resource["service.name"] for resource, _ in spans} == {"realtime"}
    assert {resource["service.instance.id"] for resource, _ in spans} == {"a", "b"}
    for name in ("realtime.permission", "realtime.db.write", "realtime.publish"):
        assert (only(name).parent_span_id, where[name]) == (root.span_id, "a"), name
    assert (only("realtime.broker").parent_span_id, where["realtime.broker"]) == (only("realtime.publish").span_id, "b")
    assert (only("realtime.fanout").parent_span_id, where["realtime.fanout"]) == (only("realtime.broker").span_id, "b")
    writes = by_name["realtime.ws.write"]
    assert writes and {w.parent_span_id for w in writes} == {only("realtime.fanout").span_id}
    assert where["realtime.ws.write"] == "b"


async def test_a_message_sent_on_a_and_received_on_b_is_one_trace(traced_cluster, receiver):
    a, b = traced_cluster.workers
    bob = await subscribed(b.url, "bob")
    alice = await open_socket(a.url, login(a.url, "alice"))
    try:
        client_id = f"trace-ws-{time.monotonic_ns()}"
        await alice.send(json.dumps({"type": "message.send", "room": "general", "body": "hello, traced",
                                     "client_id": client_id, "ref": "m"}))
        seq = (await next_message(bob))["seq"]
        [(_, write)] = await wait_for(lambda: receiver.find(
            lambda r, s: s.name == "realtime.db.write" and seq_of(s) == seq and r["service.instance.id"] == "a"))
        await wait_for(lambda: {s.name for _, s in receiver.trace(write.trace_id)} >= STEPS | {"ws message.send"},
                       what="the trace's spans from both workers")
        [frame] = [s for _, s in receiver.trace(write.trace_id) if not s.parent_span_id]
        assert frame.name == "ws message.send" and frame.kind == frame.SPAN_KIND_SERVER
        assert_one_trace_across_workers(receiver, frame)
        for _, span in receiver.trace(write.trace_id):
            assert "hello, traced" not in str(span.attributes)
    finally:
        await alice.close()
        await bob.close()


def post_traced(base: str, cookie: str, body: str, traceparent: str) -> dict:
    """POST .../messages/ (the REST send) as a caller in a trace of its own."""
    csrf = dict(part.split("=", 1) for part in cookie.split("; "))["csrftoken"]
    request = urllib.request.Request(
        # A query string (ignored by the view) that must not reach the spans either.
        f"{base}/api/v1/rooms/general/messages/?q=typed-by-someone",
        data=json.dumps({"body": body, "client_id": f"trace-rest-{time.monotonic_ns()}"}).encode(),
        headers={"Cookie": cookie, "Content-Type": "application/json", "X-CSRFToken": csrf, "Referer": base + "/",
                 "traceparent": traceparent},
    )
    with urllib.request.urlopen(request, timeout=30) as res:
        return json.loads(res.read())


async def test_a_rest_post_on_a_joins_the_callers_trace_to_the_socket_on_b(traced_cluster, receiver):
    """The request span (DjangoInstrumentor, under daphne) takes the caller's
    traceparent; the rest of the trace follows it to worker b."""
    a, b = traced_cluster.workers
    bob = await subscribed(b.url, "bob")
    trace_id = "4bf92f3577b34da6a3ce929d0e0e47" + f"{time.monotonic_ns() % 256:02x}"
    try:
        ack = await asyncio.to_thread(post_traced, a.url, login(a.url, "alice"), "over REST, traced",
                                      f"00-{trace_id}-00f067aa0ba902b7-01")
        assert (await next_message(bob))["seq"] == ack["seq"]
        wanted = bytes.fromhex(trace_id)
        caller = bytes.fromhex("00f067aa0ba902b7")  # the request span's parent, outside the cluster
        await wait_for(lambda: {s.name for _, s in receiver.trace(wanted)} >= STEPS and any(
            s.parent_span_id == caller for _, s in receiver.trace(wanted)), what="the trace's spans from both workers")
        [request] = [s for _, s in receiver.trace(wanted) if s.parent_span_id == caller]
        assert request.name.startswith("POST ") and request.kind == request.SPAN_KIND_SERVER
        assert_one_trace_across_workers(receiver, request)
        for _, span in receiver.trace(wanted):
            for secret in ("over REST, traced", "sessionid", "typed-by-someone"):
                assert secret not in str(span.attributes)
    finally:
        await bob.close()


async def test_a_collector_that_never_answers_slows_no_socket(traced_cluster, receiver):
    """The receiver takes every export and answers none (each hangs for the
    exporter's 30 s timeout): a burst sent on a is delivered in full on b, both
    workers answer, and b's span queue, at its bound, drops spans instead."""
    a, b = traced_cluster.workers
    bob = await subscribed(b.url, "bob")
    log = traced_cluster.workdir / "worker-b.log"
    requests = receiver.requests
    receiver.hang()
    try:
        count = 300
        acks = await send_messages(a.url, login(a.url, "alice"), "general", count, f"hang{time.monotonic_ns()}")
        first = acks[0]["seq"]
        seqs = [(await next_message(bob, timeout=60))["seq"] for _ in range(count)]
        assert seqs == list(range(first, first + count))
        await bob.send(json.dumps({"type": "ping", "ref": "p"}))
        while json.loads(await asyncio.wait_for(bob.recv(), 15)).get("type") != "pong":
            pass
        for worker in (a, b):
            assert urllib.request.urlopen(f"{worker.url}/healthz", timeout=15).status == 200
        # The exports were taken and never answered; b's queue filled and dropped.
        assert receiver.requests > requests
        await wait_for(lambda: "Queue full, dropping Span" in log.read_text(), timeout=15, what="a dropped span")
    finally:
        receiver.answer()
        await bob.close()
