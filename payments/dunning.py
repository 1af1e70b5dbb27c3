"""Dunning: chasing unpaid invoices by the policy finance edits (``DunningPolicy``).

Hooks called by charging inside its outcome transaction (``case_record_failure``,
``invoice_settled``, ``notify_authentication_required``); the daily run is ``dunning_run``.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from django.db import connection
from django.utils import timezone

from billing_site.common import ids, money
from billing_site.outbox import services as outbox
from payments.declines import customer_message
from payments.models import DunningCase, DunningCaseStatus, DunningPolicy

if TYPE_CHECKING:
    from invoicing.selectors import PayableInvoice
    from payments.models import Payment

log = logging.getLogger(__name__)


def _account_email(account_id: int) -> tuple[str, str]:
    from accounts import selectors as account_selectors

    profile = account_selectors.billing_profiles(account_ids=[account_id]).get(account_id)
    return (profile.email, profile.name) if profile else ("", "")


def case_record_failure(
    *,
    invoice: PayableInvoice,
    decline_code: str,
    retryable: bool,
    payment: Payment | None,
    notify: bool = True,
) -> DunningCase:
    """A charge of ``invoice`` failed: open its dunning case (once: ``invoice_id`` is unique)
    or note the latest decline; email the customer (through the outbox) when it was a decline."""
    now = timezone.now()
    with connection.cursor() as cursor:
        cursor.execute(
            """
            INSERT INTO payments_dunningcase (account_id, invoice_id, currency, status, first_failure_at, due_at,
                                              retries_done, last_decline_code, retryable, suspended_account, opened_at)
            VALUES (%s, %s, %s, 'open', %s, %s, 0, %s, %s, false, %s)
            ON CONFLICT (invoice_id) DO UPDATE SET last_decline_code = EXCLUDED.last_decline_code,
                                                   retryable = EXCLUDED.retryable
            """,
            [
                invoice.account_id,
                invoice.invoice_id,
                invoice.currency,
                now,
                invoice.due_at or now,
                decline_code[:64],
                retryable,
                now,
            ],
        )
    case = DunningCase.objects.get(invoice_id=invoice.invoice_id)
    log.info(
        "dunning.failure",
        extra={
            "account_id": ids.encode("acc", invoice.account_id),
            "invoice_id": ids.encode("inv", invoice.invoice_id),
            "payment_id": payment.public_id if payment else None,
            "decline_code": decline_code,
            "retryable": retryable,
        },
    )
    if notify:
        email, name = _account_email(invoice.account_id)
        if email:
            outbox.enqueue_email(
                "payments/email/payment_failed",
                to=email,
                account_id=invoice.account_id,
                context=_context(invoice, name=name, code=decline_code, payment=payment),
                dedupe_key=f"email:payment_failed:{payment.public_id}" if payment else None,
            )
    return case


def _context(invoice: PayableInvoice, *, name: str, code: str = "", payment: Payment | None = None) -> dict[str, Any]:
    return {
        "account_name": name,
        "account_id": ids.encode("acc", invoice.account_id),
        "invoice_number": invoice.number,
        "amount": f"{money.format_minor(invoice.outstanding_minor, invoice.currency)} {invoice.currency}",
        "due_at": invoice.due_at.date().isoformat() if invoice.due_at else "",
        "message": customer_message(code) if code else "",
        "payment_id": payment.public_id if payment else "",
    }


def notify_authentication_required(*, payment: Payment) -> None:
    """The bank asks the customer to authenticate: an email with where to do it."""
    from invoicing import selectors as invoicing_selectors

    invoice = invoicing_selectors.payable_invoice(invoice_id=payment.invoice_id)
    email, name = _account_email(payment.account_id)
    if invoice is None or not email:
        return
    context = _context(invoice, name=name, code="authentication_required", payment=payment)
    context["next_action_url"] = payment.next_action_url
    outbox.enqueue_email(
        "payments/email/authentication_required",
        to=email,
        account_id=payment.account_id,
        context=context,
        dedupe_key=f"email:authentication_required:{payment.public_id}",
    )


def invoice_settled(*, account_id: int, invoice_id: int) -> None:
    """Money arrived on ``invoice_id``: its case is resolved once nothing is outstanding, and a
    suspended account whose debt is settled is reactivated (an account transition, through the
    outbox: within seconds of the commit, or at the next drain)."""
    from invoicing import selectors as invoicing_selectors

    invoice = invoicing_selectors.payable_invoice(invoice_id=invoice_id)
    if invoice is not None and invoice.outstanding_minor > 0:
        return
    DunningCase.objects.filter(invoice_id=invoice_id, status=DunningCaseStatus.OPEN).update(
        status=DunningCaseStatus.RESOLVED, closed_at=timezone.now()
    )
    from accounts import selectors as account_selectors

    standing = account_selectors.billing_account_standings({account_id}).get(account_id)
    if standing is None or standing.state != "suspended":
        return
    still_owed = DunningCase.objects.filter(
        account_id=account_id, status=DunningCaseStatus.OPEN, suspended_account=True
    ).exists()
    if not still_owed:
        outbox.enqueue_task(
            "payments.account_reactivate",
            account_id=account_id,
            reason=f"debt settled (invoice {ids.encode('inv', invoice_id)})",
        )


# --- Policy


@dataclass(frozen=True, slots=True)
class Schedule:
    """When each next step of a case is due under a policy."""

    next_retry_at: dt.datetime | None
    suspension_at: dt.datetime
    write_off_at: dt.datetime
    retries_planned: int


def policy_for(*, account_id: int) -> DunningPolicy:
    """The most specific active policy for the account: its currency and kind, its currency,
    its kind, else the default."""
    from accounts import selectors as account_selectors

    profile = account_selectors.billing_profiles(account_ids=[account_id]).get(account_id)
    currency, kind = (profile.currency, profile.kind) if profile else ("", "")
    candidates = DunningPolicy.objects.filter(is_active=True, currency__in=[currency, ""], account_kind__in=[kind, ""])
    best = sorted(candidates, key=lambda p: (p.currency == "", p.account_kind == ""))
    if best:
        return best[0]
    return DunningPolicy(name="built-in default", retry_days=[1, 3, 5])


def schedule(case: DunningCase, policy: DunningPolicy) -> Schedule:
    retry_days = sorted(policy.retry_days or [])
    next_retry = None
    if case.retryable and case.retries_done < len(retry_days):
        next_retry = case.first_failure_at + dt.timedelta(days=retry_days[case.retries_done])
    return Schedule(
        next_retry_at=next_retry,
        suspension_at=case.due_at + dt.timedelta(days=policy.suspend_after_days),
        write_off_at=case.due_at + dt.timedelta(days=policy.write_off_after_days),
        retries_planned=len(retry_days),
    )
