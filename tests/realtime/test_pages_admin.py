"""Pages and moderation in the admin."""

import pytest
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.test import Client

from realtime.delivery import publish as broadcast
from realtime.domain import services
from realtime.models import Event, Message

pytestmark = pytest.mark.django_db


def login(user):
    c = Client()
    c.force_login(user)
    return c


def test_pages_need_a_login(demo):
    assert Client().get("/").status_code == 302
    assert Client().get("/rooms/general/")["Location"].startswith("/accounts/login/")


def test_home_lists_visible_rooms(demo):
    html = login(demo["carol"]).get("/").content.decode()
    assert "/rooms/general/" in html and "/rooms/ops/" not in html


def test_room_page_loads_the_client_and_says_what_the_user_may_do(demo):
    res = login(demo["carol"]).get("/rooms/general/")
    html = res.content.decode()
    assert res.status_code == 200
    assert "realtime/chat.js" in html and 'id="status"' in html
    assert '"canPost": false' in html and 'id="composer"' not in html
    assert '"canPost": true' in login(demo["bob"]).get("/rooms/general/").content.decode()


def test_a_private_room_page_is_the_same_404_as_a_room_that_does_not_exist(demo):
    hidden, missing = (login(demo["carol"]).get(f"/rooms/{room}/") for room in ("ops", "nope"))
    assert hidden.status_code == missing.status_code == 404
    import re

    def page(res) -> bytes:  # (the logout form's CSRF token is masked anew for each response)
        return re.sub(rb'name="csrfmiddlewaretoken" value="[^"]+"', b"", res.content)

    assert page(hidden) == page(missing)
    assert b"Back to your rooms" in hidden.content  # the app's own page, signed in as carol
    assert b"carol" in hidden.content


def test_room_titles_are_escaped(demo):
    from realtime.models import Room

    Room.objects.filter(slug="general").update(title="<script>alert(1)</script>")
    html = login(demo["bob"]).get("/rooms/general/").content.decode()
    assert "<script>alert(1)</script>" not in html and "&lt;script&gt;" in html


@pytest.mark.django_db(transaction=True)
def test_admin_delete_is_a_moderated_broadcast_delete(demo):
    sent = services.perform_sync(services.message_send, user=demo["bob"], slug="general", body="spam", client_id="s")
    layer = get_channel_layer()
    channel = async_to_sync(layer.new_channel)()
    async_to_sync(layer.group_add)(broadcast.room_group("general"), channel)
    admin = login(demo["admin"])
    res = admin.post(
        "/admin/realtime/message/",
        {"action": "delete_and_broadcast", "_selected_action": [sent.id]},
    )
    assert res.status_code == 302
    message = Message.objects.get()
    assert message.deleted_at is not None and message.body == ""
    assert Event.objects.filter(type="message.deleted", seq=2).exists()
    got = async_to_sync(layer.receive)(channel)
    assert got["seq"] == 2 and '"type":"message.deleted"' in got["rt.v1.json"]


@pytest.mark.django_db(transaction=True)
def test_admin_delete_view_also_broadcasts(demo):
    sent = services.perform_sync(services.message_send, user=demo["bob"], slug="general", body="spam", client_id="s")
    res = login(demo["admin"]).post(f"/admin/realtime/message/{sent.id}/delete/", {"post": "yes"})
    assert res.status_code == 302
    assert Message.objects.get().deleted_at is not None
    assert Event.objects.filter(type="message.deleted").count() == 1


def test_admin_search_and_filters_render(demo):
    services.perform_sync(services.message_send, user=demo["bob"], slug="general", body="findme", client_id="s")
    admin = login(demo["admin"])
    assert b"findme" in admin.get("/admin/realtime/message/?q=findme").content
    assert admin.get("/admin/realtime/message/?room__id__exact=1").status_code == 200
    assert admin.get("/admin/realtime/room/").status_code == 200
    assert admin.get("/admin/realtime/membership/?role=reader").status_code == 200
    assert admin.get("/admin/realtime/event/").status_code == 200


def test_rooms_cannot_be_deleted_in_the_admin_and_slugs_are_validated(demo):
    from django.core.exceptions import ValidationError

    from realtime.models import Room

    admin = login(demo["admin"])
    assert admin.get("/admin/realtime/room/1/delete/").status_code == 403
    room = Room(slug="Lobby", title="x")
    with pytest.raises(ValidationError):
        room.full_clean()


def test_pages_carry_a_content_security_policy_of_their_own_origin(demo):
    res = login(demo["bob"]).get("/rooms/general/", HTTP_HOST="127.0.0.1:8000")
    policy = dict(part.strip().split(" ", 1) for part in res["Content-Security-Policy"].split(";"))
    assert policy["script-src"] == "'self'"  # no inline scripts, no other hosts
    assert policy["style-src"] == "'self'"
    assert policy["connect-src"] == "'self' ws://127.0.0.1:8000 wss://127.0.0.1:8000"
    assert policy["frame-ancestors"] == "'none'" and policy["object-src"] == "'none'"
    assert res["X-Frame-Options"] == "DENY" and res["X-Content-Type-Options"] == "nosniff"
    # The room page's inline data is a JSON block, which CSP does not execute.
    assert '<script type="module" src=' in res.content.decode()
    assert "<script>" not in res.content.decode()
    admin = login(demo["admin"]).get("/admin/")
    assert "style-src 'self' 'unsafe-inline'" in admin["Content-Security-Policy"]


def test_the_dashboard_is_for_staff(demo):
    assert Client().get("/dashboard/")["Location"].startswith("/accounts/login/")
    assert login(demo["bob"]).get("/dashboard/").status_code == 403
    res = login(demo["admin"]).get("/dashboard/")
    assert res.status_code == 200 and "realtime/dashboard.js" in res.content.decode()
    assert 'href="/dashboard/"' in res.content.decode()  # linked for staff
    assert 'href="/dashboard/"' not in login(demo["bob"]).get("/").content.decode()


def test_the_console_needs_its_permission_and_operates(demo, settings):
    from django.contrib.auth.models import Permission

    from realtime.state import heartbeat

    settings.REDIS_URL = ""
    url = "/admin/realtime/room/console/"
    staff = demo["bob"]
    staff.is_staff = True
    staff.save()
    assert login(staff).get(url).status_code == 403
    staff.user_permissions.add(Permission.objects.get(codename="operate_realtime"))
    heartbeat.SOCKETS["c-test"] = (demo["carol"].pk, "carol")
    try:
        async_to_sync(heartbeat.publish_once)()
        html = login(staff).get(url).content.decode()
    finally:
        heartbeat.SOCKETS.pop("c-test")
    assert heartbeat.worker_id() in html and "carol" in html and "Disconnect everywhere" in html

    layer = get_channel_layer()
    watch_user = async_to_sync(layer.new_channel)()
    async_to_sync(layer.group_add)(broadcast.user_group(demo["carol"].pk), watch_user)
    watch_workers = async_to_sync(layer.new_channel)()
    async_to_sync(layer.group_add)(broadcast.CONTROL_GROUP, watch_workers)
    assert login(staff).post(url, {"action": "disconnect", "user_id": demo["carol"].pk}).status_code == 302
    assert async_to_sync(layer.receive)(watch_user) == {"type": "force.disconnect", "group": f"user.{demo['carol'].pk}"}
    assert login(staff).post(url, {"action": "drain", "worker": "b"}).status_code == 302
    assert async_to_sync(layer.receive)(watch_workers) == {"type": "worker.drain", "worker": "b", "group": "realtime.workers"}


def test_a_non_staff_reader_of_the_dashboard_gets_the_apps_styled_403(demo):
    res = login(demo["bob"]).get("/dashboard/")
    html = res.content.decode()
    assert res.status_code == 403
    assert "<h1>Not allowed</h1>" in html and "Back to your rooms" in html
    assert 'href="/static/realtime/app.css"' in html and "bob" in html  # the app's page, signed in


def test_the_dashboard_tables_have_captions_and_column_headers(demo):
    import re

    html = login(demo["admin"]).get("/dashboard/").content.decode()
    tables = re.findall(r"<table>(.*?)</table>", html, re.S)
    assert len(tables) == 3
    for table in tables:
        assert re.search(r"<caption>[^<]{20,}</caption>", table)
        assert "<th>" not in table and '<th scope="col">' in table
    # Nothing that changes every second sits in a live region; only the badge and the error line are.
    assert html.count("aria-live=") == 1 and 'id="status"' in html
    assert re.findall(r'role="(?:status|alert|log|timer)"', html) == ['role="status"', 'role="alert"']


def test_favicon_is_served_from_static_and_named_by_every_page(demo):
    res = Client().get("/favicon.ico")
    assert res.status_code == 301 and res["Location"] == "/static/realtime/favicon.svg"
    icon = Client().get(res["Location"])
    assert icon.status_code == 200 and icon["Content-Type"] == "image/svg+xml"
    assert b"<svg" in b"".join(icon.streaming_content)
    for page in (Client().get("/accounts/login/"), login(demo["bob"]).get("/")):
        assert '<link rel="icon" href="/static/realtime/favicon.svg" type="image/svg+xml">' in page.content.decode()


CONSOLE = "/admin/realtime/room/console/"


def test_the_console_is_linked_from_the_admin_for_those_who_may_operate(demo):
    from django.contrib.auth.models import Permission

    admin = login(demo["admin"])  # a superuser: every permission
    for url in ("/admin/", "/admin/realtime/room/"):
        html = admin.get(url).content.decode()
        assert f'<a href="{CONSOLE}" id="console-link">Realtime console</a>' in html, url
    # Staff who may see rooms but not operate get no link (the console would answer 403).
    staff = demo["bob"]
    staff.is_staff = True
    staff.save()
    staff.user_permissions.add(Permission.objects.get(codename="view_room"))
    for url in ("/admin/", "/admin/realtime/room/"):
        res = login(staff).get(url)
        assert res.status_code == 200 and CONSOLE not in res.content.decode(), url
    staff.user_permissions.add(Permission.objects.get(codename="operate_realtime"))
    staff = type(staff).objects.get(pk=staff.pk)  # (permissions are cached on the instance)
    assert CONSOLE in login(staff).get("/admin/realtime/room/").content.decode()


def test_the_console_explains_the_embedded_default_calmly(demo, settings):
    settings.REDIS_URL = ""
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    html = login(demo["admin"]).get(CONSOLE).content.decode()
    assert "errornote" not in html and "REDIS_URL" in html
    assert '<div class="help" id="console-mode">' in html
    assert "one process with the in-memory channel layer" in html


def test_disconnecting_a_user_names_them_and_an_unknown_id_closes_nothing(demo, monkeypatch):
    calls = []

    async def record(user_id):
        calls.append(user_id)

    monkeypatch.setattr(broadcast, "force_disconnect", record)
    admin = login(demo["admin"])
    carol = demo["carol"]
    res = admin.post(CONSOLE, {"action": "disconnect", "user_id": carol.pk}, follow=True)
    assert calls == [carol.pk]
    assert (f"Closed every socket of carol (user {carol.pk}) on every worker (close code 4003)."
            in res.content.decode())
    res = admin.post(CONSOLE, {"action": "disconnect", "user_id": 987654}, follow=True)
    assert calls == [carol.pk]  # nothing sent for a user who does not exist
    assert "There is no user with id 987654; nothing was closed." in res.content.decode()
