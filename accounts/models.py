"""What the app keeps of an account beyond Django's User."""

from django.conf import settings
from django.db import models


class Account(models.Model):
    """One per user (made when the user is: accounts/signals.py).

    - name_skeleton: the username's look-alike form (accounts/names.py), unique so
      that no two accounts can pass for each other; NULL for an account made
      outside sign-up whose name collided (the admin is trusted to have meant it).
    - probation_until: a self-service account posts at the probation rate until
      then (REALTIME_PROBATION, REALTIME_RATE_MESSAGE_SEND_PROBATION); NULL for
      accounts made by staff or the demo data.
    """

    user = models.OneToOneField(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, primary_key=True,
                                related_name="account")
    name_skeleton = models.CharField(max_length=600, unique=True, null=True, blank=True)
    probation_until = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"account of user {self.user_id}"


def probation_until(user_id: int):
    """When the user's probation ends (an aware datetime), or None if they have none."""
    return Account.objects.filter(user_id=user_id).values_list("probation_until", flat=True).first()


def send_bucket(until) -> str:
    """The rate-limit bucket a message.send takes from, given probation_until()."""
    from django.utils import timezone

    return "message.send.probation" if until is not None and until > timezone.now() else "message.send"
