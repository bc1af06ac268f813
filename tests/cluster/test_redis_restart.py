"""Redis restarted mid-stream: the channel layer comes back by itself and clients
recover what was broadcast while it was gone."""

from __future__ import annotations

import asyncio
import json
import urllib.request

import pytest

from tests.cluster.conftest import assert_all_caught_up, followers, login, room_head, send_messages, split_sources

pytestmark = [pytest.mark.cluster, pytest.mark.asyncio]


def post(base: str, cookie: str, client_id: str) -> dict:
    csrf = dict(part.split("=", 1) for part in cookie.split("; "))["csrftoken"]
    request = urllib.request.Request(
        f"{base}/api/v1/rooms/general/messages/",
        data=json.dumps({"body": client_id, "client_id": client_id}).encode(),
        headers={"Cookie": cookie, "Content-Type": "application/json", "X-CSRFToken": csrf, "Referer": base + "/"},
    )
    return json.loads(urllib.request.urlopen(request).read())


async def test_nothing_is_lost_across_a_redis_restart(cluster):
    base = cluster.balancer.url
    sources = split_sources(base)
    start = room_head(base, login(base, "alice"))
    placements = [(user, source) for source in sources.values() for user in ("bob", "carol")]
    worker = cluster.workers[0]
    async with followers(base, placements, ping_every=1.0, start=start) as clients:
        sender = login(worker.url, "alice")
        await send_messages(worker.url, sender, "general", 20, "before")
        cluster.redis.stop()
        # Written while Redis is down (over REST: a new socket is refused with 4013
        # until the layer is back): stored and acked, but no broadcast can leave.
        during = [await asyncio.to_thread(post, worker.url, sender, f"during-{i}") for i in range(20)]
        cluster.redis.start()
        await asyncio.sleep(0.5)
        after = await send_messages(worker.url, sender, "general", 20, "after")
        assert during[-1]["seq"] < after[-1]["seq"]
        await assert_all_caught_up(clients, after[-1]["seq"])
        assert all(c.reconnects == 0 for c in clients), "open sockets ride out a Redis restart"
        # The workers stayed up throughout.
        assert all(w.proc.poll() is None for w in cluster.workers)
