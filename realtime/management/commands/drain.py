"""Ask workers to drain: stop taking sockets and close theirs with 4012 (reconnect
elsewhere now). Run it before the process manager stops a worker."""

from asgiref.sync import async_to_sync
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from realtime.delivery.publish import request_drain


class Command(BaseCommand):
    help = "Drain one worker (--worker ID, its REALTIME_WORKER_ID) or all of them (--all)."

    def add_arguments(self, parser):
        group = parser.add_mutually_exclusive_group(required=True)
        group.add_argument("--worker", help="the worker's REALTIME_WORKER_ID")
        group.add_argument("--all", action="store_true", help="every worker on this channel layer")

    def handle(self, *args, worker=None, all=False, **options):
        if "InMemory" in settings.CHANNEL_LAYERS["default"]["BACKEND"]:
            raise CommandError("the in-memory channel layer cannot reach a server process: set REDIS_URL, or send SIGTERM")
        target = "*" if all else worker
        async_to_sync(request_drain)(target)
        self.stdout.write(f"drain requested for {'all workers' if all else worker}")
