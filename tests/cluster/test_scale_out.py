"""Several daphne workers on Redis and PostgreSQL behind nginx and HAProxy: delivery across
workers, gap-free seqs under concurrent writers, and nothing lost or doubled when a
worker is killed."""

from __future__ import annotations

import asyncio
import json
import ssl
import urllib.request

import websockets

import pytest

from tests.cluster.conftest import ONCE, login, open_socket, room_head, run_clients, send_messages, split_sources

pytestmark = [pytest.mark.cluster, pytest.mark.asyncio]


async def recv_type(ws, type_: str, timeout: float = 5) -> dict:
    while True:
        frame = json.loads(await asyncio.wait_for(ws.recv(), timeout))
        if frame["type"] == type_:
            return frame


async def test_messages_cross_between_workers_both_ways(cluster):
    a, b = cluster.workers
    alice = await open_socket(a.url, login(a.url, "alice"))
    bob = await open_socket(b.url, login(b.url, "bob"))
    try:
        for ws in (alice, bob):
            await ws.send(json.dumps({"type": "subscribe", "room": "general", "ref": "s"}))
            await recv_type(ws, "ack")
        await alice.send(json.dumps({"type": "message.send", "room": "general", "body": "from a", "client_id": "x-a", "ref": 1}))
        got = await recv_type(bob, "message.new")
        assert (got["author"], got["body"]) == ("alice", "from a")
        await bob.send(json.dumps({"type": "message.send", "room": "general", "body": "from b", "client_id": "x-b", "ref": 1}))
        got = await recv_type(alice, "message.new")
        while got["body"] != "from b":  # alice also sees her own message first
            got = await recv_type(alice, "message.new")
        assert got["author"] == "bob" and got["seq"] > 0
    finally:
        await alice.close()
        await bob.close()


async def test_the_balancer_forwards_the_upgrade_and_static_files(cluster):
    base = cluster.balancer.url
    res = urllib.request.urlopen(f"{base}/static/realtime/client.js")
    assert res.status == 200
    # nginx serves static files itself; HAProxy passes them to a worker.
    assert ("X-Realtime-Worker" in res.headers) is (cluster.balancer_kind == "haproxy")
    ws = await open_socket(base, login(base, "carol"))
    await ws.send(json.dumps({"type": "ping", "ref": "p"}))
    assert json.loads(await ws.recv()) == {"type": "pong", "ref": "p"}
    await ws.close()


@ONCE
async def test_wss_through_the_balancer(cluster):
    """TLS ends at the balancer (a self-signed certificate made locally): sign in
    over https, post over https (CSRF sees a secure origin) and chat over wss."""
    base = cluster.balancer.tls_url
    context = ssl.create_default_context(cafile=str(cluster.balancer.cert))
    https = urllib.request.build_opener(urllib.request.HTTPSHandler(context=context))
    cookie = login(base, "bob", opener=https)
    ws = await websockets.connect(base.replace("https://", "wss://") + "/ws/v1/", subprotocols=["rt.v1.json"],
                                  origin=base, additional_headers={"Cookie": cookie}, ssl=context)
    try:
        await ws.send(json.dumps({"type": "subscribe", "room": "general", "ref": "s"}))
        await recv_type(ws, "ack")
        csrf = dict(p.split("=", 1) for p in cookie.split("; "))["csrftoken"]
        request = urllib.request.Request(
            f"{base}/api/v1/rooms/general/messages/",
            data=json.dumps({"body": "over tls", "client_id": f"tls-{cluster.balancer_kind}"}).encode(),
            headers={"Cookie": cookie, "Content-Type": "application/json", "X-CSRFToken": csrf,
                     "Origin": base, "Referer": base + "/"},
        )
        assert https.open(request).status == 200
        got = await recv_type(ws, "message.new")
        assert got["body"] == "over tls"
    finally:
        await ws.close()
    with pytest.raises(ssl.SSLCertVerificationError):
        await websockets.connect(base.replace("https://", "wss://") + "/ws/v1/", origin=base,
                                 ssl=ssl.create_default_context())


async def test_concurrent_writers_on_two_workers_get_gap_free_unique_seqs(cluster):
    a, b = cluster.workers
    head = json.loads(urllib.request.urlopen(
        urllib.request.Request(f"{a.url}/api/v1/rooms/", headers={"Cookie": login(a.url, "alice")})
    ).read())
    before = next(r["seq"] for r in head["rooms"] if r["slug"] == "ops")
    acks_a, acks_b = await asyncio.gather(
        send_messages(a.url, login(a.url, "alice"), "ops", 150, "ca"),
        send_messages(b.url, login(b.url, "bob"), "ops", 150, "cb"),
    )
    seqs = sorted(ack["seq"] for ack in acks_a + acks_b)
    assert seqs == list(range(before + 1, before + 301)), "seqs must be unique and gap-free"
    # Each writer's own acks come back in the order it sent.
    for acks in (acks_a, acks_b):
        assert [x["seq"] for x in acks] == sorted(x["seq"] for x in acks)
    cookie = login(a.url, "alice")
    log = json.loads(urllib.request.urlopen(
        urllib.request.Request(f"{a.url}/api/v1/rooms/ops/events/?since={before}&limit=500", headers={"Cookie": cookie})
    ).read())
    assert [e["seq"] for e in log["events"]] == list(range(before + 1, before + 301))


async def test_kill_9_of_a_worker_loses_and_doubles_nothing(cluster):
    """Half the clients sit on worker a (through nginx); a is killed with SIGKILL
    while 500 messages are sent; every client ends with every event once, in order."""
    sources = split_sources(cluster.balancer.url)
    victim, moved, stayed = await run_clients(cluster, sources, "a", lambda w: w.kill(), messages=500, act_at=150)
    try:
        assert victim.proc.poll() is not None, "the victim was not killed"
        assert all(c.reconnects >= 1 for c in moved), "clients on the killed worker must have reconnected"
        assert all(c.reconnects == 0 for c in stayed)
    finally:
        victim.start()


def burst_in_one_write(port: int, cookie: str, origin: str, frames: list[dict]) -> list[dict]:
    """Send every frame in one TCP write (the worker has them all queued before it
    takes the first) and return the replies."""
    from tests.cluster import rawws

    s = rawws.RawSocket(port, cookie, origin)
    try:
        s.send(b"".join(rawws.frame(rawws.TEXT, json.dumps(f).encode()) for f in frames))
        return [json.loads(s.recv()[1]) for _ in frames]
    finally:
        s.close()


async def test_a_burst_of_sends_on_postgresql_keeps_every_outcome_and_seq(cluster):
    """Queued sends take the batch path (tests/realtime/test_bursts.py), where a run
    of first sends to one room is one statement on PostgreSQL."""
    a, _ = cluster.workers
    cookie = login(a.url, "alice")
    before = room_head(a.url, cookie)
    tag = f"burst{before}"

    def send(i, room="general", body=None, client_id=None):
        return {"type": "message.send", "room": room, "body": body or f"{tag} {i}",
                "client_id": client_id or f"{tag}-{i}", "ref": i}

    frames = [send(0), send(1), send(2), send(3, client_id=f"{tag}-1", body="a retry of 1"), send(4),
              send(5, room="nowhere"), send(6, body="bell\x07"), send(7), send(8)]
    replies = await asyncio.to_thread(burst_in_one_write, a.port, cookie, a.url, frames)
    assert [(r["type"], r["ref"], r.get("code")) for r in replies] == [
        ("ack", 0, None), ("ack", 1, None), ("ack", 2, None), ("ack", 3, None), ("ack", 4, None),
        ("error", 5, "not_found"), ("error", 6, "invalid"), ("ack", 7, None), ("ack", 8, None),
    ]
    assert replies[3]["id"] == replies[1]["id"] and replies[3]["seq"] == replies[1]["seq"]
    seqs = [r["seq"] for i, r in enumerate(replies) if r["type"] == "ack" and i != 3]
    assert seqs == list(range(before + 1, before + 7)), "seqs in the order sent, gap-free"
    log = json.loads(urllib.request.urlopen(urllib.request.Request(
        f"{a.url}/api/v1/rooms/general/events/?since={before}&limit=50", headers={"Cookie": cookie})).read())["events"]
    assert [(e["seq"], e["body"]) for e in log] == [(before + k + 1, f"{tag} {i}") for k, i in enumerate((0, 1, 2, 4, 7, 8))]
    assert [e["id"] for e in log] == [replies[i]["id"] for i in (0, 1, 2, 4, 7, 8)]
    # The repeat fails the first run's statement, so 0–4 are written one by one;
    # 7 and 8 are one statement (one timestamp).
    assert log[4]["ts"] == log[5]["ts"]
