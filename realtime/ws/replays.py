"""A subscribe's reads, made together with other sockets' (a reconnect storm is
thousands of subscribes within seconds):

- its access and head: the subscribes waiting together are checked in one trip to
  the database thread, two queries for all of them (roomlog.room_replays through a
  state/batches.Batcher: a read begins after every subscribe it answers joined its
  room's stream, so the head it reads is as fresh as one of its own);
- the room's read markers, the same way;
- its replay, read once for everyone who asks for the same range at the
same time (a singleflight, as Centrifugo's): after a drain or a crash, the sockets of
a room come back together, most of them from the same seq to the same head, and
each would otherwise read the same rows from the log. The first asks the database;
the others wait for its answer (asyncio.shield: a leader that goes away does not
take the read with it), and the read is forgotten as soon as it is done, so a
later subscribe reads afresh. Keyed by (room, epoch, since, head): only a read that
would return the same rows is shared."""

from __future__ import annotations

import asyncio

from channels.db import database_sync_to_async

from realtime.domain import roomlog, selectors
from realtime.observability import metrics
from realtime.state import store
from realtime.state.batches import Batcher

checks = Batcher("room_replay", roomlog.room_replays)
markers = Batcher("read_markers", selectors.rooms_read_markers)

# The running loop's reads in progress: key -> task (tests run a loop per test).
in_flight = store.LoopLocal(dict)


async def read(pending: tuple[int, str, int, int], slug: str) -> list:
    """The events of `pending` (roomlog.Replay.pending), shared with any identical
    read already under way."""
    flights = in_flight()
    task = flights.get(pending)
    if task is None:
        room_id, _, since, head = pending
        task = asyncio.ensure_future(
            database_sync_to_async(roomlog.read_range)(room_id=room_id, slug=slug, after=since, upto=head))
        flights[pending] = task
        task.add_done_callback(lambda done: flights.pop(pending, None) if flights.get(pending) is done else None)
    else:
        metrics.REPLAY_READS_SHARED.inc()
    return list(await asyncio.shield(task))
