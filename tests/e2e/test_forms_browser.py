"""The sign-in and sign-up pages in a real browser: errors look like errors, a refused
sign-in keeps the name, and the tab has an icon (issue 17, defect 11)."""

import re

import pytest
from playwright.sync_api import expect

from tests.e2e.conftest import OPEN_CONTEXTS

pytestmark = pytest.mark.e2e


def fresh_page(browser):
    context = browser.new_context(viewport={"width": 1000, "height": 800})
    OPEN_CONTEXTS.append(context)
    page = context.new_page()
    page.errors = []
    page.on("pageerror", lambda exc: page.errors.append(str(exc)))
    page.on("console", lambda msg: page.errors.append(msg.text) if msg.type == "error" else None)
    return page


def test_a_wrong_password_keeps_the_name_and_the_error_is_announced(app_server, browser):
    page = fresh_page(browser)
    page.goto(f"{app_server.url}/accounts/login/")
    page.fill("#id_username", "alice")
    page.fill("#id_password", "not-her-password")
    page.click("button[type=submit]")
    expect(page.get_by_role("alert")).to_have_text("Your username and password didn't match. Please try again.")
    expect(page.locator("#id_username")).to_have_value("alice")
    expect(page.locator("#id_password")).to_have_value("")
    expect(page.locator("#id_password")).to_be_focused()
    expect(page.get_by_label("Username")).to_have_accessible_description(
        "Your username and password didn't match. Please try again.")
    # Only the password again, and in.
    page.fill("#id_password", "demo-password")
    page.click("button[type=submit]")
    page.wait_for_url(f"{app_server.url}/")
    assert page.errors == []


def test_sign_up_errors_are_styled_like_the_apps_errors(app_server, browser, artifacts):
    page = fresh_page(browser)
    page.goto(f"{app_server.url}/accounts/signup/")
    page.fill("#id_username", "bob")
    page.fill("#id_password1", "a-long-passphrase-42")
    page.fill("#id_password2", "a-different-passphrase")
    page.click("button[type=submit]")
    expect(page.get_by_role("alert")).to_contain_text("The account was not created")
    # The answer's stylesheet loaded (the load event waits for it): read before it,
    # the error's colour was the unstyled black (seen once in CI).
    page.wait_for_load_state("load")
    bad = page.evaluate("getComputedStyle(document.querySelector('p.error')).color")
    assert bad != "rgb(0, 0, 0)", "the app's error colour is not black"
    for field in ("username", "password2"):
        errors = page.locator(f"#id_{field}_error")
        expect(errors).to_be_visible()
        assert errors.evaluate("(el) => getComputedStyle(el).color") == bad  # the app's error colour
        assert errors.evaluate("(el) => getComputedStyle(el).listStyleType") == "none"
        expect(page.locator(f"#id_{field}")).to_have_attribute("aria-invalid", "true")
        # (waited on: the field's border colour may still be in its transition)
        expect(page.locator(f"#id_{field}")).to_have_css("border-top-color", bad)
    expect(page.locator("#id_password2")).to_have_accessible_description(re.compile("The two password fields didn’t match"))
    page.screenshot(path=str(artifacts / "signup-errors.png"), full_page=True)
    assert page.errors == []


def test_the_tab_has_an_icon_and_favicon_ico_finds_it(app_server, browser):
    page = fresh_page(browser)
    page.goto(f"{app_server.url}/accounts/login/")
    href = page.locator('link[rel="icon"]').get_attribute("href")
    assert href == "/static/realtime/favicon.svg"
    loaded = page.evaluate("""async (href) => {
        const img = new Image(); img.src = href; await img.decode(); return [img.naturalWidth, img.naturalHeight];
    }""", href)
    assert loaded[0] > 0 and loaded[1] > 0
    response = page.goto(f"{app_server.url}/favicon.ico")
    assert response.status == 200 and response.url.endswith("/static/realtime/favicon.svg")
    assert response.headers["content-type"] == "image/svg+xml"
