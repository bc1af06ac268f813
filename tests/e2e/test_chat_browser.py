"""Two people chat in real browsers through a real daphne server."""

import re

import pytest
from playwright.sync_api import expect

from tests.e2e.conftest import OPEN_CONTEXTS

pytestmark = pytest.mark.e2e


def sign_in(browser, server, username, base=None, init_script=None, viewport=None):
    base = base or server.url
    context = browser.new_context(viewport=viewport or {"width": 1000, "height": 700}, ignore_https_errors=True)
    OPEN_CONTEXTS.append(context)
    if init_script:
        context.add_init_script(init_script)
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    # The pages run under the app's Content-Security-Policy: a violation is a bug.
    # So is a listener of the client that threw (the client logs it and goes on).
    page.on("console", lambda msg: errors.append(msg.text)
            if "Content Security Policy" in msg.text or "realtime listener failed" in msg.text else None)
    page.goto(f"{base}/accounts/login/?next=/rooms/general/")
    page.fill("#id_username", username)
    page.fill("#id_password", "demo-password")
    page.click("button[type=submit]")
    page.wait_for_url(f"{base}/rooms/general/")
    page.errors = errors
    return page


def send(page, text):
    page.fill("#body", text)
    page.click("#send")


def test_two_users_chat_in_real_time(app_server, browser, artifacts):
    alice = sign_in(browser, app_server, "alice")
    bob = sign_in(browser, app_server, "bob")
    for page in (alice, bob):
        expect(page.locator("#status")).to_have_text("connected", timeout=10_000)

    hostile = "<script>alert(1)</script><img src=x onerror=alert(2)>"
    send(alice, hostile)
    # Shown as text, once, in both windows; the pending copy gave way to the stored one.
    for page in (alice, bob):
        expect(page.locator("#messages .body")).to_have_text([hostile], timeout=10_000)
        assert page.locator("#messages img").count() == 0
    expect(alice.locator('#messages li[data-state="pending"]')).to_have_count(0)

    send(bob, "hi alice")
    send(bob, "second")
    for page in (alice, bob):
        expect(page.locator("#messages .body")).to_have_text([hostile, "hi alice", "second"], timeout=10_000)
        expect(page.locator("#messages .author")).to_have_text(["alice", "bob", "bob"])

    # An edit and a delete reach the other window as deltas.
    bob.locator("#messages li", has_text="second").get_by_role("button", name="Edit").click()
    bob.locator("#messages form.edit textarea").fill("second, edited")
    bob.locator("#messages form.edit").get_by_role("button", name="Save").click()
    expect(alice.locator("#messages .body")).to_have_text([hostile, "hi alice", "second, edited"], timeout=10_000)
    alice.locator("#messages li", has_text="hi alice").get_by_role("button", name="Delete").click()
    alice.locator("#messages li", has_text="hi alice").get_by_role("button", name="Yes, delete").click()
    expect(bob.locator("#messages .body")).to_have_text([hostile, "second, edited"], timeout=10_000)

    # A reload resumes from history: the same messages, none twice.
    bob.reload()
    expect(bob.locator("#status")).to_have_text("connected", timeout=10_000)
    expect(bob.locator("#messages .body")).to_have_text([hostile, "second, edited"], timeout=10_000)

    alice.screenshot(path=str(artifacts / "chat.png"))
    assert alice.errors == [] and bob.errors == []


def test_reader_sees_messages_but_has_no_composer(app_server, browser):
    carol = sign_in(browser, app_server, "carol")
    expect(carol.locator("#status")).to_have_text("connected", timeout=10_000)
    expect(carol.locator("#read-only")).to_be_visible()
    assert carol.locator("#composer").count() == 0
    # Found using it: the page's composer is absent, and a reconnect asked it to resume.
    carol.evaluate("window.realtimeClient.socket.ws.close()")
    expect(carol.locator("#status")).to_have_text("connected", timeout=10_000)
    assert carol.errors == []


def test_wss_straight_to_daphnes_tls_endpoint(app_server, browser):
    """No proxy: daphne itself serves https and wss with a self-signed certificate."""
    page = sign_in(browser, app_server, "bob", base=app_server.tls_url)
    expect(page.locator("#status")).to_have_text("connected", timeout=10_000)
    sockets = []
    page.on("websocket", lambda ws: sockets.append(ws.url))
    page.reload()
    expect(page.locator("#status")).to_have_text("connected", timeout=10_000)
    assert sockets and sockets[0].startswith(f"wss://127.0.0.1:{app_server.tls_port}/ws/v1/")
    send(page, "over tls")
    expect(page.locator("#messages .body").last).to_have_text("over tls", timeout=10_000)
    assert page.errors == []


def test_unread_counts_in_the_room_list_at_phone_width(app_server, browser, artifacts):
    phone = {"width": 390, "height": 780}
    bob = sign_in(browser, app_server, "bob", viewport=phone)
    expect(bob.locator("#status")).to_have_text("connected", timeout=10_000)
    alice = sign_in(browser, app_server, "alice")
    alice.goto(f"{app_server.url}/rooms/ops/")
    expect(alice.locator("#status")).to_have_text("connected", timeout=10_000)

    ops = bob.locator('.rooms a[data-room="ops"]')
    expect(ops.locator(".unread")).to_be_hidden()
    send(alice, "ops one")
    send(alice, "ops two")
    expect(ops.locator(".unread")).to_have_text("2, 2 unread", timeout=10_000)
    # At phone width the room list hides behind the ☰ button, which counts the unread.
    assert not ops.is_visible() and bob.locator("#composer").is_visible()
    expect(bob.locator("#sidebar-toggle")).to_have_text("☰ Rooms (2 unread)")
    bob.locator("#sidebar-toggle").click()
    expect(bob.locator("#sidebar-toggle")).to_have_attribute("aria-expanded", "true")
    assert ops.is_visible()
    expect(ops).to_have_accessible_name(re.compile(r"^#ops\s*,\s*2 unread\s*$"))
    bob.screenshot(path=str(artifacts / "phone.png"))

    # Reading the room clears it (the server keeps the position: alice sees bob's
    # read marker); news after that counts again from there.
    ops.click()
    expect(bob.locator("#messages .body").last).to_have_text("ops two", timeout=10_000)
    expect(alice.locator("#messages li", has_text="ops two").locator(".readers")).to_have_text("Seen by bob", timeout=10_000)
    bob.locator("#sidebar-toggle").click()
    bob.locator('.rooms a[data-room="general"]').click()
    expect(bob.locator("#status")).to_have_text("connected", timeout=10_000)
    expect(bob.locator('.rooms a[data-room="ops"] .unread')).to_be_hidden()
    send(alice, "ops three")
    expect(bob.locator('.rooms a[data-room="ops"] .unread')).to_have_text("1, 1 unread", timeout=10_000)
    assert bob.errors == [] and alice.errors == []


def test_the_page_is_labelled_for_assistive_technology(app_server, browser):
    bob = sign_in(browser, app_server, "bob")
    expect(bob.locator("#status")).to_have_text("connected", timeout=10_000)
    # State changes are announced by a live region of their own; the badge (with
    # its countdown) and the message list (history loads as you scroll) are not live.
    assert bob.locator("#status-live").get_attribute("role") == "status"
    expect(bob.locator("#status-live")).to_have_text("connected")
    assert bob.locator("#status").get_attribute("aria-live") is None
    assert bob.locator("#messages").get_attribute("aria-live") is None
    assert bob.locator("#announce").get_attribute("aria-live") == "polite"
    expect(bob.get_by_role("navigation", name="Rooms")).to_be_visible()
    expect(bob.get_by_label("Message", exact=True)).to_be_visible()
    # Keyboard: the composer is reachable and Enter sends.
    bob.get_by_label("Message", exact=True).focus()
    bob.keyboard.type("typed with the keyboard")
    bob.keyboard.press("Enter")
    expect(bob.locator("#messages .body").last).to_have_text("typed with the keyboard", timeout=10_000)


def test_dark_theme_follows_the_system(app_server, browser, artifacts):
    context = browser.new_context(color_scheme="dark", viewport={"width": 1000, "height": 700})
    page = context.new_page()
    page.goto(f"{app_server.url}/accounts/login/")
    background = page.evaluate("getComputedStyle(document.body).backgroundColor")
    assert background == "rgb(17, 19, 24)", background  # --bg of the dark palette
    page.fill("#id_username", "bob")
    page.fill("#id_password", "demo-password")
    page.click("button[type=submit]")
    page.goto(f"{app_server.url}/rooms/general/")
    expect(page.locator("#status")).to_have_text("connected", timeout=10_000)
    page.screenshot(path=str(artifacts / "chat-dark.png"))
    context.close()


def test_presence_and_typing_between_two_people(app_server, browser, artifacts):
    bob = sign_in(browser, app_server, "bob")
    alice = sign_in(browser, app_server, "alice")
    for page in (alice, bob):
        expect(page.locator("#status")).to_have_text("connected", timeout=10_000)
    expect(bob.locator("#presence")).to_have_text("Here now: alice, bob", timeout=10_000)
    alice.locator("#body").press_sequentially("hello th", delay=50)
    expect(bob.locator("#typing")).to_have_text("alice is typing…", timeout=5_000)
    expect(alice.locator("#typing")).to_have_text("")  # not to the typist
    bob.screenshot(path=str(artifacts / "typing.png"))
    expect(bob.locator("#typing")).to_have_text("", timeout=8_000)  # it expires by itself
    alice.context.close()
    expect(bob.locator("#presence")).to_have_text("Here now: bob", timeout=10_000)
    assert bob.errors == []
