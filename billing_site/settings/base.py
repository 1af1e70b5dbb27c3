"""Settings shared by every environment. Every knob comes from the environment;
the README lists them all. ``test.py`` and ``production.py`` build on this module."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
from decimal import Decimal
from pathlib import Path

import dj_database_url
import django_stubs_ext
from django.core.exceptions import ImproperlyConfigured

from billing_site.database import database_url

# Lets annotations such as ``admin.ModelAdmin[BillingAccount]`` run (they are checked by mypy).
django_stubs_ext.monkeypatch()


def env_bool(name: str, default: bool = False) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def env_list(name: str, default: str = "") -> list[str]:
    return [item.strip() for item in os.environ.get(name, default).split(",") if item.strip()]


BASE_DIR = Path(__file__).resolve().parent.parent.parent

DEBUG = env_bool("DEBUG", default=False)
# A development key so that a fresh clone starts; production.py refuses to run without a real one.
SECRET_KEY = os.environ.get("SECRET_KEY") or "dev-insecure-3f9c1b7e0a5d4c2b8e6f1a9d7c5b3e1f0a2c4e6b8d0f1a3c"
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", "127.0.0.1,localhost")
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django.contrib.postgres",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",  # Swagger UI's assets, served from here: /api/docs/ works offline
    "django_countries",
    "pgtrigger",  # the audit trail's triggers, installed by migrations (billing_site/common/audit.py)
    "pghistory",  # the audit trail: event tables and their context (who, why, where)
    "billing_site.audit",  # the trail's pages: each record's History, the whole trail, an account's
    "axes",  # staff sign-in: failed passwords throttled and locked out (settings below)
    # Staff's second factor: TOTP devices and backup codes (django-otp), the login, enrolment
    # and backup-code pages (django-two-factor-auth; its templates overridden by ours).
    "django_otp",
    "django_otp.plugins.otp_static",
    "django_otp.plugins.otp_totp",
    "two_factor",
    "accounts",
    "metering",
    "invoicing",
    "billing_site.outbox",
    "payments",
    "antifraud",
    "billing_site.backoffice",  # staff pages across apps: customer page, search, money views, dashboard
]

MIDDLEWARE = [
    # First, so that it sees every error: anything under /api/ answers problem+json, DEBUG or not.
    "billing_site.common.errors.ProblemJsonMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    # request.user.is_verified(): has this session passed the second factor (django-otp).
    "django_otp.middleware.OTPMiddleware",
    # The one gate of the back office: nothing under /admin/ answers a session that has not
    # passed the second factor, except the sign-in and enrolment pages themselves.
    "billing_site.common.staff.SecondFactorMiddleware",
    # After authentication (it reads request.user): every change the request writes carries
    # who (staff user, customer, API key), where (URL) and, from the services, why.
    "billing_site.common.audit.AuditContextMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # Last, as django-axes asks: turns a locked-out sign-in into its 429 page.
    "axes.middleware.AxesMiddleware",
]

ROOT_URLCONF = "billing_site.urls"
WSGI_APPLICATION = "billing_site.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "billing_site" / "templates"],
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

# --- Database: PostgreSQL only (see billing_site/database.py for the resolution order).
DATABASES = {
    "default": dj_database_url.parse(
        database_url(prefer_local_server=env_bool("DATABASE_PREFER_LOCAL")),
        conn_max_age=int(os.environ.get("DATABASE_CONN_MAX_AGE", "60")),
        conn_health_checks=True,
    )
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_USER_MODEL = "accounts.User"
# django-axes first: a locked-out login is refused before its password is even checked.
AUTHENTICATION_BACKENDS = ["axes.backends.AxesStandaloneBackend", "django.contrib.auth.backends.ModelBackend"]
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}
# Serve admin and API-docs assets straight from the apps in development (no collectstatic).
WHITENOISE_USE_FINDERS = DEBUG

# --- Redis: Celery broker and cache. Unset means "no Redis": tasks run inline, cache is local.
REDIS_URL = os.environ.get("REDIS_URL", "").strip()
_BROKER_URL = os.environ.get("CELERY_BROKER_URL", "").strip() or REDIS_URL
# No broker: run tasks inline, and point Celery at its in-memory transport so that nothing
# ever reaches for the default amqp://localhost.
CELERY_TASK_ALWAYS_EAGER = not _BROKER_URL
CELERY_BROKER_URL = _BROKER_URL or "memory://localhost/"  # with a host: kombu warns without one
CELERY_TASK_EAGER_PROPAGATES = True
CELERY_RESULT_BACKEND = os.environ.get("CELERY_RESULT_BACKEND", "").strip() or None
CELERY_TASK_ACKS_LATE = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_DEFAULT_QUEUE = "default"
# Time limits (soft, then hard; seconds) of a task that billing_site/celery.py does not list
# (each of ours has its own there, with its queue).
CELERY_TASK_SOFT_TIME_LIMIT = 300
CELERY_TASK_TIME_LIMIT = 360

if REDIS_URL:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": REDIS_URL}}
else:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}

# --- API
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": ["accounts.authentication.ApiKeyAuthentication"],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["billing_site.common.parsers.JSONParser"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "billing_site.common.errors.api_exception_handler",
    "DEFAULT_PAGINATION_CLASS": "billing_site.common.pagination.CreatedCursorPagination",
    "PAGE_SIZE": 50,
    "UNAUTHENTICATED_USER": None,
    "COERCE_DECIMAL_TO_STRING": True,
    "DATETIME_FORMAT": "%Y-%m-%dT%H:%M:%S.%fZ",
    "DEFAULT_THROTTLE_RATES": {
        "signup": os.environ.get("SIGNUP_RATE", "20/hour"),
        "member_add": os.environ.get("MEMBER_ADD_RATE", "60/hour"),
    },
    # How many proxies append to X-Forwarded-For. 0: the client address is REMOTE_ADDR and a
    # client-sent X-Forwarded-For is ignored (else anyone could dodge the throttles with it).
    "NUM_PROXIES": int(os.environ.get("NUM_PROXIES", "0")),
}

SPECTACULAR_SETTINGS = {
    "TITLE": "Billing back office API",
    "DESCRIPTION": (
        "Billing accounts, members, API keys, the account lifecycle, usage events, cost breakdowns, "
        "invoices, credit notes and balances. "
        "Errors are application/problem+json (RFC 9457) with a stable `code`."
    ),
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    # Swagger UI from drf-spectacular-sidecar's static files, never from a CDN.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    # No "valid" badge fetched from validator.swagger.io either.
    "SWAGGER_UI_SETTINGS": {"deepLinking": True, "validatorUrl": None},
    "SCHEMA_PATH_PREFIX": "/api/v1",
    "COMPONENT_SPLIT_REQUEST": True,
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "billing_site.common.schema.trim_enum_descriptions",
    ],
    "ENUM_NAME_OVERRIDES": {
        "BillingAccountStateEnum": "accounts.models.AccountState.choices",
        "MemberRoleEnum": "accounts.models.MemberRole.choices",
        "AccountKindEnum": "accounts.models.AccountKind.choices",
        "ActorKindEnum": ["user", "operator", "system"],
    },
}

# --- Billing
# Currencies an account may be opened in (ISO 4217 codes).
BILLING_CURRENCIES = env_list("BILLING_CURRENCIES", "USD,EUR,GBP,JPY")
# An API key's last-used time is written at most this often per key (seconds).
API_KEY_TOUCH_INTERVAL_SECONDS = int(os.environ.get("API_KEY_TOUCH_INTERVAL_SECONDS", "60"))

# --- Staff sign-in and admin sessions (only staff sign in with a password; the API uses keys).
# After ADMIN_LOGIN_FAILURE_LIMIT failed passwords for one login (from anywhere) or from one IP
# (for any login), sign-in is refused, the right password included, for
# ADMIN_LOGIN_LOCKOUT_MINUTES after the last attempt (django-axes; `manage.py axes_reset_username`
# unlocks earlier). The client IP is the throttles' (NUM_PROXIES).
ADMIN_LOGIN_FAILURE_LIMIT = int(os.environ.get("ADMIN_LOGIN_FAILURE_LIMIT", "5"))
ADMIN_LOGIN_LOCKOUT_MINUTES = int(os.environ.get("ADMIN_LOGIN_LOCKOUT_MINUTES", "15"))
AXES_FAILURE_LIMIT = ADMIN_LOGIN_FAILURE_LIMIT
AXES_COOLOFF_TIME = dt.timedelta(minutes=ADMIN_LOGIN_LOCKOUT_MINUTES)
AXES_LOCKOUT_PARAMETERS = ["username", "ip_address"]
AXES_RESET_ON_SUCCESS = True
AXES_USERNAME_FORM_FIELD = "username"  # the admin's login form (the user model's is "email")
AXES_USERNAME_CALLABLE = "accounts.logins.username"
AXES_CLIENT_IP_CALLABLE = "billing_site.common.views.client_ip"
AXES_CLIENT_STR_CALLABLE = "accounts.logins.client_str"  # staff emails masked in its log lines
AXES_LOCKOUT_CALLABLE = "accounts.logins.lockout_response"
AXES_VERBOSE = False  # no banner at every process start; failures and lockouts are still logged
# An admin session ends after ADMIN_SESSION_IDLE_MINUTES without a request (each request moves
# the expiry on), and when the browser closes (no persistent cookie).
ADMIN_SESSION_IDLE_MINUTES = int(os.environ.get("ADMIN_SESSION_IDLE_MINUTES", "30"))
SESSION_COOKIE_AGE = ADMIN_SESSION_IDLE_MINUTES * 60
SESSION_SAVE_EVERY_REQUEST = True
SESSION_EXPIRE_AT_BROWSER_CLOSE = True
# The second factor (README "Staff sign-in"): staff sign in at /admin/account/login/ with their
# password, then a code from their authenticator app (TOTP) or one of their backup codes. A staff
# member with no device yet is sent to enrol one (/admin/account/two_factor/setup/) before any
# admin page; a lost device is reset with `manage.py operator_reset_second_factor`.
# (django-two-factor-auth also replaces the admin's own login view by a redirect to its page:
# TWO_FACTOR_PATCH_ADMIN, True by default.)
LOGIN_URL = "two_factor:login"
LOGIN_REDIRECT_URL = "admin:index"
LOGOUT_REDIRECT_URL = "two_factor:login"
# The issuer an authenticator app shows beside the code.
OTP_TOTP_ISSUER = os.environ.get("OTP_TOTP_ISSUER", "Billing back office")
# The password step is valid this long (seconds) for the code step to follow.
TWO_FACTOR_LOGIN_TIMEOUT = 600
# The enrolment page's QR code as inline SVG (no image files, nothing fetched).
TWO_FACTOR_QR_FACTORY = "qrcode.image.svg.SvgPathImage"

# --- Accounts
# What an account owes, asked before it is closed or reactivated by staff: dotted paths of
# callables ``reader(account_id=...) -> {currency: minor units owed}`` that other apps provide
# through their selectors (accounts imports no other app; it names them here).
ACCOUNTS_DEBT_READERS = ("invoicing.selectors.account_outstanding",)
# Tasks queued by name (through the outbox) when staff reactivate a suspended account, with
# ``account_id`` and ``reason``: payments' dunning notes it on the cases that had suspended it,
# so that dunning and the account agree.
ACCOUNTS_REACTIVATED_BY_STAFF_TASKS = ("payments.account_reactivated_by_staff",)

# --- Logging: structured lines to stdout (billing_site/common/logs.py): `text` reads well in
# a terminal, `json` is one object per line for a log pipeline. Celery keeps this configuration
# (billing_site/celery.py), so workers log the same way.
LOG_LEVEL = os.environ.get("LOG_LEVEL", "").strip().upper() or "INFO"
LOG_FORMAT = os.environ.get("LOG_FORMAT", "").strip().lower() or ("text" if DEBUG else "json")
if LOG_FORMAT not in {"text", "json"}:
    raise ImproperlyConfigured(f"LOG_FORMAT must be 'text' or 'json', not {LOG_FORMAT!r}")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "text": {"()": "billing_site.common.logs.TextFormatter"},
        "json": {"()": "billing_site.common.logs.JsonFormatter"},
    },
    "handlers": {
        "stdout": {"class": "logging.StreamHandler", "stream": "ext://sys.stdout", "formatter": LOG_FORMAT},
    },
    "root": {"handlers": ["stdout"], "level": LOG_LEVEL},
    "loggers": {
        # Django's own handlers (stderr in DEBUG, mail to admins, runserver's request lines)
        # are replaced by the root's: every line has one format and one destination.
        "django": {"handlers": [], "level": LOG_LEVEL, "propagate": True},
        "django.server": {"handlers": [], "level": LOG_LEVEL, "propagate": True},
        # SQL with its parameters (emails, key hashes) never reaches the logs, not even at DEBUG.
        "django.db.backends": {"level": "INFO"},
        "pgserver": {"level": "WARNING"},  # the embedded server logs every start and stop
        # PDF rendering: WeasyPrint logs each step and fontTools each glyph table at INFO; the
        # "HarfBuzz-Subset missing" warning is about speed only (fontTools subsets instead).
        "weasyprint": {"level": "ERROR"},
        "fontTools": {"level": "WARNING"},
        # The stripe SDK logs each request at INFO; payments.charging logs what matters, with our ids.
        "stripe": {"level": "WARNING"},
    },
}

# --- Metering
# Events older than this many days are refused (`too_old`).
METERING_MAX_EVENT_AGE_DAYS = int(os.environ.get("METERING_MAX_EVENT_AGE_DAYS", "35"))
# A writer of events (a transaction holding the event writers' lock) open this long (seconds)
# with committed events waiting is reported as holding the rollup back (rollup_usage's output
# and a warning log; metering/rollup.py, metering/horizon.py).
METERING_HORIZON_HOLD_SECONDS = float(os.environ.get("METERING_HORIZON_HOLD_SECONDS", "30"))
# How long a rollup run waits for the event writers in flight before it reads its horizon;
# ingest requests that arrive meanwhile wait behind it, so this bounds the pause it can cause.
METERING_HORIZON_LOCK_TIMEOUT_SECONDS = float(os.environ.get("METERING_HORIZON_LOCK_TIMEOUT_SECONDS", "1"))
# Where raw usage events live: "postgres" (the single-machine default: one event table in this
# database, docs/architecture.md) or "clickhouse" (the scale path: the API publishes to the NATS
# JetStream log, sinks insert into ClickHouse, hourly usage is computed per hour and shard from
# there; `manage.py run_event_pipeline`).
METERING_EVENT_STORE = os.environ.get("METERING_EVENT_STORE", "postgres").strip().lower()
if METERING_EVENT_STORE not in ("postgres", "clickhouse"):
    raise ImproperlyConfigured("METERING_EVENT_STORE must be postgres or clickhouse")
# The ClickHouse of the scale path: a server (http://user:password@host:8123/database, reached
# with clickhouse-connect) or, when empty, the embedded engine (chdb) in METERING_CHDB_PATH, which
# one process at a time may open (the one running run_event_pipeline).
METERING_CLICKHOUSE_URL = os.environ.get("METERING_CLICKHOUSE_URL", "")
METERING_CHDB_PATH = os.environ.get("METERING_CHDB_PATH", str(BASE_DIR / ".data" / "eventstore"))
# Raw events are dropped, a day's partition at a time, this many days after their time. At least
# the acceptance window plus the period close and a dispute margin: re-rating within it gives the
# same lines.
METERING_EVENT_RETENTION_DAYS = int(os.environ.get("METERING_EVENT_RETENTION_DAYS", "100"))
if METERING_EVENT_RETENTION_DAYS < METERING_MAX_EVENT_AGE_DAYS + 30:
    raise ImproperlyConfigured("METERING_EVENT_RETENTION_DAYS must be at least METERING_MAX_EVENT_AGE_DAYS + 30")
# How many dirty hour-shards one rollup pass takes from the event store per shard.
METERING_HOURS_PER_PASS = int(os.environ.get("METERING_HOURS_PER_PASS", "48"))
# Tasks queued by name after every rollup drain (a minute's worth of rollups): the credit
# check that issues threshold invoices. Metering names them; it imports none of them.
METERING_AFTER_ROLLUP_TASKS = ("invoicing.threshold_billing",)

# --- Metering: the log of raw usage events (NATS JetStream; metering/eventlog.py, the only module
# that speaks to it). The API answers 200 only after the log acknowledged; sinks read it through one
# durable pull consumer and acknowledge only after their insert.
# The NATS servers, comma-separated (every node of a cluster, so a client can fail over).
METERING_LOG_URLS = env_list("METERING_LOG_URLS", "nats://127.0.0.1:4222")
# The stream that holds the events, and the subject events are published on.
METERING_LOG_STREAM = os.environ.get("METERING_LOG_STREAM", "METERING_EVENTS").strip()
METERING_LOG_SUBJECT = os.environ.get("METERING_LOG_SUBJECT", "metering.events").strip()
# Copies of the stream, each on its own node (1 on one machine; 3 in production: survives a node).
METERING_LOG_REPLICAS = int(os.environ.get("METERING_LOG_REPLICAS", "1"))
# A message published again with the same Nats-Msg-Id within this window is stored once (the
# PubAck says duplicate, with the first one's sequence): longer than any producer's retries.
METERING_LOG_DUPLICATE_WINDOW_SECONDS = int(os.environ.get("METERING_LOG_DUPLICATE_WINDOW_SECONDS", "7200"))
# Messages older than this are dropped from the stream: long enough to replay after a sink outage.
METERING_LOG_RETENTION_HOURS = int(os.environ.get("METERING_LOG_RETENTION_HOURS", "72"))
# The largest message the stream takes (a batch of events); the servers' max_payload must be at
# least this (nats-server's default is 1 MiB; the test harness and the demo set 8 MiB).
METERING_LOG_MAX_MESSAGE_BYTES = int(os.environ.get("METERING_LOG_MAX_MESSAGE_BYTES", str(8 * 1024 * 1024)))
# How long a publish (or an ack, a fetch's connection) waits for the log before it gives up with
# LogUnavailable (the API's 503 with Retry-After): a leader election takes a few seconds.
METERING_LOG_ACK_TIMEOUT_SECONDS = float(os.environ.get("METERING_LOG_ACK_TIMEOUT_SECONDS", "5"))
# The sinks' durable pull consumer (every sink process shares it; each message goes to one).
METERING_LOG_CONSUMER = os.environ.get("METERING_LOG_CONSUMER", "event-sink").strip()
# A message a sink took and did not acknowledge within this many seconds is delivered again.
METERING_LOG_ACK_WAIT_SECONDS = float(os.environ.get("METERING_LOG_ACK_WAIT_SECONDS", "120"))
# Messages delivered to sinks and not yet acknowledged, at most (the consumer stops handing out
# more until some are acknowledged).
METERING_LOG_MAX_ACK_PENDING = int(os.environ.get("METERING_LOG_MAX_ACK_PENDING", "1000"))

# --- Invoicing
# The seller, as printed on invoices; its country decides domestic VAT vs OSS/reverse charge.
INVOICING_SELLER_COUNTRY = os.environ.get("INVOICING_SELLER_COUNTRY", "NL").strip().upper()
INVOICING_SELLER_NAME = os.environ.get("INVOICING_SELLER_NAME", "Example Cloud B.V.")
# Address lines separated by ";".
INVOICING_SELLER_ADDRESS = [
    line.strip()
    for line in os.environ.get("INVOICING_SELLER_ADDRESS", "Keizersgracht 1;1015 CJ Amsterdam;Netherlands").split(";")
    if line.strip()
]
# An example number with a valid checksum, not any demo customer's.
INVOICING_SELLER_VAT_ID = os.environ.get("INVOICING_SELLER_VAT_ID", "NL000099998B57").replace(" ", "").upper()
INVOICING_SELLER_EMAIL = os.environ.get("INVOICING_SELLER_EMAIL", "billing@example.test")
# Company registration number (NL: the 8-digit KvK number) and where to pay (IBAN, BIC, bank),
# printed on every invoice and credit note; `manage.py check` validates them (invoicing/checks.py).
INVOICING_SELLER_REGISTRATION_ID = os.environ.get("INVOICING_SELLER_REGISTRATION_ID", "90000001").strip()
INVOICING_SELLER_IBAN = os.environ.get("INVOICING_SELLER_IBAN", "NL74EXMP0123456789").replace(" ", "").upper()
INVOICING_SELLER_BIC = os.environ.get("INVOICING_SELLER_BIC", "EXMPNL2A").replace(" ", "").upper()
INVOICING_SELLER_BANK_NAME = os.environ.get("INVOICING_SELLER_BANK_NAME", "Example Bank N.V.").strip()
# Number series prefixes: INV-2026-000001, CN-2026-000001.
INVOICING_INVOICE_SERIES = os.environ.get("INVOICING_INVOICE_SERIES", "INV")

# Four-eyes: a refund, credit grant or write-off of more than this amount (major units, per
# currency; others: FOUR_EYES_DEFAULT_THRESHOLD) by a finance user becomes a request that a
# second finance user approves or rejects (README, "Four-eyes"). JSON in the environment, e.g.
# FOUR_EYES_THRESHOLDS='{"EUR": "500.00", "JPY": "75000"}'.
FOUR_EYES_THRESHOLDS: dict[str, str] = json.loads(
    os.environ.get("FOUR_EYES_THRESHOLDS", '{"EUR": "500.00", "USD": "500.00", "GBP": "500.00", "JPY": "75000"}')
)
FOUR_EYES_DEFAULT_THRESHOLD = os.environ.get("FOUR_EYES_DEFAULT_THRESHOLD", "500")
INVOICING_CREDIT_NOTE_SERIES = os.environ.get("INVOICING_CREDIT_NOTE_SERIES", "CN")
# Invoice accounts with nothing to bill too (a zero invoice for every open account).
INVOICING_ISSUE_EMPTY = env_bool("INVOICING_ISSUE_EMPTY", default=False)
# Beat closes last month on the 1st this many minutes after midnight UTC (late events' grace).
INVOICING_GRACE_MINUTES = int(os.environ.get("INVOICING_GRACE_MINUTES", "120"))
# Beat tries the close on the 1st to the 3rd, at 23:59 at the latest: a longer grace would
# never close last month on its own.
if not 0 <= INVOICING_GRACE_MINUTES <= 3 * 1440 - 1:
    raise ImproperlyConfigured(
        f"INVOICING_GRACE_MINUTES must be between 0 and 4319 (the 3rd, 23:59), not {INVOICING_GRACE_MINUTES}"
    )

# --- Metering's hourly rows (metering/partitions.py): kept in monthly partitions for the current
# month and this many months before it; older months are dropped whole (`metering.
# hourly_partitions_maintain`, daily), once their daily rows are checked; costs by day and
# month, invoices and monthly spend read the daily rows, kept for good. Hourly rows can change
# while events are accepted (METERING_MAX_EVENT_AGE_DAYS) and until last month is closed (the
# 1st to the 3rd): the months kept must cover both, with a month to spare.
METERING_HOURLY_RETENTION_MONTHS = int(os.environ.get("METERING_HOURLY_RETENTION_MONTHS", "13"))
if METERING_HOURLY_RETENTION_MONTHS * 28 < METERING_MAX_EVENT_AGE_DAYS + 3 + 31:
    raise ImproperlyConfigured(
        "METERING_HOURLY_RETENTION_MONTHS must cover METERING_MAX_EVENT_AGE_DAYS plus the period close (3 days) "
        f"and a month: at least {-(-(METERING_MAX_EVENT_AGE_DAYS + 3 + 31) // 28)}, "
        f"not {METERING_HOURLY_RETENTION_MONTHS}"
    )

# --- Payments (payments/, README "Payments")
# The gateway a new billing account charges through: "sandbox" (offline, deterministic, Stripe's
# test cards' meaning) or "stripe". Chosen per account (payments.PaymentProfile); this is the default.
PAYMENTS_DEFAULT_GATEWAY = os.environ.get("PAYMENTS_DEFAULT_GATEWAY", "sandbox").strip() or "sandbox"
# Calls per second to one gateway, across every process sharing REDIS_URL (0: no limit of ours;
# Stripe's own default live limit is 100/s). Stripe's 429s are retried with back-off regardless.
PAYMENTS_GATEWAY_RATE_LIMIT = int(os.environ.get("PAYMENTS_GATEWAY_RATE_LIMIT", "100"))
# Gateway calls in flight per process when a task charges a chunk of invoices (a period close's):
# about latency x calls per second / processes (250 ms x 100/s over 2 processes: 13), plus a margin.
PAYMENTS_CHARGE_THREADS = int(os.environ.get("PAYMENTS_CHARGE_THREADS", "16"))
# A payment still `processing` this long (seconds) is asked about at the gateway by the reconciler.
PAYMENTS_STALE_PROCESSING_SECONDS = int(os.environ.get("PAYMENTS_STALE_PROCESSING_SECONDS", "300"))
# Card binding attempts (card testing is an abuse): per billing account, per user, per client IP.
PAYMENTS_BINDING_RATE_ACCOUNT = os.environ.get("PAYMENTS_BINDING_RATE_ACCOUNT", "10/hour")
PAYMENTS_BINDING_RATE_USER = os.environ.get("PAYMENTS_BINDING_RATE_USER", "20/hour")
PAYMENTS_BINDING_RATE_IP = os.environ.get("PAYMENTS_BINDING_RATE_IP", "30/hour")
# The customer's "pay this invoice" calls (each may reach the gateway): per invoice, per user.
PAYMENTS_PAY_RATE_INVOICE = os.environ.get("PAYMENTS_PAY_RATE_INVOICE", "10/hour")
PAYMENTS_PAY_RATE_USER = os.environ.get("PAYMENTS_PAY_RATE_USER", "100/hour")
# A payment waiting for the customer's authentication (3-D Secure) is the invoice's payment
# under way for this long (seconds): paying again meanwhile returns it, later starts a new attempt.
PAYMENTS_AUTHENTICATION_WINDOW_SECONDS = int(os.environ.get("PAYMENTS_AUTHENTICATION_WINDOW_SECONDS", "1800"))
# Stripe: keys from the dashboard; STRIPE_API_BASE points the SDK elsewhere (localstripe in tests).
STRIPE_SECRET_KEY = os.environ.get("STRIPE_SECRET_KEY", "").strip()
STRIPE_PUBLISHABLE_KEY = os.environ.get("STRIPE_PUBLISHABLE_KEY", "").strip()
STRIPE_WEBHOOK_SECRET = os.environ.get("STRIPE_WEBHOOK_SECRET", "").strip()
STRIPE_API_BASE = os.environ.get("STRIPE_API_BASE", "").strip() or "https://api.stripe.com"
STRIPE_TIMEOUT_SECONDS = float(os.environ.get("STRIPE_TIMEOUT_SECONDS", "30"))
# The sandbox gateway's simulated latency per call (ms) and share of calls that fail (0..1), and
# how (SANDBOX_FAILURE_MODE): "unavailable" before doing anything, "lost" (outcome unknown) after
# doing it, or "mixed", half each.
SANDBOX_LATENCY_MS = int(os.environ.get("SANDBOX_LATENCY_MS", "0"))
SANDBOX_FAILURE_RATE = float(os.environ.get("SANDBOX_FAILURE_RATE", "0"))
SANDBOX_FAILURE_MODE = os.environ.get("SANDBOX_FAILURE_MODE", "mixed").strip() or "mixed"  # | unavailable | lost

# --- Email: customers' notices (dunning). Console backend unless an SMTP host is configured.
EMAIL_HOST = os.environ.get("EMAIL_HOST", "").strip()
EMAIL_BACKEND = (
    "django.core.mail.backends.smtp.EmailBackend" if EMAIL_HOST else "django.core.mail.backends.console.EmailBackend"
)
EMAIL_PORT = int(os.environ.get("EMAIL_PORT", "587"))
EMAIL_HOST_USER = os.environ.get("EMAIL_HOST_USER", "")
EMAIL_HOST_PASSWORD = os.environ.get("EMAIL_HOST_PASSWORD", "")
EMAIL_USE_TLS = env_bool("EMAIL_USE_TLS", default=bool(EMAIL_HOST))
DEFAULT_FROM_EMAIL = os.environ.get("DEFAULT_FROM_EMAIL", "") or INVOICING_SELLER_EMAIL

# --- On call: /metrics, /healthz, /readyz and the staff home page (docs/operations.md).
# /metrics answers a request carrying ``Authorization: Bearer <METRICS_TOKEN>``, or one from an
# address in METRICS_ALLOWED_IPS (comma-separated addresses or networks, e.g. 10.0.0.0/8, the
# client address as NUM_PROXIES says); anyone else gets a 403. With neither set it is a 404.
METRICS_TOKEN = os.environ.get("METRICS_TOKEN", "").strip()
METRICS_ALLOWED_IPS = env_list("METRICS_ALLOWED_IPS")
for _network in METRICS_ALLOWED_IPS:
    try:
        ipaddress.ip_network(_network, strict=False)
    except ValueError as _exc:
        raise ImproperlyConfigured(f"METRICS_ALLOWED_IPS: {_network!r} is not an address or network") from _exc
# The staff home page turns a figure red past these (seconds unless named otherwise):
# a shard whose oldest waiting work, or whose last run, is older than this;
DASHBOARD_ROLLUP_LAG_SECONDS = int(os.environ.get("DASHBOARD_ROLLUP_LAG_SECONDS", "300"))
# events waiting in a shard (also red past the lag above, whatever their number);
DASHBOARD_EVENTS_WAITING = int(os.environ.get("DASHBOARD_EVENTS_WAITING", "50000"))
# the oldest Stripe webhook event not processed (any failed one is red at once);
DASHBOARD_WEBHOOK_AGE_SECONDS = int(os.environ.get("DASHBOARD_WEBHOOK_AGE_SECONDS", "600"))
# the oldest outbox message not delivered (the drain runs every 15 s);
DASHBOARD_OUTBOX_AGE_SECONDS = int(os.environ.get("DASHBOARD_OUTBOX_AGE_SECONDS", "300"))
# the oldest payment whose outcome is unknown (the reconciler asks every minute);
DASHBOARD_PAYMENT_UNKNOWN_SECONDS = int(os.environ.get("DASHBOARD_PAYMENT_UNKNOWN_SECONDS", "900"))
# the fraud review queue: accounts in it, and hours its oldest has waited.
DASHBOARD_REVIEW_QUEUE_SIZE = int(os.environ.get("DASHBOARD_REVIEW_QUEUE_SIZE", "50"))
DASHBOARD_REVIEW_QUEUE_HOURS = int(os.environ.get("DASHBOARD_REVIEW_QUEUE_HOURS", "24"))
# Finance's figures on the home page are those of their last refresh (beat, every 2 minutes),
# asked again by the page when older than this;
DASHBOARD_FINANCE_MAX_AGE_SECONDS = int(os.environ.get("DASHBOARD_FINANCE_MAX_AGE_SECONDS", "300"))
# Finance's receivables (shown to finance and read-only): a currency's "90+ days past due" is
# red when it is more than this percentage of what that currency is owed in all, ...
DASHBOARD_RECEIVABLES_90_PLUS_PERCENT = Decimal(os.environ.get("DASHBOARD_RECEIVABLES_90_PLUS_PERCENT", "10"))
# ... or more than this amount (major units, per currency, JSON; a currency not named: the share only).
DASHBOARD_RECEIVABLES_90_PLUS_AMOUNTS: dict[str, str] = json.loads(
    os.environ.get(
        "DASHBOARD_RECEIVABLES_90_PLUS_AMOUNTS",
        '{"EUR": "100000.00", "USD": "100000.00", "GBP": "100000.00", "JPY": "15000000"}',
    )
)
