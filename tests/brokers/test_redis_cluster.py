"""The redis-cluster engine (realtime/delivery/engines/redis_cluster.py) where the
contract suite does not reach: a URL that names a plain Redis stops the worker
with a message naming the setting; a room's slot moving to another master while a
worker follows it (the worker subscribes on the new owner, its sockets catch up,
and what is published after arrives, also from a publisher whose map is out of
date); a subscriber connection killed, or silent, is found and replaced."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path

import pytest
import redis
from redis.crc import key_slot

from deploy.brokers.redis_cluster import RedisClusterServer
from realtime.delivery import names, publish, transport
from realtime.delivery.engines import redis_cluster as cluster_engine
from realtime.delivery.engines.redis_cluster import RedisClusterEngine
from realtime.delivery.fanout import Fanout
from realtime.observability import metrics
from tests.conftest import missing, until
from tests.services import AppServer, free_port

pytestmark = [pytest.mark.asyncio]

GROUP = "room.general"
CHANNEL = names.fan_channel(GROUP)


@pytest.fixture(scope="module")
def redis_cluster():
    workdir = Path(tempfile.mkdtemp(prefix="realtime-rcluster-"))
    try:
        server = RedisClusterServer(workdir).start()
    except FileNotFoundError as exc:
        missing(str(exc))
    yield server
    server.stop()
    shutil.rmtree(workdir, ignore_errors=True)


def sync_client(port: int) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)


def owner_port(server: RedisClusterServer, slot: int) -> int:
    with sync_client(server.nodes[0].port) as client:
        for first, last, master, *_ in client.execute_command("CLUSTER", "SLOTS"):
            if first <= slot <= last:
                return int(master[1])
    raise AssertionError(f"slot {slot} has no owner")


def move_slot(server: RedisClusterServer, slot: int, to_port: int) -> None:
    """CLUSTER SETSLOT IMPORTING/MIGRATING, then NODE on every master: the slot
    (no keys in it: pub/sub only) goes to `to_port`, as `redis-cli --cluster
    reshard` moves it."""
    from_port = owner_port(server, slot)
    ids = {}
    for node in server.nodes:
        with sync_client(node.port) as client:
            ids[node.port] = client.execute_command("CLUSTER", "MYID").decode()
    with sync_client(to_port) as target, sync_client(from_port) as source:
        target.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", ids[from_port])
        source.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", ids[to_port])
        assert source.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 10) == []
        target.execute_command("CLUSTER", "SETSLOT", slot, "NODE", ids[to_port])
        source.execute_command("CLUSTER", "SETSLOT", slot, "NODE", ids[to_port])
    for node in server.nodes:
        if node.port not in (from_port, to_port):
            with sync_client(node.port) as client:
                client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", ids[to_port])


class Socket:
    """A local consumer of the fan-out: everything lands in its queue."""

    def __init__(self) -> None:
        self.local_queue: asyncio.Queue = asyncio.Queue()
        self.seen: list[dict] = []

    async def deliver(self, message: dict) -> bool:
        return False

    async def next(self, type_: str, timeout: float = 10) -> dict:
        while True:
            message = await asyncio.wait_for(self.local_queue.get(), timeout)
            self.seen.append(message)
            if message["type"] == type_:
                return message


@pytest.fixture
def following(redis_cluster, settings):
    """The real fan-out on the redis-cluster engine (REALTIME_BROKER_URL)."""
    settings.REALTIME_BROKER_URL = redis_cluster.url
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    return redis_cluster


def failures() -> float:
    return metrics.BROKER_FAILURES.labels("redis-cluster")._value.get()


async def push(text: str) -> None:
    """An ephemeral message: only the broker brings it back (no dispatch_own)."""
    await publish.send_group(GROUP, {"type": names.PUSH, "room": None, "text": text})


async def next_push(socket: Socket, text: str, timeout: float = 10) -> dict:
    while True:
        message = await socket.next(names.PUSH, timeout)
        if message.get("text") == text:
            return message


def holder(fan: Fanout) -> str:
    link = fan.transport.holding(CHANNEL)
    return link.address if link is not None else ""


# Start-up


async def test_probe_of_a_plain_redis_names_the_setting_and_cluster(redis_server):
    engine = RedisClusterEngine(f"redis+cluster://127.0.0.1:{redis_server.port}")
    with pytest.raises(transport.BrokerError) as raised:
        await engine.probe()
    assert transport.SETTING in str(raised.value)
    assert "cluster" in str(raised.value).lower()


async def test_probe_of_nothing_listening_is_a_broker_error():
    engine = RedisClusterEngine(f"redis+cluster://127.0.0.1:{free_port()}")
    with pytest.raises(transport.BrokerError) as raised:
        await engine.probe()
    assert transport.SETTING in str(raised.value)


async def test_probe_of_a_cluster_passes_and_reads_the_map(redis_cluster):
    engine = RedisClusterEngine(redis_cluster.url)
    await engine.probe()
    assert sorted(engine.slots.nodes) == sorted(node.address for node in redis_cluster.nodes)
    await engine.ping()


@pytest.mark.filterwarnings("ignore:The test <Function")
def test_a_worker_pointed_at_a_plain_redis_exits_naming_the_setting(redis_server):
    workdir = Path(tempfile.mkdtemp(prefix="realtime-rcluster-worker-"))
    worker = AppServer(workdir, env={"REDIS_URL": redis_server.url,
                                     "REALTIME_BROKER_URL": f"redis+cluster://127.0.0.1:{redis_server.port}"})
    try:
        with pytest.raises(RuntimeError):
            worker.start()  # exits before it listens
        assert worker.proc.wait(30) == 2
        said = worker.log.read_text()
    finally:
        worker.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    assert transport.SETTING in said and "cluster" in said.lower(), said


# Following a room


async def test_a_slot_moved_while_a_worker_follows_it(following):
    server = following
    slot = key_slot(CHANNEL.encode())
    before = owner_port(server, slot)
    target = next(node.port for node in server.nodes if node.port != before)
    fan = Fanout()
    socket = Socket()
    # A publisher of its own whose slot map is read before the move: its first
    # send after it is answered MOVED, and retried on the new owner.
    stale = RedisClusterEngine(server.url)
    await stale.refresh()
    try:
        await fan.add(GROUP, socket)
        assert holder(fan) == f"127.0.0.1:{before}"
        await push("before")
        await next_push(socket, "before")

        await asyncio.to_thread(move_slot, server, slot, target)
        await socket.next(names.LAYER_RECOVERED)
        assert holder(fan) == f"127.0.0.1:{target}"
        await push("after")
        await next_push(socket, "after")

        assert stale.slots.owner(slot) == f"127.0.0.1:{before}"
        await stale.send(stale.pack([(GROUP, {"type": names.PUSH, "group": GROUP, "room": None, "text": "stale"})]))
        await next_push(socket, "stale")
        assert stale.slots.owner(slot) == f"127.0.0.1:{target}"
    finally:
        await fan.discard(GROUP, socket)
        await asyncio.to_thread(move_slot, server, slot, before)
        await asyncio.to_thread(server.wait_ok)


async def test_a_subscriber_connection_killed_is_replaced(following):
    server = following
    owner = owner_port(server, key_slot(CHANNEL.encode()))
    fan = Fanout()
    socket = Socket()
    try:
        await fan.add(GROUP, socket)
        counted = failures()
        with sync_client(owner) as client:
            assert client.execute_command("CLIENT", "KILL", "TYPE", "pubsub") >= 1
        await socket.next(names.LAYER_RECOVERED)
        assert failures() > counted
        assert holder(fan) == f"127.0.0.1:{owner}"
        await push("after a kill")
        await next_push(socket, "after a kill")
    finally:
        await fan.discard(GROUP, socket)


async def test_a_silent_subscriber_connection_is_found_by_ping(following, monkeypatch):
    """The node stops answering (CLIENT PAUSE) without closing anything: no PONG
    within PONG_WITHIN is a failure; once it answers again the worker is
    subscribed anew and its sockets catch up."""
    monkeypatch.setattr(cluster_engine, "PING_EVERY", 0.2)
    monkeypatch.setattr(cluster_engine, "PONG_WITHIN", 0.5)
    server = following
    owner = owner_port(server, key_slot(CHANNEL.encode()))
    fan = Fanout()
    socket = Socket()
    try:
        await fan.add(GROUP, socket)
        counted = failures()
        with sync_client(owner) as client:
            client.execute_command("CLIENT", "PAUSE", 2000, "ALL")
        await until(lambda: failures() > counted, timeout=10, what="a failure counted for the silent connection")
        await socket.next(names.LAYER_RECOVERED, timeout=20)
        await push("after a pause")
        await next_push(socket, "after a pause")
    finally:
        await fan.discard(GROUP, socket)
        with sync_client(owner) as client:
            client.execute_command("CLIENT", "UNPAUSE")


# The shared state (REDIS_URL) on a Redis Cluster


def scripts_in_state() -> dict[str, str]:
    """Every Lua script realtime/state/ defines: name -> source (not the pieces
    scripts are made of, such as ratelimit._REFILL)."""
    import importlib
    import pkgutil

    import realtime.state

    found = {}
    for module in pkgutil.iter_modules(realtime.state.__path__):
        loaded = importlib.import_module(f"realtime.state.{module.name}")
        for name, value in vars(loaded).items():
            if isinstance(value, str) and "redis.call(" in value:
                found[f"{module.name}.{name}"] = value
    return {name: source for name, source in found.items()
            if not any(source in other and source != other for other in found.values())}


async def test_every_script_and_multi_key_read_keeps_its_keys_in_one_slot(redis_server, settings, monkeypatch):
    """Each script realtime/state/ runs, and the one multi-key read (the cluster
    view's MGET), called with names that hash apart: the keys of each call share
    one hash slot (a hash tag), as a Redis Cluster requires."""
    from redis.asyncio import Redis

    from realtime.state import heartbeat, leases, presence, ratelimit, store

    settings.REDIS_URL = redis_server.url
    ratelimit.reset()
    leases.leases.reset()
    presence.backend.reset()
    calls: list[tuple] = []
    execute = store.Batched.execute_command
    mget = Redis.mget

    async def recorded_execute(self, *args):
        calls.append(args)
        return await execute(self, *args)

    def recorded_mget(self, keys, *args):
        calls.append(("MGET", *keys, *args))
        return mget(self, keys, *args)

    monkeypatch.setattr(store.Batched, "execute_command", recorded_execute)
    monkeypatch.setattr(Redis, "mget", recorded_mget)

    for user in (1, 2, 77):
        await leases.acquire(user, f"conn-{user}")
        await ratelimit.take(user, "message.send")
        await ratelimit.take_up_to(user, "message.send", 1, reserve=True)  # a reserve's take
        await ratelimit.buckets().settle(f"message.send:{user}", 10, 30, "holder:0", 0, "holder:1", 3)
        await ratelimit.replay_take(user, 100)
    await ratelimit.take("10.0.0.1", "handshake.address")
    backend = presence.RedisPresence(redis_server.url)
    for room in ("general", "random", "dm-1-2"):
        await backend.join(room, "alice:1:conn-1", "alice:1")
        await backend.leave(room, "alice:1:conn-1", "alice:1")
        await backend.reconcile(room)
        await backend.told(room, ["alice:1", "bob:2"])
    for worker in ("a", "b", "c", "worker-17"):
        settings.REALTIME_WORKER_ID = worker
        await heartbeat.publish_once()
    assert len(await heartbeat.view()) >= 4

    ran = set()
    multi_key = 0
    for args in calls:
        command = args[0].upper()
        if command == "EVAL":
            keys = args[3:3 + int(args[2])]
            ran.add(args[1])
        elif command == "MGET":
            keys = args[1:]
        else:
            continue
        multi_key += len(keys) > 1
        slots = {key_slot(key.encode()) for key in keys}
        assert len(slots) == 1, (command, keys, slots)
    assert multi_key >= 10
    assert ran == set(scripts_in_state().values()), sorted(
        name for name, source in scripts_in_state().items() if source not in ran)
