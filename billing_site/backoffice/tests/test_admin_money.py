"""Money as money in the admin: every finance changelist and change page, with data, shows
``433.52 EUR``, never minor units or many-place decimals; and every finance list exports to CSV
exactly what it shows (its filters and search), money as decimal strings beside a currency."""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest
from django.test import override_settings

from accounts.models import BillingAccount
from antifraud.models import CreditLimitPolicy
from billing_site.common.actors import Actor
from conftest import Customer, operator
from invoicing import services as invoicing_services
from invoicing.models import ApprovalRequest, CreditGrant, CreditNote, Invoice, LedgerEntry
from invoicing.tests.factories import promotional_credit
from payments import charging, refunds
from payments import services as payments_services
from payments.models import DunningCase, Payment
from payments.tests.helpers import NOW, bind, issue_invoice

pytestmark = pytest.mark.clock(NOW)

FINANCE = Actor.operator(999001, "books@ops.test")


@pytest.fixture
def books(catalog: None, customer: Customer, make_account: Callable[..., BillingAccount]) -> dict[str, Any]:
    """An invoice of 4,335.20 EUR (433,520 minor units) paid by card and partly refunded, one of
    the same size left unpaid with a dunning case, a credit note, a grant, a four-eyes request."""
    account = make_account(customer.user, currency="EUR", country="NL")
    assert bind(customer.client, account).status_code == 201
    paid = issue_invoice(account, amount="3582.81")  # 3582.81 + 21 % VAT = 4335.20 EUR
    payment = Payment.objects.filter(invoice_id=paid.id).first() or charging.invoice_charge(
        invoice_id=paid.id, trigger="operator"
    )
    refunds.refund_issue(payment_id=payment.id, amount_minor=43352, reason="Outage", actor=FINANCE)
    other = make_account(customer.user, currency="EUR", country="NL")
    unpaid = issue_invoice(other, amount="3582.81")
    DunningCase.objects.create(
        account_id=other.id, invoice_id=unpaid.id, currency="EUR", first_failure_at=NOW, due_at=NOW
    )
    invoicing_services.credit_note_issue(
        invoice_id=unpaid.id,
        lines=[invoicing_services.CreditNoteLineIn(description="Outage", amount_minor=43352, sku="compute.vcpu")],
        reason="Outage",
        actor=FINANCE,
    )
    promotional_credit(account.id, "433.52", reason="x", actor=FINANCE)
    with override_settings(FOUR_EYES_THRESHOLDS={"EUR": "1.00"}):
        payments_services.refund_submit(payment_id=payment.id, amount_minor=43352, reason="More", actor=FINANCE)
    CreditLimitPolicy.objects.create(
        name="Default", currency="EUR", country="NL", initial_limit=Decimal("433.5200"), max_limit=Decimal("4335.2000")
    )
    return {"paid": paid, "unpaid": unpaid, "payment": payment, "account": account}


MINOR_UNITS = re.compile(r"(?<![\w./-])(433520|43352|350544|433522)(?![\w.])")  # amounts as integers
MANY_PLACES = re.compile(r"\b\d+\.\d{5,}\b")  # 433.520000000000 and the like

PAGES = [
    ("invoicing", "invoice", Invoice),
    ("invoicing", "creditnote", CreditNote),
    ("invoicing", "creditgrant", CreditGrant),
    ("invoicing", "ledgerentry", LedgerEntry),
    ("invoicing", "approvalrequest", ApprovalRequest),
    ("payments", "payment", Payment),
    ("payments", "refund", None),
    ("payments", "dunningcase", DunningCase),
    ("antifraud", "creditlimitpolicy", CreditLimitPolicy),
]


def test_money_is_shown_as_money_on_every_finance_list_and_page(books: dict[str, Any]) -> None:
    _user, admin = operator(["finance", "support", "fraud"])
    for app, model, cls in PAGES:
        listing = admin.get(f"/admin/{app}/{model}/")
        assert listing.status_code == 200, model
        pages = [listing.content.decode()]
        if cls is not None:
            for pk in cls.objects.values_list("pk", flat=True)[:5]:
                page = admin.get(f"/admin/{app}/{model}/{pk}/change/")
                assert page.status_code == 200, (model, pk)
                pages.append(page.content.decode())
        for html in pages:
            text = re.sub(r"<[^>]+>", " ", html)  # what a person reads, not the URLs and ids in tags
            assert not MINOR_UNITS.search(text), (model, MINOR_UNITS.search(text))
            assert not MANY_PLACES.search(text), (model, MANY_PLACES.search(text))
            assert "433.5200" not in text and "4335.2000" not in text, model  # limits kept with 4 places
    invoice_page = admin.get(f"/admin/invoicing/invoice/{books['paid'].pk}/change/").content.decode()
    assert "4335.20 EUR" in invoice_page and "433.52 EUR" in invoice_page
    assert "433.52 EUR" in admin.get("/admin/antifraud/creditlimitpolicy/").content.decode()


def export(client: Any, url: str, query: dict[str, str] | None = None) -> list[dict[str, str]]:
    response = client.get(url, query or {})
    assert response.status_code == 200 and response["Content-Type"].startswith("text/csv"), url
    text = b"".join(response.streaming_content).decode()
    return list(csv.DictReader(io.StringIO(text)))


def test_csv_exports_honour_the_filter_and_write_money_as_decimal_strings(books: dict[str, Any]) -> None:
    _user, finance = operator(["finance"])
    listing = finance.get("/admin/invoicing/invoice/", {"status__exact": "issued"}).content.decode()
    assert "/admin/invoicing/invoice/export.csv?status__exact=issued" in listing
    every = export(finance, "/admin/invoicing/invoice/export.csv")
    assert len(every) == 2
    issued = export(finance, "/admin/invoicing/invoice/export.csv", {"status__exact": "issued"})
    assert [(r["number"], r["status"], r["currency"], r["total"], r["credited"]) for r in issued] == [
        (books["unpaid"].number, "issued", "EUR", "4335.20", "524.56")
    ]
    found = export(finance, "/admin/invoicing/invoice/export.csv", {"q": books["paid"].number})
    assert [(r["status"], r["paid"], r["refunded"], r["outstanding"]) for r in found] == [
        ("paid", "4335.20", "433.52", "0.00")
    ]
    assert export(finance, "/admin/invoicing/invoice/export.csv", {"currency__exact": "USD"}) == []
    payments = export(finance, "/admin/payments/payment/export.csv", {"status__exact": "succeeded"})
    assert [(r["amount"], r["refunded"], r["currency"]) for r in payments] == [("4335.20", "433.52", "EUR")]
    refunds_ = export(finance, "/admin/payments/refund/export.csv")
    assert [(r["amount"], r["status"]) for r in refunds_] == [("433.52", "succeeded")]
    grants = export(finance, "/admin/invoicing/creditgrant/export.csv", {"kind__exact": "promotional"})
    assert [(r["amount"], r["remaining"], r["currency"]) for r in grants] == [("433.52", "433.52", "EUR")]
    notes = export(finance, "/admin/invoicing/creditnote/export.csv")
    # The refund's credit note (433.52 EUR incl. VAT) and the one by hand (433.52 EUR net).
    assert sorted((r["subtotal"], r["total"]) for r in notes) == [("358.28", "433.52"), ("433.52", "524.56")]
    requests = export(finance, "/admin/invoicing/approvalrequest/export.csv", {"status__exact": "pending"})
    assert [(r["kind"], r["amount"], r["requested_by"]) for r in requests] == [("refund", "433.52", FINANCE.name)]
    written_off = export(finance, "/admin/invoicing/invoice/export.csv", {"status__exact": "uncollectible"})
    assert written_off == []
    assert export(finance, "/admin/invoicing/taxrate/export.csv", {"country": "NL"})[0]["rate_percent"] == "21.00"
    assert len(export(finance, "/admin/payments/dunningcase/export.csv")) == 1
    _user, support = operator(["support"])
    assert support.get("/admin/invoicing/taxrate/export.csv").status_code == 403  # no view permission
