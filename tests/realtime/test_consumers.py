"""The /ws/v1/ socket driven through the real ASGI application, on the in-memory
layer and on a private Redis (the `layer` fixture runs every test on both)."""

from __future__ import annotations

import sys

import pytest
from asgiref.sync import sync_to_async

from realtime.domain import services
from realtime.models import Event, Message
from tests.conftest import ORIGIN, call, communicator, epoch, socket, subscribe, assert_quiet, until

pytestmark = [pytest.mark.asyncio, pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("layer")]


async def count(model, **filters) -> int:
    return await model.objects.filter(**filters).acount()


def send_frame(room="general", body="hello", client_id="c1", ref="s1"):
    return {"type": "message.send", "room": room, "body": body, "client_id": client_id, "ref": ref}


# -- handshake ------------------------------------------------------------------
async def test_anonymous_is_accepted_then_closed_with_4001(cookies):
    comm = communicator(None)
    connected, subprotocol = await comm.connect(timeout=5)
    assert connected and subprotocol == "rt.v1.json"
    assert await comm.receive_output(timeout=5) == {"type": "websocket.close", "code": 4001}
    await comm.disconnect()


async def test_an_open_socket_keeps_neither_the_request_headers_nor_the_servers_extensions(cookies):
    """What only the handshake needs (the cookie among the headers, the frame
    writers' and the denial response's extension entries, the subprotocols
    offered) leaves the scope once
    the socket is open: an idle socket's memory (bench/memprobe.py)."""
    comm = communicator(cookies["alice"])
    comm.scope["extensions"] = {"websocket.http.response": {}}
    comm.scope["root_path"] = ""  # (as daphne's scope has it)
    connected, _ = await comm.connect(timeout=5)
    assert connected
    assert await call(comm, {"type": "ping", "t": 1, "ref": 1}) == {"type": "pong", "ref": 1, "t": 1}
    assert not {"headers", "query_string", "root_path", "extensions", "subprotocols"} & set(comm.scope)
    assert comm.scope["type"] == "websocket" and comm.scope["path"] == "/ws/v1/"
    await comm.disconnect()


async def test_an_open_sockets_scope_keeps_only_what_is_read_later(cookies, demo, settings):
    """Behind a trusted proxy, with a ticket and a server's full scope, an open
    socket's scope is down to its type, path, client address (the forwarded one),
    user and session: the TCP peer, the ticket's mark, the server's address, the
    raw path and the ASGI version go with the handshake's keys."""
    from channels.testing import WebsocketCommunicator

    from accounts import tickets
    from project.asgi import application
    from realtime.state import housekeeper
    from tests.conftest import HOST

    settings.REALTIME_TRUSTED_PROXIES = ["127.0.0.1"]
    alice = demo["alice"]
    session_key = cookies["alice"].decode().split("=", 1)[1]
    ticket = await sync_to_async(tickets.issue)(user_id=alice.pk, session_key=session_key)

    def behind_proxy(scope, receive, send):
        return application({**scope, "client": ["127.0.0.1", 4000], "server": ["127.0.0.1", 8000], "root_path": "",
                            "raw_path": b"/ws/v1/", "asgi": {"version": "3.0"},
                            "extensions": {"websocket.http.response": {}}}, receive, send)

    behind_proxy._asgi_single_callable = True
    comm = WebsocketCommunicator(behind_proxy, f"/ws/v1/?ticket={ticket}", subprotocols=["rt.v1.json"],
                                 headers=[HOST, ORIGIN, (b"x-forwarded-for", b"198.51.100.7")])
    connected, _ = await comm.connect(timeout=5)
    assert connected
    assert await call(comm, {"type": "ping", "t": 1, "ref": 1}) == {"type": "pong", "ref": 1, "t": 1}
    [consumer] = [c for c in housekeeper.SOCKETS if c.user.pk == alice.pk]
    scope = consumer.scope
    assert sorted(scope) == ["client", "path", "session", "type", "user"]
    assert (scope["client"], scope["path"], scope["user"].pk, scope["session"].session_key) == (
        ["198.51.100.7", 0], "/ws/v1/", alice.pk, session_key)
    await comm.disconnect()


@pytest.mark.skipif(sys.implementation.name != "cpython", reason="CPython's instance layout")
async def test_a_storm_of_sockets_keeps_each_consumers_attributes_without_a_dict_of_its_own(cookies):
    """Consumers made together (as in a reconnect storm, before any of them has
    connected) keep their attributes in CPython's compact per-instance array: the
    names are all set when a consumer is made (RealtimeConsumer.__init__), not
    some later, when the class's shared table no longer takes new ones and each
    socket got a dict of its own (0.8 KiB an idle socket). A class of its own, so
    that what earlier tests made does not decide it."""
    import asyncio
    import gc

    from channels.testing import WebsocketCommunicator

    from accounts.middleware import SocketAuthMiddleware
    from realtime.web.proxies import ProxyHeadersMiddleware
    from realtime.ws.consumer import RealtimeConsumer
    from tests.conftest import HOST

    class Storm(RealtimeConsumer):
        pass

    app = ProxyHeadersMiddleware(SocketAuthMiddleware(Storm.as_asgi()))
    comms = [WebsocketCommunicator(app, "/ws/v1/", headers=[HOST, ORIGIN, (b"cookie", cookies["alice"])],
                                   subprotocols=["rt.v1.json"]) for _ in range(18)]
    assert all(connected for connected, _ in await asyncio.gather(*(c.connect(timeout=10) for c in comms)))
    try:
        for comm in comms:  # (each handles a frame: a pong, or its user's ping limit on this worker)
            assert (await call(comm, {"type": "ping", "t": 1, "ref": 2}))["ref"] == 2
        consumers = [o for o in gc.get_objects() if type(o) is Storm and o.authenticated]
        assert len(consumers) == 18
        own_dicts = [c for c in consumers if any(isinstance(r, dict) and "conn_id" in r for r in gc.get_referents(c))]
        assert own_dicts == []
    finally:
        await asyncio.gather(*(c.disconnect() for c in comms))


async def test_foreign_origin_is_refused_at_handshake(cookies):
    comm = communicator(cookies["alice"], origin=(b"origin", b"http://evil.example"))
    connected, _ = await comm.connect(timeout=5)
    assert not connected
    await comm.disconnect()


async def test_the_socket_middleware_keeps_no_frame_of_its_own_and_admits_before_any_inner_app(cookies):
    """SocketAuthMiddleware hands RealtimeConsumer its admission (the socket's one
    coroutine runs it first); any other inner app is awaited after the admission,
    with the user in the scope, and a foreign Origin reaches neither."""
    from asgiref.compatibility import is_double_callable
    from channels.testing import WebsocketCommunicator

    from accounts.middleware import SocketAuthMiddleware
    from realtime.ws import queues
    from realtime.ws.consumer import RealtimeConsumer
    from tests.conftest import HOST

    app = SocketAuthMiddleware(RealtimeConsumer.as_asgi())
    assert not is_double_callable(app)
    running = app({"type": "websocket"}, None, None)
    try:
        assert running.cr_code is queues.Served.__call__.__code__
        assert running.cr_frame.f_locals["admit"] == app.admit
    finally:
        running.close()

    seen = []

    async def inner(scope, receive, send):
        seen.append(scope["user"].username)
        await receive()
        await send({"type": "websocket.accept"})

    plain = SocketAuthMiddleware(inner)
    comm = WebsocketCommunicator(plain, "/ws/v1/", headers=[HOST, ORIGIN, (b"cookie", cookies["bob"])])
    connected, _ = await comm.connect(timeout=5)
    assert connected and seen == ["bob"]
    await comm.disconnect()
    foreign = WebsocketCommunicator(plain, "/ws/v1/", headers=[HOST, (b"origin", b"http://evil.example")])
    connected, code = await foreign.connect(timeout=5)
    assert (connected, code, seen) == (False, 1000, ["bob"])  # (closed before the accept: daphne answers 403)
    await foreign.disconnect()


async def test_missing_origin_is_refused(cookies):
    comm = communicator(cookies["alice"], origin=None)
    connected, _ = await comm.connect(timeout=5)
    assert not connected
    await comm.disconnect()


async def test_unknown_subprotocol_is_refused(cookies):
    comm = communicator(cookies["alice"], subprotocols=("rt.v2.json",))
    connected, _ = await comm.connect(timeout=5)
    assert not connected
    await comm.disconnect()


async def test_signed_in_user_gets_json_subprotocol(cookies):
    comm = communicator(cookies["alice"], origin=ORIGIN)
    connected, subprotocol = await comm.connect(timeout=5)
    assert connected and subprotocol == "rt.v1.json"
    assert await call(comm, {"type": "ping", "t": 12.5, "ref": 7}) == {"type": "pong", "ref": 7, "t": 12.5}
    await comm.disconnect()


# -- posting and fan-out ----------------------------------------------------------
async def test_send_acks_with_seq_and_id_and_reaches_every_subscriber(cookies):
    async with socket(cookies["alice"]) as alice, socket(cookies["bob"]) as bob:
        await subscribe(alice, "general")
        await subscribe(bob, "general")
        ack = await call(alice, send_frame(body="<script>alert(1)</script>"))
        message = await Message.objects.aget()
        assert ack == {"type": "ack", "ref": "s1", "room": "general", "id": message.id, "seq": 1}
        expected = {
            "type": "message.new", "room": "general", "seq": 1, "id": message.id, "author": "alice",
            "body": "<script>alert(1)</script>", "client_id": "c1",
        }
        for comm in (alice, bob):  # the sender's own socket too (its other tabs need it)
            frame = await comm.receive_json_from(timeout=5)
            assert frame.pop("ts").endswith("Z")
            assert frame == expected
        await assert_quiet(bob)
    assert await count(Event, room__slug="general") == 1


async def test_send_is_idempotent_on_client_id(cookies):
    async with socket(cookies["alice"]) as alice, socket(cookies["bob"]) as bob:
        await subscribe(bob, "general")
        first = await call(alice, send_frame(ref="a"))
        again = await call(alice, send_frame(ref="b", body="changed on retry"))
        assert {**first, "ref": "b"} == again
        assert (await bob.receive_json_from(timeout=5))["seq"] == 1
        await assert_quiet(bob)  # the retry was published again, and dropped by seq: bob has seq 1 once
    assert await count(Message) == 1
    assert await count(Event) == 1


async def test_same_client_id_in_another_room_is_a_conflict(cookies):
    async with socket(cookies["alice"]) as alice:
        await call(alice, send_frame(room="general"))
        reply = await call(alice, send_frame(room="ops", ref="x"))
        assert reply["type"] == "error" and reply["code"] == "conflict" and reply["ref"] == "x"
    assert await count(Message) == 1


async def test_subscribe_replays_missed_events_then_goes_live(cookies):
    async with socket(cookies["alice"]) as alice:
        for i in range(3):
            await call(alice, send_frame(client_id=f"m{i}", body=f"m{i}"))
        async with socket(cookies["bob"]) as bob:
            replayed = await subscribe(bob, "general", since=1)
            assert [(e["seq"], e["body"]) for e in replayed] == [(2, "m1"), (3, "m2")]
            await call(alice, send_frame(client_id="m3", body="m3"))
            live = await bob.receive_json_from(timeout=5)
            assert (live["seq"], live["body"]) == (4, "m3")
            await assert_quiet(bob)


async def test_subscribe_without_since_goes_live_from_the_head(cookies):
    async with socket(cookies["alice"]) as alice:
        await call(alice, send_frame(client_id="old"))
        async with socket(cookies["bob"]) as bob:
            await bob.send_json_to({"type": "subscribe", "room": "general", "ref": 1, "presence": False})
            assert await bob.receive_json_from(timeout=5) == {
                "type": "ack", "ref": 1, "room": "general", "seq": 1, "epoch": await epoch(), "replayed": 0,
            }


async def test_since_ahead_of_the_log_fails_recovery(cookies):
    async with socket(cookies["bob"]) as bob:
        reply = await call(bob, {"type": "subscribe", "room": "general", "since": 50, "ref": 2})
        assert reply["type"] == "error" and reply["code"] == "recovery_failed" and reply["ref"] == 2


async def test_since_older_than_the_replay_window_fails_recovery(cookies, settings):
    settings.REALTIME = {**settings.REALTIME, "REPLAY_MAX": 2}
    async with socket(cookies["alice"]) as alice:
        for i in range(4):
            await call(alice, send_frame(client_id=f"w{i}"))
        reply = await call(alice, {"type": "subscribe", "room": "general", "since": 1, "ref": 3, "presence": False})
        assert reply["code"] == "recovery_failed"
        assert len(await subscribe(alice, "general", since=2)) == 2


async def test_a_live_gap_is_repaired_from_the_log_in_order(cookies, demo):
    """A broadcast the layer lost (here: never published) is read back from the log
    before the next event, so the subscriber still sees every seq once, in order."""
    async with socket(cookies["bob"]) as bob:
        await subscribe(bob, "general")
        # Written and committed, but its broadcast is lost.
        await sync_to_async(services.message_send)(user=demo["alice"], slug="general", body="lost", client_id="l1")
        async with socket(cookies["alice"]) as alice:
            await call(alice, send_frame(client_id="l2", body="after"))
        frames = [await bob.receive_json_from(timeout=5) for _ in range(2)]
        assert [(f["seq"], f["body"]) for f in frames] == [(1, "lost"), (2, "after")]
        await assert_quiet(bob)


async def test_unsubscribe_stops_the_stream(cookies):
    async with socket(cookies["alice"]) as alice, socket(cookies["bob"]) as bob:
        await subscribe(bob, "general")
        assert await call(bob, {"type": "unsubscribe", "room": "general", "ref": 9}) == {
            "type": "ack", "ref": 9, "room": "general",
        }
        await call(alice, send_frame())
        await assert_quiet(bob)


async def test_rooms_per_connection_are_limited(cookies, settings):
    settings.REALTIME = {**settings.REALTIME, "MAX_ROOMS_PER_CONNECTION": 1}
    async with socket(cookies["alice"]) as alice:
        await subscribe(alice, "general")
        reply = await call(alice, {"type": "subscribe", "room": "ops", "ref": 1, "presence": False})
        assert reply["code"] == "too_large"


# -- edit and delete ---------------------------------------------------------------
async def test_edit_broadcasts_only_what_changed(cookies):
    async with socket(cookies["alice"]) as alice, socket(cookies["bob"]) as bob:
        await subscribe(bob, "general")
        sent = await call(alice, send_frame())
        await bob.receive_json_from(timeout=5)
        ack = await call(alice, {"type": "message.edit", "room": "general", "id": sent["id"], "body": "fixed", "ref": 2})
        assert ack == {"type": "ack", "ref": 2, "room": "general", "id": sent["id"], "seq": 2}
        edited = await bob.receive_json_from(timeout=5)
        assert set(edited) == {"type", "room", "seq", "id", "body", "edited_at"}
        assert (edited["type"], edited["seq"], edited["body"]) == ("message.edited", 2, "fixed")
    assert (await Message.objects.aget()).body == "fixed"


async def test_editing_someone_elses_message_is_forbidden_and_silent(cookies):
    async with socket(cookies["alice"]) as alice, socket(cookies["bob"]) as bob:
        sent = await call(alice, send_frame())
        await subscribe(alice, "general", since=1)
        reply = await call(bob, {"type": "message.edit", "room": "general", "id": sent["id"], "body": "mine now", "ref": 5})
        assert (reply["type"], reply["code"], reply["ref"]) == ("error", "forbidden", 5)
        await assert_quiet(alice)
    message = await Message.objects.aget()
    assert message.body == "hello" and message.edited_at is None
    assert await count(Event) == 1


@pytest.mark.parametrize(
    "deleter, author, allowed",
    [("bob", "bob", True), ("alice", "bob", True), ("bob", "alice", False), ("carol", "bob", False)],
)
async def test_delete_by_author_or_moderator_only(cookies, deleter, author, allowed):
    async with socket(cookies[author]) as writer, socket(cookies[deleter]) as actor:
        sent = await call(writer, send_frame())
        await subscribe(writer, "general", since=1)
        reply = await call(actor, {"type": "message.delete", "room": "general", "id": sent["id"], "ref": 1})
        if allowed:
            assert reply == {"type": "ack", "ref": 1, "room": "general", "id": sent["id"], "seq": 2}
            assert await writer.receive_json_from(timeout=5) == {
                "type": "message.deleted", "room": "general", "seq": 2, "id": sent["id"],
            }
        else:
            assert reply["code"] == "forbidden"
            await assert_quiet(writer)
    message = await Message.objects.aget()
    assert (message.deleted_at is not None) is allowed
    assert await count(Event) == (2 if allowed else 1)


async def test_deleted_message_cannot_be_edited_or_deleted_again(cookies):
    async with socket(cookies["alice"]) as alice:
        sent = await call(alice, send_frame())
        await call(alice, {"type": "message.delete", "room": "general", "id": sent["id"]})
        for frame in (
            {"type": "message.delete", "room": "general", "id": sent["id"], "ref": 1},
            {"type": "message.edit", "room": "general", "id": sent["id"], "body": "x", "ref": 1},
        ):
            assert (await call(alice, frame))["code"] == "not_found"
    assert await count(Event) == 2


# -- permissions -------------------------------------------------------------------
async def test_reader_may_read_but_not_post(cookies):
    async with socket(cookies["carol"]) as carol, socket(cookies["bob"]) as bob:
        await subscribe(carol, "general")
        await subscribe(bob, "general")
        reply = await call(carol, send_frame(ref="r"))
        assert (reply["type"], reply["code"], reply["ref"]) == ("error", "forbidden", "r")
        await assert_quiet(bob)
    assert await count(Message) == 0 and await count(Event) == 0


async def until_reply(comm, frame: dict, code: str | None, timeout: float = 3) -> dict:
    """Send `frame` (a fresh client_id each time) until the reply's error code is
    `code` (None: until it is acked); the change being waited for travels through
    the channel layer."""
    import asyncio

    deadline = asyncio.get_running_loop().time() + timeout
    n = 0
    while True:
        n += 1
        reply = await call(comm, {**frame, "client_id": f"{frame['client_id']}-{n}"})
        if reply.get("code") == code or asyncio.get_running_loop().time() > deadline:
            return reply
        await asyncio.sleep(0.05)


async def test_a_role_change_reaches_the_access_a_subscribed_socket_posts_with(cookies, demo):
    """message.send checks a subscribed socket's cached room and role: a change of
    role must replace it (demoted: refused; promoted again: allowed)."""
    from realtime.models import Membership, Role

    membership = await Membership.objects.aget(user=demo["bob"], room__slug="general")
    async with socket(cookies["bob"]) as bob:
        await subscribe(bob, "general")
        assert (await call(bob, send_frame(client_id="first")))["type"] == "ack"
        await bob.receive_json_from()  # its own message.new
        membership.role = Role.READER
        await membership.asave()
        reply = await until_reply(bob, send_frame(client_id="demoted"), "forbidden")
        assert reply["code"] == "forbidden"
        membership.role = Role.MEMBER
        await membership.asave()
        reply = await until_reply(bob, send_frame(client_id="promoted"), None)
        assert reply["type"] == "ack"
    assert await count(Message, author=demo["bob"]) == 2


async def test_a_ping_makes_a_socket_read_its_access_again(cookies, demo):
    """An access.check can be lost (the layer or pub/sub dropped it): the ping's
    catch-up, like a layer recovery, forgets every cached access."""
    from realtime.models import Membership, Role

    async with socket(cookies["bob"]) as bob:
        await subscribe(bob, "general")
        # Demoted without a signal (a queryset update sends no access.check).
        await Membership.objects.filter(user=demo["bob"], room__slug="general").aupdate(role=Role.READER)
        assert (await call(bob, send_frame(client_id="stale")))["type"] == "ack"  # the cached role
        await bob.receive_json_from()  # its own message.new
        assert (await call(bob, {"type": "ping", "ref": "p"}))["type"] == "pong"
        assert (await call(bob, send_frame(client_id="fresh")))["code"] == "forbidden"


async def test_a_consumer_that_fails_gives_back_its_leases_and_timers(cookies, demo, monkeypatch, settings):
    """A handler that raises ends the app without a websocket.disconnect: the
    socket's lease, presence and place in the housekeeper go all the same."""
    from realtime.ws import consumer as consumers
    from realtime.state import leases as connections
    from realtime.state import housekeeper

    settings.REALTIME = {**settings.REALTIME, "SESSION_RECHECK": 0.2}
    # (the periodic session check per socket is what calls the broken read below)
    monkeypatch.setattr(housekeeper, "rechecks_sessions", lambda: True)

    def broken(*args, **kwargs):
        raise RuntimeError("database away")

    comm = communicator(cookies["bob"])
    await comm.connect()  # (accepted: its lease is taken just after)

    async def leased() -> bool:
        return await connections.leases().count(demo["bob"].pk) == 1

    await until(leased, what="the socket's lease")
    # Broken only now: a recheck due before the count above (0.2 s, on a slow
    # machine) would have ended the socket first.
    monkeypatch.setattr(consumers, "session_is_valid", broken)
    with pytest.raises(RuntimeError):
        await comm.receive_output(timeout=3)  # the session check raised in the app

    async def released() -> bool:
        return await connections.leases().count(demo["bob"].pk) == 0

    await until(released, what="the failed socket's lease given back")  # the last of its cleanup
    assert not [c for c in housekeeper.SOCKETS if c.user.pk == demo["bob"].pk]


async def test_non_member_cannot_see_or_post_in_a_private_room(cookies):
    """A private room is, to a non-member, a room that does not exist: the same
    error, word for word, as for a name no room has."""
    async with socket(cookies["carol"]) as carol:
        for frame in ({"type": "subscribe", "room": "ops", "since": 0, "ref": 1}, send_frame(room="ops", ref=1),
                      {"type": "typing", "room": "ops", "ref": 1}, {"type": "read", "room": "ops", "seq": 1, "ref": 1}):
            hidden = await call(carol, frame)
            missing = await call(carol, {**frame, "room": "nope"})
            assert hidden == {**missing, **({"room": "ops"} if "room" in missing else {})}
            assert (hidden["type"], hidden["code"], hidden["message"]) == ("error", "not_found", "no such room")
    assert await count(Message) == 0


async def test_unknown_room_is_not_found(cookies):
    async with socket(cookies["alice"]) as alice:
        assert (await call(alice, {"type": "subscribe", "room": "nope", "ref": 1}))["code"] == "not_found"
        assert (await call(alice, send_frame(room="nope")))["code"] == "not_found"


async def test_a_refused_subscribe_leaves_no_stream(cookies):
    async with socket(cookies["carol"]) as carol, socket(cookies["alice"]) as alice:
        await call(carol, {"type": "subscribe", "room": "ops", "since": 0})
        await call(alice, send_frame(room="ops"))
        await assert_quiet(carol)


# -- bad input ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "raw, code, ref",
    [
        ("{not json", "invalid", None),
        ("[1, 2]", "invalid", None),
        ('{"ref": 3}', "invalid", 3),
        ('{"type": "message.shout", "ref": 4}', "unknown_type", 4),
        ('{"type": "websocket_disconnect", "ref": 4}', "unknown_type", 4),
        ('{"type": "room_event", "room": "general", "seq": 1}', "unknown_type", None),
        ('{"type": "message.send", "room": "general", "body": "x", "ref": 5}', "invalid", 5),
        ('{"type": "message.send", "room": "general", "body": 1, "client_id": "a", "ref": 6}', "invalid", 6),
        ('{"type": "subscribe", "room": "general", "since": -1, "ref": "s"}', "invalid", "s"),
        ('{"type": "subscribe", "room": "General Room", "ref": "s"}', "invalid", "s"),
        ('{"type": "ping", "extra": true, "ref": 8}', "invalid", 8),
        ('{"type": "ping", "ref": {"nested": 1}}', "invalid", None),
        # Parsable by the schema's decoder but not as plain data: must not crash.
        ("[1e999]", "invalid", None),
        ('{"type": "ping", "t": 1e400}', "invalid", None),
        ('{"type": "nope", "ref": "\\ud800"}', "invalid", None),
        ('{"type": "message.send", "room": "general", "body": "\\ud800", "client_id": "s", "ref": 1}', "invalid", None),
    ],
)
async def test_bad_frames_get_an_error_and_the_socket_stays_open(cookies, raw, code, ref):
    async with socket(cookies["alice"]) as alice:
        await alice.send_to(text_data=raw)
        reply = await alice.receive_json_from(timeout=5)
        assert reply["type"] == "error" and reply["code"] == code
        assert reply.get("ref") == ref
        assert await call(alice, {"type": "ping", "ref": "alive"}) == {"type": "pong", "ref": "alive"}
    assert await count(Message) == 0


async def test_binary_frame_on_json_subprotocol_is_invalid(cookies):
    async with socket(cookies["alice"]) as alice:
        await alice.send_to(bytes_data=b'{"type": "ping"}')
        assert (await alice.receive_json_from(timeout=5))["code"] == "invalid"


@pytest.mark.parametrize(
    "body, code",
    [("   \n ", "invalid"), ("x" * 4001, "too_large"), ("bell\x07", "invalid")],
)
async def test_bad_bodies_are_refused_and_nothing_is_stored(cookies, body, code):
    async with socket(cookies["alice"]) as alice, socket(cookies["bob"]) as bob:
        await subscribe(bob, "general")
        reply = await call(alice, send_frame(body=body))
        assert reply["code"] == code
        await assert_quiet(bob)
    assert await count(Message) == 0


async def test_msgpack_subprotocol_speaks_the_same_schemas(cookies):
    import msgpack

    async with socket(cookies["alice"], subprotocols=("rt.v1.msgpack",)) as alice:
        await alice.send_to(bytes_data=msgpack.packb({"type": "subscribe", "room": "general", "since": 0, "ref": 1, "presence": False}))
        ack = msgpack.unpackb(await alice.receive_from(timeout=5))
        assert ack == {"type": "ack", "ref": 1, "room": "general", "seq": 0, "epoch": await epoch(), "replayed": 0}
        await alice.send_to(bytes_data=msgpack.packb(send_frame()))
        ack = msgpack.unpackb(await alice.receive_from(timeout=5))
        assert ack["seq"] == 1
        event = msgpack.unpackb(await alice.receive_from(timeout=5), timestamp=3)
        assert event["type"] == "message.new" and event["body"] == "hello"


async def test_a_refused_resubscribe_ends_the_existing_stream(cookies, demo):
    from realtime.models import Membership

    async with socket(cookies["bob"]) as bob, socket(cookies["alice"]) as alice:
        await subscribe(bob, "ops")
        # Taken away without a signal (a queryset update sends none), so only the
        # re-subscribe finds out.
        await Membership.objects.filter(user=demo["bob"], room__slug="ops").aupdate(user=demo["carol"])
        reply = await call(bob, {"type": "subscribe", "room": "ops", "ref": 2, "presence": False})
        assert reply["code"] == "not_found"
        await call(alice, send_frame(room="ops"))
        await assert_quiet(bob)


async def test_ping_catches_up_a_quiet_room_whose_last_broadcast_was_lost(cookies, demo):
    async with socket(cookies["bob"]) as bob:
        await subscribe(bob, "general")
        # Committed, never broadcast, and nothing follows it.
        await sync_to_async(services.message_send)(user=demo["alice"], slug="general", body="quiet", client_id="q1")
        # (not a ping to end it: a ping is what brings the event, below)
        assert await bob.receive_nothing(timeout=0.3)
        await bob.send_json_to({"type": "ping", "ref": "hb"})
        event = await bob.receive_json_from(timeout=5)
        assert (event["type"], event["seq"], event["body"]) == ("message.new", 1, "quiet")
        assert await bob.receive_json_from(timeout=5) == {"type": "pong", "ref": "hb"}
        assert await call(bob, {"type": "ping", "ref": "again"}) == {"type": "pong", "ref": "again"}


async def test_a_retried_send_republishes_a_lost_broadcast(cookies, demo):
    async with socket(cookies["bob"]) as bob, socket(cookies["alice"]) as alice:
        await subscribe(bob, "general")
        # The first attempt committed but its broadcast was lost (say, a crash).
        await sync_to_async(services.message_send)(user=demo["alice"], slug="general", body="once", client_id="r1")
        ack = await call(alice, send_frame(client_id="r1", body="once"))
        assert ack["seq"] == 1
        got = await bob.receive_json_from(timeout=5)
        assert (got["seq"], got["body"]) == (1, "once")
        await call(alice, send_frame(client_id="r1", body="once", ref="again"))
        await assert_quiet(bob)  # a second repeat must not reach bob twice
    assert await count(Message) == 1


async def test_deleted_text_is_gone_from_the_replay(cookies):
    async with socket(cookies["alice"]) as alice:
        sent = await call(alice, send_frame(body="secret"))
        await call(alice, {"type": "message.edit", "room": "general", "id": sent["id"], "body": "secret 2"})
        await call(alice, {"type": "message.delete", "room": "general", "id": sent["id"]})
        replayed = await subscribe(alice, "general", since=0)
        assert [e["type"] for e in replayed] == ["message.new", "message.edited", "message.deleted"]
        assert all(e.get("body", "") == "" for e in replayed)
