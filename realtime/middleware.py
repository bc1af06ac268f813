"""HTTP middleware of the realtime app."""

import os


class WorkerHeaderMiddleware:
    """Names the worker that answered (X-Realtime-Worker), so an operator, or a
    test behind the load balancer, can tell where a client landed."""

    def __init__(self, get_response):
        self.get_response = get_response
        self.worker = os.environ.get("REALTIME_WORKER_ID", "")

    def __call__(self, request):
        response = self.get_response(request)
        if self.worker:
            response["X-Realtime-Worker"] = self.worker
        return response
