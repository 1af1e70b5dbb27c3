"""Issuing: planned invoices written as issued, one durable transaction per chunk of accounts.

For a calendar month and a chunk of accounts, ``close_chunk``:

1. locks the accounts' ``BillingLock`` rows (two runs, or runs of two periods, never bill
   an account at the same time) and skips accounts whose invoice for the month is issued;
2. plans their invoices (``invoicing.planning``);
3. writes lines, billed usage, credit applications and audit rows, then takes the numbers
   in one go from the series (``invoicing.numbering``; its row lock is held from here to the
   commit, so it is taken last), then the invoices (already issued: a draft of the month is
   recomputed and issued in place) and their ledger entries: a handful of set-based
   statements (COPY and ``INSERT … SELECT FROM unnest``, tables described once as
   ``BulkTable``), no per-row round trips.

4. writes, in the same transaction, one outbox message ``payments.charge_invoices`` with the
   chunk's invoices issued with an amount due (not wholly covered by credits), deduplicated
   by ``charge-after-issue:<first invoice id>:<count>``: the charge is attempted after the
   commit, and the outbox's drain delivers it if the process dies first.

A run killed half-way loses only its open chunk; the re-run finds the committed chunks
issued and does the rest, with the same content, because it reads the same usage. Other
side effects (PDF renders) are the caller's, after the commit.
"""

from __future__ import annotations

import datetime as dt
import json
from collections import defaultdict
from dataclasses import dataclass, field
from decimal import Decimal
from typing import NamedTuple

from django.conf import settings
from django.db import connection, transaction
from django.db.models import F
from django.utils import timezone

from billing_site.common import ids, money
from billing_site.common.actors import Actor
from billing_site.common.copy import BulkTable
from billing_site.common.transitions import StateChangeRow, state_change_table
from billing_site.outbox import services as outbox
from invoicing import ledger, numbering, selectors, taxes
from invoicing.models import CreditGrant, Invoice, InvoiceKind, InvoiceStatus, InvoiceTransition
from invoicing.periods import Period
from invoicing.planning import PlannedInvoice, plan, seller_snapshot


@dataclass
class ChunkResult:
    issued: list[int] = field(default_factory=list)  # invoice ids
    already_issued: int = 0
    nothing_to_bill: int = 0
    totals_minor: dict[str, int] = field(default_factory=dict)  # issued totals by currency
    unbillable: dict[int, str] = field(default_factory=dict)  # account → why it was not invoiced


def lock_accounts(account_ids: list[int]) -> None:
    """Lock the accounts' ``BillingLock`` rows (created on first use) in ascending order, so
    runs that overlap wait for each other instead of deadlocking."""
    ordered = sorted(account_ids)
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO invoicing_billinglock (account_id) SELECT a FROM unnest(%s::bigint[]) a ORDER BY a "
            "ON CONFLICT DO NOTHING",
            [ordered],
        )
        cursor.execute(
            "SELECT count(*) FROM (SELECT account_id FROM invoicing_billinglock WHERE account_id = ANY(%s) "
            "ORDER BY account_id FOR UPDATE) locked",
            [ordered],
        )


@transaction.atomic(durable=True)
def close_chunk(*, period: Period, account_ids: list[int], actor: Actor) -> ChunkResult:
    """Issue ``period``'s invoices for these accounts (those not issued yet), in one durable
    transaction. ``ChunkResult.issued`` lists the invoices whose PDFs are to be rendered."""
    now = timezone.now()
    result = ChunkResult()
    with connection.cursor() as cursor:
        # This transaction only: a chunk's aggregation (~100 k daily rows per 500 accounts)
        # hashes in memory instead of spilling; JIT costs more than it saves on one-off queries.
        cursor.execute("SET LOCAL work_mem = '64MB'; SET LOCAL jit = off")
    lock_accounts(account_ids)
    existing = {
        account_id: (invoice_id, status)
        for account_id, invoice_id, status in Invoice.objects.filter(
            account_id__in=account_ids, period_start=period.start, kind=InvoiceKind.PERIOD
        ).values_list("account_id", "id", "status")
    }
    drafts = {a: invoice_id for a, (invoice_id, status) in existing.items() if status == InvoiceStatus.DRAFT}
    todo = [a for a in account_ids if a not in existing or a in drafts]
    result.already_issued = len(account_ids) - len(todo)
    taxes.lock_rates(shared=True)  # no rate changes under the invoices being issued
    plans = plan(period=period, account_ids=todo)
    result.unbillable = plans.unbillable
    result.nothing_to_bill = len(todo) - len(plans) - len(plans.unbillable)
    if not plans:
        return result
    ordered = [plans[a] for a in sorted(plans)]
    _issue(
        period,
        ordered,
        drafts=drafts,
        kind=InvoiceKind.PERIOD,
        reason="period close",
        actor=actor,
        now=now,
        result=result,
    )
    return result


@transaction.atomic(durable=True)
def threshold_chunk(*, account_ids: list[int], actor: Actor) -> ChunkResult:
    """Issue threshold invoices, in one durable transaction, to those of these accounts that
    are still over their credit limit once their billing locks are held (a period close may
    have billed their usage meanwhile) and have no threshold invoice still owing: the usage
    rated so far this month (and earlier months' usage not billed yet), the tax point today,
    due at once and charged after the commit. The month's own invoice, later, bills only
    what is rated after this one (planning subtracts what invoices billed)."""
    now = timezone.now()
    period = Period.containing(now)
    result = ChunkResult()
    lock_accounts(account_ids)
    over = {e.account_id: e for e in selectors.credit_exposures(as_of=now, account_ids=account_ids)}
    todo = sorted(a for a, e in over.items() if not e.threshold_open and money.to_minor(e.unbilled, e.currency) > 0)
    result.already_issued = len(account_ids) - len(todo)
    taxes.lock_rates(shared=True)
    plans = plan(period=period, account_ids=todo, tax_point=now.date())
    result.unbillable = plans.unbillable
    # Only usage to bill: discounts alone, or less than a minor unit, are left to the month's invoice.
    ordered = [plans[a] for a in sorted(plans) if plans[a].total_minor > 0 and plans[a].billed]
    result.nothing_to_bill = len(todo) - len(ordered) - len(plans.unbillable)
    if ordered:
        _issue(
            period,
            ordered,
            drafts={},
            kind=InvoiceKind.THRESHOLD,
            reason="credit limit reached",
            actor=actor,
            now=now,
            result=result,
        )
    return result


def _issue(
    period: Period,
    ordered: list[PlannedInvoice],
    *,
    drafts: dict[int, int],
    kind: InvoiceKind,
    reason: str,
    actor: Actor,
    now: dt.datetime,
    result: ChunkResult,
) -> None:
    """Write planned invoices as issued (a draft of the period in place), with their lines,
    billed usage, credits, audit rows, numbers, ledger entries and charges."""
    # A draft is issued in place (it keeps its id); the others get new ids now, so that the
    # rows pointing at them go in first (their foreign keys are checked at commit) and the
    # series' number lock is taken as late as possible and held only to the commit.
    invoice_ids = {p.account_id: drafts.get(p.account_id) or ids.new_id() for p in ordered}
    applied = _apply_credits(ordered, now=now)
    issued_drafts = [drafts[p.account_id] for p in ordered if p.account_id in drafts]
    if issued_drafts:  # a draft not issued now (nothing to bill, unbillable) keeps its lines
        with connection.cursor() as cursor:
            cursor.execute("DELETE FROM invoicing_invoiceline WHERE invoice_id = ANY(%s)", [issued_drafts])
    _write_lines(ordered, invoice_ids)
    _write_audit(ordered, invoice_ids, applied, actor=actor, now=now, reason=reason)
    invoice_numbers = numbering.take(settings.INVOICING_INVOICE_SERIES, now.year, len(ordered))
    # Issued now, under the series lock: numbers and issue times rise together across workers.
    now = timezone.now()
    _write_invoices(period, ordered, invoice_ids, invoice_numbers, applied, now=now, kind=kind)
    ledger.post_invoices_issued(
        [
            ledger.IssuedInvoice(
                invoice_id=invoice_ids[p.account_id],
                account_id=p.account_id,
                currency=p.currency,
                total_minor=p.total_minor,
                tax_minor=p.tax_minor,
                tax_country=p.tax.country,
                revenue_by_family=_revenue_by_family(p),
                credits_applied_minor=sum(amount for _, amount in applied.get(p.account_id, [])),
                number=number,
            )
            for p, number in zip(ordered, invoice_numbers, strict=True)
        ],
        posted_at=now,
    )
    _queue_charges(ordered, invoice_ids, applied)
    result.issued = [invoice_ids[p.account_id] for p in ordered]
    for p in ordered:
        result.totals_minor[p.currency] = result.totals_minor.get(p.currency, 0) + p.total_minor


CHARGE_TASK = "payments.charge_invoices"  # the chunk's invoices, one task


def _queue_charges(
    plans: list[PlannedInvoice], invoice_ids: dict[int, int], applied: dict[int, list[tuple[int, int]]]
) -> None:
    """Charge every invoice issued with an amount due, after the commit, through the outbox:
    one message for the chunk (the payments app charges a chunk set-based, with the same rules
    as one invoice). The task is the payments app's, named here, not imported."""
    due = [
        (invoice_ids[p.account_id], p.account_id)
        for p in plans
        if p.total_minor - sum(amount for _, amount in applied.get(p.account_id, [])) > 0
    ]
    if not due:
        return
    outbox.enqueue_task(
        CHARGE_TASK,
        invoice_ids=[invoice_id for invoice_id, _ in due],
        trigger="after_issue",
        dedupe_key=f"charge-after-issue:{due[0][0]}:{len(due)}",
    )


def _revenue_by_family(p: PlannedInvoice) -> dict[str, int]:
    families: dict[str, int] = defaultdict(int)
    for line in p.lines:
        families[line.revenue_family] += line.amount_minor
    return dict(families)


def _apply_credits(plans: list[PlannedInvoice], *, now: dt.datetime) -> dict[int, list[tuple[int, int]]]:
    """Spend each account's credit grants on its new invoice, soonest-expiring first (then
    oldest), only in the invoice's currency and only grants not expired at issue time.
    Returns account → [(grant id, amount)]; grants are locked and updated here."""
    wanted = {p.account_id: p for p in plans if p.total_minor > 0}
    if not wanted:
        return {}
    grants = (
        CreditGrant.objects.select_for_update()
        .filter(account_id__in=list(wanted), remaining_minor__gt=0)
        .exclude(expires_at__lte=now)
        .order_by("account_id", F("expires_at").asc(nulls_last=True), "created_at", "id")
    )
    applied: dict[int, list[tuple[int, int]]] = defaultdict(list)
    left = {a: p.total_minor for a, p in wanted.items()}
    updates: list[tuple[int, int]] = []
    for grant in grants:
        p = wanted[grant.account_id]
        if grant.currency != p.currency or left[grant.account_id] == 0:
            continue
        amount = min(grant.remaining_minor, left[grant.account_id])
        left[grant.account_id] -= amount
        applied[grant.account_id].append((grant.id, amount))
        updates.append((grant.id, amount))
    if updates:
        with connection.cursor() as cursor:
            cursor.execute(
                """
                UPDATE invoicing_creditgrant g SET remaining_minor = g.remaining_minor - u.amount
                FROM unnest(%s::bigint[], %s::bigint[]) AS u(id, amount) WHERE g.id = u.id
                """,
                [[g for g, _ in updates], [a for _, a in updates]],
            )
    return applied


class _InvoiceRow(NamedTuple):
    id: int
    account_id: int
    period_start: dt.date
    period_end: dt.date
    kind: str
    status: str
    currency: str
    number: str
    subtotal_minor: int
    tax_rate: Decimal
    tax_country: str
    tax_treatment: str
    tax_note: str
    tax_minor: int
    total_minor: int
    credits_applied_minor: int
    amount_paid_minor: int
    amount_credited_minor: int
    written_off_minor: int
    amount_refunded_minor: int
    payment_terms_days: int
    buyer: str  # JSON
    seller: str  # JSON
    created_at: dt.datetime
    issued_at: dt.datetime
    due_at: dt.datetime
    paid_at: dt.datetime | None
    updated_at: dt.datetime


_INVOICES = BulkTable(
    "invoicing_invoice",
    _InvoiceRow,
    {
        "id": "bigint",
        "account_id": "bigint",
        "period_start": "date",
        "period_end": "date",
        "kind": "text",
        "status": "text",
        "currency": "text",
        "number": "text",
        "subtotal_minor": "bigint",
        "tax_rate": "numeric",
        "tax_country": "text",
        "tax_treatment": "text",
        "tax_note": "text",
        "tax_minor": "bigint",
        "total_minor": "bigint",
        "credits_applied_minor": "bigint",
        "amount_paid_minor": "bigint",
        "amount_credited_minor": "bigint",
        "written_off_minor": "bigint",
        "amount_refunded_minor": "bigint",
        "payment_terms_days": "int",
        "buyer": "jsonb",
        "seller": "jsonb",
        "created_at": "timestamptz",
        "issued_at": "timestamptz",
        "due_at": "timestamptz",
        "paid_at": "timestamptz",
        "updated_at": "timestamptz",
    },
)
# What issuing a draft in place replaces: everything but its identity and its life so far.
_ISSUED_OVER_DRAFT = [
    c
    for c in _INVOICES.columns
    if c
    not in (
        "id",
        "account_id",
        "period_start",
        "period_end",
        "kind",
        "amount_paid_minor",
        "amount_credited_minor",
        "written_off_minor",
        "amount_refunded_minor",
        "created_at",
    )
]


def _write_invoices(
    period: Period,
    plans: list[PlannedInvoice],
    invoice_ids: dict[int, int],
    numbers: list[str],
    applied: dict[int, list[tuple[int, int]]],
    *,
    now: dt.datetime,
    kind: InvoiceKind,
) -> None:
    """Insert the invoices as issued (a draft of the period is issued in place). A threshold
    invoice covers the month up to its issue day and is due at once: it is charged now."""
    seller = json.dumps(seller_snapshot())
    threshold = kind == InvoiceKind.THRESHOLD
    period_end = min(period.end, now.date() + dt.timedelta(days=1)) if threshold else period.end
    rows = []
    for p, number in zip(plans, numbers, strict=True):
        credits = sum(amount for _, amount in applied.get(p.account_id, []))
        settled = p.total_minor - credits <= 0
        terms = 0 if threshold else p.profile.payment_terms_days
        rows.append(
            _InvoiceRow(
                id=invoice_ids[p.account_id],
                account_id=p.account_id,
                period_start=period.start,
                period_end=period_end,
                kind=str(kind),
                status=str(InvoiceStatus.PAID if settled else InvoiceStatus.ISSUED),
                currency=p.currency,
                number=number,
                subtotal_minor=p.subtotal_minor,
                tax_rate=p.tax.rate,
                tax_country=p.tax.country,
                tax_treatment=str(p.tax.treatment),
                tax_note=p.tax.note,
                tax_minor=p.tax_minor,
                total_minor=p.total_minor,
                credits_applied_minor=credits,
                amount_paid_minor=0,
                amount_credited_minor=0,
                written_off_minor=0,
                amount_refunded_minor=0,
                payment_terms_days=terms,
                buyer=json.dumps(p.profile.snapshot()),
                seller=seller,
                created_at=now,
                issued_at=now,
                due_at=now + dt.timedelta(days=terms),
                paid_at=now if settled else None,
                updated_at=now,
            )
        )
    source, arrays = _INVOICES.unnest(rows)
    with connection.cursor() as cursor:
        cursor.execute(
            f"""
            INSERT INTO {_INVOICES.name} ({_INVOICES.column_list})
            SELECT {_INVOICES.column_list} FROM {source}
            ON CONFLICT (account_id, period_start) WHERE kind = 'period'
                DO UPDATE SET {_INVOICES.excluded(_ISSUED_OVER_DRAFT)}
                WHERE {_INVOICES.name}.status = 'draft'
            RETURNING account_id, id
            """,  # noqa: S608 (names and types are ours; values are parameters)
            arrays,
        )
        written = dict(cursor.fetchall())
    if written != invoice_ids:  # the billing lock makes this impossible; say so if not
        raise RuntimeError("an invoice of this chunk was issued by someone else meanwhile")


def write_draft(*, period: Period, planned: PlannedInvoice, draft: Invoice | None) -> Invoice:
    """Save ``planned`` as the account's draft for ``period`` (a preview: no number, no
    ledger, nothing marked billed), replacing an earlier draft's figures and lines."""
    invoice = draft or Invoice(account_id=planned.account_id, period_start=period.start, period_end=period.end)
    invoice.currency = planned.currency
    invoice.subtotal_minor = planned.subtotal_minor
    invoice.tax_rate = planned.tax.rate
    invoice.tax_country = planned.tax.country
    invoice.tax_treatment = planned.tax.treatment
    invoice.tax_note = planned.tax.note
    invoice.tax_minor = planned.tax_minor
    invoice.total_minor = planned.total_minor
    invoice.payment_terms_days = planned.profile.payment_terms_days
    invoice.buyer = planned.profile.snapshot()
    invoice.save()
    invoice.lines.all().delete()
    _write_invoice_lines([planned], {planned.account_id: invoice.id})
    return invoice


class _LineRow(NamedTuple):
    invoice_id: int
    account_id: int
    position: int
    kind: str
    sku: str
    revenue_family: str
    usage_month: dt.date | None
    description: str
    quantity: Decimal | None
    unit: str
    unit_price: Decimal | None
    pricing: str
    rated_amount: Decimal
    amount_minor: int
    detail: str  # JSON


_LINES = BulkTable(
    "invoicing_invoiceline",
    _LineRow,
    {
        "invoice_id": "bigint",
        "account_id": "bigint",
        "position": "smallint",
        "kind": "text",
        "sku": "text",
        "revenue_family": "text",
        "usage_month": "date",
        "description": "text",
        "quantity": "numeric",
        "unit": "text",
        "unit_price": "numeric",
        "pricing": "text",
        "rated_amount": "numeric",
        "amount_minor": "bigint",
        "detail": "jsonb",
    },
)


class _BilledRow(NamedTuple):
    account_id: int
    usage_month: dt.date | None
    sku: str
    invoice_id: int
    quantity: Decimal | None
    rated_amount: Decimal
    amount_minor: int


_BILLED = BulkTable(
    "invoicing_billedusage",
    _BilledRow,
    {
        "account_id": "bigint",
        "usage_month": "date",
        "sku": "text",
        "invoice_id": "bigint",
        "quantity": "numeric",
        "rated_amount": "numeric",
        "amount_minor": "bigint",
    },
)


class _DiscountedRow(NamedTuple):
    account_id: int
    discount_id: int
    usage_month: dt.date
    invoice_id: int
    base_amount: Decimal
    amount_minor: int


_DISCOUNTED = BulkTable(
    "invoicing_discountedusage",
    _DiscountedRow,
    {
        "account_id": "bigint",
        "discount_id": "bigint",
        "usage_month": "date",
        "invoice_id": "bigint",
        "base_amount": "numeric",
        "amount_minor": "bigint",
    },
)


def _write_lines(plans: list[PlannedInvoice], invoice_ids: dict[int, int]) -> None:
    """The issued invoices' lines, and what they billed and discounted of each month's usage."""
    _write_invoice_lines(plans, invoice_ids)
    _DISCOUNTED.copy(
        _DiscountedRow(
            account_id=p.account_id,
            discount_id=line.discount_id,
            usage_month=line.usage_month,
            invoice_id=invoice_ids[p.account_id],
            base_amount=line.discount_base,
            amount_minor=line.amount_minor,
        )
        for p in plans
        for line in p.discounted
        if line.discount_id is not None and line.usage_month is not None
    )
    _BILLED.copy(
        _BilledRow(
            account_id=p.account_id,
            usage_month=line.usage_month,
            sku=line.sku,
            invoice_id=invoice_ids[p.account_id],
            quantity=line.quantity,
            rated_amount=line.rated_amount,
            amount_minor=line.amount_minor,
        )
        for p in plans
        for line in p.billed
    )


def _write_invoice_lines(plans: list[PlannedInvoice], invoice_ids: dict[int, int]) -> None:
    _LINES.copy(
        _LineRow(
            invoice_id=invoice_ids[p.account_id],
            account_id=p.account_id,
            position=position,
            kind=str(line.kind),
            sku=line.sku,
            revenue_family=line.revenue_family,
            usage_month=line.usage_month,
            description=line.description,
            quantity=line.quantity,
            unit=line.unit,
            unit_price=line.unit_price,
            pricing=line.pricing,
            rated_amount=line.rated_amount,
            amount_minor=line.amount_minor,
            detail=json.dumps(line.detail),
        )
        for p in plans
        for position, line in enumerate(p.lines, start=1)
    )


class _CreditRow(NamedTuple):
    grant_id: int
    invoice_id: int
    account_id: int
    amount_minor: int
    created_at: dt.datetime


_CREDITS = BulkTable(
    "invoicing_creditapplication",
    _CreditRow,
    {
        "grant_id": "bigint",
        "invoice_id": "bigint",
        "account_id": "bigint",
        "amount_minor": "bigint",
        "created_at": "timestamptz",
    },
)


_TRANSITIONS = state_change_table(InvoiceTransition)


def _write_audit(
    plans: list[PlannedInvoice],
    invoice_ids: dict[int, int],
    applied: dict[int, list[tuple[int, int]]],
    *,
    actor: Actor,
    now: dt.datetime,
    reason: str,
) -> None:
    _CREDITS.copy(
        _CreditRow(grant_id, invoice_ids[account_id], account_id, amount, now)
        for account_id, grants in applied.items()
        for grant_id, amount in grants
    )
    transitions = []
    for p in plans:
        invoice_id = invoice_ids[p.account_id]
        issued = StateChangeRow(
            subject_id=invoice_id,
            account_id=p.account_id,
            from_state=InvoiceStatus.DRAFT,
            to_state=InvoiceStatus.ISSUED,
            actor_kind=actor.kind,
            actor_name=actor.name,
            reason=reason,
            created_at=now,
        )
        transitions.append(issued)
        credits = sum(amount for _, amount in applied.get(p.account_id, []))
        if p.total_minor - credits <= 0:
            transitions.append(
                issued._replace(
                    from_state=InvoiceStatus.ISSUED, to_state=InvoiceStatus.PAID, reason="settled by credits"
                )
            )
    _TRANSITIONS.copy(transitions)
