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
