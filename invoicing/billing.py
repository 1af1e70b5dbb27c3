"""Period close: rated usage → issued invoices, in chunks of accounts, exactly once.

For a calendar month ``M`` and a chunk of accounts, one durable transaction:

1. locks the accounts' ``BillingLock`` rows (two runs, or runs of two periods, never bill
   an account at the same time) and skips accounts whose invoice for ``M`` is already issued;
2. plans each invoice from the daily rollup: for every month from the look-back start to
   ``M`` and every SKU, the rated usage now minus what issued invoices already billed
   (``BilledUsage``): ``M``'s own usage becomes usage lines, earlier months' differences
   become "Usage adjustment for YYYY-MM" lines; then contract discounts, tax, credits;
3. writes lines, billed usage, credit applications and audit rows, then takes the numbers
   in one go from the series (``invoicing.numbering``; its row lock is held from here to the
   commit, so it is taken last), then the invoices (already issued: a draft of ``M`` is
   recomputed and issued in place) and their ledger entries: a handful of set-based
   statements (COPY and ``INSERT … SELECT FROM unnest``), no per-row round trips.

A run killed half-way loses only its open chunk; the re-run finds the committed chunks
issued and does the rest, with the same content, because it reads the same usage.
"""

from __future__ import annotations

import calendar
import datetime as dt
import json
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.db.models import F
from django.utils import timezone

from accounts import selectors as account_selectors
from billing_site.common import ids, money
from billing_site.common.actors import Actor
from billing_site.common.copy import copy_rows
from billing_site.common.errors import ApplicationError
from billing_site.common.on_commit import on_commit
from invoicing import ledger, numbering, taxes
from invoicing.models import (
    BilledUsage,
    ContractDiscount,
    CreditGrant,
    Invoice,
    InvoiceStatus,
    LineKind,
)
from metering import selectors as metering_selectors

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Period:
    """A calendar month in UTC."""

    start: dt.date

    @classmethod
    def parse(cls, text: str) -> Period:
        try:
            start = dt.datetime.strptime(text, "%Y-%m").date()
        except ValueError as exc:
            raise ApplicationError("invalid", f"'{text}' is not a month (YYYY-MM).", field="period") from exc
        return cls(start)

    @classmethod
    def containing(cls, moment: dt.datetime) -> Period:
        moment = moment.astimezone(dt.UTC)
        return cls(dt.date(moment.year, moment.month, 1))

    @property
    def end(self) -> dt.date:
        days = calendar.monthrange(self.start.year, self.start.month)[1]
        return self.start + dt.timedelta(days=days)

    @property
    def start_at(self) -> dt.datetime:
        return dt.datetime.combine(self.start, dt.time(), tzinfo=dt.UTC)

    @property
    def end_at(self) -> dt.datetime:
        return dt.datetime.combine(self.end, dt.time(), tzinfo=dt.UTC)

    @property
    def previous(self) -> Period:
        return Period.containing(self.start_at - dt.timedelta(days=1))

    @property
    def label(self) -> str:
        return f"{self.start:%Y-%m}"

    def __str__(self) -> str:
        return self.label


def lookback_start(period: Period) -> dt.date:
    """The first month whose late usage ``period``'s invoice may still pick up: events older
    than ``METERING_MAX_EVENT_AGE_DAYS`` are refused at ingestion, so none can be later."""
    earliest = period.start - dt.timedelta(days=settings.METERING_MAX_EVENT_AGE_DAYS)
    return dt.date(earliest.year, earliest.month, 1)


def family_of(sku_or_prefix: str) -> str:
    """The revenue family of a SKU (``compute.vcpu`` → ``compute``)."""
    return sku_or_prefix.split(".", 1)[0] or "general"


# --- Planning (read-only)


@dataclass(slots=True)
class PlannedLine:
    kind: str
    sku: str
    usage_month: dt.date | None
    description: str
    quantity: Decimal | None
    unit: str
    unit_price: Decimal | None
    pricing: str
    rated_amount: Decimal
    amount_minor: int
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class PlannedInvoice:
    account_id: int
    currency: str
    profile: account_selectors.BillingProfile
    lines: list[PlannedLine]
    subtotal_minor: int
    tax: taxes.TaxDecision
    tax_minor: int
    total_minor: int

    @property
    def billed(self) -> list[PlannedLine]:
        return [line for line in self.lines if line.kind in (LineKind.USAGE, LineKind.ADJUSTMENT)]


def seller_snapshot() -> dict[str, Any]:
    return {
        "name": settings.INVOICING_SELLER_NAME,
        "address": settings.INVOICING_SELLER_ADDRESS,
        "country": settings.INVOICING_SELLER_COUNTRY,
        "vat_id": settings.INVOICING_SELLER_VAT_ID,
        "registration_id": settings.INVOICING_SELLER_REGISTRATION_ID,
        "email": settings.INVOICING_SELLER_EMAIL,
        "iban": settings.INVOICING_SELLER_IBAN,
        "bic": settings.INVOICING_SELLER_BIC,
        "bank_name": settings.INVOICING_SELLER_BANK_NAME,
    }


class Plans(dict[int, PlannedInvoice]):
    """Planned invoices by account, and the accounts that cannot be billed, with the reason."""

    def __init__(self) -> None:
        super().__init__()
        self.unbillable: dict[int, str] = {}


def plan(*, period: Period, account_ids: list[int], rates: taxes.RateTable | None = None) -> Plans:
    """What each account's invoice for ``period`` would say now. Reads only; accounts with
    nothing to bill are left out, accounts whose amounts cannot be represented on a document
    are left out and listed in ``unbillable``.

    An invoice bills, per SKU, its own month's rated usage and every earlier month's (from
    the look-back start) minus what issued invoices billed of it; months after the period
    are not read, so closing months in any order bills each usage month exactly once."""
    rates = rates or taxes.RateTable()
    profiles = account_selectors.billing_profiles(account_ids=account_ids)
    first_month = lookback_start(period)
    first_at = dt.datetime.combine(first_month, dt.time(), tzinfo=dt.UTC)

    usage = metering_selectors.billing_usage(
        account_ids=account_ids, start=first_at, end=period.end_at, detail_month=period.start
    )
    rated: dict[tuple[int, dt.date, str], list[Decimal]] = {}
    for monthly in usage.monthly:
        rated[(monthly.account_id, monthly.month, monthly.sku)] = [monthly.quantity, monthly.amount]
    billed: dict[tuple[int, dt.date, str], list[Decimal]] = defaultdict(lambda: [Decimal(0), Decimal(0), Decimal(0)])
    # Only months up to the period's own: a later month, billed by its own invoice already
    # (months can be closed in any order), is never this invoice's business.
    for row in BilledUsage.objects.filter(
        account_id__in=account_ids, usage_month__gte=first_month, usage_month__lte=period.start
    ).values_list("account_id", "usage_month", "sku", "quantity", "rated_amount", "amount_minor"):
        billed[row[:3]][0] += row[3]
        billed[row[:3]][1] += row[4]
        billed[row[:3]][2] += row[5]

    discounts = list(
        ContractDiscount.objects.filter(account_id__in=account_ids, valid_from__lt=period.end).exclude(
            valid_until__lte=period.start
        )
    )
    windows = [
        metering_selectors.AmountWindow(
            key=d.id,
            account_id=d.account_id,
            sku_prefix=d.sku_prefix,
            start=dt.datetime.combine(max(d.valid_from, period.start), dt.time(), tzinfo=dt.UTC),
            end=dt.datetime.combine(min(d.valid_until or period.end, period.end), dt.time(), tzinfo=dt.UTC),
        )
        for d in discounts
    ]
    discount_bases = metering_selectors.window_amounts(windows)
    discounts_of: dict[int, list[ContractDiscount]] = defaultdict(list)
    for d in discounts:
        discounts_of[d.account_id].append(d)

    pricing: dict[str, dict[str, metering_selectors.SkuPricing]] = {}
    deltas: dict[int, list[Delta]] = defaultdict(list)
    for key in sorted(set(rated) | set(billed)):
        now_q, now_a = rated.get(key, (Decimal(0), Decimal(0)))
        was_q, was_a, was_minor = billed.get(key, (Decimal(0), Decimal(0), Decimal(0)))
        currency = profiles[key[0]].currency if key[0] in profiles else None
        if currency is None:
            continue
        # Rounded once on the month's total: what is charged now is round(total) minus what
        # was charged before, so late usage never loses or gains a cent to rounding.
        minor = money.to_minor(now_a, currency) - int(was_minor)
        if now_q != was_q or now_a != was_a or minor:
            deltas[key[0]].append(Delta(key[1], key[2], now_q - was_q, now_a - was_a, minor, first=not was_q))

    tax_point = period.end - dt.timedelta(days=1)
    plans = Plans()
    for account_id in account_ids:
        profile = profiles.get(account_id)
        if profile is None or not (deltas.get(account_id) or settings.INVOICING_ISSUE_EMPTY):
            continue
        currency = profile.currency
        if currency not in pricing:
            pricing[currency] = metering_selectors.sku_pricing(
                currency=currency, start=period.start_at, end=period.end_at
            )
        usage_lines = _usage_lines(period, account_id, deltas.get(account_id, []), pricing[currency], usage)
        lines = usage_lines + _discount_lines(
            discounts_of.get(account_id, []), discount_bases, usage_lines, period, currency
        )
        if not lines and not settings.INVOICING_ISSUE_EMPTY:
            continue
        subtotal = sum(line.amount_minor for line in lines)
        if subtotal < 0:
            # Late usage rated lower than billed (a late stop, say) and nothing to set it off:
            # no negative invoice. The difference stays unbilled and is set off against the
            # account's next invoice; finance can issue a credit note meanwhile.
            continue
        decision = taxes.decide(
            taxes.Buyer(country=profile.country, kind=profile.kind, tax_id=profile.tax_id),
            tax_point=tax_point,
            rates=rates,
        )
        tax = money.percent_of_minor(subtotal, decision.rate)
        if not money.within_document_limit(subtotal, tax, subtotal + tax, *(line.amount_minor for line in lines)):
            # Usage that rates beyond any representable invoice (a runaway producer, a unit
            # mix-up): not billed, reported, and it does not stop the rest of the run.
            plans.unbillable[account_id] = (
                f"amounts beyond the document limit ({money.DOCUMENT_LIMIT_MINOR} minor units): "
                f"subtotal {subtotal} {currency}"
            )
            continue
        plans[account_id] = PlannedInvoice(
            account_id=account_id,
            currency=currency,
            profile=profile,
            lines=lines,
            subtotal_minor=subtotal,
            tax=decision,
            tax_minor=tax,
            total_minor=subtotal + tax,
        )
    return plans


@dataclass(frozen=True, slots=True)
class Delta:
    """A month's rated usage of a SKU not billed yet: quantity and full-precision amount, and
    the minor units to charge for it (round of the month's total minus what was charged)."""

    month: dt.date
    sku: str
    quantity: Decimal
    amount: Decimal
    amount_minor: int
    first: bool  # nothing of this month and SKU was billed before: the delta is all of it


def _usage_lines(
    period: Period,
    account_id: int,
    deltas: list[Delta],
    pricing: dict[str, metering_selectors.SkuPricing],
    usage: metering_selectors.BillingUsage,
) -> list[PlannedLine]:
    current, adjustments = [], []
    for delta in deltas:
        month, sku, quantity, amount, amount_minor = (
            delta.month,
            delta.sku,
            delta.quantity,
            delta.amount,
            delta.amount_minor,
        )
        how = pricing.get(sku) or metering_selectors.SkuPricing(sku, "", "varied", None)
        if month == period.start:
            line = PlannedLine(
                kind=LineKind.USAGE,
                sku=sku,
                usage_month=month,
                description=how.name,
                quantity=quantity,
                unit=how.unit,
                unit_price=how.unit_price,
                pricing=how.pricing,
                rated_amount=amount,
                amount_minor=amount_minor,
                # The split by resource and project describes the whole month: shown only when
                # the line bills the whole month (a later month's invoice, closed first, may
                # have billed part of it already).
                detail=_line_detail(
                    usage.by_resource.get((account_id, sku), []), usage.by_project.get((account_id, sku), [])
                )
                if delta.first
                else {},
            )
            current.append(line)
        else:
            adjustments.append(
                PlannedLine(
                    kind=LineKind.ADJUSTMENT,
                    sku=sku,
                    usage_month=month,
                    description=f"Usage adjustment for {month:%Y-%m}: {how.name}",
                    quantity=quantity,
                    unit=how.unit,
                    unit_price=None,
                    pricing="",
                    rated_amount=amount,
                    amount_minor=amount_minor,
                )
            )
    current.sort(key=lambda line: line.sku)
    adjustments.sort(key=lambda line: (line.usage_month or period.start, line.sku))
    return current + adjustments


def _line_detail(
    resources: list[tuple[str, Decimal, Decimal]], projects: list[tuple[str | None, Decimal, Decimal]]
) -> dict[str, Any]:
    """What is behind a line: its usage by resource and by ``project`` label (when any usage
    carries one), as ``[key, quantity, rated amount]`` at full precision.
    ``line_display.detail_view`` shows them, splitting the line's rounded amount over them."""
    result: dict[str, Any] = {
        "resources": [[key or "(no resource)", str(q), str(a)] for key, q, a in sorted(resources)]
    }
    if any(key for key, _, _ in projects):
        ordered = sorted(projects, key=lambda row: (row[0] is None, row[0] or ""))  # "(no project)" last
        result["projects"] = [[key or "(no project)", str(q), str(a)] for key, q, a in ordered]
    return result


def _discount_lines(
    discounts: list[ContractDiscount],
    bases: dict[tuple[int, str], Decimal],
    usage_lines: list[PlannedLine],
    period: Period,
    currency: str,
) -> list[PlannedLine]:
    """A negative line per discount: on the period's own usage in the discount's days, and on
    late-usage adjustments of an earlier month the discount covered whole."""
    lines = []
    for d in sorted(discounts, key=lambda d: (d.sku_prefix, d.id)):
        scope = f"{d.sku_prefix}*" if d.sku_prefix else "all usage"
        covers_period = d.valid_from <= period.start and (d.valid_until is None or d.valid_until >= period.end)
        if covers_period:
            # On what this invoice bills of the month: a later month's invoice, closed first,
            # may have billed (and discounted) part of it already.
            base = sum(
                (
                    line.rated_amount
                    for line in usage_lines
                    if line.kind == LineKind.USAGE and line.sku.startswith(d.sku_prefix)
                ),
                Decimal(0),
            )
        else:  # on the usage of the discount's days in the period
            base = sum((amount for (key, _), amount in bases.items() if key == d.id), Decimal(0))
        by_month: dict[dt.date, Decimal] = defaultdict(Decimal)
        for line in usage_lines:
            month = line.usage_month
            if line.kind != LineKind.ADJUSTMENT or month is None or not line.sku.startswith(d.sku_prefix):
                continue
            month_end = Period(month).end
            if d.valid_from <= month and (d.valid_until is None or d.valid_until >= month_end):
                by_month[month] += line.rated_amount
        for month, amount in [(None, base), *sorted(by_month.items())]:
            if amount == 0:
                continue
            rated = -(amount * d.percent / 100)
            what = "" if month is None else f", usage adjustment for {month:%Y-%m}"
            lines.append(
                PlannedLine(
                    kind=LineKind.DISCOUNT,
                    sku=d.sku_prefix,
                    usage_month=month,
                    description=f"Contract discount {d.percent.normalize():f}% on {scope} ({d.reason}){what}",
                    quantity=None,
                    unit="",
                    unit_price=None,
                    pricing="",
                    rated_amount=rated,
                    amount_minor=money.to_minor(rated, currency),
                )
            )
    return lines


# --- Writing (one durable transaction per chunk)


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
def close_chunk(*, period: Period, account_ids: list[int], actor: Actor, render_pdfs: bool = True) -> ChunkResult:
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
            account_id__in=account_ids, period_start=period.start
        ).values_list("account_id", "id", "status")
    }
    drafts = {a: invoice_id for a, (invoice_id, status) in existing.items() if status == InvoiceStatus.DRAFT}
    todo = [a for a in account_ids if a not in existing or a in drafts]
    result.already_issued = len(account_ids) - len(todo)
    plans = plan(period=period, account_ids=todo)
    result.unbillable = plans.unbillable
    result.nothing_to_bill = len(todo) - len(plans) - len(plans.unbillable)
    if not plans:
        return result
    ordered = [plans[a] for a in sorted(plans)]
    # A draft is issued in place (it keeps its id); the others get new ids now, so that the
    # rows pointing at them go in first (their foreign keys are checked at commit) and the
    # series' number lock is taken as late as possible and held only to the commit.
    invoice_ids = {p.account_id: drafts.get(p.account_id) or ids.new_id() for p in ordered}
    applied = _apply_credits(ordered, now=now)
    if drafts:
        with connection.cursor() as cursor:
            cursor.execute("DELETE FROM invoicing_invoiceline WHERE invoice_id = ANY(%s)", [list(drafts.values())])
    _write_lines(ordered, invoice_ids)
    _write_audit(ordered, invoice_ids, applied, actor=actor, now=now)
    invoice_numbers = numbering.take(settings.INVOICING_INVOICE_SERIES, now.year, len(ordered))
    # Issued now, under the series lock: numbers and issue times rise together across workers.
    now = timezone.now()
    _write_invoices(period, ordered, invoice_ids, invoice_numbers, applied, now=now)
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
    result.issued = [invoice_ids[p.account_id] for p in ordered]
    for p in ordered:
        result.totals_minor[p.currency] = result.totals_minor.get(p.currency, 0) + p.total_minor
    if render_pdfs:
        from invoicing import tasks

        on_commit(tasks.render_documents.delay, kind="invoice", source_ids=result.issued)
    return result


def _revenue_by_family(p: PlannedInvoice) -> dict[str, int]:
    families: dict[str, int] = defaultdict(int)
    for line in p.lines:
        families[family_of(line.sku)] += line.amount_minor
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


_INVOICE_COLUMNS = (
    "id, account_id, period_start, period_end, status, currency, number, subtotal_minor, tax_rate, tax_country, "
    "tax_treatment, tax_note, tax_minor, total_minor, credits_applied_minor, amount_paid_minor, "
    "amount_credited_minor, written_off_minor, payment_terms_days, buyer, seller, created_at, issued_at, due_at, "
    "paid_at, updated_at"
)


def _write_invoices(
    period: Period,
    plans: list[PlannedInvoice],
    invoice_ids: dict[int, int],
    numbers: list[str],
    applied: dict[int, list[tuple[int, int]]],
    *,
    now: dt.datetime,
) -> None:
    """Insert the invoices as issued (a draft of the period is issued in place)."""
    seller = json.dumps(seller_snapshot())
    rows = []
    for p, number in zip(plans, numbers, strict=True):
        credits = sum(amount for _, amount in applied.get(p.account_id, []))
        settled = p.total_minor - credits <= 0
        rows.append(
            (
                invoice_ids[p.account_id],
                p.account_id,
                number,
                InvoiceStatus.PAID if settled else InvoiceStatus.ISSUED,
                p.currency,
                p.subtotal_minor,
                p.tax.rate,
                p.tax.country,
                p.tax.treatment,
                p.tax.note,
                p.tax_minor,
                p.total_minor,
                credits,
                p.profile.payment_terms_days,
                json.dumps(p.profile.snapshot()),
                now + dt.timedelta(days=p.profile.payment_terms_days),
                now if settled else None,
            )
        )
    columns = list(zip(*rows, strict=True))
    with connection.cursor() as cursor:
        cursor.execute(
            f"""
            INSERT INTO invoicing_invoice ({_INVOICE_COLUMNS})
            SELECT r.id, r.account_id, %(start)s, %(end)s, r.status, r.currency, r.number, r.subtotal, r.tax_rate,
                   r.tax_country, r.tax_treatment, r.tax_note, r.tax, r.total, r.credits, 0, 0, 0, r.terms,
                   r.buyer, %(seller)s::jsonb, %(now)s, %(now)s, r.due_at, r.paid_at, %(now)s
            FROM unnest(%(id)s::bigint[], %(account)s::bigint[], %(number)s::text[], %(status)s::text[],
                        %(currency)s::text[], %(subtotal)s::bigint[], %(tax_rate)s::numeric[],
                        %(tax_country)s::text[], %(tax_treatment)s::text[], %(tax_note)s::text[],
                        %(tax)s::bigint[], %(total)s::bigint[], %(credits)s::bigint[], %(terms)s::int[],
                        %(buyer)s::jsonb[], %(due_at)s::timestamptz[], %(paid_at)s::timestamptz[])
                 AS r(id, account_id, number, status, currency, subtotal, tax_rate, tax_country, tax_treatment,
                      tax_note, tax, total, credits, terms, buyer, due_at, paid_at)
            ON CONFLICT (account_id, period_start) DO UPDATE SET
                status = EXCLUDED.status, number = EXCLUDED.number, currency = EXCLUDED.currency,
                subtotal_minor = EXCLUDED.subtotal_minor, tax_rate = EXCLUDED.tax_rate,
                tax_country = EXCLUDED.tax_country, tax_treatment = EXCLUDED.tax_treatment,
                tax_note = EXCLUDED.tax_note, tax_minor = EXCLUDED.tax_minor, total_minor = EXCLUDED.total_minor,
                credits_applied_minor = EXCLUDED.credits_applied_minor,
                payment_terms_days = EXCLUDED.payment_terms_days, buyer = EXCLUDED.buyer,
                seller = EXCLUDED.seller, issued_at = EXCLUDED.issued_at, due_at = EXCLUDED.due_at,
                paid_at = EXCLUDED.paid_at, updated_at = EXCLUDED.updated_at
                WHERE invoicing_invoice.status = 'draft'
            RETURNING account_id, id
            """,  # noqa: S608 (column list is ours)
            {
                "start": period.start,
                "end": period.end,
                "seller": seller,
                "now": now,
                "id": list(columns[0]),
                "account": list(columns[1]),
                "number": list(columns[2]),
                "status": [str(s) for s in columns[3]],
                "currency": list(columns[4]),
                "subtotal": list(columns[5]),
                "tax_rate": list(columns[6]),
                "tax_country": list(columns[7]),
                "tax_treatment": [str(t) for t in columns[8]],
                "tax_note": list(columns[9]),
                "tax": list(columns[10]),
                "total": list(columns[11]),
                "credits": list(columns[12]),
                "terms": list(columns[13]),
                "buyer": list(columns[14]),
                "due_at": list(columns[15]),
                "paid_at": list(columns[16]),
            },
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


def _write_lines(plans: list[PlannedInvoice], invoice_ids: dict[int, int]) -> None:
    """The issued invoices' lines, and what they billed of each month's usage."""
    _write_invoice_lines(plans, invoice_ids)
    copy_rows(
        "invoicing_billedusage",
        ("account_id", "usage_month", "sku", "invoice_id", "quantity", "rated_amount", "amount_minor"),
        (
            (
                p.account_id,
                line.usage_month,
                line.sku,
                invoice_ids[p.account_id],
                line.quantity,
                line.rated_amount,
                line.amount_minor,
            )
            for p in plans
            for line in p.billed
        ),
    )


def _write_invoice_lines(plans: list[PlannedInvoice], invoice_ids: dict[int, int]) -> None:
    copy_rows(
        "invoicing_invoiceline",
        (
            "invoice_id",
            "account_id",
            "position",
            "kind",
            "sku",
            "usage_month",
            "description",
            "quantity",
            "unit",
            "unit_price",
            "pricing",
            "rated_amount",
            "amount_minor",
            "detail",
        ),
        (
            (
                invoice_ids[p.account_id],
                p.account_id,
                position,
                str(line.kind),
                line.sku,
                line.usage_month,
                line.description,
                line.quantity,
                line.unit,
                line.unit_price,
                line.pricing,
                line.rated_amount,
                line.amount_minor,
                json.dumps(line.detail),
            )
            for p in plans
            for position, line in enumerate(p.lines, start=1)
        ),
    )


def _write_audit(
    plans: list[PlannedInvoice],
    invoice_ids: dict[int, int],
    applied: dict[int, list[tuple[int, int]]],
    *,
    actor: Actor,
    now: dt.datetime,
) -> None:
    copy_rows(
        "invoicing_creditapplication",
        ("grant_id", "invoice_id", "account_id", "amount_minor", "created_at"),
        (
            (grant_id, invoice_ids[account_id], account_id, amount, now)
            for account_id, grants in applied.items()
            for grant_id, amount in grants
        ),
    )
    transitions = []
    for p in plans:
        invoice_id = invoice_ids[p.account_id]
        transitions.append((invoice_id, p.account_id, "draft", "issued", actor.kind, actor.name, "period close", now))
        credits = sum(amount for _, amount in applied.get(p.account_id, []))
        if p.total_minor - credits <= 0:
            transitions.append(
                (invoice_id, p.account_id, "issued", "paid", actor.kind, actor.name, "settled by credits", now)
            )
    copy_rows(
        "invoicing_invoicetransition",
        ("invoice_id", "account_id", "from_state", "to_state", "actor_kind", "actor_name", "reason", "created_at"),
        transitions,
    )
