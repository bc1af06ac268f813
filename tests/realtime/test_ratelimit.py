"""Token buckets per user and action, on the socket and over HTTP."""

from __future__ import annotations

import asyncio

import pytest
from django.test import Client

from realtime.state import ratelimit
from realtime.models import Message
from tests.conftest import call, socket

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
def sent(monkeypatch) -> list[int]:
    """The size of every Redis pipeline sent during the test, in order."""
    from redis.asyncio.client import Pipeline

    sizes: list[int] = []
    real = Pipeline.execute

    async def counted(self, raise_on_error=True):
        sizes.append(len(self.command_stack))
        return await real(self, raise_on_error=raise_on_error)

    monkeypatch.setattr(Pipeline, "execute", counted)
    return sizes


@pytest.mark.asyncio
async def test_redis_commands_waiting_together_go_in_one_round_trip(redis_server, sent):
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
    assert sent == [7]  # one round trip for the seven
    assert await batched.execute_command("GET", "batched:2") == b"42"
    assert sent == [7, 1]  # alone: sent at once, alone


@pytest.mark.asyncio
async def test_a_command_whose_caller_was_cancelled_before_it_went_is_not_sent(redis_server, sent):
    """A handshake abandoned while its rate limit waited in the batch (its client
    gone) takes no token: its command never reaches Redis."""
    from realtime.state import store

    batched = store.batched(redis_server.url)
    tasks = [asyncio.ensure_future(batched.execute_command("INCR", "batched:cancelled")) for _ in range(3)]
    await asyncio.sleep(0)  # all three are waiting for the sender, which has not sent yet
    tasks[1].cancel()
    done = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(done[1], asyncio.CancelledError)
    assert sorted(done[0::2]) == [1, 2]
    assert sent == [2]
    assert await batched.execute_command("GET", "batched:cancelled") == b"2"
