"""The database restored from a backup while people have the chat open: with the
log's new epoch (`manage.py reset_epoch`), their pages reload the room instead of
resuming from a seq that now names other messages. (Its own module: the restore
rewinds this module's server.)"""

import sqlite3

import pytest
from playwright.sync_api import expect

from tests.e2e.test_chat_browser import send, sign_in

pytestmark = pytest.mark.e2e

POST = """
from django.contrib.auth import get_user_model
from realtime.domain import services
alice = get_user_model().objects.get(username="alice")
for i in (1, 2, 3):
    services.message_send(user=alice, slug="general", body=f"after the restore {i}", client_id=f"restore-{i}")
"""


def copy_database(src, dst) -> None:
    with sqlite3.connect(src) as a, sqlite3.connect(dst) as b:
        a.backup(b)


def database_of(server) -> str:
    return server.env["DATABASE_URL"].removeprefix("sqlite:///")


def history(server) -> list[str]:
    with sqlite3.connect(database_of(server)) as db:
        return [row[0] for row in db.execute(
            "SELECT body FROM realtime_message m JOIN realtime_room r ON r.id = m.room_id "
            "WHERE r.slug = 'general' AND m.deleted_at IS NULL ORDER BY m.seq")]


def test_a_restored_database_makes_open_pages_reload_not_resume(app_server, browser, artifacts, tmp_path):
    alice = sign_in(browser, app_server, "alice")
    bob = sign_in(browser, app_server, "bob")
    for page in (alice, bob):
        expect(page.locator("#status")).to_have_text("connected", timeout=10_000)
    send(alice, "kept by the backup")
    expect(bob.locator("#messages .body").last).to_have_text("kept by the backup", timeout=10_000)

    database = database_of(app_server)
    copy_database(database, tmp_path / "backup.sqlite3")  # the backup
    send(alice, "lost 1")
    send(bob, "lost 2")
    for page in (alice, bob):
        expect(page.locator("#messages .body").last).to_have_text("lost 2", timeout=10_000)

    # The server goes down; the database comes back from the backup, and new
    # messages take the seqs the pages hold for "lost 1" and "lost 2" and one more.
    app_server.terminate()
    app_server.proc.wait(15)
    copy_database(tmp_path / "backup.sqlite3", database)
    app_server.manage("reset_epoch", "--all")
    app_server.manage("shell", "-c", POST)
    app_server.start()

    expected = history(app_server)
    assert expected[-4:] == ["kept by the backup", "after the restore 1", "after the restore 2", "after the restore 3"]
    for page in (alice, bob):
        expect(page.locator("#status")).to_have_text("connected", timeout=30_000)
        # Exactly the restored history: nothing of the lost one, nothing missing.
        expect(page.locator("#messages .body")).to_have_text(expected, timeout=10_000)
    send(bob, "talking again")
    for page in (alice, bob):
        expect(page.locator("#messages .body")).to_have_text(expected + ["talking again"], timeout=10_000)
    bob.screenshot(path=str(artifacts / "after-restore.png"))
    assert alice.errors == [] and bob.errors == []
