"""A real server (daphne, its own SQLite file) and headless Chromium for end-to-end tests."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import missing

from tests.services import AppServer

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
CHROME_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
]


def chromium_path() -> str | None:
    return os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def app_server(tmp_path_factory):
    server = AppServer(tmp_path_factory.mktemp("app"))
    server.manage("migrate", "--noinput")
    server.manage("seed_demo")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser():
    path = chromium_path()
    if path is None:
        missing("Chromium is not installed (Debian: apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    # Context-managed (not pytest-playwright's session fixture) so that its event
    # loop is gone before the asyncio tests run.
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=path, headless=True, args=CHROME_FLAGS)
        yield browser
        browser.close()


@pytest.fixture
def artifacts():
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


# Browser contexts opened by a test; closed after it, so that one test's pages
# (their sockets, their presence in rooms) never leak into the next.
OPEN_CONTEXTS: list = []


@pytest.fixture(autouse=True)
def close_contexts():
    yield
    while OPEN_CONTEXTS:
        try:
            OPEN_CONTEXTS.pop().close()
        except Exception:
            pass
