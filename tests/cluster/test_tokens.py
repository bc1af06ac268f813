"""A service's socket with a JWT through the balancer (nginx and HAProxy), in the
production topology: the header and the query parameter both sign in, a message
crosses to a session socket on the other worker, and the token reaches no log: not
the balancer's access log, not a worker's."""

from __future__ import annotations

import asyncio
import json
import time

import jwt
import pytest
import websockets

from tests.cluster.conftest import JWT_SECRET, login, open_socket, split_sources, worker_for

pytestmark = [pytest.mark.cluster, pytest.mark.asyncio]


def token(user_id: int, lifetime: int = 120) -> str:
    now = int(time.time())
    return jwt.encode({"sub": str(user_id), "aud": "realtime-cluster", "iss": "https://issuer.test", "iat": now,
                       "exp": now + lifetime}, JWT_SECRET, algorithm="HS256", headers={"kid": "cluster"})


async def recv_type(ws, type_: str, timeout: float = 5) -> dict:
    while True:
        frame = json.loads(await asyncio.wait_for(ws.recv(), timeout))
        if frame["type"] == type_:
            return frame


async def test_a_token_socket_through_the_balancer_chats_and_leaves_no_token_in_any_log(cluster):
    base = cluster.balancer.url
    sources = split_sources(base)
    (bot_source, reader_source) = list(sources.values())[:2]
    cookie = login(base, "carol", source=reader_source)
    reader = await open_socket(base, cookie, source=reader_source)
    tokens = []
    try:
        await reader.send(json.dumps({"type": "subscribe", "room": "general", "ref": "s"}))
        await recv_type(reader, "ack")
        bob_id = await asyncio.to_thread(user_id, cluster, "bob")
        ws_url = base.replace("http://", "ws://") + "/ws/v1/"
        for how in ("header", "query"):
            value = token(bob_id)
            tokens.append(value)
            options = {"subprotocols": ["rt.v1.json"], "origin": base, "local_addr": (bot_source, 0), "open_timeout": 5}
            if how == "header":
                bot = await websockets.connect(ws_url, additional_headers={"Authorization": f"Bearer {value}"}, **options)
            else:
                bot = await websockets.connect(f"{ws_url}?access_token={value}", **options)
            try:
                await bot.send(json.dumps({"type": "message.send", "room": "general", "body": f"bot by {how}",
                                           "client_id": f"bot-{how}-{time.monotonic_ns()}", "ref": 1}))
                assert (await recv_type(bot, "ack"))["ref"] == 1
                got = await recv_type(reader, "message.new")
                assert (got["author"], got["body"]) == ("bob", f"bot by {how}")
            finally:
                await bot.close()
        # A bad token through the balancer: 4001.
        bad = await websockets.connect(ws_url, additional_headers={"Authorization": "Bearer " + tokens[0][:-4] + "AAAA"},
                                       subprotocols=["rt.v1.json"], origin=base, open_timeout=5)
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(bad.recv(), 5)
        assert closed.value.rcvd.code == 4001
    finally:
        await reader.close()
    assert worker_for(base, bot_source) != worker_for(base, reader_source)
    logs = [*cluster.workdir.glob("worker-*.log"), *cluster.workdir.glob("*/*access*.log")]
    assert any("nginx" in str(p) for p in logs) is (cluster.balancer_kind == "nginx")
    for path in logs:
        text = path.read_text(errors="replace")
        for value in tokens:
            for part in value.split("."):
                assert part not in text, f"a token's part is in {path.name}"


def user_id(cluster, username: str) -> int:
    import subprocess
    import sys

    from tests.services import ROOT

    out = subprocess.run([sys.executable, "manage.py", "shell", "-c",
                          f"from django.contrib.auth.models import User; print(User.objects.get(username={username!r}).pk)"],
                         cwd=ROOT, env=cluster.env(), check=True, capture_output=True, text=True).stdout
    return int(out.strip().splitlines()[-1])
