"""Actions without a socket: state, refusals, and what is broadcast."""

import pytest
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer

from realtime.delivery import publish as broadcast
from realtime.domain import roomlog
from realtime.domain import services
from realtime.domain.errors import ActionError
from realtime.models import Event, Message, Room

# Real commits, so that on-commit broadcasts run as they do in production.
pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def captured(demo):
    """A channel in the general room's group, as a subscriber would have."""
    return _subscriber()


def _subscriber():
    layer = get_channel_layer()
    channel = async_to_sync(layer.new_channel)()
    async_to_sync(layer.group_add)(broadcast.room_group("general"), channel)

    def drain():
        got = []
        while True:
            try:
                got.append(async_to_sync(_receive)(layer, channel))
            except TimeoutError:
                return got

    return drain


async def _receive(layer, channel):
    import asyncio

    return await asyncio.wait_for(layer.receive(channel), 0.1)


def test_send_appends_one_event_with_the_next_seq_and_broadcasts_it_once(demo, captured):
    for i in range(3):
        result = services.perform_sync(services.message_send, user=demo["alice"], slug="general", body=f"b{i}", client_id=f"k{i}")
    assert result.seq == 3
    assert list(Event.objects.values_list("seq", flat=True)) == [1, 2, 3]
    assert Room.objects.get(slug="general").last_seq == 3
    sent = captured()
    assert [m["seq"] for m in sent] == [1, 2, 3]
    # Encoded once, for both wire formats.
    assert all(isinstance(m["rt.v1.json"], str) and isinstance(m["rt.v1.msgpack"], bytes) for m in sent)


def test_a_refusal_takes_no_seq_and_broadcasts_nothing(demo, captured):
    with pytest.raises(ActionError) as err:
        services.perform_sync(services.message_send, user=demo["carol"], slug="general", body="x", client_id="k")
    assert err.value.code == "forbidden"
    sent = services.perform_sync(services.message_send, user=demo["bob"], slug="general", body="x", client_id="k")
    with pytest.raises(ActionError):
        services.perform_sync(services.message_edit, user=demo["alice"], slug="general", message_id=sent.id, body="y")
    assert Room.objects.get(slug="general").last_seq == 1
    assert [m["seq"] for m in captured()] == [1]


def test_repeat_of_a_client_id_returns_the_original_and_writes_nothing(demo, captured):
    first = services.perform_sync(services.message_send, user=demo["bob"], slug="general", body="a", client_id="same")
    second = services.perform_sync(services.message_send, user=demo["bob"], slug="general", body="b", client_id="same")
    assert first == second
    assert Message.objects.get().body == "a"
    assert Event.objects.count() == 1
    # The original event is published again (the first broadcast may have been
    # lost); subscribers drop it by seq.
    assert [m["seq"] for m in captured()] == [1, 1]


def test_client_ids_are_per_user(demo):
    a = services.perform_sync(services.message_send, user=demo["alice"], slug="general", body="a", client_id="same")
    b = services.perform_sync(services.message_send, user=demo["bob"], slug="general", body="b", client_id="same")
    assert a.id != b.id and b.seq == 2


def test_edit_event_is_a_delta(demo, captured):
    sent = services.perform_sync(services.message_send, user=demo["alice"], slug="general", body="a", client_id="e")
    services.perform_sync(services.message_edit, user=demo["alice"], slug="general", message_id=sent.id, body="b")
    event = Event.objects.get(seq=2)
    assert event.type == "message.edited"
    assert set(event.payload) == {"id", "body", "edited_at"}


def test_delete_clears_the_body_and_logs_it(demo, captured):
    sent = services.perform_sync(services.message_send, user=demo["bob"], slug="general", body="secret", client_id="d")
    services.perform_sync(services.message_delete, user=demo["alice"], slug="general", message_id=sent.id)
    message = Message.objects.get()
    assert message.body == "" and message.deleted_at is not None
    assert Event.objects.get(seq=2).payload == {"id": sent.id}
    assert [m["seq"] for m in captured()] == [1, 2]


def test_message_in_another_room_is_not_found(demo):
    sent = services.perform_sync(services.message_send, user=demo["alice"], slug="ops", body="a", client_id="o")
    with pytest.raises(ActionError) as err:
        services.perform_sync(services.message_delete, user=demo["alice"], slug="general", message_id=sent.id)
    assert err.value.code == "not_found"


def test_replay_window(demo, settings):
    settings.REALTIME = {**settings.REALTIME, "REPLAY_MAX": 3}
    for i in range(5):
        services.message_send(user=demo["alice"], slug="general", body="x", client_id=f"r{i}")
    assert [e.seq for e in roomlog.room_replay(user=demo["bob"], slug="general", since=2).events] == [3, 4, 5]
    with pytest.raises(ActionError) as err:
        roomlog.room_replay(user=demo["bob"], slug="general", since=1)
    assert err.value.code == "recovery_failed"
    # A pruned log cannot be replayed either.
    Event.objects.filter(seq__lte=3).delete()
    with pytest.raises(ActionError):
        roomlog.room_replay(user=demo["bob"], slug="general", since=2)
    assert [e.seq for e in roomlog.room_replay(user=demo["bob"], slug="general", since=3).events] == [4, 5]


def test_nothing_is_broadcast_before_commit(demo):
    from django.db import transaction

    drain = _subscriber()
    with transaction.atomic():
        services.perform_sync(services.message_send, user=demo["alice"], slug="general", body="x", client_id="t")
        assert drain() == [], "broadcast inside the transaction"
    assert [m["seq"] for m in drain()] == [1]
