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


def test_non_staff_get_403_from_the_dashboard(app_server, browser):
    bob = sign_in(browser, app_server, "bob")
    response = bob.goto(f"{app_server.url}/dashboard/")
    assert response.status == 403
