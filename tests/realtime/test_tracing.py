"""Tracing in one process (realtime/observability/tracing.py), with the SDK's
in-memory exporter: the spans of one message.send over a socket and their order;
off by default (no spans, no traceparent in the layer message); a sampler that
says no makes no recording spans, and no span at all below a frame's root; a
collector that never answers slows no socket."""

from __future__ import annotations

import socket as sockets
import threading

import pytest
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON

from realtime.delivery import publish
from realtime.observability import tracing
from tests.conftest import assert_quiet, socket, subscribe, until

pytestmark = [pytest.mark.asyncio, pytest.mark.django_db(transaction=True)]

SECRET_BODY = "the body must never be in a span 7f3a"


def send(i: int, body: str = SECRET_BODY) -> dict:
    return {"type": "message.send", "room": "general", "body": body, "client_id": f"t{i}", "ref": f"r{i}"}


async def next_of(comm, kind: str, timeout: float = 5) -> dict:
    while True:
        frame = await comm.receive_json_from(timeout=timeout)
        if frame["type"] == kind:
            return frame


@pytest.fixture
def published(monkeypatch):
    """Every layer message published, as sent."""
    seen: list[dict] = []
    real = publish.send_groups

    async def recording(messages):
        seen.extend(message for _, message in messages)
        await real(messages)

    monkeypatch.setattr(publish, "send_groups", recording)
    return seen


def provider_with(sampler=ALWAYS_ON) -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=sampler)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


@pytest.fixture
def traced():
    provider, exporter = provider_with()
    tracing.use(provider)
    yield exporter
    tracing.stop()
    provider.shutdown()


async def test_one_message_send_is_one_trace_from_the_frame_to_each_socket(transport, cookies, traced, published):
    """frame → permission and write → publish → broker hop → fan-out → socket writes,
    the writes to at most WRITE_SPANS sockets; ids, counts and the slug only."""
    async with socket(cookies["alice"]) as alice, socket(cookies["bob"]) as bob, \
            socket(cookies["bob"]) as bob2, socket(cookies["carol"]) as carol, socket(cookies["admin"]) as admin:
        for comm in (alice, bob, bob2, carol, admin):
            await subscribe(comm, "general")
        await alice.send_json_to(send(0))
        for comm in (bob, bob2, carol, admin):
            assert (await next_of(comm, "message.new"))["seq"] == 1

        def named(name):
            return [s for s in traced.get_finished_spans() if s.name == name]

        await until(lambda: named("realtime.fanout") and named("ws message.send"), what="the spans ended")
        [frame] = named("ws message.send")
        trace_id = frame.context.trace_id
        spans = [s for s in traced.get_finished_spans() if s.context.trace_id == trace_id]
        by_name = {}
        for span in spans:
            by_name.setdefault(span.name, []).append(span)

        def only(name):
            [span] = by_name[name]
            return span

        def parent_of(name):
            return only(name).parent.span_id

        assert frame.parent is None
        assert parent_of("realtime.permission") == frame.context.span_id
        assert parent_of("realtime.db.write") == frame.context.span_id
        assert parent_of("realtime.publish") == frame.context.span_id
        assert parent_of("realtime.broker") == only("realtime.publish").context.span_id
        assert parent_of("realtime.fanout") == only("realtime.broker").context.span_id
        writes = by_name["realtime.ws.write"]
        assert len(writes) == tracing.WRITE_SPANS  # five sockets follow the room
        assert {w.parent.span_id for w in writes} == {only("realtime.fanout").context.span_id}
        assert only("realtime.fanout").attributes["realtime.sockets"] == 5
        assert only("realtime.db.write").attributes["realtime.seq"] == 1
        assert only("realtime.publish").attributes["realtime.room"] == "general"
        # The broker hop starts when the event was published (its `t`).
        [message] = published
        assert only("realtime.broker").start_time == int(message["t"] * 1e9)
        assert message[tracing.TRACEPARENT].split("-")[1] == f"{trace_id:032x}"
        for span in spans:
            assert SECRET_BODY not in repr(dict(span.attributes)) and not span.events


async def test_off_by_default_no_spans_and_nothing_added_to_messages(cookies, published, monkeypatch):
    assert not tracing.ENABLED  # nothing in this test run's environment asks for it
    provider, exporter = provider_with()
    # A tracer that would record, left in place: only ENABLED keeps it unused.
    monkeypatch.setattr(tracing, "_tracer", provider.get_tracer("test"))
    async with socket(cookies["alice"]) as alice, socket(cookies["bob"]) as bob:
        await subscribe(alice, "general")
        await subscribe(bob, "general")
        await alice.send_json_to(send(0))
        assert (await next_of(bob, "message.new"))["seq"] == 1
        assert (await next_of(alice, "message.new"))["seq"] == 1  # after its ack
        await assert_quiet(alice)
    [message] = published
    assert tracing.TRACEPARENT not in message
    assert exporter.get_finished_spans() == ()


class Counting:
    """A tracer that notes the name of every span asked of it."""

    def __init__(self, tracer) -> None:
        self.tracer, self.names = tracer, []

    def start_as_current_span(self, name, **kwargs):
        self.names.append(name)
        return self.tracer.start_as_current_span(name, **kwargs)

    def start_span(self, name, **kwargs):
        self.names.append(name)
        return self.tracer.start_span(name, **kwargs)


async def test_a_sampler_that_says_no_records_nothing_and_makes_no_span_below_its_root(cookies, published, monkeypatch):
    """Only the frames' root spans are asked for (the sampler's one decision); the
    permission, write, publish, fan-out and socket writes make none, nothing is
    exported, and the event still carries the trace's traceparent, not sampled, so
    other workers do not sample it either (bench/tracing.py: the cost at 1%)."""
    provider, exporter = provider_with(ALWAYS_OFF)
    tracing.use(provider)
    counting = Counting(tracing._tracer)
    monkeypatch.setattr(tracing, "_tracer", counting)
    try:
        with tracing.span("probe") as probe:
            assert not probe.is_recording()
        async with socket(cookies["alice"]) as alice, socket(cookies["bob"]) as bob:
            await subscribe(alice, "general")
            await subscribe(bob, "general")
            await alice.send_json_to(send(0))
            assert (await next_of(bob, "message.new"))["seq"] == 1
            await assert_quiet(bob)
    finally:
        tracing.stop()
    assert "ws message.send" in counting.names
    assert all(name.startswith("ws ") or name == "probe" for name in counting.names), counting.names  # roots only
    assert exporter.get_finished_spans() == ()
    [message] = published
    assert not tracing.sampled(message)
    assert int(message[tracing.TRACEPARENT].split("-")[3], 16) & 1 == 0


async def test_sampled_reads_the_traceparents_flags():
    base = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-"
    assert tracing.sampled({tracing.TRACEPARENT: base + "01"})
    assert tracing.sampled({tracing.TRACEPARENT: base + "03"})  # sampled, random trace id
    assert not tracing.sampled({tracing.TRACEPARENT: base + "00"})
    assert not tracing.sampled({tracing.TRACEPARENT: base + "02"})
    assert not tracing.sampled({tracing.TRACEPARENT: base + "zz"})
    assert not tracing.sampled({})


class HeldExporter(OTLPSpanExporter):
    """The real OTLP/HTTP exporter, telling when an export starts and returns."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.started, self.returned = threading.Event(), threading.Event()

    def export(self, spans):
        self.started.set()
        try:
            return super().export(spans)
        finally:
            self.returned.set()


async def test_a_collector_that_never_answers_slows_no_socket(cookies):
    """The exporter sends to a port that takes connections and never answers: its
    first export hangs for the whole test. A burst of messages is still delivered,
    the socket still answers a ping, and the spans beyond the bounded queue are
    dropped rather than waited for."""
    hole = sockets.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(64)  # connections complete in the backlog; nothing ever reads them
    exporter = HeldExporter(endpoint=f"http://127.0.0.1:{hole.getsockname()[1]}/v1/traces", timeout=120)
    processor = BatchSpanProcessor(exporter, max_queue_size=32, max_export_batch_size=8, schedule_delay_millis=10)
    provider = TracerProvider(sampler=ALWAYS_ON)
    provider.add_span_processor(processor)
    tracing.use(provider)
    count = 25  # within the send rate limit's burst
    try:
        async with socket(cookies["alice"]) as alice, socket(cookies["bob"]) as bob:
            await subscribe(alice, "general")
            await subscribe(bob, "general")
            await alice.send_json_to(send(0, "first"))
            assert (await next_of(bob, "message.new"))["seq"] == 1
            await until(exporter.started.is_set, what="an export under way")
            for i in range(1, count):
                await alice.send_json_to(send(i, f"m{i}"))
            seqs = [(await next_of(bob, "message.new", timeout=30))["seq"] for _ in range(1, count)]
            assert seqs == list(range(2, count + 1))
            await assert_quiet(bob)
            while (await next_of(alice, "message.new"))["seq"] < count:  # its acks and messages
                pass
            await assert_quiet(alice)
            # All of it while the first export still hangs, with the queue at its bound.
            assert not exporter.returned.is_set()
            assert len(processor._batch_processor._queue) == 32
    finally:
        tracing.stop()
        exporter.shutdown()  # ends the exporter's retries
        hole.close()  # and its connection: the hanging export returns
        provider.shutdown()
