"""deploy.cluster.free_port: a free port, never the same one twice in a row."""

import os
import socket

import pytest

from deploy import cluster


class _Kernel:
    """A stand-in socket whose bind(0) answers from a script, as the kernel may:
    the same free port twice in a row."""

    answers: list[int] = []

    def __init__(self, *args):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def bind(self, address):
        self.port = _Kernel.answers.pop(0)

    def getsockname(self):
        return ("127.0.0.1", self.port)


def test_a_port_the_kernel_gives_twice_is_handed_out_once(monkeypatch):
    monkeypatch.delenv("REALTIME_FREE_PORTS", raising=False)  # the kernel picks
    monkeypatch.setattr(cluster, "_handed_out", cluster.collections.deque(maxlen=4096))
    monkeypatch.setattr(cluster.socket, "socket", _Kernel)
    _Kernel.answers = [40001, 40001, 40001, 40003]
    assert cluster.free_port() == 40001
    assert cluster.free_port() == 40003
    assert _Kernel.answers == []


def test_the_port_free_port_gives_can_be_bound():
    with socket.socket() as s:
        s.bind(("127.0.0.1", cluster.free_port()))  # nothing else holds it


def test_ports_come_from_the_range_named_and_one_in_use_is_skipped(monkeypatch):
    """REALTIME_FREE_PORTS ("low-high"): what the test suite's processes each draw
    from (tests/conftest.py), so two never hand out the same port."""
    monkeypatch.setattr(cluster, "_handed_out", cluster.collections.deque(maxlen=4096))
    # Within this process's own range (the suite's other process draws from another).
    first, last = map(int, os.environ.get("REALTIME_FREE_PORTS", "24000-26000").split("-"))
    held = socket.socket()
    try:
        for low in range(first, last - 2, 3):  # three ports in a row: the first held, two free
            try:
                held.bind(("127.0.0.1", low))
                for port in (low + 1, low + 2):
                    with socket.socket() as probe:
                        probe.bind(("127.0.0.1", port))
                break
            except OSError:
                held.close()
                held = socket.socket()
        held.listen()
        monkeypatch.setenv("REALTIME_FREE_PORTS", f"{low}-{low + 2}")
        assert sorted(cluster.free_port() for _ in range(2)) == [low + 1, low + 2]
        # Every port of the range handed out or taken: said, not waited on forever.
        with pytest.raises(RuntimeError, match="no free port left"):
            cluster.free_port()
    finally:
        held.close()


def test_a_worker_that_fails_to_start_again_is_retried_and_the_cluster_stays_up(capsys):
    """Found using it: a worker killed while Redis was down could not start again
    (it refuses to start without its broker), and the RuntimeError ended
    deploy/cluster.py's loop, taking nginx and every other worker with it."""
    class Proc:
        returncode = -9

        def poll(self):
            return self.returncode

    class Worker:
        name, port = "a", 8001

        def __init__(self):
            self.proc, self.starts = Proc(), 0

        def start(self):
            self.starts += 1
            if self.starts == 1:
                raise RuntimeError("process exited with 2 before listening on 8001")
            self.proc.returncode = None

    worker, retry_at = Worker(), {}
    cluster.keep_up([worker], retry_at, now=100.0)
    assert worker.starts == 1 and retry_at == {"a": 100.0 + cluster.RESTART_RETRY}
    cluster.keep_up([worker], retry_at, now=101.0)  # (not before the retry is due)
    assert worker.starts == 1
    cluster.keep_up([worker], retry_at, now=102.0)
    assert worker.starts == 2 and retry_at == {} and worker.proc.poll() is None
    cluster.keep_up([worker], retry_at, now=103.0)  # (running: left alone)
    assert worker.starts == 2
    assert "worker a did not start (process exited with 2 before listening on 8001); trying again in 2 s" in (
        capsys.readouterr().out)
