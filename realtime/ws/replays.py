"""A subscribe's reads, made together with other sockets' (a reconnect storm is
thousands of subscribes within seconds):

- its access and head: the subscribes waiting together are checked in one trip to
  the database thread, two queries for all of them (roomlog.room_replays through a
  state/batches.Batcher: a read begins after every subscribe it answers joined its
  room's stream, so the head it reads is as fresh as one of its own);
- the room's read markers, the same way;
- its replay, and a subscription's gap repair (between), read once for everyone
who asks for the same range at the same time (a singleflight, as Centrifugo's): after a drain or a crash, the sockets of
a room come back together, most of them from the same seq to the same head, and
each would otherwise read the same rows from the log. The first asks the database;
the others wait for its answer (asyncio.shield: a leader that goes away does not
take the read with it), and the read is forgotten as soon as it is done, so a
later subscribe reads afresh. Keyed by (room, epoch, since, head) for a replay,
("gap", slug, after, upto) for a gap repair (a range below a head that was
committed before anyone asked): only a read that would return the same rows is
shared.

What a read returns (`Replayed`) is encoded once per codec and framed once for
all the sockets that share it, and each socket is sent its replay in one write
(stream.Stream.send_replayed), not one trip through ASGI, daphne and autobahn per
event: after a drain, the surviving worker's time went to exactly that."""

from __future__ import annotations

import asyncio
from collections import Counter

from channels.db import database_sync_to_async

from realtime import protocol
from realtime.domain import roomlog, selectors
from realtime.observability import metrics
from realtime.state import store
from realtime.state.batches import Batcher

checks = Batcher("room_replay", roomlog.room_replays)
markers = Batcher("read_markers", selectors.rooms_read_markers)

# The running loop's reads in progress: key -> task (tests run a loop per test).
in_flight = store.LoopLocal(dict)


class Replayed:
    """Room events read from the log for one or more sockets (a subscribe's replay,
    a gap repair), with their encodings made on first use and kept: once per codec
    however many sockets are sent them."""

    __slots__ = ("events", "_tags", "_encoded", "_frames")

    def __init__(self, events: list[protocol.RoomEvent]) -> None:
        self.events = events
        self._tags: Counter | None = None
        self._encoded: dict[str, list[bytes]] = {}
        self._frames: dict[str, list[bytes]] = {}

    @property
    def tags(self) -> Counter:
        """How many events of each frame type (for metrics.FRAMES_OUT), counted when
        first asked: a subscribe to a quiet room replays nothing and never asks (a
        Counter made anyway was 2% of a connect storm)."""
        if self._tags is None:
            self._tags = Counter(event.__struct_config__.tag for event in self.events)
        return self._tags

    def __len__(self) -> int:
        return len(self.events)

    def encoded(self, codec: protocol.Codec) -> list[bytes]:
        """Each event as `codec` encodes it (their sizes are what the replay costs
        the user's budget)."""
        found = self._encoded.get(codec.name)
        if found is None:
            found = self._encoded[codec.name] = [codec.encode(event) for event in self.events]
        return found

    def frames(self, codec: protocol.Codec) -> list[bytes]:
        """Every event as a WebSocket frame of its own: what a socket is sent in one
        write (kept apart, so that a send bound passed part-way cuts between two)."""
        found = self._frames.get(codec.name)
        if found is None:
            found = self._frames[codec.name] = [protocol.websocket_frame(data, codec.binary)
                                                for data in self.encoded(codec)]
        return found


async def read(pending: tuple[int, str, int, int], slug: str) -> Replayed:
    """The events of `pending` (roomlog.Replay.pending), shared with any identical
    read already under way."""
    room_id, _, since, head = pending
    return await _shared(pending, lambda: roomlog.read_range(room_id=room_id, slug=slug, after=since, upto=head))


async def between(slug: str, after: int, upto: int) -> Replayed:
    """A gap repair's events (roomlog.room_events_between), shared with any
    identical read already under way: when a worker's sockets in a room miss the
    same events together (a lost pub/sub message, a worker's own event overtaken
    by another's), one read answers them all, encoded once a codec. Its error
    (the room gone, too far behind, no longer kept) is each of theirs."""
    return await _shared(("gap", slug, after, upto),
                         lambda: roomlog.room_events_between(slug=slug, after=after, upto=upto))


async def _shared(key: tuple, reading) -> Replayed:
    """`reading()` in the database thread, once for every caller with the same key
    while it runs (a leader that goes away does not take it with the others)."""
    flights = in_flight()
    task = flights.get(key)
    if task is None:
        task = asyncio.ensure_future(_read(reading))
        flights[key] = task
        task.add_done_callback(lambda done: flights.pop(key, None) if flights.get(key) is done else None)
        # Its error is each asker's; when every asker went away first (a socket
        # closed meanwhile), it is nobody's and is not logged as unretrieved.
        task.add_done_callback(store.retrieved)
    else:
        metrics.REPLAY_READS_SHARED.inc()
    return await asyncio.shield(task)


async def _read(reading) -> Replayed:
    return Replayed(await database_sync_to_async(reading)())
