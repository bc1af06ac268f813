"""The one refusal of every action: the socket answers it as an `error` frame, REST
as the documented body and status (protocol.HTTP_STATUS)."""

from __future__ import annotations

from realtime.protocol import ErrorCode

# The answer to a room that does not exist, and to one the user may not see.
NO_SUCH_ROOM = "no such room"


class ActionError(Exception):
    """A refused or failed action; the socket and REST both translate it."""

    def __init__(self, code: ErrorCode, message: str, *, retry_after: float | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after = retry_after
