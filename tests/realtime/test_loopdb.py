"""A message.send on PostgreSQL is written from the event loop (domain/loopdb.py:
the worker's own connection, one statement), not on the database thread; whatever
that path cannot settle (a repeat, a refusal, a dropped connection) goes to the
database thread, whose answers are the same as before, in order, and nothing is
written twice.

These tests run on PostgreSQL only: on the embedded SQLite the module runs itself
again on a private PostgreSQL (test_the_same_tests_pass_on_postgresql).

Demo data (tests/conftest.py): general is public (alice owner, bob member, carol
reader); ops is private (alice owner, bob member).
"""

from __future__ import annotations

import time

import psycopg
import pytest
from asgiref.sync import sync_to_async
from django.db import connection

from realtime.domain import loopdb, roomlog, services
from realtime.models import Event, Message
from realtime.observability import metrics
from tests.conftest import assert_quiet, call, run_module_on_postgresql, socket, subscribe

ON_POSTGRESQL = connection.vendor == "postgresql"
LOOP_TESTS = (
    "test_a_send_is_written_from_the_loop_and_delivered",
    "test_the_loop_and_the_thread_store_the_same_rows",
    "test_a_repeat_is_answered_with_the_original_by_the_thread",
    "test_a_refused_send_never_reaches_the_loop",
    "test_queued_sends_to_several_rooms_keep_their_order",
    "test_a_dropped_connection_hands_that_batch_to_the_thread_and_reconnects",
    "test_loop_writes_off_takes_the_thread",
    "test_a_connection_that_cannot_be_opened_rests_the_loop_path",
)


def send_frame(body: str, client_id: str, room: str = "general", ref: str | int = "s") -> dict:
    return {"type": "message.send", "room": room, "body": body, "client_id": client_id, "ref": ref}


def handed_over(reason: str) -> float:
    return metrics.LOOP_WRITE_HANDED_OVER.labels(reason)._value.get()


def stored(room: str = "general") -> list[tuple]:
    return list(Message.objects.filter(room__slug=room).order_by("seq")
                .values_list("seq", "author__username", "body", "client_id"))


@pytest.fixture
def thread_calls(monkeypatch) -> list[int]:
    """The sizes of the batches the database thread was given (message_send_many)."""
    sizes: list[int] = []
    real = services.message_send_many
    monkeypatch.setattr(services, "message_send_many",
                        lambda *, user, sends: sizes.append(len(sends)) or real(user=user, sends=sends))
    return sizes


@pytest.fixture
def loop_calls(monkeypatch) -> list[int]:
    """The sizes of the runs the loop wrote (one statement each)."""
    sizes: list[int] = []
    real = roomlog.write_messages_async

    async def counted(room, author, items, now):
        sizes.append(len(items))
        return await real(room, author, items, now)

    monkeypatch.setattr(roomlog, "write_messages_async", counted)
    return sizes


if ON_POSTGRESQL:
    class TestLoopWrites:
        pytestmark = [pytest.mark.asyncio, pytest.mark.django_db(transaction=True)]

        async def test_a_send_is_written_from_the_loop_and_delivered(self, cookies, thread_calls, loop_calls):
            async with socket(cookies["alice"]) as alice, socket(cookies["bob"]) as bob:
                await subscribe(alice, "general")
                await subscribe(bob, "general")
                ack = await call(alice, send_frame("hello", "c1"))
                assert (ack["type"], ack["seq"]) == ("ack", 1)
                assert (await alice.receive_json_from(timeout=5))["seq"] == 1  # the author's own copy
                got = await bob.receive_json_from(timeout=5)
                assert (got["type"], got["seq"], got["id"], got["body"]) == ("message.new", 1, ack["id"], "hello")
                await assert_quiet(bob)
            assert (thread_calls, loop_calls) == ([], [1])
            assert await sync_to_async(stored)() == [(1, "alice", "hello", "c1")]

        async def test_the_loop_and_the_thread_store_the_same_rows(self, cookies, settings):
            """One message each way: the same columns, the same event payload (its
            id and ts its own), the same frame to a member."""
            frames = []
            async with socket(cookies["alice"]) as alice, socket(cookies["bob"]) as bob:
                await subscribe(alice, "general")
                await subscribe(bob, "general")
                for client_id, loop_writes in (("by-loop", True), ("by-thread", False)):
                    settings.REALTIME = {**settings.REALTIME, "LOOP_WRITES": loop_writes}
                    await call(alice, send_frame("hi @bob", client_id))
                    await alice.receive_json_from(timeout=5)
                    frames.append(await bob.receive_json_from(timeout=5))

            def rows():
                return [(m.seq, m.body, m.client_id, m.created_at.tzinfo is not None,
                         Event.objects.get(room=m.room, seq=m.seq).payload) for m in Message.objects.order_by("seq")]

            (seq1, *loop_row, loop_payload), (seq2, *thread_row, thread_payload) = await sync_to_async(rows)()
            assert (seq1, seq2) == (1, 2)
            assert loop_row == ["hi @bob", "by-loop", True] and thread_row == ["hi @bob", "by-thread", True]
            for payload, frame in ((loop_payload, frames[0]), (thread_payload, frames[1])):
                assert payload["id"] == frame["id"]
                assert payload["mentions"] == frame["mentions"] == ["bob"]
            assert sorted(loop_payload) == sorted(thread_payload)
            assert {k: v for k, v in loop_payload.items() if k not in ("id", "ts", "client_id")} == \
                {k: v for k, v in thread_payload.items() if k not in ("id", "ts", "client_id")}
            assert sorted(frames[0]) == sorted(frames[1])

        async def test_a_repeat_is_answered_with_the_original_by_the_thread(self, cookies, thread_calls):
            before = handed_over("repeat")
            async with socket(cookies["alice"]) as alice:
                await subscribe(alice, "general")
                first = await call(alice, send_frame("once", "same", ref="a"))
                await alice.receive_json_from(timeout=5)
                again = await call(alice, send_frame("once", "same", ref="b"))
                await assert_quiet(alice)  # published again, and dropped by seq: she has it
            assert (again["ref"], again["id"], again["seq"]) == ("b", first["id"], first["seq"])
            assert thread_calls == [1]
            assert handed_over("repeat") == before + 1
            assert await sync_to_async(stored)() == [(1, "alice", "once", "same")]

        async def test_a_refused_send_never_reaches_the_loop(self, cookies, thread_calls, loop_calls):
            async with socket(cookies["carol"]) as carol:  # a reader in general
                await subscribe(carol, "general")
                reply = await call(carol, send_frame("not mine to say", "r1"))
                assert (reply["type"], reply["code"]) == ("error", "forbidden")
                await assert_quiet(carol)
            assert (thread_calls, loop_calls) == ([1], [])
            assert await sync_to_async(stored)() == []

        async def test_queued_sends_to_several_rooms_keep_their_order(self, cookies, thread_calls, loop_calls):
            rooms = ["general", "general", "ops", "general", "general", "ops"]
            async with socket(cookies["alice"]) as alice:
                await subscribe(alice, "general")
                await subscribe(alice, "ops")
                for i, room in enumerate(rooms):  # all queued before the consumer takes the first
                    await alice.send_json_to(send_frame(f"m{i}", f"q{i}", room=room, ref=i))
                frames = [await alice.receive_json_from(timeout=5) for _ in range(2 * len(rooms))]
                await assert_quiet(alice)
            acks = [f for f in frames if f["type"] == "ack"]
            assert [(a["ref"], a["room"], a["seq"]) for a in acks] == [
                (0, "general", 1), (1, "general", 2), (2, "ops", 1), (3, "general", 3), (4, "general", 4), (5, "ops", 2)]
            assert thread_calls == []
            assert sum(loop_calls) == len(rooms) and max(loop_calls) > 1, loop_calls
            assert await sync_to_async(stored)() == [(i + 1, "alice", f"m{n}", f"q{n}") for i, n in enumerate((0, 1, 3, 4))]
            assert await sync_to_async(stored)("ops") == [(1, "alice", "m2", "q2"), (2, "alice", "m5", "q5")]

        async def test_a_dropped_connection_hands_that_batch_to_the_thread_and_reconnects(self, cookies, thread_calls,
                                                                                           loop_calls):
            async with socket(cookies["alice"]) as alice, socket(cookies["bob"]) as bob:
                await subscribe(alice, "general")
                await subscribe(bob, "general")
                await call(alice, send_frame("first", "d1"))
                await alice.receive_json_from(timeout=5)
                pid = loopdb._conn.info.backend_pid

                def terminate():
                    with connection.cursor() as cursor:
                        cursor.execute("SELECT pg_terminate_backend(%s)", [pid])
                        assert cursor.fetchone() == (True,)

                await sync_to_async(terminate)()
                second = await call(alice, send_frame("second", "d2"))
                assert (second["type"], second["seq"]) == ("ack", 2)
                await alice.receive_json_from(timeout=5)
                assert thread_calls == [1]  # the batch the dead connection could not write
                third = await call(alice, send_frame("third", "d3"))
                assert (third["type"], third["seq"]) == ("ack", 3)
                await alice.receive_json_from(timeout=5)
                assert [(await bob.receive_json_from(timeout=5))["seq"] for _ in range(3)] == [1, 2, 3]
                await assert_quiet(bob)
            assert thread_calls == [1] and loop_calls == [1, 1, 1]  # a new connection for the third
            assert loopdb._conn.info.backend_pid != pid
            assert await sync_to_async(stored)() == [(1, "alice", "first", "d1"), (2, "alice", "second", "d2"),
                                                     (3, "alice", "third", "d3")]

        async def test_loop_writes_off_takes_the_thread(self, cookies, settings, thread_calls, loop_calls):
            settings.REALTIME = {**settings.REALTIME, "LOOP_WRITES": False}
            async with socket(cookies["alice"]) as alice:
                await subscribe(alice, "general")
                assert (await call(alice, send_frame("hello", "t1")))["seq"] == 1
            assert (thread_calls, loop_calls) == ([1], [])

        async def test_a_connection_that_cannot_be_opened_rests_the_loop_path(self, cookies, monkeypatch,
                                                                             thread_calls, loop_calls):
            """The database refuses the loop's connection: that batch and the next ones
            go to the thread without trying again, until OPEN_RETRY has passed."""
            opens: list[int] = []
            real_open = loopdb._open

            async def refused():
                opens.append(1)
                if len(opens) == 1:
                    raise psycopg.OperationalError("connection refused")
                return await real_open()

            monkeypatch.setattr(loopdb, "_open", refused)
            monkeypatch.setattr(loopdb, "OPEN_RETRY", 60)
            before = handed_over("OperationalError")
            async with socket(cookies["alice"]) as alice:
                await subscribe(alice, "general")
                for i in range(3):
                    assert (await call(alice, send_frame(f"m{i}", f"o{i}")))["seq"] == i + 1
                    await alice.receive_json_from(timeout=5)
                assert (opens, thread_calls, loop_calls) == ([1], [1, 1, 1], [1])  # one try, then the thread
                assert handed_over("OperationalError") == before + 1
                assert loopdb.enabled() is False
                loopdb._resting_until = time.monotonic()  # its rest over
                assert loopdb.enabled() is True
                assert (await call(alice, send_frame("m3", "o3")))["seq"] == 4
                await alice.receive_json_from(timeout=5)
            assert (opens, thread_calls, loop_calls) == ([1, 1], [1, 1, 1], [1, 1])
            assert [seq for seq, *_ in await sync_to_async(stored)()] == [1, 2, 3, 4]


# On SQLite only (the run it starts is the PostgreSQL one).
if not ON_POSTGRESQL:
    def test_sqlite_never_opens_a_loop_connection(settings):
        assert settings.REALTIME["LOOP_WRITES"] is True
        assert loopdb.enabled() is False

    @pytest.mark.timeout(300)
    def test_the_same_tests_pass_on_postgresql():
        run_module_on_postgresql(__file__, must_pass=LOOP_TESTS)


@pytest.mark.asyncio
async def test_batches_waiting_on_a_failed_open_go_to_the_thread_without_trying_again(monkeypatch):
    """Three batches ask for the connection at once; the first one's open fails: the
    two that waited behind it do not try again (each would pay a connect timeout)."""
    import asyncio

    opens: list[int] = []

    async def refused():
        opens.append(1)
        await asyncio.sleep(0.05)  # the others queue behind it meanwhile
        raise psycopg.OperationalError("connection refused")

    monkeypatch.setattr(loopdb, "_open", refused)
    outcomes = await asyncio.gather(*(loopdb.fetchall("SELECT 1", {}) for _ in range(3)), return_exceptions=True)
    assert [type(outcome) for outcome in outcomes] == [psycopg.OperationalError] * 3
    assert opens == [1]
