"""The customer page and the search, as staff use them: one page by the ``acc_…`` id shows every
section of an account with invoices, payments, a refund, a dispute, a card, a grant, a risk
assessment and notes; the timeline is newest first; a note is added; a transition goes through
the service with its reason; the search finds by every kind and lands on the page for an exact
invoice number; another account's data never shows; the page's queries are bounded."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from django.urls import reverse

from accounts import services as account_services
from accounts.models import AccountNote, AccountState, BillingAccount, BillingAccountTransition
from billing_site.common.actors import Actor
from conftest import Customer, operator
from invoicing import services as invoicing_services
from invoicing.models import CreditNote, Invoice, InvoiceStatus
from invoicing.tests.factories import promotional_credit, rated
from payments import charging, disputes, refunds
from payments.models import Dispute, Payment, PaymentMethod, PaymentStatus, Refund
from payments.tests.helpers import FINANCE, NOW, bind, issue_invoice

pytestmark = [pytest.mark.django_db, pytest.mark.clock(NOW)]


@dataclass
class Book:
    account: BillingAccount
    invoice: Invoice
    payment: Payment
    refund: Refund
    dispute: Dispute
    card: PaymentMethod
    credit_note: CreditNote
    other: BillingAccount
    other_invoice: Invoice
    other_payment: Payment


@pytest.fixture
def book(
    catalog: None,
    make_customer: Callable[..., Customer],
    make_account: Callable[..., BillingAccount],
) -> Book:
    customer = make_customer(email="owner@paying.test")
    account = make_account(
        customer.user,
        currency="EUR",
        country="NL",
        name="Paying BV",
        email="billing@paying.test",
        tax_id="NL004495445B01",
    )
    assert bind(customer.client, account).status_code == 201
    card = PaymentMethod.objects.get(account_id=account.id)
    account.refresh_from_db()
    if account.state == AccountState.PENDING:  # activated after the binding's commit, which a test never sees
        account_services.billing_account_transition(account_id=account.id, transition="activate", actor=FINANCE)
    invoice = issue_invoice(account)  # October: 100 EUR of compute + 21 % VAT = 121.00 EUR
    rated(account.id, "2026-09-10", "storage.gb", "50", "12.5")
    rated(account.id, "2026-10-05", "storage.gb", "50", "7.25")
    payment = charging.invoice_charge(invoice_id=invoice.id, trigger="operator")
    assert payment.status == PaymentStatus.SUCCEEDED
    refund = refunds.refund_issue(payment_id=payment.id, amount_minor=500, reason="goodwill", actor=FINANCE)
    dispute = disputes.dispute_opened(
        gateway=payment.gateway,
        gateway_dispute_id="dp_page_1",
        charge_id=payment.gateway_charge_id,
        intent_id=payment.gateway_intent_id or "",
        amount_minor=1000,
        currency="EUR",
        reason="fraudulent",
    )
    assert dispute is not None
    promotional_credit(account.id, "25.00", reason="welcome credit")
    account_services.account_note_add(
        account_id=account.id,
        text="Called about the October invoice.",
        actor=Actor.operator(None, "support@ops.test"),  # type: ignore[arg-type]
    )
    credit_note = CreditNote.objects.get(account_id=account.id)  # the refund's

    other_customer = make_customer(email="owner@other.test")
    other = make_account(other_customer.user, currency="EUR", country="NL", name="Other GmbH", email="x@other.test")
    assert bind(other_customer.client, other, "pm_card_mastercard").status_code == 201
    other_invoice = issue_invoice(other, amount="70")
    other_payment = charging.invoice_charge(invoice_id=other_invoice.id, trigger="operator")
    account_services.account_note_add(account_id=other.id, text="Secret of the other one.", actor=FINANCE)
    return Book(account, invoice, payment, refund, dispute, card, credit_note, other, other_invoice, other_payment)


def page_url(account: BillingAccount) -> str:
    return f"/admin/accounts/billingaccount/{account.public_id}/"


def section(html: str, name: str) -> str:
    match = re.search(rf'<section id="{name}"[^>]*>(.*?)</section>', html, re.S)
    assert match, f"no section {name}"
    return match.group(1)


def test_the_page_by_the_public_id_shows_every_section(book: Book) -> None:
    _, client = operator(["support"])
    assert reverse("backoffice:customer", args=[book.account.id]) == page_url(book.account)
    response = client.get(page_url(book.account))
    assert response.status_code == 200
    html = response.content.decode()
    profile = section(html, "profile")
    assert "Paying BV" in profile and "billing@paying.test" in profile and "NL004495445B01" in profile
    assert "Active" in profile
    assert "owner@paying.test" in section(html, "members")
    assert "active" in section(html, "members")  # the owner's API key (from the signup)
    assert f"visa •••• {book.card.last4}" in section(html, "cards").lower()
    invoices = section(html, "invoices")
    assert book.invoice.number in invoices and "121.00 EUR" in invoices and "PDF" in invoices
    assert book.credit_note.number in invoices
    payments = section(html, "payments")
    assert book.payment.public_id in payments and "121.00 EUR" in payments
    assert book.refund.public_id in payments and "5.00 EUR" in payments and "goodwill" in payments
    assert book.dispute.public_id in payments and "10.00 EUR" in payments
    assert "Dunning: None" in section(html, "dunning")
    credit = section(html, "credit")
    assert "welcome credit" in credit and "25.00 EUR" in credit
    assert "Credit available" in section(html, "profile")
    costs = section(html, "costs")
    assert "<svg" in costs and "compute" in costs and "storage" in costs
    assert "storage 2026-09: 12.50 EUR" in costs and "compute 2026-10: 100.00 EUR" in costs
    risk = section(html, "risk")
    assert "Card binding" in risk  # the assessment at the card's binding
    assert "Called about the October invoice." in section(html, "notes")
    # A support agent may suspend and close, not block.
    state = section(html, "profile")
    assert "/transition/suspend/" in state and "/transition/block/" not in state


def test_the_timeline_is_newest_first_and_tells_the_story(book: Book, clock: object) -> None:
    _, client = operator(["support"])
    html = client.get(page_url(book.account)).content.decode()
    timeline = section(html, "timeline")
    moments = re.findall(r'<time datetime="([^"]+)"', timeline)
    assert moments and moments == sorted(moments, reverse=True)
    kinds = set(re.findall(r'data-kind="([a-z_]+)"', timeline))
    assert {"transition", "invoice", "payment", "refund", "dispute", "credit", "risk", "note"} <= kinds
    assert f"Invoice {book.invoice.number} issued: 121.00 EUR" in timeline


def test_a_note_is_added_from_the_page_and_never_edited(book: Book) -> None:
    user, client = operator(["support"])
    url = reverse("backoffice:customer_note_add", args=[book.account.id])
    response = client.post(url, {"text": "  Promised a call back on Monday.  "})
    assert response.status_code == 302 and response["Location"].startswith(page_url(book.account))
    note = AccountNote.objects.filter(account_id=book.account.id).first()
    assert note is not None and note.text == "Promised a call back on Monday." and note.author_id == user.id
    assert "Promised a call back on Monday." in section(client.get(page_url(book.account)).content.decode(), "notes")
    assert client.post(url, {"text": "   "}).status_code == 400
    assert AccountNote.objects.filter(account_id=book.account.id).count() == 2
    # Read-only staff (no group) see nothing; a group without the note permission cannot add one.
    _, nobody = operator([])
    assert nobody.get(page_url(book.account)).status_code == 403
    assert nobody.post(url, {"text": "x"}).status_code == 403


def test_a_transition_from_the_page_needs_a_reason_and_shows_what_the_customer_reads(book: Book) -> None:
    user, client = operator(["support"])
    url = reverse("admin:accounts_billingaccount_transition", args=[book.account.id, "suspend"])
    assert url == f"{page_url(book.account)}transition/suspend/"
    form = client.get(url).content.decode()
    assert "What the customer will read" in form and "Suspended by support. Contact support for details." in form
    refused = client.post(url, {"reason": ""})
    assert refused.status_code == 200 and "A reason is required" in refused.content.decode()
    done = client.post(url, {"reason": "leaked API key"})
    assert done.status_code == 302 and done["Location"] == page_url(book.account)
    book.account.refresh_from_db()
    assert book.account.state == AccountState.SUSPENDED
    audit = BillingAccountTransition.objects.filter(account=book.account).first()
    assert audit is not None and audit.reason == "leaked API key" and audit.actor_user_id == user.id
    html = client.get(page_url(book.account)).content.decode()
    assert "Suspended (by staff: leaked API key)" in section(html, "profile")
    assert "leaked API key" in section(html, "timeline")
    # The audit trail on the page: the state before and after, who, why, from where.
    changes = section(html, "changes")
    assert "state active → suspended" in changes and user.email in changes and "leaked API key" in changes
    assert "transition/suspend/" in changes
    # The fraud team's transition is not support's: refused by the server, not only hidden.
    assert client.post(url.replace("suspend", "block"), {"reason": "x"}).status_code == 403


def test_integer_addresses_redirect_to_the_public_id(book: Book) -> None:
    _, client = operator(["support"])
    response = client.get(f"/admin/accounts/billingaccount/{book.account.id}/change/")
    assert response.status_code == 302
    assert response["Location"] == f"{page_url(book.account)}change/"
    assert client.get(f"{page_url(book.account)}change/").status_code == 200
    bookmark = client.get(f"/admin/accounts/billingaccount/{book.account.id}/")
    assert bookmark.status_code == 302 and bookmark["Location"] == page_url(book.account)
    listing = client.get("/admin/accounts/billingaccount/").content.decode()
    assert f'href="{page_url(book.account)}"' in listing


def test_another_account_s_data_never_shows(book: Book) -> None:
    _, client = operator(["support"])
    html = client.get(page_url(book.account)).content.decode()
    for foreign in (
        book.other.public_id,
        "Other GmbH",
        book.other_invoice.number,
        book.other_payment.public_id,
        "Secret of the other one.",
        "84.70 EUR",  # the other's invoice total
    ):
        assert foreign not in html, foreign


@pytest.mark.parametrize(
    "term, kind",
    [
        ("account", "account"),
        ("billing@PAYING", "email"),
        ("paying b", "name"),
        ("nl 0044.95445b01", "tax_id"),
        ("payment", "payment"),
        ("last4", "card"),
    ],
)
def test_search_finds_by_each_kind(book: Book, term: str, kind: str) -> None:
    _, client = operator(["support"])
    query = {"account": book.account.public_id, "payment": book.payment.public_id, "last4": book.card.last4}.get(
        term, term
    )
    response = client.get("/admin/search/", {"q": query})
    if kind in ("account", "tax_id", "payment"):  # one exact match: the customer page
        assert response.status_code == 302 and response["Location"] == page_url(book.account)
        return
    assert response.status_code == 200
    html = response.content.decode()
    group = re.search(rf'<table class="search-group" data-kind="{kind}">(.*?)</table>', html, re.S)
    assert group and page_url(book.account) in group.group(1)
    assert book.other.public_id not in group.group(1)


def test_search_by_invoice_and_credit_note_number_lands_on_the_customer_page(book: Book) -> None:
    _, client = operator(["support"])
    for number in (book.invoice.number, book.invoice.number.lower(), book.credit_note.number):
        response = client.get("/admin/search/", {"q": number})
        assert response.status_code == 302 and response["Location"] == page_url(book.account), number
    by_gateway_id = client.get("/admin/search/", {"q": book.payment.gateway_intent_id})
    assert by_gateway_id.status_code == 302 and by_gateway_id["Location"] == page_url(book.account)
    nothing = client.get("/admin/search/", {"q": "INV-1999-000001"})
    assert nothing.status_code == 200 and "Nothing found" in nothing.content.decode()


def test_the_search_box_is_on_every_admin_page(book: Book) -> None:
    _, client = operator(["support"])
    for url in ("/admin/", "/admin/accounts/billingaccount/", page_url(book.account)):
        html = client.get(url).content.decode()
        assert 'id="backoffice-search"' in html and 'action="/admin/search/"' in html
        assert "Billing back office" in html


def test_the_page_s_queries_do_not_grow_with_the_account_s_history(
    book: Book, django_assert_max_num_queries: Callable[..., object]
) -> None:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    _, client = operator(["support"])
    client.get(page_url(book.account))  # warm the session and the content types
    with CaptureQueriesContext(connection) as before:
        client.get(page_url(book.account))
    for month in range(1, 9):  # eight more months of invoices, each paid
        day = dt.date(2026, month, 1)
        rated(book.account.id, f"{day:%Y-%m}-03", "compute.vcpu", "10", "10")
        from invoicing.periods import Period

        invoicing_services.period_close(
            period=Period(day), actor=FINANCE, account_ids=[book.account.id], run_rollup=False, render_pdfs=False
        )
    issued = Invoice.objects.filter(account_id=book.account.id).exclude(status=InvoiceStatus.DRAFT).count()
    assert issued >= 9
    # 39 for the sections, one per tracked record type for the audit trail's section
    with django_assert_max_num_queries(80), CaptureQueriesContext(connection) as after:  # type: ignore[attr-defined]
        assert client.get(page_url(book.account)).status_code == 200
    assert len(after) == len(before), "the page's queries grew with the account's invoices"


@pytest.mark.parametrize(
    "term", ["billing@paying", "Paying", "NL004495445B01", "INV-2026-000001", "CN-2026-000001", "4242", "ch_x", "pi_x"]
)
def test_every_search_query_has_an_index(book: Book, term: str) -> None:
    """Each statement the search runs can be answered from an index: with sequential scans
    priced out, no plan falls back to one (which is what PostgreSQL does when no index serves
    the condition)."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from billing_site.backoffice.search import search

    with CaptureQueriesContext(connection) as ran:
        search(term)
    statements = [q["sql"] for q in ran.captured_queries if q["sql"].lstrip().upper().startswith("SELECT")]
    assert statements
    with connection.cursor() as cursor:
        cursor.execute("SET LOCAL enable_seqscan = off")
        for sql in statements:
            cursor.execute(f"EXPLAIN {sql}")
            plan = "\n".join(row[0] for row in cursor.fetchall())
            assert "Seq Scan" not in plan, f"{sql}\n{plan}"


def test_the_customer_page_loads_nothing_from_another_host(book: Book) -> None:
    _, client = operator(["support"])
    html = client.get(page_url(book.account)).content.decode()
    assert re.findall(r"""(?:src|href)=["'](?:https?:)?//""", html) == []
    assert "<script" not in section(html, "costs")


def test_a_public_id_that_looks_like_an_admin_escape_opens_its_form(
    customer: Customer, make_account: Callable[..., BillingAccount]
) -> None:
    """The admin unquotes ids in its addresses ("_40" → "@"): acc_40… still finds its account."""
    from billing_site.common import ids

    account = make_account(customer.user, id=ids.decode("acc", "acc_4000000000001"), name="Escape BV")
    _, client = operator(["support"])
    for url in (f"{page_url(account)}change/", f"{page_url(account)}history/", page_url(account)):
        response = client.get(url)
        assert response.status_code == 200, url
        assert "Escape BV" in response.content.decode()
