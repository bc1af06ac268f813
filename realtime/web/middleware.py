"""HTTP middleware of the realtime app."""



def worker_header() -> str:
    """The X-Realtime-Worker value, or "" when responses do not name the worker
    (REALTIME_EXPOSE_WORKER: off by default with DEBUG off)."""
    from django.conf import settings

    return settings.REALTIME_WORKER_ID if settings.REALTIME_EXPOSE_WORKER else ""


class WorkerHeaderMiddleware:
    """Names the worker that answered (X-Realtime-Worker), so an operator, or a
    test behind the load balancer, can tell where a client landed; only where
    REALTIME_EXPOSE_WORKER allows it."""

    def __init__(self, get_response):
        self.get_response = get_response
        self.worker = worker_header()

    def __call__(self, request):
        response = self.get_response(request)
        if self.worker:
            response["X-Realtime-Worker"] = self.worker
        return response


class ContentSecurityPolicyMiddleware:
    """Sets settings.CONTENT_SECURITY_POLICY on every response that has none.

    `{ws}` in the policy becomes this host's ws:// and wss:// origins (CSP level 2
    browsers do not count sockets as 'self'). The admin keeps its inline styles.
    """

    def __init__(self, get_response):
        from django.conf import settings

        self.get_response = get_response
        self.policy = settings.CONTENT_SECURITY_POLICY

    def __call__(self, request):
        response = self.get_response(request)
        if self.policy and "Content-Security-Policy" not in response:
            try:
                host = request.get_host()
            except Exception:  # DisallowedHost: the response is an error page anyway
                host = ""
            policy = self.policy.replace("{ws}", f"ws://{host} wss://{host}" if host else "")
            if request.path.startswith("/admin/"):
                policy = policy.replace("style-src 'self'", "style-src 'self' 'unsafe-inline'")
            response["Content-Security-Policy"] = policy
        return response


class TraceMiddleware:
    """Gives each HTTP request a trace id (the trace-id of its W3C `traceparent`
    header, or a new one): every log line and every event the request publishes
    carries it (realtime/observability/logs.py), and the response names it in X-Trace-Id."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        from realtime.observability.logs import TRACE, trace_from_header

        token = TRACE.set(trace_from_header(request.headers.get("traceparent")))
        try:
            response = self.get_response(request)
            response["X-Trace-Id"] = TRACE.get()
            return response
        finally:
            TRACE.reset(token)
