"""Operations endpoints, answered before Django (like the long poll) so that they
hold no thread and work whatever Django's middleware is doing:

- `GET /healthz`: the process is alive and its event loop answers (always 200).
- `GET /readyz`: the database, the channel layer (REDIS_URL: presence, limits,
  leases) and the broker (REALTIME_BROKER_URL, its engine named in `broker`)
  answer, each within REALTIME_READY_TIMEOUT seconds (one that hangs fails like
  one that refuses); 200, or 503. A draining worker is not ready. What failed, and the worker's
  name, are told only to callers that may read /metrics (below); anyone else
  gets the status alone (REALTIME_EXPOSE_WORKER names the worker to all).
- `GET /metrics`: Prometheus text for this worker. Only from this machine and not
  through a proxy (no forwarding headers), or with
  `Authorization: Bearer <REALTIME_METRICS_TOKEN>`; 403 otherwise.
"""

from __future__ import annotations

import asyncio
import hmac
import json

from channels.db import database_sync_to_async
from django.conf import settings
from django.db import connection
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from realtime.delivery import transport
from realtime.state import heartbeat
from realtime.state import store

LOCAL = {"127.0.0.1", "::1"}
FORWARDING = {b"x-forwarded-for", b"x-real-ip", b"forwarded"}


def _database() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")


async def _layer() -> None:
    url = store.redis_url()
    if url:
        await store.client(url).ping()


async def readiness() -> tuple[int, dict]:
    timeout = settings.REALTIME_READY_TIMEOUT
    # The database check runs on a thread of its own (not asgiref's shared one), so
    # a database that hangs cannot stall the worker's other database work.
    engine = transport.chosen()
    checks = {
        "database": database_sync_to_async(_database, thread_sensitive=False)(),
        "channel_layer": _layer(),
        "broker": engine.ping(),
    }
    results = {}
    outcomes = await asyncio.gather(
        *(asyncio.wait_for(check, timeout) for check in checks.values()), return_exceptions=True
    )
    for name, outcome in zip(checks, outcomes):
        if isinstance(outcome, (asyncio.TimeoutError, TimeoutError)):
            results[name] = f"timeout after {timeout:g}s"
        elif isinstance(outcome, BaseException):
            results[name] = f"error: {type(outcome).__name__}"
        else:
            results[name] = "ok"
    if heartbeat.draining:
        results["worker"] = "draining"
    failing = [name for name, result in results.items() if result != "ok"]
    body = {"status": "unavailable" if failing else "ok", "checks": results, "broker": engine.name,
            "worker": heartbeat.worker_id()}
    if failing:
        body["failing"] = failing
    return (503 if failing else 200), body


def public(body: dict) -> dict:
    """What anyone may read of a health answer: its status (and the worker's name
    where REALTIME_EXPOSE_WORKER says so)."""
    shown = {"status": body["status"]}
    if settings.REALTIME_EXPOSE_WORKER:
        shown["worker"] = body["worker"]
    return shown


def metrics_allowed(scope) -> bool:
    headers = dict(scope.get("headers", ()))
    token = settings.REALTIME_METRICS_TOKEN
    auth = headers.get(b"authorization", b"").decode("latin-1")
    if token and auth.startswith("Bearer ") and hmac.compare_digest(auth[7:].strip(), token):
        return True
    client = (scope.get("client") or ("", 0))[0]
    return client in LOCAL and not any(name in headers for name in FORWARDING)


async def _respond(send, status: int, body: bytes, content_type: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type), (b"cache-control", b"no-store")]})
    await send({"type": "http.response.body", "body": body})


class OpsRouter:
    PATHS = ("/healthz", "/readyz", "/metrics")

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path") not in self.PATHS:
            return await self.app(scope, receive, send)
        heartbeat.ensure_started()
        path = scope["path"]
        if scope.get("method") not in ("GET", "HEAD"):
            return await _respond(send, 405, b'{"status": "method not allowed"}', b"application/json")
        detail = metrics_allowed(scope)
        if path == "/healthz":
            body = {"status": "ok", "worker": heartbeat.worker_id()}
            return await _respond(send, 200, json.dumps(body if detail else public(body)).encode(), b"application/json")
        if path == "/readyz":
            status, body = await readiness()
            return await _respond(send, status, json.dumps(body if detail else public(body)).encode(), b"application/json")
        if not detail:
            return await _respond(send, 403, b'{"status": "forbidden"}', b"application/json")
        return await _respond(send, 200, generate_latest(REGISTRY), CONTENT_TYPE_LATEST.encode())
