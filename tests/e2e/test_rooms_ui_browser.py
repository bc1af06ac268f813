"""Rooms, DMs, members, reactions, mentions and search in the chat page, between
two people in real browsers through a real daphne: alice makes a private room and
adds bob (it appears in his list without a reload), @mentions him (his mention
badge, then the highlight), they react to each other (chips live, aria-pressed),
bob opens a DM, alice finds an old message by search and the result opens its
room there, bob is removed while looking at the room, and the phone width's
sidebar toggle and dialogs. Screenshots at 1280 and 375 px in test-artifacts/."""

import re

import pytest
from playwright.sync_api import expect

from tests.e2e.conftest import OPEN_CONTEXTS
from tests.e2e.test_chat_browser import sign_in as shared_sign_in
from tests.services import AppServer

pytestmark = pytest.mark.e2e

WIDE = {"width": 1280, "height": 800}
PHONE = {"width": 375, "height": 740}
ARCHIVE = 1200  # messages in #archive: message 17 is six pages of history back


@pytest.fixture(scope="module")
def app_server(tmp_path_factory):
    server = AppServer(tmp_path_factory.mktemp("rooms-ui"))
    server.manage("migrate", "--noinput")
    server.manage("seed_demo")
    server.manage("shell", "-c", f"from tests.e2e.seed_history import seed; seed('archive', {ARCHIVE})")
    server.start()
    yield server
    server.stop()


def sign_in(browser, server, username, viewport=WIDE):
    """test_chat_browser's sign-in, at this module's widths, waiting for the socket."""
    page = shared_sign_in(browser, server, username, viewport=viewport)
    connected(page)
    return page


def connected(page):
    expect(page.locator("#status")).to_have_text("connected", timeout=10_000)


def send(page, text):
    page.fill("#body", text)
    page.click("#send")


def message(page, text):
    return page.locator("#messages li.message", has_text=text)


def test_private_room_invite_mention_reactions_dm_and_removal(app_server, browser, artifacts):
    alice = sign_in(browser, app_server, "alice")
    bob = sign_in(browser, app_server, "bob")

    # -- alice makes a private room; the API's error shows in the dialog first --------
    alice.get_by_role("button", name="New room").click()
    dialog = alice.get_by_role("dialog", name="New room")
    expect(dialog).to_be_visible()
    expect(alice.locator("#new-room-name")).to_be_focused()
    alice.locator("#new-room-name").fill("General")
    dialog.get_by_role("button", name="Create room").click()
    expect(alice.locator("#new-room-error")).to_have_text("a room named 'General' exists already; pick another name")
    expect(alice.locator("#new-room-name")).to_have_attribute("aria-invalid", "true")
    alice.locator("#new-room-name").fill("Launch Plan")
    dialog.get_by_label("Private: only people who are added").check()
    alice.locator("#new-room-topic").fill("Ship it by Friday")
    dialog.get_by_role("button", name="Create room").click()
    alice.wait_for_url(f"{app_server.url}/rooms/launch-plan/")
    connected(alice)
    expect(alice.locator("#room-title")).to_have_text("Launch Plan #launch-plan · private · owner")
    expect(alice.locator("#topic")).to_have_text("Ship it by Friday")
    expect(alice.locator('#room-list a[aria-current="page"]')).to_have_attribute("data-room", "launch-plan")

    # -- alice adds bob: it appears in bob's list without a reload ----------------------
    expect(alice.locator("#members-button")).to_have_text("Members (1)", timeout=10_000)
    alice.locator("#members-button").click()
    members = alice.get_by_role("dialog", name="Members of #launch-plan")
    members.get_by_label("Add someone").fill("nobody-here")
    members.get_by_role("button", name="Add").click()
    expect(alice.locator("#members-error")).to_have_text("no such user: nobody-here")
    members.get_by_label("Add someone").fill("bob")
    members.get_by_role("button", name="Add").click()
    expect(alice.locator("#member-list li")).to_have_count(2, timeout=10_000)
    expect(members.get_by_label("Role of bob")).to_have_value("member")
    expect(alice.locator("#members-button")).to_have_text("Members (2)")
    alice.keyboard.press("Escape")
    expect(members).to_be_hidden()

    launch = bob.locator('#room-list a[data-room="launch-plan"]')
    # Pushed to bob's page (rooms.changed) at once, not found by a timed re-ask.
    expect(launch).to_be_visible(timeout=3_000)
    expect(launch).to_have_accessible_name(re.compile(r"^#launch-plan\s*$"))

    # -- a mention: bob's badges, then the highlight ------------------------------------
    send(alice, "Welcome @bob, the plan is in the doc")
    expect(launch.locator(".unread")).to_have_text("1, 1 unread", timeout=10_000)
    expect(launch.locator(".mentions")).to_have_text("@1, 1 mention")
    expect(launch).to_have_accessible_name(re.compile(r"^#launch-plan\s*,\s*1 mention\s*,\s*1 unread$"))
    expect(bob).to_have_title("(1) #general · Realtime")
    bob.screenshot(path=str(artifacts / "rooms-badges-1280.png"))
    launch.click()
    bob.wait_for_url(f"{app_server.url}/rooms/launch-plan/")
    connected(bob)
    welcome = message(bob, "Welcome")
    expect(welcome).to_have_class(re.compile(r"\bmentions-me\b"))
    expect(welcome.locator(".mention.me")).to_have_text("@bob")
    expect(message(alice, "Welcome").locator(".mention")).to_have_text("@bob")
    expect(message(alice, "Welcome")).not_to_have_class(re.compile(r"\bmentions-me\b"))

    # -- reactions: the picker, chips live on both sides, aria-pressed -------------------
    welcome.get_by_role("button", name=re.compile(r"^Add a reaction to alice's message from ")).click()
    picker = bob.get_by_role("dialog", name=re.compile(r"^React to alice's message"))
    expect(picker).to_be_visible()
    picker.get_by_role("button", name="React with 🎉").click()
    expect(picker).to_be_hidden()
    chip = lambda page: message(page, "Welcome").locator(".chip", has_text="🎉")  # noqa: E731
    expect(chip(bob)).to_have_text("🎉 1", timeout=10_000)
    expect(chip(bob)).to_have_attribute("aria-pressed", "true")
    expect(chip(alice)).to_have_text("🎉 1", timeout=10_000)
    expect(chip(alice)).to_have_attribute("aria-pressed", "false")
    expect(chip(alice)).to_have_accessible_name("🎉 1: bob")
    chip(alice).click()
    expect(chip(alice)).to_have_text("🎉 2", timeout=10_000)
    expect(chip(alice)).to_have_attribute("aria-pressed", "true")
    expect(chip(bob)).to_have_text("🎉 2", timeout=10_000)
    expect(chip(bob)).to_have_accessible_name("🎉 2: you and alice")
    # A typed emoji too; a click on one's own chip takes it back.
    message(alice, "Welcome").get_by_role("button", name=re.compile(r"^Add a reaction")).click()
    alice.locator("#picker-input").fill("🚀")
    alice.locator("#picker-input").press("Enter")
    expect(message(bob, "Welcome").locator(".chip")).to_have_text(["🎉 2", "🚀 1"], timeout=10_000)
    chip(bob).click()
    expect(chip(alice)).to_have_text("🎉 1", timeout=10_000)
    expect(chip(bob)).to_have_attribute("aria-pressed", "false")

    # -- @-autocomplete in the composer --------------------------------------------------
    bob.locator("#body").press_sequentially("thanks @al", delay=20)
    expect(bob.get_by_role("option")).to_have_text(["@alice"])
    bob.locator("#body").press("Enter")  # takes the name, does not send
    expect(bob.locator("#body")).to_have_value("thanks @alice ")
    bob.locator("#body").press("Enter")
    expect(message(alice, "thanks").locator(".mention.me")).to_have_text("@alice", timeout=10_000)
    alice.screenshot(path=str(artifacts / "rooms-reactions-1280.png"))

    # -- a DM: bob opens it, alice's list shows it by bob's name with his message ------
    bob.get_by_role("button", name="New message").click()
    bob.get_by_label("To", exact=True).fill("alice")
    bob.get_by_role("dialog", name="New message").get_by_role("button", name="Open").click()
    bob.wait_for_url(re.compile(r"/rooms/dm-[a-z0-9-]+/$"))
    connected(bob)
    expect(bob.locator("#room-title")).to_have_text("alice direct message")
    send(bob, "psst, a secret")
    expect(message(bob, "psst")).to_have_count(1, timeout=10_000)
    dm = alice.locator("#dm-list a[data-kind=dm]")
    expect(dm).to_have_count(1, timeout=3_000)  # pushed (rooms.changed)
    expect(dm.locator(".name")).to_have_text("bob")
    expect(dm.locator(".unread")).to_have_text("1, 1 unread", timeout=10_000)
    expect(bob.locator("#dm-list a[aria-current=page] .name")).to_have_text("alice")

    # -- bob is removed while looking at the private room --------------------------------
    bob.locator('#room-list a[data-room="launch-plan"]').click()
    bob.wait_for_url(f"{app_server.url}/rooms/launch-plan/")
    connected(bob)
    expect(message(bob, "Welcome")).to_have_count(1, timeout=10_000)
    alice.locator("#members-button").click()
    alice.get_by_role("button", name="Remove bob").click()
    confirm = alice.get_by_role("alertdialog")
    expect(confirm).to_have_accessible_name("Remove bob from this room?")
    confirm.get_by_role("button", name="Remove bob").click()
    expect(confirm).to_be_hidden()
    expect(alice.locator("#member-list li")).to_have_count(1, timeout=10_000)
    expect(bob.locator("#access-notice")).to_have_text("You were removed from this room. Back to your rooms", timeout=10_000)
    expect(bob.locator("#body")).to_be_disabled()
    expect(bob.locator("#send")).to_be_disabled()
    # The messages stay readable; nothing on them can be acted on any more.
    expect(message(bob, "Welcome")).to_have_count(1)
    expect(bob.locator("#messages .actions button")).to_have_count(0)
    expect(bob.locator("#leave-button")).to_be_disabled()
    expect(bob.locator("#presence")).to_have_text("")  # the room's people are no longer his to see
    bob.screenshot(path=str(artifacts / "rooms-removed-1280.png"))
    expect(bob.locator('#room-list a[data-room="launch-plan"]')).to_have_count(1)  # the open room stays listed
    assert alice.errors == [] and bob.errors == []


def sign_up(browser, server, username, viewport=WIDE):
    """A new person: the sign-up form, then the #general page."""
    context = browser.new_context(viewport=viewport)
    OPEN_CONTEXTS.append(context)
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(f"{server.url}/accounts/signup/")
    page.fill("#id_username", username)
    page.fill("#id_password1", "a-long-passphrase-42")
    page.fill("#id_password2", "a-long-passphrase-42")
    page.click("button[type=submit]")
    page.wait_for_url(f"{server.url}/")
    page.goto(f"{server.url}/rooms/general/")
    connected(page)
    page.errors = errors
    return page


def test_two_people_who_just_signed_up_share_a_private_room_a_dm_mentions_reactions_and_search(
        app_server, browser, artifacts):
    """The issue's "done when", from the sign-up form on: dana and erin sign up, dana
    makes a private room and adds erin (it appears for her at once), a mention, a
    reaction each way, a DM, and erin finds dana's message by a word in it."""
    dana = sign_up(browser, app_server, "dana")
    erin = sign_up(browser, app_server, "erin")

    dana.get_by_role("button", name="New room").click()
    dialog = dana.get_by_role("dialog", name="New room")
    dana.locator("#new-room-name").fill("Kiwi Project")
    dialog.get_by_label("Private: only people who are added").check()
    dialog.get_by_role("button", name="Create room").click()
    dana.wait_for_url(f"{app_server.url}/rooms/kiwi-project/")
    connected(dana)
    dana.locator("#members-button").click()
    members = dana.get_by_role("dialog", name="Members of #kiwi-project")
    # The people picker: the start of a name offers the people it fits.
    members.get_by_label("Add someone").fill("er")
    suggestions = members.get_by_role("listbox", name="People")
    expect(suggestions.get_by_role("option")).to_have_text(["erin"])
    dana.screenshot(path=str(artifacts / "journey-people-picker-1280.png"))
    suggestions.get_by_role("option", name="erin").click()
    expect(members.get_by_label("Add someone")).to_have_value("erin")
    members.get_by_role("button", name="Add").click()
    expect(dana.locator("#member-list li")).to_have_count(2, timeout=10_000)
    dana.keyboard.press("Escape")

    kiwi = erin.locator('#room-list a[data-room="kiwi-project"]')
    expect(kiwi).to_be_visible(timeout=3_000)
    send(dana, "@erin the kiwi harvest starts Monday")
    expect(kiwi.locator(".mentions")).to_have_text("@1, 1 mention", timeout=10_000)
    kiwi.click()
    erin.wait_for_url(f"{app_server.url}/rooms/kiwi-project/")
    connected(erin)
    harvest = message(erin, "kiwi harvest")
    expect(harvest).to_have_class(re.compile(r"\bmentions-me\b"))
    harvest.get_by_role("button", name=re.compile(r"^Add a reaction to dana's message")).click()
    erin.get_by_role("dialog", name=re.compile(r"^React to dana's message")).get_by_role(
        "button", name="React with 👍").click()
    expect(message(dana, "kiwi harvest").locator(".chip")).to_have_accessible_name("👍 1: erin", timeout=10_000)
    send(erin, "great, thanks @dana")
    reply = message(dana, "great, thanks")
    expect(reply.locator(".mention.me")).to_have_text("@dana", timeout=10_000)
    reply.get_by_role("button", name=re.compile(r"^Add a reaction to erin's message")).click()
    dana.get_by_role("dialog", name=re.compile(r"^React to erin's message")).get_by_role(
        "button", name="React with 🎉").click()
    expect(message(erin, "great, thanks").locator(".chip")).to_have_accessible_name("🎉 1: dana", timeout=10_000)

    erin.get_by_role("button", name="New message").click()
    to = erin.get_by_label("To", exact=True)
    to.fill("da")
    expect(erin.get_by_role("dialog", name="New message").get_by_role("option")).to_have_text(["dana"])
    to.press("Enter")  # takes the suggestion, does not submit
    expect(to).to_have_value("dana, ")
    erin.get_by_role("dialog", name="New message").get_by_role("button", name="Open").click()
    erin.wait_for_url(re.compile(r"/rooms/dm-[a-z0-9-]+/$"))
    connected(erin)
    send(erin, "a word in private")
    dm = dana.locator("#dm-list a[data-kind=dm]")
    expect(dm.locator(".name")).to_have_text("erin", timeout=3_000)
    expect(dm.locator(".unread")).to_have_text("1, 1 unread", timeout=10_000)

    erin.get_by_role("searchbox", name="Search messages").first.fill("harvest")
    erin.get_by_role("searchbox", name="Search messages").first.press("Enter")
    result = erin.locator("#search-results a.result")
    expect(result).to_have_count(1, timeout=10_000)
    expect(result.locator(".result-meta strong")).to_have_text("#kiwi-project")
    expect(result.locator(".snippet mark")).to_have_text("harvest")
    erin.screenshot(path=str(artifacts / "journey-search-1280.png"))
    result.click()
    erin.wait_for_url(re.compile(r"/rooms/kiwi-project/\?at=3#m\d+$"))  # seq 3: after two member.joined
    expect(message(erin, "kiwi harvest")).to_be_focused(timeout=10_000)
    dana.screenshot(path=str(artifacts / "journey-dm-1280.png"))

    # dana, the room's only owner, leaves it: she names erin the owner on the way out.
    dana.locator('#room-list a[data-room="kiwi-project"]').click()
    dana.wait_for_url(f"{app_server.url}/rooms/kiwi-project/")
    connected(dana)
    dana.locator("#leave-button").click()
    confirm = dana.get_by_role("alertdialog")
    expect(confirm).to_have_accessible_name("You are the last owner of #kiwi-project. Leave it and make someone "
                                            "else its owner?")
    expect(confirm.get_by_label("New owner")).to_have_value("erin")
    dana.screenshot(path=str(artifacts / "journey-hand-over-1280.png"))
    confirm.get_by_role("button", name="Hand over and leave").click()
    dana.wait_for_url(f"{app_server.url}/")
    expect(erin.locator("#room-title")).to_have_text("Kiwi Project #kiwi-project · private · owner", timeout=10_000)
    roles = dana.request.get(f"{app_server.url}/api/v1/rooms/kiwi-project/members/")
    assert roles.status == 404  # dana is no member of the private room any more
    assert dana.errors == [] and erin.errors == []


def test_search_finds_an_old_message_and_opens_its_room_there(app_server, browser, artifacts):
    alice = sign_in(browser, app_server, "alice")
    alice.get_by_role("searchbox", name="Search messages").first.fill("17")
    alice.get_by_role("searchbox", name="Search messages").first.press("Enter")
    results = alice.get_by_role("dialog", name="Search")
    expect(results).to_be_visible()
    expect(alice.locator("#search-status")).to_have_text("1 message matches “17”.", timeout=10_000)
    result = alice.locator("#search-results a.result")
    expect(result).to_have_count(1)
    expect(result.locator(".result-meta strong")).to_have_text("#archive")
    expect(result.locator(".result-meta .author")).to_have_text("alice")
    expect(result.locator(".snippet")).to_have_text("message 17")
    expect(result.locator(".snippet mark")).to_have_text("17")
    alice.screenshot(path=str(artifacts / "rooms-search-1280.png"))
    result.click()
    alice.wait_for_url(re.compile(r"/rooms/archive/\?at=17#m\d+$"))
    connected(alice)
    target = alice.locator('#messages li.message[data-seq="17"]')
    expect(target).to_be_in_viewport(timeout=15_000)
    expect(target).to_have_class(re.compile(r"\btarget\b"))
    expect(target.locator(".body")).to_have_text("message 17")
    expect(target).to_be_focused()
    alice.screenshot(path=str(artifacts / "rooms-search-opened-1280.png"))
    assert alice.errors == []


def test_phone_width_sidebar_toggle_and_dialogs_fit(app_server, browser, artifacts):
    bob = sign_in(browser, app_server, "bob", viewport=PHONE)
    toggle = bob.get_by_role("button", name=re.compile(r"^☰ Rooms"))
    sidebar = bob.locator("#sidebar")
    expect(sidebar).to_be_hidden()
    expect(toggle).to_have_attribute("aria-expanded", "false")
    bob.screenshot(path=str(artifacts / "rooms-phone-375.png"))
    toggle.click()
    expect(sidebar).to_be_visible()
    expect(toggle).to_have_attribute("aria-expanded", "true")
    expect(bob.locator('#room-list a[data-room="general"]')).to_be_focused()
    expect(bob.locator("#room-list a .name")).to_have_text(["#general", "#ops 🔒"])
    bob.screenshot(path=str(artifacts / "rooms-phone-sidebar-375.png"))
    # Escape closes it and gives the focus back to the toggle.
    bob.keyboard.press("Escape")
    expect(sidebar).to_be_hidden()
    expect(toggle).to_be_focused()

    # A dialog fits the screen.
    toggle.click()
    bob.get_by_role("button", name="New room").click()
    dialog = bob.get_by_role("dialog", name="New room")
    expect(dialog).to_be_visible()
    box = dialog.bounding_box()
    assert box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"], box
    assert box["y"] >= 0 and box["y"] + box["height"] <= PHONE["height"], box
    bob.screenshot(path=str(artifacts / "rooms-phone-dialog-375.png"))
    dialog.get_by_role("button", name="Cancel").click()
    expect(dialog).to_be_hidden()

    # The members panel and the message's React button at phone width.
    bob.locator("#members-button").click()
    members = bob.get_by_role("dialog", name="Members of #general")
    expect(members.locator("#member-list li")).to_have_count(3, timeout=10_000)
    box = members.bounding_box()
    assert box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"], box
    bob.screenshot(path=str(artifacts / "rooms-phone-members-375.png"))
    assert bob.errors == []
