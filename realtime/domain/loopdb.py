"""The worker's own PostgreSQL connection on the event loop, for the one statement
on the sender's path (roomlog.write_messages_async: a message.send's seq, row and
event).

Every other database call goes to Django's database thread (channels'
database_sync_to_async). That trip costs a hand-over of the GIL each way: to the
thread, and back to a loop that may be busy delivering the messages before, so
its time grows with the worker's load, on the path from a frame received to the
first member's delivery. A message.send whose checks pass from what the socket
already holds (its subscription's access: domain/services.py) needs one
statement, which psycopg's async connection sends from the loop itself.

One connection a process (a worker runs one loop), in autocommit: the statement
is its own transaction, as on the database thread. A connection that fails is
dropped and the next statement opens a new one; the caller falls back to the
database thread for that batch (domain/services.py), whose answer (a repeat, a
room gone, the database down) is the one the thread path gives. A connection that
cannot be opened rests the loop path for OPEN_RETRY seconds: every batch goes to
the thread meanwhile, rather than each paying a failed connect (and a warning)
first. A loop other than the connection's (a test's next loop) gets a connection
of its own; the old one is closed without its loop (`discard`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from logging import WARNING

import psycopg
import psycopg.sql
from django.conf import settings
from django.db import connections

from realtime.observability.logs import event

log = logging.getLogger("realtime.db")

_conn: psycopg.AsyncConnection | None = None
_loop: asyncio.AbstractEventLoop | None = None
_opening: asyncio.Lock | None = None
_resting_until = 0.0  # time.monotonic() until which no connection is tried

OPEN_RETRY = 5.0  # seconds the loop path rests after a connection could not be opened


def enabled() -> bool:
    """Is there a loop connection to use: PostgreSQL, REALTIME["LOOP_WRITES"] on,
    and not resting after a connection that could not be opened."""
    return (connections["default"].vendor == "postgresql" and settings.REALTIME["LOOP_WRITES"]
            and time.monotonic() >= _resting_until)


async def fetchall(sql: str, params: dict) -> list[tuple]:
    """Run one statement (Django's placeholders: %(name)s, bound client-side as
    Django binds them) in its own transaction; its rows."""
    conn = await _connection()
    try:
        async with conn.cursor() as cursor:
            await cursor.execute(sql, params)
            return await cursor.fetchall()
    except psycopg.Error:
        if conn.broken or conn.closed:
            await _drop(conn)
        raise


async def _connection() -> psycopg.AsyncConnection:
    global _conn, _loop, _opening, _resting_until
    loop = asyncio.get_running_loop()
    if _loop is not loop:
        discard()
        _loop, _opening = loop, asyncio.Lock()
    if _conn is not None and not _conn.closed:
        return _conn
    async with _opening:  # one opening at a time; the others use what it opened
        if _conn is None or _conn.closed:
            if time.monotonic() < _resting_until:
                # The opening they waited for failed: to the thread, without trying again.
                raise psycopg.OperationalError("the loop connection is resting after a failed open")
            try:
                _conn = await _open()
            except Exception as exc:
                _resting_until = time.monotonic() + OPEN_RETRY
                event(log, WARNING, "db.loop_connection_failed", reason=type(exc).__name__, retry_in=OPEN_RETRY)
                raise
            _resting_until = 0.0
        return _conn


async def _open() -> psycopg.AsyncConnection:
    database = connections["default"]
    params = database.get_connection_params()
    params.pop("cursor_factory", None)
    conn = await psycopg.AsyncConnection.connect(**params, autocommit=True, cursor_factory=psycopg.AsyncClientCursor)
    try:
        if role := database.settings_dict["OPTIONS"].get("assume_role"):
            await conn.execute(psycopg.sql.SQL("SET ROLE {}").format(psycopg.sql.Literal(role)))
    except BaseException:
        await conn.close()
        raise
    return conn


async def _drop(conn: psycopg.AsyncConnection) -> None:
    global _conn
    if _conn is conn:
        _conn = None
    event(log, WARNING, "db.loop_connection_dropped")
    await conn.close()


def discard() -> None:
    """Close this process's loop connection now, from any thread, its loop running
    or not (a test's loop that has ended; the socket is closed directly)."""
    global _conn, _resting_until
    conn, _conn = _conn, None
    _resting_until = 0.0
    if conn is not None and not conn.closed:
        conn.pgconn.finish()
