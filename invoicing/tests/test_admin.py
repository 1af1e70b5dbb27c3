"""Finance works invoices from the admin: filters, the invoice page with its PDF and ledger,
void / write-off / credit note with a reason, credit grants, tax rates, the period close."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

import pytest
import time_machine
from django.db import transaction

from accounts.models import BillingAccount
from billing_site.common import ids
from billing_site.common.actors import Actor
from billing_site.common.errors import ApplicationError
from conftest import Customer
from invoicing import ledger, services
from invoicing.models import CreditGrant, CreditNote, Invoice, InvoiceStatus, LedgerEntry, TaxRate
from invoicing.tests.factories import promotional_credit, rated
from invoicing.tests.support import NOW, OCTOBER, operator

pytestmark = pytest.mark.clock(NOW)


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


def test_invoice_list_names_the_customer_in_one_query_for_the_page(
    invoice: Invoice, customer: Customer, make_account: Callable[..., BillingAccount]
) -> None:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    finance = operator("finance")
    finance.get("/admin/invoicing/invoice/")  # warm the session and permission caches
    with CaptureQueriesContext(connection) as one:
        page = finance.get("/admin/invoicing/invoice/").content.decode()
    assert "Admin Test BV" in page and ids.encode("acc", invoice.account_id) in page
    for name in ("Second BV", "Third BV"):
        other = make_account(customer.user, currency="EUR", country="NL", name=name)
        rated(other.id, "2026-10-03", "compute.vcpu", "1", "1")
    services.period_close(period=OCTOBER, actor=Actor.system("tests"), run_rollup=False, render_pdfs=False)
    with CaptureQueriesContext(connection) as three:
        page = finance.get("/admin/invoicing/invoice/").content.decode()
    assert "Second BV" in page and "Third BV" in page
    assert len(three) == len(one)  # the names come with the page's query, not one query per row
    by_customer = finance.get("/admin/invoicing/invoice/", {"o": "-2"}).context["cl"].result_list
    assert [i.account_name for i in by_customer] == ["Third BV", "Second BV", "Admin Test BV"]  # sortable by name


def test_invoice_page_shows_the_parties_readably(invoice: Invoice) -> None:
    Invoice.objects.filter(pk=invoice.pk).update(buyer={**invoice.buyer, "name": "<i>Admin</i> Test BV"})
    page = operator("finance").get(f"/admin/invoicing/invoice/{invoice.pk}/change/").content.decode()
    assert '<dl class="key-values"><dt>Name</dt><dd>&lt;i&gt;Admin&lt;/i&gt; Test BV</dd><dt>Account</dt>' in page
    assert "<i>Admin</i>" not in page  # escaped
    assert "<dt>VAT number</dt>" in page
    assert '"account":' not in page and "&quot;account&quot;" not in page and "&quot;vat_id&quot;" not in page


def test_credit_grant_added_message_currency_and_places(invoice: Invoice) -> None:
    finance = operator("finance")
    account = ids.encode("acc", invoice.account_id)
    base = {"account": account, "kind": "promotional", "reason": "launch"}
    added = finance.post("/admin/invoicing/creditgrant/add/", {**base, "amount": "25", "currency": "eur"}, follow=True)
    page = added.content.decode()
    assert "Promotional credit of 25.00 EUR" in page and "was added successfully" in page
    assert "None" not in page.split('class="messagelist"')[1].split("</ul>")[0]
    blank = finance.post("/admin/invoicing/creditgrant/add/", {**base, "amount": "5.50", "currency": ""})
    assert blank.status_code == 302  # blank currency: the account's
    assert sorted(CreditGrant.objects.values_list("currency", "amount_minor")) == [("EUR", 550), ("EUR", 2500)]
    assert "Admin Test BV" in finance.get("/admin/invoicing/creditgrant/").content.decode()

    refused = {
        ("25.005", "EUR"): "Amount: EUR amounts have at most 2 decimal places",
        ("1e3", "EUR"): "Amount: enter an amount in plain decimal notation",
        ("0", "EUR"): "Amount: the amount must be more than zero",
        ("25", "EURO"): "Ensure this value has at most 3 characters",
        ("25", "XYZ"): "XYZ is not an ISO 4217 currency code",
        ("25", "usd"): "The account is billed in EUR. Credit is granted in the account&#x27;s currency.",
    }
    for (amount, currency), message in refused.items():
        page = finance.post("/admin/invoicing/creditgrant/add/", {**base, "amount": amount, "currency": currency})
        assert page.status_code == 200 and message in page.content.decode(), (amount, currency)
    assert CreditGrant.objects.count() == 2


def test_credit_note_amount_takes_the_invoice_currency_places(invoice: Invoice) -> None:
    finance = operator("finance")
    url = f"/admin/invoicing/invoice/{invoice.pk}/action/credit_note/"
    base = {"description": "Outage", "sku": "compute.vcpu", "reason": "outage"}
    for amount, message in (
        ("10.005", "Amount: EUR amounts have at most 2 decimal places"),
        ("1e1", "Amount: enter an amount in plain decimal notation"),
        ("-1", "Amount: the amount must be more than zero"),
    ):
        page = finance.post(url, {**base, "amount": amount})
        assert page.status_code == 200 and message in page.content.decode(), amount
    assert not CreditNote.objects.exists()
    assert finance.post(url, {**base, "amount": "10.50"}).status_code == 302
    page = finance.get(f"/admin/invoicing/invoice/{invoice.pk}/change/").content.decode()
    assert "12.71 EUR" in page and "minor units" not in page  # the credit note's total as money


def test_ledger_and_tax_rate_lists_name_things_people_know(invoice: Invoice) -> None:
    finance = operator("finance")
    page = finance.get("/admin/invoicing/ledgerentry/").content.decode()
    assert invoice.public_id in page and "Admin Test BV" in page
    assert f">{invoice.account_id}<" not in page and f">{invoice.id}<" not in page
    entry = LedgerEntry.objects.get(source_type="invoice", source_id=invoice.id)
    detail = finance.get(f"/admin/invoicing/ledgerentry/{entry.pk}/change/").content.decode()
    assert "121.00 EUR" in detail and "receivable: 121.00 EUR" in detail
    rates = finance.get("/admin/invoicing/taxrate/").content.decode()
    assert "?country=NL" in rates and "Netherlands (NL)" in rates
    in_use = set(TaxRate.objects.values_list("country", flat=True))
    assert "US" not in in_use and "?country=US" not in rates and "Afghanistan" not in rates


def test_invoicing_admin_reaches_accounts_only_through_selectors_and_services() -> None:
    import ast
    from pathlib import Path

    import invoicing.admin

    tree = ast.parse(Path(invoicing.admin.__file__).read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert not {name for name in imported if name and name.startswith("accounts") and name != "accounts"}
    names = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module == "accounts"
        for alias in node.names
    }
    assert names <= {"selectors", "services"}


def test_a_credit_note_on_a_paid_invoice_is_settled_as_credit_from_the_admin(invoice: Invoice) -> None:
    with transaction.atomic():
        services.payment_apply(invoice_id=invoice.id, amount_minor=12100, currency="EUR", reference="pay_admin")
    finance = operator("finance")
    url = f"/admin/invoicing/invoice/{invoice.pk}/action/credit_note/"
    form = finance.get(url).content.decode()
    assert "As customer credit" in form and "Payments → Refund" in form
    base = {"description": "Outage", "amount": "10", "sku": "compute.vcpu", "reason": "outage"}
    assert finance.post(url, base).status_code == 200  # the settlement is asked for
    assert not CreditNote.objects.exists()
    response = finance.post(url, {**base, "settle": "credit"}, follow=True)
    assert "12.10 EUR kept as customer credit" in response.content.decode()
    grant = CreditGrant.objects.get()
    assert (grant.kind, grant.amount_minor, grant.granted_by) == ("overpayment", 1210, "finance@ops.test")
    page = finance.get(f"/admin/invoicing/invoice/{invoice.pk}/change/").content.decode()
    assert "<h2>Refunds</h2>" in page and "Kept as customer credit" in page and grant.public_id in page
    assert "customer_credit: -12.10 EUR" in page  # the settlement's ledger entry, on the invoice page
    grants = finance.get("/admin/invoicing/creditgrant/").content.decode()
    assert "Overpayment kept as credit" in grants
    assert 'value="overpayment"' not in finance.get("/admin/invoicing/creditgrant/add/").content.decode()
    assert ledger.check() == []


def test_the_credit_note_form_of_a_partly_paid_invoice_says_where_the_excess_goes(invoice: Invoice) -> None:
    with transaction.atomic():
        services.payment_apply(invoice_id=invoice.id, amount_minor=100, currency="EUR", reference="pay_part")
    form = operator("finance").get(f"/admin/invoicing/invoice/{invoice.pk}/action/credit_note/").content.decode()
    assert "beyond the outstanding amount is kept as customer credit" in form and "settle" not in form


def test_a_credit_grant_page_opens_for_finance_and_support(invoice: Invoice) -> None:
    grant = promotional_credit(invoice.account_id, "25", reason="launch")
    for group in ("finance", "support"):
        page = operator(group).get(f"/admin/invoicing/creditgrant/{grant.pk}/change/")
        assert page.status_code == 200, group
        text = page.content.decode()
        assert "25.00 EUR" in text and "Promotional" in text and "launch" in text and "Admin Test BV" in text


def test_no_credit_is_granted_to_a_closed_account(invoice: Invoice) -> None:
    from accounts.models import BillingAccount

    BillingAccount.objects.filter(id=invoice.account_id).update(state="closed")
    with pytest.raises(ApplicationError) as refused:
        promotional_credit(invoice.account_id, "25", reason="goodwill")
    assert (refused.value.code, refused.value.status) == ("account_closed", 409)
    page = operator("finance").post(
        "/admin/invoicing/creditgrant/add/",
        {
            "account": ids.encode("acc", invoice.account_id),
            "kind": "promotional",
            "amount": "25",
            "currency": "EUR",
            "reason": "goodwill",
        },
    )
    assert page.status_code == 200 and "The account is closed" in page.content.decode()
    assert not CreditGrant.objects.exists() and not LedgerEntry.objects.filter(source_type="credit_grant").exists()


def test_the_invoice_page_offers_what_the_invoice_allows(invoice: Invoice) -> None:
    """The rules live on the invoice (``can_void`` …), the services enforce them, the page asks them."""
    finance = operator("finance")

    def offered() -> set[str]:
        page = finance.get(f"/admin/invoicing/invoice/{invoice.pk}/change/").content.decode()
        return {name for name in ("void", "write_off", "credit_note") if f"/action/{name}/" in page}

    def allowed() -> set[str]:
        fresh = Invoice.objects.get(pk=invoice.pk)
        rules = {"void": fresh.can_void(), "write_off": fresh.can_write_off(), "credit_note": fresh.can_credit()}
        return {name for name, ok in rules.items() if ok}

    assert offered() == allowed() == {"void", "write_off", "credit_note"}
    with transaction.atomic():
        services.payment_apply(invoice_id=invoice.id, amount_minor=100, currency="EUR", reference="pay_part")
    assert offered() == allowed() == {"write_off", "credit_note"}  # something paid: no void
    with pytest.raises(ApplicationError) as refused:
        services.invoice_void(invoice_id=invoice.id, reason="duplicate", actor=Actor.system("tests"))
    assert refused.value.code == "invoice_paid"
    with transaction.atomic():
        services.payment_apply(invoice_id=invoice.id, amount_minor=12000, currency="EUR", reference="pay_rest")
    assert offered() == allowed() == {"credit_note"}  # paid
    with pytest.raises(ApplicationError) as refused:
        services.invoice_write_off(invoice_id=invoice.id, reason="gone", actor=Actor.system("tests"))
    assert refused.value.code == "invalid_transition"


def test_an_invoice_moves_through_the_one_transition_helper(invoice: Invoice, caplog: pytest.LogCaptureFixture) -> None:
    """Voided from the admin: locked, audited with who and why, one log line with ids and no email."""
    caplog.set_level("INFO")
    finance = operator("finance")
    assert (
        finance.post(f"/admin/invoicing/invoice/{invoice.pk}/action/void/", {"reason": "duplicate"}).status_code == 302
    )
    audit = invoice.transitions.first()
    assert audit is not None
    assert (audit.from_state, audit.to_state, audit.actor_kind, audit.actor_name) == (
        "issued",
        "void",
        "operator",
        "finance@ops.test",
    )
    assert audit.reason.startswith("duplicate (credit note CN-")
    [line] = [r for r in caplog.records if r.getMessage() == "invoicing.invoice_transition"]
    fields = vars(line)
    assert (fields["invoice_id"], fields["from"], fields["to"], fields["transition"]) == (
        invoice.public_id,
        "issued",
        "void",
        "void",
    )
    assert fields["actor_kind"] == "operator" and fields["actor_user_id"]
    assert "finance@" not in str(fields)
