"""Create the demo users and rooms. Idempotent: running it again changes nothing
except, with --password, the demo users' passwords."""

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand
from django.db import transaction

from realtime.models import Membership, Role, Room

DEFAULT_PASSWORD = "demo-password"

USERS = [
    # username, is_staff
    ("alice", False),
    ("bob", False),
    ("carol", False),
    ("admin", True),
]

ROOMS = [
    # slug, title, is_public, {username: role}
    ("general", "General", True, {"alice": Role.OWNER, "bob": Role.MEMBER, "carol": Role.READER}),
    ("ops", "Operations", False, {"alice": Role.OWNER, "bob": Role.MEMBER}),
]
TOPICS = {"general": "Anything goes; say hello", "ops": "Deploys, incidents and on-call"}


class Command(BaseCommand):
    help = "Create demo users (alice, bob, carol, admin) and rooms (general, ops). Idempotent."

    def add_arguments(self, parser):
        parser.add_argument(
            "--password",
            default=None,
            help=f"password for the demo users (default for new users: {DEFAULT_PASSWORD!r})",
        )

    @transaction.atomic
    def handle(self, *args, password=None, **options):
        User = get_user_model()
        users = {}
        for username, is_staff in USERS:
            user, created = User.objects.get_or_create(
                username=username,
                defaults={"is_staff": is_staff, "is_superuser": is_staff, "email": f"{username}@example.test"},
            )
            if created or password:
                user.set_password(password or DEFAULT_PASSWORD)
                user.save(update_fields=["password"])
            users[username] = user
            self.stdout.write(f"user {username}: {'created' if created else 'exists'}")
        for slug, title, is_public, roles in ROOMS:
            room, created = Room.objects.get_or_create(
                slug=slug, defaults={"title": title, "is_public": is_public, "topic": TOPICS.get(slug, "")})
            self.stdout.write(f"room {slug}: {'created' if created else 'exists'}")
            for username, role in roles.items():
                Membership.objects.get_or_create(room=room, user=users[username], defaults={"role": role})
        self.stdout.write(self.style.SUCCESS("demo data ready"))
