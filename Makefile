# make run   - the app on its embedded default (SQLite, in-memory layer, one process)
# make test  - install what the tests need, then run them all
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000

# The first Python 3.11+ on PATH.
PYTHON ?= $(shell for p in python3.13 python3.12 python3.11 python3; do \
	command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null && { echo $$p; break; }; done)

.PHONY: run test cluster system-deps docs clean bench

$(VENV)/.requirements: requirements.txt
	@test -n "$(PYTHON)" || { echo "Python 3.11 or newer is needed (e.g. apt-get install python3)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	touch $@

$(VENV)/.requirements-dev: $(VENV)/.requirements requirements-dev.txt
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	touch $@

$(VENV)/.requirements-bench: $(VENV)/.requirements-dev requirements-bench.txt
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-bench.txt
	touch $@

run: $(VENV)/.requirements
	$(PY) manage.py migrate --noinput
	$(PY) manage.py seed_demo
	@echo "Open http://$(HOST):$(PORT)/ and log in as alice, bob or carol, or admin (staff) - password: demo-password."
	$(PY) manage.py runserver $(HOST):$(PORT)

# The production topology on this machine: PostgreSQL and Redis (private, unless
# DATABASE_URL / REDIS_URL are set), WORKERS daphne workers, nginx on 127.0.0.1:8080;
# BROKER=redis-sharded|redis-cluster|nats|amqp|kafka puts a broker of its own between them.
cluster: $(VENV)/.requirements system-deps
	$(PY) deploy/cluster.py --workers $${WORKERS:-2} --port $${CLUSTER_PORT:-8080}

system-deps:
	@bash .ci/system-deps.sh

# REALTIME_TEST_STRICT: a program the tests need that is missing fails them
# instead of skipping them (system-deps installs it as root on Debian/Ubuntu).
# The Node tests' own packages (protobufjs), from tests/js/package-lock.json.
tests/js/node_modules/.installed: tests/js/package-lock.json
	npm ci --prefix tests/js --no-audit --no-fund --loglevel=error
	touch $@

# The suite runs in TEST_PROCESSES processes (pytest-xdist): a test module, and
# the cluster's modules as one, go to one process (tests/conftest.py's scheduler).
TEST_PROCESSES ?= 2
test: $(VENV)/.requirements-dev system-deps tests/js/node_modules/.installed
	REALTIME_TEST_STRICT=1 $(PY) -m pytest -n $(TEST_PROCESSES)
	node --test tests/js/

docs: $(VENV)/.requirements
	$(PY) manage.py protocol_docs

clean:
	rm -rf $(VENV) db.sqlite3 staticfiles test-artifacts .pytest_cache .cluster

# Node's socket.io, measured against us by bench/peers.py.
bench/peer_servers/node_modules/.installed: bench/peer_servers/package-lock.json
	npm ci --prefix bench/peer_servers --no-audit --no-fund --loglevel=error
	touch $@

# Benchmarks (bench/run.py): the full pipeline against a bare Channels consumer,
# same worker code, same run, issue 18's scale scenarios among them; writes
# bench/RESULTS.md and bench/scale.png. Before it, the engines, brokers, tracing
# and the Socket.IO peers (bench/peers.py), whose tables RESULTS.md takes in.
# Not part of `make test`.
bench: $(VENV)/.requirements-bench system-deps bench/peer_servers/node_modules/.installed
	$(PY) -m bench.engines
	$(PY) -m bench.brokers
	$(PY) -m bench.tracing
	$(PY) -m bench.peers
	$(PY) bench/run.py
