"""Benchmarks (``make bench``); helpers they share."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from pathlib import Path

# The head of the benches' set-based fills of invoices: every column of invoicing_invoice, in the
# order their SELECTs give the values.
INSERT_INVOICES = (
    "INSERT INTO invoicing_invoice (id, account_id, period_start, period_end, kind, status, currency, number,"
    " subtotal_minor, tax_rate, tax_country, tax_treatment, tax_note, tax_minor, total_minor, credits_applied_minor,"
    " amount_paid_minor, amount_credited_minor, written_off_minor, amount_refunded_minor, payment_terms_days, buyer,"
    " seller, created_at, issued_at, due_at, paid_at, updated_at)"
)


def local_database_url(name: str) -> str:
    """DATABASE_URL if set, else the database ``name`` on the local PostgreSQL (127.0.0.1:5432),
    created if missing and kept between runs."""
    if os.environ.get("DATABASE_URL"):
        return os.environ["DATABASE_URL"]
    with socket.create_connection(("127.0.0.1", 5432), timeout=0.5):
        pass
    import psycopg

    with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
            conn.execute(f"CREATE DATABASE {name}")
    return f"postgres://postgres@127.0.0.1:5432/{name}"


def loadavg() -> str:
    """The machine's 1, 5 and 15 minute load averages, for a report ("n/a" without /proc)."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def setup_django(
    url: str, *, log_file: str, env: Mapping[str, str] | None = None, defaults: Mapping[str, str] | None = None
) -> None:
    """Django on the database ``url`` with ``env`` set and ``defaults`` where the environment
    has none (besides the base settings and JSON logs). Every log line is still formatted and
    written, to ``log_file`` instead of the terminal."""
    os.environ.update(env or {})
    os.environ["DATABASE_URL"] = url
    for name, value in {
        "DJANGO_SETTINGS_MODULE": "billing_site.settings.base",
        "LOG_FORMAT": "json",
        **(defaults or {}),
    }.items():
        os.environ.setdefault(name, value)
    import django

    django.setup()
    import logging

    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(open(log_file, "a", buffering=1 << 16))  # noqa: SIM115
