"""Redis Cluster as the broker: three masters, no replicas, sharded pub/sub
(engines/redis_cluster.py).

Each master has its own directory (its nodes.conf), port and cluster bus port
(`--cluster-port`: the default, port + 10000, does not exist above 55535, where
free ports often are). The first start creates the cluster (`redis-cli --cluster
create`); a start after a stop brings the same nodes back on the same ports from
their nodes.conf, so the cluster comes back with the same slots. Nothing is
persisted but the cluster's layout (`--save '' --appendonly no`).

`url` names one node: REALTIME_BROKER_URL takes a single redis+cluster:// URL
(transport.engine_class refuses a comma-separated list for any scheme but
redis://), and any node is enough to find the rest (CLUSTER SLOTS).
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from deploy.cluster import free_port, stop_process, wait_port

MASTERS = 3
NODE_TIMEOUT_MS = 5000  # cluster-node-timeout: how long before a silent node counts as failing
READY_TIMEOUT = 30.0  # seconds to wait for cluster_state:ok


class ClusterNode:
    """One master: its own directory, port and bus port, stopped by its own pid."""

    def __init__(self, binary: str, directory: Path) -> None:
        self.binary = binary
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.bus_port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        with open(self.directory / "redis.log", "ab") as log:
            self.proc = subprocess.Popen(
                [self.binary, "--port", str(self.port), "--cluster-port", str(self.bus_port),
                 "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                 "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
                 "--save", "", "--appendonly", "no", "--bind", "127.0.0.1", "--dir", str(self.directory)],
                stdout=log, stderr=subprocess.STDOUT, cwd=self.directory,
            )
        try:
            wait_port(self.port, proc=self.proc)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        stop_process(self.proc)

    def cluster_info(self) -> dict[str, str]:
        import redis

        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=1, socket_timeout=2)
        try:
            text = client.execute_command("CLUSTER", "INFO")
        finally:
            client.close()
        if isinstance(text, bytes):
            text = text.decode()
        if isinstance(text, dict):  # a client version that parses it
            return {str(k): str(v) for k, v in text.items()}
        return dict(line.split(":", 1) for line in text.strip().splitlines() if ":" in line)


class RedisClusterServer:
    """MASTERS redis-servers in cluster mode; REALTIME_BROKER_URL names the first."""

    def __init__(self, workdir: Path, masters: int = MASTERS) -> None:
        binary = shutil.which("redis-server")
        self.cli = shutil.which("redis-cli")
        if binary is None or self.cli is None:
            raise FileNotFoundError("redis-server and redis-cli are not installed (Debian: apt-get install redis-server)")
        self.workdir = Path(workdir)
        self.nodes = [ClusterNode(binary, self.workdir / f"node-{i}") for i in range(masters)]

    @property
    def url(self) -> str:
        # Every node: a worker starts even if the first one is down.
        return "redis+cluster://" + ",".join(node.address for node in self.nodes)

    @property
    def created(self) -> bool:
        """Whether the cluster was made already (every node has its layout)."""
        return all((node.directory / "nodes.conf").exists() and (node.directory / "nodes.conf").stat().st_size
                   for node in self.nodes)

    def start(self) -> "RedisClusterServer":
        try:
            existed = self.created
            for node in self.nodes:
                node.start()
            if not existed:
                subprocess.run([self.cli, "--cluster", "create", *(node.address for node in self.nodes),
                                "--cluster-replicas", "0", "--cluster-yes"],
                               check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60)
            self.wait_ok()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ok(self, timeout: float = READY_TIMEOUT) -> None:
        """Until every node says cluster_state:ok (a restarted master waits about
        two seconds before it does)."""
        deadline = time.monotonic() + timeout
        last = None
        while True:
            states = []
            for node in self.nodes:
                if node.proc is None or node.proc.poll() is not None:
                    raise RuntimeError(f"redis cluster node {node.address} exited (see {node.directory}/redis.log)")
                try:
                    states.append(node.cluster_info().get("cluster_state"))
                except Exception as exc:  # not answering yet
                    states.append(repr(exc))
            if all(state == "ok" for state in states):
                return
            last = states
            if time.monotonic() > deadline:
                raise TimeoutError(f"redis cluster not ok after {timeout:g} s: {last}")
            time.sleep(0.05)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def restart(self) -> None:
        """Down, then up again on the same ports with the same slots (nodes.conf)."""
        self.stop()
        self.start()
