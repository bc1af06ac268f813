"""Tell a user's live sockets to re-check their session when it may have ended:
logout, a deleted session, a password change, deactivation; and give every user an
Account (accounts/models.py) with the skeleton of their name."""

import logging

from django.conf import settings
from django.contrib.auth import SESSION_KEY
from django.contrib.auth.signals import user_logged_out
from django.contrib.sessions.models import Session
from django.db import IntegrityError, transaction
from django.db.models.signals import post_save, pre_delete
from django.dispatch import receiver

from realtime.delivery import publish as broadcast

from accounts import names, tickets
from accounts.models import Account

log = logging.getLogger(__name__)


@receiver(user_logged_out)
def on_logout(sender, request, user, **kwargs):
    if user is not None and request is not None and request.session.session_key:
        # Named explicitly: the session is flushed just after this signal.
        tickets.revoke_session(user.pk, request.session.session_key)
        broadcast.session_check_on_commit(user.pk, revoked=[request.session.session_key])


@receiver(post_save, sender=settings.AUTH_USER_MODEL)
def on_user_saved(sender, instance, created, update_fields=None, **kwargs):
    if update_fields is not None and set(update_fields) <= {"last_login"}:
        return  # a sign-in: nothing that ends a session or renames the user
    keep_skeleton(instance)
    # A new password or is_active=False ends sessions; sockets look for themselves,
    # and tickets whose session ended are dropped.
    if not created:
        transaction.on_commit(lambda: tickets.revoke_ended(instance.pk))
        broadcast.session_check_on_commit(instance.pk)


@receiver(pre_delete, sender=Session)
def on_session_deleted(sender, instance, **kwargs):
    user_id = instance.get_decoded().get(SESSION_KEY)
    if user_id is not None:
        tickets.revoke_session(int(user_id), instance.session_key)
        broadcast.session_check_on_commit(int(user_id), revoked=[instance.session_key])


def keep_skeleton(user) -> None:
    """The Account's name skeleton follows the username (made with the user). A
    name made outside sign-up that collides with another account's (the admin,
    createsuperuser) keeps no skeleton rather than fail the save."""
    shape = names.skeleton(user.get_username())
    account = Account.objects.filter(user=user).only("name_skeleton").first()
    if account is not None and account.name_skeleton == shape:
        return
    try:
        with transaction.atomic():
            Account.objects.update_or_create(user=user, defaults={"name_skeleton": shape})
    except IntegrityError:
        log.warning("account name collides with another's skeleton", extra={"event": "account.skeleton_collision",
                                                                            "user_id": user.pk})
        Account.objects.update_or_create(user=user, defaults={"name_skeleton": None})
