"""The Redis engine beyond the contract suite: a receiver riding out a restart of
its Redis (the failure counted, the sockets told to catch up once subscribed
again), and a published message it cannot decode skipped without ending the
receive loop. Its receive loop reads replies itself (engines/redis.py), so both
are checked against a private redis-server."""

from __future__ import annotations

import logging

import pytest

from realtime.delivery import names
from tests.brokers.test_nats_amqp import FakeFan, crosses_a_restart, until
from tests.conftest import missing

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def one_redis(tmp_path_factory):
    from deploy.brokers.redis import OneRedis

    try:
        server = OneRedis(tmp_path_factory.mktemp("one-redis")).start()
    except FileNotFoundError as exc:
        missing(str(exc))
    yield server
    server.stop()


@pytest.mark.asyncio
async def test_a_redis_receiver_rides_out_a_restart_of_its_redis(one_redis):
    from realtime.delivery.engines.redis import RedisEngine

    await crosses_a_restart(RedisEngine(one_redis.url), one_redis)


@pytest.mark.asyncio
async def test_a_message_that_does_not_decode_is_skipped_and_the_next_one_arrives(one_redis, caplog):
    from realtime.delivery.engines.redis import RedisEngine
    from realtime.state import store

    engine = RedisEngine(one_redis.url)
    fan = FakeFan()
    fan.groups["room.general"] = {object()}
    await engine.receiver(fan).join("room.general")
    with caplog.at_level(logging.WARNING, logger="realtime"):
        await store.client(one_redis.url).publish(names.fan_channel("room.general"), b"\xc1 not msgpack")
        await engine.send(engine.pack([("room.general", {"seq": 1})]))
        await until(lambda: fan.got)
    assert fan.got == [{"seq": 1}]
    assert fan.failures == 0
    assert [r.getMessage() for r in caplog.records if "undecodable" in r.getMessage()] == ["fan-out message undecodable"]
