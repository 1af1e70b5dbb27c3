"""What an invoice says, planned from the daily rollup (reads only).

For a calendar month ``M`` and a set of accounts: for every month from the look-back start
to ``M`` and every SKU, the rated usage now minus what issued invoices already billed
(``BilledUsage``). ``M``'s own usage becomes usage lines, earlier months' differences become
"Usage adjustment for YYYY-MM" lines; months after ``M`` are never read, so months closed in
any order bill each usage month exactly once. Then contract discounts and tax. Amounts are
rounded once per line (on the month's total) and once per invoice's tax.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from django.conf import settings

from accounts import selectors as account_selectors
from billing_site.common import money
from invoicing import taxes
from invoicing.models import BilledUsage, ContractDiscount, DiscountedUsage, LineKind
from invoicing.periods import Period, lookback_start
from metering import selectors as metering_selectors


def family_of(sku_or_prefix: str) -> str:
    """The revenue family of a SKU (``compute.vcpu`` → ``compute``)."""
    return sku_or_prefix.split(".", 1)[0] or "general"


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
    discount_id: int | None = None  # a discount line: which discount, on how much rated usage
    discount_base: Decimal = Decimal(0)

    @property
    def revenue_family(self) -> str:
        """Stored on the line when it is written: the ledger posts and checks by it."""
        return family_of(self.sku)


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

    @property
    def discounted(self) -> list[PlannedLine]:
        return [line for line in self.lines if line.discount_id is not None]


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


def plan(
    *,
    period: Period,
    account_ids: list[int],
    rates: taxes.RateTable | None = None,
    tax_point: dt.date | None = None,
) -> Plans:
    """What each account's invoice for ``period`` would say now. Reads only; accounts with
    nothing to bill are left out, accounts whose amounts cannot be represented on a document
    are left out and listed in ``unbillable``.

    An invoice bills, per SKU, its own month's rated usage and every earlier month's (from
    the look-back start) minus what issued invoices billed of it; months after the period
    are not read, so closing months in any order bills each usage month exactly once.

    The tax point is the period's last day, or ``tax_point`` (a threshold invoice: its issue
    day). A threshold invoice is this same plan made during the month: what is rated so far;
    the month's invoice, planned later, bills what was rated after it."""
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

    currencies = {account_id: profile.currency for account_id, profile in profiles.items()}
    discounts_of = _discount_deltas(period=period, first_month=first_month, currencies=currencies)

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
            deltas[key[0]].append(Delta(key[1], key[2], now_q - was_q, now_a - was_a, minor, first=key not in billed))

    tax_point = tax_point or period.end - dt.timedelta(days=1)
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
        lines = usage_lines + _discount_lines(discounts_of.get(account_id, []), period, currency)
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


@dataclass(frozen=True, slots=True)
class DiscountDelta:
    """What is left to discount of one month's usage under one discount: the rated base not
    discounted yet, and the minor units to give for it (round of the month's whole discount
    minus what was given)."""

    discount: ContractDiscount
    month: dt.date
    base: Decimal
    amount_minor: int


def _discount_deltas(
    *, period: Period, first_month: dt.date, currencies: dict[int, str]
) -> dict[int, list[DiscountDelta]]:
    """For every discount and every month from the look-back start to ``period`` that its
    days overlap: the usage of its SKUs on those days (one set-based read) minus what issued
    invoices discounted of that month (``DiscountedUsage``)."""
    account_ids = list(currencies)
    discounts = list(
        ContractDiscount.objects.filter(account_id__in=account_ids, valid_from__lt=period.end).exclude(
            valid_until__lte=first_month
        )
    )
    if not discounts:
        return {}
    windows: list[metering_selectors.AmountWindow] = []
    cells: list[tuple[ContractDiscount, dt.date]] = []
    for d in discounts:
        month = first_month
        while month <= period.start:
            end = Period(month).end
            start, stop = max(d.valid_from, month), min(d.valid_until or end, end)
            if start < stop:
                windows.append(
                    metering_selectors.AmountWindow(
                        key=len(cells),
                        account_id=d.account_id,
                        sku_prefix=d.sku_prefix,
                        start=dt.datetime.combine(start, dt.time(), tzinfo=dt.UTC),
                        end=dt.datetime.combine(stop, dt.time(), tzinfo=dt.UTC),
                    )
                )
                cells.append((d, month))
            month = end
    bases: dict[int, Decimal] = defaultdict(Decimal)
    for (key, _sku), amount in metering_selectors.window_amounts(windows).items():
        bases[key] += amount
    given: dict[tuple[int, dt.date], list[Decimal]] = defaultdict(lambda: [Decimal(0), Decimal(0)])
    for discount_id, month, base, minor in DiscountedUsage.objects.filter(
        account_id__in=account_ids, usage_month__gte=first_month, usage_month__lte=period.start
    ).values_list("discount_id", "usage_month", "base_amount", "amount_minor"):
        given[(discount_id, month)][0] += base
        given[(discount_id, month)][1] += minor
    out: dict[int, list[DiscountDelta]] = defaultdict(list)
    for key, (d, month) in enumerate(cells):
        if d.account_id not in currencies:
            continue
        base_now = bases.get(key, Decimal(0))
        base_was, minor_was = given.get((d.id, month), (Decimal(0), Decimal(0)))
        minor = money.to_minor(-(base_now * d.percent / 100), currencies[d.account_id]) - int(minor_was)
        if base_now != base_was or minor:
            out[d.account_id].append(DiscountDelta(d, month, base_now - base_was, minor))
    return out


def _discount_lines(deltas: list[DiscountDelta], period: Period, currency: str) -> list[PlannedLine]:
    """A negative line per discount and month with something left to discount: the period's
    own month first, then earlier months' late usage as adjustments."""
    lines = []
    for delta in sorted(deltas, key=lambda x: (x.month != period.start, x.month, x.discount.sku_prefix, x.discount.id)):
        d = delta.discount
        scope = f"{d.sku_prefix}*" if d.sku_prefix else "all usage"
        what = "" if delta.month == period.start else f", usage adjustment for {delta.month:%Y-%m}"
        lines.append(
            PlannedLine(
                kind=LineKind.DISCOUNT,
                sku=d.sku_prefix,
                usage_month=delta.month,
                description=f"Contract discount {d.percent.normalize():f}% on {scope} ({d.reason}){what}",
                quantity=None,
                unit="",
                unit_price=None,
                pricing="",
                rated_amount=-(delta.base * d.percent / 100),
                amount_minor=delta.amount_minor,
                discount_id=d.id,
                discount_base=delta.base,
            )
        )
    return lines
