"""The suite's own running in two processes (tests/conftest.py): a module's tests
go to one process, every cluster module's to the same one."""

import collections
import os
import re
import subprocess
import sys
from types import SimpleNamespace

from tests.conftest import scope_of
from tests.services import ROOT

MODULES = ["tests/deploy/test_cluster_ports.py", "tests/realtime/test_protocol.py",
           "tests/realtime/test_frames.py", "tests/accounts/test_tickets.py"]


def test_the_cluster_modules_are_one_unit_and_every_other_module_its_own():
    assert scope_of("tests/cluster/test_drain.py::test_x[nginx]") == "tests/cluster"
    assert scope_of("tests/cluster/test_gaps.py::test_y") == "tests/cluster"
    assert scope_of("tests/brokers/test_contract.py::test_z[kafka]") == "tests/brokers/test_contract.py"
    assert scope_of("tests/realtime/test_openapi.py::test_w[GET /api/v1/rooms/]") == "tests/realtime/test_openapi.py"


def test_each_module_runs_in_one_process():
    run = subprocess.run([sys.executable, "-m", "pytest", "-n", "2", "-v", "-p", "no:cacheprovider", *MODULES],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    ran = collections.defaultdict(set)
    for worker, module in re.findall(r"^\[(gw\d+)\] .*? (tests/\S+?\.py)::", run.stdout, re.M):
        ran[module].add(worker)
    assert sorted(ran) == sorted(MODULES), run.stdout[-3000:]
    assert {module: len(workers) for module, workers in ran.items()} == {module: 1 for module in MODULES}, dict(ran)


def test_each_process_takes_a_slice_of_its_controllers_ports(monkeypatch):
    """deploy.cluster.free_port's range (REALTIME_FREE_PORTS): a controller keeps
    the range it was given; its processes split it, and one started in place of a
    crashed one (gw2 of two) takes the crashed one's slice."""
    from tests import conftest

    slices = []
    for worker in ("gw0", "gw1", "gw2"):
        monkeypatch.setenv("REALTIME_FREE_PORTS", "20000-29999")
        conftest.pytest_configure(SimpleNamespace(workerinput={"workerid": worker, "workercount": 2}))
        slices.append(os.environ["REALTIME_FREE_PORTS"])
    assert slices == ["20000-24999", "25000-29999", "20000-24999"]
    conftest.pytest_configure(SimpleNamespace())
    assert os.environ["REALTIME_FREE_PORTS"] == "20000-24999"
