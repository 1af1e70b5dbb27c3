"""What the documents say besides their lines: the seller's VAT and registration numbers and
bank details (settings checked by ``manage.py check``), one typeface and one minus sign on
the PDFs. Checked where a customer reads them: the API and the text laid out on the PDF."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable
from decimal import Decimal
from io import StringIO
from typing import Any

import pytest
import time_machine
from django.core import checks
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from stdnum.eu import vat as eu_vat

from accounts.models import BillingAccount
from billing_site.common.actors import Actor
from conftest import Customer
from invoicing import pdf, services
from invoicing.checks import seller_is_complete
from invoicing.models import Invoice, LineKind
from invoicing.periods import Period
from invoicing.tests.factories import ContractDiscountFactory, promotional_credit, rated
from invoicing.tests.readers import api_invoice, laid_out

NOW = dt.datetime(2026, 11, 3, 9, 0, tzinfo=dt.UTC)
OCTOBER = Period(dt.date(2026, 10, 1))
FINANCE = Actor.system("tests")


# --- The seller


pytestmark = pytest.mark.clock(NOW)


@pytest.fixture
def billed(catalog: None, customer: Customer, make_account: Callable[..., BillingAccount]) -> Invoice:
    with time_machine.travel(NOW, tick=False):
        account = make_account(customer.user, currency="EUR", country="NL", name="Buyer BV")
        rated(account.id, "2026-10-02", "compute.vcpu", "810", "10.125", resource_id="vm-1")
        services.period_close(period=OCTOBER, actor=FINANCE, run_rollup=False, render_pdfs=False)
    return Invoice.objects.get(account_id=account.id)


SELLER = {
    "name": "Example Cloud B.V.",
    "address": ["Keizersgracht 1", "1015 CJ Amsterdam", "Netherlands"],
    "country": "NL",
    "vat_id": "NL000099998B57",
    "registration_id": "90000001",
    "email": "billing@example.test",
    "iban": "NL74EXMP0123456789",
    "bic": "EXMPNL2A",
    "bank_name": "Example Bank N.V.",
}


@pytest.mark.django_db
def test_the_invoice_and_credit_note_carry_the_sellers_registration_and_bank_details(
    billed: Invoice, customer: Customer
) -> None:
    assert billed.seller == SELLER
    assert api_invoice(BillingAccount.objects.get(id=billed.account_id))["seller"] == SELLER
    with time_machine.travel(NOW, tick=False):
        note = services.credit_note_issue(
            invoice_id=billed.id,
            lines=[services.CreditNoteLineIn(description="Outage credit", amount_minor=100)],
            reason="outage",
            actor=FINANCE,
        )
    account = BillingAccount.objects.get(id=billed.account_id)
    notes = customer.client.get(f"/api/v1/billing-accounts/{account.public_id}/credit-notes").json()["results"]
    assert [body["seller"] for body in notes] == [SELLER]
    for html in (pdf.invoice_html(billed), pdf.credit_note_html(note)):
        text = " ".join(laid_out(html)[0])
        for printed in (
            "VAT NL000099998B57",
            "KvK (Chamber of Commerce) 90000001",
            "Example Bank N.V.",
            "IBAN NL74 EXMP 0123 4567 89",
            "BIC EXMPNL2A",
            "KvK 90000001 · page 1 of 1",  # the footer
        ):
            assert printed in text, printed
    assert "to IBAN NL74 EXMP 0123 4567 89 (BIC EXMPNL2A, Example Bank N.V.) quoting" in pdf.invoice_html(billed)


@pytest.mark.django_db
def test_an_invoice_issued_before_the_bank_details_existed_still_prints(billed: Invoice) -> None:
    Invoice.objects.filter(id=billed.id).update(
        seller={key: SELLER[key] for key in ("name", "address", "country", "vat_id", "email")}
    )
    billed.refresh_from_db()
    text = " ".join(laid_out(pdf.invoice_html(billed))[0])
    assert "VAT NL000099998B57" in text and "IBAN" not in text and "KvK" not in text
    body = api_invoice(BillingAccount.objects.get(id=billed.account_id))
    assert body["seller"]["iban"] == "" and body["seller"]["registration_id"] == ""


@pytest.mark.django_db
def test_the_demo_seller_has_its_own_valid_vat_number() -> None:
    from django.conf import settings

    call_command("load_demo_data", "--force", stdout=StringIO())
    customers = set(BillingAccount.objects.exclude(tax_id="").values_list("tax_id", flat=True))
    assert customers and settings.INVOICING_SELLER_VAT_ID not in customers
    assert settings.INVOICING_SELLER_VAT_ID.startswith("NL") and eu_vat.is_valid(settings.INVOICING_SELLER_VAT_ID)
    assert seller_is_complete() == []


@pytest.mark.parametrize(
    ("setting", "value", "error"),
    [
        ("INVOICING_SELLER_VAT_ID", "NL000099998B58", "invoicing.E001"),  # checksum
        ("INVOICING_SELLER_VAT_ID", "DE136695976", "invoicing.E001"),  # not of the seller's country
        ("INVOICING_SELLER_REGISTRATION_ID", "", "invoicing.E002"),
        ("INVOICING_SELLER_REGISTRATION_ID", "1234567", "invoicing.E002"),  # a KvK number has 8 digits
        ("INVOICING_SELLER_IBAN", "NL75EXMP0123456789", "invoicing.E003"),  # check digits
        ("INVOICING_SELLER_IBAN", "", "invoicing.E003"),
        ("INVOICING_SELLER_BIC", "EXMP-NL", "invoicing.E004"),
        ("INVOICING_SELLER_BIC", "EXMPDEFF", "invoicing.E005"),  # a German bank for a Dutch IBAN
        ("INVOICING_SELLER_BIC", "INGBNL2A", "invoicing.E005"),  # another Dutch bank than the IBAN's
        ("INVOICING_SELLER_BANK_NAME", "", "invoicing.E006"),
    ],
)
def test_check_refuses_a_seller_who_cannot_send_an_invoice(settings: Any, setting: str, value: str, error: str) -> None:
    setattr(settings, setting, value)
    assert [message.id for message in seller_is_complete()] == [error]
    assert error in [message.id for message in checks.run_checks(tags=["invoicing"])]
    with pytest.raises(SystemCheckError, match=error):
        call_command("check", stdout=StringIO(), stderr=StringIO())


def test_another_countrys_seller_is_checked_by_that_countrys_rules(settings: Any) -> None:
    settings.INVOICING_SELLER_COUNTRY = "DE"
    settings.INVOICING_SELLER_VAT_ID = "DE136695976"
    settings.INVOICING_SELLER_REGISTRATION_ID = "HRB 12345, Amtsgericht Berlin"
    settings.INVOICING_SELLER_IBAN = "DE89370400440532013000"
    settings.INVOICING_SELLER_BIC = "COBADEFFXXX"
    assert seller_is_complete() == []


# --- One typeface, one minus sign


@pytest.fixture
def discounted(catalog: None, customer: Customer, make_account: Callable[..., BillingAccount]) -> Invoice:
    """An invoice with each kind of negative figure: a discount line, a negative late-usage
    adjustment (September's usage rerated down after its invoice) and credits applied."""
    september = Period(dt.date(2026, 9, 1))
    account = make_account(customer.user, currency="EUR", country="NL", name="Negative BV")
    with time_machine.travel(dt.datetime(2026, 10, 2, 9, 0, tzinfo=dt.UTC), tick=False):
        rated(account.id, "2026-09-10", "network.egress", "500", "33.20")
        services.period_close(period=september, actor=FINANCE, run_rollup=False, render_pdfs=False)
    with time_machine.travel(NOW, tick=False):
        rated(account.id, "2026-09-10", "network.egress", "-100", "-6.64")
        rated(account.id, "2026-10-02", "compute.vcpu", "100000", "1150", resource_id="vm-1")
        ContractDiscountFactory(account_id=account.id, percent=Decimal(10))
        promotional_credit(account.id, "5", reason="hi")
        services.period_close(period=OCTOBER, actor=FINANCE, run_rollup=False, render_pdfs=False)
    return Invoice.objects.get(account_id=account.id, period_start=OCTOBER.start)


@pytest.mark.django_db
def test_every_negative_figure_on_the_pdf_has_the_same_minus_sign_and_the_api_keeps_ascii(
    discounted: Invoice,
) -> None:
    kinds = {line.kind for line in discounted.lines.all() if line.amount_minor < 0}
    assert kinds == {LineKind.DISCOUNT, LineKind.ADJUSTMENT} and discounted.credits_applied_minor == 500
    texts, _, _ = laid_out(pdf.invoice_html(discounted))
    negatives = [text for text in texts if re.match(r"^[-\u2212\u2013\u2012\u2010]\s*\d", text)]
    assert "\u2212115.00 EUR" in negatives  # the discount
    assert "\u22126.64 EUR" in negatives and "\u2212100" in negatives  # the adjustment, amount and quantity
    assert "\u22125.00 EUR" in negatives  # credits applied
    assert all(text.startswith("\u2212") for text in negatives), negatives
    body = api_invoice(BillingAccount.objects.get(id=discounted.account_id))
    assert sorted(line["amount"] for line in body["lines"] if line["amount"].startswith("-")) == ["-115.00", "-6.64"]


@pytest.mark.django_db
def test_the_pdfs_are_set_in_one_typeface_footer_included(discounted: Invoice) -> None:
    with time_machine.travel(NOW, tick=False):
        note = services.credit_note_issue(
            invoice_id=discounted.id,
            lines=[services.CreditNoteLineIn(description="Outage credit", amount_minor=100)],
            reason="outage",
            actor=FINANCE,
        )
    for html in (pdf.invoice_html(discounted), pdf.credit_note_html(note)):
        texts, asked, embedded = laid_out(html)
        assert any("page 1 of 1" in text for text in texts)  # the footer was laid out
        assert asked == {("DejaVu Sans", "sans-serif")}
        assert embedded == {"DejaVu Sans"}  # regular and bold of one family, nothing else
