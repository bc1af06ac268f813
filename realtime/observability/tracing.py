"""Distributed tracing with OpenTelemetry, off unless the standard OTEL_* variables
ask for it.

On when OTEL_EXPORTER_OTLP_ENDPOINT or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is set
and OTEL_SDK_DISABLED is not true (`configure`, from apps.py at start-up). The
SDK reads the rest itself: OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG (the
default: parentbased_always_on), OTEL_BSP_* (the batch processor),
OTEL_EXPORTER_OTLP_* (the OTLP/HTTP exporter). Each worker's resource names the
service (OTEL_SERVICE_NAME, default "realtime") and the worker
(`service.instance.id` = REALTIME_WORKER_ID).

One trace per action, across workers:

    ws message.send (or an HTTP request: DjangoInstrumentor)
      realtime.permission, realtime.db.write   (on the database thread, or the loop's
                                                own connection: domain/loopdb.py)
      realtime.publish                          (injects a W3C traceparent into each
        |                                        event's layer message, once per event)
        realtime.broker                         (on each receiving worker: starts at
          realtime.fanout                        the event's publication time, `t`)
            realtime.ws.write x at most WRITE_SPANS sockets per event and worker

The publishing worker's own sockets get the event before the broker's round trip
(fanout.dispatch_own): their fan-out hangs from the publish span, with no hop.

Off, it costs one test of the module-level ENABLED on each path: no span objects,
nothing added to the layer messages. On, the sampler decides once per trace, at
its root (the frame's span, or the HTTP request's): a trace it leaves out gets no
span below its root (`_sampled_out`; every standard sampler, parent-based or by
trace-id ratio, would give the children the root's answer, and making those
non-recording spans was most of the cost at 1%), its traceparent (flags 00) still
rides in the event, and a worker that receives it fans out untraced (`sampled`).
Spans go to a BatchSpanProcessor: export on its own thread, a bounded queue that
drops when full, a short export timeout; nothing on the event loop ever waits for
the collector. bench/tracing.py measures the cost at 1% and 100% (bench/RESULTS.md).

Attributes are ids, the room's slug, frame types, seqs and counts: never a body,
a cookie, a token or a password. A span that ends with an exception records its
type only (a database error's text may quote the row).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

ENABLED = False  # the one test on every path
WRITE_SPANS = 3  # sockets per event and worker whose write gets a span of its own
TRACEPARENT = "traceparent"  # the layer message's key (room events only)
# A collector that does not answer costs an export thread this long, not a socket.
EXPORT_TIMEOUT_S = 2.0

SERVER, PRODUCER = SpanKind.SERVER, SpanKind.PRODUCER
_tracer: trace.Tracer = trace.NoOpTracer()
_propagator = TraceContextTextMapPropagator()
_OFF = contextlib.nullcontext(trace.INVALID_SPAN)


def wanted(environ=os.environ) -> bool:
    """Whether the environment asks for tracing (module doc)."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return bool(environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def configure(worker_id: str, environ=os.environ) -> bool:
    """At start-up: turn tracing on if the environment asks for it (True if so)."""
    if ENABLED or not wanted(environ):
        return ENABLED
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.instrumentation.django import DjangoInstrumentor
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create({"service.name": environ.get("OTEL_SERVICE_NAME") or "realtime",
                                "service.instance.id": worker_id})
    provider = TracerProvider(resource=resource)  # the sampler from OTEL_TRACES_SAMPLER(_ARG)
    timeout = None if ("OTEL_EXPORTER_OTLP_TIMEOUT" in environ or "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT" in environ) \
        else EXPORT_TIMEOUT_S
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(timeout=timeout)))
    trace.set_tracer_provider(provider)
    # HTTP requests (under daphne: Django's ASGIRequest, which the instrumentor
    # traces only with opentelemetry-instrumentation-asgi installed).
    DjangoInstrumentor().instrument(tracer_provider=provider, request_hook=_without_query)
    # Both log from the export thread and, for a full queue, on the event loop
    # once per dropped span: at most one line a minute each.
    for name in ("opentelemetry.sdk._shared_internal", "opentelemetry.exporter.otlp.proto.http.trace_exporter"):
        logging.getLogger(name).addFilter(_OncePerMinute())
    use(provider)
    return True


def use(provider) -> None:
    """Trace with `provider` from now on (configure; tests with an in-memory exporter)."""
    global _tracer, ENABLED
    _tracer = provider.get_tracer("realtime")
    ENABLED = True


def stop() -> None:
    """Tracing off again (tests)."""
    global _tracer, ENABLED
    _tracer = trace.NoOpTracer()
    ENABLED = False


def span(name: str, kind: SpanKind = SpanKind.INTERNAL, **attributes):
    """A context manager: the span `name`, current inside the block, with
    `attributes` (realtime.<key>); off, a shared no-op that yields INVALID_SPAN;
    in a trace sampled out, none: the current (non-recording) span is yielded."""
    if not ENABLED:
        return _OFF
    parent = trace.get_current_span()
    if _sampled_out(parent):
        return contextlib.nullcontext(parent)
    return _current(name, None, kind, {f"realtime.{k}": v for k, v in attributes.items() if v is not None})


def _sampled_out(current) -> bool:
    """`current` (a span) is of a trace its root's sampler left out: a child would
    be a non-recording span too, so none is made."""
    context = current.get_span_context()
    return context.is_valid and not context.trace_flags.sampled


def sampled(message: dict) -> bool:
    """The event's traceparent is of a sampled trace (its flags' last bit): only
    then does a receiving worker trace its fan-out."""
    value = message.get(TRACEPARENT)
    try:
        return value is not None and int(value[-2:], 16) & 1 == 1
    except ValueError:
        return False


@contextlib.contextmanager
def _current(name: str, context, kind: SpanKind, attributes: dict, start_time: int | None = None):
    with _tracer.start_as_current_span(name, context=context, kind=kind, attributes=attributes, start_time=start_time,
                                       record_exception=False, set_status_on_exception=False) as current:
        try:
            yield current
        except BaseException as exc:
            # The type only: an exception's text may quote what it was given.
            current.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            code = getattr(exc, "code", None)
            if code is not None:
                current.set_attribute("realtime.code", str(code))
            raise


@contextlib.contextmanager
def publishing(messages: list[tuple[str, dict]]):
    """The publish span of these (group, layer message)s, current inside the block;
    its traceparent goes into each message, once per event. In a trace sampled
    out, no span: the trace's traceparent (flags 00) goes into each message."""
    parent = trace.get_current_span()
    if _sampled_out(parent):
        _carry(messages)
        yield parent
        return
    rooms = {message.get("room") for _, message in messages}
    attributes = {"realtime.events": len(messages)}
    if len(rooms) == 1:
        attributes["realtime.room"] = rooms.pop()
    with _current("realtime.publish", None, SpanKind.PRODUCER, attributes) as current:
        _carry(messages)
        yield current


def _carry(messages: list[tuple[str, dict]]) -> None:
    """The current span's traceparent into each message."""
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    value = carrier.get(TRACEPARENT)
    if value:
        for _, message in messages:
            message[TRACEPARENT] = value


def fan_out(message: dict, received: bool, sockets: int):
    """The span of one event's fan-out on this worker, current inside the block.
    `received`: it came through the broker, so the hop (publication time `t` to
    now) is a span of its own between the publish span and this one."""
    context = _propagator.extract({TRACEPARENT: message[TRACEPARENT]})
    attributes = {"realtime.room": message.get("room"), "realtime.seq": message.get("seq"),
                  "realtime.sockets": sockets}
    if received:
        now = time.time_ns()
        hop = _tracer.start_span("realtime.broker", context=context, kind=SpanKind.CONSUMER,
                                 start_time=min(int(message.get("t", 0) * 1e9) or now, now),
                                 attributes={"realtime.room": message.get("room"), "realtime.seq": message.get("seq")})
        hop.end(now)
        context = trace.set_span_in_context(hop)
    return _current("realtime.fanout", context, SpanKind.INTERNAL, attributes)


async def write(consumer, message: dict) -> bool:
    """consumer.deliver(message) in a span of its own (the fan-out's first
    WRITE_SPANS sockets). False: the socket's queue takes it instead."""
    with _current("realtime.ws.write", None, SpanKind.INTERNAL,
                  {"realtime.conn_id": getattr(consumer, "conn_id", ""), "realtime.seq": message.get("seq")}) as current:
        written = await consumer.deliver(message)
        current.set_attribute("realtime.queued", not written)
        return written


def _without_query(span, request) -> None:
    """An HTTP request's span keeps its URL without the query string, which may
    carry what someone typed (a search)."""
    if span.is_recording() and request.META.get("QUERY_STRING"):
        for key in ("http.url", "url.full", "http.target"):
            value = span.attributes.get(key)
            if isinstance(value, str):
                span.set_attribute(key, value.split("?", 1)[0])
        if "url.query" in span.attributes:
            span.set_attribute("url.query", "")


class _OncePerMinute(logging.Filter):
    """Lets one record of each message template through a minute."""

    def __init__(self) -> None:
        super().__init__()
        self.last: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        now, last = time.monotonic(), self.last.get(record.msg)
        if last is not None and now - last < 60.0:
            return False
        self.last[record.msg] = now
        return True
