"""deploy.cluster.free_port: a free port, never the same one twice in a row."""

import socket

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
    monkeypatch.setattr(cluster, "_handed_out", cluster.collections.deque(maxlen=4096))
    monkeypatch.setattr(cluster.socket, "socket", _Kernel)
    _Kernel.answers = [40001, 40001, 40001, 40003]
    assert cluster.free_port() == 40001
    assert cluster.free_port() == 40003
    assert _Kernel.answers == []


def test_the_port_free_port_gives_can_be_bound():
    with socket.socket() as s:
        s.bind(("127.0.0.1", cluster.free_port()))  # nothing else holds it
