"""Sign-up, and Django's login view with a rate limit; logout is Django's own."""

from django.conf import settings
from django.contrib.auth import login
from django.contrib.auth import views as auth_views
from django.contrib.auth.forms import UserCreationForm
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.utils.decorators import method_decorator
from django_ratelimit.decorators import ratelimit


def _login_rate(group, request) -> str:
    return settings.LOGIN_RATE_LIMIT


def _signup_rate(group, request) -> str:
    return settings.SIGNUP_RATE_LIMIT


@method_decorator(ratelimit(key="ip", rate=_login_rate, method="POST", block=True), name="post")
class LoginView(auth_views.LoginView):
    """Password guessing is limited per client address (django-ratelimit; 403 past it)."""


@ratelimit(key="ip", rate=_signup_rate, method="POST", block=True)
def signup(request: HttpRequest) -> HttpResponse:
    if request.user.is_authenticated:
        return redirect("home")
    form = UserCreationForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        user = form.save()
        login(request, user, backend="django.contrib.auth.backends.ModelBackend")
        return redirect("home")
    return render(request, "registration/signup.html", {"form": form})
