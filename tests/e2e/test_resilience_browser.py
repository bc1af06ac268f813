"""The browser client through a server restart and through blocked WebSockets."""

import time

import pytest
from playwright.sync_api import expect

from tests.e2e.test_chat_browser import send, sign_in

pytestmark = pytest.mark.e2e

# Blocks the page's WebSockets the way a proxy that refuses upgrades does: each
# handshake fails (the socket never opens), while plain HTTP still gets through.
BLOCK_WEBSOCKETS = """
(() => {
  const Real = window.WebSocket;
  window.__blockWebSockets = true;
  window.WebSocket = class extends Real {
    constructor(url, protocols) {
      super(window.__blockWebSockets ? url.replace("/ws/v1/", "/ws/blocked/") : url, protocols);
    }
  };
})();
"""


def bodies(page):
    return page.locator("#messages .body").all_text_contents()


def test_blocked_websockets_fall_back_to_long_polling_and_upgrade_back(app_server, browser, artifacts):
    bob = sign_in(browser, app_server, "bob")
    alice = sign_in(browser, app_server, "alice", init_script=BLOCK_WEBSOCKETS)
    expect(bob.locator("#status")).to_have_text("connected", timeout=10_000)
    expect(alice.locator("#status")).to_have_text("connected (long polling)", timeout=20_000)
    before = bodies(alice)

    send(alice, "sent over rest")
    send(bob, "received by polling")
    for page in (alice, bob):
        expect(page.locator("#messages .body")).to_have_text(before + ["sent over rest", "received by polling"], timeout=10_000)
    expect(alice.locator('#messages li[data-state="pending"]')).to_have_count(0)
    alice.screenshot(path=str(artifacts / "fallback.png"))

    # WebSockets work again: the client finds out by itself and switches back.
    sockets = []
    alice.on("websocket", lambda ws: sockets.append(ws.url))
    alice.evaluate("window.__blockWebSockets = false")
    expect(alice.locator("#status")).to_have_text("connected", timeout=25_000)
    assert any(url.endswith("/ws/v1/") for url in sockets)
    send(bob, "after the upgrade")
    send(alice, "and back")
    expected = before + ["sent over rest", "received by polling", "after the upgrade", "and back"]
    for page in (alice, bob):
        expect(page.locator("#messages .body")).to_have_text(expected, timeout=10_000)
    assert alice.errors == [] and bob.errors == []


def test_a_server_restart_loses_and_doubles_nothing(app_server, browser, artifacts):
    alice = sign_in(browser, app_server, "alice")
    bob = sign_in(browser, app_server, "bob")
    for page in (alice, bob):
        expect(page.locator("#status")).to_have_text("connected", timeout=10_000)
    send(alice, "before the restart")
    expect(bob.locator("#messages .body").last).to_have_text("before the restart", timeout=10_000)
    before = bodies(bob)

    app_server.terminate()  # SIGTERM: the drain closes every socket with 4012
    app_server.proc.wait(15)
    for page in (alice, bob):
        expect(page.locator("#status")).to_contain_text("reconnecting", timeout=10_000)
    # Typed while the server is away: shown as pending, sent once it is back.
    send(bob, "while down 1")
    send(bob, "while down 2")
    expect(bob.locator('#messages li[data-state="pending"]')).to_have_count(2)
    alice.screenshot(path=str(artifacts / "reconnecting.png"))
    time.sleep(1)

    app_server.start()
    for page in (alice, bob):
        expect(page.locator("#status")).to_have_text("connected", timeout=30_000)
    expected = before + ["while down 1", "while down 2"]
    for page in (alice, bob):
        expect(page.locator("#messages .body")).to_have_text(expected, timeout=10_000)
    expect(bob.locator('#messages li[data-state="pending"]')).to_have_count(0)
    assert alice.errors == [] and bob.errors == []
