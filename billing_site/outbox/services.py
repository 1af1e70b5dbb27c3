"""Writing to and draining the outbox.

A state change and the side effects it owes (charge this invoice, process this webhook,
email the customer, reactivate the account) commit together: ``enqueue_task`` and
``enqueue_email`` insert rows in the caller's transaction and, once it commits, try to
deliver them at once. Whatever was not delivered then (the process died between commit and
enqueue, the broker was down) is delivered by ``drain``, which beat runs every few seconds.

Delivery leases a message (a short transaction), sends it with no transaction open, then
marks it delivered: a crash between sending and marking sends it again after the lease, so
delivery is at least once and receivers dedupe on the outbox id — a task gets
``task_id="outbox-<id>"`` and is idempotent (the charge, the webhook processing and the
transitions it runs are), an email carries ``Message-ID: <outbox-<id>@…>``.
"""

from __future__ import annotations

import datetime as dt
import importlib
import json
import logging
from collections.abc import Iterable
from email.utils import parseaddr
from typing import Any

from django.conf import settings
from django.core.mail import EmailMultiAlternatives
from django.db import IntegrityError, connection, transaction
from django.template.loader import render_to_string
from django.utils import timezone

from billing_site.common.logs import mask_email
from billing_site.common.on_commit import on_commit
from billing_site.common.transactions import forbid_transaction, require_transaction
from billing_site.outbox.models import OutboxKind, OutboxMessage

log = logging.getLogger(__name__)

LEASE = dt.timedelta(seconds=60)
MAX_ATTEMPTS_LOGGED_AS_ERROR = 5
# A message that failed is tried again by the drain after a backoff that doubles with each
# attempt, from one drain interval up to an hour: a broker down for a day costs ~30 tries a
# message, not 5,760. Never given up: a side effect owed is delivered when its cause is mended
# (or at once by the admin's "deliver now").
RETRY_FIRST = dt.timedelta(seconds=15)
RETRY_MAX = dt.timedelta(hours=1)


def retry_delay(attempts: int) -> dt.timedelta:
    """How long the drain leaves a message that has failed ``attempts`` times."""
    return min(RETRY_FIRST * 2 ** min(max(attempts - 1, 0), 20), RETRY_MAX)


def enqueue_tasks(
    name: str,
    kwargs_list: Iterable[dict[str, Any]],
    *,
    dedupe_keys: Iterable[str | None] | None = None,
    prompt: bool = True,
) -> list[int]:
    """Queue ``name`` once per kwargs (ids only) in the caller's transaction; set-based. A row
    whose dedupe key was written before is skipped. Returns the new rows' ids. ``prompt``:
    delivered right after the commit (else by the next drain, within seconds: for work that
    can wait and must not lengthen a request, such as a new account's credit limit)."""
    require_transaction("The outbox")
    kwargs_rows = list(kwargs_list)
    keys = list(dedupe_keys) if dedupe_keys is not None else [None] * len(kwargs_rows)
    if not kwargs_rows:
        return []
    with connection.cursor() as cursor:
        cursor.execute(
            """
            INSERT INTO outbox_outboxmessage (kind, name, payload, dedupe_key, account_id, created_at, attempts,
                                              last_error)
            SELECT %s, %s, p.payload::jsonb, p.dedupe_key, (p.payload::jsonb ->> 'account_id')::bigint, now(), 0, ''
            FROM unnest(%s::text[], %s::text[]) AS p(payload, dedupe_key)
            ON CONFLICT (dedupe_key) DO NOTHING
            RETURNING id
            """,
            [OutboxKind.TASK, name, [json.dumps(k, sort_keys=True) for k in kwargs_rows], keys],
        )
        ids = [row[0] for row in cursor.fetchall()]
    if ids and prompt:
        on_commit(deliver, ids)
    return ids


def enqueue_task(name: str, /, *, dedupe_key: str | None = None, prompt: bool = True, **kwargs: Any) -> int | None:
    """Queue the task ``name`` with ``kwargs`` in the caller's transaction (None: deduped)."""
    ids = enqueue_tasks(name, [kwargs], dedupe_keys=[dedupe_key], prompt=prompt)
    return ids[0] if ids else None


def enqueue_email(
    template: str,
    /,
    *,
    to: str,
    context: dict[str, Any],
    account_id: int | None = None,
    dedupe_key: str | None = None,
) -> int | None:
    """An email from ``templates/<template>_subject.txt`` and ``<template>.txt`` (and
    ``.html`` if it exists), rendered with ``context`` (JSON values) when delivered."""
    require_transaction("The outbox")
    try:
        with transaction.atomic():  # a savepoint: the unique dedupe key decides, a twin loses cleanly
            message = OutboxMessage.objects.create(
                kind=OutboxKind.EMAIL,
                name=template,
                payload={"to": to, "context": context},
                dedupe_key=dedupe_key,
                account_id=account_id,
            )
    except IntegrityError:
        return None
    on_commit(deliver, [message.id])
    return message.id


def _lease(ids: list[int] | None, limit: int, *, after_id: int = 0) -> list[OutboxMessage]:
    """Lease these messages (asked for by id: backing off or not), or up to ``limit`` pending
    ones whose backoff is over."""
    now = timezone.now()
    with transaction.atomic():
        queryset = OutboxMessage.objects.select_for_update(skip_locked=True).filter(
            delivered_at__isnull=True, id__gt=after_id
        )
        # Asked for by id (prompt delivery, "deliver now"): no waiting. The drain: what is
        # backing off after a failure waits for its time.
        queryset = queryset.filter(id__in=ids) if ids is not None else queryset.exclude(next_attempt_at__gt=now)
        queryset = queryset.exclude(leased_until__gt=now).order_by("id")[:limit]
        messages = list(queryset)
        if messages:
            OutboxMessage.objects.filter(id__in=[m.id for m in messages]).update(leased_until=now + LEASE)
    return messages


def deliver(ids: list[int] | None = None, *, limit: int = 500) -> int:
    """Deliver these messages, even those backing off after a failure (or up to ``limit``
    pending ones that are not); returns how many were sent. Never inside a transaction:
    sending is a network call."""
    forbid_transaction("Delivering the outbox")
    return _deliver_leased(_lease(ids, limit))


def _deliver_leased(leased: list[OutboxMessage]) -> int:
    sent = 0
    for message in leased:
        try:
            _send(message)
        except Exception as exc:  # kept for a later drain, after its backoff; logged with its id
            attempts = message.attempts + 1
            delay = retry_delay(attempts)
            OutboxMessage.objects.filter(id=message.id).update(
                attempts=attempts,
                last_error=f"{type(exc).__name__}: {exc}"[:2000],
                leased_until=None,
                next_attempt_at=timezone.now() + delay,
            )
            log.log(
                logging.ERROR if attempts >= MAX_ATTEMPTS_LOGGED_AS_ERROR else logging.WARNING,
                "outbox.failed",
                extra={
                    "outbox_id": message.id,
                    "kind": message.kind,
                    "target": message.name,
                    "error": type(exc).__name__,
                    "attempts": attempts,
                    "retry_in_s": int(delay.total_seconds()),
                },
            )
            continue
        OutboxMessage.objects.filter(id=message.id).update(
            delivered_at=timezone.now(),
            attempts=message.attempts + 1,
            leased_until=None,
            last_error="",
            next_attempt_at=None,
        )
        sent += 1
        log.info(
            "outbox.delivered",
            extra={
                "outbox_id": message.id,
                "kind": message.kind,
                "target": message.name,
                "account_id": message.account_id,
            },
        )
    return sent


def drain(*, batch: int = 500, max_batches: int = 100) -> int:
    """Deliver everything pending, batch by batch in id order (the periodic task). Each
    message is tried at most once per drain: one that fails is left to a later drain (after
    its backoff), and the drain goes on past it, so failing messages never hold up those
    behind them."""
    forbid_transaction("Delivering the outbox")
    total = 0
    after_id = 0
    for _ in range(max_batches):
        leased = _lease(None, batch, after_id=after_id)
        total += _deliver_leased(leased)
        if len(leased) < batch:
            break
        after_id = leased[-1].id
    return total


def _send(message: OutboxMessage) -> None:
    if message.kind == OutboxKind.TASK:
        from billing_site.celery import app

        if message.name not in app.tasks:
            importlib.import_module(f"{message.name.split('.', 1)[0]}.tasks")
        app.tasks[message.name].apply_async(kwargs=message.payload, task_id=f"outbox-{message.id}")
        return
    to = message.payload["to"]
    context = message.payload.get("context", {})
    subject = render_to_string(f"{message.name}_subject.txt", context).strip()
    body = render_to_string(f"{message.name}.txt", context)
    email = EmailMultiAlternatives(
        subject=subject,
        body=body,
        from_email=settings.DEFAULT_FROM_EMAIL,
        to=[to],
        headers={"Message-ID": f"<outbox-{message.id}@{_message_id_domain()}>"},
    )
    email.send(fail_silently=False)
    log.info("email.sent", extra={"outbox_id": message.id, "template": message.name, "to": mask_email(to)})


def _message_id_domain() -> str:
    """The domain of the sender's address; ``DEFAULT_FROM_EMAIL`` may carry a display name
    (``Billing <billing@example.com>``), whose closing bracket is not part of it."""
    return parseaddr(settings.DEFAULT_FROM_EMAIL)[1].rpartition("@")[2] or "billing"
