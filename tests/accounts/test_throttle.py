"""Sign-in throttling per address, per account and per known browser; sign-up per
address; look-alike names; the client's address behind trusted proxies only."""

from __future__ import annotations

import pytest
from django.contrib.auth import get_user_model
from django.test import Client

from accounts import names
from accounts.models import Account
from realtime.web.proxies import ProxyHeadersMiddleware, client_address, parse_networks

pytestmark = pytest.mark.django_db


def attempt(client: Client, username: str, password: str = "wrong", addr: str = "10.0.0.1"):
    return client.post("/accounts/login/", {"username": username, "password": password}, REMOTE_ADDR=addr)


@pytest.fixture
def limits(settings):
    settings.LOGIN_RATE_LIMIT = "6/d"  # (a day: no window edge inside a test)
    settings.LOGIN_ACCOUNT_RATE_LIMIT = "3/d"
    settings.LOGIN_DEVICE_RATE_LIMIT = "3/d"


def test_failures_from_one_address_stop_that_address_only(demo, limits):
    attacker = Client()
    statuses = [attempt(attacker, f"nobody{i}").status_code for i in range(7)]
    assert statuses == [200] * 6 + [429]
    refused = attempt(attacker, "alice", "demo-password")
    assert refused.status_code == 429  # a right guess is not even checked
    assert int(refused["Retry-After"]) >= 1 and b"Too many failed sign-ins from your network" in refused.content
    # Everyone else signs in as usual.
    assert attempt(Client(), "bob", "demo-password", addr="10.0.0.2").status_code == 302


def test_guessing_one_account_locks_unknown_browsers_not_its_owner(demo, limits):
    owner = Client()
    assert attempt(owner, "alice", "demo-password", addr="10.9.0.1").status_code == 302  # a known browser now
    owner.post("/accounts/logout/")
    # Guesses from many addresses (a botnet): three per account, then unknown browsers wait.
    statuses = [attempt(Client(), "alice", addr=f"10.1.0.{i}").status_code for i in range(4)]
    assert statuses == [200, 200, 200, 429]
    other = attempt(Client(), "ALICE", "demo-password", addr="10.1.0.99")
    assert other.status_code == 429 and b"browser you signed in with before" in other.content
    # The owner's browser is not locked out, and other accounts are untouched.
    assert attempt(owner, "alice", "demo-password", addr="10.9.0.1").status_code == 302
    assert attempt(Client(), "bob", "demo-password", addr="10.1.0.50").status_code == 302


def test_a_known_browser_has_a_limit_of_its_own(demo, limits):
    owner = Client()
    assert attempt(owner, "alice", "demo-password", addr="10.9.0.1").status_code == 302
    owner.post("/accounts/logout/")
    assert [attempt(owner, "alice", addr="10.9.0.1").status_code for _ in range(4)] == [200, 200, 200, 429]
    # Its failures did not count against the account: a new browser still gets in.
    assert attempt(Client(), "alice", "demo-password", addr="10.9.0.2").status_code == 302


def test_a_forged_device_cookie_is_an_unknown_browser(demo, limits):
    client = Client()
    client.cookies["rt_device"] = "forged"
    assert [attempt(client, "alice", addr=f"10.2.0.{i}").status_code for i in range(4)] == [200, 200, 200, 429]


def test_signups_are_limited_per_address(db, settings):
    settings.SIGNUP_RATE_LIMIT = "2/d"

    def signup(name: str, addr: str):
        return Client().post("/accounts/signup/", {"username": name, "password1": "a-long-passphrase-42",
                                                   "password2": "a-long-passphrase-42"}, REMOTE_ADDR=addr)

    assert [signup(f"user{i}", "10.3.0.1").status_code for i in range(3)] == [302, 302, 429]
    assert not get_user_model().objects.filter(username="user2").exists()
    assert signup("user3", "10.3.0.2").status_code == 302


@pytest.mark.parametrize("name, error", [
    ("аlice", "letters of one script"),  # Cyrillic а in a Latin name
    ("саrоl", "letters of one script"),
    ("аӏісе", "reads as Latin"),      # all Cyrillic, and it reads as alice
    ("ａｌｉｃｅ", "already exists"),  # NFKC makes it alice (Django's own check)
    ("aIice", "looks too much like"),  # capital I for l
    ("a1ice", "looks too much like"),
    ("b0b", "looks too much like"),
    ("ALICE", "already exists"),
])
def test_look_alike_names_are_refused(demo, name, error):
    res = Client().post("/accounts/signup/", {"username": name, "password1": "a-long-passphrase-42",
                                              "password2": "a-long-passphrase-42"})
    assert res.status_code == 200
    assert error in res.content.decode()
    assert get_user_model().objects.count() == 4


@pytest.mark.parametrize("name", ["dave", "josé", "иван", "δημήτρης", "田中さん", "李小龙", "Tanaka田中", "dave_2"])
def test_names_of_one_script_that_look_like_no_one_are_accepted(demo, name):
    res = Client().post("/accounts/signup/", {"username": name, "password1": "a-long-passphrase-42",
                                              "password2": "a-long-passphrase-42"})
    assert res.status_code == 302, res.content.decode()
    account = Account.objects.get(user__username=name)
    assert account.name_skeleton == names.skeleton(name) and account.probation_until is not None


def test_every_user_has_an_account_with_its_skeleton(demo):
    assert dict(Account.objects.values_list("user__username", "name_skeleton")) == {
        "alice": "alice", "bob": "bob", "carol": "carol", "admin": "admin"}
    assert not Account.objects.exclude(probation_until=None).exists()  # demo users are not on probation
    # A staff-made user whose name collides keeps no skeleton instead of failing.
    user = get_user_model().objects.create_user("bo\u0431", password="x")  # Cyrillic б
    assert Account.objects.get(user=user).name_skeleton == names.skeleton("boб")
    twin = get_user_model().objects.create_user("aIice", password="x")
    assert Account.objects.get(user=twin).name_skeleton is None


TRUSTED = parse_networks(["127.0.0.1", "10.0.0.0/8"])


@pytest.mark.parametrize("peer, forwarded, expected", [
    ("203.0.113.5", ["198.51.100.1"], "203.0.113.5"),            # an untrusted peer's header is ignored
    ("127.0.0.1", [], "127.0.0.1"),
    ("127.0.0.1", ["198.51.100.1"], "198.51.100.1"),
    ("127.0.0.1", ["6.6.6.6, 198.51.100.1"], "198.51.100.1"),     # the client's own header is on the left
    ("127.0.0.1", ["6.6.6.6", "198.51.100.1, 10.1.2.3"], "198.51.100.1"),  # two headers, a second proxy
    ("127.0.0.1", ["10.1.2.3, 10.2.3.4"], "10.1.2.3"),            # all trusted: the furthest hop
    ("127.0.0.1", ["6.6.6.6, junk"], "127.0.0.1"),                # garbage ends the walk at the last vouched hop
    ("127.0.0.1", ["2001:db8::1"], "2001:db8::1"),
    ("127.0.0.1", ["[2001:db8::2]:443"], "2001:db8::2"),
    ("127.0.0.1", ["198.51.100.7:5555"], "198.51.100.7"),
])
def test_the_client_address_is_believed_only_from_trusted_proxies(peer, forwarded, expected):
    assert client_address(peer, forwarded, TRUSTED) == expected


def test_the_middleware_rewrites_the_scope_and_drops_an_untrusted_forwarded_proto(settings):
    settings.REALTIME_TRUSTED_PROXIES = ["127.0.0.1"]
    seen = []
    app = ProxyHeadersMiddleware(lambda scope, receive, send: seen.append(scope))
    headers = [(b"x-forwarded-for", b"6.6.6.6, 198.51.100.1"), (b"x-forwarded-proto", b"https")]
    app({"type": "http", "client": ["127.0.0.1", 4000], "headers": list(headers)}, None, None)
    app({"type": "websocket", "client": ["203.0.113.9", 4001], "headers": list(headers)}, None, None)
    assert seen[0]["client"] == ["198.51.100.1", 0] and seen[0]["peer"] == ["127.0.0.1", 4000]
    assert (b"x-forwarded-proto", b"https") in seen[0]["headers"]
    assert seen[1]["client"] == ["203.0.113.9", 4001] and "peer" not in seen[1]
    assert [n for n, _ in seen[1]["headers"]] == [b"x-forwarded-for"]


def test_a_forwarding_peer_that_is_not_trusted_is_reported_once(settings, caplog):
    """An operator who forgot REALTIME_TRUSTED_PROXIES hears of it (once per peer)."""
    import logging

    from realtime.web import proxies

    settings.REALTIME_TRUSTED_PROXIES = []
    proxies._warned.clear()
    caplog.set_level(logging.WARNING, logger="realtime.web.proxies")
    app = ProxyHeadersMiddleware(lambda scope, receive, send: None)
    for _ in range(3):
        app({"type": "http", "client": ["10.0.0.5", 1], "headers": [(b"x-forwarded-for", b"198.51.100.1")]}, None, None)
    app({"type": "http", "client": ["10.0.0.6", 1], "headers": []}, None, None)
    assert [(r.levelname, r.getMessage(), r.addr) for r in caplog.records] == [
        ("WARNING", "proxy.untrusted", "10.0.0.5")]


def test_sign_in_and_sign_up_are_counted_by_the_worker_while_the_cache_is_down(demo, limits, settings, monkeypatch):
    """Sessions live in the database: a Redis outage must not turn the forms into
    500s, nor open them to guessing: each worker counts on its own meanwhile."""
    from accounts import throttle
    from tests.services import free_port

    monkeypatch.setattr(throttle, "local_counters", throttle.LocalCounters())
    settings.CACHES = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache",
                                   "LOCATION": f"redis://127.0.0.1:{free_port()}/0"}}
    assert attempt(Client(), "alice", "wrong").status_code == 200
    assert attempt(Client(), "alice", "demo-password").status_code == 302
    res = Client().post("/accounts/signup/", {"username": "offline", "password1": "a-long-passphrase-42",
                                              "password2": "a-long-passphrase-42"})
    assert res.status_code == 302
    # Guessing from one address stops at its limit (6), as with the cache up.
    attacker = Client()
    assert [attempt(attacker, f"nobody{i}", addr="10.7.0.1").status_code for i in range(7)] == [200] * 6 + [429]
    refused = attempt(attacker, "bob", "demo-password", addr="10.7.0.1")
    assert refused.status_code == 429 and int(refused["Retry-After"]) > 86000


def test_a_workers_own_counters_end_their_windows_and_stay_bounded(monkeypatch):
    from accounts import throttle

    now = [1000.0]
    monkeypatch.setattr(throttle, "clock", lambda: now[0])
    counters = throttle.LocalCounters()
    assert throttle.parse_rate("20/10m") == (20, 600) and throttle.parse_rate("10/h") == (10, 3600)
    assert throttle.parse_rate("20/600") == (20, 600)  # (no unit: seconds, as django-ratelimit reads it)
    assert [counters.usage("g", "2/m", "k", True)["should_limit"] for _ in range(3)] == [False, False, True]
    assert counters.usage("g", "2/m", "k", False) == {"count": 3, "limit": 2, "should_limit": True, "time_left": 60}
    assert counters.usage("g", "2/m", "other", False)["count"] == 0  # (read only: nothing kept)
    now[0] += 60  # the window has ended
    assert counters.usage("g", "2/m", "k", False)["count"] == 0
    counters.MAX = 10
    for n in range(11):  # past the bound: the ended window goes first, then the oldest
        counters.usage("g", "2/m", f"new{n}", True)
    # (at the eleventh: the ended one went, then the oldest down to 9; then new10 came)
    kept = counters.windows
    assert len(kept) == 10 and counters.digest("g", "k") not in kept
    assert counters.digest("g", "new10") in kept and counters.digest("g", "new0") not in kept


def test_every_spelling_of_an_account_counts_against_it(demo, limits):
    """Django's form applies NFKC before looking the user up: fullwidth and
    mathematical letters reach alice, and must share her counter."""
    spellings = ["ａｌｉｃｅ", "𝐚𝐥𝐢𝐜𝐞", "ALICE"]
    statuses = [attempt(Client(), name, addr=f"10.4.0.{i}").status_code for i, name in enumerate(spellings)]
    assert statuses == [200, 200, 200]
    assert attempt(Client(), "alice", "demo-password", addr="10.4.0.9").status_code == 429


def test_a_balancer_on_a_unix_socket_is_trusted_only_when_named(settings):
    seen = []
    app = ProxyHeadersMiddleware(lambda scope, receive, send: seen.append(scope["client"]))
    scope = {"type": "websocket", "client": None, "headers": [(b"x-forwarded-for", b"198.51.100.4")]}
    settings.REALTIME_TRUSTED_PROXIES = ["127.0.0.1"]
    app(dict(scope), None, None)
    settings.REALTIME_TRUSTED_PROXIES = ["unix"]
    app(dict(scope), None, None)
    assert seen == [None, ["198.51.100.4", 0]]


def test_a_peers_trust_and_an_origins_verdict_follow_the_settings_they_are_remembered_under(settings):
    """peer_trusted and origin_allowed remember their parses; a change of
    REALTIME_TRUSTED_PROXIES or REALTIME_ALLOWED_ORIGINS is seen at once."""
    from realtime.web.origins import origin_allowed
    from realtime.web.proxies import peer_trusted

    settings.REALTIME_TRUSTED_PROXIES = ["10.0.0.0/8"]
    assert peer_trusted("10.1.2.3") is True and peer_trusted("192.0.2.7") is False
    settings.REALTIME_TRUSTED_PROXIES = ["192.0.2.0/24"]
    assert peer_trusted("10.1.2.3") is False and peer_trusted("192.0.2.7") is True
    settings.REALTIME_ALLOWED_ORIGINS = ["https://app.test"]
    assert origin_allowed("https://app.test:443") is True and origin_allowed("https://evil.test") is False
    settings.REALTIME_ALLOWED_ORIGINS = ["https://evil.test"]
    assert origin_allowed("https://app.test:443") is False and origin_allowed("https://evil.test") is True


def test_a_long_origin_is_judged_but_not_remembered(settings):
    """An Origin is the client's to choose, up to the 16 KiB of headers: one longer
    than any real origin is parsed each time, never kept by the origins' cache."""
    from realtime.web import origins

    settings.REALTIME_ALLOWED_ORIGINS = ["https://app.test"]
    origins._parsed.cache_clear()
    long_origin = "https://" + "a" * 16000 + ".test"
    assert origins.origin_allowed(long_origin) is False
    assert origins._parsed.cache_info().currsize == 0
    assert origins.origin_allowed("https://app.test") is True
    assert origins._parsed.cache_info().currsize == 1
