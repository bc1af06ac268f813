"""RabbitMQ as the broker: a private rabbitmq-server node of its own (not the
machine's shared one at 127.0.0.1:5672, which is never touched), on 127.0.0.1 and
free ports, with every file under its work directory.

RabbitMQ 3.10's scripts (/usr/lib/rabbitmq/bin/rabbitmq-server, rabbitmq-env)
honour these, each set here:

| Variable | Here |
| --- | --- |
| RABBITMQ_NODENAME | `rt<port>@localhost` (a name of its own on the machine's epmd) |
| RABBITMQ_NODE_IP_ADDRESS, RABBITMQ_NODE_PORT | 127.0.0.1 and a free port (AMQP) |
| RABBITMQ_DIST_PORT | another free port (Erlang distribution) |
| RABBITMQ_MNESIA_BASE, RABBITMQ_LOG_BASE | the work directory's `mnesia/`, `log/` |
| RABBITMQ_CONFIG_FILE | the work directory's `rabbitmq.conf` (the listener) |
| RABBITMQ_ADVANCED_CONFIG_FILE | none (a path that does not exist) |
| RABBITMQ_ENABLED_PLUGINS_FILE | an empty file: no plugins |
| RABBITMQ_CONF_ENV_FILE | an empty file: /etc/rabbitmq/rabbitmq-env.conf (the shared node's) is not read |
| HOME | the work directory: the node's Erlang cookie is its own |

The node runs as the user starting it; `guest` may log in only from loopback
(RabbitMQ's default), which is all this needs. The machine's epmd (started by
the shared RabbitMQ) registers the node; if there is none, Erlang starts one, as
for any node. Ready means an AMQP login and a channel succeed, not just an open
port. It starts in about 7.5 s on a 2-core machine under load (measured: 7.4 s
fresh, 7.5 to 7.8 s again on the same database; up to 18 s when the machine was
busier), most of it the Erlang VM loading RabbitMQ; a restart keeps its database
(the durable exchange survives it), and `stop()` shuts the node down cleanly
(about 1.2 s).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import signal
import subprocess
import time
from pathlib import Path

from deploy.cluster import free_port, stop_process, wait_port

SCRIPT = "/usr/lib/rabbitmq/bin/rabbitmq-server"
START_TIMEOUT = 90.0


class RabbitServer:
    """A private rabbitmq-server; `restart()` comes back on the same ports, with the
    same database."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        if not os.path.exists(SCRIPT):
            raise FileNotFoundError("rabbitmq-server is not installed (Debian: apt-get install rabbitmq-server)")
        self.workdir = Path(workdir)
        self.port = port or free_port()
        self.dist_port = free_port()
        self.node = f"rt{self.port}@localhost"
        self.log = self.workdir / "rabbitmq-server.log"
        self.proc: subprocess.Popen | None = None
        self.started_in: float | None = None  # seconds, the last start

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def env(self) -> dict[str, str]:
        w = self.workdir
        for name in ("mnesia", "log"):
            (w / name).mkdir(parents=True, exist_ok=True)
        (w / "rabbitmq.conf").write_text(
            f"listeners.tcp.1 = 127.0.0.1:{self.port}\n"
            "loopback_users.guest = true\n"
            "log.file.level = info\n"
            "log.console = false\n"
        )
        (w / "enabled_plugins").write_text("[].\n")
        (w / "rabbitmq-env.conf").write_text("")
        keep = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        return {
            **keep,
            "HOME": str(w),
            "RABBITMQ_CONF_ENV_FILE": str(w / "rabbitmq-env.conf"),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(w / "mnesia"),
            "RABBITMQ_LOG_BASE": str(w / "log"),
            "RABBITMQ_CONFIG_FILE": str(w / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(w / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(w / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(w / "rabbitmq.pid"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        }

    def start(self) -> "RabbitServer":
        if self.proc is not None and self.proc.poll() is None:
            return self
        began = time.monotonic()
        with open(self.log, "ab") as log:
            # A session of its own: stop() can reach the Erlang VM and its helpers
            # (they are the script's children) if the script does not stop them.
            self.proc = subprocess.Popen([SCRIPT], env=self.env(), stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self._wait_ready(began + START_TIMEOUT)
        except BaseException:
            self.stop()
            raise
        self.started_in = time.monotonic() - began
        return self

    def _wait_ready(self, deadline: float) -> None:
        """Until a login and a channel succeed (the listener opens last in
        RabbitMQ's boot, but a login proves it). Runs the client on a thread of its
        own: start() may be called from a coroutine, on a running loop. The port
        first, quietly (aiormq logs every refused connection as an error)."""
        wait_port(self.port, timeout=max(deadline - time.monotonic(), 0.1), proc=self.proc)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"rabbitmq-server exited with {self.proc.returncode} (see {self.log})")
                if pool.submit(asyncio.run, _logs_in(self.url)).result():
                    return
                if time.monotonic() > deadline:
                    raise TimeoutError(f"RabbitMQ on 127.0.0.1:{self.port} not ready after {START_TIMEOUT:g} s")
                time.sleep(0.2)

    def stop(self) -> None:
        proc = self.proc
        if proc is None:
            return
        # SIGTERM to the script: it stops the VM cleanly and waits for it.
        stop_process(proc, timeout=60)
        with_group = proc.pid
        try:
            os.killpg(with_group, signal.SIGKILL)  # anything of this node still there
        except ProcessLookupError:
            pass

    def restart(self) -> None:
        self.stop()
        self.start()


async def _logs_in(url: str) -> bool:
    import aio_pika

    try:
        connection = await aio_pika.connect(url, timeout=2)
    except Exception:
        return False
    try:
        channel = await connection.channel()
        await channel.close()
        return True
    except Exception:
        return False
    finally:
        await connection.close()
