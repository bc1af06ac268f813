"""Redis Cluster, sharded pub/sub: `redis+cluster://host:port[,host:port]`.

A group's channel (`rt:fan:<group>`, names.fan_channel) hashes to one of the
cluster's 16384 slots, and the master that owns the slot carries it: SPUBLISH
there reaches the workers that SSUBSCRIBEd there, and no other node sees the
message (classic PUBLISH on a cluster is copied to every node; never used here).
A group's messages travel on one channel, one node, one connection each way, so
they keep their order; the cluster spreads the groups over its masters.

The slot map (which node owns which slot) comes from CLUSTER SLOTS, asked of any
node that answers (those the map knows, then those the URL lists), and is shared
by everything in the process; connections are per event loop (the publisher's
clients, like state/store.client) or per fan-out (the receiver's).

Publishing: each message to its slot's owner, one pipeline per node, the nodes
in parallel, each group's messages in the order given (one channel, one node,
one pipeline). A MOVED answer (the slot went elsewhere) patches the map (read
again before the next send) and those messages are sent once more, in order, to
the owner it names; a second MOVED, or a node that cannot be reached, is raised
(publish.py counts it; subscribers repair by seq).

Receiving: one raw connection per node this worker has groups on (redis-py's
asyncio PubSub has no SSUBSCRIBE), read by a task of its own that answers the
commands sent on it in order: `join` returns once the node has confirmed the
SSUBSCRIBE (nothing published after can be missed); a MOVED answer sends it to
the owner the error names. The node pushes an unasked `sunsubscribe` when the
slot leaves it (resharding): the map is read again, the group subscribed on its
new owner, and every socket catches up from the log (`fan.recovered()`), since
messages published in between went to a node the worker did not listen to. A
connection lost, or silent past a PING (every PING_EVERY seconds; in RESP2
subscribed mode the answer is ["pong", ""]), is a failure: `fan.failed()`, the
map read again, every group not confirmed on a live connection subscribed on its
current owner, then `fan.recovered()`; repeated, with the fan-out's growing delay,
until it succeeds.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import logging
import time
import urllib.parse
import weakref

import msgspec
from redis.crc import key_slot
from redis.exceptions import AuthenticationError, MovedError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError, TimeoutError as RedisTimeoutError

from realtime.delivery import names
from realtime.delivery.transport import BrokerError, Engine, Receiver, SETTING, describe, decoded
from realtime.state import store

log = logging.getLogger(__name__)

PING_EVERY = 5.0  # seconds between PINGs on a subscriber connection
PONG_WITHIN = 10.0  # ... silent (no PONG, nothing else read) this long after one: dead
CONFIRM_WITHIN = 5.0  # seconds an SSUBSCRIBE waits for its confirmation
CONNECT_TIMEOUT = 2.0
COMMAND_TIMEOUT = 2.0  # publishing and the map: a sick node fails fast (publish.py tolerates it)
REDIRECTS = 3  # MOVED answers an SSUBSCRIBE follows


def parse_url(url: str) -> tuple[list[str], str | None, str | None]:
    """`redis+cluster://[user:password@]h:p[,h:p...]` (each part may repeat the
    scheme) -> (["h:p", ...], username, password)."""
    seeds: list[str] = []
    username = password = None
    for part in url.split(","):
        part = part.strip()
        if not part:
            continue
        if "://" not in part:
            part = "redis+cluster://" + part
        split = urllib.parse.urlsplit(part)
        if split.password is not None or split.username:
            username = urllib.parse.unquote(split.username) if split.username else None
            password = urllib.parse.unquote(split.password) if split.password is not None else None
        if not split.hostname:
            raise BrokerError(f"{SETTING}: no host in {part!r} (redis+cluster://host:port[,host:port])")
        address = f"{split.hostname}:{split.port or 6379}"
        if address not in seeds:
            seeds.append(address)
    if not seeds:
        raise BrokerError(f"{SETTING}: no node in {url!r} (redis+cluster://host:port[,host:port])")
    return seeds, username, password


def host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def cluster_info(raw) -> dict[str, str]:
    if isinstance(raw, dict):
        return {text(k): text(v) for k, v in raw.items()}
    return dict(line.split(":", 1) for line in text(raw).strip().splitlines() if ":" in line)


class SlotMap:
    """Which master owns which slot (CLUSTER SLOTS), with the owners MOVED answers
    named since it was read."""

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ranges: list[tuple[int, int, str]] = []  # (first, last, "host:port"), sorted
        self.moved: dict[int, str] = {}  # slot -> owner a MOVED named since the last read
        self.stale = True  # read it again before the next use

    @property
    def nodes(self) -> list[str]:
        return list(dict.fromkeys(address for _, _, address in self.ranges))

    def owner(self, slot: int) -> str | None:
        found = self.moved.get(slot)
        if found is not None:
            return found
        i = bisect.bisect_right(self.starts, slot) - 1
        if i >= 0:
            first, last, address = self.ranges[i]
            if first <= slot <= last:
                return address
        return None

    def load(self, reply, asked: str) -> None:
        """A CLUSTER SLOTS answer, from the node at `asked`."""
        ranges = []
        for entry in reply:
            first, last, master = int(entry[0]), int(entry[1]), entry[2]
            host = text(master[0])
            if host in ("", "?"):  # the node does not know its own address: the one we used
                host = host_port(asked)[0]
            ranges.append((first, last, f"{host}:{int(master[1])}"))
        ranges.sort()
        self.ranges = ranges
        self.starts = [first for first, _, _ in ranges]
        self.moved = {}
        self.stale = False

    def patch(self, error: MovedError) -> str:
        address = f"{error.host}:{error.port}"
        self.moved[int(error.slot_id)] = address
        self.stale = True
        return address


class NodeLink:
    """This worker's subscriber connection to one node, for the groups whose slots
    the node owns. Replies come in the order of the commands sent (`pending`),
    between the pushed messages and unsubscriptions."""

    def __init__(self, receiver: "ClusterReceiver", address: str) -> None:
        self.receiver, self.fan, self.address = receiver, receiver.fan, address
        self.conn = None
        self.task: asyncio.Task | None = None
        self.pending: collections.deque = collections.deque()  # (kind, channel, future): awaiting a reply
        self.channels: set[str] = set()  # confirmed on this connection
        self.writing = asyncio.Lock()
        self.connecting = asyncio.Lock()
        self.last_read = time.monotonic()

    async def _connected(self):
        if self.conn is not None:
            return self.conn
        async with self.connecting:
            if self.conn is None:
                conn = self.receiver.engine.connection(self.address)
                await conn.connect()
                self.conn, self.channels, self.last_read = conn, set(), time.monotonic()
                self.task = asyncio.ensure_future(self._serve(conn))
        return self.conn

    async def send(self, commands: list[tuple[str, str | None]]) -> list[asyncio.Future]:
        """Send (kind, channel) commands in one write; a future per command for its
        reply (done with the error it answered, or the connection's)."""
        conn = await self._connected()
        loop = asyncio.get_running_loop()
        futures = []
        async with self.writing:
            # redis-py reconnects a closed connection on send: a fresh one would
            # have none of the subscriptions, so never send on one this link lost.
            if self.conn is not conn or not conn.is_connected:
                raise ConnectionError(f"connection to {self.address} lost")
            for kind, channel in commands:
                future = loop.create_future()
                future.add_done_callback(store.retrieved)
                self.pending.append((kind, channel, future))
                futures.append(future)
            packed = conn.pack_commands([(kind.upper(),) + ((channel,) if channel is not None else ())
                                         for kind, channel in commands])
            try:
                await conn.send_packed_command(packed, check_health=False)
            except Exception as exc:
                self._lost(conn, exc)
                raise
        return futures

    async def subscribe(self, channel: str) -> None:
        """Once the node has confirmed it (MovedError: it does not own the slot)."""
        [future] = await self.send([("ssubscribe", channel)])
        await asyncio.wait_for(asyncio.shield(future), CONFIRM_WITHIN)

    async def unsubscribe(self, channel: str) -> None:
        self.channels.discard(channel)
        if self.conn is not None:
            await self.send([("sunsubscribe", channel)])  # its reply is not waited for

    async def _serve(self, conn) -> None:
        reader = asyncio.ensure_future(self._read(conn))
        pinger = asyncio.ensure_future(self._ping(conn))
        try:
            done, _ = await asyncio.wait({reader, pinger}, return_when=asyncio.FIRST_COMPLETED)
            exc = next((t.exception() for t in done if not t.cancelled() and t.exception() is not None), None)
        finally:
            reader.cancel()
            pinger.cancel()
        self._lost(conn, exc or ConnectionError(f"connection to {self.address} closed"))

    async def _read(self, conn) -> None:
        while True:
            try:
                reply = await conn.read_response()
            except ResponseError as exc:  # the answer to the oldest command waiting
                self.last_read = time.monotonic()
                if self.pending:
                    _, _, future = self.pending.popleft()
                    if not future.done():
                        future.set_exception(exc)
                continue
            self.last_read = time.monotonic()
            if isinstance(reply, list) and reply:
                kind = text(reply[0]).lower()
                if kind == "smessage":
                    await self._message(reply[2])
                elif kind == "ssubscribe":
                    channel = text(reply[1])
                    self.channels.add(channel)
                    self._answer("ssubscribe", channel, True)
                elif kind == "sunsubscribe":
                    channel = text(reply[1])
                    self.channels.discard(channel)
                    if not self._answer("sunsubscribe", channel, True):
                        # Unasked: the slot left this node (resharding).
                        self.receiver.moved(channel)
                elif kind == "pong":
                    self._answer("ping", None, True)
            elif text(reply).upper() == "PONG":  # no subscription left on this connection
                self._answer("ping", None, True)

    def _answer(self, kind: str, channel: str | None, result) -> bool:
        """Resolve the oldest command waiting of this kind (and channel)."""
        for entry in self.pending:
            if entry[0] == kind and entry[1] == channel:
                self.pending.remove(entry)
                if not entry[2].done():
                    entry[2].set_result(result)
                return True
        return False

    async def _message(self, payload: bytes) -> None:
        data = decoded(payload)
        if data is not None:
            await self.fan.dispatch(data)

    async def _ping(self, conn) -> None:
        """A connection that answers nothing (no PONG, no message) for PONG_WITHIN
        seconds after a PING is dead, even if the socket does not say so."""
        while True:
            await asyncio.sleep(PING_EVERY)
            sent = time.monotonic()
            try:
                [future] = await asyncio.wait_for(self.send([("ping", None)]), PONG_WITHIN)
                while True:
                    try:
                        await asyncio.wait_for(asyncio.shield(future), PONG_WITHIN)
                        break
                    except asyncio.TimeoutError:
                        if time.monotonic() - max(self.last_read, sent) >= PONG_WITHIN:
                            raise
                        # Still reading what came before the PONG (a backlog): alive.
            except asyncio.TimeoutError:
                raise ConnectionError(f"no answer from {self.address} within {PONG_WITHIN:g} s of a PING") from None

    def _lost(self, conn, exc: BaseException) -> None:
        """The connection is gone: every command waiting fails, the groups it
        carried are placed again (receiver.failed)."""
        if self.conn is not conn:
            return
        self.conn = None
        carried = bool(self.channels)
        self.channels = set()
        pending, self.pending = list(self.pending), collections.deque()
        for _, _, future in pending:
            if not future.done():
                future.set_exception(ConnectionError(f"connection to {self.address} lost ({describe(exc)})"))
        task, self.task = self.task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
        asyncio.ensure_future(self._close(conn))
        if carried:
            self.receiver.failed(exc)

    @staticmethod
    async def _close(conn) -> None:
        with contextlib.suppress(Exception):
            await conn.disconnect(nowait=True)


class ClusterReceiver(Receiver):
    """One fan-out's subscriptions: a NodeLink per node it has groups on."""

    def __init__(self, engine: "RedisClusterEngine", fan) -> None:
        super().__init__(engine, fan)
        self.links: dict[str, NodeLink] = {}
        self.repairing: asyncio.Task | None = None
        self.trouble: BaseException | None = None  # the failure the next repair counts
        self.again = False  # something else went wrong while repairing

    def link(self, address: str) -> NodeLink:
        found = self.links.get(address)
        if found is None:
            found = self.links[address] = NodeLink(self, address)
        return found

    def holding(self, channel: str) -> NodeLink | None:
        for link in self.links.values():
            if channel in link.channels:
                return link
        return None

    async def join(self, group: str) -> None:
        await self._subscribe(names.fan_channel(group))

    async def leave(self, group: str) -> None:
        channel = names.fan_channel(group)
        link = self.holding(channel)
        if link is not None:
            await link.unsubscribe(channel)

    async def _subscribe(self, channel: str, address: str | None = None) -> None:
        """SSUBSCRIBE on the owner of the channel's slot, following MOVED answers."""
        slot = key_slot(channel.encode())
        if address is None:
            address = await self.engine.owner(slot)
        for _ in range(REDIRECTS):
            try:
                await self.link(address).subscribe(channel)
                return
            except MovedError as exc:
                address = self.engine.slots.patch(exc)
        await self.link(address).subscribe(channel)

    def failed(self, exc: BaseException) -> None:
        """A connection carrying groups was lost."""
        self.trouble = exc
        self._repair()

    def moved(self, channel: str) -> None:
        """A node dropped a subscription of ours unasked: its slot moved."""
        self.engine.slots.stale = True
        log.info("fan-out channel moved to another node", extra={"event": "fanout.slot_moved"})
        self._repair()

    def _repair(self) -> None:
        if self.repairing is not None and not self.repairing.done():
            self.again = True
            return
        self.repairing = asyncio.ensure_future(self._repair_loop())

    async def _repair_loop(self) -> None:
        delay = 0.1
        while True:
            self.again = False
            exc, self.trouble = self.trouble, None
            if exc is not None:
                delay = await self.fan.failed(exc, delay)
            if not self.fan.groups:
                return  # nothing to follow: no connection until the next join
            try:
                await self.engine.refresh()
                await self._place_all()
            except asyncio.CancelledError:
                raise
            except Exception as problem:
                self.trouble = problem  # still down: counted, waited for, tried again
                continue
            if self.again or self.trouble is not None:
                continue
            self.fan.recovered()
            return

    async def _place_all(self) -> None:
        """Every group the fan-out follows that no live connection has confirmed,
        subscribed on its slot's owner: one write per node, then the confirmations."""
        by_node: dict[str, list[str]] = {}
        for group in list(self.fan.groups):
            channel = names.fan_channel(group)
            if self.holding(channel) is None:
                address = self.engine.slots.owner(key_slot(channel.encode()))
                if address is None:
                    raise ConnectionError(f"no node owns the slot of {channel}")
                by_node.setdefault(address, []).append(channel)

        async def place(address: str, channels: list[str]) -> None:
            futures = await self.link(address).send([("ssubscribe", channel) for channel in channels])
            answers = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), CONFIRM_WITHIN)
            for channel, answer in zip(channels, answers):
                if isinstance(answer, MovedError):
                    await self._subscribe(channel, self.engine.slots.patch(answer))
                elif isinstance(answer, BaseException):
                    raise answer

        await asyncio.gather(*(place(address, channels) for address, channels in by_node.items()))


class RedisClusterEngine(Engine):
    name = "redis-cluster"

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.seeds, self.username, self.password = parse_url(url)
        self.slots = SlotMap()
        self._clients: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict]" = weakref.WeakKeyDictionary()
        self._refreshing: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Task]" = (
            weakref.WeakKeyDictionary())

    # Connections

    def _options(self) -> dict:
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        return {"username": self.username, "password": self.password, "socket_connect_timeout": CONNECT_TIMEOUT,
                "socket_keepalive": True, "retry": Retry(NoBackoff(), 0)}

    def client(self, address: str):
        """The publishing client for one node on the running loop (one quick retry: a
        pooled connection the node closed is opened again at once)."""
        from redis import asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        mine = self._clients.setdefault(asyncio.get_running_loop(), {})
        found = mine.get(address)
        if found is None:
            host, port = host_port(address)
            found = mine[address] = store.packed_in_c(aioredis.Redis(
                host=host, port=port, socket_timeout=COMMAND_TIMEOUT, **{**self._options(), "retry": Retry(NoBackoff(), 1)}))
        return found

    def connection(self, address: str):
        """A subscriber connection: no read timeout (it waits for messages; PINGs
        find a dead one), no retries (a failure goes to the receiver)."""
        from redis.asyncio import Connection

        host, port = host_port(address)
        return Connection(host=host, port=port, socket_timeout=None, **self._options())

    # The slot map

    def candidates(self) -> list[str]:
        return list(dict.fromkeys(self.slots.nodes + self.seeds))

    async def refresh(self) -> None:
        """Read the slot map again (one reading at a time per loop)."""
        loop = asyncio.get_running_loop()
        task = self._refreshing.get(loop)
        if task is None or task.done():
            task = self._refreshing[loop] = asyncio.ensure_future(self._read_map())
        await asyncio.shield(task)

    async def _read_map(self) -> None:
        errors = []
        for address in self.candidates():
            try:
                reply = await self.client(address).execute_command("CLUSTER", "SLOTS")
            except Exception as exc:
                errors.append(f"{address}: {describe(exc)}")
                continue
            if reply:
                self.slots.load(reply, address)
                return
            errors.append(f"{address}: no slots")
        raise ConnectionError(f"no node of the Redis Cluster answers CLUSTER SLOTS ({'; '.join(errors)})")

    async def owners(self, slots: list[int]) -> list[str]:
        """The owner of each slot, the map read again first if it is out of date (if
        no node answers, the map as it was)."""
        if self.slots.stale or any(self.slots.owner(slot) is None for slot in slots):
            try:
                await self.refresh()
            except ConnectionError:
                pass
        found = [self.slots.owner(slot) for slot in slots]
        for slot, address in zip(slots, found):
            if address is None:
                raise ConnectionError(f"no node of the Redis Cluster is known to own slot {slot} "
                                      f"(asked {', '.join(self.candidates())})")
        return found

    async def owner(self, slot: int) -> str:
        return (await self.owners([slot]))[0]

    # Receiving

    def receiver(self, fan) -> Receiver:
        return ClusterReceiver(self, fan)

    # Sending

    def pack(self, messages: list[tuple[str, dict]]) -> list[tuple[int, str, bytes]]:
        # Encoded before this worker's sockets get the messages (dispatch_own): the
        # fan-out keeps their prebuilt frames in them, which must not travel.
        packed = []
        for group, message in messages:
            channel = names.fan_channel(group)
            packed.append((key_slot(channel.encode()), channel, msgspec.msgpack.encode(message)))
        return packed

    async def send(self, packed: list[tuple[int, str, bytes]]) -> None:
        waiting = list(packed)
        error: BaseException | None = None
        for attempt in range(2):
            by_node: dict[str, list[tuple[int, str, bytes]]] = {}
            # The retry goes where the MOVED answers said (the map read again now
            # might come from a node that has not heard of the move yet).
            slots = [slot for slot, _, _ in waiting]
            owners = await self.owners(slots) if attempt == 0 else [self.slots.owner(slot) for slot in slots]
            for item, address in zip(waiting, owners):
                by_node.setdefault(address, []).append(item)
            nodes = list(by_node.items())
            answers = await asyncio.gather(*(self._publish(address, items) for address, items in nodes),
                                           return_exceptions=True)
            moved: list[tuple[int, str, bytes]] = []
            for (address, items), answer in zip(nodes, answers):
                if isinstance(answer, BaseException):
                    self.slots.stale = True  # a node down: perhaps failed over
                    error = error or answer
                    continue
                for item, one in zip(items, answer):
                    if isinstance(one, MovedError):
                        self.slots.patch(one)
                        moved.append(item)
                    elif isinstance(one, BaseException):
                        error = error or one
            if not moved:
                break
            if attempt == 1:
                error = error or ConnectionError(f"{len(moved)} message(s) redirected twice (MOVED): the cluster "
                                                 "is resharding")
                break
            # Sent again in the order given: a group's messages share a slot, so
            # all of them moved or none did.
            again = {id(item) for item in moved}
            waiting = [item for item in waiting if id(item) in again]
        if error is not None:
            raise error  # publish.py counts it; the subscribers repair by seq

    async def _publish(self, address: str, items: list[tuple[int, str, bytes]]) -> list:
        pipe = self.client(address).pipeline(transaction=False)
        for _, channel, payload in items:
            pipe.execute_command("SPUBLISH", channel, payload)
        return await pipe.execute(raise_on_error=False)

    # Health

    async def ping(self) -> None:
        """Every master answers and says cluster_state:ok (/readyz)."""
        if self.slots.stale or not self.slots.nodes:
            await self.refresh()

        async def ok(address: str) -> None:
            info = cluster_info(await self.client(address).execute_command("CLUSTER", "INFO"))
            if info.get("cluster_state") != "ok":
                raise ConnectionError(f"{address}: cluster_state:{info.get('cluster_state')}")

        await asyncio.gather(*(ok(address) for address in self.slots.nodes))

    async def probe(self) -> None:
        """At start-up: a node answers, is in cluster mode, says cluster_state:ok,
        and runs Redis 7 or later (sharded pub/sub)."""
        from redis import asyncio as aioredis

        unreachable = []
        for address in self.seeds:
            host, port = host_port(address)
            client = aioredis.Redis(host=host, port=port, socket_timeout=3, **{**self._options(),
                                                                               "socket_connect_timeout": 3})
            try:
                try:
                    info = cluster_info(await client.execute_command("CLUSTER", "INFO"))
                except AuthenticationError as exc:
                    raise BrokerError(f"{SETTING}: Redis at {address} refused the password ({exc})") from None
                except ResponseError as exc:
                    if "cluster support disabled" in str(exc).lower():
                        raise BrokerError(
                            f"{SETTING}: {self.shown()} names a Redis that is not a cluster node ({address} answered "
                            f"CLUSTER INFO with {exc!s}); redis+cluster:// needs Redis Cluster (cluster-enabled yes), "
                            f"use redis://{address}/0 for a plain Redis") from None
                    raise BrokerError(f"{SETTING}: Redis at {address} answered {exc}") from None
                except (OSError, RedisConnectionError, RedisTimeoutError) as exc:
                    unreachable.append(f"{address}: {describe(exc)}")
                    continue
                state = info.get("cluster_state")
                if state != "ok":
                    raise BrokerError(f"{SETTING}: the Redis Cluster at {self.shown()} is not ready: {address} says "
                                      f"cluster_state:{state} (every slot must be served)")
                server = await client.info("server")
                version = str(server.get("redis_version", "0"))
                if int(version.split(".")[0]) < 7:
                    raise BrokerError(f"{SETTING}: Redis {version} at {address} has no sharded pub/sub "
                                      "(SSUBSCRIBE/SPUBLISH): redis+cluster:// needs Redis 7 or later")
                self.slots.load(await client.execute_command("CLUSTER", "SLOTS"), address)
                return
            finally:
                await client.aclose()
        raise BrokerError(f"{SETTING}: cannot reach the Redis Cluster at {self.shown()}: {'; '.join(unreachable)}")
