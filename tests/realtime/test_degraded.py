"""Every row of the degraded-mode table (realtime/state/degraded.py), with Redis
down: each feature does what its row says, and counts it under its row exactly."""

from __future__ import annotations


import pytest
import redis.exceptions
from asgiref.sync import sync_to_async
from django.test import Client
from prometheus_client import REGISTRY

from realtime.domain import services
from realtime.models import Message
from realtime.state import degraded, heartbeat, presence, ratelimit
from realtime.state import leases as connections
from tests.conftest import call, communicator, socket, subscribe
from tests.services import RedisServer, free_port

pytestmark = [pytest.mark.asyncio, pytest.mark.django_db(transaction=True)]


def tolerated(row: str) -> float:
    return REGISTRY.get_sample_value("realtime_degraded_total", {"feature": row}) or 0.0


class Counts:
    """How many times each row was tolerated since the block began."""

    def __enter__(self):
        self.start = {row: tolerated(row) for row in degraded.ROWS}
        return self

    def __exit__(self, *exc):
        return False

    def moved(self) -> dict[str, float]:
        return {row: tolerated(row) - self.start[row] for row in degraded.ROWS if tolerated(row) != self.start[row]}


@pytest.fixture
def redis_gone(settings):
    """REDIS_URL and the cache point at a port where nothing listens (name it after
    the fixtures that write demo data, which use the cache)."""
    url = f"redis://127.0.0.1:{free_port()}/0"
    settings.REDIS_URL = url
    settings.CACHES = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": url}}
    ratelimit.reset()
    connections.leases.reset()
    presence.backend.reset()
    return url


async def test_rate_limits_handshakes_and_the_replay_budget_count_on_each_worker_alone(redis_gone, settings):
    """Not open while Redis is down: each worker keeps the same buckets in its own
    memory, so a flood is bounded by a bucket a worker."""
    limits = {**settings.REALTIME["RATE_LIMITS"], "message.send": (0.001, 16), "handshake.address": (0.001, 2)}
    settings.REALTIME = {**settings.REALTIME, "RATE_LIMITS": limits, "REPLAY_BUDGET": (1.0, 1000.0)}
    with Counts() as counts:
        # A socket's sends (from its worker's reserve, which cannot reach Redis) ...
        assert await ratelimit.take_up_to(1, "message.send", 20, reserve=True) == (16, 1000.0)
        refused = await ratelimit.take(1, "message.send")
        assert not refused.allowed and 999 < refused.retry_after <= 1000
        assert (await ratelimit.take(2, "message.send")).allowed  # another user's bucket
        # ... sockets opened from one address ...
        verdicts = [await ratelimit.take("198.51.100.1", "handshake.address") for _ in range(3)]
        assert [v.allowed for v in verdicts] == [True, True, False]
        # ... and replays: the first goes into debt, the next waits for it to be paid.
        assert (await ratelimit.replay_take(1, 3000)).allowed
        refused = await ratelimit.replay_take(1, 10)
        assert not refused.allowed and 1999 < refused.retry_after <= 2000
    assert counts.moved() == {degraded.RATE_LIMITS: 3, degraded.HANDSHAKE_LIMITS: 3, degraded.REPLAY_BUDGET: 2}


async def test_a_processs_own_buckets_drop_the_full_ones_past_their_bound():
    buckets = ratelimit.MemoryBuckets()
    buckets.PRUNE_AT = buckets.prune_at = 3
    await buckets.take("spent", 0.001, 5, 5)  # empty for a long time
    for n in range(3):
        await buckets.take(f"address:{n}", 1e9, 5, 1)  # full again at once
    assert set(buckets.buckets) == {"spent", "address:2"}
    assert (await buckets.take("spent", 0.001, 5, 1))[0] == 0  # still spent
    # Buckets still refilling stay, and the next prune waits for twice as many.
    for n in range(4):
        await buckets.take(f"slow:{n}", 0.001, 5, 1)
    # (slow:1's prune dropped address:2, full again; slow:3's found 4 all refilling,
    # kept them, and the next waits for 8)
    assert set(buckets.buckets) == {"spent", "slow:0", "slow:1", "slow:2", "slow:3"} and buckets.prune_at == 8


async def test_the_socket_cap_is_counted_by_each_worker_alone(redis_gone, settings):
    """Not open while Redis is down: the worker counts its own sockets, those it
    held before the outage from the first renewal that fails."""
    settings.REALTIME = {**settings.REALTIME, "MAX_CONNECTIONS_PER_USER": 2}
    with Counts() as counts:
        assert [await connections.acquire(1, c) for c in ("c1", "c2", "c3")] == [True, True, False]
        assert await connections.acquire(2, "d1") is True  # another user's count
        await connections.release(1, "c1")
        assert await connections.acquire(1, "c3") is True
        # Sockets held before the outage, found at the renewal that fails.
        with pytest.raises(redis.exceptions.ConnectionError):
            await connections.renew([(3, "e1"), (3, "e2")])
        assert await connections.acquire(3, "e3") is False
    assert counts.moved() == {degraded.LEASES: 7}  # six acquires and a release (renew: its caller's)


async def test_the_outages_own_count_lasts_a_lease_then_goes_once_redis_counts_again(redis_server, settings,
                                                                                     monkeypatch):
    """A Redis that comes back and goes again within LEASE_TTL finds the outage's
    sockets still counted; once they are older than that, a renewal that reaches
    Redis drops them."""
    now = [1000.0]
    monkeypatch.setattr(connections, "local_clock", lambda: now[0])
    settings.REDIS_URL = redis_server.url
    connections.leases.reset()
    leases = connections.leases()
    await leases.local.acquire(1, "c1", 5)  # (left from an outage)
    await connections.renew([(1, "c1")])
    assert await leases.local.count(1) == 1 and await leases.count(1) == 1
    now[0] += connections.LEASE_TTL + 1
    await connections.renew([(1, "c1")])
    assert leases.local.leases == {}
    assert await leases.count(1) == 1  # (Redis's own lease, renewed)


async def test_a_socket_closed_while_a_renewal_waits_is_not_counted_again(redis_gone, settings, monkeypatch):
    """The renewal's list was taken before Redis failed to answer: a socket closed
    meanwhile is not brought back into the worker's own count."""
    import asyncio

    from realtime.state import store

    settings.REALTIME = {**settings.REALTIME, "MAX_CONNECTIONS_PER_USER": 2}
    waiting, fail = asyncio.Event(), asyncio.Event()

    async def slow_failure(*args, **kwargs):
        waiting.set()
        await fail.wait()
        raise ConnectionError("Redis timed out")

    monkeypatch.setattr(store, "renew_scores", slow_failure)
    renewal = asyncio.ensure_future(connections.renew([(1, "a"), (1, "b")]))
    await waiting.wait()
    await connections.release(1, "a")  # closed while the renewal waits
    fail.set()
    with pytest.raises(ConnectionError):
        await renewal
    assert await connections.leases().local.count(1) == 1
    assert await connections.acquire(1, "c") is True  # "b" and "c": the cap, not "a" as well
    assert await connections.acquire(1, "d") is False


async def test_sign_in_counters_are_kept_by_each_worker_alone(demo, redis_gone, settings, monkeypatch):
    from accounts import throttle

    monkeypatch.setattr(throttle, "local_counters", throttle.LocalCounters())
    settings.LOGIN_RATE_LIMIT = "2/d"
    guess = sync_to_async(Client().post)  # (a browser of its own: not signed in by the first)
    with Counts() as counts:
        res = await sync_to_async(Client().post)("/accounts/login/", {"username": "alice", "password": "demo-password"})
        assert res.status_code == 302
        # Read before the password is checked: per address and per account (no device cookie).
        assert counts.moved() == {degraded.SIGN_IN_COUNTERS: 2}
        wrong = [(await guess("/accounts/login/", {"username": f"nobody{n}", "password": "x"})).status_code
                 for n in range(3)]
    assert wrong == [200, 200, 429]


async def test_a_new_socket_is_closed_with_4013_while_its_user_group_cannot_be_joined(cookies, redis_gone):
    comm = communicator(cookies["bob"])
    with Counts() as counts:
        connected, _ = await comm.connect(timeout=5)
        assert connected
        assert (await comm.receive_output(timeout=5))["code"] == 4013
    await comm.disconnect()
    assert counts.moved()[degraded.NEW_SOCKETS] == 1


async def test_presence_and_pushes_are_skipped(redis_gone):
    with Counts() as counts:
        await presence.join("general", 1, "alice", "c1")
        assert (await presence.page("general")).users == []
        await presence.leave("general", 1, "alice", "c1")
        assert await presence.typing_allowed("general", 1) is False
    assert counts.moved() == {degraded.PRESENCE: 3, degraded.PUSH: 1}


async def test_the_heartbeat_skips_a_beat(redis_gone):
    with Counts() as counts:
        await heartbeat.beat()
    assert counts.moved() == {degraded.HEARTBEAT: 1}


async def test_a_long_poll_reads_the_log_instead_of_waiting_on_the_fan_out(demo, redis_gone):
    from realtime.web.longpoll import wait_for_events

    await sync_to_async(services.perform_sync)(services.message_send, user=demo["alice"], slug="general", body="x",
                                               client_id="lp")
    with Counts() as counts:
        page = await wait_for_events(demo["bob"], "general", since=0, wait=1, limit=10)
    assert [e["seq"] for e in page["events"]] == [1]
    assert counts.moved()[degraded.LONG_POLL] == 1


async def test_tickets_answer_503_while_their_store_is_down(demo, redis_gone):
    client = Client()
    await sync_to_async(client.force_login)(demo["bob"])
    with Counts() as counts:
        res = await sync_to_async(client.post)("/api/v1/tickets/")
    assert res.status_code == 503 and res["Retry-After"] == "5"
    assert counts.moved() == {degraded.RATE_LIMITS: 1, degraded.TICKETS: 1}
    comm = communicator(None, path="/ws/v1/?ticket=" + "t" * 43)
    with Counts() as counts:
        connected, _ = await comm.connect(timeout=5)
        assert (await comm.receive_output(timeout=5))["code"] == 4013
    await comm.disconnect()
    assert counts.moved()[degraded.TICKETS] == 1


async def test_a_control_message_lost_is_counted(demo, redis_gone):
    from realtime.delivery import publish

    with Counts() as counts:
        await sync_to_async(publish.session_check_on_commit)(demo["bob"].pk)
    assert counts.moved() == {degraded.CONTROL: 1}


async def test_the_fan_out_rides_out_an_outage_and_loses_nothing(settings, tmp_path, cookies, demo):
    """Sockets stay open while Redis is down; what is written meanwhile (its
    publication fails: PUBLISH) reaches them, in order and once, when it is back."""
    redis = RedisServer(tmp_path).start()
    settings.REDIS_URL = redis.url
    ratelimit.reset()
    try:
        async with socket(cookies["bob"]) as bob:
            await subscribe(bob, "general")
            with Counts() as counts:
                redis.stop()
                for i in range(3):
                    await sync_to_async(services.perform_sync)(
                        services.message_send, user=demo["alice"], slug="general", body=f"while down {i}",
                        client_id=f"down{i}")
                redis.start()
                got = []
                while len(got) < 3:
                    frame = await bob.receive_json_from(timeout=15)
                    if frame["type"] == "message.new":
                        got.append(frame["seq"])
            assert got == [1, 2, 3]
            moved = counts.moved()
            assert moved[degraded.PUBLISH] == 3 and moved[degraded.FANOUT] >= 1
            assert await call(bob, {"type": "ping", "ref": 1}) == {"type": "pong", "ref": 1}
    finally:
        redis.stop()
    assert await Message.objects.acount() == 3


async def test_every_row_is_in_the_table_and_tested():
    """The table (the module's doc) and the rows agree, and each row has a test here."""
    import inspect

    table = degraded.__doc__
    source = inspect.getsource(inspect.getmodule(test_every_row_is_in_the_table_and_tested))
    for row in degraded.ROWS:
        name = next(k for k, v in vars(degraded).items() if v == row and k.isupper())
        assert f"| {name} |" in table, name
        assert f"degraded.{name}" in source, f"no test names the row {name}"
