"""Every name the delivery uses: group names and the types of the messages a
socket is handed (by the fan-out, or queued by the worker itself). Nothing is
imported here, so anything may import it.

Group names follow channels' rule ([a-zA-Z0-9-_.], under 100 characters; room slugs
and user ids fit).
"""

# A committed room event, for each subscriber of the room (it carries its seq).
ROOM_EVENT = "room.event"
# An ephemeral frame (typing, presence, read markers): no seq, not stored.
PUSH = "push"
# A user's sockets re-check their session (logout, password change, deactivation).
SESSION_CHECK = "session.check"
# A room's subscribers re-check that they may still see it.
ACCESS_CHECK = "access.check"
# A room's log was started on a new epoch (services.reset_epoch): its
# subscribers are told to reload it (recovery_failed).
LOG_RESET = "log.reset"
# The admin console: close the user's sockets everywhere (4003).
FORCE_DISCONNECT = "force.disconnect"
# The worker's sweep found the user changed without a signal (ws/authsweep.py).
AUTH_CHANGED = "auth.changed"
# The worker's housekeeper: the socket was silent past the idle timeout.
IDLE = "housekeeping.idle"
# The transport came back after a failure: catch every room up from the log.
LAYER_RECOVERED = "layer.recovered"
# To the workers' control group: drain (`manage.py drain`, the admin console).
WORKER_DRAIN = "worker.drain"

# The group every worker listens on for control messages (server/launcher.py).
CONTROL_GROUP = "realtime.workers"


def room_group(slug: str) -> str:
    return f"room.{slug}"


def user_group(user_id: int) -> str:
    return f"user.{user_id}"


def fan_channel(group: str) -> str:
    """The Redis pub/sub channel that carries a group's messages (with REDIS_URL)."""
    return f"rt:fan:{group}"
