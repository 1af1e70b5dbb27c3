"""Reads of the payments app shared by the API, the admin and other apps (antifraud reads
card facts and payment outcomes through here)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from django.db import connection
from django.db.models import Count, Min, QuerySet

from billing_site.common import ids, money
from billing_site.common.backlogs import Backlog
from payments.models import (
    Dispute,
    DunningCase,
    DunningCaseStatus,
    Payment,
    PaymentMethod,
    PaymentProfile,
    PaymentStatus,
    Refund,
    WebhookEvent,
    WebhookStatus,
)


def payment_method_list(*, account_id: int) -> QuerySet[PaymentMethod]:
    """The account's cards still bound, the default first."""
    return PaymentMethod.objects.filter(account_id=account_id, detached_at__isnull=True).order_by(
        "-is_default", "-created_at"
    )


def payment_list(*, account_id: int) -> QuerySet[Payment]:
    return Payment.objects.filter(account_id=account_id).order_by("-created_at")


def refund_list(*, account_id: int) -> QuerySet[Refund]:
    return Refund.objects.filter(account_id=account_id).order_by("-created_at")


@dataclass(frozen=True, slots=True)
class CardFact:
    """A bound card as antifraud sees it (fingerprint included; never shown to customers)."""

    account_id: int
    payment_method_id: int
    fingerprint: str
    brand: str
    issuer_country: str
    funding: str
    created_at: dt.datetime
    active: bool


def card_facts(*, account_ids: list[int] | None = None, fingerprints: list[str] | None = None) -> list[CardFact]:
    rows = PaymentMethod.objects.all()
    if account_ids is not None:
        rows = rows.filter(account_id__in=account_ids)
    if fingerprints is not None:
        rows = rows.filter(fingerprint__in=fingerprints)
    return [
        CardFact(
            account_id=m.account_id,
            payment_method_id=m.id,
            fingerprint=m.fingerprint,
            brand=m.brand,
            issuer_country=m.issuer_country,
            funding=m.funding,
            created_at=m.created_at,
            active=m.detached_at is None,
        )
        for m in rows
    ]


@dataclass(frozen=True, slots=True)
class DisputeFact:
    """A chargeback on an account's payment: the fraud team's flag (antifraud reads these; an
    account with disputes, open or lost, is one to look at)."""

    account_id: int
    dispute_id: int
    payment_id: int
    amount_minor: int
    currency: str
    reason: str
    status: str  # open | won | lost
    opened_at: dt.datetime
    closed_at: dt.datetime | None


def disputes_for_accounts(account_ids: list[int] | set[int]) -> list[DisputeFact]:
    """Every dispute on these accounts' payments, oldest first."""
    rows = Dispute.objects.filter(account_id__in=list(account_ids)).order_by("opened_at", "id")
    return [
        DisputeFact(
            account_id=d.account_id,
            dispute_id=d.id,
            payment_id=d.payment_id,
            amount_minor=d.amount_minor,
            currency=d.currency,
            reason=d.reason,
            status=d.status,
            opened_at=d.opened_at,
            closed_at=d.closed_at,
        )
        for d in rows
    ]


@dataclass
class DunningInvoice:
    invoice: str
    status: str
    amount_outstanding: str
    currency: str
    due_at: dt.datetime | None
    first_failure_at: dt.datetime
    retries_done: int
    next_retry_at: dt.datetime | None
    suspension_at: dt.datetime | None
    write_off_at: dt.datetime | None
    last_decline_code: str


@dataclass
class DunningState:
    state: str  # none | retrying | suspended | paused | written_off
    paused: bool
    invoices: list[DunningInvoice] = field(default_factory=list)


def dunning_state(*, account_id: int) -> DunningState:
    """What the customer sees of dunning: each unpaid invoice being chased, its retries so far,
    and when the next retry, the suspension and the write-off are due by the policy."""
    from invoicing import selectors as invoicing_selectors
    from payments import dunning

    profile = PaymentProfile.objects.filter(account_id=account_id).first()
    paused = bool(profile and profile.dunning_paused)
    cases = list(DunningCase.objects.filter(account_id=account_id).exclude(status=DunningCaseStatus.RESOLVED))
    payable = {i.invoice_id: i for i in invoicing_selectors.payable_invoices(account_id=account_id)}
    policy = dunning.policy_for(account_id=account_id) if cases else None
    invoices = []
    for case in sorted(cases, key=lambda c: c.due_at):
        invoice = payable.get(case.invoice_id)
        schedule = dunning.schedule(case, policy) if policy is not None else None
        invoices.append(
            DunningInvoice(
                invoice=ids.encode("inv", case.invoice_id),
                status=case.status,
                amount_outstanding=money.format_minor(invoice.outstanding_minor if invoice else 0, case.currency),
                currency=case.currency,
                due_at=case.due_at,
                first_failure_at=case.first_failure_at,
                retries_done=case.retries_done,
                next_retry_at=schedule.next_retry_at if schedule else None,
                suspension_at=schedule.suspension_at if schedule else None,
                write_off_at=schedule.write_off_at if schedule else None,
                last_decline_code=case.last_decline_code,
            )
        )
    if paused:
        state = "paused"
    elif any(c.status == DunningCaseStatus.OPEN and c.suspended_account for c in cases):
        state = "suspended"
    elif any(c.status == DunningCaseStatus.OPEN for c in cases):
        state = "retrying"
    elif cases:
        state = "written_off"
    else:
        state = "none"
    return DunningState(state=state, paused=paused, invoices=invoices)


def payments_beyond_captured() -> list[str]:
    """Violations of the rule refunds and disputes keep, per payment (``ledger_check`` asks,
    through ``invoicing.signals.ledger_checking``): what succeeded refunds gave back plus what
    open and lost disputes withdrew never exceeds what the payment captured, and the payment's
    running totals (``amount_refunded_minor``, ``amount_disputed_minor``) are those rows' sums.
    Rows from before the rule (the database check is ``NOT VALID`` for them) show up here."""
    with connection.cursor() as cursor:
        cursor.execute(
            """
            WITH refunded AS (
                SELECT payment_id, sum(amount_minor) AS s FROM payments_refund WHERE status = 'succeeded' GROUP BY 1
            ), disputed AS (
                SELECT payment_id, sum(amount_minor) AS s FROM payments_dispute WHERE status IN ('open', 'lost')
                GROUP BY 1
            )
            SELECT p.id, p.currency, CASE WHEN p.status = 'succeeded' THEN p.amount_minor ELSE 0 END,
                   coalesce(r.s, 0), coalesce(d.s, 0), p.amount_refunded_minor, p.amount_disputed_minor
            FROM payments_payment p
            LEFT JOIN refunded r ON r.payment_id = p.id
            LEFT JOIN disputed d ON d.payment_id = p.id
            WHERE (r.s IS NOT NULL OR d.s IS NOT NULL OR p.amount_refunded_minor <> 0 OR p.amount_disputed_minor <> 0)
              AND (coalesce(r.s, 0) + coalesce(d.s, 0) > CASE WHEN p.status = 'succeeded' THEN p.amount_minor ELSE 0 END
                   OR coalesce(r.s, 0) <> p.amount_refunded_minor OR coalesce(d.s, 0) <> p.amount_disputed_minor)
            ORDER BY p.id
            """
        )
        rows = cursor.fetchall()
    problems = []
    for payment_id, currency, captured, refunded, disputed, refunded_total, disputed_total in rows:
        public_id = ids.encode("pay", payment_id)
        if refunded + disputed > captured:
            problems.append(
                f"payment {public_id}: refunded {refunded} + disputed {disputed} = {refunded + disputed} "
                f"{currency} (minor units), more than the {captured} captured"
            )
        if (refunded, disputed) != (refunded_total, disputed_total):
            problems.append(
                f"payment {public_id}: its totals (refunded {refunded_total}, disputed {disputed_total}) are not "
                f"its refunds' {refunded} and open or lost disputes' {disputed}"
            )
    return problems


# --- Finance's dunning funnel


FUNNEL_STAGES: tuple[tuple[str, str], ...] = (
    ("charged", "Charged: invoices whose first charge attempt was made in the month"),
    ("failed", "Failed: of those, invoices whose charge failed and went to dunning (a dunning case)"),
    ("recovered", "Recovered: of the failed, paid or settled since (the case resolved)"),
    ("suspended", "Suspended: of the failed, the account was suspended for it (paid since or not)"),
    ("written_off", "Written off: of the failed, the invoice was written off"),
)


@dataclass(frozen=True, slots=True)
class FunnelStage:
    invoices: int = 0
    amount_minor: int = 0  # the first attempt's amount: what was asked for


@dataclass(frozen=True, slots=True)
class CurrencyFunnel:
    currency: str
    stages: dict[str, FunnelStage]  # by the keys of ``FUNNEL_STAGES``, every key present


def dunning_funnel(*, month: dt.date) -> list[CurrencyFunnel]:
    """The dunning funnel of the invoices first charged in ``month`` (its first day), per
    currency: a cohort (``FUNNEL_STAGES``) followed to today, so each stage is a subset of
    the one before it except that suspended and recovered overlap (an account suspended and
    then paid). One statement: the month's first attempts (partial index
    ``payments_payment_first_attempt``) joined to their dunning cases by invoice (unique)."""
    start = dt.datetime.combine(month.replace(day=1), dt.time(0), tzinfo=dt.UTC)
    end = (start + dt.timedelta(days=32)).replace(day=1)
    with connection.cursor() as cursor:
        cursor.execute(
            """
            SELECT p.currency,
                   count(*), coalesce(sum(p.amount_minor), 0),
                   count(d.id), coalesce(sum(p.amount_minor) FILTER (WHERE d.id IS NOT NULL), 0),
                   count(*) FILTER (WHERE d.status = %(resolved)s),
                   coalesce(sum(p.amount_minor) FILTER (WHERE d.status = %(resolved)s), 0),
                   count(*) FILTER (WHERE d.suspended_account),
                   coalesce(sum(p.amount_minor) FILTER (WHERE d.suspended_account), 0),
                   count(*) FILTER (WHERE d.status = %(written_off)s),
                   coalesce(sum(p.amount_minor) FILTER (WHERE d.status = %(written_off)s), 0)
            FROM payments_payment p
            LEFT JOIN payments_dunningcase d ON d.invoice_id = p.invoice_id
            WHERE p.attempt = 1 AND p.created_at >= %(start)s AND p.created_at < %(end)s
            GROUP BY p.currency
            ORDER BY p.currency
            """,
            {
                "start": start,
                "end": end,
                "resolved": DunningCaseStatus.RESOLVED.value,
                "written_off": DunningCaseStatus.WRITTEN_OFF.value,
            },
        )
        rows = cursor.fetchall()
    keys = [key for key, _ in FUNNEL_STAGES]
    return [
        CurrencyFunnel(
            currency=row[0],
            stages={
                key: FunnelStage(invoices=int(row[1 + 2 * i]), amount_minor=int(row[2 + 2 * i]))
                for i, key in enumerate(keys)
            },
        )
        for row in rows
    ]


# --- What waits, for the staff home page and /metrics (set-based, one statement each).

# Payments in these states are not finished: each has a count and an oldest (last change).
OPEN_STATUSES = (
    PaymentStatus.PENDING,
    PaymentStatus.PROCESSING,
    PaymentStatus.UNKNOWN,
    PaymentStatus.REQUIRES_ACTION,
)


def webhook_backlog() -> dict[str, Backlog]:
    """Inbound webhook events not processed, by status (``pending``: waiting for its task;
    ``failed``: its processing failed, see the event's error), oldest by reception."""
    rows = (
        WebhookEvent.objects.filter(status__in=[WebhookStatus.PENDING, WebhookStatus.FAILED])
        .values("status")
        .annotate(count=Count("id"), oldest_at=Min("received_at"))
    )
    found = {row["status"]: Backlog.of(row) for row in rows}
    return {status: found.get(status, Backlog(0, None)) for status in (WebhookStatus.PENDING, WebhookStatus.FAILED)}


def payments_open() -> dict[str, Backlog]:
    """Payments not finished, by status, with the oldest last change (a payment ``unknown``
    for long is one the reconciler cannot resolve)."""
    rows = (
        Payment.objects.filter(status__in=OPEN_STATUSES)
        .values("status")
        .annotate(count=Count("id"), oldest_at=Min("updated_at"))
    )
    found = {row["status"]: Backlog.of(row) for row in rows}
    return {str(status): found.get(status, Backlog(0, None)) for status in OPEN_STATUSES}


def payment_outcomes(*, since: dt.datetime) -> dict[tuple[str, str], int]:
    """Payments whose last change was at or after ``since``, by (status, decline code): what
    the charges of the last hour came to. Read through the ``(status, updated_at)`` index, one
    range per status."""
    rows = (
        Payment.objects.filter(status__in=list(PaymentStatus.values), updated_at__gte=since)
        .values_list("status", "decline_code")
        .annotate(count=Count("id"))
    )
    return {(status, decline_code): count for status, decline_code, count in rows}


# --- For the back office's customer page and search (staff)


def payments_for_account(*, account_id: int, limit: int = 100) -> list[Payment]:
    """The account's payments, newest first, each with its card: one indexed query."""
    return list(
        Payment.objects.filter(account_id=account_id)
        .select_related("payment_method")
        .order_by("-created_at", "-id")[:limit]
    )


def refunds_for_account(*, account_id: int, limit: int = 100) -> list[Refund]:
    return list(Refund.objects.filter(account_id=account_id).order_by("-created_at", "-id")[:limit])


def disputes_for_account(*, account_id: int, limit: int = 100) -> list[Dispute]:
    return list(Dispute.objects.filter(account_id=account_id).order_by("-opened_at", "-id")[:limit])


def cards_for_account(*, account_id: int) -> list[PaymentMethod]:
    """Every card the account bound, removed ones too (``detached_at``), the default first."""
    return list(
        PaymentMethod.objects.filter(account_id=account_id).order_by("detached_at", "-is_default", "-created_at", "-id")
    )


@dataclass(frozen=True, slots=True)
class DunningStep:
    """One step dunning took on an account (a retry, a warning, a suspension, a write-off)."""

    invoice_id: int
    action: str
    detail: str
    created_at: dt.datetime


def dunning_steps_for_account(*, account_id: int, limit: int = 200) -> list[DunningStep]:
    """The steps dunning took on the account's invoices, newest first: one query."""
    from payments.models import DunningAction

    rows = (
        DunningAction.objects.filter(account_id=account_id)
        .values_list("case__invoice_id", "action", "detail", "created_at")
        .order_by("-created_at", "-id")[:limit]
    )
    return [DunningStep(*row) for row in rows]


def payment_search(*, term: str, limit: int = 20) -> list[Payment]:
    """Payments named by ``term``: our id (``pay_…``), or the gateway's intent (``pi_…``) or
    charge (``ch_…``) id, exactly. Indexed: the primary key, the (gateway, intent) unique index,
    the charge id's partial index."""
    from django.db.models import Q

    from payments.models import GatewayName

    term = term.strip()
    if not term:
        return []
    payment_id = ids.decode("pay", term)
    if payment_id is not None:
        match = Q(id=payment_id)
    else:
        match = Q(gateway__in=GatewayName.values, gateway_intent_id=term) | Q(gateway_charge_id=term)
    return list(Payment.objects.filter(match).order_by("-created_at")[:limit])


def cards_search(*, term: str, limit: int = 50) -> list[PaymentMethod]:
    """Cards named by ``term``: four digits (the last four, indexed; newest first, at most
    ``limit``), or our id (``pmt_…``)."""
    term = term.strip()
    method_id = ids.decode("pmt", term)
    if method_id is not None:
        return list(PaymentMethod.objects.filter(id=method_id))
    if len(term) == 4 and term.isdigit():
        return list(PaymentMethod.objects.filter(last4=term).order_by("-created_at", "-id")[:limit])
    return []
