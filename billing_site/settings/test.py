"""Settings for the test suite: a real PostgreSQL (DATABASE_URL, else the local server on
127.0.0.1:5432, else the embedded one); tasks run inline unless a test starts a worker."""

import os

# Before base.py resolves the database: the suite prefers the local server on 127.0.0.1:5432.
os.environ.setdefault("DATABASE_PREFER_LOCAL", "1")

from billing_site.settings.base import *  # noqa: F403

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]  # fast; tests only
CELERY_BROKER_URL = "memory://"
CELERY_TASK_ALWAYS_EAGER = True
CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
WHITENOISE_USE_FINDERS = True
# Look a static file up when it is asked for, not at start-up: WhiteNoise's middleware otherwise
# lists every app's static files (~760) each time a handler is built, which is every test
# client's first request (0.3 s each, ~2 minutes of the suite).
WHITENOISE_AUTOREFRESH = True
EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
PAYMENTS_BINDING_RATE_ACCOUNT = PAYMENTS_BINDING_RATE_USER = PAYMENTS_BINDING_RATE_IP = "100000/hour"
PAYMENTS_PAY_RATE_INVOICE = PAYMENTS_PAY_RATE_USER = "100000/hour"  # the throttle's tests set their own
PAYMENTS_GATEWAY_RATE_LIMIT = 0  # tests that are about the limit set it themselves
REST_FRAMEWORK = {
    **REST_FRAMEWORK,  # noqa: F405
    "DEFAULT_THROTTLE_RATES": {"signup": "100000/hour", "member_add": "100000/hour"},
}

# Each test run has a database of its own on a shared server: two checkouts, a benchmark and a
# test run side by side never drop each other's database. The run's id is taken once, in the
# process that loads the settings first (pytest's controller), and inherited by its xdist
# workers, which pytest-django then suffixes with their worker id (``_gw0`` …).
TEST_RUN_ID = os.environ.setdefault("BILLING_TEST_RUN", f"{os.getpid()}")
DATABASES["default"]["TEST"] = {"NAME": f"test_billing_{TEST_RUN_ID}"}  # noqa: F405

# A test's commits need not wait for the disk: a crash of the server loses a test database, which
# is thrown away anyway. Per session, so the shared server's own setting is left as it is.
DATABASES["default"]["OPTIONS"] = {  # noqa: F405
    **DATABASES["default"].get("OPTIONS", {}),  # noqa: F405
    "options": "-c synchronous_commit=off",
}
