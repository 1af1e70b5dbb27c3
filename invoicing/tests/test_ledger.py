"""The ledger: balanced, append-only, once per source, consistent with the documents under
any sequence of invoices, credits, payments, credit notes, write-offs and voids."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from decimal import Decimal
from io import StringIO

import pytest
from django.conf import settings as django_settings
from django.core.management import call_command
from django.db import DatabaseError, IntegrityError, connection, transaction
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from accounts.models import BillingAccount
from billing_site.common.errors import ApplicationError
from conftest import Customer
from invoicing import ledger, services
from invoicing.models import Invoice, InvoiceStatus, LedgerEntry, LedgerLine
from invoicing.periods import Period
from invoicing.tests.factories import promotional_credit, rated
from invoicing.tests.support import FINANCE, NOW

PERIODS = [Period(dt.date(2026, 8, 1)), Period(dt.date(2026, 9, 1)), Period(dt.date(2026, 10, 1))]
INVOICING_TABLES = (
    "invoicing_ledgerline, invoicing_ledgerentry, invoicing_creditapplication, invoicing_creditnoteline, "
    "invoicing_invoicerefund, invoicing_creditnote, invoicing_invoicepayment, invoicing_billedusage, "
    "invoicing_discountedusage, "
    "invoicing_invoicetransition, "
    "invoicing_invoiceline, invoicing_rendereddocument, invoicing_invoice, invoicing_creditgrant, "
    "invoicing_documentsequence, metering_dailyusage"
)


pytestmark = pytest.mark.clock(NOW)


@pytest.fixture
def two_accounts(
    catalog: None, customer: Customer, make_account: Callable[..., BillingAccount]
) -> list[BillingAccount]:
    return [
        make_account(customer.user, currency="EUR", country="NL"),
        make_account(customer.user, currency="JPY", country="US"),
    ]


def _issue_one(account: BillingAccount) -> Invoice:
    rated(account.id, "2026-10-02", "compute.vcpu", "100", "37.5")
    rated(account.id, "2026-10-02", "network.egress", "100", "4.25")
    services.period_close(period=PERIODS[2], actor=FINANCE, run_rollup=False, render_pdfs=False)
    return Invoice.objects.get(account_id=account.id)


operations = st.lists(
    st.one_of(
        st.tuples(
            st.just("usage"),
            st.integers(0, 1),
            st.integers(0, 2),
            st.sampled_from(["compute.vcpu", "network.egress"]),
            st.decimals("0", "500", places=4),
        ),
        st.tuples(
            st.just("grant"),
            st.integers(0, 1),
            st.sampled_from(["promotional", "prepaid"]),
            st.integers(1, 20000),
            st.booleans(),
        ),
        st.tuples(st.just("close"), st.integers(0, 2)),
        st.tuples(st.just("pay"), st.integers(0, 5), st.sampled_from([Decimal("0.3"), Decimal("0.5"), Decimal(1)])),
        st.tuples(st.just("credit_note"), st.integers(0, 5), st.sampled_from([Decimal("0.25"), Decimal(1)])),
        st.tuples(st.just("write_off"), st.integers(0, 5)),
        st.tuples(st.just("void"), st.integers(0, 5)),
    ),
    min_size=1,
    max_size=14,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=operations)
def test_the_invariants_hold_under_any_sequence(two_accounts: list[BillingAccount], steps: list[tuple]) -> None:
    with connection.cursor() as cursor:
        cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")  # no deferred FK checks pending
        cursor.execute(f"TRUNCATE {INVOICING_TABLES}")
        cursor.execute("SET CONSTRAINTS ALL DEFERRED")
    payments = 0
    for step in steps:
        kind = step[0]
        invoices = list(Invoice.objects.exclude(status=InvoiceStatus.DRAFT).order_by("number"))
        try:
            if kind == "usage":
                _, who, month, sku, amount = step
                # Only while the month still accepts events (else ingestion refuses them as too old).
                if PERIODS[month].end_at + dt.timedelta(days=django_settings.METERING_MAX_EVENT_AGE_DAYS) > NOW:
                    rated(two_accounts[who].id, f"2026-{8 + month:02d}-05", sku, "1", amount)
            elif kind == "grant":
                _, who, credit_kind, amount, expires = step
                account = two_accounts[who]
                services.credit_grant_create(
                    account_id=account.id,
                    kind=credit_kind,
                    amount=Decimal(amount) if account.currency == "JPY" else Decimal(amount) / 100,
                    currency=account.currency,
                    reason="property test",
                    actor=FINANCE,
                    expires_at=NOW + dt.timedelta(days=30) if expires else None,
                )
            elif kind == "close":
                services.period_close(period=PERIODS[step[1]], actor=FINANCE, run_rollup=False, render_pdfs=False)
            elif invoices:
                invoice = invoices[step[1] % len(invoices)]
                if kind == "pay":
                    amount = int(invoice.amount_outstanding_minor * step[2]) or invoice.amount_outstanding_minor
                    payments += 1
                    services.invoice_record_payment(
                        invoice_id=invoice.id,
                        amount_minor=amount,
                        currency=invoice.currency,
                        reference=f"ch_{payments}",
                    )
                elif kind == "credit_note":
                    left = invoice.subtotal_minor - sum(n.subtotal_minor for n in invoice.credit_notes.all())
                    services.credit_note_issue(
                        invoice_id=invoice.id,
                        lines=[
                            services.CreditNoteLineIn(
                                description="goodwill", amount_minor=int(left * step[2]), sku="compute.vcpu"
                            )
                        ],
                        reason="property test",
                        actor=FINANCE,
                    )
                elif kind == "write_off":
                    services.invoice_write_off(invoice_id=invoice.id, actor=FINANCE, reason="property test")
                elif kind == "void":
                    services.invoice_void(invoice_id=invoice.id, actor=FINANCE, reason="property test")
        except ApplicationError:
            pass  # refused (wrong state, nothing left to credit …): must leave nothing behind
    assert ledger.check() == []
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT currency, sum(amount_minor) FROM invoicing_ledgerline GROUP BY 1 HAVING sum(amount_minor) <> 0"
        )
        assert cursor.fetchall() == []
    for invoice in Invoice.objects.exclude(status=InvoiceStatus.DRAFT):
        assert invoice.amount_paid_minor + invoice.written_off_minor <= invoice.amount_due_minor
        if invoice.status == InvoiceStatus.PAID:
            assert invoice.amount_outstanding_minor == 0


def test_an_entry_balances_and_posts_once(two_accounts: list[BillingAccount]) -> None:
    invoice = _issue_one(two_accounts[0])
    entry = LedgerEntry.objects.get(source_type="invoice", source_id=invoice.id)
    lines = {line.ledger_account: line.amount_minor for line in entry.lines.all()}
    assert lines == {
        "receivable": invoice.total_minor,
        "revenue:compute": -3750,
        "revenue:network": -425,
        "vat_payable:NL": -invoice.tax_minor,
    }
    with pytest.raises(IntegrityError), transaction.atomic():
        ledger.post(
            [
                ledger.Entry(
                    "invoice",
                    invoice.id,
                    invoice.account_id,
                    "EUR",
                    "again",
                    [ledger.Posting("x", 1), ledger.Posting("y", -1)],
                )
            ],
            posted_at=NOW,
        )
    with pytest.raises(ledger.UnbalancedEntry):
        ledger.post([ledger.Entry("payment", 1, None, "EUR", "", [ledger.Posting("x", 1)])], posted_at=NOW)


def test_the_ledger_is_append_only(two_accounts: list[BillingAccount]) -> None:
    _issue_one(two_accounts[0])
    with pytest.raises(DatabaseError, match="append-only"), transaction.atomic():
        LedgerLine.objects.update(amount_minor=0)
    with pytest.raises(DatabaseError, match="append-only"), transaction.atomic():
        LedgerLine.objects.all().delete()


def test_ledger_check_catches_a_corrupted_entry(two_accounts: list[BillingAccount]) -> None:
    invoice = _issue_one(two_accounts[0])
    out = StringIO()
    call_command("ledger_check", stdout=out)
    assert out.getvalue().strip() == "ledger ok"
    with connection.cursor() as cursor:  # someone with the keys goes around the trigger
        cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")
        cursor.execute("ALTER TABLE invoicing_ledgerline DISABLE TRIGGER invoicing_ledgerline_append_only")
        cursor.execute(
            "UPDATE invoicing_ledgerline SET amount_minor = amount_minor + 1 WHERE ledger_account = 'receivable'"
        )
        cursor.execute("ALTER TABLE invoicing_ledgerline ENABLE TRIGGER invoicing_ledgerline_append_only")
    err = StringIO()
    with pytest.raises(SystemExit) as exited:
        call_command("ledger_check", stdout=StringIO(), stderr=err)
    assert exited.value.code == 1
    text = err.getvalue()
    assert "does not balance" in text
    assert f"account {invoice.account_id} EUR: receivable {invoice.total_minor + 1} in the ledger" in text


def test_ledger_check_catches_a_missing_posting_and_a_gap(two_accounts: list[BillingAccount]) -> None:
    invoice = _issue_one(two_accounts[0])
    Invoice.objects.filter(id=invoice.id).update(number="INV-2026-000002")  # a gap at 1
    with connection.cursor() as cursor:
        cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")
        cursor.execute("ALTER TABLE invoicing_ledgerentry DISABLE TRIGGER invoicing_ledgerentry_append_only")
        cursor.execute("ALTER TABLE invoicing_ledgerline DISABLE TRIGGER invoicing_ledgerline_append_only")
        cursor.execute("DELETE FROM invoicing_ledgerline")
        cursor.execute("DELETE FROM invoicing_ledgerentry")
        cursor.execute("ALTER TABLE invoicing_ledgerentry ENABLE TRIGGER invoicing_ledgerentry_append_only")
        cursor.execute("ALTER TABLE invoicing_ledgerline ENABLE TRIGGER invoicing_ledgerline_append_only")
    problems = ledger.check()
    assert f"invoice {invoice.id} has no ledger entry" in problems
    assert any("numbers are not exactly 1..1" in p for p in problems)


def test_write_off_and_void(two_accounts: list[BillingAccount]) -> None:
    account = two_accounts[0]
    promotional_credit(account.id, "10", reason="x")
    invoice = _issue_one(account)
    assert invoice.credits_applied_minor == 1000
    note = services.invoice_void(invoice_id=invoice.id, actor=FINANCE, reason="billed in error")
    invoice.refresh_from_db()
    assert invoice.status == InvoiceStatus.VOID
    assert note.total_minor == invoice.total_minor and note.number == "CN-2026-000001"
    assert services.credit_grant_create  # the credit came back:
    from invoicing.models import CreditGrant

    assert CreditGrant.objects.get(account_id=account.id).remaining_minor == 1000
    assert ledger.check() == []
    with pytest.raises(ApplicationError) as caught:
        services.invoice_write_off(invoice_id=invoice.id, actor=FINANCE, reason="x")
    assert caught.value.code == "invalid_transition"


def test_credit_notes_in_parts_never_reverse_more_vat_than_charged(two_accounts: list[BillingAccount]) -> None:
    account = two_accounts[0]
    rated(account.id, "2026-10-02", "compute.vcpu", "1", "0.07")  # 0.07 net, 21 % → 0.01 VAT
    services.period_close(period=PERIODS[2], actor=FINANCE, run_rollup=False, render_pdfs=False)
    invoice = Invoice.objects.get(account_id=account.id)
    assert invoice.tax_minor == 1
    taxes = []
    for net in (3, 3, 1):
        note = services.credit_note_issue(
            invoice_id=invoice.id,
            lines=[services.CreditNoteLineIn(description="part", amount_minor=net, sku="compute.vcpu")],
            reason="parts",
            actor=FINANCE,
        )
        taxes.append(note.tax_minor)
    assert sum(taxes) == invoice.tax_minor == 1
    invoice.refresh_from_db()
    # fully credited: nothing is owed any more, so the invoice is settled
    assert (invoice.amount_outstanding_minor, invoice.status) == (0, InvoiceStatus.PAID)
    assert ledger.check() == []
