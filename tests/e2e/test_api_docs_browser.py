"""The API docs page (/api/v1/docs/, Swagger UI from drf-spectacular-sidecar) in a
real browser, under the app's Content-Security-Policy: it renders every endpoint
and the browser reports no violation."""

import pytest
from playwright.sync_api import expect

from tests.e2e.test_chat_browser import sign_in

pytestmark = pytest.mark.e2e


def test_the_api_docs_render_under_the_csp(app_server, browser, artifacts):
    page = sign_in(browser, app_server, "alice")
    outside = []
    page.on("request", lambda r: outside.append(r.url) if not r.url.startswith((app_server.url, "data:")) else None)
    page.goto(f"{app_server.url}/api/v1/docs/")
    expect(page.locator(".opblock-summary-path").first).to_be_visible(timeout=15_000)
    paths = page.locator(".opblock-summary-path").all_text_contents()
    assert "/api/v1/search/" in paths and "/api/v1/rooms/{slug}/messages/" in paths
    # Try it out: the search endpoint answers from the page, with alice's session.
    page.locator(".opblock-summary-path", has_text="/api/v1/search/").first.click()
    page.get_by_role("button", name="Try it out").click()
    page.locator('tr[data-param-name="q"] input').fill("anything")
    page.get_by_role("button", name="Execute").click()
    expect(page.locator(".live-responses-table tr.response .response-col_status").first).to_have_text("200", timeout=10_000)
    page.screenshot(path=str(artifacts / "api-docs.png"))
    assert page.errors == [] and outside == []
