"""Token buckets per user and action, on the socket and over HTTP."""

from __future__ import annotations

import asyncio
import time

import pytest
from django.test import Client

from realtime.state import ratelimit, store
from realtime.models import Message
from tests.conftest import call, socket, until

pytestmark = [pytest.mark.django_db(transaction=True)]


@pytest.fixture
def tight(settings):
    settings.REALTIME = {
        **settings.REALTIME,
        "RATE_LIMITS": {**settings.REALTIME["RATE_LIMITS"], "message.send": (1, 3)},
        "FLOOD_CLOSE_AFTER": 5,
    }


def send(i, ref=None):
    return {"type": "message.send", "room": "general", "body": f"m{i}", "client_id": f"f{i}", "ref": ref or i}


@pytest.mark.asyncio
async def test_a_flood_is_refused_with_retry_after_and_stores_nothing(cookies, tight):
    async with socket(cookies["bob"]) as bob, socket(cookies["alice"]) as alice:
        for i in range(3):
            assert (await call(bob, send(i)))["type"] == "ack"
        refused = await call(bob, send(3))
        assert (refused["type"], refused["code"], refused["ref"]) == ("error", "rate_limited", 3)
        assert 0 < refused["retry_after"] <= 1
        # Another user's bucket is their own.
        assert (await call(alice, send(100)))["type"] == "ack"
    assert await Message.objects.filter(author__username="bob").acount() == 3


@pytest.mark.asyncio
async def test_a_client_that_keeps_flooding_is_closed_with_4029(cookies, tight):
    async with socket(cookies["bob"]) as bob:
        for i in range(3):
            await call(bob, send(i))
        for i in range(3, 8):
            assert (await call(bob, send(i)))["code"] == "rate_limited"
        await bob.send_json_to(send(9))
        assert await bob.receive_output(timeout=2) == {"type": "websocket.close", "code": 4029}


@pytest.mark.asyncio
async def test_a_stream_of_bad_frames_is_rate_limited_then_closed(cookies, settings):
    settings.REALTIME = {
        **settings.REALTIME,
        "RATE_LIMITS": {**settings.REALTIME["RATE_LIMITS"], "invalid": (1, 2)},
        "FLOOD_CLOSE_AFTER": 3,
    }
    async with socket(cookies["bob"]) as bob:
        codes = []
        for _ in range(5):
            await bob.send_to(text_data="{not json")
            codes.append((await bob.receive_json_from(timeout=2))["code"])
        assert codes == ["invalid", "invalid", "rate_limited", "rate_limited", "rate_limited"]
        await bob.send_to(text_data="{not json")
        assert await bob.receive_output(timeout=2) == {"type": "websocket.close", "code": 4029}


@pytest.mark.asyncio
async def test_pings_are_counted_per_user_by_the_worker_with_no_round_trip(cookies, demo, settings, redis_server):
    """A ping's bucket is its user's in this worker's memory (ratelimit.WORKER_LOCAL):
    a user's second socket shares it, another user's is untouched, and Redis is
    never asked (no bucket of pings in it, even with REDIS_URL set)."""
    settings.REDIS_URL = redis_server.url
    settings.REALTIME = {**settings.REALTIME, "FLOOD_CLOSE_AFTER": 10,
                         "RATE_LIMITS": {**settings.REALTIME["RATE_LIMITS"], "ping": (1e-6, 3)}}
    ratelimit.reset()
    async with socket(cookies["bob"]) as first, socket(cookies["bob"]) as second, socket(cookies["alice"]) as alice:
        replies = [await call(first, {"type": "ping", "ref": i}) for i in range(3)]
        assert [r["type"] for r in replies] == ["pong"] * 3
        refused = await call(second, {"type": "ping", "ref": 3})  # the same user: the same bucket
        assert (refused["type"], refused["code"], refused["ref"]) == ("error", "rate_limited", 3)
        assert refused["retry_after"] > 0
        assert (await call(alice, {"type": "ping", "ref": 9}))["type"] == "pong"
        assert sorted(ratelimit.buckets().local.buckets) == [f"ping:{demo['alice'].pk}", f"ping:{demo['bob'].pk}"]
        assert [k for k in await store.client(redis_server.url).keys("rl:*") if b"ping" in k] == []


@pytest.mark.asyncio
async def test_buckets_are_shared_by_workers_through_redis(redis_server):
    worker_a = ratelimit.RedisBuckets(redis_server.url)
    worker_b = ratelimit.RedisBuckets(redis_server.url)
    grants = [(await w.take("message.send:42", 1, 4, 1))[0] for w in (worker_a, worker_b, worker_a, worker_b)]
    assert grants == [1, 1, 1, 1]
    granted, tokens = await worker_b.take("message.send:42", 1, 4, 1)
    assert granted == 0 and 0 <= tokens < 1
    assert (await worker_a.take("message.send:43", 1, 4, 1))[0] == 1


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", ["redis", "memory"])
async def test_a_batch_gets_what_the_bucket_holds_in_one_call(kind, redis_server):
    buckets = ratelimit.RedisBuckets(redis_server.url) if kind == "redis" else ratelimit.MemoryBuckets()
    assert (await buckets.take("message.send:7", 1, 5, 3))[0] == 3
    granted, tokens = await buckets.take("message.send:7", 1, 5, 4)
    assert granted == 2 and 0 <= tokens < 1  # two left of five; the other two are refused
    assert (await buckets.take("message.send:7", 1, 5, 1))[0] == 0


def test_rest_posting_shares_the_message_send_bucket(demo, tight):
    client = Client()
    client.force_login(demo["bob"])
    codes = [
        client.post("/api/v1/rooms/general/messages/", {"body": "x", "client_id": f"r{i}"}, content_type="application/json")
        for i in range(4)
    ]
    assert [r.status_code for r in codes] == [200, 200, 200, 429]
    assert codes[-1].json()["code"] == "rate_limited" and int(codes[-1]["Retry-After"]) >= 1
    assert Message.objects.count() == 3


@pytest.fixture
def trips(monkeypatch) -> list[list[tuple]]:
    """The commands of every round trip state/store.Batched made during the test,
    in order, as sent (EVAL or EVALSHA for a script)."""
    made: list[list[tuple]] = []
    real = store.Batched._round_trip

    async def recorded(self, commands):
        made.append(list(commands))
        return await real(self, commands)

    monkeypatch.setattr(store.Batched, "_round_trip", recorded)
    return made


def sizes(trips: list[list[tuple]]) -> list[int]:
    return [len(commands) for commands in trips]


def names(trips: list[list[tuple]]) -> list[str]:
    return [args[0] for commands in trips for args in commands]


@pytest.mark.asyncio
async def test_redis_commands_waiting_together_go_in_one_round_trip(redis_server, trips):
    """state/store.Batched: each caller its own answer or error, the waiting ones
    sent as one pipeline (the limits, leases and presence of a storm's handshakes)."""
    from redis.exceptions import ResponseError

    from realtime.state import store

    batched = store.batched(redis_server.url)
    calls = [batched.execute_command("SET", f"batched:{i}", i) for i in range(5)]
    calls.append(batched.eval("return redis.call('INCRBY', KEYS[1], ARGV[1])", 1, "batched:2", 40))
    calls.append(batched.execute_command("INCR", "batched:nothing-but", "too-many-args"))
    *sets, added, wrong = await asyncio.gather(*calls, return_exceptions=True)
    assert sets == [True] * 5
    assert added == 42
    assert isinstance(wrong, ResponseError)  # its own error, no one else's
    assert sizes(trips) == [7]  # one round trip for the seven
    assert await batched.execute_command("GET", "batched:2") == b"42"
    assert sizes(trips) == [7, 1]  # alone: sent at once, alone


@pytest.mark.asyncio
async def test_a_script_goes_by_its_sha1_once_redis_has_it_and_by_its_text_again_after_a_flush(redis_server, trips):
    """Batched.eval sends a script's text once, then its SHA1 (EVALSHA); a Redis
    that forgot it (SCRIPT FLUSH, a restart) answers NOSCRIPT, and the command goes
    again with its text: its caller gets the script's answer, run once."""
    batched = store.batched(redis_server.url)
    script = "return redis.call('INCR', KEYS[1])"
    assert await batched.eval(script, 1, "scripted") == 1
    assert await batched.eval(script, 1, "scripted") == 2
    assert names(trips) == ["EVAL", "EVALSHA"]
    assert await store.client(redis_server.url).script_flush() is True
    trips.clear()
    assert await asyncio.gather(batched.eval(script, 1, "scripted"), batched.eval(script, 1, "scripted")) in ([3, 4], [4, 3])
    assert names(trips) == ["EVALSHA", "EVALSHA", "EVAL", "EVAL"]  # one trip by SHA1, then one with the text
    assert await batched.execute_command("GET", "scripted") == b"4"


@pytest.mark.asyncio
async def test_a_scripts_sha1_is_of_the_bytes_the_urls_encoding_sends(redis_server, trips):
    """A URL with another encoding (latin-1) sends a script's text in it: its
    SHA1 is taken of those bytes, so the second call goes by SHA1 and is found."""
    batched = store.batched(f"{redis_server.url}?encoding=latin-1")
    script = "return 7 -- café"
    assert [await batched.eval(script, 0), await batched.eval(script, 0)] == [7, 7]
    assert names(trips) == ["EVAL", "EVALSHA"]


@pytest.mark.asyncio
async def test_a_round_trip_with_no_answer_in_time_fails_its_commands_and_drops_its_connection(redis_server, monkeypatch):
    """A Redis that does not answer (here: paused by CLIENT PAUSE) fails every
    command of the trip with redis' TimeoutError after store.TIMEOUT; the
    connection, whose answers may still come, is closed."""
    from redis.exceptions import TimeoutError as RedisTimeout

    monkeypatch.setattr(store, "TIMEOUT", 0.2)
    monkeypatch.setattr(store, "QUIET", 0.3)
    batched = store.batched(redis_server.url)
    assert await batched.execute_command("SET", "paused", 1) is True
    pool = store.client(redis_server.url, batches=True).connection_pool
    (first,) = pool._available_connections
    assert await store.client(redis_server.url).client_pause(600, all=False) is True  # writes wait
    done = await asyncio.gather(batched.execute_command("INCR", "paused"), batched.execute_command("INCR", "paused"),
                                return_exceptions=True)
    assert [type(d) for d in done] == [RedisTimeout, RedisTimeout]
    assert not first.is_connected
    await asyncio.sleep(0.6)
    # A fresh connection; the paused one's INCRs went with it, never run.
    assert await batched.execute_command("GET", "paused") == b"1"


@pytest.mark.asyncio
async def test_a_redis_that_gave_no_answer_twice_is_not_asked_again_for_a_while(redis_server, monkeypatch):
    """The second command with no answer within store.TIMEOUT (less than QUIET
    after the first) makes that Redis quiet: for store.QUIET seconds every command
    to it, through the shared client or Batched, fails at once with
    store.Unanswered (a ConnectionError: the callers' degraded path), not each after
    TIMEOUT (a socket's frames, handled in turn, each waited for theirs: in a first
    real use a message was acknowledged 14 s late with Redis paused). Then it is
    asked again. One timeout alone quiets nothing; a connection the server dropped
    is made again, unseen by the caller, and counts for nothing."""
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeout

    monkeypatch.setattr(store, "TIMEOUT", 0.3)
    monkeypatch.setattr(store, "QUIET", 1.5)
    redis, batched = store.client(redis_server.url), store.batched(redis_server.url)
    address = store.address_of(redis.connection_pool.connection_kwargs)
    assert await redis.set("quiet", 1) is True
    assert await store.client(redis_server.url, batches=True).client_kill_filter(_type="normal", skipme=True) >= 1
    assert await redis.get("quiet") == b"1"  # (its pooled connection was dropped)

    assert await batched.execute_command("CLIENT", "PAUSE", 1300, "ALL") == b"OK"
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(RedisTimeout):
        await redis.get("quiet")
    assert loop.time() - started < 2 * store.TIMEOUT  # once, not tried again
    assert not store.still_quiet(address)  # one alone: asked again
    with pytest.raises(RedisTimeout):
        await redis.get("quiet")
    assert store.still_quiet(address)
    asked = loop.time()
    with pytest.raises(store.Unanswered):
        await redis.get("quiet")
    with pytest.raises(store.Unanswered):
        await batched.execute_command("GET", "quiet")
    pipe = redis.pipeline(transaction=False)
    pipe.get("quiet")
    with pytest.raises(store.Unanswered):
        await pipe.execute()
    assert loop.time() - asked < 0.1
    assert issubclass(store.Unanswered, RedisConnectionError)

    async def answered() -> bool:
        try:
            return await redis.get("quiet") == b"1"
        except store.Unanswered:
            return False

    await until(answered, timeout=5, what="asked again after QUIET")
    assert loop.time() - asked >= store.QUIET
    assert await batched.execute_command("GET", "quiet") == b"1"


@pytest.mark.asyncio
async def test_a_batched_trip_with_no_answer_counts_and_a_batch_behind_a_quiet_redis_is_not_sent(redis_server,
                                                                                                  monkeypatch):
    """Batched's own timeout (the whole trip) counts as well; a batch that waited
    behind the trip that made its Redis quiet fails at once, not sent into the
    silence."""
    from redis.exceptions import TimeoutError as RedisTimeout

    monkeypatch.setattr(store, "TIMEOUT", 0.3)
    monkeypatch.setattr(store, "QUIET", 5)
    batched = store.batched(redis_server.url)
    address = store.address_of(store.client(redis_server.url).connection_pool.connection_kwargs)
    assert await batched.execute_command("CLIENT", "PAUSE", 1000, "WRITE") == b"OK"
    try:
        with pytest.raises(RedisTimeout):
            await store.client(redis_server.url).set("quiet", 1)  # a first
        loop = asyncio.get_running_loop()
        first = batched.execute_command("SET", "quiet", 2)
        await asyncio.sleep(0)  # (on its way)
        queued = batched.execute_command("SET", "quiet", 3)  # waits for the trip before it
        with pytest.raises(RedisTimeout):
            await first  # the second: quiet
        failed = loop.time()
        with pytest.raises(store.Unanswered):
            await queued
        assert loop.time() - failed < 0.1
        assert store.still_quiet(address)
    finally:
        store._quiet_until.clear()
        store._unanswered_at.clear()
        assert await batched.execute_command("CLIENT", "UNPAUSE") == b"OK"


def test_a_redis_is_known_by_the_address_its_connections_reach():
    """Batched (the pool's options) and the shared client's connections (their own,
    with redis-py's defaults filled in) name one Redis alike, a URL with no port
    or host included."""
    from redis.asyncio import ConnectionPool

    for url, address in [("redis://cache/0", ("cache", 6379)), ("redis://cache:7000/1", ("cache", 7000)),
                         ("redis:///0", ("localhost", 6379)), ("unix:///run/redis.sock?db=0", "/run/redis.sock")]:
        pool = ConnectionPool.from_url(url)
        assert store.address_of(pool.connection_kwargs) == address, url
        assert store.address_of(pool.make_connection().__dict__) == address, url


@pytest.mark.asyncio
async def test_a_redis_that_accepts_and_never_answers_fails_the_trip_in_time(monkeypatch):
    """The whole trip is timed, a new connection's set-up included (its CLIENT
    SETINFO is read with no timeout of its own): a Redis that takes the
    connection and says nothing fails the commands after store.TIMEOUT, and the
    callers asking meanwhile are not held behind it for ever."""
    from redis.exceptions import TimeoutError as RedisTimeout

    monkeypatch.setattr(store, "TIMEOUT", 0.3)
    heard: list[bytes] = []

    async def mute(reader, writer):
        heard.append(await reader.read(4096))
        await reader.read()  # until the client goes

    server = await asyncio.start_server(mute, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        batched = store.batched(f"redis://127.0.0.1:{port}/0")
        done = await asyncio.wait_for(asyncio.gather(batched.execute_command("GET", "a"),
                                                     batched.eval("return 1", 0), return_exceptions=True), 5)
        assert [type(d) for d in done] == [RedisTimeout, RedisTimeout]
        assert heard and b"CLIENT" in heard[0]  # it was still setting the connection up
    finally:
        server.close()


@pytest.mark.asyncio
async def test_a_callers_own_evalsha_of_an_unknown_script_gets_noscript(redis_server):
    """Only a script asked for by its text goes again after NOSCRIPT; an EVALSHA
    asked for as such gets Redis's answer, once."""
    from redis.exceptions import NoScriptError

    batched = store.batched(redis_server.url)
    with pytest.raises(NoScriptError):
        await asyncio.wait_for(batched.execute_command("EVALSHA", "0" * 40, 0), 5)


@pytest.mark.asyncio
async def test_the_shared_client_packs_commands_in_c_with_the_same_bytes_and_errors(redis_server, monkeypatch):
    """state/store.client's connections pack commands with hiredis (redis-py's
    asyncio connection would in Python) where the bytes are the same: plain str,
    bytes, int and float, not too long, under the default encoding. Everything
    else is packed as before: the same bytes, the same DataError."""
    import enum

    import hiredis
    from redis import asyncio as aioredis
    from redis.asyncio.connection import Connection
    from redis.exceptions import DataError

    from realtime.state import store

    class Kind(enum.IntEnum):
        A = 1

    client = store.client(redis_server.url)
    packed = []
    monkeypatch.setattr(hiredis, "pack_command", lambda args, real=hiredis.pack_command: packed.append(args) or real(args))
    assert await client.set("packed:é", 1733500000.125) is True
    assert packed[-1] == (b"SET", "packed:é", 1733500000.125)  # (after the connection's own CLIENT SETINFO)
    assert await client.zadd("packed:z", {"m": 0.1}) == 1
    assert await client.get("packed:é") == b"1733500000.125"
    assert await client.zscore("packed:z", "m") == 0.1
    connection = client.connection_pool.make_connection()
    python = Connection()
    packed.clear()
    for args in (("SET", "k", 0.1, 3, b"x", 1e20, -(2 ** 70), "é"), ("CONFIG GET", "maxmemory")):
        assert connection.pack_command(*args) == [b"".join(python.pack_command(*args))]
    assert len(packed) == 2
    for args in (("SET", "k", b"x" * 100_000), ("SET", "k", Kind.A), ("SET", "k", memoryview(b"abcd")[::2])):
        assert connection.pack_command(*args) == python.pack_command(*args)
    assert len(packed) == 2, "a long value, an enum and a memoryview are packed as before"
    for args in (("SET", "k", True), ("SET", "k", None)):
        with pytest.raises(DataError):
            python.pack_command(*args)
        with pytest.raises(DataError):
            connection.pack_command(*args)
    other = store.packed_in_c(aioredis.from_url(f"{redis_server.url}?encoding=latin-1"))
    assert other.connection_pool.connection_class is Connection, "another encoding: hiredis would write UTF-8"
    alias = store.packed_in_c(aioredis.from_url(f"{redis_server.url}?encoding=UTF8"), quiet=True)
    assert alias.connection_pool.connection_class is type(connection), "UTF-8 by another name"


@pytest.mark.asyncio
async def test_a_command_whose_caller_was_cancelled_before_it_went_is_not_sent(redis_server, trips):
    """A handshake abandoned while its rate limit waited in the batch (its client
    gone) takes no token: its command never reaches Redis."""
    from realtime.state import store

    batched = store.batched(redis_server.url)
    tasks = [asyncio.ensure_future(batched.execute_command("INCR", "batched:cancelled")) for _ in range(3)]
    tasks[1].cancel()  # while all three wait for the sender, which has not run yet
    done = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(done[1], asyncio.CancelledError)
    assert sorted(done[0::2]) == [1, 2]
    assert sizes(trips) == [2]
    assert await batched.execute_command("GET", "batched:cancelled") == b"2"


# ---------------------------------------------------------------------------
# Reserves: a socket's message.sends without a round trip to Redis each
# ---------------------------------------------------------------------------
def bucket(url: str, key: str) -> tuple[float, dict[str, int]]:
    """The bucket's tokens in Redis, and each reserve period's count."""
    import redis

    with redis.Redis.from_url(url) as client:
        fields = {k.decode(): v.decode() for k, v in client.hgetall(f"rl:{key}").items()}
    return float(fields.get("t", "nan")), {k[2:]: int(v.split(":")[0]) for k, v in fields.items() if k.startswith("h:")}


@pytest.fixture
def asked(monkeypatch) -> list[tuple[int, int]]:
    """Every take that went to Redis: (wanted, extra asked for the reserve)."""
    calls: list[tuple[int, int]] = []
    real = ratelimit.RedisBuckets.take_now

    async def counted(self, key, rate, burst, wanted, period="", extra=0):
        calls.append((wanted, extra))
        return await real(self, key, rate, burst, wanted, period, extra)

    monkeypatch.setattr(ratelimit.RedisBuckets, "take_now", counted)
    return calls


@pytest.fixture
def quick_reserves(monkeypatch):
    """Reserves spent for 0.2 s, their counts living 0.3 s more."""
    monkeypatch.setattr(ratelimit, "RESERVE_HOLD", 0.2)
    monkeypatch.setattr(ratelimit, "RESERVE_SLACK", 0.3)


@pytest.mark.asyncio
async def test_a_reserve_is_spent_without_asking_redis_and_topped_up_at_half(redis_server, asked, monkeypatch):
    monkeypatch.setattr(ratelimit, "RESERVE_HOLD", 30)  # no settlement during the test
    reserves = ratelimit.RedisBuckets(redis_server.url).reserves()
    key, rate, burst = "message.send:r1", 1e-6, 64  # a reserve of 64 // 8 = 8
    assert await reserves.take(key, rate, burst, 1) == (1, 55.0)
    assert asked == [(1, 8)]
    tokens, holds = bucket(redis_server.url, key)
    period = reserves.held[key].period
    assert period.startswith(reserves.holder)
    assert (int(tokens), holds) == (55, {period: 8})
    for _ in range(4):
        assert (await reserves.take(key, rate, burst, 1))[0] == 1
    assert asked == [(1, 8)]  # four from the reserve: 4 left, half of it
    assert (await reserves.take(key, rate, burst, 1))[0] == 1  # 3 left: topped up in the background
    await until(lambda: not reserves.tasks)
    assert asked == [(1, 8), (0, 5)]
    tokens, holds = bucket(redis_server.url, key)
    assert (int(tokens), holds) == (50, {period: 13})
    assert reserves.held[key].tokens == 8
    # A batch larger than what is left: the reserve's 8, the rest from Redis, in one call.
    assert (await reserves.take(key, rate, burst, 10))[0] == 10
    assert asked[-1] == (2, 8)


@pytest.mark.asyncio
async def test_tokens_held_in_reserves_count_against_the_burst(redis_server):
    """A user idle long enough to refill has the burst and no more, reserves
    included: the bucket refills to its burst less what is held."""
    worker_a = ratelimit.RedisBuckets(redis_server.url).reserves()
    worker_b = ratelimit.RedisBuckets(redis_server.url)
    key, rate, burst = "message.send:r2", 100, 40  # a reserve of 5
    assert (await worker_a.take(key, rate, burst, 1))[0] == 1  # 34 in the bucket, 5 held by a
    await asyncio.sleep(0.15)  # 15 tokens' worth of time: to 35, not 40 (or 49)
    granted, _ = await worker_b.take(key, rate, burst, 100)
    assert granted == 35
    spent = 0
    while (await worker_a.take(key, rate, burst, 1))[0] == 1 and spent < 10:
        spent += 1
    assert spent == 5  # a's reserve, and then nothing (the bucket is empty)


@pytest.mark.asyncio
async def test_reserves_on_three_workers_never_give_more_than_the_bucket(redis_server, quick_reserves):
    """Three workers draining one user's bucket, reserves settled and renewed every
    0.2 s: what they were granted in all is the burst and the refill, no more."""
    key, rate, burst = "message.send:r3", 20, 40
    workers = [ratelimit.RedisBuckets(redis_server.url).reserves() for _ in range(3)]
    loop = asyncio.get_running_loop()
    started = loop.time()
    granted = [0, 0, 0]

    async def drain(i):
        while loop.time() - started < 1.5:
            granted[i] += (await workers[i].take(key, rate, burst, 1))[0]
            await asyncio.sleep(0.002)

    await asyncio.gather(*(drain(i) for i in range(3)))
    elapsed = loop.time() - started
    assert burst + rate * 1.0 < sum(granted) <= burst + rate * elapsed + 1, (granted, elapsed)
    assert all(granted), granted
    # Settled: every count released once its senders stop (a period renewed, one not).
    await until(lambda: bucket(redis_server.url, key)[1] == {})


@pytest.mark.asyncio
async def test_a_dead_workers_count_runs_out_while_another_renews_its_own(redis_server, quick_reserves):
    url = redis_server.url
    key, rate, burst = "message.send:r4", 1e-6, 40
    dead = ratelimit.RedisBuckets(url)
    assert await dead.take_now(key, rate, burst, 1, "dead:0", 5) == (1, 34.0, 5)  # and never settled
    alive = ratelimit.RedisBuckets(url).reserves()
    loop = asyncio.get_running_loop()
    started = loop.time()
    while "dead:0" in bucket(url, key)[1]:
        assert loop.time() - started < 2
        assert (await alive.take(key, rate, burst, 1))[0] == 1  # renewing its own count all along
        await asyncio.sleep(0.02)
    assert loop.time() - started >= 0.45  # not before the dead count's time (0.2 + 0.3 s)
    tokens, holds = bucket(url, key)
    assert holds and all(period.startswith(alive.holder) for period in holds)
    # The dead worker's 5 are the bucket's again (refilled to the burst less what is held).
    assert tokens + sum(holds.values()) <= burst


async def reserved_until_it_runs_out(buckets, key: str, rate: float, burst: float, period: str, count: int) -> None:
    """`count` tokens reserved for `period`, never settled: back once Redis dropped its count."""
    assert (await buckets.take_now(key, rate, burst, 0, period, count))[2] == count
    loop = asyncio.get_running_loop()
    started = loop.time()
    while period in bucket(buckets.url, key)[1]:
        assert loop.time() - started < 2
        await asyncio.sleep(0.05)
        await buckets.take_now(key, rate, burst, 0)  # a script that drops what ran out


@pytest.mark.asyncio
async def test_a_late_settlement_releases_nothing_of_a_later_period(redis_server, quick_reserves):
    """A loop that stalled past its period's count settles it late, when the same
    holder has a newer period's count: that count stays, and nothing comes back."""
    url = redis_server.url
    key, rate, burst = "message.send:r5", 1e-6, 40
    buckets = ratelimit.RedisBuckets(url)
    await reserved_until_it_runs_out(buckets, key, rate, burst, "a:0", 5)
    assert (await buckets.take_now(key, rate, burst, 0, "a:1", 5))[2] == 5
    assert await buckets.settle(key, rate, burst, "a:0", 5) == 0
    tokens, holds = bucket(url, key)
    assert holds == {"a:1": 5}
    assert tokens == pytest.approx(30, abs=0.01)  # a:0's 5 not given back: it ran out
    # a:1 settled in time: released, and its unspent 5 back.
    assert await buckets.settle(key, rate, burst, "a:1", 5) == 0
    assert bucket(url, key) == (pytest.approx(35, abs=0.01), {})


@pytest.mark.asyncio
async def test_a_refused_senders_periods_cost_no_settlement(redis_server, quick_reserves, monkeypatch):
    url = redis_server.url
    key, rate, burst = "message.send:r12", 1e-6, 40
    reserves = ratelimit.RedisBuckets(url).reserves()
    assert (await ratelimit.RedisBuckets(url).take(key, rate, burst, 40))[0] == 40  # emptied elsewhere
    settlements: list[str] = []
    real_settle = ratelimit.RedisBuckets.settle

    async def counted(self, key, rate, burst, period, *args):
        settlements.append(period)
        return await real_settle(self, key, rate, burst, period, *args)

    monkeypatch.setattr(ratelimit.RedisBuckets, "settle", counted)
    loop = asyncio.get_running_loop()
    started, periods = loop.time(), set()
    while loop.time() - started < 0.7:  # three periods and more
        assert (await reserves.take(key, rate, burst, 1))[0] == 0
        periods.add(reserves.held[key].period)
        await asyncio.sleep(0.02)
    assert len(periods) >= 3
    await until(lambda: key not in reserves.held)
    assert settlements == []


@pytest.mark.asyncio
async def test_a_settlement_gives_back_no_more_than_its_count_holds(redis_server, quick_reserves):
    """A count that ran out and was made again smaller (a top-up sent late, after a
    loop stall) gives back at most what it holds, whatever the holder thinks is unspent."""
    url = redis_server.url
    key, rate, burst = "message.send:r11", 1e-6, 40
    buckets = ratelimit.RedisBuckets(url)
    await reserved_until_it_runs_out(buckets, key, rate, burst, "a:0", 5)
    assert (await buckets.take_now(key, rate, burst, 0, "a:0", 1))[2] == 1
    assert bucket(url, key) == (pytest.approx(34, abs=0.01), {"a:0": 1})
    assert await buckets.settle(key, rate, burst, "a:0", 5) == 0
    assert bucket(url, key) == (pytest.approx(35, abs=0.01), {})


@pytest.mark.asyncio
async def test_a_count_whose_answer_and_settlement_were_lost_runs_out_while_its_user_sends(
        redis_server, quick_reserves, monkeypatch):
    """The first take's reserve is counted in Redis but its answer never comes (a
    timeout), and that period's settlement fails: the count runs out on its own
    while the same user goes on sending through the same loop."""
    url = redis_server.url
    key, rate, burst = "message.send:r9", 1e-6, 400  # a reserve of 16
    reserves = ratelimit.RedisBuckets(url).reserves()
    real_take, real_settle = ratelimit.RedisBuckets.take_now, ratelimit.RedisBuckets.settle
    lost: list[str] = []

    async def answer_lost(self, key, rate, burst, wanted, period="", extra=0):
        answer = await real_take(self, key, rate, burst, wanted, period, extra)
        if not lost:
            lost.append(period)
            raise ConnectionError("answer lost")
        return answer

    async def first_settlement_lost(self, key, rate, burst, period, *args):
        if period == lost[0]:
            raise ConnectionError("settlement lost")
        return await real_settle(self, key, rate, burst, period, *args)

    monkeypatch.setattr(ratelimit.RedisBuckets, "take_now", answer_lost)
    monkeypatch.setattr(ratelimit.RedisBuckets, "settle", first_settlement_lost)
    # A slack of 1 s, not quick_reserves' 0.3: a loop that stalls longer than the
    # slack (a busy CI machine) sends a live period's settlement after its count
    # ran out, whose unspent tokens are then lost too (fewer, never more: the
    # bucket's own rule) and would fall outside this test's bound.
    monkeypatch.setattr(ratelimit, "RESERVE_SLACK", 1.0)
    assert (await reserves.take(key, rate, burst, 1))[0] == 1  # from this worker's own bucket
    assert bucket(url, key)[1] == {lost[0]: 16}
    loop = asyncio.get_running_loop()
    started, granted, takes = loop.time(), 0, 0
    while loop.time() - started < 2.5:  # the count's time is 0.2 + 1 s
        granted += (await reserves.take(key, rate, burst, 1))[0]
        takes += 1
        await asyncio.sleep(0.02)
    assert granted == takes
    await until(lambda: not reserves.tasks and key in reserves.held)  # no answer on its way
    tokens, holds = bucket(url, key)  # (from here on, nothing on the loop runs)
    current = reserves.held[key]
    assert holds == {current.period: holds[current.period]}  # the lost count ran out; the live one is there
    # Gone from the bucket: what was granted, what the live reserve holds, and what the
    # lost period held when it ran out (its 16, and what it had not spent: up to 16);
    # and a top-up of a live period still on its way when that period was settled,
    # which is left to its count (released with it, not given back: up to a
    # reserve, 16), as the reserves' rule says. CI found that last part (41 once in
    # a run, 35 in a loaded one): how often a top-up is in flight at a period's end
    # depends on the round trip's time.
    lost_with_it = 400 - tokens - (1 + granted) - current.tokens
    assert 16 <= round(lost_with_it) <= 48


@pytest.mark.asyncio
async def test_a_period_whose_only_answer_was_lost_is_still_settled(redis_server, quick_reserves, monkeypatch):
    """Its count is released by its settlement, not left to run out."""
    url = redis_server.url
    key, rate, burst = "message.send:r13", 1e-6, 40
    reserves = ratelimit.RedisBuckets(url).reserves()
    real_take, real_settle = ratelimit.RedisBuckets.take_now, ratelimit.RedisBuckets.settle
    settlements: list[str] = []

    async def answer_lost(self, key, rate, burst, wanted, period="", extra=0):
        await real_take(self, key, rate, burst, wanted, period, extra)
        raise ConnectionError("answer lost")

    async def counted(self, key, rate, burst, period, *args):
        settlements.append(period)
        return await real_settle(self, key, rate, burst, period, *args)

    monkeypatch.setattr(ratelimit.RedisBuckets, "take_now", answer_lost)
    monkeypatch.setattr(ratelimit.RedisBuckets, "settle", counted)
    assert (await reserves.take(key, rate, burst, 1))[0] == 1  # from this worker's own bucket
    period = reserves.held[key].period
    assert bucket(url, key)[1] == {period: 5}
    await until(lambda: settlements and not reserves.tasks, timeout=1)
    assert settlements == [period]
    assert bucket(url, key) == (pytest.approx(34, abs=0.01), {})  # released; its 5 not known to be unspent


@pytest.mark.asyncio
async def test_a_top_up_whose_period_is_over_is_not_sent(redis_server, quick_reserves, asked):
    """The loop stalls after a take that asked for a top-up: when it runs again the
    period is over, and the top-up is not sent (its count may have run out)."""
    reserves = ratelimit.RedisBuckets(redis_server.url).reserves()
    key, rate, burst = "message.send:r14", 1e-6, 40  # a reserve of 5
    for _ in range(4):  # the first from Redis, 5 reserved; the fourth leaves 2: a top-up asked for
        assert (await reserves.take(key, rate, burst, 1))[0] == 1
    assert len(reserves.tasks) == 1
    time.sleep(0.25)  # the loop stalls past the period's 0.2 s
    await until(lambda: not reserves.tasks)
    assert asked == [(1, 5)]


@pytest.mark.asyncio
async def test_a_late_answer_does_not_lengthen_its_period(redis_server, quick_reserves, monkeypatch):
    """A period is spent for RESERVE_HOLD from when it was asked for: an answer that
    comes after that (a stalled loop) is left to the period's settlement."""
    url = redis_server.url
    key, rate, burst = "message.send:r10", 1e-6, 40
    reserves = ratelimit.RedisBuckets(url).reserves()
    real_take = ratelimit.RedisBuckets.take_now
    asked: list[str] = []

    async def slow_answer(self, key, rate, burst, wanted, period="", extra=0):
        answer = await real_take(self, key, rate, burst, wanted, period, extra)
        asked.append(period)
        if len(asked) == 1:
            await asyncio.sleep(0.3)  # past the period's 0.2 s
        return answer

    monkeypatch.setattr(ratelimit.RedisBuckets, "take_now", slow_answer)
    assert (await reserves.take(key, rate, burst, 1))[0] == 1
    assert (await reserves.take(key, rate, burst, 1))[0] == 1
    assert len(asked) == 2 and asked[0] != asked[1]  # not spent from the first period's 5
    # The first period's 5 were released with it, not given back; the second's 5 are held.
    assert bucket(url, key) == (pytest.approx(28, abs=0.01), {asked[1]: 5})


@pytest.mark.asyncio
async def test_an_unspent_reserve_goes_back_and_its_count_is_released(redis_server, quick_reserves):
    reserves = ratelimit.RedisBuckets(redis_server.url).reserves()
    key, rate, burst = "message.send:r6", 1e-6, 40
    await reserves.take(key, rate, burst, 1)
    assert bucket(redis_server.url, key)[1] == {reserves.held[key].period: 5}
    await until(lambda: bucket(redis_server.url, key)[1] == {})
    assert bucket(redis_server.url, key)[0] == pytest.approx(39, abs=0.01)
    assert reserves.held == {}


@pytest.mark.asyncio
async def test_a_reserve_past_its_time_is_not_spent(redis_server, asked):
    reserves = ratelimit.RedisBuckets(redis_server.url).reserves()
    key, rate, burst = "message.send:r7", 1e-6, 40
    await reserves.take(key, rate, burst, 1)
    reserves.held[key].until = asyncio.get_running_loop().time() - 0.001  # its loop stalled past it
    await reserves.take(key, rate, burst, 1)
    assert asked == [(1, 5), (1, 5)]


@pytest.mark.asyncio
async def test_a_lowered_burst_caps_the_bucket(redis_server):
    buckets = ratelimit.RedisBuckets(redis_server.url)
    assert (await buckets.take("message.send:r8", 1e-6, 40, 1))[0] == 1
    assert (await buckets.take("message.send:r8", 1e-6, 10, 20))[0] == 10


@pytest.mark.asyncio
async def test_a_socket_spending_reserves_gets_the_burst_and_no_more(cookies, settings, redis_server):
    settings.REDIS_URL = redis_server.url
    settings.REALTIME = {**settings.REALTIME,
                         "RATE_LIMITS": {**settings.REALTIME["RATE_LIMITS"], "message.send": (1e-6, 24)}}
    ratelimit.reset()
    async with socket(cookies["bob"]) as bob:
        replies = [(await call(bob, send(i)))["type"] for i in range(30)]
    assert replies == ["ack"] * 24 + ["error"] * 6
    assert await Message.objects.filter(author__username="bob").acount() == 24
