"""Two people, one on the long-polling fallback (WebSockets blocked): each sees the
other here, typing, and how far they have read (issue 17, defect 7)."""

import pytest
from playwright.sync_api import expect

from tests.e2e.test_chat_browser import send, sign_in
from tests.e2e.test_resilience_browser import BLOCK_WEBSOCKETS

pytestmark = pytest.mark.e2e


def test_presence_typing_and_read_markers_with_one_person_long_polling(app_server, browser, artifacts):
    bob = sign_in(browser, app_server, "bob")
    alice = sign_in(browser, app_server, "alice", init_script=BLOCK_WEBSOCKETS)
    expect(bob.locator("#status")).to_have_text("connected", timeout=10_000)
    expect(alice.locator("#status")).to_have_text("connected (long polling)", timeout=20_000)

    # Here now: the poller is here for the socket user, and sees them.
    for page in (alice, bob):
        expect(page.locator("#presence")).to_have_text("Here now: alice, bob", timeout=10_000)

    # Typing, both ways.
    alice.locator("#body").press_sequentially("hello th", delay=50)
    expect(bob.locator("#typing")).to_have_text("alice is typing…", timeout=5_000)
    expect(alice.locator("#typing")).to_have_text("")  # not to the typist
    bob.locator("#body").press_sequentially("hi al", delay=50)
    expect(alice.locator("#typing")).to_have_text("bob is typing…", timeout=5_000)
    alice.screenshot(path=str(artifacts / "fallback-typing.png"))
    alice.locator("#body").fill("")
    bob.locator("#body").fill("")

    # Read markers, both ways: bob reads alice's message, alice (polling) reads bob's.
    send(alice, "did you see this?")
    expect(alice.locator("#messages li", has_text="did you see this?").locator(".readers")).to_have_text(
        "Seen by bob", timeout=10_000)
    send(bob, "yes")
    expect(bob.locator("#messages li", has_text="yes").locator(".readers")).to_have_text(
        "Seen by alice", timeout=10_000)
    # bob has read his own "yes": his marker leaves alice's message, and is not
    # shown under his own (writing it says he saw it).
    expect(alice.locator("#messages li", has_text="did you see this?").locator(".readers")).to_have_count(
        0, timeout=10_000)
    expect(alice.locator("#messages .readers")).to_have_count(0)
    alice.screenshot(path=str(artifacts / "fallback-read-marker.png"))

    # The poller closes the page as a person does (its unload handlers run): it says
    # goodbye, and leaves at once, whether or not a poll was held at that moment.
    alice.close(run_before_unload=True)
    expect(bob.locator("#presence")).to_have_text("Here now: bob", timeout=10_000)
    assert bob.errors == []
