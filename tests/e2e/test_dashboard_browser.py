"""The staff dashboard in a real browser: its numbers move while people chat."""

import re

import pytest
from playwright.sync_api import expect

from tests.e2e.test_chat_browser import send, sign_in

pytestmark = pytest.mark.e2e


def test_the_dashboard_updates_live_while_people_chat(app_server, browser, artifacts):
    admin = sign_in(browser, app_server, "admin")
    admin.goto(f"{app_server.url}/dashboard/")
    expect(admin.locator("#status")).to_have_text("connected", timeout=10_000)
    expect(admin.locator("#workers tr")).to_have_count(1, timeout=10_000)  # the one worker, alive
    expect(admin.locator("#workers tr td").nth(1)).to_have_text("alive")

    alice = sign_in(browser, app_server, "alice")
    expect(alice.locator("#status")).to_have_text("connected", timeout=10_000)
    for i in range(12):
        send(alice, f"dashboard traffic {i}")
        alice.wait_for_timeout(150)
    # Connections (admin's and alice's sockets), traffic and latency have moved.
    expect(admin.locator("#stat-connections")).not_to_have_text("–", timeout=10_000)
    assert int(admin.locator("#stat-connections").text_content()) >= 2
    expect(admin.locator('.chart[data-series="traffic"] path.line.a')).to_have_attribute("d", re.compile(r"L"))
    expect(admin.locator('.chart[data-series="latency"] path.line.b')).to_have_attribute("d", re.compile(r"\d"))
    expect(admin.locator("#rooms tr").first).to_contain_text("#general", timeout=10_000)
    peak = admin.evaluate("Math.max(...document.querySelector('.chart[data-series=\"traffic\"]').dataset.max.split(',').map(Number))")
    assert peak > 1
    admin.screenshot(path=str(artifacts / "dashboard.png"), full_page=True)
    assert admin.errors == [] and alice.errors == []




def open_dashboard(browser, server, width: int):
    page = sign_in(browser, server, "admin", viewport={"width": width, "height": 900})
    page.goto(f"{server.url}/dashboard/")
    expect(page.locator("#status")).to_have_text("connected", timeout=10_000)
    expect(page.locator("#workers tr td").nth(1)).to_have_text("alive", timeout=10_000)
    return page


def boxes_intersect(a: dict, b: dict) -> bool:
    return not (a["x"] + a["width"] <= b["x"] or b["x"] + b["width"] <= a["x"]
                or a["y"] + a["height"] <= b["y"] or b["y"] + b["height"] <= a["y"])


@pytest.mark.parametrize("width", [375, 1280, 1920])
def test_the_dashboard_fits_its_width_and_its_tables_never_overlap(app_server, browser, artifacts, width):
    alice = sign_in(browser, app_server, "alice")
    expect(alice.locator("#status")).to_have_text("connected", timeout=10_000)
    admin = open_dashboard(browser, app_server, width)
    send(alice, "a message for the busiest rooms")
    expect(admin.locator("#rooms tr").first).to_contain_text("#general", timeout=10_000)

    scroll, client = admin.evaluate(
        "[document.documentElement.scrollWidth, document.documentElement.clientWidth]")
    assert scroll <= client, f"the page scrolls sideways at {width} px: {scroll} > {client}"
    workers = admin.locator("#workers").locator("xpath=ancestor::table").bounding_box()
    busiest = admin.locator("section.busiest").bounding_box()
    assert not boxes_intersect(workers, busiest), (width, workers, busiest)
    # A table wider than the screen scrolls inside its own box, which stays on the page.
    wrapper = admin.locator("section.workers .table-scroll").bounding_box()
    assert wrapper["x"] >= 0 and wrapper["x"] + wrapper["width"] <= client
    admin.screenshot(path=str(artifacts / f"dashboard-{width}.png"), full_page=True)
    assert admin.errors == [] and alice.errors == []


def test_the_charts_have_axes_with_round_ticks_at_their_grid_lines(app_server, browser):
    admin = open_dashboard(browser, app_server, 1280)
    # The first tick fills the y labels; a chart's top tick is 1, 2 or 4 times a power
    # of ten, the middle one half of it, both drawn as text.
    expect(admin.locator('.chart[data-series="connections"] .y-ticks .top')).not_to_have_text("–", timeout=10_000)
    for name in ("connections", "traffic", "latency", "errors"):
        chart = admin.locator(f'.chart[data-series="{name}"]')
        top, mid, zero = (chart.locator(f".y-ticks .{c}").text_content() for c in ("top", "mid", "zero"))
        assert zero == "0" and float(top) > 0 and float(mid) == float(top) / 2, (name, top, mid)
        assert float(chart.get_attribute("data-max")) == float(top)
        assert f"{float(top):.0e}"[0] in "124", top
        assert chart.locator(".x-ticks .tick").all_text_contents() == ["2 min ago", "1 min ago", "now"]
        assert chart.locator(".y-title").text_content().strip()
        assert chart.locator("path.axis").get_attribute("d") == "M0,0V78H300"
        # Each y label's middle is level with its grid line (4 and 41 of 80, the axis at 78).
        svg = chart.locator("svg").bounding_box()
        for cls, units in (("top", 4), ("mid", 41), ("zero", 78)):
            label = chart.locator(f".y-ticks .{cls}").bounding_box()
            middle = label["y"] + label["height"] / 2
            assert abs(middle - (svg["y"] + svg["height"] * units / 80)) <= 2, (name, cls, middle, svg)
    assert admin.errors == []


def test_live_figures_are_not_a_live_region(app_server, browser):
    """The numbers change every second; a screen reader must not read them out each time."""
    admin = open_dashboard(browser, app_server, 1280)
    live = """() => [...document.querySelectorAll(
        '[aria-live]:not([aria-live="off"]), [role=status], [role=alert], [role=log], [role=timer], [role=marquee]')]
        .map((el) => [el.id, el.textContent])"""
    before = admin.evaluate(live)
    seen = set()
    for _ in range(3):  # three ticks
        admin.wait_for_function(
            "(seen) => !seen.includes(document.getElementById('updated').textContent)", arg=sorted(seen))
        seen.add(admin.locator("#updated").text_content())
    assert admin.evaluate(live) == before == [["status", "connected"], ["metrics-error", ""]]
    for ident in ("stat-connections", "updated", "workers", "rooms", "errors"):
        inside = admin.evaluate(
            """(id) => !!document.getElementById(id).closest(
                '[aria-live]:not([aria-live="off"]), [role=status], [role=alert], [role=log], [role=timer]')""", ident)
        assert not inside, ident
    for table in admin.locator(".dashboard table").all():
        assert table.locator("caption").text_content().strip()
        assert table.locator("thead th[scope=col]").count() == table.locator("thead th").count() > 0


def test_non_staff_get_a_styled_403_from_the_dashboard(app_server, browser):
    bob = sign_in(browser, app_server, "bob")
    response = bob.goto(f"{app_server.url}/dashboard/")
    assert response.status == 403
    expect(bob.get_by_role("heading", name="Not allowed")).to_be_visible()
    expect(bob.get_by_role("link", name="Back to your rooms")).to_be_visible()
    # The app's stylesheet applies: the page is a card, not bare text.
    assert bob.locator(".card").evaluate("(el) => getComputedStyle(el).borderRadius") == "10px"
