"""The graceful drain. Plain daphne drops every socket with 1006 on SIGTERM (no
close frame), so clients cannot tell a restart from a network failure. On SIGTERM
or SIGINT, or on a drain request (`manage.py drain`, the admin console: a message to
the workers' control group, by the same transport as everything else), a worker:

1. stops listening, so the load balancer sends new connections to other workers;
2. closes its WebSockets with 4012 (service restart: reconnect now) in shuffled
   batches, one every 50 ms, spread over REALTIME_DRAIN_SPREAD seconds or, for a
   worker holding more sockets than REALTIME_DRAIN_RATE a second would hand back
   in that time, over as long as that rate takes (at most REALTIME_DRAIN_TIMEOUT
   s), so clients do not all come back in the same moment: the workers that take
   them in see a stream of reconnects at a pace they can serve, not a wall. The
   close's reason tells each client the time between two batches
   (`spread_ms=50`: protocol.restart_reason), over which it spreads its return,
   so the reconnects arrive as evenly as the closes were made, and no client
   waits its own second of jitter on top; and
   answers its held long polls at once (with the page they have; web/longpoll.py),
   so their clients poll again elsewhere;
3. waits for the application instances to finish (at most REALTIME_DRAIN_TIMEOUT s),
   then stops the reactor (only after a signal: a drain request leaves the process
   idle for its process manager to stop).
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time

from daphne.ws_protocol import WebSocketProtocol

from realtime import protocol

log = logging.getLogger("realtime.server")

SERVICE_RESTART = int(protocol.CloseCode.SERVICE_RESTART)
BATCH_EVERY = 0.05  # seconds between two batches of closes


def schedule(sockets: int, spread: float, rate: float, longest: float) -> tuple[float, int]:
    """(seconds, batches) over which to close `sockets` sockets: at least `spread`
    seconds, longer where `rate` sockets a second would need longer, never longer
    than `longest`; a batch every BATCH_EVERY s."""
    seconds = min(max(spread, sockets / rate if rate > 0 else 0.0), max(spread, longest))
    return seconds, max(1, min(sockets, math.ceil(seconds / BATCH_EVERY)))


def restart_reason(seconds: float, batches: int) -> str:
    """The 4012's reason for a drain of `batches` batches over `seconds`: come back
    within the time between two batches, and never within less than BATCH_EVERY
    (a short REALTIME_DRAIN_SPREAD must not ask a batch back in one instant)."""
    return protocol.restart_reason(max(round(1000 * BATCH_EVERY), round(1000 * seconds / batches)))


def worker_id() -> str:
    from realtime.state.heartbeat import worker_id as heartbeat_worker_id

    return heartbeat_worker_id()


class ControlListener:
    """The worker itself as a member of the control group (delivery/fanout.py hands
    it the group's messages, as it hands a socket its rooms')."""

    def __init__(self, server: "Drain", me: str) -> None:
        self.server, self.me = server, me

    async def deliver(self, message: dict) -> bool:
        from realtime.delivery import names

        if message.get("type") == names.WORKER_DRAIN and message.get("worker") in ("*", self.me):
            self.server.drain("drain request", False)
        return True

    def put_nowait(self, message: dict) -> None:
        """(a layer recovery: nothing to catch up)"""

    @property
    def local_queue(self) -> "ControlListener":
        return self


class Drain:
    """The drain, a part of DrainingServer (server/launcher.py)."""

    ports: list
    draining = False
    exit_when_drained = False
    drained = False
    drain_spread = 1.0
    drain_rate = 1000.0
    drain_timeout = 10.0
    spread_now = 1.0  # the spread of the drain under way (schedule())

    async def _control_loop(self):
        """Follow the workers' control group in this worker's fan-out, as a socket
        follows a room: drain requests (manage.py drain, the admin console) arrive
        by the same transport as everything else, and after a transport failure
        the fan-out subscribes to it again with the rest."""
        from realtime.delivery import names
        from realtime.delivery.fanout import fanout

        listener = ControlListener(self, worker_id())
        while True:
            try:
                await fanout().add(names.CONTROL_GROUP, listener)
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("control group unavailable; retrying")
                await asyncio.sleep(1)


    def drain(self, reason: str, exit_after: bool) -> None:
        from twisted.internet import reactor

        self.exit_when_drained = self.exit_when_drained or exit_after
        if self.draining:
            if self.drained and self.exit_when_drained:
                reactor.stop()
            return
        self.draining = True
        from realtime.state import heartbeat

        heartbeat.draining = True  # /readyz answers 503, the dashboard shows it
        from realtime.web import longpoll

        longpoll.end_held_polls()  # answered now; their clients poll again elsewhere
        started = time.monotonic()
        for port in self.ports:
            port.stopListening()
        sockets = [
            p for p in self.connections
            if isinstance(p, WebSocketProtocol) and p.state == WebSocketProtocol.STATE_OPEN
        ]
        random.shuffle(sockets)
        self.spread_now, batches = schedule(len(sockets), self.drain_spread, self.drain_rate, self.drain_timeout)
        log.warning("draining: reason=%s sockets=%d spread=%.1fs", reason, len(sockets), self.spread_now)
        hint = restart_reason(self.spread_now, batches)
        for i in range(batches):
            batch = sockets[i::batches]
            delay = self.spread_now * i / batches
            reactor.callLater(delay, self._close_batch, batch, hint)
        reactor.callLater(0.05, self._wait_for_applications, started)

    @staticmethod
    def _close_batch(batch, reason: str):
        for socket in batch:
            if socket.state == WebSocketProtocol.STATE_OPEN:
                socket.sendClose(code=SERVICE_RESTART, reason=reason)

    def _wait_for_applications(self, started: float) -> None:
        from twisted.internet import reactor

        alive = [
            d for d in self.connections.values()
            if d.get("application_instance") is not None and not d["application_instance"].done()
        ]
        elapsed = time.monotonic() - started
        if alive and elapsed < self.spread_now + self.drain_timeout:
            reactor.callLater(0.05, self._wait_for_applications, started)
            return
        self.drained = True
        log.warning("drained in %.2fs (%d application instances left)", elapsed, len(alive))
        if self.exit_when_drained:
            reactor.stop()
