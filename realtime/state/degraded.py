"""What the app does while Redis (or the broker) is down, feature by feature: the
one table. The rows FANOUT, NEW_SOCKETS, PUBLISH and CONTROL are the broker's
(REALTIME_BROKER_URL; unset, the same Redis): every engine behaves as they say
(tests/brokers/ stops and restarts each).

Every feature that keeps state in Redis (REDIS_URL) or sends through it names its
row here when a Redis call fails (`tolerate(ROW, exc)`), and does what the row
says; nothing else decides. Each row is proved by a test that stops Redis
(tests/realtime/test_degraded.py). PostgreSQL holds everything that must not be
lost (messages, the rooms' logs, sessions, read positions): none of these rows
loses a message.

"Down" is a Redis that refuses (each command fails at once) or one that hangs
(paused, its network silent): a command then fails after 2 s (store.TIMEOUT). For
what goes through realtime/state/store.py (RATE_LIMITS, HANDSHAKE_LIMITS,
REPLAY_BUDGET, LEASES, PRESENCE, PUSH, HEARTBEAT, and PUBLISH on the Redis engine),
after two such timeouts every command to that Redis fails at once for 5 s
(store.QUIET), so that a socket's frames, handled in turn, do not each wait 2 s.

| Row | While Redis is down | When it comes back |
| --- | --- | --- |
| RATE_LIMITS | each worker keeps the token buckets in its own memory, the same limits a worker (a user gets one bucket per worker, not one in all); frame, body and buffer limits hold as always | the shared buckets as they were (or full, if Redis lost them) |
| HANDSHAKE_LIMITS | sockets opened are counted by each worker on its own, as RATE_LIMITS | counted in Redis again |
| REPLAY_BUDGET | replays are charged to each worker's own budget, as RATE_LIMITS | charged in Redis again |
| LEASES | each worker counts its own sockets against the per-user cap (the cap a worker, not in all; those it held before the outage from the first renewal that fails, within 10 s and Redis's timeout); a lease in Redis not renewed runs out after 30 s | renewed at the next round (10 s); the worker's own leases last 30 s from their last local renewal, so a Redis that flaps still finds them (at worst twice the cap a worker) |
| SIGN_IN_COUNTERS | each worker process counts failed sign-ins and sign-ups in its own memory, the same limits a process (no 500: sessions are in the database) | counted in Redis again (the counts of the outage are not carried over) |
| FANOUT | open sockets stay open; live events stop reaching other workers' sockets | every worker subscribes again and each socket catches its rooms up from the log (`layer.recovered`): nothing lost, nothing twice |
| NEW_SOCKETS | a socket whose user group cannot be joined is closed with 4013 (retry with backoff) | accepted as usual |
| PUBLISH | a room event's publication fails and is logged; the write itself succeeded (it is in the log) | subscribers recover it by seq (gap repair, the ping's head check, resume) |
| CONTROL | a session or access check sent on a change is lost | the worker's sweep (4 s), the session re-check (60 s) and the cached access's age (30 s) catch what it carried |
| PRESENCE | joins, leaves and renewals are skipped; a room's list may be stale | the next sweep sends each room its state |
| PUSH | typing notices, presence diffs and read markers are dropped (ephemeral) | sent again |
| HEARTBEAT | the worker is missing from the dashboard's cluster view | back within a second |
| LONG_POLL | a held poll reads the log every second instead of waiting on the fan-out | waits on the fan-out again |
| TICKETS | issuing or redeeming a ticket answers 503 (`unavailable`) | as usual |
"""

from __future__ import annotations

import logging

from realtime.observability import metrics

log = logging.getLogger(__name__)

RATE_LIMITS = "rate-limits"
HANDSHAKE_LIMITS = "handshake-limits"
REPLAY_BUDGET = "replay-budget"
LEASES = "leases"
SIGN_IN_COUNTERS = "sign-in-counters"
FANOUT = "fanout"
NEW_SOCKETS = "new-sockets"
PUBLISH = "publish"
CONTROL = "control"
PRESENCE = "presence"
PUSH = "push"
HEARTBEAT = "heartbeat"
LONG_POLL = "long-poll"
TICKETS = "tickets"

ROWS = (RATE_LIMITS, HANDSHAKE_LIMITS, REPLAY_BUDGET, LEASES, SIGN_IN_COUNTERS, FANOUT, NEW_SOCKETS, PUBLISH, CONTROL,
        PRESENCE, PUSH, HEARTBEAT, LONG_POLL, TICKETS)


def tolerate(row: str, exc: BaseException) -> None:
    """A Redis call of feature `row` failed: count it (realtime_degraded_total) and
    log one line; the caller then does what the row says."""
    assert row in ROWS, row
    metrics.DEGRADED.labels(row).inc()
    log.warning("running degraded", extra={"event": "degraded", "reason": row, "code": type(exc).__name__})
