"""RabbitMQ (AMQP 0-9-1): a topic exchange, a queue per worker
(REALTIME_BROKER_URL=amqp://user:password@host:port/vhost, or amqps://), through
aio-pika.

Routing. Every message is published to the topic exchange `rt.fan` with the
group as its routing key. A group name ([a-zA-Z0-9-_.], under 100 characters) is
used as is when its dots separate non-empty words (`room.general`); any other
name (an empty word, `*` or `#`, which are wildcards in a binding key, a space:
none arise from the app's own names) is one word, `%` followed by its URL-safe
base64, which no plain name can produce (`routing_key()`), at most 137 bytes (the
limit is 255). A binding never has a wildcard, so a group never receives
another's messages. The exchange is durable: it outlives a broker restart, so a
publisher that reconnects first never meets a missing exchange (a publish to one
closes the channel with 404); it costs nothing, since the messages are transient
(delivery_mode 1) and the queues are not durable.

Receiving, one connection per worker's fan-out (per event loop): one exclusive,
auto-delete, server-named queue, bound once per group the worker follows.
`join(group)` returns after Bind-Ok: the binding is in place, so nothing
published after join returns can be missed. The consumer takes messages with
no_ack (no acknowledgement traffic): each is decoded (msgspec msgpack, as the
Redis engine's) into one local inbox, in the order the queue delivered them, and
one task hands them to the fan-out, one at a time. A queue keeps the order in
which the exchange routed each group's messages.

Bounds. The queue holds at most QUEUE_MAX_LENGTH messages and QUEUE_MAX_BYTES
bytes (x-max-length, x-max-length-bytes, overflow drop-head: the oldest go); a
worker that stalls (SIGSTOP) costs the broker no more than that. In the worker,
the inbox holds at most INBOX_MAX messages not yet handed out, dropping the
oldest. These are constants here, not settings. RabbitMQ does not tell a consumer
that its queue dropped messages: the sockets find what is missing by seq (gap
repair on the next message, the ping's head check), which the delivery is built
on anyway. A drop in the worker's own inbox is seen, and has every socket catch
up from the log (`fan.recovered()`, at most once per REPAIR_EVERY seconds).

Reconnection, the engine's own loop (not connect_robust: the queue is
server-named and exclusive, so it dies with its connection and a new one must be
declared, then bound to exactly the groups `fan.groups` holds now). When the
connection or channel closes, the loop counts the failure (`fan.failed()`: the
broker-failure metric and the FANOUT degraded row) and waits (0.1 s, doubling, at
most 2 s), connects again, declares the exchange and a new queue, binds every
group (each Bind-Ok awaited), consumes, and then calls `fan.recovered()`, which
has every socket catch up from the log. A join while the connection is down waits
up to JOIN_TIMEOUT for it, then fails (the socket is closed with 4013 and
retries). Heartbeats (HEARTBEAT seconds) find a silent peer.

Publishing. `send()` publishes on a channel with publisher confirms and returns
once the broker has confirmed every message of the call (one round trip for the
whole call, as Redis's PUBLISH reply and the NATS engine's flush): a broker that
is gone, or a message it could not take, is an error the caller counts
(state/degraded.py, PUBLISH), instead of a publish that silently vanishes into a
dead socket. Without confirms send would return sooner, with losses found only
by seq; with them, the loss is also seen (and still repaired by seq). The
messages of one call are written in order (aiormq writes a channel's publishes
one at a time, in the order asked). Messages are not mandatory: a group no worker
follows has no queue, and that is not an error. A worker's loop (one with a
fan-out) keeps its connection and channel; any other loop (a management
command's async_to_sync makes one per call) connects for the call and closes the
connection before send returns. Nothing is buffered while the broker is down:
send fails (connection refused) and the message is found by seq.

`ping()` (/readyz): the loop's publishing channel declares the exchange (a round
trip) within READY_TIMEOUT. `probe()` (start-up): one connection with a short
timeout that declares the exchange; unreachable, refused credentials, an unknown
vhost or missing permissions raise BrokerError naming REALTIME_BROKER_URL (the
password is never shown).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import re
import urllib.parse
import weakref

import msgspec

from realtime.delivery.transport import SETTING, BrokerError, Engine, Receiver, hide_password, decoded

log = logging.getLogger(__name__)

EXCHANGE = "rt.fan"
QUEUE_MAX_LENGTH = 10_000  # messages in a worker's queue (drop-head beyond)
QUEUE_MAX_BYTES = 64 * 1024 * 1024
INBOX_MAX = 10_000  # messages received, not yet handed to the fan-out
CONNECT_TIMEOUT = 3.0
JOIN_TIMEOUT = 5.0
READY_TIMEOUT = 2.0
PROBE_TIMEOUT = 5.0
HEARTBEAT = 10
REPAIR_EVERY = 0.5

PLAIN = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")


def routing_key(group: str) -> str:
    """The routing (and binding) key of `group`'s messages (module doc)."""
    if PLAIN.fullmatch(group):
        return group
    return "%" + base64.urlsafe_b64encode(group.encode()).decode().rstrip("=")


async def _connect(url: str, timeout: float = CONNECT_TIMEOUT):
    import aio_pika

    extra = {} if "heartbeat=" in (urllib.parse.urlsplit(url).query or "") else {"heartbeat": HEARTBEAT}
    return await aio_pika.connect(url, timeout=timeout, client_properties={"connection_name": "realtime"}, **extra)


async def _declare_exchange(channel):
    import aio_pika

    return await channel.declare_exchange(EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)


class AmqpReceiver(Receiver):
    """One worker's queue and bindings (module doc)."""

    def __init__(self, engine: "AmqpEngine", fan) -> None:
        super().__init__(engine, fan)
        self.connection = None
        self.channel = None
        self.exchange = None
        self.queue = None
        self.ready = asyncio.Event()  # set while the queue is bound and consumed
        self.lost: asyncio.Future | None = None
        self.task: asyncio.Task | None = None
        self.handing: asyncio.Task | None = None
        self.inbox: asyncio.Queue = asyncio.Queue()
        self.dropped = False
        self.repairing: asyncio.Task | None = None

    def _start(self) -> None:
        if self.task is None or self.task.done():
            self.task = asyncio.ensure_future(self._run())
        if self.handing is None or self.handing.done():
            self.handing = asyncio.ensure_future(self._hand_out())

    async def join(self, group: str) -> None:
        self._start()
        if not self.ready.is_set():
            try:
                await asyncio.wait_for(self.ready.wait(), JOIN_TIMEOUT)
            except (asyncio.TimeoutError, TimeoutError):
                raise ConnectionError("AMQP broker unreachable: not subscribed") from None
        await self.queue.bind(self.exchange, routing_key=routing_key(group))  # awaits Bind-Ok

    async def leave(self, group: str) -> None:
        if self.ready.is_set():
            await self.queue.unbind(self.exchange, routing_key=routing_key(group))

    # -- the connection's loop ----------------------------------------------

    async def _run(self) -> None:
        delay, failed = 0.1, False
        while True:
            try:
                await self._open()
            except asyncio.CancelledError:
                await self._close()
                raise
            except Exception as exc:
                await self._close()
                failed = True
                delay = await self.fan.failed(exc, delay)
                continue
            delay = 0.1
            self.ready.set()
            if failed:
                self.fan.recovered()
            failed = False
            try:
                exc = await self.lost
            except asyncio.CancelledError:
                await self._close()
                raise
            self.ready.clear()
            await self._close()
            failed = True
            delay = await self.fan.failed(exc, delay)

    async def _open(self) -> None:
        # This connection's own: a late callback of an older one cannot end it.
        self.lost = lost = asyncio.get_running_loop().create_future()

        def on_close(sender, exc=None, *args) -> None:
            if not lost.done():
                lost.set_result(exc if isinstance(exc, BaseException) else ConnectionError("AMQP connection closed"))

        self.connection = await _connect(self.engine.url)
        self.connection.close_callbacks.add(on_close)
        self.channel = await self.connection.channel(publisher_confirms=False)
        self.channel.close_callbacks.add(on_close)
        self.exchange = await _declare_exchange(self.channel)
        self.queue = await self.channel.declare_queue(
            "", exclusive=True, auto_delete=True, durable=False,
            arguments={"x-max-length": QUEUE_MAX_LENGTH, "x-max-length-bytes": QUEUE_MAX_BYTES,
                       "x-overflow": "drop-head"})
        for group in list(self.fan.groups):
            await self.queue.bind(self.exchange, routing_key=routing_key(group))
        await self.queue.consume(self._on_message, no_ack=True)

    async def _close(self) -> None:
        connection, self.connection, self.channel, self.queue = self.connection, None, None, None
        if connection is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(connection.close(), 2)

    # -- messages -----------------------------------------------------------

    async def _on_message(self, message) -> None:
        # No await before the put: aiormq runs one task per delivery, in order, and
        # each reaches here in its turn.
        data = decoded(message.body)
        if data is None:
            return
        if self.inbox.qsize() >= INBOX_MAX:
            self.inbox.get_nowait()  # the oldest goes; the sockets catch up from the log
            self._dropped()
        self.inbox.put_nowait(data)

    async def _hand_out(self) -> None:
        while True:
            data = await self.inbox.get()
            try:
                await self.fan.dispatch(data)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("fan-out dispatch failed", extra={"event": "fanout.dispatch_failed"})

    def _dropped(self) -> None:
        self.dropped = True
        if self.repairing is None or self.repairing.done():
            log.warning("amqp inbox full: messages dropped, sockets catch up from the log",
                        extra={"event": "fanout.slow_consumer"})
            self.repairing = asyncio.ensure_future(self._repair())

    async def _repair(self) -> None:
        while self.dropped:
            self.dropped = False
            self.fan.recovered()
            await asyncio.sleep(REPAIR_EVERY)


class _Publisher:
    """A connection, a channel with confirms and the exchange."""

    def __init__(self, connection, channel, exchange) -> None:
        self.connection, self.channel, self.exchange = connection, channel, exchange

    @property
    def usable(self) -> bool:
        return not self.connection.is_closed and not self.channel.is_closed

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.connection.close(), 2)


async def _publisher(url: str) -> _Publisher:
    connection = await _connect(url)
    try:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=False)
        exchange = await _declare_exchange(channel)
    except BaseException:
        with contextlib.suppress(Exception):
            await connection.close()
        raise
    return _Publisher(connection, channel, exchange)


class AmqpEngine(Engine):
    name = "amqp"

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self._publishers: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Task]" = (
            weakref.WeakKeyDictionary())

    def receiver(self, fan) -> Receiver:
        return AmqpReceiver(self, fan)

    def pack(self, messages: list[tuple[str, dict]]) -> list[tuple[str, bytes]]:
        # Encoded before this worker's sockets get the messages (dispatch_own): the
        # fan-out keeps their prebuilt frames in them, which must not travel.
        return [(routing_key(group), msgspec.msgpack.encode(message)) for group, message in messages]

    @contextlib.asynccontextmanager
    async def _publishing(self):
        """The running loop's publisher: kept on a worker's loop (one with a
        fan-out), made and closed around the call on any other."""
        from realtime.delivery.fanout import running

        loop = asyncio.get_running_loop()
        if running() is None:
            publisher = await _publisher(self.url)
            try:
                yield publisher
            finally:
                await publisher.close()
            return
        task = self._publishers.get(loop)
        if task is None or (task.done() and (task.cancelled() or task.exception() is not None
                                             or not task.result().usable)):
            if task is not None and task.done() and not task.cancelled() and task.exception() is None:
                await task.result().close()
            task = self._publishers[loop] = loop.create_task(_publisher(self.url))
        yield await asyncio.shield(task)

    async def send(self, packed: list[tuple[str, bytes]]) -> None:
        import aio_pika

        async with self._publishing() as publisher:
            # In order: aiormq writes a channel's publishes one at a time, in the
            # order the tasks ask (its lock is first come, first served); the
            # confirmations are awaited together.
            results = await asyncio.gather(*(
                publisher.exchange.publish(aio_pika.Message(payload, delivery_mode=aio_pika.DeliveryMode.NOT_PERSISTENT),
                                           routing_key=key, mandatory=False)
                for key, payload in packed), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def ping(self) -> None:
        async with self._publishing() as publisher:
            await asyncio.wait_for(_declare_exchange(publisher.channel), READY_TIMEOUT)

    async def probe(self) -> None:
        from aiormq import exceptions as amqp

        shown = self.shown()
        try:
            connection = await _connect(self.url, timeout=PROBE_TIMEOUT)
        except amqp.ProbableAuthenticationError:
            raise BrokerError(f"{SETTING}: RabbitMQ at {shown} refused the user name or password") from None
        except amqp.ConnectionNotAllowed as exc:
            raise BrokerError(f"{SETTING}: RabbitMQ at {shown} does not let this user use the vhost "
                              f"({_scrub(_reason(exc), self.url)})") from None
        except (asyncio.TimeoutError, TimeoutError):
            raise BrokerError(f"{SETTING}: no answer from RabbitMQ at {shown} (amqp) within "
                              f"{PROBE_TIMEOUT:g} s") from None
        except amqp.InvalidFrameError as exc:
            if "OpenOk" not in str(exc):
                raise BrokerError(f"{SETTING}: RabbitMQ at {shown} broke off the handshake "
                                  f"({_scrub(_reason(exc), self.url)})") from None
            # The broker closed instead of opening the vhost (aiormq keeps only the
            # frame's repr): "NOT_ALLOWED - vhost ... not found", or no access to it.
            vhost = urllib.parse.unquote(urllib.parse.urlsplit(self.url).path[1:] or "/")
            raise BrokerError(f"{SETTING}: RabbitMQ at {shown} did not open the vhost {vhost!r} (it does not "
                              "exist, or this user has no permissions on it)") from None
        except Exception as exc:
            raise BrokerError(f"{SETTING}: cannot reach RabbitMQ at {shown} ({type(exc).__name__}: "
                              f"{_scrub(_reason(exc), self.url)})") from None
        try:
            channel = await connection.channel()
            await _declare_exchange(channel)
        except Exception as exc:
            raise BrokerError(f"{SETTING}: RabbitMQ at {shown} refused to declare the exchange {EXCHANGE!r} "
                              f"({type(exc).__name__}: {_scrub(_reason(exc), self.url)})") from None
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(connection.close(), 2)


def _reason(exc: BaseException) -> str:
    return str(exc).strip() or type(exc).__name__


def _scrub(text: str, url: str) -> str:
    """`text` without the URL's password (an error message may quote the URL)."""
    split = urllib.parse.urlsplit(url)
    if split.password:
        text = text.replace(url, hide_password(url))
        for form in {split.password, urllib.parse.unquote(split.password)}:
            text = text.replace(form, "***")
    return text
