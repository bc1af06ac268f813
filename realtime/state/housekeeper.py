"""The timers of every socket of this process, in one task.

Each open socket needs four things done now and then:
- closed with 4008 once silent for REALTIME_IDLE_TIMEOUT s;
- its session checked every REALTIME_SESSION_RECHECK s (jittered), which catches
  what no signal reported (a session that simply expired), where the session
  engine keeps sessions somewhere the sweep below cannot read (cache, signed
  cookies); with database sessions the sweep already reads every socket's session
  every few seconds in one query, and a check per socket would be a query per
  socket a minute for nothing (166 a second on a worker of 10,000 sockets);
- its connection lease renewed every connections.LEASE_RENEW s;
- its presence in the rooms it follows renewed every presence.RENEW s;
- its user, session and rooms' access compared with the database every
  REALTIME_AUTH_SWEEP s, for changes no signal announced (realtime/ws/authsweep.py).

One task per worker does them all: the leases and the presence of every local
socket are renewed in one Redis round trip each, where a task per socket sent one
round trip per socket, all at nearly the same moment (the sockets of a burst of
connects came due together, and the room's deliveries waited behind them), and
kept a task and its frame alive per idle socket.

What concerns a socket's stream (the idle close, the session check) is put on that
socket's own queue, so it is handled in order with everything else it does.
"""

from __future__ import annotations

import asyncio
import logging
import random

from django.conf import settings

from realtime.ws import authsweep
from realtime.state import leases as connections
from realtime.state import presence
from realtime.state import degraded, store
from realtime.delivery import names
from realtime.delivery import publish as broadcast

log = logging.getLogger(__name__)

IDLE = names.IDLE
SOCKETS: set = set()  # this process's open sockets (RealtimeConsumer)


def add(consumer) -> None:
    now = asyncio.get_running_loop().time()
    consumer.next_session_check = now + _recheck_interval()
    SOCKETS.add(consumer)
    store.start_once("housekeeper", _loop)


def discard(consumer) -> None:
    SOCKETS.discard(consumer)


def rechecks_sessions() -> bool:
    """Whether each socket's session is checked on its own (module doc)."""
    return not authsweep.sweeps_sessions()


def _recheck_interval() -> float:
    return settings.REALTIME["SESSION_RECHECK"] * (0.9 + 0.2 * random.random())


def _tick() -> float:
    """How often to look: once a second, or more often when a limit is shorter (tests)."""
    return min(1.0, settings.REALTIME["IDLE_TIMEOUT"] / 4, settings.REALTIME["SESSION_RECHECK"] / 4,
               connections.LEASE_RENEW / 4, presence.RENEW / 4, settings.REALTIME["AUTH_SWEEP"] / 4)


async def _loop() -> None:
    loop = asyncio.get_running_loop()
    next_renew = loop.time() + connections.LEASE_RENEW
    next_presence = loop.time() + presence.RENEW
    next_sweep = loop.time() + settings.REALTIME["AUTH_SWEEP"]
    sweeping: asyncio.Future | None = None
    while True:
        await asyncio.sleep(_tick())
        now = loop.time()
        due(now)
        if now >= next_renew:
            next_renew = now + connections.LEASE_RENEW
            # (Redis away: the leases hold for their TTL meanwhile)
            await _step(degraded.LEASES, connections.renew(
                [(c.user.pk, c.conn_id) for c in SOCKETS if c.authenticated and not c.revoked]))
        if now >= next_sweep and (sweeping is None or sweeping.done()):
            # A task of its own, bounded: a slow database must not hold up the
            # leases, the presence or the idle closes (a sweep still running is
            # not started again).
            period = settings.REALTIME["AUTH_SWEEP"]
            next_sweep = now + period
            sweeping = asyncio.ensure_future(_step("auth-sweep", asyncio.wait_for(
                authsweep.sweep(list(SOCKETS)), max(3 * period, 10))))
        if now >= next_presence:
            next_presence = now + presence.RENEW
            await _step(degraded.PRESENCE, presence.renew_all(
                [(slug, c.user.pk, c.user.get_username(), c.conn_id)
                 for c in SOCKETS if c.authenticated and not c.revoked
                 for slug, sub in c.subscriptions.items() if sub.presence]
            ))


async def _step(name: str, work) -> None:
    """One of the loop's chores: a failure is logged and the others go on (a
    Redis-backed chore's failure is its row of state/degraded.py)."""
    try:
        await work
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        if name in degraded.ROWS:
            degraded.tolerate(name, exc)
        else:
            log.warning("housekeeping failed: %s", type(exc).__name__, extra={"event": "housekeeping.failed",
                                                                              "reason": name})


def due(now: float) -> None:
    """Queue the idle close and the session checks that have come due."""
    idle = settings.REALTIME["IDLE_TIMEOUT"]
    recheck = rechecks_sessions()
    for consumer in list(SOCKETS):
        if not consumer.authenticated or consumer.revoked:
            continue
        if now >= consumer.last_frame_at + idle:
            consumer.revoked = True  # nothing more is handled or delivered
            consumer.local_queue.put_nowait({"type": IDLE})
        elif recheck and consumer.grant is None and now >= consumer.next_session_check:
            consumer.next_session_check = now + _recheck_interval()
            consumer.local_queue.put_nowait({"type": broadcast.SESSION_CHECK})
