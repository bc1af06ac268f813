"""The contract every broker engine keeps (realtime/delivery/transport.py), run
against a real server of each kind (deploy/brokers/): two daphne workers behind
nginx on one PostgreSQL, the broker between them, presence and limits on a Redis
of their own (REDIS_URL)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from deploy import brokers
from tests.conftest import missing
from tests.services import Cluster, PostgresServer

# Every engine REALTIME_BROKER_URL can name, in the order they run.
ENGINES = brokers.available()


@pytest.fixture(scope="session")
def broker_postgres():
    try:
        server = PostgresServer().start()
    except FileNotFoundError as exc:
        missing(str(exc))
    yield server
    server.stop()


@pytest.fixture(scope="module", params=ENGINES)
def engine(request, broker_postgres):
    """Two workers behind nginx with the broker `request.param` between them."""
    workdir = Path(tempfile.mkdtemp(prefix=f"realtime-broker-{request.param}-"))
    workdir.chmod(0o755)  # nginx's workers read the static files
    c = Cluster(workdir, workers=2, balancer="nginx", database_url=broker_postgres.url, broker=request.param,
                extra_env={
                    "REALTIME_RATE_MESSAGE_SEND": "100000/100000",
                    "DJANGO_LOGIN_RATE_LIMIT": "10000/m",
                    "REALTIME_MAX_CONNECTIONS_PER_USER": "1000",
                    "REALTIME_EXPOSE_WORKER": "1",
                    "REALTIME_RATE_HANDSHAKE_USER": "10000/10000",
                    "REALTIME_RATE_HANDSHAKE_ADDRESS": "10000/10000",
                    "REALTIME_REPLAY_BUDGET": "100000000/100000000",
                })
    try:
        c.start()
    except FileNotFoundError as exc:
        missing(str(exc))
    yield c
    c.stop()
    artifacts = Path(__file__).resolve().parents[2] / "test-artifacts" / f"broker-{request.param}"
    artifacts.mkdir(parents=True, exist_ok=True)
    for log in workdir.glob("worker-*.log"):
        shutil.copy(log, artifacts / log.name)
    shutil.rmtree(workdir, ignore_errors=True)
