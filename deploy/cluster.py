"""Run the production topology on one machine: PostgreSQL, Redis, N daphne workers
and nginx in front, and with --broker (`make cluster BROKER=nats`) a broker of its
own between the workers (deploy/brokers/). `make cluster` runs this; the tests use
the same classes.

Every server binds 127.0.0.1 on its own port and is stopped by its own pid.
PostgreSQL and Redis are started privately unless DATABASE_URL / REDIS_URL are set.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NGINX_TEMPLATE = ROOT / "deploy" / "nginx" / "realtime.conf.template"
HAPROXY_TEMPLATE = ROOT / "deploy" / "haproxy" / "realtime.cfg.template"


def fill(template: Path, values: dict[str, str]) -> str:
    text = template.read_text()
    for key, value in values.items():
        text = text.replace(f"@@{key}@@", value)
    return text


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """A development certificate for 127.0.0.1 and localhost, made locally."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    if not cert.exists():
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
             "-days", "30", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
            check=True, capture_output=True,
        )
        key.chmod(0o644)  # the balancer's unprivileged workers read it (a throwaway dev key)
    return cert, key


# The ports free_port() handed out lately in this process. The kernel may give the
# same free port to two binds in a row (15 in 200,000 pairs on this machine kind);
# a worker given one port for both its listeners stops on the second listen, after
# the first may already have answered wait_port (the likely cause of a bench run's
# "connection refused"). Bounded: a port handed out long ago is free to come back.
_handed_out: collections.deque[int] = collections.deque(maxlen=4096)


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on and this process has not handed out lately.

    REALTIME_FREE_PORTS ("low-high") names the range to draw from: processes that
    start servers side by side (the test suite's two) each draw from a range of
    their own, so one never hands out a port the other has just handed out and not
    yet bound. Without it the kernel picks (its ephemeral range)."""
    span = os.environ.get("REALTIME_FREE_PORTS", "")
    low, _, high = span.partition("-")
    for _ in range(100_000):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", random.randint(int(low), int(high)) if span else 0))
            except OSError:
                continue  # taken (listening, or held by a closing connection)
            port = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.append(port)
            return port
    raise RuntimeError(f"no free port left in REALTIME_FREE_PORTS={span}")


def wait_port(port: int, timeout: float = 15.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def stop_process(proc: subprocess.Popen | None, timeout: float = 10.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class RedisServer:
    """A throwaway redis-server (no persistence)."""

    def __init__(self, workdir: Path, port: int | None = None):
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            raise FileNotFoundError("redis-server is not installed (Debian: apt-get install redis-server)")
        self.port = port or free_port()
        self.workdir = Path(workdir)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(self.port, proc=self.proc)
        return self

    def stop(self) -> None:
        stop_process(self.proc)


def postgres_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


class PostgresServer:
    """A throwaway PostgreSQL cluster (initdb + pg_ctl), trust auth, fsync off."""

    def __init__(self, port: int | None = None):
        self.bindir = postgres_bin()
        if self.bindir is None:
            raise FileNotFoundError("PostgreSQL is not installed (Debian: apt-get install postgresql)")
        self.port = port or free_port()
        # Not under a private tmp dir: the postgres user must be able to reach it.
        self.workdir = Path(tempfile.mkdtemp(prefix="realtime-pg-"))
        self.workdir.chmod(0o755)
        self.data = self.workdir / "data"
        self.as_root = os.geteuid() == 0

    @property
    def url(self) -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/app"

    def _run(self, *args: str) -> None:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if self.as_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def start(self) -> "PostgresServer":
        if self.as_root:
            shutil.chown(self.workdir, "postgres", "postgres")
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C.UTF-8")
        options = (
            f"-p {self.port} -k {self.workdir} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
        )
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.workdir / "server.log"), "-w", "-o", options, "start")
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "app")
        return self

    def stop(self) -> None:
        if self.data.exists():
            try:
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "stop")
            except subprocess.CalledProcessError:
                pass
        shutil.rmtree(self.workdir, ignore_errors=True)


class Worker:
    """One daphne worker of the app."""

    def __init__(self, name: str, env: dict[str, str], workdir: Path, port: int | None = None,
                 tls_port: int | None = None):
        self.name = name
        self.port = port or free_port()
        # daphne's own TLS endpoint (wss straight to the worker), beside plain http.
        self.tls_port = tls_port or free_port()
        self.cert, self.key = self_signed_certificate(Path(workdir))
        self.env = {**env, "REALTIME_WORKER_ID": name}
        self.log = Path(workdir) / f"worker-{name}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def tls_url(self) -> str:
        return f"https://127.0.0.1:{self.tls_port}"

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "realtime.server", "-b", "127.0.0.1", "-p", str(self.port),
            "-e", f"ssl:{self.tls_port}:privateKey={self.key}:certKey={self.cert}:interface=127.0.0.1",
            # Protocol-level pings (browsers answer them by themselves) find dead peers.
            "--ping-interval", "20", "--ping-timeout", "30",
            # The largest client frame: a 4000-character body escaped as JSON
            # fits with room to spare; a larger one is closed with 1009.
            "--websocket-max-message-size", "65536", "--websocket-max-frame-size", "65536",
            # Seconds the app has to accept a socket (also autobahn's opening
            # handshake timeout); REALTIME_HANDSHAKE_TIMEOUT bounds the HTTP part.
            "--websocket_connect_timeout", "10",
            "project.asgi:application",
        ]

    def start(self) -> "Worker":
        if self.proc is not None and self.proc.poll() is None:
            return self  # already running: a second process could not bind the port
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.command(), cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_port(self.port, proc=self.proc)
            wait_port(self.tls_port, proc=self.proc)
        except BaseException:
            # Not listening in time (a loaded machine): stop it, or it outlives its caller.
            self.proc.kill()
            self.proc.wait()
            raise
        return self

    def terminate(self) -> None:
        """SIGTERM: the graceful drain (realtime/server/drain.py)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL: the crash the delivery guarantee must survive."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        stop_process(self.proc)


class Nginx:
    """nginx with deploy/nginx/realtime.conf.template, in its own directory."""

    name = "nginx"

    def __init__(self, workdir: Path, workers: list[Worker], static_root: Path, port: int | None = None,
                 tls_port: int | None = None, header_timeout: int = 10, conn_per_address: int = 256):
        self.binary = shutil.which(self.name) or (f"/usr/sbin/{self.name}" if os.path.exists(f"/usr/sbin/{self.name}") else None)
        if self.binary is None:
            raise FileNotFoundError(f"{self.name} is not installed (Debian: apt-get install {self.name})")
        self.port = port or free_port()
        self.tls_port = tls_port or free_port()
        self.dir = Path(workdir) / self.name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cert, self.key = self_signed_certificate(Path(workdir))
        self.workers = workers
        self.static_root = static_root
        # Seconds a request head may take; connections per client address.
        self.limits = {"HEADER_TIMEOUT": str(header_timeout), "CONN_PER_ADDRESS": str(conn_per_address)}
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def tls_url(self) -> str:
        return f"https://127.0.0.1:{self.tls_port}"

    def stop(self) -> None:
        stop_process(self.proc)

    def render(self) -> str:
        upstreams = "\n".join(f"    server 127.0.0.1:{w.port} max_fails=1 fail_timeout=2s;" for w in self.workers)
        mime = "/etc/nginx/mime.types"
        listen = (
            f"    listen 127.0.0.1:{self.port};\n"
            f"    listen 127.0.0.1:{self.tls_port} ssl;\n"
            f"    ssl_certificate {self.cert};\n"
            f"    ssl_certificate_key {self.key};"
        )
        return fill(NGINX_TEMPLATE, {
            "DIR": str(self.dir),
            "MIME_TYPES": mime if os.path.exists(mime) else str(self.dir / "mime.types"),
            "UPSTREAMS": upstreams,
            "LISTEN": listen,
            "STATIC_ROOT": str(self.static_root),
            **self.limits,
        })

    def start(self) -> "Nginx":
        for sub in ("tmp/body", "tmp/proxy", "tmp/fastcgi", "tmp/uwsgi", "tmp/scgi"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        if not os.path.exists("/etc/nginx/mime.types"):
            (self.dir / "mime.types").write_text("types { text/css css; application/javascript js; image/png png; }\n")
        conf = self.dir / "nginx.conf"
        conf.write_text(self.render())
        args = [self.binary, "-p", str(self.dir), "-c", str(conf), "-e", str(self.dir / "nginx-error.log")]
        subprocess.run([*args, "-t"], check=True, capture_output=True)
        self.proc = subprocess.Popen([*args, "-g", "daemon off;"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port, proc=self.proc)
        wait_port(self.tls_port, proc=self.proc)
        return self


class HAProxy(Nginx):
    """HAProxy with deploy/haproxy/realtime.cfg.template (static files from the workers)."""

    name = "haproxy"

    def render(self) -> str:
        pem = self.dir / "combined.pem"
        pem.write_bytes(self.cert.read_bytes() + self.key.read_bytes())
        binds = f"  bind 127.0.0.1:{self.port}\n  bind 127.0.0.1:{self.tls_port} ssl crt {pem}"
        servers = "\n".join(f"  server {w.name} 127.0.0.1:{w.port}" for w in self.workers)
        return fill(HAPROXY_TEMPLATE, {"DIR": str(self.dir), "BINDS": binds, "SERVERS": servers, **self.limits})

    def start(self) -> "HAProxy":
        conf = self.dir / "haproxy.cfg"
        conf.write_text(self.render())
        subprocess.run([self.binary, "-c", "-q", "-f", str(conf)], check=True, capture_output=True)
        self.proc = subprocess.Popen([self.binary, "-W", "-db", "-f", str(conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        wait_port(self.port, proc=self.proc)
        wait_port(self.tls_port, proc=self.proc)
        return self


BALANCERS = {"nginx": Nginx, "haproxy": HAProxy}


class Cluster:
    """PostgreSQL + Redis + N workers + nginx."""

    def __init__(self, workdir: Path, workers: int = 2, port: int | None = None, database_url: str = "",
                 redis_url: str = "", extra_env: dict[str, str] | None = None, balancer: str = "nginx",
                 tls_port: int | None = None, broker: str = ""):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.n_workers = workers
        # Ports are chosen up front: the allowed origins name them.
        self.port = port or free_port()
        self.tls_port = tls_port or free_port()
        self.worker_ports = [(free_port(), free_port()) for _ in range(workers)]
        self.database_url = database_url
        self.redis_url = redis_url
        self.extra_env = extra_env or {}
        self.balancer_kind = balancer
        self.postgres: PostgresServer | None = None
        self.redis: RedisServer | None = None
        self.workers: list[Worker] = []
        self.balancer: Nginx | None = None  # nginx or HAProxy
        # A broker of its own between the workers (deploy/brokers/), or "": Redis
        # pub/sub on REDIS_URL.
        self.broker_kind = broker
        self.broker = None

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "DJANGO_ALLOW_ASYNC_UNSAFE"}
        env.update(
            {
                "DJANGO_DEBUG": "0",
                "DJANGO_SECRET_KEY": env.get("DJANGO_SECRET_KEY") or os.urandom(32).hex(),
                "DJANGO_ALLOWED_HOSTS": env.get("DJANGO_ALLOWED_HOSTS") or "127.0.0.1,localhost",
                "DATABASE_URL": self.database_url,
                "REDIS_URL": self.redis_url,
                "DJANGO_STATIC_ROOT": str(self.workdir / "static"),
                # The balancer sets X-Forwarded-Proto itself (deploy/ templates).
                "DJANGO_BEHIND_TLS_PROXY": "1",
                # The balancer runs on this machine: its X-Forwarded-For names the
                # client (realtime/web/proxies.py); anyone else's is ignored.
                "REALTIME_TRUSTED_PROXIES": env.get("REALTIME_TRUSTED_PROXIES") or "127.0.0.1",
                "DJANGO_ALLOWED_ORIGINS": env.get("DJANGO_ALLOWED_ORIGINS") or ",".join(self.origins()),
                "PYTHONUNBUFFERED": "1",
                **({"REALTIME_BROKER_URL": self.broker.url} if self.broker is not None else {}),
                **self.extra_env,
            }
        )
        return env

    def origins(self) -> list[str]:
        """The balancer's and each worker's own origins, under both local names."""
        found = []
        for host in ("127.0.0.1", "localhost"):
            found += [f"http://{host}:{self.port}", f"https://{host}:{self.tls_port}"]
            for port, tls_port in self.worker_ports:
                found += [f"http://{host}:{port}", f"https://{host}:{tls_port}"]
        return found

    def manage(self, *args: str) -> None:
        subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, env=self.env(), check=True,
                       stdout=subprocess.DEVNULL)

    def start(self) -> "Cluster":
        try:
            if not self.database_url:
                self.postgres = PostgresServer().start()
                self.database_url = self.postgres.url
            if not self.redis_url:
                self.redis = RedisServer(self.workdir).start()
                self.redis_url = self.redis.url
            if self.broker_kind:
                from deploy import brokers

                self.broker = brokers.server(self.broker_kind, self.workdir).start()
            self.manage("migrate", "--noinput")
            self.manage("collectstatic", "--noinput")
            self.manage("seed_demo")
            env = self.env()
            self.workers = [
                Worker(chr(ord("a") + i), env, self.workdir, port=port, tls_port=tls_port).start()
                for i, (port, tls_port) in enumerate(self.worker_ports)
            ]
            self.balancer = BALANCERS[self.balancer_kind](
                self.workdir, self.workers, self.workdir / "static", port=self.port, tls_port=self.tls_port
            ).start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.balancer:
            self.balancer.stop()
        for worker in self.workers:
            worker.stop()
        if self.broker:
            self.broker.stop()
        if self.redis:
            self.redis.stop()
        if self.postgres:
            self.postgres.stop()


RESTART_RETRY = 2.0  # seconds before a worker that failed to start is tried again


def keep_up(workers, retry_at: dict, now: float) -> None:
    """Start again each worker that has exited. One that fails to start (it exits
    before it listens: a worker refuses to start while its broker cannot be reached)
    is tried again RESTART_RETRY seconds later; the cluster around it stays up."""
    for w in workers:
        if w.proc.poll() is None or now < retry_at.get(w.name, 0.0):
            continue
        print(f"worker {w.name} exited ({w.proc.returncode}); restarting it on port {w.port}", flush=True)
        try:
            w.start()
        except RuntimeError as exc:
            retry_at[w.name] = now + RESTART_RETRY
            print(f"worker {w.name} did not start ({exc}); trying again in {RESTART_RETRY:.0f} s", flush=True)
        else:
            retry_at.pop(w.name, None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=int(os.environ.get("WORKERS", 2)))
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", 8080)))
    parser.add_argument("--tls-port", type=int, default=int(os.environ.get("TLS_PORT", 8443)))
    parser.add_argument("--balancer", choices=sorted(BALANCERS), default=os.environ.get("BALANCER", "nginx"))
    parser.add_argument("--dir", default=str(ROOT / ".cluster"), help="state and logs")
    parser.add_argument("--broker", default=os.environ.get("BROKER", ""),
                        help="a broker of its own between the workers: redis, redis-sharded, redis-cluster, nats, "
                             "amqp or kafka (default: Redis pub/sub on REDIS_URL)")
    args = parser.parse_args()
    cluster = Cluster(
        Path(args.dir), workers=args.workers, port=args.port,
        database_url=os.environ.get("DATABASE_URL", ""), redis_url=os.environ.get("REDIS_URL", ""),
        balancer=args.balancer, tls_port=args.tls_port, broker=args.broker,
    )
    cluster.start()
    print(f"{args.balancer}: {cluster.balancer.url}/ and {cluster.balancer.tls_url}/ (self-signed: {cluster.balancer.cert})")
    print("log in as alice, bob or carol; password demo-password")
    for w in cluster.workers:
        print(f"worker {w.name}: {w.url} and {w.tls_url}  pid {w.proc.pid}  log {w.log}")
    print(f"postgres: {cluster.database_url}\nredis:    {cluster.redis_url}")
    if cluster.broker is not None:
        from realtime.delivery.transport import hide_password

        print(f"broker:   {cluster.broker_kind} at {hide_password(cluster.broker.url)}")
    print("Ctrl-C stops everything.")
    stop = False

    def on_signal(signum, frame):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    retry_at: dict[str, float] = {}
    try:
        while not stop:
            time.sleep(0.5)
            keep_up(cluster.workers, retry_at, time.monotonic())
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
