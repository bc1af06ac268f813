"""The sign-up form: Django's UserCreationForm, plus names that cannot pass for
someone else's (accounts/names.py) and the probation of a new account."""

from __future__ import annotations

from datetime import timedelta

from django import forms
from django.conf import settings
from django.contrib.auth.forms import UserCreationForm
from django.db import IntegrityError, transaction
from django.utils import timezone

from accounts import names
from accounts.models import Account

LOOKS_TAKEN = "That name looks too much like an existing one; choose another."


class SignupForm(UserCreationForm):
    def clean_username(self):
        username = super().clean_username()
        if not username:
            return username  # Django's own check refused it (a case-insensitive duplicate)
        if names.mixes_scripts(username):
            raise forms.ValidationError(
                "This name mixes letters of different scripts (such as a Cyrillic а among Latin letters), "
                "which lets it pass for another name. Use letters of one script; digits and _ . @ + - go "
                "with any.", code="mixed_script")
        if names.disguised_as_latin(username):
            raise forms.ValidationError(
                "That name reads as Latin letters but is written in another script; choose another.",
                code="confusable")
        if Account.objects.filter(name_skeleton=names.skeleton(username)).exists():
            raise forms.ValidationError(LOOKS_TAKEN, code="confusable")
        return username

    def save(self, commit: bool = True):
        """Save the user and their Account (skeleton, probation) together; a look-alike
        that signed up in the meantime makes this a form error (`saved` is None)."""
        assert commit, "the account is saved with the user"
        probation = settings.REALTIME["PROBATION"]
        try:
            with transaction.atomic():
                user = super().save(commit=True)
                Account.objects.update_or_create(user=user, defaults={
                    "name_skeleton": names.skeleton(user.get_username()),
                    "probation_until": timezone.now() + timedelta(seconds=probation) if probation else None,
                })
        except IntegrityError:
            self.add_error("username", forms.ValidationError(LOOKS_TAKEN, code="confusable"))
            return None
        return user
