"""Sign-in (Django's login view, throttled), sign-up (limited per address, names
checked for look-alikes) and Django's own logout."""

from django.contrib.auth import login
from django.contrib.auth import views as auth_views
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render

from accounts import throttle
from accounts.forms import SignupForm


class LoginView(auth_views.LoginView):
    """Failed sign-ins are counted per address, per account and per known browser
    (accounts/throttle.py); past a limit the form answers 429 without checking
    the password."""

    def post(self, request, *args, **kwargs):
        username = request.POST.get("username", "")
        found = throttle.refusal(request, username)
        if found is not None:
            throttle.refused(request, found)
            response = self.render_to_response(self.get_context_data(form=self.get_form(), throttled=found.message))
            response.status_code = 429
            response["Retry-After"] = str(found.retry_after)
            return response
        return super().post(request, *args, **kwargs)

    def form_invalid(self, form):
        throttle.failed(self.request, self.request.POST.get("username", ""))
        return super().form_invalid(form)

    def form_valid(self, form):
        response = super().form_valid(form)
        throttle.remember_device(self.request, response, form.get_user().get_username())
        return response


def signup(request: HttpRequest) -> HttpResponse:
    if request.user.is_authenticated:
        return redirect("home")
    if request.method == "POST" and throttle.signup_refusal(request):
        response = render(request, "registration/signup.html", {
            "form": SignupForm(), "throttled": "Too many sign-ups from your network. Try again later."})
        response.status_code = 429
        return response
    form = SignupForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        user = form.save()
        if user is not None:  # None: a look-alike name signed up in the meantime
            login(request, user, backend="django.contrib.auth.backends.ModelBackend")
            return redirect("home")
    return render(request, "registration/signup.html", {"form": form})
