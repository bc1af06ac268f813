"""Application instances reaped as they end, not by a walk over every connection.

daphne's `application_checker` runs every second over all of its connections: it
logs an instance that failed (and has its protocol answer 500 or close 1011),
forgets an instance that ended, forgets a connection whose client has gone and
whose instance has ended, and cancels an instance still running
`application_close_timeout` seconds after its client went. With thousands of
idle sockets that is a pass over thousands of entries every second, on the
event loop the sockets are served on (some 3% of a worker taking a drain's
reconnects, each pass a pause in deliveries).

Here each instance has a done callback that does, for its own connection and at
the moment it ends, what the walk would have done a second later; a disconnect
forgets the connection at once when its instance has ended already; and the
checker each second looks only at the connections whose client has gone while
their instance still runs (the close timeout). Same outcomes, in the same
order for a connection, sooner.
"""

from __future__ import annotations

import asyncio
import logging
import time

log = logging.getLogger("daphne.server")  # daphne's own logger, as its checker logs


class Reaping:
    """A part of DrainingServer (server/launcher.py), over daphne's Server."""

    connections: dict
    application_close_timeout: float

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.closing: dict = {}  # protocol -> when its client went, while its instance still runs

    def watch(self, protocol, ended=None) -> None:
        """Reap `protocol`'s instance when it ends (after create_application).
        `ended`: the done callback, when the protocol has one of its own (a socket's
        application_ended, a bound method: 64 B a socket against some 200 B for a
        closure); else a closure, for short-lived HTTP requests."""
        details = self.connections.get(protocol)
        instance = details.get("application_instance") if details is not None else None
        if instance is not None:
            instance.add_done_callback(ended or (lambda done: self.instance_ended(protocol, done)))

    def instance_ended(self, protocol, instance: asyncio.Future) -> None:
        """daphne's application_checker, for this one connection, now. The entry
        goes whatever its protocol's answer to a failure raises (an HTTP response
        already started cannot become a 500)."""
        details = self.connections.get(protocol)
        if details is None or details.get("application_instance") is not instance:
            return
        disconnected = details.get("disconnected")
        try:
            exception = None if instance.cancelled() else instance.exception()
            if exception is not None:
                if isinstance(exception, KeyboardInterrupt):
                    self.stop()  # (daphne: the protocol asks the server to exit, in tests)
                else:
                    log.error("Exception inside application: %s", exception, exc_info=exception)
                    if not disconnected:
                        protocol.handle_exception(exception)
        except Exception:
            log.exception("answering an application's failure failed")
        finally:
            del details["application_instance"]
            if disconnected:
                self.closing.pop(protocol, None)
                del self.connections[protocol]

    def protocol_disconnected(self, protocol):
        if protocol not in self.connections:
            return  # forgotten already (a refused handshake, then its TCP close)
        super().protocol_disconnected(protocol)
        details = self.connections[protocol]
        instance = details.get("application_instance")
        if instance is None:
            del self.connections[protocol]  # nothing left to wait for
        elif instance.done():
            self.instance_ended(protocol, instance)  # (before its done callback: that one then finds nothing)
        else:
            self.closing[protocol] = details["disconnected"]

    def application_checker(self):
        """Each second: cancel an instance still running application_close_timeout
        after its client went (what remains of daphne's walk)."""
        from twisted.internet import reactor

        closing = self.closing
        now = time.time()
        for protocol, since in list(closing.items()):
            details = self.connections.get(protocol)
            instance = details.get("application_instance") if details is not None else None
            if instance is None or instance.done():
                closing.pop(protocol, None)  # (reaped, or its done callback is on its way)
            elif now - since > self.application_close_timeout:
                # Cancelled again each second until it ends, as daphne's walk
                # does (a cancel can be swallowed: asgiref's sync_to_async waits
                # for its thread); it stays here until then.
                log.warning("Application instance %r for connection %s took too long to shut down and was killed.",
                            instance, repr(protocol))
                instance.cancel()
        reactor.callLater(1, self.application_checker)

    def kill_all_applications(self):
        """daphne's, for connections that may have no instance left (reaped)."""
        for details in self.connections.values():
            details.setdefault("application_instance", _ENDED)
        return super().kill_all_applications()


class _Ended:
    """An instance that has ended, for kill_all_applications' loop."""

    @staticmethod
    def done() -> bool:
        return True


_ENDED = _Ended()
