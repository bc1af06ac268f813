"""NATS as the broker: a private nats-server (no JetStream: the engine uses core
NATS only), on 127.0.0.1 and a free port. It starts in milliseconds."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from deploy.cluster import free_port, stop_process, wait_port


class NatsServer:
    """`nats-server -a 127.0.0.1 -p PORT`; `restart()` comes back on the same port."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.binary = shutil.which("nats-server") or ("/usr/sbin/nats-server" if Path("/usr/sbin/nats-server").exists()
                                                      else None)
        if self.binary is None:
            raise FileNotFoundError("nats-server is not installed (Debian: apt-get install nats-server)")
        self.workdir = Path(workdir)
        self.port = port or free_port()
        self.log = self.workdir / "nats-server.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> "NatsServer":
        if self.proc is not None and self.proc.poll() is None:
            return self
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([self.binary, "-a", "127.0.0.1", "-p", str(self.port)],
                                         stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_port(self.port, proc=self.proc)
        except BaseException:
            stop_process(self.proc)
            raise
        return self

    def stop(self) -> None:
        stop_process(self.proc)

    def restart(self) -> None:
        self.stop()
        self.start()
