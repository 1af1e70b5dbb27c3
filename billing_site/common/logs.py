"""Structured logs: one line per state change or run, with its ids and counts as fields.

Code logs through the standard library; the message is the event's name and ``extra``
carries the fields::

    log = logging.getLogger(__name__)
    log.info("account.transition", extra={"account_id": account.public_id, "from": "pending", "to": "active"})

Settings (``LOG_FORMAT``) pick how each record reaches stdout, ``text``::

    2026-11-03T12:30:00.123Z INFO accounts.services event=account.transition account_id=acc_… from=pending to=active

or ``json``, one object per line::

    {"time":"2026-11-03T12:30:00.123Z","level":"info","logger":"accounts.services","event":"account.transition",
     "account_id":"acc_…","from":"pending","to":"active"}

Every record gets the same treatment, Django's and Celery's included: their message becomes
``event`` (quoted in text when it has spaces) and their ``extra`` become fields.

A run with a duration is one line too, at its end, with ``duration_ms`` (``ms_since``).

Never a secret in a field: no API key, password, token or card data, and an email address
only through ``mask_email`` (``j***@example.com``).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import time
from decimal import Decimal
from typing import Any

# Attributes every LogRecord has: anything else on a record came from ``extra``.
_RECORD_ATTRIBUTES = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}
# Fields that third parties attach and that are noise or objects in a log line (Django adds
# the request object to django.request and django.server records).
_DROPPED_FIELDS = frozenset({"request", "server_time"})
# Celery attaches ``data`` (a task's args and kwargs, e.g. an operator's email) to its task
# received/succeeded/failed records: their message says which task, by id, and that is enough.
_DROPPED_CELERY_FIELDS = frozenset({"data"})
_BARE = re.compile(r"[^\s\"'=\\]+")


def mask_email(email: str | None) -> str:
    """``john@example.com`` → ``j***@example.com``: enough to tell users apart, not to mail them."""
    if not email:
        return ""
    local, at, domain = str(email).rpartition("@")
    if not at:
        return "***"
    return f"{local[:1]}***@{domain}"


def ms_since(started: float) -> int:
    """Milliseconds since ``started`` (a ``time.monotonic()`` reading)."""
    return round((time.monotonic() - started) * 1000)


def fields_of(record: logging.LogRecord) -> dict[str, Any]:
    """The ``extra`` fields of a record, in the order they were given."""
    dropped = _DROPPED_FIELDS | _DROPPED_CELERY_FIELDS if record.name.startswith("celery") else _DROPPED_FIELDS
    return {
        key: value
        for key, value in record.__dict__.items()
        if key not in _RECORD_ATTRIBUTES and key not in dropped and not key.startswith("_")
    }


def _timestamp(record: logging.LogRecord) -> str:
    moment = dt.datetime.fromtimestamp(record.created, tz=dt.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _plain(value: Any) -> Any:
    """A field's value as JSON can hold it: Decimals as exact strings, times in ISO 8601."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, set | frozenset):
        return sorted(_plain(v) for v in value)
    return str(value)


def _text_value(value: Any) -> str:
    value = _plain(value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        text = ",".join(str(_plain(v)) for v in value)
    elif isinstance(value, dict):
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    else:
        text = str(value)
    if _BARE.fullmatch(text) and text.isprintable():
        return text
    # Quoted and escaped: a value never breaks the line or fakes another field.
    return json.dumps(text, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``<time> <LEVEL> <logger> event=<message> key=value …``, then any traceback."""

    def format(self, record: logging.LogRecord) -> str:
        parts = [_timestamp(record), record.levelname, record.name, f"event={_text_value(record.getMessage())}"]
        parts += [f"{key}={_text_value(value)}" for key, value in fields_of(record).items()]
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time``, ``level``, ``logger``, ``event``, then the fields
    (a field never replaces those four); a traceback goes into ``exc_info``."""

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "time": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        for key, value in fields_of(record).items():
            payload.setdefault(key, _plain(value))
        if record.exc_info:
            payload["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            payload["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
