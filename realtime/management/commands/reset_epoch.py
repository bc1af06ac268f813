"""Start rooms' logs on a new epoch. Run it after restoring the database from a
backup (deploy/README.md): the seqs clients hold count in a history that is gone,
and without a new epoch a client would resume into the restored one silently."""

from django.core.management.base import BaseCommand, CommandError

from realtime.domain import services
from realtime.models import Room


class Command(BaseCommand):
    help = "Give rooms' logs a new epoch (--all, or the rooms named): clients reload them instead of resuming."

    def add_arguments(self, parser):
        parser.add_argument("rooms", nargs="*", metavar="ROOM", help="room slugs")
        parser.add_argument("--all", action="store_true", help="every room")

    def handle(self, *args, rooms=(), all=False, **options):
        if bool(rooms) == all:
            raise CommandError("name the rooms, or give --all")
        if rooms:
            unknown = set(rooms) - set(Room.objects.filter(slug__in=rooms).values_list("slug", flat=True))
            if unknown:
                raise CommandError(f"no such room: {', '.join(sorted(unknown))}")
        changed = services.reset_epoch(slugs=None if all else list(rooms))
        for slug, (old, new) in sorted(changed.items()):
            self.stdout.write(f"{slug}: epoch {old} -> {new}")
