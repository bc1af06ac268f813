"""NATS: a subject per group, `rt.fan.<group>` (REALTIME_BROKER_URL=nats://host:port,
or nats://user:password@host:port), through nats-py.

Subjects. A group name ([a-zA-Z0-9-_.], under 100 characters) is used as is when
its dots separate non-empty tokens (`room.general` -> `rt.fan.room.general`);
any other name (an empty token, a wildcard, a space: none arise from the app's
own names) is carried as one token, `%` followed by its URL-safe base64, which no
plain name can produce (`subject()`). A subscription never has a wildcard, so a
group never receives another's messages.

Receiving, one connection per worker's fan-out (per event loop). `join(group)`
subscribes, then flushes (PING/PONG): NATS handles a connection's commands in
order, so the PONG means the server has the subscription, and nothing published
after join returns can be missed. Messages are msgspec msgpack dicts, as the
Redis engine's; each subscription's messages are handed to the fan-out in order
and the fan-out takes one message at a time (one lock), as the Redis loop does.

Bounds. Each subscription holds at most SUB_PENDING_MSGS messages or
SUB_PENDING_BYTES bytes that the fan-out has not taken yet (a worker that is slow
but running); beyond that nats-py drops the message and reports a slow consumer
(SlowConsumerError), and the engine has every socket catch up from the log
(`fan.recovered()`, at most once per REPAIR_EVERY seconds while drops go on). A
stalled process (SIGSTOP) reads nothing at all: the server then bounds it (its
max_pending, 64 MiB by default, and write_deadline) and closes the connection as a
slow consumer; the client reconnects as below.

Reconnection. nats-py reconnects for ever (max_reconnect_attempts=-1, every
RECONNECT_WAIT seconds) and subscribes again to every subscription by itself. The
engine counts each loss when it happens (`fan.failed(exc, 0)`: the broker-failure
metric and the FANOUT degraded row, without the sleep, since nats-py paces the
retries) and, once reconnected, flushes again (the server has every
subscription) before `fan.recovered()`. A join while the connection is down
waits for it up to JOIN_TIMEOUT, then fails (the socket is closed with 4013 and
retries). If the client ever
gives up (closed), the next join or the engine's own retry loop makes a new
connection, subscribes to every group of `fan.groups` and then recovers.

Publishing. `send()` publishes each message in order on a connection of the
running loop and then flushes (one PING/PONG round trip, as Redis's PUBLISH
reply): when send returns the server has the messages, and a broker that is gone
is an error the caller counts (state/degraded.py, PUBLISH). A worker's loop (one
with a fan-out) keeps its connection; any other loop (a management command's
async_to_sync makes one per call) connects for the call (no reconnection) and
closes it before send returns, which sends what is buffered first: nothing is
left behind when that loop is closed. While a worker's connection is
reconnecting, send puts the messages in nats-py's buffer, in order, and returns:
they go out once reconnected. That buffer is bounded (PENDING_SIZE bytes; past it
send fails with OutboundBufferLimitError, counted as above). A message lost
either way (a full buffer, a worker stopped before reconnecting) is found by seq
(gap repair, the ping's head check).

`ping()` (/readyz): the loop's connection is connected and a flush round trip
succeeds within READY_TIMEOUT. `probe()` (start-up): one connection, no retries,
a short timeout; unreachable or refused credentials raise BrokerError naming
REALTIME_BROKER_URL (the password is never shown).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import re
import weakref

import msgspec

from realtime.delivery.transport import SETTING, BrokerError, Engine, Receiver, hide_password, decoded

log = logging.getLogger(__name__)

PREFIX = "rt.fan."
SUB_PENDING_MSGS = 2048  # per subscription, not yet taken by the fan-out
SUB_PENDING_BYTES = 8 * 1024 * 1024
PENDING_SIZE = 1024 * 1024  # nats-py's outgoing buffer (bytes)
RECONNECT_WAIT = 0.25  # seconds between reconnection attempts
CONNECT_TIMEOUT = 2  # seconds, each attempt
JOIN_TIMEOUT = 5.0  # seconds for the subscription's PING/PONG
SEND_TIMEOUT = 2.0  # seconds for a send's PING/PONG
READY_TIMEOUT = 2.0
PROBE_TIMEOUT = 5.0
PING_INTERVAL = 5  # seconds; a silent server is dropped after MAX_OUTSTANDING_PINGS of them
MAX_OUTSTANDING_PINGS = 2
REPAIR_EVERY = 0.5  # seconds: at most one catch-up per this while a slow consumer drops messages

PLAIN = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")


def subject(group: str) -> str:
    """The subject that carries `group`'s messages (module doc)."""
    if PLAIN.fullmatch(group):
        return PREFIX + group
    return PREFIX + "%" + base64.urlsafe_b64encode(group.encode()).decode().rstrip("=")


def _options(**more) -> dict:
    return dict(
        connect_timeout=CONNECT_TIMEOUT,
        allow_reconnect=True,
        max_reconnect_attempts=-1,
        reconnect_time_wait=RECONNECT_WAIT,
        ping_interval=PING_INTERVAL,
        max_outstanding_pings=MAX_OUTSTANDING_PINGS,
        pending_size=PENDING_SIZE,
        **more,
    )


async def _connect(url: str, timeout: float, once: bool = False, **callbacks):
    """A connection that reconnects for ever once made; its first connection is
    bounded by `timeout` (nats-py would retry it for ever too). `once`: a
    connection for one call (no reconnection), which fails at once when refused."""
    import nats

    async def quiet(exc):  # nats-py's default logs every failed attempt with its traceback
        log.debug("nats: %s", type(exc).__name__)

    callbacks.setdefault("error_cb", quiet)
    options = _options(**callbacks)
    if once:
        # nats-py gives up on a server after max_reconnect_attempts > 0 retries
        # only (0 means for ever).
        options.update(allow_reconnect=False, max_reconnect_attempts=1, reconnect_time_wait=0.05)
    return await asyncio.wait_for(nats.connect(url, **options), timeout)


class NatsReceiver(Receiver):
    """One worker's subscriptions (module doc)."""

    def __init__(self, engine: "NatsEngine", fan) -> None:
        super().__init__(engine, fan)
        self.nc = None
        self.connecting: asyncio.Task | None = None
        self.subs: dict[str, object] = {}  # group -> nats Subscription
        self.handing = asyncio.Lock()  # one message at a time into the fan-out
        self.up = asyncio.Event()  # connected, and the server has every subscription
        self.dropped = False
        self.repairing: asyncio.Task | None = None
        self.rebuilding: asyncio.Task | None = None

    # -- connection ---------------------------------------------------------

    async def _client(self):
        if self.nc is not None and not self.nc.is_closed:
            return self.nc
        if self.connecting is None or self.connecting.done():
            self.connecting = asyncio.ensure_future(self._open())
        return await asyncio.shield(self.connecting)

    async def _open(self):
        nc = await _connect(self.engine.url, CONNECT_TIMEOUT + 1, error_cb=self._on_error,
                            disconnected_cb=self._on_disconnected, reconnected_cb=self._on_reconnected,
                            closed_cb=self._on_closed)
        self.nc = nc
        self.up.set()
        return nc

    async def _on_disconnected(self) -> None:
        if self.nc is None or self.nc.is_closed:
            return  # closed on purpose, or by _on_closed's path
        self.up.clear()
        # Counted now; nats-py paces the reconnection itself (no sleep here).
        await self.fan.failed(ConnectionError("NATS connection lost"), 0)

    async def _on_reconnected(self) -> None:
        # nats-py has sent every SUB again; our own flush makes sure the server
        # has them before the sockets are sent to the log (else a message
        # published between the catch-up's read and the SUB would be missed).
        asyncio.ensure_future(self._confirm_then_recover(self.nc))

    async def _confirm_then_recover(self, nc) -> None:
        try:
            await nc.flush(timeout=JOIN_TIMEOUT)
        except Exception:
            return  # lost again: the next reconnection comes back here
        self.up.set()
        self.fan.recovered()

    async def _on_closed(self) -> None:
        """nats-py gave up on this connection (it should not, with
        max_reconnect_attempts=-1): make a new one in the background."""
        self.up.clear()
        if self.rebuilding is None or self.rebuilding.done():
            self.rebuilding = asyncio.ensure_future(self._rebuild())

    async def _rebuild(self) -> None:
        delay = 0.1
        while self.fan.groups:
            delay = await self.fan.failed(ConnectionError("NATS connection closed"), delay)
            self.subs.clear()
            try:
                nc = await self._client()
                for group in list(self.fan.groups):
                    await self._subscribe(nc, group)
                await nc.flush(timeout=JOIN_TIMEOUT)
            except Exception:
                continue
            self.fan.recovered()
            return

    async def _on_error(self, exc: Exception) -> None:
        from nats.errors import SlowConsumerError

        if isinstance(exc, SlowConsumerError):
            # Called for each message dropped: one catch-up for the burst.
            self.dropped = True
            if self.repairing is None or self.repairing.done():
                log.warning("nats slow consumer: messages dropped, sockets catch up from the log",
                            extra={"event": "fanout.slow_consumer"})
                self.repairing = asyncio.ensure_future(self._repair())
            return
        log.debug("nats error: %s", type(exc).__name__)

    async def _repair(self) -> None:
        while self.dropped:
            self.dropped = False
            self.fan.recovered()
            await asyncio.sleep(REPAIR_EVERY)

    # -- subscriptions ------------------------------------------------------

    async def _subscribe(self, nc, group: str) -> None:
        if group not in self.subs:
            self.subs[group] = await nc.subscribe(subject(group), cb=self._on_message,
                                                  pending_msgs_limit=SUB_PENDING_MSGS,
                                                  pending_bytes_limit=SUB_PENDING_BYTES)

    async def join(self, group: str) -> None:
        nc = await self._client()
        if not self.up.is_set():
            # Reconnecting (a broker restart): wait for it a while, as a join
            # would wait for its PONG.
            try:
                await asyncio.wait_for(self.up.wait(), JOIN_TIMEOUT)
            except (asyncio.TimeoutError, TimeoutError):
                raise ConnectionError("NATS connection down (reconnecting): not subscribed") from None
            nc = await self._client()
        try:
            await self._subscribe(nc, group)
            await nc.flush(timeout=JOIN_TIMEOUT)  # PONG: the server has the SUB
        except BaseException:
            sub = self.subs.pop(group, None)
            if sub is not None:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
            raise

    async def leave(self, group: str) -> None:
        sub = self.subs.pop(group, None)
        if sub is not None:
            await sub.unsubscribe()

    async def _on_message(self, msg) -> None:
        data = decoded(msg.data)
        if data is None:
            return
        async with self.handing:
            await self.fan.dispatch(data)


class NatsEngine(Engine):
    name = "nats"

    def __init__(self, url: str) -> None:
        super().__init__(url)
        # A worker loop's publishing connection (a task making it, then made).
        self._publishers: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Task]" = (
            weakref.WeakKeyDictionary())

    def receiver(self, fan) -> Receiver:
        return NatsReceiver(self, fan)

    def pack(self, messages: list[tuple[str, dict]]) -> list[tuple[str, bytes]]:
        # Encoded before this worker's sockets get the messages (dispatch_own): the
        # fan-out keeps their prebuilt frames in them, which must not travel.
        return [(subject(group), msgspec.msgpack.encode(message)) for group, message in messages]

    @contextlib.asynccontextmanager
    async def _connection(self):
        """The running loop's publishing connection: kept on a worker's loop (one
        with a fan-out), made and closed around the call on any other."""
        from realtime.delivery.fanout import running

        loop = asyncio.get_running_loop()
        if running() is None:
            nc = await _connect(self.url, CONNECT_TIMEOUT + 1, once=True)
            try:
                yield nc
            finally:
                with contextlib.suppress(Exception):
                    await nc.close()
            return
        task = self._publishers.get(loop)
        if task is None or (task.done() and (task.cancelled() or task.exception() is not None
                                             or task.result().is_closed)):
            task = self._publishers[loop] = loop.create_task(_connect(self.url, CONNECT_TIMEOUT + 1))
        yield await asyncio.shield(task)

    async def send(self, packed: list[tuple[str, bytes]]) -> None:
        async with self._connection() as nc:
            for subject_, payload in packed:
                # While reconnecting nats-py keeps them (in order) in its buffer,
                # which raises OutboundBufferLimitError past PENDING_SIZE bytes.
                await nc.publish(subject_, payload)
            if nc.is_connected:
                await nc.flush(timeout=SEND_TIMEOUT)

    async def ping(self) -> None:
        async with self._connection() as nc:
            if not nc.is_connected:
                raise ConnectionError("NATS connection down (reconnecting)")
            await nc.flush(timeout=READY_TIMEOUT)

    async def probe(self) -> None:
        from nats import errors

        seen: list[BaseException] = []

        async def remember(exc):
            seen.append(exc)

        shown = self.shown()
        try:
            nc = await _connect(self.url, PROBE_TIMEOUT, once=True, error_cb=remember)
        except (asyncio.TimeoutError, TimeoutError):
            raise BrokerError(f"{SETTING}: no answer from NATS at {shown} (nats) within {PROBE_TIMEOUT:g} s") from None
        except Exception as exc:
            cause = seen[-1] if seen else exc
            if isinstance(exc, errors.AuthorizationError) or "authorization" in str(exc).lower():
                raise BrokerError(f"{SETTING}: NATS at {shown} refused the credentials "
                                  f"({_scrub(str(exc), self.url)})") from None
            text = _scrub(str(cause), self.url)
            raise BrokerError(f"{SETTING}: cannot reach NATS at {shown} ({type(cause).__name__}"
                              f"{': ' + text if text else ''})") from None
        try:
            await nc.flush(timeout=PROBE_TIMEOUT)
        finally:
            with contextlib.suppress(Exception):
                await nc.close()


def _scrub(text: str, url: str) -> str:
    """`text` without the URL's password (an error message may quote the URL)."""
    import urllib.parse

    text = text.strip()
    for one in url.split(","):
        split = urllib.parse.urlsplit(one.strip())
        if split.password:
            text = text.replace(one.strip(), hide_password(one.strip())).replace(split.password, "***")
    return text
