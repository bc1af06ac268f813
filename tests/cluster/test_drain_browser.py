"""A drain as a person sees it, in Chromium behind the balancer: the pages on the
drained worker are closed with 4012 and the drain's `spread_ms`, come back on the
other worker within it (not after the client's own second of jitter), and show
every message once."""

from __future__ import annotations

import contextlib

import pytest
from playwright.sync_api import expect
from websockets.sync.client import connect

from tests.cluster.conftest import login, split_sources, worker_for, ws_url
from tests.e2e.conftest import artifacts, browser, close_contexts  # noqa: F401  (fixtures)
from tests.e2e.test_chat_browser import send, sign_in

pytestmark = [pytest.mark.cluster, pytest.mark.e2e]

PHONE = {"width": 390, "height": 844}

# Every close the page's sockets get, with its reason (the client keeps only the code).
RECORD_CLOSES = """
window.__closes = [];
const Native = window.WebSocket;
window.WebSocket = class extends Native {
  constructor(...args) {
    super(...args);
    this.addEventListener("close", (e) => window.__closes.push({ code: e.code, reason: e.reason }));
  }
};
"""
RECORD_STATES = "() => { window.__states = []; window.realtimeClient.on('state', (s) => window.__states.push({ ...s })); }"


def bodies(page) -> list[str]:
    return page.locator("#messages .body").all_text_contents()


def test_pages_on_a_drained_worker_come_back_within_its_spread_and_miss_nothing(cluster, browser, artifacts):
    base = cluster.balancer.url
    split_sources(base)  # the balancer sends to both workers again (one stopped by an earlier test may be marked down)
    # The browser's address, 127.0.0.1, is sent to one worker: that one is drained.
    victim = next(w for w in cluster.workers if w.name == worker_for(base, "127.0.0.1"))
    alice = sign_in(browser, None, "alice", base=base, init_script=RECORD_CLOSES)
    bob = sign_in(browser, None, "bob", base=base, init_script=RECORD_CLOSES, viewport=PHONE)
    for page in (alice, bob):
        expect(page.locator("#status")).to_have_text("connected", timeout=15_000)
        page.evaluate(RECORD_STATES)
    # Twenty more sockets on it: a drain of 22 closes them in 20 batches 50 ms apart.
    cookie = login(base, "carol")
    others = contextlib.ExitStack()
    for _ in range(20):
        others.enter_context(connect(ws_url(base), subprotocols=["rt.v1.json"], origin=base,
                                     additional_headers={"Cookie": cookie}, open_timeout=5))
    try:
        send(alice, "before the drain")
        for page in (alice, bob):
            expect(page.locator("#messages .body").last).to_have_text("before the drain", timeout=10_000)
        before = bodies(bob)

        victim.terminate()  # SIGTERM: the drain
        assert victim.proc.wait(15) == 0
        for page in (alice, bob):
            expect(page.locator("#status")).to_have_text("connected", timeout=15_000)
            closes = page.evaluate("window.__closes")
            assert closes == [{"code": 4012, "reason": "spread_ms=50"}], closes
            waits = [s for s in page.evaluate("window.__states") if s["state"] == "reconnecting"]
            assert waits and waits[0]["code"] == 4012, waits
            # Drawn in [0, 50) ms; the client's own jitter would have been 100 to 1,000.
            assert 0 <= waits[0]["delay"] < 50, waits

        send(alice, "after the drain")
        send(bob, "and back from a phone")
        expected = before + ["after the drain", "and back from a phone"]
        for page in (alice, bob):
            expect(page.locator("#messages .body")).to_have_text(expected, timeout=10_000)
        bob.screenshot(path=str(artifacts / f"drained-phone-{cluster.balancer_kind}.png"))
        assert alice.errors == [] and bob.errors == []
    finally:
        others.close()
        if victim.proc.poll() is not None:
            victim.start()
