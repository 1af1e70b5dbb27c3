"""A support agent on the customer page, as on a call: signs in with the second factor, types the
invoice number the customer quotes into the search box in the page's header, lands on the
customer's page (profile and state, members and keys, cards, invoices, payments, dunning,
credit, costs, risk, notes, timeline, the audit trail), suspends the account with a reason
through the transition page (which shows what the customer will read before it is confirmed),
and is back on the customer page with the new state, the timeline's entry and the audit row
(state active → suspended, the agent, the reason)."""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import urlsplit

import pytest
from django.utils import timezone
from playwright.sync_api import Page, expect

from accounts import services as account_services
from accounts.models import AccountState, BillingAccount
from billing_site.backoffice import chart
from billing_site.common.actors import Actor
from billing_site.outbox import services as outbox
from conftest import Customer
from invoicing.tests.factories import rated
from payments import refunds
from payments.models import Payment, PaymentMethod, PaymentStatus
from payments.tests.helpers import bind
from tests.browser.books import Books, open_books
from tests.browser.harness import VIEWPORT, admin_login, assert_suspended, new_operator, screenshot

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

CUSTOMER = "Initech BV"  # active, EUR: two invoices (484.00 EUR due in 12 days, 121.00 EUR due 5 days ago)
REASON = "Chargeback ring: card disputed on three accounts, suspended until fraud calls back"
CUSTOMER_READS = "Suspended by support. Contact support for details."
SECTIONS = (
    "profile",
    "state",
    "members",
    "api-keys",
    "cards",
    "invoices",
    "payments",
    "dunning",
    "credit",
    "costs",
    "risk",
    "notes",
    "timeline",
    "changes",
)
GOODWILL = "Goodwill: a day of slow disks"


def a_customer_s_history(books: Books) -> BillingAccount:
    """What a few months leave on Initech's books besides its invoices: a card, bound by the
    customer (each open invoice is charged to it at once and paid), part of a payment refunded,
    rated usage of three SKU families in each of the last three months (the cost chart), and
    two staff notes."""
    account = books.accounts[CUSTOMER]
    assert books.owner is not None
    assert bind(books.owner.client, account).status_code == 201
    while outbox.drain():  # what the outbox's periodic task does: the new card's charges
        pass
    assert PaymentMethod.objects.filter(account_id=account.id).exists()
    charged = Payment.objects.filter(account_id=account.id).order_by("amount_minor")
    assert [(p.amount_minor, p.status) for p in charged] == [
        (i.total_minor, PaymentStatus.SUCCEEDED) for i in sorted(books.invoices[CUSTOMER], key=lambda i: i.total_minor)
    ]
    refunds.refund_issue(payment_id=charged[0].id, amount_minor=2_500, reason=GOODWILL, actor=Actor.system("tests"))
    for back, month in enumerate(reversed(chart.months_back(timezone.now().date(), 3))):
        day = month.isoformat()
        rated(account.id, day, "compute.vcpu", "720", str(310 - 40 * back))
        rated(account.id, day, "storage.gb", "500", str(62 + 5 * back))
        rated(account.id, day, "network.egress_gb", "120", "10.80")
    for text in (
        "Called about the overdue invoice: payment promised by Friday.",
        "Asked for invoices to go to ap@initech.test as well; told them to add a member.",
    ):
        account_services.account_note_add(
            account_id=account.id,
            text=text,
            actor=Actor.operator(None, "support@ops.test"),  # type: ignore[arg-type]
        )
    account.refresh_from_db()
    assert account.state == AccountState.ACTIVE
    return account


def test_a_support_agent_finds_a_customer_by_an_invoice_number_and_suspends_from_the_customer_page(
    page: Page, make_customer: Callable[..., Customer], make_account: Callable[..., BillingAccount]
) -> None:
    books = open_books(make_customer, make_account)
    account = a_customer_s_history(books)
    quoted = next(i for i in books.invoices[CUSTOMER] if i.due_at is not None and i.due_at < timezone.now())
    agent = new_operator("support", email="sam.support@ops.test")
    customer_page = f"/admin/accounts/billingaccount/{account.public_id}/"

    # The customer quotes an invoice's number: typed in the header's search box on
    # the home page, it lands on the customer's page.
    admin_login(page, agent)
    search = page.locator("#backoffice-search")
    search.get_by_role("searchbox").fill(quoted.number)
    search.get_by_role("searchbox").press("Enter")
    page.wait_for_url(f"**{customer_page}")
    assert urlsplit(page.url).path == customer_page

    content = page.locator("#content-main.customer")
    for section in SECTIONS:
        expect(content.locator(f"#{section}")).to_be_visible()
    expect(content.locator("#profile")).to_contain_text(CUSTOMER)
    expect(content.locator("#state .state")).to_have_text("Active")
    expect(content.locator("#cards")).to_contain_text("•••• 4242")
    invoice = content.locator("#invoices table").first.locator("tr", has_text=quoted.number)
    expect(invoice).to_contain_text("Paid")
    expect(invoice).to_contain_text("121.00 EUR")
    expect(content.locator("#invoices")).to_contain_text("Credit notes")  # the refund's
    expect(content.locator("#payments")).to_contain_text(GOODWILL)
    expect(content.locator("#costs svg")).to_be_visible()
    expect(content.locator("#notes")).to_contain_text("payment promised by Friday")
    expect(content.locator("#state").get_by_role("link", name="Block…")).to_have_count(0)  # fraud's, not support's

    # Suspend, with a reason: the transition page says what the customer will read first.
    content.locator("#state").get_by_role("link", name="Suspend…").click()
    assert urlsplit(page.url).path == f"{customer_page}transition/suspend/"
    reads = page.locator(".customer-reads")
    expect(reads).to_contain_text("What the customer will read")
    expect(reads).to_contain_text(CUSTOMER_READS)
    page.get_by_label("Reason").fill(REASON)
    page.get_by_role("button", name="Suspend", exact=True).click()

    # Back on the customer page: the new state, the timeline's newest entry, the audit row.
    page.wait_for_url(f"**{customer_page}")
    expect(page.locator(".messagelist")).to_have_text(f"{CUSTOMER} ({account.public_id}) suspended.")
    expect(content.locator("#state .state")).to_contain_text("Suspended")
    expect(content.locator("#state .state")).to_contain_text(REASON)
    newest = content.locator("#timeline li").first
    expect(newest).to_have_attribute("data-kind", "transition")
    expect(newest).to_contain_text("Suspend (active → suspended)")
    expect(newest).to_contain_text(agent.email)
    expect(newest).to_contain_text(REASON)
    audit = content.locator("#changes tbody tr", has_text="state active → suspended")
    expect(audit).to_have_count(1)
    expect(audit).to_contain_text(agent.email)
    expect(audit).to_contain_text(REASON)
    expect(audit).to_contain_text("transition/suspend/")
    assert page.evaluate("document.documentElement.scrollWidth") <= VIEWPORT["width"]  # fits the window
    screenshot(page, "customer-page")

    assert_suspended(account, by=agent, reason=REASON)
