"""Rooms, memberships, messages, and each room's ordered event log."""

import secrets

from django.conf import settings
from django.core.validators import RegexValidator
from django.db import models

from realtime.protocol import ROOM_SLUG_PATTERN


def new_epoch() -> str:
    """A room log's epoch: random, so that a log started again (a room deleted and
    made anew, a database restored from a backup, `manage.py reset_epoch`) never
    has the epoch of the history a client resumes from."""
    return secrets.token_hex(4)


class RoomKind(models.TextChoices):
    ROOM = "room", "Room"
    DM = "dm", "Direct message"


# Bounds of what people type when they make a room (domain/rooms.py checks them).
ROOM_NAME_MAX = 80
ROOM_TOPIC_MAX = 250


class Room(models.Model):
    slug = models.SlugField(
        max_length=50,
        unique=True,
        validators=[RegexValidator(ROOM_SLUG_PATTERN, "Lowercase letters, digits, - and _, starting with a letter or digit.")],
    )
    title = models.CharField(max_length=200)
    is_public = models.BooleanField(
        default=True, help_text="Public rooms are visible to every signed-in user; private ones to members only."
    )
    # A room people join and leave, or a direct message: the one private room of a
    # fixed set of people (domain/rooms.py), whose membership nobody changes.
    kind = models.CharField(max_length=8, choices=RoomKind.choices, default=RoomKind.ROOM)
    topic = models.CharField(max_length=ROOM_TOPIC_MAX, blank=True, default="")
    # DMs only: the sorted ids of its people ("3.7.12"). Unique, so asking twice,
    # even at once, gives the one room.
    dm_key = models.CharField(max_length=200, null=True, blank=True, unique=True, editable=False)
    read_markers = models.BooleanField(
        default=True, help_text="Members see how far the others have read (read markers)."
    )
    # The seq of the room's newest event. Incremented with an UPDATE inside the
    # transaction that writes the event, so seqs are gap-free and commit in order.
    last_seq = models.PositiveBigIntegerField(default=0, editable=False)
    # Which history the seqs belong to (centrifuge's offset + epoch): a client
    # resumes with (since, epoch) and a different epoch is recovery_failed, so it
    # reloads instead of resuming silently into another history.
    epoch = models.CharField(max_length=16, default=new_epoch, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["slug"]
        permissions = [("operate_realtime", "Can watch live connections, disconnect users and drain workers")]

    def __str__(self) -> str:
        return self.slug


class Role(models.TextChoices):
    OWNER = "owner", "Owner"
    MODERATOR = "moderator", "Moderator"
    MEMBER = "member", "Member"
    READER = "reader", "Reader"


class Membership(models.Model):
    room = models.ForeignKey(Room, on_delete=models.CASCADE, related_name="memberships")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="memberships")
    role = models.CharField(max_length=16, choices=Role.choices, default=Role.MEMBER)
    joined_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["room", "user"], name="membership_unique_room_user")]

    def __str__(self) -> str:
        return f"{self.user} in {self.room} ({self.role})"


class ReadState(models.Model):
    """How far a user has read a room (any user who may see it, member or not):
    the highest seq they have marked read. It only moves forward."""

    room = models.ForeignKey(Room, on_delete=models.CASCADE, related_name="read_states")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="read_states")
    seq = models.PositiveBigIntegerField(default=0)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["room", "user"], name="readstate_unique_room_user")]

    def __str__(self) -> str:
        return f"{self.user} read {self.room} to {self.seq}"


class Message(models.Model):
    room = models.ForeignKey(Room, on_delete=models.CASCADE, related_name="messages")
    author = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="messages")
    body = models.TextField()
    # Chosen by the sending client; a retry with the same id returns the original.
    client_id = models.CharField(max_length=64)
    # The seq of the event that created the message.
    seq = models.PositiveBigIntegerField()
    created_at = models.DateTimeField()
    edited_at = models.DateTimeField(null=True, blank=True)
    # Deleted messages keep their row (the log refers to them) but lose their body.
    deleted_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["room", "seq"]
        constraints = [
            models.UniqueConstraint(fields=["author", "client_id"], name="message_unique_author_client_id"),
        ]
        indexes = [models.Index(fields=["room", "-seq"], name="message_room_seq_desc")]

    def __str__(self) -> str:
        return f"#{self.pk} in {self.room_id} by {self.author_id}"

    @property
    def is_deleted(self) -> bool:
        return self.deleted_at is not None


class Event(models.Model):
    """One entry of a room's log: what the socket and REST API replay, in seq order."""

    room = models.ForeignKey(Room, on_delete=models.CASCADE, related_name="events")
    seq = models.PositiveBigIntegerField()
    type = models.CharField(max_length=32)
    # The message the event is about, so that a delete can redact its earlier events.
    message = models.ForeignKey("Message", null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    # The frame's fields other than type, room and seq.
    payload = models.JSONField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["room", "seq"]
        constraints = [models.UniqueConstraint(fields=["room", "seq"], name="event_unique_room_seq")]

    def __str__(self) -> str:
        return f"{self.room_id}#{self.seq} {self.type}"


class Reaction(models.Model):
    """One user's reaction to a message with one emoji (domain/services.py: the
    rules; docs/decisions.md: why a short string and not a fixed set)."""

    message = models.ForeignKey(Message, on_delete=models.CASCADE, related_name="reactions")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    emoji = models.CharField(max_length=32)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["message", "user", "emoji"], name="reaction_unique_message_user_emoji"),
        ]

    def __str__(self) -> str:
        return f"{self.emoji} by {self.user_id} on #{self.message_id}"


class Mention(models.Model):
    """A user named with @ in a message they may see (not its author). `room` and
    `seq` (the message's) are copied from the message so that a user's unread
    mentions in a room, those after their read position, are one index range."""

    message = models.ForeignKey(Message, on_delete=models.CASCADE, related_name="mentions")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    room = models.ForeignKey(Room, on_delete=models.CASCADE, related_name="+")
    seq = models.PositiveBigIntegerField()

    class Meta:
        constraints = [models.UniqueConstraint(fields=["message", "user"], name="mention_unique_message_user")]
        indexes = [models.Index(fields=["user", "room", "seq"], name="mention_user_room_seq")]

    def __str__(self) -> str:
        return f"{self.user_id} in #{self.message_id}"
