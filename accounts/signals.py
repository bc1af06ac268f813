"""Tell a user's live sockets to re-check their session when it may have ended:
logout, a deleted session, a password change, deactivation."""

from django.conf import settings
from django.contrib.auth import SESSION_KEY
from django.contrib.auth.signals import user_logged_out
from django.contrib.sessions.models import Session
from django.db.models.signals import post_save, pre_delete
from django.dispatch import receiver

from realtime import broadcast


@receiver(user_logged_out)
def on_logout(sender, request, user, **kwargs):
    if user is not None and request is not None and request.session.session_key:
        # Named explicitly: the session is flushed just after this signal.
        broadcast.session_check_on_commit(user.pk, revoked=[request.session.session_key])


@receiver(post_save, sender=settings.AUTH_USER_MODEL)
def on_user_saved(sender, instance, created, **kwargs):
    # A new password or is_active=False ends sessions; sockets look for themselves.
    if not created:
        broadcast.session_check_on_commit(instance.pk)


@receiver(pre_delete, sender=Session)
def on_session_deleted(sender, instance, **kwargs):
    user_id = instance.get_decoded().get(SESSION_KEY)
    if user_id is not None:
        broadcast.session_check_on_commit(int(user_id), revoked=[instance.session_key])
