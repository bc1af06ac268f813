"""The worker's guard on HTTP connections (realtime/server/guard.py), driven with a
fake clock: a deadline per request, graceful for an idle kept-alive connection,
abrupt for a request that trickles; the per-address count given back."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from realtime.server.guard import GuardedHTTPChannel, PendingCounter


class Transport(StringTransport):
    aborted = False

    def abortConnection(self):
        self.aborted = True
        super().abortConnection()


@pytest.fixture
def channel(settings):
    settings.REALTIME = {**settings.REALTIME, "HANDSHAKE_TIMEOUT": 2.0}
    clock = Clock()
    ch = GuardedHTTPChannel()
    ch.callLater = clock.callLater
    ch.timeOut = None  # Twisted's own idle timeout out of the way: the deadline alone
    transport = Transport()
    ch.makeConnection(transport)
    return ch, transport, clock


def test_a_request_that_trickles_is_cut_off_at_the_deadline(channel):
    ch, transport, clock = channel
    for i in range(19):  # a byte every 0.1 s: an idle timeout would never fire
        ch.dataReceived(b"GET / HTTP/1.1\r\nX-Slow: "[i:i + 1])
        clock.advance(0.1)
    assert not transport.disconnecting
    clock.advance(0.2)
    assert transport.aborted


def test_a_connection_that_sends_nothing_is_closed_gracefully(channel):
    ch, transport, clock = channel
    clock.advance(1.9)
    assert not transport.disconnecting
    clock.advance(0.2)
    assert transport.disconnecting and not transport.aborted  # what it was sent still goes out


def test_the_per_address_count_is_given_back_when_the_connection_ends_or_upgrades():
    counter = PendingCounter()
    assert counter.take("198.51.100.1", 2) and counter.take("198.51.100.1", 2)
    assert not counter.take("198.51.100.1", 2)
    assert counter.take("198.51.100.2", 2)
    for address, how in (("198.51.100.1", "lost"), ("198.51.100.1", "upgraded")):
        ch = GuardedHTTPChannel()
        ch.address, ch.counted = address, counter
        ch.callLater = Clock().callLater
        ch.makeConnection(StringTransport())
        if how == "lost":
            ch.connectionLost(None)
        else:
            ch.upgraded()
            ch.upgraded()  # twice gives back once
    assert counter.open == {"198.51.100.2": 1}


@pytest.mark.parametrize("sockets, expected", [
    (0, (1.0, 1)),  # nothing to close: one empty batch
    (10, (1.0, 10)),  # fewer sockets than batches: one each
    (800, (1.0, 20)),  # within the rate: the configured spread, a batch every 50 ms
    (5000, (5.0, 100)),  # more than 1,000 a second would hand back in 1 s: 5 s
    (40000, (10.0, 200)),  # never longer than the drain's timeout
])
def test_a_drain_spreads_its_closes_by_its_size(sockets, expected):
    from realtime.server.drain import schedule

    assert schedule(sockets, spread=1.0, rate=1000.0, longest=10.0) == expected


@pytest.mark.parametrize("sockets, reason", [
    (0, "spread_ms=1000"),  # one batch: back within the whole spread
    (4, "spread_ms=250"),  # a batch each, 250 ms apart
    (800, "spread_ms=50"),  # a batch every 50 ms: back within 50 ms, as evenly as closed
    (5000, "spread_ms=50"),
    (40000, "spread_ms=50"),
])
def test_a_drains_close_reason_asks_for_the_socket_back_within_the_time_between_batches(sockets, reason):
    from realtime.server.drain import restart_reason, schedule

    assert restart_reason(*schedule(sockets, spread=1.0, rate=1000.0, longest=10.0)) == reason


def test_a_short_drain_spread_never_asks_a_batch_back_in_under_50_ms():
    from realtime.server.drain import restart_reason, schedule

    assert restart_reason(*schedule(1, spread=0.01, rate=1000.0, longest=10.0)) == "spread_ms=50"
    assert restart_reason(*schedule(5000, spread=1.01, rate=1000.0, longest=1.01)) == "spread_ms=50"  # 21 batches


def test_a_drain_closes_each_open_socket_of_a_batch_with_4012_and_the_reason():
    from daphne.ws_protocol import WebSocketProtocol

    from realtime.server.drain import Drain

    class Socket:
        def __init__(self, state):
            self.state, self.closed = state, []

        def sendClose(self, **kwargs):
            self.closed.append(kwargs)

    open_, closing = Socket(WebSocketProtocol.STATE_OPEN), Socket(WebSocketProtocol.STATE_CLOSING)
    Drain._close_batch([open_, closing], "spread_ms=50")
    assert open_.closed == [{"code": 4012, "reason": "spread_ms=50"}]
    assert closing.closed == []  # already closing: left alone


@pytest.mark.parametrize("reason, spread", [
    ("spread_ms=50", 50), ("spread_ms=0", 0), ("spread_ms=999999999", 30000),
    ("", None), (None, None), ("spread_ms=", None), ("spread_ms=-5", None), ("spread_ms=1e3", None),
    ("spread_ms=50 ", None), ("other=50", None), ("spread_ms=\u0663", None), ("spread_ms=1234567890", None),
])
def test_a_restart_reason_is_read_as_the_browser_client_reads_it(reason, spread):
    from realtime import protocol

    assert protocol.restart_spread(reason) == spread
