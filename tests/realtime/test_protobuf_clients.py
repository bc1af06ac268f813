"""Two clients of rt.v1.protobuf against a real worker (daphne, its own process): a
Python one (protobuf, the classes made from the declarations) and a Node one
(protobufjs, from docs/protocol.proto alone: tests/js/protobuf_client.mjs). Each
sends every client frame type and reads what comes back; every event either reads
is, field for field, what a JSON socket in the same room got."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import websockets

from realtime import protocol
from realtime.protocol import PROTOBUF, proto
from tests.cluster.conftest import login
from tests.conftest import missing
from tests.services import ROOT, AppServer

pytestmark = pytest.mark.asyncio

EVENTS = {"message.new", "message.edited", "message.deleted", "reaction.added", "reaction.removed"}


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    server = AppServer(tmp_path_factory.mktemp("protobuf"))
    server.manage("migrate", "--noinput")
    server.manage("seed_demo")
    server.start()
    yield server
    server.stop()


def script(tag: str) -> list[dict]:
    """Every client frame type once, in an order that makes sense; the message's id
    is filled in as the replies come ("@id")."""
    return [
        {"type": "subscribe", "room": "general", "ref": f"{tag}-sub", "presence": True, "since": 0},
        {"type": "message.send", "room": "general", "body": f"from {tag} 🎉", "client_id": f"{tag}-1", "ref": f"{tag}-send"},
        {"type": "message.edit", "room": "general", "id": "@id", "body": f"{tag} edited", "ref": f"{tag}-edit"},
        {"type": "reaction.add", "room": "general", "id": "@id", "emoji": "👍", "ref": f"{tag}-ra"},
        {"type": "reaction.remove", "room": "general", "id": "@id", "emoji": "👍", "ref": f"{tag}-rr"},
        {"type": "typing", "room": "general", "ref": f"{tag}-typing"},
        {"type": "read", "room": "general", "seq": 1, "ref": f"{tag}-read"},
        {"type": "presence.list", "room": "general", "ref": f"{tag}-plist"},
        {"type": "ping", "t": 12.5, "ref": 41},
        {"type": "metrics.subscribe", "ref": f"{tag}-ms"},
        {"type": "metrics.unsubscribe", "ref": f"{tag}-mu"},
        {"type": "auth.refresh", "token": "not.a.token", "ref": f"{tag}-auth"},
        {"type": "message.delete", "room": "general", "id": "@id", "ref": f"{tag}-del"},
        {"type": "unsubscribe", "room": "general", "ref": f"{tag}-unsub"},
    ]


def norm(frame: dict) -> dict:
    """Absent and empty are one in proto3 for lists and maps: compare without them."""
    return {k: v for k, v in frame.items() if v not in ([], {}, None)}


async def observe(worker, cookie: str, until_type: str, until_ref_body: str, into: list) -> None:
    """A JSON socket in #general, collecting its events until one of `until_type`
    about the given body arrives."""
    async with websockets.connect(worker.url.replace("http", "ws") + "/ws/v1/", subprotocols=["rt.v1.json"],
                                  origin=worker.url, additional_headers={"Cookie": cookie}) as ws:
        await ws.send(json.dumps({"type": "subscribe", "room": "general", "ref": "o"}))
        while True:
            frame = json.loads(await asyncio.wait_for(ws.recv(), 20))
            into.append(frame)
            if frame["type"] == until_type and frame.get("id") == until_ref_body:
                return


def check(received: list[dict], tag: str, observed: list[dict]) -> None:
    replies = {f["ref"]: f for f in received if "ref" in f}
    assert replies[f"{tag}-sub"]["type"] == "ack" and replies[f"{tag}-sub"]["room"] == "general"
    sent = replies[f"{tag}-send"]
    assert sent["type"] == "ack" and sent["seq"] > 0 and sent["id"] > 0
    for ref in ("edit", "ra", "rr", "typing", "read", "unsub", "del", "mu"):
        assert replies[f"{tag}-{ref}"]["type"] == "ack", replies[f"{tag}-{ref}"]
    assert replies[f"{tag}-ra"]["emoji"] == "👍"
    assert replies[f"{tag}-plist"]["type"] == "presence.page"
    assert replies[41] == {"type": "pong", "ref": 41, "t": 12.5}
    assert (replies[f"{tag}-ms"]["type"], replies[f"{tag}-ms"]["code"]) == ("error", "forbidden")
    assert (replies[f"{tag}-auth"]["type"], replies[f"{tag}-auth"]["code"]) == ("error", "invalid")
    types = {f["type"] for f in received}
    assert {"presence.state", *EVENTS} <= types, types
    # Each event as the JSON socket got it.
    by_seq = {(f["type"], f["seq"]): f for f in observed if f.get("type") in EVENTS}
    mine = [f for f in received if f["type"] in EVENTS and f.get("id") == sent["id"]]
    assert [f["type"] for f in mine] == ["message.new", "message.edited", "reaction.added", "reaction.removed",
                                         "message.deleted"]
    for frame in mine:
        assert norm(frame) == norm(by_seq[(frame["type"], frame["seq"])])


class PythonClient:
    """rt.v1.protobuf with the classes protocol/proto.py makes."""

    def __init__(self, worker, cookie: str) -> None:
        self.worker, self.cookie = worker, cookie

    async def run(self, frames: list[dict]) -> list[dict]:
        received: list[dict] = []
        async with websockets.connect(self.worker.url.replace("http", "ws") + "/ws/v1/",
                                      subprotocols=["rt.v1.protobuf"], origin=self.worker.url,
                                      additional_headers={"Cookie": self.cookie}) as ws:
            assert ws.subprotocol == "rt.v1.protobuf"
            message_id = None
            for frame in frames:
                frame = {k: (message_id if v == "@id" else v) for k, v in frame.items()}
                envelope = proto._classes()()
                proto._fill(getattr(envelope, proto._snake(protocol.CLIENT_TYPES[frame["type"]].__name__)), frame)
                await ws.send(envelope.SerializeToString())
                while True:
                    data = await asyncio.wait_for(ws.recv(), 10)
                    assert isinstance(data, bytes)
                    got = PROTOBUF.decode_any(data)
                    received.append(got)
                    if got.get("ref") == frame["ref"]:
                        if frame["type"] == "message.send":
                            message_id = got["id"]
                        break
        return received


async def test_a_python_client_round_trips_every_frame_type(worker):
    observed: list[dict] = []
    frames = script("py")
    client = PythonClient(worker, login(worker.url, "bob"))
    watcher = asyncio.create_task(observe(worker, login(worker.url, "carol"), "message.deleted", None, observed))
    await asyncio.sleep(0)  # (the watcher subscribes first; events it misses fail the comparison)
    received = await client.run(frames)
    watcher.cancel()
    with pytest.raises(asyncio.CancelledError):
        await watcher
    check(received, "py", observed)


async def test_a_node_client_from_the_proto_file_round_trips_every_frame_type(worker):
    node = shutil.which("node")
    if node is None or not (ROOT / "tests" / "js" / "node_modules" / "protobufjs").exists():
        missing("node and tests/js/node_modules (make test runs npm ci --prefix tests/js)")
    cookie = login(worker.url, "alice")
    observed: list[dict] = []
    watcher = asyncio.create_task(observe(worker, login(worker.url, "carol"), "message.deleted", None, observed))
    # The message's id is not known to the script beforehand: the Node client runs
    # the send alone first, then the rest with the id filled in.
    fields = {cls.__struct_config__.tag: name for name, _, cls in proto.envelope_fields() if cls in protocol.CLIENT_FRAMES}
    tags = {name: cls.__struct_config__.tag for name, _, cls in proto.envelope_fields()}
    frames = script("js")

    def run(part: list[dict]) -> list[dict]:
        done = subprocess.run([node, str(ROOT / "tests" / "js" / "protobuf_client.mjs")], input=json.dumps({
            "url": worker.url.replace("http", "ws") + "/ws/v1/", "cookie": cookie, "origin": worker.url,
            "frames": part, "tags": tags, "fields": fields}), capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return [json.loads(line) for line in done.stdout.splitlines()]

    first = await asyncio.to_thread(run, frames[:2])
    sent = next(f for f in first if f.get("ref") == "js-send")
    message_id = sent["id"]
    # The second socket resumes from the send's seq, as a client that reconnects does.
    resume = {**frames[0], "since": sent["seq"]}
    rest = [{k: (message_id if v == "@id" else v) for k, v in frame.items()} for frame in [resume, *frames[2:]]]
    second = await asyncio.to_thread(run, rest)
    deadline = time.monotonic() + 10
    while not any(f.get("type") == "message.deleted" and f.get("id") == message_id for f in observed):
        assert time.monotonic() < deadline, "the JSON socket never saw the delete"
        await asyncio.sleep(0.05)
    watcher.cancel()
    with pytest.raises(asyncio.CancelledError):
        await watcher
    check(first + second, "js", observed)
