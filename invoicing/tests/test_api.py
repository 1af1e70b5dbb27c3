"""The customer API: invoices, PDFs, credit notes, balance; money formats; tenancy."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from rest_framework.test import APIClient

from accounts import services as account_services
from accounts.models import BillingAccount, Membership, Scope
from billing_site.common import ids
from conftest import Customer, client_with_key
from invoicing import services
from invoicing.models import Invoice, RenderedDocument
from invoicing.tests.factories import promotional_credit, rated
from invoicing.tests.support import FINANCE, NOW, OCTOBER

pytestmark = pytest.mark.clock(NOW)


@pytest.fixture
def billed(catalog: None, customer: Customer, make_account: Callable[..., BillingAccount]) -> BillingAccount:
    account = make_account(customer.user, currency="EUR", country="NL")
    rated(account.id, "2026-10-02", "compute.vcpu", "810", "10.125", resource_id="vm-1", labels={"project": "web"})
    rated(account.id, "2026-10-03", "network.egress", "30", "0", resource_id="vm-1")
    services.period_close(period=OCTOBER, actor=FINANCE, run_rollup=False, render_pdfs=False)
    return account


def url(account: BillingAccount, tail: str = "") -> str:
    return f"/api/v1/billing-accounts/{account.public_id}/{tail}"


def test_invoices_list_and_detail(customer: Customer, billed: BillingAccount) -> None:
    response = customer.client.get(url(billed, "invoices"))
    assert response.status_code == 200, response.json()
    [invoice] = response.json()["results"]
    assert invoice["number"] == "INV-2026-000001"
    assert invoice["status"] == "issued"
    assert (invoice["period_start"], invoice["period_end"]) == ("2026-10-01", "2026-11-01")
    assert invoice["currency"] == "EUR"
    money = {k: invoice[k] for k in ("subtotal", "tax", "total", "credits_applied", "amount_due", "amount_paid")}
    assert money == {
        "subtotal": "10.13",
        "tax": "2.13",
        "total": "12.26",
        "credits_applied": "0.00",
        "amount_due": "12.26",
        "amount_paid": "0.00",
    }
    assert invoice["tax_rate"] == "21.00"
    vcpu = next(line for line in invoice["lines"] if line["sku"] == "compute.vcpu")
    assert vcpu == {
        "position": vcpu["position"],
        "kind": "usage",
        "sku": "compute.vcpu",
        "usage_month": "2026-10",
        "description": "vCPU",
        "quantity": "810",
        "unit": "vcpu-hour",
        "unit_price": "0.0115",  # one EUR price all October (the USD one changed mid-month)
        "pricing": "flat",
        "amount": "10.13",
        "detail": vcpu["detail"],
    }
    assert vcpu["detail"]["resources"] == [{"key": "vm-1", "quantity": "810", "amount": "10.13"}]
    assert vcpu["detail"]["projects"] == [{"key": "web", "quantity": "810", "amount": "10.13"}]
    detail = customer.client.get(url(billed, f"invoices/{invoice['id']}"))
    assert detail.status_code == 200 and detail.json() == invoice


def test_the_invoice_pdf_is_rendered_once_and_kept(customer: Customer, billed: BillingAccount) -> None:
    invoice = Invoice.objects.get(account_id=billed.id)
    response = customer.client.get(url(billed, f"invoices/{invoice.public_id}/pdf"))
    assert response.status_code == 200
    assert response["Content-Type"] == "application/pdf"
    assert response.content.startswith(b"%PDF-")
    assert RenderedDocument.objects.filter(kind="invoice", source_id=invoice.id).count() == 1
    again = customer.client.get(url(billed, f"invoices/{invoice.public_id}/pdf"))
    assert again.content == response.content


def test_the_invoice_html_carries_the_legal_content(billed: BillingAccount) -> None:
    from invoicing import pdf

    invoice = Invoice.objects.get(account_id=billed.id)
    html = pdf.invoice_html(invoice)
    for text in (
        "INV-2026-000001",
        "Example Cloud B.V.",
        "NL000099998B57",
        billed.name,
        "2026-11-03",  # issue date
        "2026-10-01 \u2013 2026-10-31",  # supply period (en dash)
        "2026-11-17",  # due date
        "VAT 21 %",
        "10.13 EUR",
        "2.13 EUR",
        "12.26 EUR",
        "vm-1: 10.13",
    ):
        assert text in html, text


def test_credit_notes_and_balance(customer: Customer, billed: BillingAccount) -> None:
    invoice = Invoice.objects.get(account_id=billed.id)
    promotional_credit(billed.id, "5", reason="sorry")
    note = services.credit_note_issue(
        invoice_id=invoice.id,
        lines=[services.CreditNoteLineIn(description="Outage credit", amount_minor=100, sku="compute.vcpu")],
        reason="outage on 2026-10-02",
        actor=FINANCE,
    )
    response = customer.client.get(url(billed, "credit-notes"))
    assert response.status_code == 200
    [body] = response.json()["results"]
    assert body["number"] == "CN-2026-000001" == note.number
    assert (body["subtotal"], body["tax"], body["total"]) == ("1.00", "0.21", "1.21")
    assert body["invoice"] == invoice.public_id
    pdf = customer.client.get(url(billed, f"credit-notes/{note.public_id}/pdf"))
    assert pdf.status_code == 200 and pdf.content.startswith(b"%PDF-")
    balance = customer.client.get(url(billed, "balance"))
    assert balance.json() == {"balances": [{"currency": "EUR", "credits_available": "5.00", "outstanding": "11.05"}]}


def test_viewers_read_and_service_keys_with_accounts_read_too(
    billed: BillingAccount, make_customer: Callable[..., Customer]
) -> None:
    viewer = make_customer()
    Membership.objects.create(account=billed, user=viewer.user, role="viewer")
    assert viewer.client.get(url(billed, "invoices")).status_code == 200
    reader = account_services.service_key_create(name="r", scopes=[Scope.ACCOUNTS_READ], created_by_id=None)
    assert client_with_key(reader.raw).get(url(billed, "invoices")).status_code == 200
    writer = account_services.service_key_create(name="w", scopes=[Scope.USAGE_WRITE], created_by_id=None)
    assert client_with_key(writer.raw).get(url(billed, "invoices")).status_code == 404


@pytest.mark.parametrize("tail", ["invoices", "invoice", "invoice_pdf", "credit-notes", "credit_note_pdf", "balance"])
def test_another_tenant_gets_404_everywhere(
    tail: str, billed: BillingAccount, make_customer: Callable[..., Customer], make_account: Callable
) -> None:
    invoice = Invoice.objects.get(account_id=billed.id)
    note = services.credit_note_issue(
        invoice_id=invoice.id,
        lines=[services.CreditNoteLineIn(description="x", amount_minor=1)],
        reason="r",
        actor=FINANCE,
    )
    stranger = make_customer()
    own = make_account(stranger.user)
    paths = {
        "invoices": url(billed, "invoices"),
        "invoice": url(billed, f"invoices/{invoice.public_id}"),
        "invoice_pdf": url(billed, f"invoices/{invoice.public_id}/pdf"),
        "credit-notes": url(billed, "credit-notes"),
        "credit_note_pdf": url(billed, f"credit-notes/{note.public_id}/pdf"),
        "balance": url(billed, "balance"),
    }
    response = stranger.client.get(paths[tail])
    assert response.status_code == 404
    assert response.json()["code"] == "not_found"
    # …and someone else's invoice under one's own account is just as missing.
    if tail in ("invoice", "invoice_pdf"):
        assert stranger.client.get(paths[tail].replace(billed.public_id, own.public_id)).status_code == 404
    assert APIClient().get(paths[tail]).status_code == 401


def test_drafts_are_not_shown_to_customers(
    catalog: None, customer: Customer, make_account: Callable[..., BillingAccount]
) -> None:
    account = make_account(customer.user, currency="EUR")
    rated(account.id, "2026-10-02", "compute.vcpu", "1", "1")
    draft = services.invoice_draft_compute(account_id=account.id, period=OCTOBER)
    assert draft is not None
    assert customer.client.get(url(account, "invoices")).json()["results"] == []
    assert customer.client.get(url(account, f"invoices/{draft.public_id}")).status_code == 404
    assert customer.client.get(url(account, f"invoices/{ids.encode('inv', 12345)}")).status_code == 404
