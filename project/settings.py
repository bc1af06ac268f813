"""Settings for the realtime app, read from the environment (12-factor).

With no environment at all the app runs on its embedded default: DEBUG on, SQLite,
the in-memory channel layer, one process. DATABASE_URL (PostgreSQL) and REDIS_URL
(channels_redis) switch to the production parts. With DEBUG off, a missing
DJANGO_SECRET_KEY or DJANGO_ALLOWED_HOSTS stops start-up with a clear message.

Longer than the rule of about 400 lines on purpose: it is the one module that reads
the environment, so every knob (README's configuration table) is found here, each
beside its default and its reason.
"""

import ipaddress
import os
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent


def env_bool(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    if value.lower() in {"1", "true", "yes", "on"}:
        return True
    if value.lower() in {"0", "false", "no", "off"}:
        return False
    raise ImproperlyConfigured(f"{name}={value!r} is not a boolean (use 1/0, true/false).")


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ImproperlyConfigured(f"{name}={value!r} is not an integer.") from None


def env_rate(name: str, default: tuple[float, float]) -> tuple[float, float]:
    """A token bucket "RATE/BURST" (per second), e.g. REALTIME_RATE_MESSAGE_SEND=10/30."""
    value = os.environ.get(name)
    if not value:
        return default
    try:
        rate, burst = (float(part) for part in value.split("/"))
    except ValueError:
        raise ImproperlyConfigured(f"{name}={value!r} is not RATE/BURST, e.g. 10/30") from None
    if rate <= 0 or burst < 1:
        raise ImproperlyConfigured(f"{name}: the rate must be above 0 and the burst at least 1")
    return rate, burst


def env_list(name: str) -> list[str]:
    return [item.strip() for item in os.environ.get(name, "").split(",") if item.strip()]


# ------------------------------------------------------------------------------
# Core
# ------------------------------------------------------------------------------
DEBUG = env_bool("DJANGO_DEBUG", True)

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "")
ALLOWED_HOSTS = env_list("DJANGO_ALLOWED_HOSTS")
if DEBUG:
    # A development-only key: it signs nothing that matters outside this machine.
    SECRET_KEY = SECRET_KEY or "django-insecure-development-only-key-never-use-in-production"
    ALLOWED_HOSTS = ALLOWED_HOSTS or ["127.0.0.1", "localhost", "[::1]", "testserver"]
else:
    missing = [
        name
        for name, value in (("DJANGO_SECRET_KEY", SECRET_KEY), ("DJANGO_ALLOWED_HOSTS", ALLOWED_HOSTS))
        if not value
    ]
    if missing:
        raise ImproperlyConfigured(
            "DJANGO_DEBUG is off, so these must be set in the environment: "
            + ", ".join(missing)
            + ". (DJANGO_SECRET_KEY: a long random string; DJANGO_ALLOWED_HOSTS: "
            "comma-separated host names the app is served under.)"
        )

# Full origins (scheme://host[:port]) whose pages may open the socket; compared
# exactly (scheme, host and port), see realtime/web/origins.py. Required with DEBUG off;
# with DEBUG on and no list, any http(s) origin on an ALLOWED_HOSTS name passes.
REALTIME_ALLOWED_ORIGINS = env_list("DJANGO_ALLOWED_ORIGINS")


def _check_origins(origins: list[str]) -> None:
    from urllib.parse import urlsplit

    if not DEBUG and not origins:
        raise ImproperlyConfigured(
            "DJANGO_DEBUG is off, so DJANGO_ALLOWED_ORIGINS must list the full origins whose pages "
            "may open the socket, e.g. https://chat.example.com"
        )
    for origin in origins:
        if origin == "*":
            if not DEBUG:
                raise ImproperlyConfigured("DJANGO_ALLOWED_ORIGINS='*' is refused with DEBUG off: list the origins.")
            continue
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
            raise ImproperlyConfigured(
                f"DJANGO_ALLOWED_ORIGINS: {origin!r} is not an origin (scheme://host[:port], nothing after it)"
            )


_check_origins(REALTIME_ALLOWED_ORIGINS)

# The load balancers' addresses (or networks): only their X-Forwarded-For is
# believed when working out a client's address (realtime/web/proxies.py). Empty: the
# TCP peer is the client, whatever the headers say.
REALTIME_TRUSTED_PROXIES = env_list("REALTIME_TRUSTED_PROXIES")
for _entry in REALTIME_TRUSTED_PROXIES:
    if _entry == "unix":  # a balancer on a UNIX socket (realtime/web/proxies.py)
        continue
    try:
        ipaddress.ip_network(_entry, strict=False)
    except ValueError:
        raise ImproperlyConfigured(
            f"REALTIME_TRUSTED_PROXIES: {_entry!r} is not an IP address or network (e.g. 10.0.0.1 or 10.0.0.0/8)"
        ) from None

# Full origins (scheme://host[:port]) allowed to POST forms across origins, e.g.
# the public https origin when TLS ends at the proxy.
CSRF_TRUSTED_ORIGINS = env_list("DJANGO_CSRF_TRUSTED_ORIGINS")

# Behind a proxy that ends TLS and sets X-Forwarded-Proto itself (deploy/ does):
# without it a page served over https would fail Django's CSRF origin check.
if env_bool("DJANGO_BEHIND_TLS_PROXY", False):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")

# Cookies and transport. With DEBUG off: cookies only over https, HttpOnly session
# cookie, SameSite=Lax, HSTS on https responses (a year unless DJANGO_HSTS_SECONDS).
SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = env_bool("DJANGO_SECURE_COOKIES", not DEBUG)
SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_SAMESITE = CSRF_COOKIE_SAMESITE = "Lax"
SECURE_HSTS_SECONDS = env_int("DJANGO_HSTS_SECONDS", 0 if DEBUG else 31536000)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("DJANGO_HSTS_INCLUDE_SUBDOMAINS", False)
SECURE_SSL_REDIRECT = env_bool("DJANGO_SSL_REDIRECT", False)
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
X_FRAME_OPTIONS = "DENY"
# Content-Security-Policy (realtime.web.middleware.ContentSecurityPolicyMiddleware):
# the app's own scripts, styles, images and socket only; on every response, in
# development too, so the browser tests run under it.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self' {ws}; font-src 'self'; object-src 'none'; base-uri 'self'; "
    "form-action 'self'; frame-ancestors 'none'"
)

# ------------------------------------------------------------------------------
# Applications
# ------------------------------------------------------------------------------
DJANGO_APPS = [
    "daphne",  # first, so that runserver is daphne's ASGI runserver
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
]
THIRD_PARTY_APPS = [
    "channels",
    "rest_framework",
    "drf_spectacular",  # the OpenAPI schema of the REST API (/api/v1/schema/)
    "drf_spectacular_sidecar",  # Swagger UI's files, served from here (no CDN)
]
LOCAL_APPS = [
    "accounts",
    "realtime",
]
INSTALLED_APPS = DJANGO_APPS + THIRD_PARTY_APPS + LOCAL_APPS

MIDDLEWARE = [
    "realtime.web.middleware.WorkerHeaderMiddleware",  # first: static responses carry it too
    "realtime.web.middleware.TraceMiddleware",
    "realtime.web.middleware.ContentSecurityPolicyMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "project.urls"
ASGI_APPLICATION = "project.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# ------------------------------------------------------------------------------
# Database: SQLite by default, DATABASE_URL (PostgreSQL) in production
# ------------------------------------------------------------------------------
DATABASE_URL = os.environ.get("DATABASE_URL", "")
if DATABASE_URL:
    DATABASES = {"default": dj_database_url.parse(DATABASE_URL, conn_max_age=env_int("DJANGO_CONN_MAX_AGE", 60))}
else:
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": BASE_DIR / "db.sqlite3",
        }
    }
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # IMMEDIATE takes the write lock at BEGIN, so two writers queue instead of one
    # failing with "database is locked" when it upgrades a read lock.
    DATABASES["default"].setdefault("OPTIONS", {}).update({"timeout": 20, "transaction_mode": "IMMEDIATE"})

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# ------------------------------------------------------------------------------
# Channel layer and cache: in-memory by default, Redis with REDIS_URL
# ------------------------------------------------------------------------------
REDIS_URL = os.environ.get("REDIS_URL", "")
# JWT at the handshake for clients without a Django session (accounts/bearer.py):
# comma-separated `kid:secret` (HS256, 32 bytes or more) or `kid:@path` (a PEM public
# key: RS256, ES256 or ES384); unset: no tokens taken. The audience and issuer are
# required with keys; a token may live REALTIME_JWT_MAX_LIFETIME seconds at most.
REALTIME_JWT_KEYS = os.environ.get("REALTIME_JWT_KEYS", "")
REALTIME_JWT_AUDIENCE = os.environ.get("REALTIME_JWT_AUDIENCE", "")
REALTIME_JWT_ISSUER = os.environ.get("REALTIME_JWT_ISSUER", "")
REALTIME_JWT_MAX_LIFETIME = env_int("REALTIME_JWT_MAX_LIFETIME", 900)
REALTIME_JWT_LEEWAY = env_int("REALTIME_JWT_LEEWAY", 5)  # seconds of clock skew allowed

# The broker that carries messages between workers (realtime/delivery/transport.py):
# its scheme picks the engine. Unset: Redis pub/sub on REDIS_URL (or, without it,
# the in-memory layer of one process). Presence, rate limits and leases stay on
# REDIS_URL whatever the broker.
#   redis://host:6379/0                      one Redis
#   redis://a:6379/0,redis://b:6379/0        rooms sharded over several (stable hash)
#   redis+cluster://host:port                Redis Cluster, sharded pub/sub (any node)
#   nats://host:4222                         NATS, a subject per room
#   amqp://user:password@host:5672/vhost     RabbitMQ, a topic exchange
#   kafka://host:9092                        Kafka, rooms partitioned by key
REALTIME_BROKER_URL = os.environ.get("REALTIME_BROKER_URL", "")
if REDIS_URL:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {
                # socket_timeout stays None: the layer blocks in BZPOPMIN for up to
                # 5 s, and redis-py 8 made a 5 s timeout the default (channels_redis#422).
                "hosts": [{"address": REDIS_URL, "socket_timeout": None, "socket_connect_timeout": 5}],
                "capacity": env_int("REALTIME_LAYER_CAPACITY", 1000),
                "expiry": 60,
            },
        }
    }
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": REDIS_URL,
        }
    }
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}

# ------------------------------------------------------------------------------
# Auth
# ------------------------------------------------------------------------------
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
# Sign-in throttling (accounts/throttle.py, counted with django-ratelimit): failed
# sign-ins per client address; per account from browsers that never signed in to
# it; per browser that did (its device cookie). django-ratelimit rates: "20/10m".
LOGIN_RATE_LIMIT = os.environ.get("DJANGO_LOGIN_RATE_LIMIT", "20/10m")
LOGIN_ACCOUNT_RATE_LIMIT = os.environ.get("DJANGO_LOGIN_ACCOUNT_RATE_LIMIT", "10/15m")
LOGIN_DEVICE_RATE_LIMIT = os.environ.get("DJANGO_LOGIN_DEVICE_RATE_LIMIT", "10/15m")
# Sign-ups per client address.
SIGNUP_RATE_LIMIT = os.environ.get("DJANGO_SIGNUP_RATE_LIMIT", "10/h")
# While the cache (Redis) is unreachable these limits let requests through, like
# the token buckets: an outage must not lock every user out (accounts/throttle.py
# also catches a cache that raises, which this setting alone does not cover).
RATELIMIT_FAIL_OPEN = True
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "home"
LOGOUT_REDIRECT_URL = "login"

# ------------------------------------------------------------------------------
# Internationalisation, static files
# ------------------------------------------------------------------------------
LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = Path(os.environ.get("DJANGO_STATIC_ROOT", BASE_DIR / "staticfiles"))
# The app serves its own static files straight from the finders (no collectstatic
# step for the embedded default); nginx serves STATIC_ROOT in the production topology.
WHITENOISE_USE_FINDERS = True
WHITENOISE_AUTOREFRESH = DEBUG

# ------------------------------------------------------------------------------
# REST API
# ------------------------------------------------------------------------------
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": ["rest_framework.authentication.SessionAuthentication"],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"]
    + (["rest_framework.renderers.BrowsableAPIRenderer"] if DEBUG else []),
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
    # DRF's parsers, with deep JSON answered 400 instead of a RecursionError's 500.
    "DEFAULT_PARSER_CLASSES": [
        "realtime.web.api.parsers.JSONParser",
        "rest_framework.parsers.FormParser",
        "rest_framework.parsers.MultiPartParser",
    ],
    # OpenAPI 3 from the views' own @extend_schema (realtime/web/api/schema.py).
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
}


SPECTACULAR_SETTINGS = {
    "TITLE": "Realtime REST API",
    "DESCRIPTION": (
        "The REST API v1: the same actions as the WebSocket protocol (docs/protocol.md), over "
        "session-authenticated HTTP. Unsafe methods need the CSRF token in X-CSRFToken. Every "
        'error is {"code", "message", "retry_after"?}.'
    ),
    "VERSION": "1",
    # 3.1: the request bodies and events are msgspec's JSON Schema (2020-12) as they are.
    "OAS_VERSION": "3.1.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SERVE_PERMISSIONS": ["rest_framework.permissions.AllowAny"],
    "SCHEMA_PATH_PREFIX": r"/api/v1",
    "COMPONENT_SPLIT_REQUEST": True,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    # Adds the protocol's request bodies and events (msgspec) as components.
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "realtime.web.api.schema.add_protocol_components",
    ],
}

# ------------------------------------------------------------------------------
# Realtime limits (each overridable from the environment)
# ------------------------------------------------------------------------------
REALTIME = {
    # Longest message body, in characters; longer is refused with error too_large.
    "MAX_BODY_LENGTH": env_int("REALTIME_MAX_BODY_LENGTH", 4000),
    # Most events one subscribe may replay; a client further behind gets
    # recovery_failed and reloads the room through the REST history.
    "REPLAY_MAX": env_int("REALTIME_REPLAY_MAX", 1000),
    # Most rooms one connection may be subscribed to at once.
    "MAX_ROOMS_PER_CONNECTION": env_int("REALTIME_MAX_ROOMS_PER_CONNECTION", 100),
    # Most messages one history page returns.
    "HISTORY_PAGE_MAX": env_int("REALTIME_HISTORY_PAGE_MAX", 200),
    # A room event committed on a worker with at least this many of its own
    # sockets following the room is published before this worker writes it to
    # them (the other workers' sweeps then start a broker round trip after the
    # commit, not after this worker's whole sweep); below it, this worker's own
    # sockets get it first. 0: always publish first.
    "PUBLISH_FIRST_AT": env_int("REALTIME_PUBLISH_FIRST_AT", 1000),
    # Seconds between a socket's own checks of its session (expiry, anything a
    # signal missed); logout, password change and deactivation act at once.
    "SESSION_RECHECK": env_int("REALTIME_SESSION_RECHECK", 60),
    # Token buckets per user and action: (tokens a second, burst), shared by all
    # workers through Redis. REST posting takes from the message.send bucket.
    "RATE_LIMITS": {
        "message.send": env_rate("REALTIME_RATE_MESSAGE_SEND", (10, 30)),
        "message.edit": env_rate("REALTIME_RATE_MESSAGE_EDIT", (5, 20)),
        "message.delete": env_rate("REALTIME_RATE_MESSAGE_DELETE", (5, 20)),
        "subscribe": env_rate("REALTIME_RATE_SUBSCRIBE", (20, 60)),
        "unsubscribe": env_rate("REALTIME_RATE_UNSUBSCRIBE", (20, 60)),
        "ping": env_rate("REALTIME_RATE_PING", (2, 10)),
        # A token socket's fresh tokens (auth.refresh): one every 10 s, a burst of 5.
        "auth.refresh": env_rate("REALTIME_RATE_AUTH_REFRESH", (0.1, 5)),
        "typing": env_rate("REALTIME_RATE_TYPING", (2, 5)),
        "read": env_rate("REALTIME_RATE_READ", (5, 20)),
        # Pages of who is in a room (presence.list), as one scrolls the list.
        "presence.list": env_rate("REALTIME_RATE_PRESENCE_LIST", (5, 20)),
        # reaction.add and reaction.remove (socket and REST), a bucket each.
        "reaction.add": env_rate("REALTIME_RATE_REACTION", (5, 20)),
        "reaction.remove": env_rate("REALTIME_RATE_REACTION", (5, 20)),
        # Connection tickets (POST /api/v1/tickets/): 10 a minute, a burst of 10.
        "ticket": env_rate("REALTIME_RATE_TICKET", (1 / 6, 10)),
        # Rooms made (POST /api/v1/rooms/): one a minute, a burst of 10.
        "room.create": env_rate("REALTIME_RATE_ROOM_CREATE", (1 / 60, 10)),
        # DMs opened or found (POST /api/v1/dms/): one every 2 s, a burst of 20.
        "dm.open": env_rate("REALTIME_RATE_DM_OPEN", (0.5, 20)),
        # Membership changes: join, leave, add, change a role, remove.
        "member.change": env_rate("REALTIME_RATE_MEMBER_CHANGE", (1, 30)),
        # Long polls (GET .../events/?wait=); a busy room answers them at once.
        "poll": env_rate("REALTIME_RATE_POLL", (5, 20)),
        # Searches (GET /api/v1/search/): each one a full-text query.
        "search": env_rate("REALTIME_RATE_SEARCH", (1, 10)),
        # People looked up by the start of their name (GET /api/v1/people/), as one types.
        "people": env_rate("REALTIME_RATE_PEOPLE", (5, 30)),
        # Frames that fail to decode or validate.
        "invalid": env_rate("REALTIME_RATE_INVALID", (5, 20)),
        # message.send (socket and REST) for an account still on probation.
        "message.send.probation": env_rate("REALTIME_RATE_MESSAGE_SEND_PROBATION", (0.2, 5)),
        # Sockets opened, per user and per client address (the handshake's cost):
        # past it the socket is accepted, told to wait and closed with 4029. The
        # user's burst is twice MAX_CONNECTIONS_PER_USER: every socket opened and
        # then all of them back at once after a drain; the address's, an office's
        # worth (as many as the balancer's connections per address, deploy/).
        "handshake.user": env_rate("REALTIME_RATE_HANDSHAKE_USER", (1, 40)),
        "handshake.address": env_rate("REALTIME_RATE_HANDSHAKE_ADDRESS", (20, 256)),
    },
    # Bytes of replayed events (subscribe's replay, REST history and event pages)
    # per user: (bytes a second, burst). A replay runs while the user is not in
    # debt and its size is then taken; one that finds the user in debt is refused
    # with rate_limited and the seconds until the debt is paid. Gap repair of a
    # live stream is counted, never refused.
    "REPLAY_BUDGET": env_rate("REALTIME_REPLAY_BUDGET", (262144, 8388608)),
    # On PostgreSQL: a message.send's statement is sent from the event loop on the
    # worker's own connection (realtime/domain/loopdb.py) rather than through the
    # database thread. Off: every write takes the thread.
    "LOOP_WRITES": env_bool("REALTIME_LOOP_WRITES", True),
    # Seconds a self-service account stays on probation (its message.send rate is
    # message.send.probation); 0: no probation.
    "PROBATION": env_int("REALTIME_PROBATION", 86400),
    # Seconds between a worker's sweeps of its sockets' users, memberships and
    # sessions in the database: a change made without a signal (a queryset
    # update(), raw SQL) closes or re-checks the socket within twice this.
    "AUTH_SWEEP": float(os.environ.get("REALTIME_AUTH_SWEEP") or 4),
    # Sockets one user may hold open at once, across all workers (Redis); one more
    # is accepted and closed with 4008. Entries of a crashed worker expire.
    "MAX_CONNECTIONS_PER_USER": env_int("REALTIME_MAX_CONNECTIONS_PER_USER", 20),
    # Seconds a socket may stay silent (no frame at all, pings included) before it is
    # closed with 4008. The browser client pings every 20 s.
    "IDLE_TIMEOUT": env_int("REALTIME_IDLE_TIMEOUT", 300),
    # Refused frames in a row after which the socket is closed with 4029.
    "FLOOD_CLOSE_AFTER": env_int("REALTIME_FLOOD_CLOSE_AFTER", 50),
    # Under realtime.server (daphne): seconds each HTTP request (a socket's upgrade
    # included) has to arrive whole, and an idle kept-alive connection may wait;
    # and connections per peer address that are not sockets yet (trusted proxies
    # excepted: the balancer limits those, deploy/).
    "HANDSHAKE_TIMEOUT": float(os.environ.get("REALTIME_HANDSHAKE_TIMEOUT") or 10),
    # Under realtime.server: connections the kernel queues for accept() (Twisted's
    # default is 50: a reconnect storm overflows it and clients wait for SYN retries).
    # The kernel caps it at net.core.somaxconn.
    "LISTEN_BACKLOG": env_int("REALTIME_LISTEN_BACKLOG", 1024),
    # Under realtime.server: unsent bytes a socket may hold before it is closed with
    # 4013; frames and bytes received and not yet handled before 4029.
    "MAX_SEND_BUFFER": env_int("REALTIME_MAX_SEND_BUFFER", 1024 * 1024),
    "MAX_RECEIVE_FRAMES": env_int("REALTIME_MAX_RECEIVE_FRAMES", 256),
    "MAX_RECEIVE_BUFFER": env_int("REALTIME_MAX_RECEIVE_BUFFER", 1024 * 1024),
    # The drain: seconds over which sockets are closed, and waited for.
    "DRAIN_SPREAD": float(os.environ.get("REALTIME_DRAIN_SPREAD") or 1),
    # A drain hands back at most this many sockets a second (over a longer spread).
    "DRAIN_RATE": float(os.environ.get("REALTIME_DRAIN_RATE") or 1000),
    "DRAIN_TIMEOUT": float(os.environ.get("REALTIME_DRAIN_TIMEOUT") or 10),
    "MAX_PENDING_PER_ADDRESS": env_int("REALTIME_MAX_PENDING_PER_ADDRESS", 32),
    # Under realtime.server: collections of the middle generation (generation 1, each
    # after 10 of the youngest) before a full collection may run: the collector's
    # third threshold, 10 in CPython, 100 here (a full collection walks every
    # socket's objects; docs/decisions.md).
    "GC_FULL_AFTER": env_int("REALTIME_GC_FULL_AFTER", 100),
}
if REALTIME["GC_FULL_AFTER"] < 1:
    raise ImproperlyConfigured(f"REALTIME_GC_FULL_AFTER={REALTIME['GC_FULL_AFTER']} must be 1 or more.")

# ------------------------------------------------------------------------------
# Logging: never message bodies, passwords, cookies or tickets
# ------------------------------------------------------------------------------
LOG_FORMAT = os.environ.get("DJANGO_LOG_FORMAT") or ("text" if DEBUG else "json")
if LOG_FORMAT not in ("json", "text"):
    raise ImproperlyConfigured(f"DJANGO_LOG_FORMAT={LOG_FORMAT!r}: use json or text")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"context": {"()": "realtime.observability.logs.ContextFilter"}},
    "formatters": {
        # One JSON object per line (realtime/observability/logs.py lists the fields).
        "json": {
            "()": "pythonjsonlogger.json.JsonFormatter",
            "fmt": "%(asctime)s %(levelname)s %(name)s %(message)s",
            "rename_fields": {"asctime": "time", "levelname": "level", "name": "logger"},
        },
        "text": {"()": "realtime.observability.logs.KeyValueFormatter", "format": "%(asctime)s %(levelname)s %(name)s %(message)s"},
    },
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": LOG_FORMAT, "filters": ["context"]}},
    "root": {"handlers": ["console"], "level": os.environ.get("DJANGO_LOG_LEVEL", "INFO")},
    "loggers": {
        "django.channels.server": {"level": "WARNING"},
        "daphne": {"level": "WARNING"},
    },
}

# ------------------------------------------------------------------------------
# Operations: /metrics, /healthz, /readyz (realtime/web/ops.py)
# ------------------------------------------------------------------------------
# /metrics answers requests from this machine that did not come through a proxy,
# or any request with "Authorization: Bearer <REALTIME_METRICS_TOKEN>".
REALTIME_METRICS_TOKEN = os.environ.get("REALTIME_METRICS_TOKEN", "")
# This worker's name (the dashboard, `manage.py drain --worker`, X-Realtime-Worker).
REALTIME_WORKER_ID = os.environ.get("REALTIME_WORKER_ID") or f"{__import__('socket').gethostname()}-{os.getpid()}"
# `make bench` only: mount the baseline consumer (bench/bare.py) at /ws/bench/bare/.
REALTIME_BENCH = env_bool("REALTIME_BENCH", False)
# TESTS ONLY, never set in production (empty, the default: off). A fault point: a
# worker that has just committed a message.send whose body contains this text
# kills itself with SIGKILL before publishing it, the crash between commit and
# publish that the delivery guarantee must survive (realtime/domain/services.py,
# tests/cluster/test_gaps.py).
REALTIME_TEST_CRASH_AFTER_COMMIT = os.environ.get("REALTIME_TEST_CRASH_AFTER_COMMIT", "")
# Whether responses name the worker that answered (X-Realtime-Worker), and /healthz
# and /readyz name it to anyone. Off by default with DEBUG off: what a worker is
# called is for operators (/readyz from this machine or with the metrics token
# always says).
REALTIME_EXPOSE_WORKER = env_bool("REALTIME_EXPOSE_WORKER", DEBUG)
# Seconds each readiness check (database, channel layer) may take.
REALTIME_READY_TIMEOUT = float(os.environ.get("REALTIME_READY_TIMEOUT", "2"))
