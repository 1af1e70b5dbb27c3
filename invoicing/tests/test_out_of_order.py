"""Months closed in any order bill each usage month exactly once; one account that cannot be
billed never blocks the others of its chunk."""

from __future__ import annotations

import datetime as dt
import itertools
from collections import defaultdict
from collections.abc import Callable
from decimal import Decimal

import pytest
from django.db.models import Sum

from accounts.models import BillingAccount
from billing_site.common import money
from billing_site.common.actors import Actor
from invoicing import ledger, services
from invoicing.models import BilledUsage, Invoice, InvoiceLine, LineKind
from invoicing.periods import Period
from invoicing.tests.factories import ContractDiscountFactory, rated

SEPTEMBER = Period(dt.date(2026, 9, 1))
OCTOBER = Period(dt.date(2026, 10, 1))
NOVEMBER = Period(dt.date(2026, 11, 1))
DECEMBER = Period(dt.date(2026, 12, 1))
FINANCE = Actor.system("tests")


pytestmark = pytest.mark.clock(dt.datetime(2026, 12, 2, 9, 0, tzinfo=dt.UTC))


def close(period: Period, **kwargs: object) -> services.CloseReport:
    return services.period_close(period=period, actor=FINANCE, run_rollup=False, render_pdfs=False, **kwargs)


def billed_by_month(account: BillingAccount) -> dict[dt.date, int]:
    rows = (
        BilledUsage.objects.filter(account_id=account.id)
        .values("usage_month")
        .annotate(minor=Sum("amount_minor"))
        .values_list("usage_month", "minor")
    )
    return dict(rows)


def later_month_lines(account: BillingAccount) -> list[str]:
    """Lines of an invoice that bill or adjust a month after the invoice's own period."""
    return [
        f"{line.invoice.period_start:%Y-%m}: {line.description}"
        for line in InvoiceLine.objects.filter(account_id=account.id).select_related("invoice")
        if line.usage_month and line.usage_month > line.invoice.period_start
    ]


def test_closing_a_month_after_a_later_one_never_reverses_the_later_one(acct: Callable, clock) -> None:
    account = acct(currency="EUR", country="NL")
    rated(account.id, "2026-11-10", "network.egress.internet", "500", "33.20")
    assert close(NOVEMBER).issued == 1
    rated(account.id, "2026-10-30", "network.egress.internet", "20", "1.40")  # late October usage

    assert close(OCTOBER).issued == 1
    october = Invoice.objects.get(account_id=account.id, period_start=OCTOBER.start)
    assert [(line.kind, line.usage_month, line.amount_minor) for line in october.lines.all()] == [
        (LineKind.USAGE, OCTOBER.start, 140)
    ]
    assert later_month_lines(account) == []

    clock.move_to(dt.datetime(2027, 1, 2, 9, 0, tzinfo=dt.UTC))
    rated(account.id, "2026-12-05", "network.egress.internet", "10", "0.70")
    close(DECEMBER)
    december = Invoice.objects.get(account_id=account.id, period_start=DECEMBER.start)
    assert [(line.usage_month, line.amount_minor) for line in december.lines.all()] == [(DECEMBER.start, 70)]
    assert billed_by_month(account) == {OCTOBER.start: 140, NOVEMBER.start: 3320, DECEMBER.start: 70}
    assert ledger.check() == []


# Usage as (day, amount): the months' own usage, then late usage arriving after the first and
# after the second close of the permutation.
OWN = [("2026-09-10", "10.10"), ("2026-10-10", "20.20"), ("2026-11-10", "30.30"), ("2026-12-10", "1.00")]
LATE = [
    [("2026-09-29", "1.11"), ("2026-10-30", "2.22"), ("2026-11-29", "3.33")],
    [("2026-09-30", "0.05"), ("2026-10-31", "0.07"), ("2026-11-30", "0.09")],
]


@pytest.mark.parametrize(
    "order",
    list(itertools.permutations([SEPTEMBER, OCTOBER, NOVEMBER])),
    ids=lambda order: ",".join(p.label for p in order),
)
def test_three_months_closed_in_any_order_bill_each_usage_month_exactly_once(
    acct: Callable, clock, order: tuple[Period, ...]
) -> None:
    account = acct(currency="EUR", country="NL")
    neighbour = acct(currency="EUR", country="NL")  # same chunk, usage every month
    for day, amount in OWN:
        rated(account.id, day, "compute.vcpu", "1", amount)
        rated(neighbour.id, day, "compute.vcpu", "1", amount)
    for step, period in enumerate(order):
        clock.move_to(dt.datetime(2026, 12, 2 + step, 9, 0, tzinfo=dt.UTC))
        close(period)
        if step < len(LATE):
            for day, amount in LATE[step]:
                rated(account.id, day, "compute.vcpu", "1", amount)
        assert later_month_lines(account) == []
    # December's close, after every month's acceptance window, sweeps up the rest.
    clock.move_to(dt.datetime(2027, 1, 10, 9, 0, tzinfo=dt.UTC))
    close(DECEMBER)

    rated_by_month: dict[dt.date, Decimal] = defaultdict(Decimal)
    for day, amount in OWN + LATE[0] + LATE[1]:
        rated_by_month[dt.date.fromisoformat(day).replace(day=1)] += Decimal(amount)
    expected = {month: money.to_minor(amount, "EUR") for month, amount in rated_by_month.items()}
    assert billed_by_month(account) == expected
    assert sum(i.subtotal_minor for i in Invoice.objects.filter(account_id=account.id)) == sum(expected.values())
    assert all(line.amount_minor >= 0 for line in InvoiceLine.objects.filter(account_id=account.id))
    assert later_month_lines(account) == []
    assert ledger.check() == []


def test_a_discount_is_not_given_twice_when_a_later_month_was_closed_first(acct: Callable, clock) -> None:
    account = acct(currency="EUR", country="NL")
    ContractDiscountFactory(account_id=account.id, sku_prefix="compute.", percent=Decimal(10))
    rated(account.id, "2026-10-10", "compute.vcpu", "100", "100.00")
    rated(account.id, "2026-11-10", "compute.vcpu", "100", "50.00")
    close(NOVEMBER)  # bills October's usage as an adjustment, with its discount
    rated(account.id, "2026-10-31", "compute.vcpu", "30", "30.00")  # late October usage
    close(OCTOBER)  # bills (and discounts) only what is left of October
    october = Invoice.objects.get(account_id=account.id, period_start=OCTOBER.start)
    assert [(line.kind, line.amount_minor) for line in october.lines.all()] == [
        (LineKind.USAGE, 3000),
        (LineKind.DISCOUNT, -300),
    ]
    discounts = InvoiceLine.objects.filter(account_id=account.id, kind=LineKind.DISCOUNT)
    assert sum(line.amount_minor for line in discounts) == -1800  # 10 % of 180.00, once
    assert ledger.check() == []


def test_the_check_names_a_closed_month_billed_differently_from_its_rated_usage(acct: Callable, clock) -> None:
    account = acct(currency="EUR", country="NL")
    rated(account.id, "2026-10-10", "compute.vcpu", "10", "12.34")
    clock.move_to(dt.datetime(2026, 12, 10, tzinfo=dt.UTC))  # after October's acceptance window
    close(OCTOBER)
    assert ledger.check() == []
    # Usage that reached the rollup without ever being billed (what the out-of-order bug and
    # a lost rollup would leave): October is closed, so the check says so.
    rated(account.id, "2026-10-11", "compute.vcpu", "1", "1.00")
    problems = ledger.check()
    assert len(problems) == 1
    assert "usage 2026-10 compute.vcpu is closed but billed 10" in problems[0]
    assert "12.34 EUR while 11" in problems[0]


def test_the_check_names_an_invoice_that_bills_a_later_month(acct: Callable, clock) -> None:
    account = acct(currency="EUR", country="NL")
    rated(account.id, "2026-10-10", "compute.vcpu", "10", "12.34")
    close(OCTOBER)
    october = Invoice.objects.get(account_id=account.id)
    BilledUsage.objects.create(
        account_id=account.id,
        usage_month=NOVEMBER.start,
        sku="compute.vcpu",
        invoice=october,
        quantity=Decimal(-1),
        rated_amount=Decimal(-1),
        amount_minor=-100,
    )
    assert any("bills usage of a later month, 2026-11" in p for p in ledger.check())


def test_an_account_beyond_the_document_limit_is_reported_and_the_rest_of_its_chunk_is_invoiced(
    acct: Callable, clock
) -> None:
    runaway = acct(currency="JPY", country="NL")
    ordinary = acct(currency="EUR", country="NL")
    # 40 resources with a spec of 10^12 units for a month: 10^19 yen, more than a bigint holds.
    for n in range(40):
        rated(runaway.id, "2026-10-15", "compute.vcpu", "744000000000000", "250000000000000000", resource_id=f"vm-{n}")
    rated(ordinary.id, "2026-10-15", "compute.vcpu", "10", "12.34")

    for _ in range(2):  # and on every re-run
        report = close(OCTOBER)
        assert set(report.unbillable) == {runaway.id}
        assert "document limit" in report.unbillable[runaway.id]
        assert "NOT invoiced" in report.summary()
    assert Invoice.objects.get(account_id=ordinary.id).total_minor == 1493
    assert not Invoice.objects.filter(account_id=runaway.id).exists()
    assert ledger.check() == []


def test_a_database_error_of_one_account_is_isolated_to_it(
    acct: Callable, clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the document limit the runaway amount reaches PostgreSQL, which refuses it
    (bigint out of range): the chunk is retried in halves and only that account is skipped."""
    monkeypatch.setattr(money, "DOCUMENT_LIMIT_MINOR", 10**30)
    accounts = [acct(currency="EUR", country="NL") for _ in range(5)]
    runaway = acct(currency="JPY", country="NL")
    for account in accounts:
        rated(account.id, "2026-10-15", "compute.vcpu", "10", "12.34")
    rated(runaway.id, "2026-10-15", "compute.vcpu", "1", "10000000000000000000")

    report = close(OCTOBER)
    assert report.issued == 5
    assert set(report.unbillable) == {runaway.id}
    assert report.unbillable[runaway.id].startswith("DataError 22003: value")  # no failing row's content
    assert Invoice.objects.filter(account_id__in=[a.id for a in accounts]).count() == 5
    assert ledger.check() == []


def test_a_close_logs_each_chunk_the_run_the_skipped_account_and_the_check(
    acct: Callable, clock, caplog: pytest.LogCaptureFixture
) -> None:
    runaway = acct(currency="JPY", country="NL")
    ordinary = acct(currency="EUR", country="NL")
    rated(runaway.id, "2026-10-15", "compute.vcpu", "1", "10000000000000000000")
    rated(ordinary.id, "2026-10-15", "compute.vcpu", "10", "12.34")
    with caplog.at_level("INFO"):
        close(OCTOBER)
        ledger.check()
    by_event = {record.getMessage(): record for record in caplog.records}
    chunk = by_event["invoicing.chunk_closed"]
    assert (chunk.period, chunk.accounts, chunk.issued, chunk.unbillable) == ("2026-10", 2, 1, 1)
    skipped = by_event["invoicing.account_unbillable"]
    assert skipped.levelname == "ERROR" and skipped.account_id == runaway.public_id
    run = by_event["invoicing.period_closed"]
    assert (run.issued, run.unbillable, run.totals) == (1, 1, {"EUR": "14.93"})
    check = by_event["ledger.check"]
    assert check.violations == 0 and check.levelname == "INFO"


@pytest.mark.parametrize(
    "order",
    list(itertools.permutations([SEPTEMBER, OCTOBER, NOVEMBER])),
    ids=lambda order: ",".join(p.label for p in order),
)
def test_discounts_are_given_exactly_once_whatever_order_months_are_closed_in(
    acct: Callable, clock, order: tuple[Period, ...]
) -> None:
    account = acct(currency="EUR", country="NL")
    # 10 % on compute in October only; 20 % on storage from 15 October, open-ended.
    ContractDiscountFactory(
        account_id=account.id,
        sku_prefix="compute.",
        percent=Decimal(10),
        valid_from=dt.date(2026, 10, 1),
        valid_until=dt.date(2026, 11, 1),
    )
    ContractDiscountFactory(
        account_id=account.id, sku_prefix="storage.", percent=Decimal(20), valid_from=dt.date(2026, 10, 15)
    )
    usage = [
        ("2026-09-10", "compute.vcpu", "100.00"),
        ("2026-10-10", "compute.vcpu", "50.00"),
        ("2026-10-10", "storage.object.requests", "40.00"),  # before the storage discount
        ("2026-10-20", "storage.object.requests", "30.00"),
        ("2026-11-10", "compute.vcpu", "70.00"),
        ("2026-11-10", "storage.object.requests", "20.00"),
        ("2026-12-10", "storage.object.requests", "5.00"),
    ]
    late = [
        [("2026-10-30", "compute.vcpu", "3.33"), ("2026-10-31", "storage.object.requests", "1.11")],
        [("2026-11-30", "storage.object.requests", "2.22"), ("2026-09-30", "compute.vcpu", "9.99")],
    ]
    for day, sku, amount in usage:
        rated(account.id, day, sku, "1", amount)
    for step, period in enumerate(order):
        clock.move_to(dt.datetime(2026, 12, 2 + step, 9, 0, tzinfo=dt.UTC))
        close(period)
        if step < len(late):
            for day, sku, amount in late[step]:
                rated(account.id, day, sku, "1", amount)
    clock.move_to(dt.datetime(2027, 1, 10, 9, 0, tzinfo=dt.UTC))
    close(DECEMBER)

    # compute in October: 50.00 + 3.33 → 10 % = 5.333 → 5.33; storage from 15 October:
    # October 30.00 + 1.11 → 6.222 → 6.22, November 20.00 + 2.22 → 4.444 → 4.44, December 1.00.
    discounts = InvoiceLine.objects.filter(account_id=account.id, kind=LineKind.DISCOUNT)
    by_month: dict[dt.date | None, int] = defaultdict(int)
    for line in discounts:
        by_month[line.usage_month] += line.amount_minor
    assert dict(by_month) == {
        OCTOBER.start: -533 - 622,
        NOVEMBER.start: -444,
        DECEMBER.start: -100,
    }
    assert all(line.amount_minor >= 0 for line in InvoiceLine.objects.filter(account_id=account.id, kind="usage"))
    assert later_month_lines(account) == []
    assert ledger.check() == []
