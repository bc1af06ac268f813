"""A small OTLP/HTTP trace receiver on a free port of 127.0.0.1, for what checks
tracing against real workers: the tests (tests/cluster/test_tracing.py) and the
bench (bench/tracing.py). Not a collector: it keeps every span in memory with its
resource's attributes (service.name, service.instance.id) and answers each export.
hang() makes it take requests and answer none of them (a collector that is down
must slow no socket) until answer(): the requests held meanwhile are let go with no
answer, and the later ones are answered again."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class OtlpReceiver:
    def __init__(self) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
            ExportTraceServiceResponse,
        )

        self.spans: list[tuple[dict, object]] = []  # (resource attributes, Span)
        self.requests = 0
        self.lock = threading.Lock()
        self.answering = threading.Event()  # cleared by hang(), set by answer()
        self.answering.set()
        receiver, answer = self, ExportTraceServiceResponse().SerializeToString()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path != "/v1/traces":
                    self.send_error(404)
                    return
                request = ExportTraceServiceRequest.FromString(body)
                with receiver.lock:
                    receiver.requests += 1
                    for resource_spans in request.resource_spans:
                        resource = {kv.key: kv.value.string_value for kv in resource_spans.resource.attributes}
                        for scope_spans in resource_spans.scope_spans:
                            receiver.spans.extend((resource, span) for span in scope_spans.spans)
                if not receiver.answering.is_set():
                    receiver.answering.wait(120)
                    return  # no answer at all
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> "OtlpReceiver":
        self.thread.start()
        return self

    def hang(self) -> None:
        self.answering.clear()

    def answer(self) -> None:
        self.answering.set()

    def stop(self) -> None:
        self.answer()
        self.server.shutdown()
        self.server.server_close()

    def trace(self, trace_id: bytes) -> list[tuple[dict, object]]:
        with self.lock:
            return [(resource, span) for resource, span in self.spans if span.trace_id == trace_id]

    def find(self, predicate) -> list[tuple[dict, object]]:
        with self.lock:
            return [(resource, span) for resource, span in self.spans if predicate(resource, span)]

    def take(self) -> list[tuple[dict, object]]:
        """Every span that arrived since the last call, and forget them."""
        with self.lock:
            spans, self.spans = self.spans, []
        return spans
