"""Rooms and direct messages on the production topology (two workers, PostgreSQL,
Redis): concurrent requests for one DM make one room (the unique dm_key under a
real race), and a member removed on one worker loses the room's stream on the other."""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.error
import urllib.request
import uuid

import pytest

from tests.cluster.conftest import ONCE, login, manage_shell, open_socket

pytestmark = [pytest.mark.cluster, pytest.mark.asyncio, ONCE]


def call(base: str, cookie: str, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    csrf = dict(part.split("=", 1) for part in cookie.split("; "))["csrftoken"]
    request = urllib.request.Request(
        f"{base}{path}", method=method, data=json.dumps(body).encode() if body is not None else None,
        headers={"Cookie": cookie, "Content-Type": "application/json", "X-CSRFToken": csrf, "Referer": base + "/"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as res:
            return res.status, json.loads(res.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def create_users(cluster, *names: str) -> None:
    manage_shell(cluster.env(), "from django.contrib.auth.models import User\n"
                                f"for name in {list(names)!r}:\n"
                                "    User.objects.create_user(name, password='demo-password')")


def at_once(calls) -> list[tuple[int, dict]]:
    """Run the calls in threads released together; their answers in order."""
    barrier, answers = threading.Barrier(len(calls)), [None] * len(calls)

    def run(i, fn):
        barrier.wait()
        answers[i] = fn()

    threads = [threading.Thread(target=run, args=(i, fn)) for i, fn in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    return answers


async def test_dm_requests_racing_on_two_workers_make_one_room(cluster):
    a, b = cluster.workers
    tag = uuid.uuid4().hex[:6]
    pairs = [(f"x{tag}{i}", f"y{tag}{i}") for i in range(6)]
    create_users(cluster, *(name for pair in pairs for name in pair))
    for x, y in pairs:
        x_on_a, x_on_b, y_on_b = login(a.url, x), login(b.url, x), login(b.url, y)
        answers = await asyncio.to_thread(at_once, [
            lambda: call(a.url, x_on_a, "POST", "/api/v1/dms/", {"users": [y]}),
            lambda: call(b.url, x_on_b, "POST", "/api/v1/dms/", {"users": [y]}),
            lambda: call(b.url, y_on_b, "POST", "/api/v1/dms/", {"users": [x]}),
        ])
        assert sorted(status for status, _ in answers) == [200, 200, 201], answers
        assert len({body["slug"] for _, body in answers}) == 1, answers
        for cookie in (x_on_a, y_on_b):
            status, body = call(a.url, cookie, "GET", "/api/v1/rooms/")
            dms = [r for r in body["rooms"] if r["kind"] == "dm"]
            assert [r["slug"] for r in dms] == [answers[0][1]["slug"]]
            # Made once: one member.joined each for its two people, no more.
            status, page = call(a.url, cookie, "GET", f"/api/v1/rooms/{dms[0]['slug']}/events/?since=0")
            assert [(e["type"], e["user"]) for e in page["events"]] == [("member.joined", x), ("member.joined", y)]


async def recv(ws, timeout: float = 5) -> dict:
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


async def test_a_member_removed_on_one_worker_loses_the_stream_on_the_other(cluster):
    a, b = cluster.workers
    tag = uuid.uuid4().hex[:6]
    owner, guest = f"o{tag}", f"g{tag}"
    create_users(cluster, owner, guest)
    owner_cookie, guest_cookie = login(a.url, owner), login(b.url, guest)
    status, room = call(a.url, owner_cookie, "POST", "/api/v1/rooms/", {"name": f"war room {tag}",
                                                                          "visibility": "private"})
    assert status == 201
    slug = room["slug"]
    assert call(a.url, owner_cookie, "POST", f"/api/v1/rooms/{slug}/members/", {"username": guest})[0] == 201
    ws = await open_socket(b.url, guest_cookie)
    try:
        await ws.send(json.dumps({"type": "subscribe", "room": slug, "since": 0, "ref": "s", "presence": False}))
        replayed = []
        while (frame := await recv(ws))["type"] != "ack":
            if frame["type"].startswith("member."):
                replayed.append((frame["type"], frame["user"]))
        assert replayed == [("member.joined", owner), ("member.joined", guest)]
        status, body = call(a.url, owner_cookie, "DELETE", f"/api/v1/rooms/{slug}/members/{guest}/")
        assert (status, body["seq"]) == (200, 3)
        # The stream's end (after a read of access) and rooms.changed (at once), in either order.
        assert sorted([await recv(ws), await recv(ws)], key=lambda f: f["type"]) == [
            {"type": "error", "code": "not_found", "message": "no such room", "room": slug},
            {"type": "rooms.changed", "room": slug, "change": "removed"}]
        call(a.url, owner_cookie, "POST", f"/api/v1/rooms/{slug}/messages/", {"body": "secret", "client_id": tag})
        await ws.send(json.dumps({"type": "ping", "ref": "p"}))
        assert await recv(ws) == {"type": "pong", "ref": "p"}
    finally:
        await ws.close()
