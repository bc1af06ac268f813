"""All of a room's history in the page: scrolling up loads older pages (to the
first message of a 100,000-message room) with the DOM kept small; the page opens
at the first unread message; day separators and dates on older messages."""

import re
import time

import pytest
from playwright.sync_api import expect

from tests.e2e.conftest import OPEN_CONTEXTS  # noqa: F401  (contexts are closed after each test)
from tests.e2e.test_chat_browser import sign_in
from tests.services import AppServer

pytestmark = pytest.mark.e2e

BIG = int(__import__("os").environ.get("HISTORY_BIG", 100_000))
WINDOW = 300  # static/realtime/ui/messages.js


@pytest.fixture(scope="module")
def app_server(tmp_path_factory):
    # A bigger replay budget than the default: the test scrolls through 100,000
    # messages in about a minute, far faster than a person reads.
    server = AppServer(tmp_path_factory.mktemp("history"), env={"REALTIME_REPLAY_BUDGET": "4194304/16777216"})
    server.manage("migrate", "--noinput")
    server.manage("seed_demo")
    started = time.monotonic()
    server.manage("shell", "-c", "from tests.e2e.seed_history import seed; "
                  f"seed('archive', {BIG}); seed('unread', 500, spacing_s=1800, read={{'bob': 250}})")
    print(f"seeded {BIG:,} messages in {time.monotonic() - started:.1f} s")
    server.start()
    yield server
    server.stop()


def open_room(browser, server, slug, user="bob"):
    page = sign_in(browser, server, user)
    page.goto(f"{server.url}/rooms/{slug}/")
    expect(page.locator("#status")).to_have_text("connected", timeout=10_000)
    return page


SCROLL_TO_THE_TOP = """async () => {
  const list = document.getElementById("messages");
  let maxNodes = 0, maxMessages = 0, steps = 0;
  const started = performance.now();
  while (!document.querySelector("#messages .beginning") && performance.now() - started < (window.__scrollBudget || 240000)) {
    list.scrollTop = 0;
    await new Promise((r) => requestAnimationFrame(() => setTimeout(r, 5)));
    maxNodes = Math.max(maxNodes, list.querySelectorAll("*").length);
    maxMessages = Math.max(maxMessages, list.querySelectorAll("li.message").length);
    steps += 1;
  }
  const pages = performance.getEntriesByType("resource").filter((e) => e.name.includes("/messages/"));
  const pageMs = pages.reduce((sum, e) => sum + e.duration, 0) / Math.max(1, pages.length);
  return { maxNodes, maxMessages, steps, ms: performance.now() - started, pages: pages.length, pageMs };
}"""


@pytest.mark.timeout(300)  # seeding and a minute of scrolling
def test_scrolling_up_reaches_the_first_of_100000_messages_with_a_bounded_dom(app_server, browser, artifacts):
    page = open_room(browser, app_server, "archive")
    bodies = page.locator("#messages li.message .body")
    expect(bodies.last).to_have_text(f"message {BIG}", timeout=10_000)
    assert page.locator("#messages .beginning").count() == 0

    stats = page.evaluate(SCROLL_TO_THE_TOP)
    print("scrolled to the top:", stats)
    expect(page.locator("#messages .beginning")).to_have_text("This is the beginning of #archive.")
    # The first message arrived, first, and the rendered ones are in order.
    seqs = [int(s) for s in page.locator("#messages li.message").evaluate_all("els => els.map(e => e.dataset.seq)")]
    assert seqs[0] == 1 and seqs == sorted(seqs) and seqs == list(range(1, len(seqs) + 1))
    assert bodies.first.inner_text() == "message 1"
    # The DOM stayed bounded all the way up (no more than the window of messages).
    assert stats["maxMessages"] <= WINDOW, stats
    assert stats["maxNodes"] < WINDOW * 20, stats
    # Every page of history came from the server: the client holds all of it, the DOM a window.
    assert page.evaluate("document.querySelectorAll('#messages li.message').length") <= WINDOW
    page.screenshot(path=str(artifacts / "history-beginning.png"))

    # Back down: the dropped nodes are drawn again, in order, up to the live end.
    page.get_by_role("button", name="Jump to the latest messages").click()
    expect(bodies.last).to_have_text(f"message {BIG}", timeout=10_000)
    alice = open_room(browser, app_server, "archive", user="alice")
    alice.fill("#body", "after a hundred thousand")
    alice.click("#send")
    expect(bodies.last).to_have_text("after a hundred thousand", timeout=10_000)
    assert page.errors == []


def test_scroll_position_is_kept_when_older_messages_are_prepended(app_server, browser):
    # alice: bob spent most of his replay budget scrolling through 100,000 messages
    # above (a page then waits for the budget to refill, by design).
    page = open_room(browser, app_server, "archive", user="alice")
    expect(page.locator("#messages li.message").nth(199)).to_be_attached(timeout=10_000)
    # Scroll a little up from the bottom, note the message at the top of the view,
    # then move near the top so a page is prepended, and check it did not jump.
    anchor = page.evaluate("""() => {
      const list = document.getElementById("messages");
      list.scrollTop = 700;  // within 800 px of the top: older ones come in above
      const top = list.getBoundingClientRect().top;
      const li = [...list.querySelectorAll("li.message")].find((el) => el.getBoundingClientRect().bottom > top + 1);
      return { seq: li.dataset.seq, offset: li.getBoundingClientRect().top - top };
    }""")
    expect(page.locator("#messages li.message").nth(200)).to_be_attached(timeout=10_000)
    after = page.evaluate(f"""() => {{
      const list = document.getElementById("messages");
      const li = list.querySelector('li[data-seq="{anchor["seq"]}"]');
      return li.getBoundingClientRect().top - list.getBoundingClientRect().top;
    }}""")
    assert abs(after - anchor["offset"]) <= 2, (anchor, after)


def test_the_page_opens_at_the_first_unread_message_with_day_separators(app_server, browser, artifacts):
    # bob has read 250 of 500 messages, one every 30 minutes: over 10 days, so the
    # unread ones alone cross five midnights whatever the hour the test runs at (at
    # one every 10 minutes the rendered ones crossed one or two, by the clock).
    page = open_room(browser, app_server, "unread")
    divider = page.locator("#messages .new-divider")
    expect(divider).to_have_text("New messages", timeout=10_000)
    first_unread = page.locator("#messages .new-divider + li.message, #messages .new-divider + li.day + li.message").first
    expect(first_unread.locator(".body")).to_have_text("message 251")
    # It is in view, near the top of the list.
    box, view = first_unread.bounding_box(), page.locator("#messages").bounding_box()
    assert view["y"] <= box["y"] <= view["y"] + view["height"] / 2, (box, view)

    # Day separators between days; older messages carry their date; full time on hover.
    days = page.locator("#messages li.day")
    assert days.count() >= 2
    labels = days.all_inner_texts()
    assert len(labels) == len(set(labels))
    old = page.locator("#messages li.message").first.locator("time")
    assert re.search(r"\d", old.inner_text()) and "," in old.inner_text(), old.inner_text()  # "3 Mar, 12:06"
    assert old.get_attribute("datetime")
    assert re.search(r"\d{4}", old.get_attribute("title")), old.get_attribute("title")  # the full date, year included
    page.screenshot(path=str(artifacts / "history-unread.png"))
