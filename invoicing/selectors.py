"""Reads of the invoicing app shared by the API, the admin and other apps."""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import Any

from django.db import connection, transaction
from django.db.models import Case, CharField, Count, F, Min, Q, QuerySet, Sum, Value, When
from django.db.models.functions import Greatest
from django.utils import timezone

from billing_site.common import money
from invoicing import planning
from invoicing.models import (
    ApprovalRequest,
    ContractDiscount,
    CreditGrant,
    CreditNote,
    Invoice,
    InvoiceKind,
    InvoicePayment,
    InvoiceRefund,
    InvoiceStatus,
    LedgerEntry,
    LedgerSource,
    RefundMethod,
)
from invoicing.periods import Period, lookback_start

CUSTOMER_VISIBLE = (InvoiceStatus.ISSUED, InvoiceStatus.PAID, InvoiceStatus.UNCOLLECTIBLE, InvoiceStatus.VOID)


def invoice_list_for_account(*, account_id: int) -> QuerySet[Invoice]:
    """The account's invoices as its members see them: issued ones (drafts are finance's
    previews), newest first, lines prefetched."""
    return (
        Invoice.objects.filter(account_id=account_id, status__in=CUSTOMER_VISIBLE)
        .prefetch_related("lines")
        .order_by("-created_at")
    )


def invoice_get_for_account(*, account_id: int, invoice_id: int) -> Invoice | None:
    return invoice_list_for_account(account_id=account_id).filter(id=invoice_id).first()


def credit_note_list_for_account(*, account_id: int) -> QuerySet[CreditNote]:
    return (
        CreditNote.objects.filter(account_id=account_id)
        .select_related("invoice")
        .prefetch_related("lines")
        .order_by("-issued_at")
    )


def balance(*, account_id: int) -> dict[str, dict[str, int]]:
    """Per currency: spendable credit (unexpired grants' remainder) and amount outstanding
    on issued invoices, in minor units."""
    now = timezone.now()
    result: dict[str, dict[str, int]] = defaultdict(lambda: {"credits_available": 0, "outstanding": 0})
    for currency, remaining in (
        CreditGrant.objects.filter(account_id=account_id, remaining_minor__gt=0)
        .filter(Q(expires_at__isnull=True) | Q(expires_at__gt=now))
        .values_list("currency")
        .annotate(Sum("remaining_minor"))
    ):
        result[currency]["credits_available"] += remaining
    for invoice in Invoice.objects.filter(account_id=account_id, status=InvoiceStatus.ISSUED):
        result[invoice.currency]["outstanding"] += invoice.amount_outstanding_minor
    return dict(result)


def account_outstanding(*, account_id: int) -> dict[str, int]:
    """What the account still owes, per currency, in minor units: the outstanding amount of
    its issued invoices (paid, credited, written-off and voided ones owe nothing). Only
    currencies with something owed. The accounts app reads it as a "debt reader" (setting
    ``ACCOUNTS_DEBT_READERS``) before closing or reactivating an account."""
    rows = (
        Invoice.objects.filter(account_id=account_id, status=InvoiceStatus.ISSUED)
        .annotate(owed=_OUTSTANDING)
        .values("currency")
        .annotate(total=Sum("owed"))
        .values_list("currency", "total")
    )
    return {currency: int(total) for currency, total in sorted(rows) if total and total > 0}


def ledger_entries_for_invoice(*, invoice_id: int) -> QuerySet[LedgerEntry]:
    """Entries whose source is the invoice or a document about it (its credit notes,
    payments, refunds, and the overpayment grants its payments and settlements wrote)."""
    note_ids = list(CreditNote.objects.filter(invoice_id=invoice_id).values_list("id", flat=True))
    payments = list(InvoicePayment.objects.filter(invoice_id=invoice_id).values_list("id", "credit_grant_id"))
    refunds = list(InvoiceRefund.objects.filter(invoice_id=invoice_id).values_list("id", "method", "grant_id"))
    grant_ids = [g for _, g in payments if g] + [g for _, _, g in refunds if g]
    return (
        LedgerEntry.objects.filter(
            Q(
                source_type__in=[LedgerSource.INVOICE, LedgerSource.INVOICE_CREDIT, LedgerSource.WRITE_OFF],
                source_id=invoice_id,
            )
            | Q(source_type__in=[LedgerSource.CREDIT_NOTE, LedgerSource.CREDIT_REVERSAL], source_id__in=note_ids)
            | Q(source_type=LedgerSource.PAYMENT, source_id__in=[p for p, _ in payments])
            | Q(source_type=LedgerSource.REFUND, source_id__in=[r for r, _, _ in refunds])
            | Q(source_type=LedgerSource.CREDIT_GRANT, source_id__in=grant_ids)
        )
        .prefetch_related("lines")
        .order_by("posted_at", "id")
    )


# --- For the payments app: frozen values, never models


@dataclass(frozen=True, slots=True)
class PayableInvoice:
    """An issued (or later) invoice as the payments app sees it; money in minor units."""

    invoice_id: int
    account_id: int
    number: str
    currency: str
    status: str  # InvoiceStatus value: issued, paid, uncollectible, void
    kind: str  # InvoiceKind value: period, or threshold (an early invoice at the credit limit)
    total_minor: int
    amount_due_minor: int  # the total less credits applied
    outstanding_minor: int  # still owed (never below 0)
    due_at: dt.datetime | None
    issued_at: dt.datetime | None
    paid: bool  # status ``paid``: nothing is owed


_DUE = Greatest(F("total_minor") - F("credits_applied_minor"), Value(0))
# ``Invoice.amount_outstanding_minor``, in SQL.
_OUTSTANDING = Greatest(
    _DUE - F("amount_paid_minor") - F("amount_credited_minor") - F("written_off_minor") + F("amount_refunded_minor"),
    Value(0),
)
_PAYABLE_FIELDS = (
    "id",
    "account_id",
    "number",
    "currency",
    "status",
    "kind",
    "total_minor",
    "due",
    "outstanding",
    "due_at",
    "issued_at",
)


def _payable(queryset: QuerySet[Invoice]) -> list[PayableInvoice]:
    """One query, whatever the number of invoices."""
    rows = queryset.annotate(due=_DUE, outstanding=_OUTSTANDING).values_list(*_PAYABLE_FIELDS)
    return [
        PayableInvoice(
            invoice_id=invoice_id,
            account_id=account_id,
            number=number or "",
            currency=currency,
            status=status,
            kind=kind,
            total_minor=total,
            amount_due_minor=due,
            outstanding_minor=outstanding,
            due_at=due_at,
            issued_at=issued_at,
            paid=status == InvoiceStatus.PAID,
        )
        for invoice_id, account_id, number, currency, status, kind, total, due, outstanding, due_at, issued_at in rows
    ]


def payable_invoice(*, invoice_id: int, account_id: int | None = None) -> PayableInvoice | None:
    """The invoice in any state after issue (None: no such invoice, a draft, or, with
    ``account_id``, another account's)."""
    queryset = Invoice.objects.filter(id=invoice_id).exclude(status=InvoiceStatus.DRAFT)
    if account_id is not None:
        queryset = queryset.filter(account_id=account_id)
    found = _payable(queryset)
    return found[0] if found else None


def payable_invoices(
    *, account_id: int | None = None, invoice_ids: Iterable[int] | None = None
) -> list[PayableInvoice]:
    """Issued invoices with something outstanding (of the account, or among ``invoice_ids``;
    both: both), oldest due first."""
    queryset = Invoice.objects.filter(status=InvoiceStatus.ISSUED)
    if account_id is not None:
        queryset = queryset.filter(account_id=account_id)
    if invoice_ids is not None:
        queryset = queryset.filter(id__in=list(invoice_ids))
    return _payable(queryset.alias(owed=_OUTSTANDING).filter(owed__gt=0).order_by("due_at", "id"))


def overdue_invoices(*, due_before: dt.datetime, account_ids: Iterable[int] | None = None) -> list[PayableInvoice]:
    """Issued invoices with something outstanding, due before ``due_before`` (of these
    accounts), oldest due first."""
    queryset = Invoice.objects.filter(status=InvoiceStatus.ISSUED, due_at__lt=due_before)
    if account_ids is not None:
        queryset = queryset.filter(account_id__in=list(account_ids))
    return _payable(queryset.alias(owed=_OUTSTANDING).filter(owed__gt=0).order_by("due_at", "id"))


@dataclass(frozen=True, slots=True)
class InvoicePaidAmount:
    invoice_id: int
    currency: str
    paid_minor: int  # applied to the invoice by payments
    refunded_minor: int  # given back: to the card or as customer credit
    refundable_minor: int  # what ``services.refund_record`` still accepts: paid less refunded


def invoice_paid_amount(invoice_id: int) -> InvoicePaidAmount | None:
    """What was paid on the invoice and how much of it can still be refunded (None: no such invoice)."""
    row = Invoice.objects.filter(id=invoice_id).values_list("currency", "amount_paid_minor", "amount_refunded_minor")
    found = row.first()
    if found is None:
        return None
    currency, paid, refunded = found
    return InvoicePaidAmount(
        invoice_id=invoice_id,
        currency=currency,
        paid_minor=paid,
        refunded_minor=refunded,
        refundable_minor=max(0, paid - refunded),
    )


def threshold_invoices(*, account_id: int) -> list[PayableInvoice]:
    """The account's threshold invoices (issued early at its credit limit), oldest first."""
    return _payable(
        Invoice.objects.filter(account_id=account_id, kind=InvoiceKind.THRESHOLD)
        .exclude(status=InvoiceStatus.DRAFT)
        .order_by("issued_at", "id")
    )


def invoice_numbers(ids: Iterable[int]) -> dict[int, str]:
    """Invoice id → number, for display (drafts have none and are left out)."""
    return dict(
        Invoice.objects.filter(id__in=list(ids), number__isnull=False).values_list("id", "number")  # type: ignore[arg-type]
    )


def invoice_statuses(ids: Iterable[int]) -> dict[int, str]:
    """Invoice id → status (``InvoiceStatus`` value), one query."""
    return dict(Invoice.objects.filter(id__in=list(ids)).values_list("id", "status"))


def invoices_paid_on_time(*, account_ids: Iterable[int] | None = None) -> dict[int, int]:
    """Per account, how many of its invoices were paid by their due date (one statement)."""
    queryset = Invoice.objects.filter(status=InvoiceStatus.PAID, paid_at__isnull=False, paid_at__lte=F("due_at"))
    if account_ids is not None:
        queryset = queryset.filter(account_id__in=list(account_ids))
    return dict(queryset.values_list("account_id").annotate(n=Count("id")).values_list("account_id", "n"))


# --- Credit limits: what an account owes and will owe, against its limit


@dataclass(frozen=True, slots=True)
class CreditExposure:
    """An active account's exposure against its credit limit, in its currency: rated usage
    not invoiced yet less the contract discounts on it (full precision, before tax: what a
    threshold invoice would bill now) plus what its issued invoices still owe."""

    account_id: int
    currency: str
    credit_limit: Decimal
    unbilled: Decimal
    unpaid: Decimal
    threshold_open: bool  # a threshold invoice still owes money: its charge is under way or failed

    @property
    def exposure(self) -> Decimal:
        return self.unbilled + self.unpaid


def credit_exposures(
    *, as_of: dt.datetime | None = None, account_ids: Iterable[int] | None = None, over_limit_only: bool = True
) -> list[CreditExposure]:
    """Active accounts with a credit limit (0: none set) whose unbilled usage plus unpaid
    invoices exceed it (``over_limit_only``), one set-based statement over every such
    account: each account's monthly spend (``metering_monthlyspend``, one row per account and
    month, moved by the rollup) from the look-back start less what invoices billed of those
    months (``BilledUsage``), in one hash aggregate, and the outstanding amounts of its issued
    invoices. It reads the accounts' limits and the metering totals by table, not through
    their apps' selectors: one statement over 100,000 accounts (~1.3 s, ``make bench``)
    instead of three reads joined in Python."""
    now = as_of or timezone.now()
    period = Period.containing(now)
    codes = money.exponents()
    chosen = sorted(set(account_ids)) if account_ids is not None else None
    only = "AND account_id = ANY(%(ids)s)" if chosen is not None else ""
    with transaction.atomic(), connection.cursor() as cursor:
        if chosen is None:
            # Every account: hash aggregates and hash joins over whole tables, in memory. A
            # stale estimate (limits just set in bulk, say) must not turn them into nested
            # loops over 100,000 accounts; JIT costs more than it saves here.
            cursor.execute("SET LOCAL enable_nestloop = off; SET LOCAL work_mem = '64MB'; SET LOCAL jit = off")
        cursor.execute(
            f"""
            WITH unbilled AS (
                SELECT account_id, sum(amount) AS amount FROM (
                    SELECT account_id, amount FROM metering_monthlyspend
                    WHERE month >= %(first)s AND month <= %(month)s {only}
                    UNION ALL
                    SELECT account_id, -rated_amount FROM invoicing_billedusage
                    WHERE usage_month >= %(first)s AND usage_month <= %(month)s {only}
                ) u
                GROUP BY 1
            ), owed AS (
                SELECT account_id, kind,
                       greatest(greatest(total_minor - credits_applied_minor, 0) - amount_paid_minor
                                - amount_credited_minor - written_off_minor + amount_refunded_minor, 0) AS minor
                FROM invoicing_invoice WHERE status = 'issued' {only}
            ), unpaid AS (
                SELECT account_id, sum(minor) AS minor, bool_or(kind = %(threshold)s AND minor > 0) AS threshold_open
                FROM owed GROUP BY 1
            ), places AS (
                SELECT * FROM unnest(%(codes)s::text[], %(places)s::int[]) AS p(currency, places)
            ), exposure AS (
                SELECT a.id, a.currency, a.credit_limit, coalesce(u.amount, 0) AS unbilled,
                       coalesce(p.minor, 0) / (10::numeric ^ coalesce(x.places, 2)) AS unpaid,
                       coalesce(p.threshold_open, false) AS threshold_open
                FROM accounts_billingaccount a
                LEFT JOIN unbilled u ON u.account_id = a.id
                LEFT JOIN unpaid p ON p.account_id = a.id
                LEFT JOIN places x ON x.currency = a.currency
                WHERE a.state = 'active' AND a.credit_limit > 0 {only.replace("account_id", "a.id")}
            )
            SELECT id, currency, credit_limit, unbilled, unpaid, threshold_open FROM exposure
            {"WHERE unbilled + unpaid > credit_limit" if over_limit_only else ""}
            ORDER BY id
            """,  # noqa: S608 (the optional clauses are ours; values are parameters)
            {
                "ids": chosen,
                "first": lookback_start(period),
                "month": period.start,
                "threshold": InvoiceKind.THRESHOLD.value,
                "codes": list(codes),
                "places": list(codes.values()),
            },
        )
        rows = cursor.fetchall()
    exposures = [
        CreditExposure(
            account_id=account_id,
            currency=currency,
            credit_limit=limit,
            unbilled=unbilled,
            unpaid=money.from_minor(money.to_minor(unpaid, currency), currency),
            threshold_open=threshold_open,
        )
        for account_id, currency, limit, unbilled, unpaid, threshold_open in rows
    ]
    discounted = _discounted_unbilled(
        period=period, as_of=now, account_ids=[e.account_id for e in exposures if e.unbilled > 0]
    )
    if discounted:
        exposures = [
            replace(e, unbilled=discounted[e.account_id]) if e.account_id in discounted else e for e in exposures
        ]
        if over_limit_only:
            exposures = [e for e in exposures if e.exposure > e.credit_limit]
    return exposures


def _discounted_unbilled(*, period: Period, as_of: dt.datetime, account_ids: list[int]) -> dict[int, Decimal]:
    """For those of the accounts with a contract discount in the look-back window: their
    unbilled usage less the discounts on it, as the threshold invoice would bill it now (the
    same plan, full precision; nothing to bill: 0). The set-based read above is undiscounted,
    an upper bound, so only these few accounts are planned."""
    if not account_ids:
        return {}
    with_discounts = sorted(
        set(
            ContractDiscount.objects.filter(account_id__in=account_ids, valid_from__lt=period.end)
            .exclude(valid_until__lte=lookback_start(period))
            .values_list("account_id", flat=True)
        )
    )
    if not with_discounts:
        return {}
    plans = planning.plan(period=period, account_ids=with_discounts, tax_point=as_of.date())
    result = {}
    for account_id in with_discounts:
        if account_id in plans.unbillable:  # beyond any document: left as the set-based read says
            continue
        planned = plans.get(account_id)
        owed = sum((line.rated_amount for line in planned.lines), Decimal(0)) if planned is not None else Decimal(0)
        result[account_id] = max(owed, Decimal(0))
    return result


# --- Finance's money views: receivables ageing and revenue (set-based, one statement each)

# The ageing buckets: (key, label, fewest days past due, most days past due or None). Days past
# due = today (UTC) minus the invoice's due date (UTC); not yet due or due today: ``current``.
AGEING_BUCKETS: tuple[tuple[str, str, int | None, int | None], ...] = (
    ("current", "Current", None, 0),
    ("1_30", "1-30 days", 1, 30),
    ("31_60", "31-60 days", 31, 60),
    ("61_90", "61-90 days", 61, 90),
    ("90_plus", "90+ days", 91, None),
)
AGEING_BUCKET_KEYS = tuple(key for key, _label, _low, _high in AGEING_BUCKETS)


@dataclass(frozen=True, slots=True)
class AgeingCell:
    """What one currency's bucket holds: the amount still owed, on how many invoices of how many accounts."""

    amount_minor: int = 0
    invoices: int = 0
    accounts: int = 0


@dataclass(frozen=True, slots=True)
class CurrencyAgeing:
    currency: str
    buckets: dict[str, AgeingCell]  # by ``AGEING_BUCKET_KEYS``, every key present

    @property
    def total(self) -> AgeingCell:
        cells = self.buckets.values()
        return AgeingCell(
            amount_minor=sum(c.amount_minor for c in cells),
            invoices=sum(c.invoices for c in cells),
            accounts=0,  # an account may be in several buckets: counted per bucket only
        )


def _today_start(as_of: dt.datetime | None) -> dt.datetime:
    now = as_of or timezone.now()
    return dt.datetime.combine(now.astimezone(dt.UTC).date(), dt.time(0), tzinfo=dt.UTC)


def _bucket_window(key: str, today: dt.datetime) -> Q:
    """The due dates (as ``due_at`` bounds) of a bucket: past due by ``low``..``high`` days."""
    for bucket, _label, low, high in AGEING_BUCKETS:
        if bucket != key:
            continue
        window = Q()
        if high is not None:  # due on or after the day ``high`` days ago
            window &= Q(due_at__gte=today - dt.timedelta(days=high))
        if low is not None:  # due before the day ``low - 1`` days ago
            window &= Q(due_at__lt=today - dt.timedelta(days=low - 1))
        if key == "current":  # no due date: nothing is late yet
            window |= Q(due_at__isnull=True)
        return window
    raise ValueError(f"{key!r} is not an ageing bucket ({', '.join(AGEING_BUCKET_KEYS)})")


def _receivable() -> QuerySet[Invoice]:
    """Issued invoices with something still owed (``Invoice.amount_outstanding_minor`` in SQL:
    net of credits applied, payments, credit notes, write-offs and refunds), with it as ``owed``.
    Paid, written-off and void invoices owe nothing."""
    return Invoice.objects.filter(status=InvoiceStatus.ISSUED).annotate(owed=_OUTSTANDING).filter(owed__gt=0)


def receivables_ageing(*, as_of: dt.datetime | None = None) -> list[CurrencyAgeing]:
    """Receivables by currency and ageing bucket (``AGEING_BUCKETS``), as of ``as_of`` (now):
    one grouped statement over the issued invoices (the partial index
    ``invoicing_invoice_receivable`` covers it), currencies in alphabetical order."""
    today = _today_start(as_of)
    bucket = Case(
        *(When(_bucket_window(key, today), then=Value(key)) for key in AGEING_BUCKET_KEYS),
        output_field=CharField(),
    )
    rows = (
        _receivable()
        .annotate(bucket=bucket)
        .order_by()
        .values("currency", "bucket")
        .annotate(amount=Sum("owed"), invoices=Count("*"), accounts=Count("account_id", distinct=True))
        .values_list("currency", "bucket", "amount", "invoices", "accounts")
    )
    found: dict[str, dict[str, AgeingCell]] = defaultdict(lambda: {key: AgeingCell() for key in AGEING_BUCKET_KEYS})
    for currency, key, amount, invoices, accounts in rows:
        found[currency][key] = AgeingCell(amount_minor=int(amount), invoices=invoices, accounts=accounts)
    return [CurrencyAgeing(currency=currency, buckets=found[currency]) for currency in sorted(found)]


@dataclass(frozen=True, slots=True)
class AccountReceivable:
    account_id: int
    currency: str
    amount_minor: int
    invoices: int
    oldest_due_at: dt.datetime | None


def receivables_bucket_accounts(
    *, currency: str, bucket: str, as_of: dt.datetime | None = None, limit: int | None = 500
) -> list[AccountReceivable]:
    """The accounts behind one currency's ageing bucket, with what each owes there, largest
    first (then by account id); at most ``limit`` (None: all, for the CSV export)."""
    window = _bucket_window(bucket, _today_start(as_of))
    rows = (
        _receivable()
        .filter(window, currency=currency)
        .order_by()
        .values("account_id")
        .annotate(amount=Sum("owed"), invoices=Count("*"), oldest=Min("due_at"))
        .order_by("-amount", "account_id")
        .values_list("account_id", "amount", "invoices", "oldest")
    )
    if limit is not None:
        rows = rows[:limit]
    return [
        AccountReceivable(
            account_id=account_id, currency=currency, amount_minor=int(amount), invoices=invoices, oldest_due_at=oldest
        )
        for account_id, amount, invoices, oldest in rows.iterator(chunk_size=2000)
    ]


@dataclass(frozen=True, slots=True)
class CurrencyRevenue:
    """A month's revenue in one currency, in minor units.

    ``invoiced``: totals (incl. VAT) of the invoices issued in the month, whatever became of
    them; ``credited``: totals of the credit notes issued in the month; ``collected``: money
    received against invoices in the month (card payments and transfers, including what was
    kept as credit beyond the invoice); ``refunded``: money given back to cards in the month."""

    currency: str
    invoiced_minor: int = 0
    credited_minor: int = 0
    collected_minor: int = 0
    refunded_minor: int = 0

    @property
    def net_invoiced_minor(self) -> int:
        return self.invoiced_minor - self.credited_minor

    @property
    def net_collected_minor(self) -> int:
        return self.collected_minor - self.refunded_minor


def revenue(*, month: dt.date) -> list[CurrencyRevenue]:
    """Revenue invoiced and collected in the calendar month (UTC) of ``month`` per currency
    (see ``CurrencyRevenue``): four grouped statements over the month's rows only (indexes on
    ``issued_at``, ``received_at``; refunds by the account's ``created_at``)."""
    period = Period(month.replace(day=1))
    start, end = period.start_at, period.end_at
    figures: dict[str, dict[str, int]] = defaultdict(dict)
    sources: list[tuple[str, QuerySet[Any], str]] = [
        (
            "invoiced_minor",
            Invoice.objects.filter(issued_at__gte=start, issued_at__lt=end).exclude(status=InvoiceStatus.DRAFT),
            "total_minor",
        ),
        ("credited_minor", CreditNote.objects.filter(issued_at__gte=start, issued_at__lt=end), "total_minor"),
        (
            "collected_minor",
            InvoicePayment.objects.filter(received_at__gte=start, received_at__lt=end),
            "received_minor",
        ),
        (
            "refunded_minor",
            InvoiceRefund.objects.filter(created_at__gte=start, created_at__lt=end, method=RefundMethod.CARD),
            "amount_minor",
        ),
    ]
    for name, queryset, column in sources:
        for currency, total in (
            queryset.order_by().values("currency").annotate(s=Sum(column)).values_list("currency", "s")
        ):
            figures[currency][name] = int(total or 0)
    return [CurrencyRevenue(currency=currency, **figures[currency]) for currency in sorted(figures)]


def approval_requests(*, status: str | None = "pending", limit: int = 500) -> list[ApprovalRequest]:
    """Four-eyes requests (of ``status``; None: all), newest first."""
    queryset = ApprovalRequest.objects.all()
    if status is not None:
        queryset = queryset.filter(status=status)
    return list(queryset.order_by("-requested_at")[:limit])


@dataclass(frozen=True, slots=True)
class PeriodCloseProgress:
    """The newest month with monthly invoices: how many of them by status, and when the last
    was issued (the close writes them chunk by chunk, so this moves while it runs)."""

    period_start: dt.date
    by_status: dict[str, int]
    last_issued_at: dt.datetime | None

    @property
    def issued(self) -> int:
        return sum(count for status, count in self.by_status.items() if status != InvoiceStatus.DRAFT)

    @property
    def label(self) -> str:
        return f"{self.period_start:%Y-%m}"


def period_close_progress() -> PeriodCloseProgress | None:
    """The last period close (None before the first): the newest ``period_start`` of a monthly
    invoice, then that month's invoices counted by status and its latest ``issued_at``, in one
    statement, from the ``invoicing_invoice_closed`` index alone. Counting a month of a million
    accounts reads a million index entries (for /metrics); the home page asks
    ``last_period_closed``, three index descents."""
    with connection.cursor() as cursor:
        cursor.execute(
            """
            WITH last AS (SELECT max(period_start) AS period_start FROM invoicing_invoice WHERE kind = 'period')
            SELECT last.period_start, i.status, count(*), max(i.issued_at)
            FROM last JOIN invoicing_invoice i ON i.period_start = last.period_start AND i.kind = 'period'
            GROUP BY last.period_start, i.status
            """
        )
        rows = cursor.fetchall()
    if not rows:
        return None
    issued_times = [issued_at for _, _, _, issued_at in rows if issued_at is not None]
    return PeriodCloseProgress(
        period_start=rows[0][0],
        by_status={status: count for _, status, count, _ in rows},
        last_issued_at=max(issued_times) if issued_times else None,
    )


@dataclass(frozen=True, slots=True)
class LastPeriodClosed:
    """The newest month with monthly invoices, when its last one was issued, and whether any
    of them is still a draft."""

    period_start: dt.date
    last_issued_at: dt.datetime | None
    has_drafts: bool

    @property
    def label(self) -> str:
        return f"{self.period_start:%Y-%m}"


def last_period_closed() -> LastPeriodClosed | None:
    """``period_close_progress`` without the counts, for the staff home page: one statement of
    index descents on ``invoicing_invoice_closed`` (the newest month; per issued status its
    latest ``issued_at``; whether a draft exists), however many invoices the month has."""
    issued = [s for s in InvoiceStatus.values if s != InvoiceStatus.DRAFT]
    with connection.cursor() as cursor:
        cursor.execute(
            """
            WITH last AS (SELECT max(period_start) AS period_start FROM invoicing_invoice WHERE kind = 'period')
            SELECT last.period_start,
                   (SELECT max(x.issued_at) FROM unnest(%s::text[]) AS s(status)
                    CROSS JOIN LATERAL (SELECT max(i.issued_at) AS issued_at FROM invoicing_invoice i
                                        WHERE i.kind = 'period' AND i.period_start = last.period_start
                                          AND i.status = s.status) x),
                   EXISTS (SELECT 1 FROM invoicing_invoice i WHERE i.kind = 'period'
                           AND i.period_start = last.period_start AND i.status = 'draft')
            FROM last WHERE last.period_start IS NOT NULL
            """,
            [issued],
        )
        row = cursor.fetchone()
    if row is None:
        return None
    return LastPeriodClosed(period_start=row[0], last_issued_at=row[1], has_drafts=row[2])


# --- For the back office's customer page and search (staff: every status, drafts included)


def invoices_for_account(*, account_id: int, limit: int = 100) -> list[Invoice]:
    """The account's invoices of every status, newest first (at most ``limit``): one indexed
    query (``invoicing_invoice_account``), no lines."""
    return list(Invoice.objects.filter(account_id=account_id).order_by("-created_at", "-id")[:limit])


def credit_notes_for_account(*, account_id: int, limit: int = 100) -> list[CreditNote]:
    """The account's credit notes, newest first, each with its invoice's number: one query."""
    return list(
        CreditNote.objects.filter(account_id=account_id)
        .annotate(invoice_number=F("invoice__number"))
        .order_by("-issued_at", "-id")[:limit]
    )


def credit_grants_for_account(*, account_id: int, limit: int = 100) -> list[CreditGrant]:
    """The account's credit grants (spent and expired ones too), newest first: one query."""
    return list(CreditGrant.objects.filter(account_id=account_id).order_by("-created_at", "-id")[:limit])


@dataclass(frozen=True, slots=True)
class DocumentMatch:
    """A document found by its number (or public id): whose it is, for the search."""

    kind: str  # invoice | credit_note
    document_id: int
    number: str
    account_id: int
    status: str
    total_minor: int
    currency: str


def documents_by_number(*, term: str) -> list[DocumentMatch]:
    """The invoice and the credit note whose number is exactly ``term`` (or ``term`` in upper
    case, as the default series are spelt), or whose
    public id (``inv_…``, ``crn_…``) it is: unique indexes, two queries at most."""
    from billing_site.common import ids as public_ids

    term = term.strip()
    if not term:
        return []
    found: list[DocumentMatch] = []
    invoice_id = public_ids.decode("inv", term)
    invoices = (
        Invoice.objects.filter(id=invoice_id) if invoice_id else Invoice.objects.filter(number__in={term, term.upper()})
    )
    note_id = public_ids.decode("crn", term)
    notes = (
        CreditNote.objects.filter(id=note_id) if note_id else CreditNote.objects.filter(number__in={term, term.upper()})
    )
    if not note_id:
        found += [
            DocumentMatch("invoice", i.id, i.number or "", i.account_id, i.status, i.total_minor, i.currency)
            for i in invoices[:5]
        ]
    if not invoice_id:
        found += [
            DocumentMatch("credit_note", n.id, n.number, n.account_id, "issued", n.total_minor, n.currency)
            for n in notes[:5]
        ]
    return found
