"""The NATS and RabbitMQ engines beyond the contract suite: their subjects and
routing keys, a receiver riding out a broker restart (the failure counted, the
sockets told to catch up only once subscribed again), and a broker that cannot
be used stopping start-up with a message that names REALTIME_BROKER_URL and never
the password. Each against a private server (deploy/brokers/)."""

from __future__ import annotations

import asyncio
import secrets
import shutil
import subprocess
import time

import pytest

from deploy.cluster import ROOT, free_port, stop_process, wait_port
from realtime.delivery.transport import SETTING, BrokerError
from tests.conftest import missing
from tests.services import AppServer

pytestmark = pytest.mark.cluster

PLAIN_GROUPS = ["room.general", "user.42", "realtime.workers", "room.a-b_c"]
ODD_GROUPS = ["a..b", ".a", "a.", "x*y", "x>y", "x#y", "a b", "*", ">", "#", "%", "a.*.b", "room." + "." * 98]


@pytest.fixture(scope="module")
def rabbit(tmp_path_factory):
    from deploy.brokers.amqp import RabbitServer

    try:
        server = RabbitServer(tmp_path_factory.mktemp("rabbit")).start()
    except FileNotFoundError as exc:
        missing(str(exc))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def nats_server(tmp_path_factory):
    from deploy.brokers.nats import NatsServer

    try:
        server = NatsServer(tmp_path_factory.mktemp("nats")).start()
    except FileNotFoundError as exc:
        missing(str(exc))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def nats_with_password():
    """A nats-server that wants user `rt` and a password: (port, password)."""
    binary = shutil.which("nats-server")
    if binary is None:
        missing("nats-server is not installed (Debian: apt-get install nats-server)")
    port, password = free_port(), secrets.token_hex(8)
    proc = subprocess.Popen([binary, "-a", "127.0.0.1", "-p", str(port), "--user", "rt", "--pass", password],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, proc=proc)
        yield port, password
    finally:
        stop_process(proc)


def probe_error(engine) -> str:
    with pytest.raises(BrokerError) as caught:
        asyncio.run(engine.probe())
    return str(caught.value)


# -- names ------------------------------------------------------------------


def test_a_nats_subject_has_no_empty_token_or_wildcard_and_no_two_groups_share_one():
    from realtime.delivery.engines.nats import subject

    assert subject("room.general") == "rt.fan.room.general"
    subjects = [subject(g) for g in PLAIN_GROUPS + ODD_GROUPS]
    assert len(set(subjects)) == len(subjects)
    for one in subjects:
        tokens = one.split(".")
        assert all(tokens) and not {"*", ">"} & set(tokens) and " " not in one, one


def test_an_amqp_routing_key_has_no_empty_word_or_wildcard_and_no_two_groups_share_one():
    from realtime.delivery.engines.amqp import routing_key

    assert routing_key("room.general") == "room.general"
    keys = [routing_key(g) for g in PLAIN_GROUPS + ODD_GROUPS]
    assert len(set(keys)) == len(keys)
    for one in keys:
        words = one.split(".")
        assert all(words) and not {"*", "#"} & set(words) and len(one.encode()) <= 255, one
        assert "*" not in one and "#" not in one


# -- a receiver across a broker restart ---------------------------------------


class FakeFan:
    """What an engine's receiver uses of delivery/fanout.Fanout, recorded."""

    def __init__(self) -> None:
        self.groups: dict[str, set] = {}
        self.got: list[dict] = []
        self.failures = 0
        self.recoveries = 0

    async def dispatch(self, message: dict) -> None:
        self.got.append(message)

    def recovered(self) -> None:
        self.recoveries += 1

    async def failed(self, exc, delay: float) -> float:
        self.failures += 1
        await asyncio.sleep(delay)
        return min(delay * 2, 2.0)


async def until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def crosses_a_restart(engine, server) -> FakeFan:
    """Join two groups, send, restart the broker, send again: every message of a
    group arrives in order, the loss is counted and the fan-out told to recover
    once, after subscribing again (a message sent then arrives)."""
    fan = FakeFan()
    receiver = engine.receiver(fan)
    for group in ("room.general", "user.7"):
        fan.groups[group] = {object()}
        await receiver.join(group)
    await engine.send(engine.pack([("room.general", {"seq": i}) for i in range(1, 51)] + [("user.7", {"k": 1})]))
    await until(lambda: len(fan.got) == 51)
    assert [m["seq"] for m in fan.got if "seq" in m] == list(range(1, 51))
    assert fan.failures == 0 and fan.recoveries == 0

    await asyncio.to_thread(server.restart)
    await until(lambda: fan.recoveries >= 1, timeout=60)
    assert fan.failures >= 1
    fan.got.clear()
    await engine.send(engine.pack([("room.general", {"seq": 51}), ("user.7", {"k": 2}), ("room.other", {"k": 3})]))
    await until(lambda: len(fan.got) == 2)
    assert fan.got == [{"seq": 51}, {"k": 2}]  # room.other: nobody joined it
    return fan


@pytest.mark.asyncio
async def test_a_nats_receiver_rides_out_a_broker_restart(nats_server):
    from realtime.delivery.engines.nats import NatsEngine

    await crosses_a_restart(NatsEngine(nats_server.url), nats_server)


@pytest.mark.asyncio
@pytest.mark.timeout(300)
async def test_an_amqp_receiver_rides_out_a_broker_restart(rabbit):
    from realtime.delivery.engines.amqp import AmqpEngine

    await crosses_a_restart(AmqpEngine(rabbit.url), rabbit)


# -- a broker that cannot be used -------------------------------------------


def test_amqp_probe_with_a_wrong_password_names_the_setting_not_the_password(rabbit):
    from realtime.delivery.engines.amqp import AmqpEngine

    password = f"wrong-{secrets.token_hex(6)}"
    text = probe_error(AmqpEngine(f"amqp://guest:{password}@127.0.0.1:{rabbit.port}/"))
    assert SETTING in text and "password" in text, text
    assert password not in text, text


def test_nats_probe_with_a_wrong_password_names_the_setting_not_the_password(nats_with_password):
    from realtime.delivery.engines.nats import NatsEngine

    port, _ = nats_with_password
    password = f"wrong-{secrets.token_hex(6)}"
    text = probe_error(NatsEngine(f"nats://rt:{password}@127.0.0.1:{port}"))
    assert SETTING in text and "credentials" in text, text
    assert password not in text, text


@pytest.mark.parametrize("scheme", ["nats", "amqp"])
def test_probe_of_an_unreachable_port_names_the_setting_not_the_password(scheme):
    from realtime.delivery.transport import engine_class

    password = f"pw-{secrets.token_hex(6)}"
    url = f"{scheme}://someone:{password}@127.0.0.1:{free_port()}" + ("/" if scheme == "amqp" else "")
    text = probe_error(engine_class(url)(url))
    assert SETTING in text and f"127.0.0.1:{url.rsplit(':', 1)[1].rstrip('/')}" in text, text
    assert password not in text, text


@pytest.mark.parametrize("kind", ["nats-unreachable", "amqp-wrong-password"])
def test_a_worker_with_a_broker_it_cannot_use_exits_2_naming_the_setting(kind, tmp_path, request):
    password = f"secret-{secrets.token_hex(6)}"
    if kind == "nats-unreachable":
        url = f"nats://rt:{password}@127.0.0.1:{free_port()}"
    else:
        rabbit = request.getfixturevalue("rabbit")
        url = f"amqp://guest:{password}@127.0.0.1:{rabbit.port}/"
    worker = AppServer(tmp_path, env={SETTING: url})
    done = subprocess.run(worker.command(), cwd=ROOT, env=worker.env, capture_output=True, text=True, timeout=90)
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert f"realtime.server: {SETTING}" in done.stderr, done.stderr[-2000:]
    assert password not in done.stderr + done.stdout
