"""The chat page's defects from issue 17, each in a real browser: a session ended
in another tab, an operator's disconnect, 45 messages typed over the rate limit,
"Here now" and background rooms, retry now and an unreachable server, the edit box
and delete confirm, the styled 403 page, and accessibility (contrast, focus, skip
link, labelled buttons)."""

import re
import time

import pytest
from playwright.sync_api import expect

from tests.e2e.test_chat_browser import send, sign_in

pytestmark = pytest.mark.e2e

# Lets a test keep message.send frames from leaving (they stay "sending…"), and
# block sockets and HTTP as a server that is down does.
HOLD = """
(() => {
  const Real = window.WebSocket;
  window.__holdSends = false;
  window.__blockWebSockets = false;
  window.WebSocket = class extends Real {
    constructor(url, protocols) {
      super(window.__blockWebSockets ? url.replace("/ws/v1/", "/ws/blocked/") : url, protocols);
    }
    send(data) {
      if (window.__holdSends && String(data).includes('"message.send"')) return;
      super.send(data);
    }
  };
})();
"""


def connected(page):
    expect(page.locator("#status")).to_have_text("connected", timeout=10_000)


def history(page, room="general"):
    """The room's stored bodies, oldest first, from the REST API."""
    answer = page.request.get(f"{page.url.split('/rooms/')[0]}/api/v1/rooms/{room}/messages/?limit=200").json()
    return [m["body"] for m in answer["messages"]]


def until(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


# -- (1) the session ends in another tab; an operator disconnects ------------------
def test_logout_in_another_tab_shows_signed_out_and_keeps_what_was_unsent(app_server, browser, artifacts):
    bob = sign_in(browser, app_server, "bob", init_script=HOLD)
    connected(bob)
    send(bob, "said before the logout")
    expect(bob.locator('#messages li[data-state="sent"] .actions button')).to_have_text(
        ["☺ React", "Edit", "Delete"], timeout=10_000)
    bob.evaluate("window.__holdSends = true")
    send(bob, "typed just before the logout")
    expect(bob.locator('#messages li[data-state="pending"]')).to_have_count(1)

    other_tab = bob.context.new_page()
    other_tab.goto(f"{app_server.url}/")
    other_tab.get_by_role("button", name="Log out").click()

    expect(bob.locator("#status")).to_have_text("signed out", timeout=10_000)
    expect(bob.locator("#status-live")).to_have_text("signed out")
    sign_in_link = bob.locator("#signed-out a")
    expect(sign_in_link).to_have_text("Sign in again")
    assert sign_in_link.get_attribute("href") == "/accounts/login/?next=%2Frooms%2Fgeneral%2F"
    expect(bob.locator("#body")).to_be_disabled()
    expect(bob.locator("#send")).to_be_disabled()
    failed = bob.locator('#messages li[data-state="failed"]')
    expect(failed).to_have_count(1)
    expect(failed.locator(".state")).to_have_text("not sent: signed out")
    expect(failed.locator(".hint")).to_contain_text("Sign in again, then press Retry")
    assert bob.locator('#messages li[data-state="pending"]').count() == 0
    # Nothing left to act on: no React, Edit or Delete, no Members or Leave, no stale
    # "Here now", and no logout of a session that is gone (the status offers signing in).
    expect(bob.locator("#messages .actions button")).to_have_count(0)
    expect(bob.locator("#members-button")).to_be_disabled()
    expect(bob.locator("#presence")).to_have_text("")
    expect(bob.get_by_role("button", name="Log out")).to_have_count(0)
    expect(bob.locator("#status-actions a")).to_have_text("Sign in again")
    bob.screenshot(path=str(artifacts / "signed-out.png"))

    # Signing in again brings the unsent message back, and Retry sends it.
    sign_in_link.click()
    bob.fill("#id_username", "bob")
    bob.fill("#id_password", "demo-password")
    bob.click("button[type=submit]")
    bob.wait_for_url(f"{app_server.url}/rooms/general/")
    connected(bob)
    failed = bob.locator('#messages li[data-state="failed"]', has_text="typed just before the logout")
    failed.get_by_role("button", name="Retry").click()
    expect(bob.locator('#messages li[data-state="sent"] .body').last).to_have_text("typed just before the logout", timeout=10_000)
    assert history(bob)[-1] == "typed just before the logout"



def test_the_newest_message_stays_in_view_when_the_signed_out_notice_takes_room(app_server, browser, artifacts):
    """Found using it: the notice above the composer made the list shorter, and the
    browser kept its top still, so the newest message went out of view."""
    alice = sign_in(browser, app_server, "alice")
    bob = sign_in(browser, app_server, "bob")
    connected(alice)
    connected(bob)
    for i in range(15):
        send(alice, f"filling the view {i}")
    newest = bob.locator("#messages li.message").last
    expect(newest.locator(".body")).to_have_text("filling the view 14", timeout=10_000)
    expect(newest).to_be_in_viewport(ratio=1)
    # A read marker that comes under the newest message stays in view too (it was
    # drawn below the view, found in the second hands-on run).
    send(bob, "read by alice?")
    expect(newest.locator(".readers")).to_have_text("Seen by alice", timeout=10_000)
    expect(newest.locator(".readers")).to_be_in_viewport(ratio=0.9)  # (to the subpixel)

    other_tab = bob.context.new_page()
    other_tab.goto(f"{app_server.url}/")
    other_tab.get_by_role("button", name="Log out").click()
    expect(bob.locator("#signed-out")).to_be_visible(timeout=10_000)
    expect(newest).to_be_in_viewport(ratio=0.99)  # (to the subpixel)
    bob.screenshot(path=str(artifacts / "signed-out-newest-in-view.png"))
    assert bob.errors == [] and alice.errors == []

def test_the_bar_at_phone_width_keeps_each_part_on_one_line_when_signed_out(app_server, browser, artifacts):
    """Found using it: at 390 px, signed out in another tab, the bar squeezed "☰ Rooms",
    the "signed out" badge and "Sign in again" onto two lines each."""
    bob = sign_in(browser, app_server, "bob", viewport={"width": 390, "height": 844})
    connected(bob)
    parts = [bob.locator("#sidebar-toggle"), bob.locator("#status")]
    one_line = {i: part.bounding_box()["height"] for i, part in enumerate(parts)}
    other_tab = bob.context.new_page()
    other_tab.goto(f"{app_server.url}/")
    other_tab.get_by_role("button", name="Log out").click()
    expect(bob.locator("#status")).to_have_text("signed out", timeout=10_000)
    sign_in_again = bob.locator("#status-actions a")
    expect(sign_in_again).to_have_text("Sign in again")
    for i, part in enumerate(parts):
        assert part.bounding_box()["height"] == one_line[i], part
    link_box = sign_in_again.bounding_box()
    line = bob.evaluate("parseFloat(getComputedStyle(document.querySelector('#status-actions a')).lineHeight)")
    assert link_box["height"] <= line + 1, (link_box, line)
    assert bob.evaluate("document.documentElement.scrollWidth") == 390  # nothing wider than the phone
    bob.screenshot(path=str(artifacts / "signed-out-phone.png"))
    assert bob.errors == []


def test_an_operators_disconnect_says_so_and_offers_a_reconnect(app_server, browser):
    bob = sign_in(browser, app_server, "bob")
    connected(bob)
    admin = sign_in(browser, app_server, "admin")
    admin.goto(f"{app_server.url}/admin/realtime/room/console/")
    admin.locator("tr", has_text="bob").get_by_role("button", name="Disconnect bob everywhere").click()

    expect(bob.locator("#status")).to_have_text("disconnected by an administrator", timeout=10_000)
    reconnect = bob.locator("#status-actions").get_by_role("button", name="Reconnect")
    expect(reconnect).to_be_visible()
    expect(bob.locator("#body")).to_be_enabled()  # not signed out: the session is fine
    reconnect.click()
    connected(bob)
    send(bob, "back after the disconnect")
    expect(bob.locator('#messages li[data-state="sent"] .body').last).to_have_text("back after the disconnect", timeout=10_000)


# -- (2) typed order is stored order, over the send rate limit --------------------
@pytest.mark.timeout(180)
def test_45_messages_typed_within_a_second_are_stored_in_the_order_typed(app_server, browser):
    bob = sign_in(browser, app_server, "bob")
    connected(bob)
    box = bob.locator("#body")
    for run in range(3):
        typed = [f"run{run}-n{i}" for i in range(45)]
        started = time.monotonic()
        for text in typed:
            box.fill(text)
            box.press("Enter")
        typing_took = time.monotonic() - started
        until(lambda: [b for b in history(bob) if b.startswith(f"run{run}-")] == typed or
              len([b for b in history(bob) if b.startswith(f"run{run}-")]) == 45, timeout=60)
        stored = [b for b in history(bob) if b.startswith(f"run{run}-")]
        assert stored == typed, f"run {run} (typed in {typing_took:.1f} s): {stored}"
        shown = [b for b in bob.locator("#messages .body").all_text_contents() if b.startswith(f"run{run}-")]
        assert shown == typed
        expect(bob.locator('#messages li[data-state="pending"]')).to_have_count(0, timeout=20_000)
    assert bob.errors == []


# -- (4) "Here now" is the people on this room's page ------------------------------
def test_here_now_does_not_list_people_on_another_rooms_page(app_server, browser):
    alice = sign_in(browser, app_server, "alice")
    connected(alice)
    bob = sign_in(browser, app_server, "bob")
    bob.goto(f"{app_server.url}/rooms/ops/")  # follows general in the background
    connected(bob)
    until(lambda: bob.evaluate("window.realtimeClient.rooms.get('general').subscribed") is True)
    carol = sign_in(browser, app_server, "carol")  # on general's page: here
    connected(carol)
    # Presence changes arrive in order: carol's join after bob's background subscribe.
    expect(alice.locator("#presence")).to_have_text("Here now: alice, carol", timeout=10_000)


# -- (6) retry now, and a server that does not answer --------------------------------
def test_an_unreachable_server_is_named_and_retry_now_connects_at_once(app_server, browser):
    bob = sign_in(browser, app_server, "bob", init_script=HOLD)
    connected(bob)
    # The server goes away: sockets fail, and plain HTTP too (no long polling).
    bob.route("**/api/v1/**", lambda route: route.abort())
    bob.evaluate("window.__blockWebSockets = true; window.realtimeClient.socket.ws.close()")
    expect(bob.locator("#status")).to_contain_text("server unreachable", timeout=20_000)
    expect(bob.locator("#status-live")).to_have_text("server unreachable")
    retry = bob.locator("#status-actions").get_by_role("button", name="Retry now")
    expect(retry).to_be_visible()
    # Back: Retry now connects without waiting out the backoff.
    bob.unroute("**/api/v1/**")
    bob.evaluate("window.__blockWebSockets = false")
    started = time.monotonic()
    retry.click()
    connected(bob)
    assert time.monotonic() - started < 3


# -- (8) typing ends with the message; the edit box; delete confirm; the 403 page -----
def test_the_typing_notice_ends_when_that_persons_message_arrives(app_server, browser):
    bob = sign_in(browser, app_server, "bob")
    alice = sign_in(browser, app_server, "alice")
    for page in (alice, bob):
        connected(page)
    alice.locator("#body").press_sequentially("done in a mo", delay=30)
    expect(bob.locator("#typing")).to_have_text("alice is typing…", timeout=5_000)
    alice.locator("#body").press("Enter")
    expect(bob.locator("#messages .body").last).to_have_text("done in a mo", timeout=10_000)
    # At once with the message, not after the notice's 4 s.
    expect(bob.locator("#typing")).to_have_text("", timeout=1_000)


def test_the_edit_box_saves_on_enter_and_cancels_on_escape_and_delete_asks_first(app_server, browser):
    bob = sign_in(browser, app_server, "bob")
    connected(bob)
    send(bob, "edit me")
    mine = bob.locator('#messages li[data-state="sent"]', has_text="edit me")
    mine.get_by_role("button", name="Edit").click()
    area = bob.locator("#messages form.edit textarea")
    expect(area).to_be_focused()
    area.fill("not this")
    area.press("Escape")
    expect(bob.locator("#messages form.edit")).to_have_count(0)
    expect(mine.locator(".body")).to_have_text("edit me")

    mine.get_by_role("button", name="Edit").click()
    area.fill("line one")
    area.press("Shift+Enter")
    area.press_sequentially("line two")
    area.press("Enter")
    expect(bob.locator("#messages form.edit")).to_have_count(0)
    edited = bob.locator('#messages li[data-state="sent"]', has_text="line one")
    expect(edited.locator(".body")).to_have_text("line one\nline two", timeout=10_000)
    assert "line one\nline two" in history(bob)

    # Delete asks first, inline; Cancel keeps the message; Yes deletes it.
    edited.get_by_role("button", name="Delete").click()
    confirm = edited.get_by_role("group", name=re.compile(r"^Delete your message from .+\?$"))
    expect(confirm).to_contain_text("Delete this message?")
    expect(edited.get_by_role("button", name=re.compile("^Keep your message"))).to_be_focused()
    edited.get_by_role("button", name=re.compile("^Keep your message")).click()
    expect(edited.locator(".actions")).not_to_contain_text("Delete this message?")
    assert "line one\nline two" in history(bob)
    edited.get_by_role("button", name="Delete").click()
    edited.get_by_role("button", name=re.compile("^Yes, delete")).click()
    expect(bob.locator('#messages li[data-state="sent"]', has_text="line one")).to_have_count(0, timeout=10_000)
    assert "line one\nline two" not in history(bob)


def test_a_private_room_the_user_may_not_open_gets_the_styled_page(app_server, browser):
    carol = sign_in(browser, app_server, "carol")
    response = carol.goto(f"{app_server.url}/rooms/ops/")
    assert response.status == 404  # exactly like a missing room
    # The site's page, styled, with the way back; not a bare error.
    expect(carol.locator("header.topbar")).to_be_visible()
    expect(carol.get_by_role("link", name="Back to your rooms")).to_be_visible()
    assert carol.evaluate("getComputedStyle(document.body).margin") == "0px"


# -- (9) accessibility ---------------------------------------------------------------
def luminance(rgb):
    def channel(c):
        c /= 255
        return c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4
    r, g, b = rgb
    return 0.2126 * channel(r) + 0.7152 * channel(g) + 0.0722 * channel(b)


def contrast(a, b):
    la, lb = sorted((luminance(a), luminance(b)), reverse=True)
    return (la + 0.05) / (lb + 0.05)


def rgb(css):
    return tuple(int(x) for x in re.findall(r"\d+", css)[:3])


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_the_send_button_has_aa_contrast(app_server, browser, scheme):
    page = sign_in(browser, app_server, "bob")
    page.emulate_media(color_scheme=scheme)
    colours = page.evaluate("""() => {
      const s = getComputedStyle(document.getElementById("send"));
      return [s.color, s.backgroundColor];
    }""")
    ratio = contrast(rgb(colours[0]), rgb(colours[1]))
    assert ratio >= 4.5, (scheme, colours, ratio)


def test_focus_skip_link_and_labelled_message_buttons(app_server, browser):
    bob = sign_in(browser, app_server, "bob")
    connected(bob)
    expect(bob.locator("#body")).to_be_focused()  # the composer, on load
    # The skip link comes first in the page (before the top bar's links), and leads
    # to the composer.
    bob.locator("a.brand").focus()
    bob.keyboard.press("Shift+Tab")
    skip = bob.get_by_role("link", name="Skip to the message box")
    expect(skip).to_be_focused()
    bob.keyboard.press("Enter")
    expect(bob.locator("#body")).to_be_focused()
    send(bob, "labelled")
    mine = bob.locator('#messages li[data-state="sent"]', has_text="labelled").last
    label = mine.get_by_role("button", name="Edit").get_attribute("aria-label")
    assert re.fullmatch(r"Edit your message from \d{1,2}:\d{2}( [AP]M)?", label), label
    assert re.fullmatch(r"Delete your message from .+", mine.get_by_role("button", name="Delete").get_attribute("aria-label"))


def test_the_countdown_is_not_in_a_live_region(app_server, browser):
    bob = sign_in(browser, app_server, "bob", init_script=HOLD)
    connected(bob)
    bob.route("**/api/v1/**", lambda route: route.abort())
    bob.evaluate("window.__blockWebSockets = true; window.realtimeClient.socket.ws.close()")
    expect(bob.locator("#status")).to_contain_text(re.compile(r"retrying in \d+s|reconnecting in \d+s"), timeout=10_000)
    # The badge counts down; it and its ancestors are no live region. The live
    # region says the state once, without the seconds.
    live = bob.evaluate("""() => {
      for (let el = document.getElementById("status"); el; el = el.parentElement) {
        if (el.getAttribute("aria-live") && el.getAttribute("aria-live") !== "off") return true;
        if (["status", "alert", "log", "timer"].includes(el.getAttribute("role"))) return true;
      }
      return false;
    }""")
    assert live is False
    assert not re.search(r"\d", bob.locator("#status-live").inner_text())
