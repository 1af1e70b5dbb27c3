"""Production: everything secure by default; refuses to start without real secrets.

``manage.py check --deploy`` passes with no warnings under this module given
SECRET_KEY, ALLOWED_HOSTS and DATABASE_URL (see the README)."""

import os

from django.core.exceptions import ImproperlyConfigured

from billing_site.settings.base import *  # noqa: F403
from billing_site.settings.base import env_bool

for required in ("SECRET_KEY", "ALLOWED_HOSTS", "DATABASE_URL"):
    if not os.environ.get(required):
        raise ImproperlyConfigured(f"{required} must be set in production")

DEBUG = False
WHITENOISE_USE_FINDERS = False

SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", default=True)
# Probes and the Prometheus scraper inside the network speak plain HTTP to the web process: the
# health endpoints and /metrics answer there instead of redirecting (/metrics keeps its token).
SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^readyz$", r"^metrics$"]
SECURE_HSTS_SECONDS = int(os.environ.get("SECURE_HSTS_SECONDS", str(365 * 24 * 3600)))
SECURE_HSTS_INCLUDE_SUBDOMAINS = True
SECURE_HSTS_PRELOAD = True
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
SESSION_COOKIE_SECURE = True
SESSION_COOKIE_HTTPONLY = True
CSRF_COOKIE_SECURE = True
X_FRAME_OPTIONS = "DENY"
