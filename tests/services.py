"""Private service instances for the test session: each on a random free port,
bound to 127.0.0.1, stopped by its own pid. The process classes are the ones
`make cluster` uses (deploy/cluster.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from deploy.cluster import (  # noqa: F401  (re-exported for the tests)
    ROOT,
    Cluster,
    HAProxy,
    Nginx,
    PostgresServer,
    RedisServer,
    Worker,
    free_port,
    wait_port,
)


class AppServer(Worker):
    """The app under daphne in its own process, on its own SQLite file."""

    def __init__(self, workdir: Path, env: dict[str, str] | None = None):
        workdir = Path(workdir)
        base = {k: v for k, v in os.environ.items() if k not in ("DJANGO_ALLOW_ASYNC_UNSAFE", "DATABASE_URL", "REDIS_URL")}
        base.update(
            {
                "DATABASE_URL": f"sqlite:///{workdir / 'app.sqlite3'}",
                "DJANGO_STATIC_ROOT": str(workdir / "static"),
                "PYTHONUNBUFFERED": "1",
                **(env or {}),
            }
        )
        super().__init__("solo", base, workdir)

    def manage(self, *args: str) -> None:
        subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, env=self.env, check=True,
                       stdout=subprocess.DEVNULL)
