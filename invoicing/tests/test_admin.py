"""Finance works invoices from the admin: filters, the invoice page with its PDF and ledger,
void / write-off / credit note with a reason, credit grants, tax rates, the period close."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

import pytest
import time_machine
from django.test import Client

from accounts import services as account_services
from accounts.models import BillingAccount
from billing_site.common.actors import Actor
from conftest import Customer
from invoicing import ledger, services
from invoicing.billing import Period
from invoicing.models import CreditGrant, CreditNote, Invoice, InvoiceStatus, TaxRate
from invoicing.tests.factories import rated

NOW = dt.datetime(2026, 11, 3, 9, 0, tzinfo=dt.UTC)
OCTOBER = Period(dt.date(2026, 10, 1))


@pytest.fixture(autouse=True)
def _clock() -> object:
    with time_machine.travel(NOW, tick=False) as traveller:
        yield traveller


def operator(group: str) -> Client:
    user = account_services.operator_create(email=f"{group}@ops.test", password="pw-long-enough", groups=[group])
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture
def invoice(catalog: None, customer: Customer, make_account: Callable[..., BillingAccount]) -> Invoice:
    account = make_account(customer.user, currency="EUR", country="NL", name="Admin Test BV")
    rated(account.id, "2026-10-02", "compute.vcpu", "100", "100")
    services.period_close(period=OCTOBER, actor=Actor.system("tests"), run_rollup=False, render_pdfs=False)
    return Invoice.objects.get(account_id=account.id)


def test_invoice_list_filters_and_search(invoice: Invoice) -> None:
    finance = operator("finance")
    for query in (
        {"q": invoice.number},
        {"q": invoice.public_id},
        {"status__exact": "issued", "period": "2026-10", "currency__exact": "EUR"},
        {"overdue": "no"},
    ):
        page = finance.get("/admin/invoicing/invoice/", query)
        assert page.status_code == 200 and invoice.number.encode() in page.content, query
    assert invoice.number.encode() not in finance.get("/admin/invoicing/invoice/", {"overdue": "yes"}).content
    with time_machine.travel(NOW + dt.timedelta(days=30), tick=False):
        finance = operator("finance")  # a fresh login: the first one's session has expired
        assert invoice.number.encode() in finance.get("/admin/invoicing/invoice/", {"overdue": "yes"}).content


def test_invoice_page_shows_lines_ledger_pdf_and_actions(invoice: Invoice) -> None:
    finance = operator("finance")
    page = finance.get(f"/admin/invoicing/invoice/{invoice.pk}/change/").content.decode()
    assert "vCPU" in page and "121.00 EUR" in page
    assert "receivable: 121.00 EUR" in page and "vat_payable:NL: -21.00 EUR" in page
    for action in ("void", "write_off", "credit_note"):
        assert f"/admin/invoicing/invoice/{invoice.pk}/action/{action}/" in page
    pdf = finance.get(f"/admin/invoicing/invoice/{invoice.pk}/pdf/")
    assert pdf.status_code == 200 and pdf.content.startswith(b"%PDF-")
    support = operator("support")
    assert support.get(f"/admin/invoicing/invoice/{invoice.pk}/change/").status_code == 200
    assert "action/write_off" not in support.get(f"/admin/invoicing/invoice/{invoice.pk}/change/").content.decode()
    assert support.post(f"/admin/invoicing/invoice/{invoice.pk}/action/write_off/", {"reason": "x"}).status_code == 403


def test_credit_note_then_write_off_from_the_admin(invoice: Invoice) -> None:
    finance = operator("finance")
    url = f"/admin/invoicing/invoice/{invoice.pk}/action/"
    assert (
        finance.post(url + "credit_note/", {"description": "Outage", "amount": "10", "reason": ""}).status_code == 200
    )
    assert not CreditNote.objects.exists()  # no reason, nothing written
    response = finance.post(
        url + "credit_note/", {"description": "Outage", "amount": "10", "sku": "compute.vcpu", "reason": "outage"}
    )
    assert response.status_code == 302
    note = CreditNote.objects.get()
    assert (note.subtotal_minor, note.tax_minor, note.total_minor) == (1000, 210, 1210)
    assert finance.post(url + "write_off/", {"reason": "customer bankrupt"}).status_code == 302
    invoice.refresh_from_db()
    assert invoice.status == InvoiceStatus.UNCOLLECTIBLE and invoice.written_off_minor == 12100 - 1210
    assert invoice.transitions.first().reason == "customer bankrupt"  # type: ignore[union-attr]
    assert ledger.check() == []


def test_void_from_the_admin(invoice: Invoice) -> None:
    finance = operator("finance")
    assert (
        finance.post(f"/admin/invoicing/invoice/{invoice.pk}/action/void/", {"reason": "duplicate"}).status_code == 302
    )
    invoice.refresh_from_db()
    assert invoice.status == InvoiceStatus.VOID
    assert CreditNote.objects.get().total_minor == invoice.total_minor


def test_finance_grants_credit_and_edits_tax_rates(invoice: Invoice) -> None:
    finance = operator("finance")
    account_id = invoice.account_id
    from billing_site.common import ids

    response = finance.post(
        "/admin/invoicing/creditgrant/add/",
        {
            "account": ids.encode("acc", account_id),
            "kind": "promotional",
            "amount": "25",
            "currency": "EUR",
            "reason": "launch",
        },
    )
    assert response.status_code == 302, response.content.decode()[:2000]
    wrong = finance.post(
        "/admin/invoicing/creditgrant/add/",
        {
            "account": ids.encode("acc", account_id),
            "kind": "promotional",
            "amount": "25",
            "currency": "USD",
            "reason": "x",
        },
    )
    assert wrong.status_code == 200 and b"The account is billed in EUR." in wrong.content
    grant = CreditGrant.objects.get()
    assert (grant.amount_minor, grant.granted_by) == (2500, "finance@ops.test")
    assert finance.get("/admin/invoicing/taxrate/").status_code == 200
    rate = TaxRate.objects.get(country="NL")
    response = finance.post(
        f"/admin/invoicing/taxrate/{rate.pk}/change/",
        {"country": "NL", "rate": "21.00", "valid_from": "2024-01-01", "valid_until": "2027-01-01", "note": "ends"},
    )
    assert response.status_code == 302
    assert TaxRate.objects.get(pk=rate.pk).valid_until == dt.date(2027, 1, 1)


# Committing for real: the run rolls usage up first, shard by shard, each shard its own
# transaction (inside one test transaction their locks would pile up).
@pytest.mark.django_db(transaction=True)
def test_period_close_previews_then_runs(catalog: None, customer: Customer, make_account: Callable) -> None:
    accounts = [make_account(customer.user, currency=c, country="US") for c in ("EUR", "EUR", "JPY")]
    for account in accounts:
        rated(account.id, "2026-10-02", "compute.vcpu", "1", "10.5")
    finance = operator("finance")
    page = finance.get("/admin/invoicing/invoice/period-close/")
    assert page.status_code == 200 and b"2026-10" in page.content
    preview = finance.post("/admin/invoicing/invoice/period-close/", {"period": "2026-10", "preview": "1"})
    text = preview.content.decode()
    assert "Total EUR</th><td>21.00" in text and "Total JPY</th><td>11" in text
    assert not Invoice.objects.exists()
    assert b"only past periods" in finance.post("/admin/invoicing/invoice/period-close/", {"period": "2026-11"}).content
    started = finance.post("/admin/invoicing/invoice/period-close/", {"period": "2026-10", "start": "1"})
    assert started.status_code == 302
    assert Invoice.objects.count() == 3  # no broker in tests: the task ran inline
    assert operator("support").get("/admin/invoicing/invoice/period-close/").status_code == 403
