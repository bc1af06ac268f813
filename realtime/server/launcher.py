"""Our daphne: `python -m realtime.server [daphne arguments]`.

daphne's own command line, with a Server subclass made of:
- server/drain.py: the graceful drain (SIGTERM, SIGINT, drain requests);
- server/bounded.py: the WebSocket protocol (bounded buffers each way, prebuilt
  frames written as is, denial responses, an open socket's memory shed);
- server/guard.py: connections before they are sockets (a deadline per request,
  a cap per address, a whole upgrade handed on at once);
- server/reaping.py: application instances reaped as they end (daphne walks
  every connection each second);
- server/adapter.py: every private attribute of daphne, autobahn and Twisted the
  above touch, checked by a test on every upgrade.
Its settings come from settings.REALTIME, read at start-up (once Django is set up).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import types
from collections import OrderedDict

from daphne.cli import CommandLineInterface
from daphne.server import Server
from django.conf import settings

from realtime.server.adapter import direct_reads_and_writes
from realtime.server.bounded import BoundedWebSocketProtocol, with_options_of
from realtime.server.drain import Drain
from realtime.server.guard import guard_http_factory, settings_value
from realtime.server.reaping import Reaping
from realtime.ws.queues import AppQueue

log = logging.getLogger("realtime.server")


def with_backlog(description: str, backlog: int) -> str:
    """A Twisted endpoint description (daphne's `tcp:port=..` and `ssl:..`) with a
    listen backlog of `backlog`, unless it names one already. Twisted's default,
    50, is what a reconnect storm overflows (bench: hundreds of dropped SYNs a run,
    even for the bare consumer); the kernel caps it at net.core.somaxconn."""
    kind = description.split(":", 1)[0]
    if kind not in ("tcp", "ssl") or ":backlog=" in description:
        return description
    return f"{description}:backlog={int(backlog)}"


def asked_for_access_log(argv: list[str]) -> bool:
    """Whether daphne's --access-log was given on the command line, as daphne's
    own parser reads it (abbreviations such as --access included)."""
    try:
        args, _ = CommandLineInterface().parser.parse_known_args(argv)
    except SystemExit:  # (daphne itself says what is wrong with the line)
        return False
    return args.access_log is not None


# Shared by every socket's scope, never changed: ASGI's version, and the denial
# response extension's (empty) options.
ASGI_VERSION = types.MappingProxyType({"version": "3.0"})
NO_OPTIONS = types.MappingProxyType({})


# Values every socket's scope and protocol hold a copy of, though they are the
# same for nearly all of them (the listening address, the socket's path): one
# object each. A path is the client's choice, and this runs before the route or
# the origin is checked: only values of at most SHARED_LENGTH items are kept, at
# most SHARED_MAX of them, the least recently used going first (a scanner's
# paths cannot keep the real one out for long).
_shared: "OrderedDict" = OrderedDict()
SHARED_MAX = 256
SHARED_LENGTH = 128


def shared(value):
    if value is None or len(value) > SHARED_LENGTH:
        return value
    key = (type(value), tuple(value) if isinstance(value, list) else value)
    found = _shared.get(key)
    if found is None:
        found = _shared[key] = value
        if len(_shared) > SHARED_MAX:
            _shared.popitem(last=False)
    else:
        _shared.move_to_end(key)
    return found


def share_addresses(protocol, scope: dict) -> None:
    """The scope's server address and path, and the protocol's, as the shared
    objects (some 150 B a socket)."""
    scope["server"] = protocol.server_addr = shared(scope.get("server"))
    if "path" in scope:
        scope["path"] = shared(scope["path"])
    if "raw_path" in scope:
        scope["raw_path"] = protocol.path = shared(scope["raw_path"])


async def _raises(exc: BaseException):
    raise exc


class DrainingServer(Drain, Reaping, Server):
    # daphne writes an access line (NCSA text, on stdout at its default verbosity)
    # for every request and for every socket's connecting, connect and disconnect:
    # text among the JSON log lines, a write of its own each, some 2% of a worker
    # taking in a reconnect storm. The sockets are logged as JSON events already
    # (ws.open, ws.closed) and requests by the balancer, so a worker writes none
    # unless --access-log asks for them (main() sets this; None: as given).
    access_log: bool | None = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.access_log is False:
            self.action_logger = None

    def run(self):
        from twisted.internet import reactor

        # No "Server: daphne" on responses and handshakes: what runs here is no
        # one else's business (daphne's --server-name cannot be set to nothing).
        self.server_name = ""

        direct_reads_and_writes()
        self.ports = []
        self.endpoints = [with_backlog(e, settings_value("LISTEN_BACKLOG")) for e in self.endpoints]
        # Twisted installs its own SIGTERM/SIGINT handlers when the reactor starts;
        # ours go in after that, so they win.
        reactor.callWhenRunning(self._start)
        super().run()

    def create_application(self, protocol, scope):
        if not isinstance(protocol, BoundedWebSocketProtocol):
            queue = super().create_application(protocol, scope)
            self.watch(protocol)
            return queue
        share_addresses(protocol, scope)
        # (the protocol is the prebuilt-frame writer: write_frame, write_frames)
        scope["extensions"] = {**(scope.get("extensions") or {}), "realtime.frames": protocol,
                               "websocket.http.response": NO_OPTIONS}
        # daphne's create_application, with the lean queue.
        assert "application_instance" not in self.connections[protocol]
        input_queue = AppQueue()
        scope.setdefault("asgi", ASGI_VERSION)
        try:
            application_instance = self.socket_application()(scope=scope, receive=input_queue.get,
                                                             send=protocol.asgi_send)
        except Exception as exc:
            # Past channels' router, the socket's app is called here, not inside
            # its task: what it raises fails the task as it did there (daphne then
            # refuses the handshake with 500), instead of leaving it unanswered.
            application_instance = _raises(exc)
        if protocol not in self.connections:
            return None
        self.connections[protocol]["application_instance"] = asyncio.ensure_future(
            application_instance, loop=asyncio.get_event_loop())
        self.watch(protocol, protocol.application_ended)
        return input_queue

    def socket_application(self):
        """The application of a socket's scope: past channels' ProtocolTypeRouter
        when the application is one. Its `await application(...)` would keep a
        coroutine waiting for the socket's whole life (some 300 B a socket), and a
        step more for every socket opened; the router's choice for a "websocket"
        scope is that same application."""
        mapping = getattr(self.application, "application_mapping", None)
        if isinstance(mapping, dict) and "websocket" in mapping:
            return mapping["websocket"]
        return self.application

    def listen_success(self, port):
        self.ports.append(port)
        super().listen_success(port)

    # -- start-up ---------------------------------------------------------------
    def _start(self):
        from twisted.internet import reactor

        from realtime.observability import metrics

        # What start-up made (Django, the app, the modules) lives as long as the
        # process: out of the collector's reach, a full collection walks only
        # what the sockets made since, instead of stopping every socket for the
        # whole heap's walk (bench: 150-290 ms a collection with 2,000 sockets).
        gc.collect()
        gc.freeze()
        # And each collection's pause from now on (realtime_gc_pause_seconds).
        metrics.watch_collector()
        # The limits, from settings (the only reader of the environment).
        limits = settings.REALTIME
        # A full collection at most once in REALTIME_GC_FULL_AFTER generation-1 ones (not
        # CPython's 10): a storm's or a drain's new sockets brought one on every
        # few hundred sockets, each a pause of the whole worker (docs/decisions.md).
        young, middle, _ = gc.get_threshold()
        gc.set_threshold(young, middle, limits["GC_FULL_AFTER"])
        BoundedWebSocketProtocol.max_send_buffer = limits["MAX_SEND_BUFFER"]
        BoundedWebSocketProtocol.max_receive_frames = limits["MAX_RECEIVE_FRAMES"]
        BoundedWebSocketProtocol.max_receive_buffer = limits["MAX_RECEIVE_BUFFER"]
        self.drain_spread, self.drain_timeout = limits["DRAIN_SPREAD"], limits["DRAIN_TIMEOUT"]
        self.drain_rate = limits["DRAIN_RATE"]

        def on_signal(signum, frame):
            reactor.callFromThread(self.drain, signal.Signals(signum).name, True)

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        # A message over --websocket-max-message-size is answered with a 1009 close
        # frame instead of a dropped TCP connection (autobahn's failByDrop), so the
        # client can tell why and does not resend it in a loop.
        self.ws_factory.setProtocolOptions(failByDrop=False)
        # Connections are built after start-up, so they all get the bounded protocol,
        # with the factory's options as class attributes.
        self.ws_factory.protocol = with_options_of(self.ws_factory)
        # An HTTP connection (a socket's upgrade request included) that sends
        # nothing for REALTIME_HANDSHAKE_TIMEOUT s is dropped; Twisted's default is
        # 60 s. It pauses while a request is being answered (long polls are safe).
        # And each request must arrive whole within that time, however it
        # trickles in; at most MAX_PENDING_PER_ADDRESS such connections an address.
        self.http_factory.timeOut = settings_value("HANDSHAKE_TIMEOUT")
        guard_http_factory(self.http_factory)
        asyncio.ensure_future(self._control_loop())
        from realtime.state import heartbeat

        heartbeat.ensure_started()  # the worker is in the cluster view from the start


def check_broker() -> None:
    """Reach the broker (REALTIME_BROKER_URL) before listening: a worker that could
    not carry a message to another stops here, with a message naming the setting."""
    import os
    import sys

    import django

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")  # as project/asgi.py
    django.setup()
    from realtime.delivery import transport

    try:
        transport.check_at_start_up()
    except transport.BrokerError as exc:
        print(f"realtime.server: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def main() -> None:
    import sys

    check_broker()
    DrainingServer.access_log = asked_for_access_log(sys.argv[1:])
    CommandLineInterface.server_class = DrainingServer
    CommandLineInterface.entrypoint()


if __name__ == "__main__":
    main()
