"""Tell a room's live subscribers to re-check access when it may have changed:
a membership added, changed or removed, or the room's visibility changed; and
tell a member whose membership began or ended (rooms.changed to their sockets).
Memberships made in bulk (a new direct message) say so themselves (domain/rooms.py)."""

from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver

from realtime.delivery import publish as broadcast
from realtime.models import Membership, Room


@receiver(post_save, sender=Membership)
@receiver(post_delete, sender=Membership)
def on_membership_changed(sender, instance, created=False, **kwargs):
    broadcast.access_check_on_commit(instance.room.slug)
    # The member's own pages list the room, or drop it, at once.
    if created or kwargs["signal"] is post_delete:
        broadcast.rooms_changed_on_commit(instance.user_id, instance.room.slug, "added" if created else "removed")


@receiver(post_save, sender=Room)
def on_room_saved(sender, instance, created, **kwargs):
    if not created:
        broadcast.access_check_on_commit(instance.slug)
