"""What the invoicing app's writes share: a reason and a reference checked, the invoice under
its row lock, a row inserted once by its unique reference, an invoice's running amounts saved
(an issued invoice left owing nothing moves to ``paid``), and the audit of finance's terms."""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

from django.db import connection, models

from billing_site.common import ids, transitions
from billing_site.common.actors import Actor
from billing_site.common.errors import ApplicationError
from billing_site.common.transitions import actor_log_fields
from invoicing.models import (
    Invoice,
    InvoiceStatus,
    TermsChange,
)

log = logging.getLogger(__name__)


def locked_invoice(invoice_id: int) -> Invoice:
    return transitions.locked(Invoice, invoice_id, message="No such invoice.")


def require_reason(reason: str) -> str:
    reason = reason.strip()
    if not reason:
        raise ApplicationError("invalid", "A reason is required.", field="reason")
    return reason


def require_reference(reference: str) -> str:
    reference = reference.strip()
    if not reference or len(reference) > 128:
        raise ApplicationError("invalid", "A reference of 1 to 128 characters is required.", field="reference")
    return reference


def save_settled(invoice: Invoice, *, actor: Actor, reason: str, now: dt.datetime, fields: list[str]) -> None:
    """Save ``invoice``'s running amounts; an issued invoice left owing nothing is ``paid``."""
    if invoice.status == InvoiceStatus.ISSUED and invoice.amount_outstanding_minor == 0:
        invoice.paid_at = now
        transitions.transition(invoice, "mark_paid", actor=actor, reason=reason, update_fields=[*fields, "paid_at"])
    else:
        invoice.save(update_fields=[*fields, "updated_at"])


def insert_once(row: models.Model) -> bool:
    """Insert ``row`` unless a row with its ``reference`` exists: the unique index decides, not
    a read before the write (a concurrent twin waits for ours to commit or roll back, then
    inserts nothing). True when ``row`` was inserted (its ``pk`` is set)."""
    opts = row._meta
    assert opts.pk is not None
    fields = [f for f in opts.concrete_fields if not (f.primary_key and row.pk is None)]
    quote = connection.ops.quote_name
    params = [f.get_db_prep_save(f.pre_save(row, True), connection) for f in fields]
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {quote(opts.db_table)} ({', '.join(quote(f.column) for f in fields)}) "  # noqa: S608
            f"VALUES ({', '.join(['%s'] * len(fields))}) ON CONFLICT (reference) DO NOTHING "
            f"RETURNING {quote(opts.pk.column)}",  # identifiers from the model; values are parameters
            params,
        )
        inserted = cursor.fetchone()
    if inserted is None:
        return False
    row.pk = inserted[0]
    row._state.adding = False
    row._state.db = connection.alias
    return True


def terms_audit(
    *,
    subject: str,
    subject_id: int,
    action: str,
    actor: Actor,
    reason: str = "",
    before: dict[str, Any] | None = None,
    after: dict[str, Any] | None = None,
    account_id: int | None = None,
) -> None:
    TermsChange.objects.create(
        subject=subject,
        subject_id=subject_id,
        account_id=account_id,
        action=action,
        before=before,
        after=after,
        actor_kind=actor.kind,
        actor_name=actor.name,
        reason=reason[:1000],
    )
    log.info(
        f"invoicing.{subject}_{action}",
        extra={
            f"{subject}_id": subject_id,
            **({"account_id": ids.encode("acc", account_id)} if account_id is not None else {}),
            **actor_log_fields(actor),
        },
    )
