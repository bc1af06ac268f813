"""The REST API's OpenAPI schema: it generates without a warning, its docs page
loads under the app's Content-Security-Policy, and a real server (daphne on its
own SQLite, seed_demo, a signed-in session with its CSRF token) answers
schemathesis's generated requests, valid and invalid, without a 500 and without a
status, content type or body the schema does not declare."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import requests
import schemathesis
from django.conf import settings as django_settings
from django.test import Client
from hypothesis import HealthCheck, Phase, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.services import ROOT, AppServer

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          response_headers_conformance]
# Generated requests per operation and mode (valid, invalid): about a minute in all.
EXAMPLES = int(__import__("os").environ.get("FUZZ_EXAMPLES", "12"))


def test_the_schema_generates_and_validates_without_warnings():
    run = subprocess.run([sys.executable, "manage.py", "spectacular", "--validate", "--fail-on-warn", "--format",
                          "openapi-json"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stderr.strip() == ""
    import json

    schema = json.loads(run.stdout)
    assert set(schema["paths"]) == {
        "/api/v1/rooms/", "/api/v1/rooms/{slug}/events/", "/api/v1/rooms/{slug}/messages/",
        "/api/v1/rooms/{slug}/messages/{message_id}/", "/api/v1/rooms/{slug}/messages/{message_id}/reactions/",
        "/api/v1/rooms/{slug}/read/", "/api/v1/rooms/{slug}/typing/", "/api/v1/rooms/{slug}/presence/leave/", "/api/v1/rooms/{slug}/join/", "/api/v1/rooms/{slug}/leave/",
        "/api/v1/rooms/{slug}/members/", "/api/v1/rooms/{slug}/members/{username}/", "/api/v1/dms/",
        "/api/v1/search/", "/api/v1/people/", "/api/v1/tickets/",
    }
    # Every operation names its error body for its refusals.
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            for status, response in operation["responses"].items():
                if status.startswith(("4", "5")):
                    assert response["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}, (path, method, status)
    # The request bodies and events are the protocol's own declarations.
    assert schema["components"]["schemas"]["MessagePost"]["additionalProperties"] is False


@pytest.mark.django_db
def test_the_docs_page_loads_its_own_files_under_the_csp(demo):
    page = Client().get("/api/v1/docs/")
    assert page.status_code == 200
    html = page.content.decode()
    assert page["Content-Security-Policy"].startswith("default-src 'self'; script-src 'self'; style-src 'self'")
    assert "<style" not in html and " style=" not in html
    scripts = re.findall(r"<script([^>]*)>", html)
    assert scripts and all('src="' in attrs for attrs in scripts), scripts
    sources = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert all(s.startswith("/") for s in sources), sources  # nothing from a CDN
    init = Client().get(sources[-1] if "script" in sources[-1] else "/api/v1/docs/?script=")
    assert init.status_code == 200 and init["Content-Type"].startswith("application/javascript")
    assert "/api/v1/schema/" in init.content.decode()
    schema = Client().get("/api/v1/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json")
    assert schema.status_code == 200 and schema.json()["info"]["title"] == django_settings.SPECTACULAR_SETTINGS["TITLE"]


@pytest.fixture(scope="module")
def api_server(tmp_path_factory):
    # Rate limits lifted so that the generated requests reach the actions (a 429
    # is still declared and checked where it comes).
    lifted = {f"REALTIME_RATE_{name}": "100000/100000" for name in
              ("MESSAGE_SEND", "MESSAGE_EDIT", "MESSAGE_DELETE", "READ", "TICKET", "SEARCH")}
    server = AppServer(tmp_path_factory.mktemp("api"), env={**lifted, "REALTIME_REPLAY_BUDGET": "1000000000/1000000000"})
    server.manage("migrate", "--noinput")
    server.manage("seed_demo")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def signed_in(api_server):
    """alice's session, signed in through the login form, and her CSRF header."""
    session = requests.Session()
    form = session.get(f"{api_server.url}/accounts/login/", timeout=10)
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', form.text).group(1)
    done = session.post(f"{api_server.url}/accounts/login/", timeout=10, allow_redirects=False,
                        data={"username": "alice", "password": "demo-password", "csrfmiddlewaretoken": token})
    assert done.status_code == 302 and "sessionid" in session.cookies
    session.post(f"{api_server.url}/api/v1/rooms/general/messages/", json={"body": "hello", "client_id": "seed-1"},
                 headers={"X-CSRFToken": session.cookies["csrftoken"]}, timeout=10).raise_for_status()
    return session


def generated_schema() -> dict:
    """The schema as /api/v1/schema/ serves it, made in this process (schemathesis's
    lazy from_fixture loader needs pytest internals that pytest 9 no longer has;
    test_the_server_serves_this_schema checks the server's is the same)."""
    import json

    from drf_spectacular.generators import SchemaGenerator
    from drf_spectacular.renderers import OpenApiJsonRenderer

    return json.loads(OpenApiJsonRenderer().render(SchemaGenerator().get_schema(request=None, public=True)))


SCHEMA = generated_schema()
schema = schemathesis.openapi.from_dict(SCHEMA)


def test_the_server_serves_this_schema(api_server):
    served = requests.get(f"{api_server.url}/api/v1/schema/", headers={"Accept": "application/vnd.oai.openapi+json"},
                          timeout=10)
    assert served.status_code == 200 and served.json() == SCHEMA

# Half the cases name a room that exists, so that the actions run past "no such room".
ROOMS = iter(["general", None] * 10_000)


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=list(HealthCheck))
def test_the_api_answers_within_its_schema(case, api_server, signed_in):
    if case.path_parameters and "slug" in case.path_parameters and next(ROOMS):
        case.path_parameters["slug"] = "general"
    if case.query and "wait" in case.query:
        case.query["wait"] = 1  # a long poll, kept short
    case.call_and_validate(base_url=api_server.url, session=signed_in, checks=CHECKS,
                           headers={"X-CSRFToken": signed_in.cookies["csrftoken"]}, timeout=40)
