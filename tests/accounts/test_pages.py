"""The sign-in and sign-up pages as rendered: what a person sees after a refusal,
and how a screen reader finds each error (issue 17, defect 11)."""

from html.parser import HTMLParser

import pytest
from django.test import Client

pytestmark = pytest.mark.django_db


class Tags(HTMLParser):
    """Every start tag's attributes, and the text inside each element with an id."""

    def __init__(self, html: str):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: dict[str, str] = {}
        self._open: list[str | None] = []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        found = dict(attrs)
        self.tags.append((tag, found))
        if tag not in ("input", "link", "meta", "br", "img"):
            self._open.append(found.get("id"))
            if found.get("id"):
                self.text[found["id"]] = ""

    def handle_endtag(self, tag):
        if tag not in ("input", "link", "meta", "br", "img") and self._open:
            self._open.pop()

    def handle_data(self, data):
        for name in self._open:
            if name:
                self.text[name] += data

    def by_id(self, ident: str) -> dict:
        (found,) = [attrs for _, attrs in self.tags if attrs.get("id") == ident]
        return found


def test_a_wrong_password_keeps_the_username_and_points_at_the_error(demo):
    res = Client().post("/accounts/login/", {"username": "alice", "password": "wrong", "next": "/rooms/general/"})
    assert res.status_code == 200
    page = Tags(res.content.decode())
    username, password = page.by_id("id_username"), page.by_id("id_password")
    assert username["value"] == "alice"
    assert "value" not in password  # the password is never sent back
    assert username["aria-invalid"] == password["aria-invalid"] == "true"
    assert username["aria-describedby"] == password["aria-describedby"] == "login-error"
    assert page.by_id("login-error")["role"] == "alert"
    assert page.text["login-error"] == "Your username and password didn't match. Please try again."
    assert "autofocus" in password and "autofocus" not in username  # straight to the password again


def test_the_fresh_login_form_is_empty_and_not_marked_invalid(demo):
    page = Tags(Client().get("/accounts/login/").content.decode())
    username = page.by_id("id_username")
    assert username["value"] == "" and "aria-invalid" not in username and "autofocus" in username
    assert "login-error" not in page.text


def test_a_refused_sign_in_past_the_limit_keeps_the_username_too(demo, settings):
    settings.LOGIN_RATE_LIMIT = "1/d"  # (a day: no window edge inside a test)
    client = Client()
    assert client.post("/accounts/login/", {"username": "bob", "password": "wrong"}).status_code == 200
    res = client.post("/accounts/login/", {"username": "bob", "password": "wrong"})
    assert res.status_code == 429
    page = Tags(res.content.decode())
    assert page.by_id("id_username")["value"] == "bob"
    assert page.by_id("id_username")["aria-describedby"] == "login-error"
    assert page.text["login-error"].startswith("Too many failed sign-ins")


def test_sign_up_errors_are_styled_and_tied_to_their_fields(demo):
    res = Client().post("/accounts/signup/", {"username": "alice", "password1": "a-long-passphrase-42",
                                              "password2": "another-passphrase-43"})
    assert res.status_code == 200
    page = Tags(res.content.decode())
    # A summary that is announced, then each field's own list, styled as the app's errors.
    assert page.by_id("signup-error")["role"] == "alert"
    for field, says in [("username", "A user with that username already exists."),
                        ("password2", "The two password fields didn’t match.")]:
        errors = page.by_id(f"id_{field}_error")
        assert errors["class"].split() == ["errorlist", "error"]
        assert page.text[f"id_{field}_error"].strip() == says
        widget = page.by_id(f"id_{field}")
        assert widget["aria-invalid"] == "true"
        assert f"id_{field}_error" in widget["aria-describedby"].split()
    # A field without an error is neither marked nor pointed at a list that does not exist.
    first = page.by_id("id_password1")
    assert "aria-invalid" not in first and "id_password1_error" not in first.get("aria-describedby", "")
    assert page.by_id("id_username")["value"] == "alice"

