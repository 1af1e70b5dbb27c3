"""Dunning: chasing unpaid invoices by the policy finance edits (``DunningPolicy``).

Hooks called by charging inside its outcome transaction (``case_record_failure``,
``invoice_settled``, ``notify_authentication_required``); the daily run is ``dunning_run``.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from billing_site.common import ids, money
from billing_site.common.actors import Actor
from billing_site.common.errors import ApplicationError
from billing_site.common.transactions import forbid_transaction
from billing_site.common.transitions import transition
from billing_site.outbox import services as outbox
from payments.declines import customer_message
from payments.models import (
    ACTIVE_STATUSES,
    DunningAction,
    DunningCase,
    DunningCaseStatus,
    DunningPolicy,
    Payment,
    PaymentProfile,
    PaymentTrigger,
)

if TYPE_CHECKING:
    from invoicing.selectors import PayableInvoice

log = logging.getLogger(__name__)

SYSTEM = Actor.system("dunning")
# Cases that keep the account they suspended suspended: debt still chased, or written off
# (finance reactivates such an account by hand, if ever).
SUSPENDING_STATUSES = (DunningCaseStatus.OPEN, DunningCaseStatus.WRITTEN_OFF)


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
    customer_fault: bool = True,
) -> DunningCase:
    """A charge of ``invoice`` failed: open its dunning case (once: ``invoice_id`` is unique)
    or note the latest decline; email the customer (through the outbox) when it was a decline.

    A threshold invoice (issued early because the account reached its credit limit) that
    fails for the customer's reason (a decline, no card, an authentication not done)
    suspends the account at once, not after the policy's days: the exposure stays bounded by
    the limit. A failure that is our gateway's (``customer_fault`` false) does not."""
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
    suspend_now = invoice.kind == "threshold" and customer_fault and not case.suspended_account
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
                context={**_context(invoice, name=name, code=decline_code, payment=payment), "will_retry": retryable},
                dedupe_key=f"email:payment_failed:{payment.public_id}" if payment else None,
            )
    if suspend_now:
        email, name = _account_email(invoice.account_id)
        _suspend(
            case,
            invoice,
            reason=f"threshold invoice {invoice.number} (credit limit reached) not paid: {decline_code}",
            now=now,
            email=email,
            name=name,
        )
        case.suspended_account = True
    return case


def _context(invoice: PayableInvoice, *, name: str, code: str = "", payment: Payment | None = None) -> dict[str, Any]:
    return {
        "account_name": name,
        "account_id": ids.encode("acc", invoice.account_id),
        "invoice_number": invoice.number,
        "invoice_id": ids.encode("inv", invoice.invoice_id),
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


def invoice_settled(*, account_id: int, invoice_id: int, paid: bool | None = None) -> int:
    """Money arrived on ``invoice_id``: its case is resolved once nothing is outstanding, and a
    suspended account whose debt is settled is reactivated (an account transition, through the
    outbox: within seconds of the commit, or at the next drain). ``paid``: the caller knows
    whether the invoice is paid now (None: read it). On the charge run's hot path an invoice
    paid with no case open costs one statement that finds nothing. Returns the cases resolved."""
    if paid is None:
        from invoicing import selectors as invoicing_selectors

        invoice = invoicing_selectors.payable_invoice(invoice_id=invoice_id)
        paid = invoice is None or invoice.outstanding_minor <= 0
    if not paid:
        return 0
    resolved = list(
        DunningCase.objects.filter(invoice_id=invoice_id, status=DunningCaseStatus.OPEN).select_for_update()
    )
    if not resolved:
        return 0
    now = timezone.now()
    for case in resolved:
        case.closed_at = now
        transition(case, "resolve", actor=SYSTEM, reason="nothing outstanding", update_fields=["closed_at"])
    if not any(case.suspended_account for case in resolved):
        return len(resolved)
    from accounts import selectors as account_selectors

    standing = account_selectors.billing_account_standings({account_id}).get(account_id)
    if standing is None or standing.state != "suspended":
        return len(resolved)
    still_owed = DunningCase.objects.filter(
        account_id=account_id, status__in=SUSPENDING_STATUSES, suspended_account=True
    ).exists()
    if not still_owed:
        outbox.enqueue_task(
            "payments.account_reactivate",
            account_id=account_id,
            reason=f"debt settled (invoice {ids.encode('inv', invoice_id)})",
        )
    return len(resolved)


@transaction.atomic(durable=True)
def cases_account_reactivated_by_staff(*, account_id: int, reason: str) -> int:
    """Staff reactivated the account (an override while debt remains): the cases that had
    suspended it say so (a ``reactivated_by_staff`` action with the reason) and no longer
    count as suspending it, so ``dunning_state`` agrees with the active account. The debt is
    still chased (retries, the write-off); the case's suspension was claimed once, so the run
    does not suspend the account again for the same invoice. Idempotent."""
    now = timezone.now()
    cases = list(
        DunningCase.objects.select_for_update().filter(
            account_id=account_id, status__in=SUSPENDING_STATUSES, suspended_account=True
        )
    )
    for case in cases:
        _claim(case, "reactivated_by_staff", f"account reactivated by staff: {reason}", now)
        _action_log("dunning.reactivated_by_staff", case)
    DunningCase.objects.filter(id__in=[case.id for case in cases]).update(suspended_account=False)
    return len(cases)


# --- Policy


@dataclass(frozen=True, slots=True)
class Schedule:
    """When each next step of a case is due under a policy."""

    next_retry_at: dt.datetime | None
    suspension_at: dt.datetime
    write_off_at: dt.datetime
    retries_planned: int


BUILT_IN_POLICY = DunningPolicy(name="built-in default", retry_days=[1, 3, 5])


def _policy_pick(policies: list[DunningPolicy], *, currency: str, kind: str) -> DunningPolicy:
    """The most specific of ``policies`` (the active ones) for an account of this currency and
    kind: currency and kind, currency, kind, else the default (both empty)."""
    candidates = [p for p in policies if p.currency in (currency, "") and p.account_kind in (kind, "")]
    best = sorted(candidates, key=lambda p: (p.currency == "", p.account_kind == ""))
    return best[0] if best else BUILT_IN_POLICY


def policy_for(*, account_id: int) -> DunningPolicy:
    """The policy that applies to the account (see ``_policy_pick``)."""
    from accounts import selectors as account_selectors

    profile = account_selectors.billing_profiles(account_ids=[account_id]).get(account_id)
    currency, kind = (profile.currency, profile.kind) if profile else ("", "")
    return _policy_pick(list(DunningPolicy.objects.filter(is_active=True)), currency=currency, kind=kind)


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


# --- The daily run


@dataclass
class RunReport:
    opened: int = 0
    resolved: int = 0
    retried: int = 0
    warned: int = 0
    suspended: int = 0
    written_off: int = 0
    paused_skipped: int = 0
    blocked_skipped: int = 0
    reactivations: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def _claim(case: DunningCase, action: str, detail: str, now: dt.datetime) -> bool:
    """Record that dunning does ``action`` for ``case``; False when it was done before (by an
    earlier run, or by a run at the same moment: the unique ``(case, action)`` decides). Call
    in the transaction that does the action's work, so the claim and the work commit together."""
    try:
        with transaction.atomic():
            DunningAction.objects.create(
                case=case, account_id=case.account_id, action=action, detail=detail[:300], created_at=now
            )
    except IntegrityError:
        return False
    return True


def _action_log(event: str, case: DunningCase, **fields: Any) -> None:
    log.info(
        event,
        extra={
            "account_id": ids.encode("acc", case.account_id),
            "invoice_id": ids.encode("inv", case.invoice_id),
            "case_id": case.id,
            **fields,
        },
    )


def dunning_run(*, now: dt.datetime | None = None) -> dict[str, int]:
    """Apply the dunning policy to every unpaid invoice, as of ``now``.

    1. Overdue issued invoices nobody tried to charge (no card, an abandoned authentication)
       get a case.
    2. Cases whose invoice is settled (paid, credited, voided) are resolved; written off by
       finance, closed as such; a suspended account with no debt left is reactivated.
    3. For each open case of an account whose dunning is not paused, whichever steps the
       policy says are due: the next retry of a retryable decline (a charge task, trigger
       ``dunning``), the warning email before suspension, the suspension (the account
       transition and an email), the write-off (``uncollectible`` and bad debt, and an email).

    Each step is claimed by a ``DunningAction`` row, unique per case and step, inserted in the
    transaction that queues the step's effects through the outbox: the same day's run again, or
    two runs at once, do every step once. The write-off is the invoicing service's own
    transaction: it runs first, and a run that finds the invoice already uncollectible records
    the step without doing it again."""
    forbid_transaction("The dunning run")
    from accounts import selectors as account_selectors
    from invoicing import selectors as invoicing_selectors

    now = now or timezone.now()
    report = RunReport()

    # 1. Overdue and never chased.
    overdue = invoicing_selectors.overdue_invoices(due_before=now)
    chased = set(
        DunningCase.objects.filter(invoice_id__in=[i.invoice_id for i in overdue]).values_list("invoice_id", flat=True)
    )
    fresh = [
        DunningCase(
            account_id=i.account_id,
            invoice_id=i.invoice_id,
            currency=i.currency,
            first_failure_at=now,
            due_at=i.due_at or now,
            last_decline_code="overdue",
            retryable=True,
            opened_at=now,
        )
        for i in overdue
        if i.invoice_id not in chased
    ]
    if fresh:
        with transaction.atomic():
            created = DunningCase.objects.bulk_create(fresh, ignore_conflicts=True)
        report.opened = len(created)

    cases = list(DunningCase.objects.filter(status=DunningCaseStatus.OPEN).order_by("due_at", "id"))
    owed = invoicing_selectors.payable_invoices(invoice_ids=[c.invoice_id for c in cases])
    invoices = {i.invoice_id: i for i in owed}

    # 2. Settled meanwhile.
    settled = [c for c in cases if c.invoice_id not in invoices]
    if settled:
        states = invoicing_selectors.invoice_statuses(c.invoice_id for c in settled)
        for case in settled:
            status = (
                DunningCaseStatus.WRITTEN_OFF
                if states.get(case.invoice_id) == "uncollectible"
                else DunningCaseStatus.RESOLVED
            )
            with transaction.atomic():
                if status == DunningCaseStatus.RESOLVED:  # resolved, and its suspension lifted if it was the last
                    done = invoice_settled(account_id=case.account_id, invoice_id=case.invoice_id, paid=True)
                else:
                    done = int(_close_written_off(case.id, now=now, reason="the invoice is uncollectible"))
            if done:
                report.resolved += 1
                _action_log("dunning.case_closed", case, status=status)
    cases = [c for c in cases if c.invoice_id in invoices]
    if not cases:
        log.info("dunning.run", extra={"as_of": now.isoformat(), **report.as_dict()})
        return report.as_dict()

    account_ids = sorted({c.account_id for c in cases})
    paused = set(
        PaymentProfile.objects.filter(account_id__in=account_ids, dunning_paused=True).values_list(
            "account_id", flat=True
        )
    )
    # Blocked accounts are the fraud team's: no retries, no suspension, no write-off meanwhile.
    standings = account_selectors.billing_account_standings(set(account_ids))
    blocked = {a for a, standing in standings.items() if standing.state == "blocked"}
    profiles = account_selectors.billing_profiles(account_ids=account_ids)
    policies = list(DunningPolicy.objects.filter(is_active=True))
    busy = set(
        Payment.objects.filter(invoice_id__in=[c.invoice_id for c in cases], status__in=ACTIVE_STATUSES).values_list(
            "invoice_id", flat=True
        )
    )

    # 3. The policy's steps.
    for case in cases:
        if case.account_id in paused:
            report.paused_skipped += 1
            continue
        if case.account_id in blocked:
            report.blocked_skipped += 1
            continue
        profile = profiles.get(case.account_id)
        policy = _policy_pick(
            policies, currency=profile.currency if profile else case.currency, kind=profile.kind if profile else ""
        )
        plan = schedule(case, policy)
        invoice = invoices[case.invoice_id]
        email, name = (profile.email, profile.name) if profile else ("", "")

        if now >= plan.suspension_at and not case.suspended_account:
            reason = f"invoice {invoice.number} unpaid {policy.suspend_after_days} days after its due date"
            if _suspend(case, invoice, reason=reason, now=now, email=email, name=name):
                report.suspended += 1
        elif (
            policy.warn_days_before_suspension
            and not case.suspended_account
            and now >= plan.suspension_at - dt.timedelta(days=policy.warn_days_before_suspension)
            and _warn(case, invoice, plan, now=now, email=email, name=name)
        ):
            report.warned += 1
        if now >= plan.write_off_at:
            if case.invoice_id not in busy and _write_off(case, invoice, policy, now=now, email=email, name=name):
                report.written_off += 1
            continue
        if plan.next_retry_at is not None and now >= plan.next_retry_at and case.invoice_id not in busy:
            # Retries missed (the run did not run for days) are one retry, the latest due:
            # never two charges of one invoice on one day.
            due_retries = sum(
                1 for days in policy.retry_days or [] if case.first_failure_at + dt.timedelta(days=days) <= now
            )
            if _retry(case, now=now, number=max(due_retries, case.retries_done + 1)):
                report.retried += 1

    log.info("dunning.run", extra={"as_of": now.isoformat(), **report.as_dict()})
    return report.as_dict()


def _retry(case: DunningCase, *, now: dt.datetime, number: int) -> bool:
    with transaction.atomic():
        if not _claim(case, f"retry:{number}", "charge queued", now):
            return False
        DunningCase.objects.filter(id=case.id).update(retries_done=number)
        outbox.enqueue_task(
            "payments.charge_invoice",
            invoice_id=case.invoice_id,
            account_id=case.account_id,
            trigger=PaymentTrigger.DUNNING.value,
            dedupe_key=f"dunning:{case.id}:retry:{number}",
        )
    _action_log("dunning.retry", case, retry=number)
    return True


def _warn(
    case: DunningCase, invoice: PayableInvoice, plan: Schedule, *, now: dt.datetime, email: str, name: str
) -> bool:
    with transaction.atomic():
        if not _claim(case, "email:warning", f"suspension on {plan.suspension_at.date().isoformat()}", now):
            return False
        if email:
            context = _context(invoice, name=name, code=case.last_decline_code)
            context["suspension_on"] = plan.suspension_at.date().isoformat()
            outbox.enqueue_email(
                "payments/email/suspension_warning",
                to=email,
                account_id=case.account_id,
                context=context,
                dedupe_key=f"email:dunning:{case.id}:warning",
            )
    _action_log("dunning.warned", case, suspension_at=plan.suspension_at.isoformat())
    return True


def _suspend(
    case: DunningCase, invoice: PayableInvoice, *, reason: str, now: dt.datetime, email: str, name: str
) -> bool:
    with transaction.atomic():
        if not _claim(case, "suspend", reason, now):
            return False
        DunningCase.objects.filter(id=case.id).update(suspended_account=True)
        outbox.enqueue_task(
            "payments.account_suspend",
            account_id=case.account_id,
            reason=f"dunning: {reason}",
            dedupe_key=f"dunning:{case.id}:suspend",
        )
        if email:
            outbox.enqueue_email(
                "payments/email/account_suspended",
                to=email,
                account_id=case.account_id,
                context=_context(invoice, name=name, code=case.last_decline_code),
                dedupe_key=f"email:dunning:{case.id}:suspended",
            )
    _action_log("dunning.suspended", case)
    return True


def _write_off(
    case: DunningCase, invoice: PayableInvoice, policy: DunningPolicy, *, now: dt.datetime, email: str, name: str
) -> bool:
    """Write the invoice off (the invoicing service's own transaction), then record the step
    and close the case. A crash between the two leaves an uncollectible invoice and an open
    case: the next run finds the invoice settled as uncollectible and closes the case (step 2)."""
    from invoicing import selectors as invoicing_selectors
    from invoicing import services as invoicing_services

    reason = f"dunning: unpaid {policy.write_off_after_days} days after its due date"
    try:
        invoicing_services.invoice_write_off(invoice_id=case.invoice_id, actor=SYSTEM, reason=reason)
    except ApplicationError:
        current = invoicing_selectors.payable_invoice(invoice_id=case.invoice_id)
        if current is None or current.status != "uncollectible":
            return False  # paid or voided since the run looked: the next run resolves the case
    with transaction.atomic():
        if not _claim(case, "write_off", reason, now):
            return False
        _close_written_off(case.id, now=now, reason=reason)
        if email:
            outbox.enqueue_email(
                "payments/email/invoice_written_off",
                to=email,
                account_id=case.account_id,
                context=_context(invoice, name=name, code=case.last_decline_code),
                dedupe_key=f"email:dunning:{case.id}:written_off",
            )
    _action_log("dunning.written_off", case, amount_minor=invoice.outstanding_minor, currency=invoice.currency)
    return True


def _close_written_off(case_id: int, *, now: dt.datetime, reason: str) -> bool:
    """Close an open case as written off (inside the caller's transaction); False when it was
    no longer open."""
    case = DunningCase.objects.select_for_update().filter(id=case_id, status=DunningCaseStatus.OPEN).first()
    if case is None:
        return False
    case.closed_at = now
    transition(case, "write_off", actor=SYSTEM, reason=reason, update_fields=["closed_at"])
    return True
