"""The load generator's bookkeeping (bench/loadgen.py, bench/drain.py), without a
server: deliveries merged from helper processes, the drain client's seq tracking
and its reconnect delays. No timing is asserted."""

from types import SimpleNamespace

from bench import drain, loadgen


def test_deliveries_from_several_helper_processes_merge_into_one_summary():
    sent = {0: 10.0, 1: 11.0, 2: 12.0}
    # Two helpers' members as finish_helpers rebuilds them from their JSON.
    first = loadgen.Delivered([[0, 10.002], [1, 11.004], [2, 12.001]])
    second = loadgen.Delivered([[0, 10.003], [0, 10.005], [2, 12.010]])
    result = loadgen.summarize(sent, [first, second], started=10.0)
    assert result["deliveries"] == 5
    assert result["lost"] == 1  # the second member never had message 1
    assert result["duplicated"] == 1  # and had message 0 twice
    assert result["max_ms"] == 10.0


def test_the_drain_client_keeps_the_last_seq_and_counts_every_copy():
    target = SimpleNamespace(kind="full", cookie="sessionid=x", room="bench")
    storm = drain.Storm(target, "r1")
    client = drain.Client(storm, 1234)
    client.conn = conn = object()
    client.frame(conn, b'{"type":"message.new","room":"bench","seq":41,"id":1,"body":"r1:7:"}', 1.0)
    client.frame(conn, b'{"type":"message.new","room":"bench","seq":42,"id":2,"body":"r1:8:"}', 1.1)
    client.frame(conn, b'{"type":"message.new","room":"bench","seq":41,"id":1,"body":"r1:7:"}', 1.2)
    client.frame(conn, b'{"type":"presence.diff","room":"bench","joins":["a"],"count":2}', 1.3)
    client.frame(object(), b'{"type":"message.new","room":"bench","seq":50,"id":9,"body":"r1:9:"}', 1.4)  # an old socket's
    assert client.got == [7, 8, 7]
    assert client.last_seq == 42


def test_the_reconnect_delays_follow_the_browser_clients_equal_jitter():
    for attempt in range(8):
        ceiling = min(drain.BACKOFF_CAP, drain.BACKOFF_BASE * 2 ** attempt)
        for _ in range(50):
            assert ceiling / 2 <= drain.backoff(attempt) <= ceiling
