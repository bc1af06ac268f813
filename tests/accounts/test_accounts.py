"""Sign-in, sign-out, sign-up, demo data, and start-up configuration."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.test import Client

from realtime.models import Membership, Room

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.django_db


def test_login_with_username_and_password_then_logout(demo):
    client = Client()
    res = client.post("/accounts/login/", {"username": "alice", "password": "demo-password"})
    assert res.status_code == 302 and res["Location"] == "/"
    assert client.get("/").status_code == 200
    assert client.post("/accounts/logout/").status_code == 302
    assert client.get("/").status_code == 302


def test_wrong_password_is_refused(demo):
    res = Client().post("/accounts/login/", {"username": "alice", "password": "nope"})
    assert res.status_code == 200 and b'role="alert"' in res.content


def test_signup_creates_a_user_who_can_post_in_public_rooms(demo):
    client = Client()
    res = client.post(
        "/accounts/signup/",
        {"username": "dave", "password1": "a-long-passphrase-42", "password2": "a-long-passphrase-42"},
    )
    assert res.status_code == 302
    assert get_user_model().objects.filter(username="dave").exists()
    res = client.post("/api/v1/rooms/general/messages/", {"body": "hi", "client_id": "d1"}, content_type="application/json")
    assert res.status_code == 200
    assert client.post("/api/v1/rooms/ops/messages/", {"body": "hi", "client_id": "d2"}, content_type="application/json").status_code == 404


def test_seed_demo_is_idempotent(db):
    call_command("seed_demo", stdout=open(os.devnull, "w"))
    call_command("seed_demo", stdout=open(os.devnull, "w"))
    assert sorted(get_user_model().objects.values_list("username", flat=True)) == ["admin", "alice", "bob", "carol"]
    assert get_user_model().objects.get(username="admin").is_staff
    general, ops = Room.objects.get(slug="general"), Room.objects.get(slug="ops")
    assert general.is_public and not ops.is_public
    roles = dict(Membership.objects.filter(room=general).values_list("user__username", "role"))
    assert roles == {"alice": "owner", "bob": "member", "carol": "reader"}
    assert dict(Membership.objects.filter(room=ops).values_list("user__username", "role")) == {"alice": "owner", "bob": "member"}


def test_seed_demo_password_option(db):
    call_command("seed_demo", "--password", "other-pass-1", stdout=open(os.devnull, "w"))
    assert get_user_model().objects.get(username="bob").check_password("other-pass-1")


def run_settings(env, show="settings.DEBUG"):
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "DATABASE_URL", "REDIS_URL"))}
    return subprocess.run(
        [sys.executable, "-c", f"import django; django.setup(); from django.conf import settings; print({show})"],
        cwd=ROOT, env={**clean, "DJANGO_SETTINGS_MODULE": "project.settings", **env}, capture_output=True, text=True,
    )


PRODUCTION = {"DJANGO_DEBUG": "0", "DJANGO_SECRET_KEY": "x" * 50, "DJANGO_ALLOWED_HOSTS": "chat.example.test",
              "DJANGO_ALLOWED_ORIGINS": "https://chat.example.test"}


@pytest.mark.parametrize("origins, message", [
    (None, "DJANGO_ALLOWED_ORIGINS must list the full origins"),
    ("*", "'*' is refused with DEBUG off"),
    ("https://chat.example.test,*", "'*' is refused with DEBUG off"),
    ("chat.example.test", "is not an origin"),
    ("ftp://chat.example.test", "is not an origin"),
    ("https://chat.example.test/app", "is not an origin"),
])
def test_debug_off_needs_an_explicit_list_of_full_origins(origins, message):
    env = {k: v for k, v in PRODUCTION.items() if k != "DJANGO_ALLOWED_ORIGINS"}
    if origins is not None:
        env["DJANGO_ALLOWED_ORIGINS"] = origins
    res = run_settings(env)
    assert res.returncode != 0
    assert message in res.stderr


def test_debug_on_may_allow_any_origin():
    assert run_settings({"DJANGO_ALLOWED_ORIGINS": "*"}).returncode == 0


def test_debug_off_hardens_cookies_and_transport():
    show = ("settings.SESSION_COOKIE_SECURE, settings.CSRF_COOKIE_SECURE, settings.SESSION_COOKIE_HTTPONLY, "
            "settings.SESSION_COOKIE_SAMESITE, settings.SECURE_HSTS_SECONDS, settings.SECURE_CONTENT_TYPE_NOSNIFF")
    res = run_settings(PRODUCTION, show)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["True", "True", "True", "Lax", "31536000", "True"]
    # The development default keeps cookies usable over plain http.
    assert run_settings({}, show).stdout.split()[:2] == ["False", "False"]


def test_debug_off_without_secret_key_or_hosts_stops_start_up():
    res = run_settings({"DJANGO_DEBUG": "0"})
    assert res.returncode != 0
    assert "DJANGO_SECRET_KEY, DJANGO_ALLOWED_HOSTS" in res.stderr


def test_debug_off_with_both_set_starts():
    res = run_settings(PRODUCTION)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False"


def test_no_environment_is_the_embedded_default():
    res = subprocess.run(
        [sys.executable, "-c", "import django; django.setup(); from django.conf import settings as s; "
         "print(s.DEBUG, s.DATABASES['default']['ENGINE'], s.CHANNEL_LAYERS['default']['BACKEND'])"],
        cwd=ROOT, env={"PATH": os.environ["PATH"], "DJANGO_SETTINGS_MODULE": "project.settings"}, capture_output=True, text=True,
    )
    assert res.stdout.split() == ["True", "django.db.backends.sqlite3", "channels.layers.InMemoryChannelLayer"]


def test_urls_switch_to_production_parts():
    res = run_settings({"DATABASE_URL": "postgres://u@127.0.0.1:5/app", "REDIS_URL": "redis://127.0.0.1:7/0"})
    assert res.returncode == 0, res.stderr
    res = subprocess.run(
        [sys.executable, "-c", "import django; django.setup(); from django.conf import settings as s; "
         "print(s.DATABASES['default']['ENGINE'], s.CHANNEL_LAYERS['default']['BACKEND'])"],
        cwd=ROOT, env={"PATH": os.environ["PATH"], "DJANGO_SETTINGS_MODULE": "project.settings",
                       "DATABASE_URL": "postgres://u@127.0.0.1:5/app", "REDIS_URL": "redis://127.0.0.1:7/0"},
        capture_output=True, text=True,
    )
    assert res.stdout.split() == ["django.db.backends.postgresql", "channels_redis.core.RedisChannelLayer"]
