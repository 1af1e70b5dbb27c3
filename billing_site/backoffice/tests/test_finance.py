"""Finance's money views: the receivables ageing per currency and bucket from invoices with
known due dates (frozen clock), the accounts behind a bucket, revenue this month and last, the
dunning funnel of a month, the CSV exports, and who may see them."""

from __future__ import annotations

import csv
import datetime as dt
import io
import itertools
from typing import Any

import pytest

from accounts.tests.factories import BillingAccountFactory
from conftest import operator
from invoicing import selectors as invoicing_selectors
from invoicing.models import CreditNote, Invoice, InvoicePayment, InvoiceRefund
from payments import selectors as payments_selectors
from payments.models import DunningCase, Payment

NOW = dt.datetime(2026, 11, 3, 9, 0, tzinfo=dt.UTC)  # today, for the ageing: 2026-11-03 (UTC)
pytestmark = [pytest.mark.clock(NOW), pytest.mark.django_db]

_numbers = itertools.count(1)


def at(day: str, hour: int = 12) -> dt.datetime:
    return dt.datetime.fromisoformat(day).replace(hour=hour, tzinfo=dt.UTC)


def invoice(
    account_id: int, *, due: str | None, total: int, currency: str = "EUR", status: str = "issued", **amounts: Any
) -> Invoice:
    """An invoice as the period close leaves it (a threshold invoice: several per account and month)."""
    number = next(_numbers)
    return Invoice.objects.create(
        account_id=account_id,
        period_start=dt.date(2026, 9, 1),
        period_end=dt.date(2026, 10, 1),
        kind="threshold",
        status=status,
        currency=currency,
        number=None if status == "draft" else f"T-{number:06d}",
        total_minor=total,
        subtotal_minor=total,
        issued_at=None if status == "draft" else amounts.pop("issued_at", at("2026-09-01")),
        due_at=at(due, amounts.pop("due_hour", 12)) if due else None,
        **amounts,
    )


@pytest.fixture
def receivables() -> dict[str, int]:
    x, y, z = (BillingAccountFactory(currency=c).id for c in ("EUR", "EUR", "USD"))
    invoice(x, due="2026-11-10", total=10000)  # not due yet: current
    invoice(y, due="2026-11-03", due_hour=8, total=5000, amount_paid_minor=2000)  # due today: current, 30.00 left
    invoice(x, due="2026-11-02", total=12100, credits_applied_minor=100, amount_paid_minor=1000)  # 1 day: 110.00
    invoice(x, due="2026-10-20", total=500)  # 14 days
    invoice(y, due="2026-10-04", total=2000)  # 30 days: still 1-30
    invoice(y, due="2026-10-03", total=3000, amount_credited_minor=500)  # 31 days: 31-60, 25.00 left
    invoice(x, due="2026-08-05", total=4000)  # 90 days: 61-90
    invoice(y, due="2026-08-04", total=7000)  # 91 days: 90+
    invoice(x, due="2026-08-04", total=7000, written_off_minor=0, amount_refunded_minor=100, amount_paid_minor=7000)
    # ^ paid in full, then 1.00 refunded to the card: owes 1.00 again (90+)
    invoice(x, due="2026-10-01", total=9999, status="paid", amount_paid_minor=9999)  # paid: nothing owed
    invoice(y, due="2026-10-01", total=9999, amount_paid_minor=9999)  # issued but settled: nothing owed
    invoice(y, due="2026-10-01", total=9999, status="uncollectible", written_off_minor=9999)  # written off
    invoice(y, due=None, total=9999, status="draft")  # a draft owes nothing yet
    invoice(z, due="2026-11-01", total=999, currency="USD")  # 2 days: 1-30
    invoice(z, due=None, total=150, currency="USD")  # no due date: current
    return {"x": x, "y": y, "z": z}


def test_ageing_buckets_and_totals_per_currency(receivables: dict[str, int]) -> None:
    found = {row.currency: row for row in invoicing_selectors.receivables_ageing()}
    assert sorted(found) == ["EUR", "USD"]
    eur = {key: (cell.amount_minor, cell.invoices, cell.accounts) for key, cell in found["EUR"].buckets.items()}
    assert eur == {
        "current": (10000 + 3000, 2, 2),
        "1_30": (11000 + 500 + 2000, 3, 2),
        "31_60": (2500, 1, 1),
        "61_90": (4000, 1, 1),
        "90_plus": (7000 + 100, 2, 2),
    }
    assert (found["EUR"].total.amount_minor, found["EUR"].total.invoices) == (40100, 9)
    usd = {key: cell.amount_minor for key, cell in found["USD"].buckets.items()}
    assert usd == {"current": 150, "1_30": 999, "31_60": 0, "61_90": 0, "90_plus": 0}
    # The same invoices a year on: everything unpaid is 90+ days past due.
    later = {r.currency: r for r in invoicing_selectors.receivables_ageing(as_of=NOW + dt.timedelta(days=365))}
    assert later["EUR"].buckets["90_plus"].amount_minor == 40100
    assert later["USD"].buckets["current"].amount_minor == 150  # no due date: never late


def test_the_accounts_behind_a_bucket(receivables: dict[str, int]) -> None:
    rows = invoicing_selectors.receivables_bucket_accounts(currency="EUR", bucket="1_30")
    assert [(r.account_id, r.amount_minor, r.invoices) for r in rows] == [
        (receivables["x"], 11500, 2),
        (receivables["y"], 2000, 1),
    ]
    assert rows[0].oldest_due_at == at("2026-10-20")
    assert invoicing_selectors.receivables_bucket_accounts(currency="USD", bucket="31_60") == []
    with pytest.raises(ValueError, match="not an ageing bucket"):
        invoicing_selectors.receivables_bucket_accounts(currency="EUR", bucket="1_31")


def test_the_ageing_page_links_each_bucket_to_its_accounts_and_exports_csv(receivables: dict[str, int]) -> None:
    _user, finance = operator(["finance"])
    page = finance.get("/admin/finance/")
    assert page.status_code == 200
    html = page.content.decode()
    assert "135.00 EUR" in html and "9.99 USD" in html and "401.00 EUR" in html  # 1-30 EUR, 1-30 USD, EUR total
    assert "/admin/finance/receivables/EUR/1_30/" in html
    bucket = finance.get("/admin/finance/receivables/EUR/1_30/").content.decode()
    assert "115.00 EUR" in bucket and "20.00 EUR" in bucket
    assert finance.get("/admin/finance/receivables/EUR/nope/").status_code == 404
    export = finance.get("/admin/finance/receivables/EUR/1_30/", {"format": "csv"})
    assert export["Content-Type"].startswith("text/csv")
    rows = list(csv.reader(io.StringIO(b"".join(export.streaming_content).decode())))  # type: ignore[attr-defined]
    assert rows[0] == ["account_id", "currency", "amount", "invoices", "oldest_due_at"]
    assert [r[1:4] for r in rows[1:]] == [["EUR", "115.00", "2"], ["EUR", "20.00", "1"]]
    ageing = list(
        csv.reader(
            io.StringIO(b"".join(finance.get("/admin/finance/", {"export": "ageing"}).streaming_content).decode())
        )  # type: ignore[attr-defined]
    )
    assert ["EUR", "90_plus", "71.00", "2", "2"] in ageing and ["USD", "current", "1.50", "1", "1"] in ageing


def test_revenue_invoiced_and_collected_this_month_and_last() -> None:
    account = BillingAccountFactory(currency="EUR").id
    october = invoice(account, due="2026-10-20", total=12100, status="paid", issued_at=at("2026-10-06"))
    november = invoice(account, due="2026-11-20", total=24200, issued_at=at("2026-11-01", 0))
    invoice(account, due="2026-11-20", total=1, status="draft")  # drafts are not invoiced
    invoice(account, due="2026-10-01", total=5000, issued_at=at("2026-09-30", 23))  # September's
    invoice(
        BillingAccountFactory(currency="JPY").id,
        due="2026-11-20",
        total=1500,
        currency="JPY",
        issued_at=at("2026-11-02"),
    )
    for bill, reference, received, amount in (
        (october, "pay_1", "2026-10-30", 12100),
        (november, "pay_2", "2026-11-02", 10000),
    ):
        InvoicePayment.objects.create(
            invoice=bill,
            account_id=account,
            amount_minor=amount,
            received_minor=amount,
            currency="EUR",
            reference=reference,
            received_at=at(received),
        )
    note = CreditNote.objects.create(
        invoice=october,
        account_id=account,
        number="CN-1",
        currency="EUR",
        reason="outage",
        subtotal_minor=1000,
        tax_minor=210,
        total_minor=1210,
        issued_by="f@ops.test",
        issued_at=at("2026-11-02"),
    )
    InvoiceRefund.objects.create(
        invoice=october,
        account_id=account,
        amount_minor=1210,
        currency="EUR",
        method="card",
        reference="ref_1",
        credit_note=note,
        created_at=at("2026-11-02"),
    )

    this = {r.currency: r for r in invoicing_selectors.revenue(month=dt.date(2026, 11, 1))}
    assert (this["EUR"].invoiced_minor, this["EUR"].credited_minor, this["EUR"].net_invoiced_minor) == (
        24200,
        1210,
        22990,
    )
    assert (this["EUR"].collected_minor, this["EUR"].refunded_minor, this["EUR"].net_collected_minor) == (
        10000,
        1210,
        8790,
    )
    assert (this["JPY"].invoiced_minor, this["JPY"].collected_minor) == (1500, 0)
    last = {r.currency: r for r in invoicing_selectors.revenue(month=dt.date(2026, 10, 1))}
    assert list(last) == ["EUR"]
    assert (last["EUR"].invoiced_minor, last["EUR"].collected_minor, last["EUR"].credited_minor) == (12100, 12100, 0)

    _user, finance = operator(["finance"])
    html = finance.get("/admin/finance/").content.decode()
    assert "242.00 EUR" in html and "87.90 EUR" in html and "1,500 JPY" in html and "121.00 EUR" in html


def payment(invoice_id: int, *, attempt: int, created: str, status: str, amount: int, currency: str = "EUR") -> None:
    key = next(_numbers)
    Payment.objects.create(
        account_id=1, invoice_id=invoice_id, attempt=attempt, trigger="after_issue", status=status,
        amount_minor=amount, currency=currency, gateway="sandbox", idempotency_key=f"k{key}", created_at=at(created),
    )  # fmt: skip


def case(invoice_id: int, *, status: str, suspended: bool = False, currency: str = "EUR") -> None:
    DunningCase.objects.create(
        account_id=1, invoice_id=invoice_id, currency=currency, status=status, first_failure_at=at("2026-10-02"),
        due_at=at("2026-10-15"), suspended_account=suspended,
    )  # fmt: skip


def test_dunning_funnel_of_a_month() -> None:
    payment(1, attempt=1, created="2026-10-02", status="succeeded", amount=10000)  # charged, paid at once
    payment(2, attempt=1, created="2026-10-02", status="failed", amount=2000)
    payment(2, attempt=2, created="2026-10-05", status="succeeded", amount=2000)  # a retry: not a second charge
    case(2, status="resolved")  # recovered
    payment(3, attempt=1, created="2026-10-31", status="failed", amount=3000)
    case(3, status="open", suspended=True)  # suspended, still open
    payment(4, attempt=1, created="2026-10-01", status="failed", amount=4000)
    case(4, status="written_off", suspended=True)  # suspended, then written off
    payment(5, attempt=1, created="2026-09-30", status="failed", amount=9000)  # September's cohort
    payment(5, attempt=2, created="2026-10-03", status="failed", amount=9000)
    case(5, status="open")
    payment(6, attempt=1, created="2026-10-10", status="failed", amount=700, currency="USD")
    case(6, status="open", currency="USD")

    funnel = {r.currency: r for r in payments_selectors.dunning_funnel(month=dt.date(2026, 10, 1))}
    eur = {key: (s.invoices, s.amount_minor) for key, s in funnel["EUR"].stages.items()}
    assert eur == {
        "charged": (4, 19000),
        "failed": (3, 9000),
        "recovered": (1, 2000),
        "suspended": (2, 7000),
        "written_off": (1, 4000),
    }
    usd = {key: s.invoices for key, s in funnel["USD"].stages.items()}
    assert usd == {"charged": 1, "failed": 1, "recovered": 0, "suspended": 0, "written_off": 0}
    september = {r.currency: r for r in payments_selectors.dunning_funnel(month=dt.date(2026, 9, 1))}
    assert september["EUR"].stages["failed"].invoices == 1 and september["EUR"].stages["charged"].amount_minor == 9000

    _user, finance = operator(["finance"])
    html = finance.get("/admin/finance/", {"month": "2026-10"}).content.decode()
    assert "190.00 EUR" in html and "Dunning funnel of 2026-10" in html


@pytest.mark.parametrize(("groups", "status"), [(["finance"], 200), (["support"], 403), (["fraud"], 403), ([], 403)])
def test_who_may_see_the_money_views(receivables: dict[str, int], groups: list[str], status: int) -> None:
    _user, client = operator(groups)
    for url in ("/admin/finance/", "/admin/finance/receivables/EUR/1_30/", "/admin/finance/approvals/"):
        assert client.get(url).status_code == status, url
