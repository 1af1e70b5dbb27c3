"""Finance in the browser: the receivables ageing per currency, each bucket leading to the
accounts behind it; and a refund above the four-eyes amount asked for on the rendered
payment page, which waits as a request; its requester cannot approve it (not offered, and refused by
the server when posted anyway); a second finance user, signed in in a browser of their own,
approves it with a reason; the refund is made once and the request keeps both names and
reasons."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from playwright.sync_api import Page, expect

from accounts.models import BillingAccount
from billing_site.common import money
from conftest import Customer
from invoicing import services as invoicing_services
from invoicing.models import ApprovalRequest
from invoicing.selectors import AGEING_BUCKETS
from payments import charging
from payments.models import Payment, PaymentStatus, Refund, RefundStatus
from payments.tests.helpers import bind, issue_invoice
from tests.browser.books import open_books
from tests.browser.harness import VIEWPORT, admin_login, new_operator, screenshot

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

REASON = "Three days of outage on the customer's database cluster (INC-2291)"
APPROVAL = "Checked INC-2291: the outage and the amount match the SLA credit"


@pytest.fixture
def payment(catalog: None, customer: Customer, make_account: Callable[..., BillingAccount]) -> Payment:
    """October's invoice of a Dutch customer (1,000.00 EUR of compute + 21 % VAT: 1,210.00 EUR),
    paid with a card through the sandbox gateway."""
    account = make_account(customer.user, name="Initech BV", currency="EUR", country="NL")
    assert bind(customer.client, account).status_code == 201
    invoice = issue_invoice(account, amount="1000")
    # Charged by the post-issue task when the close committed (this test commits), else here.
    paid = Payment.objects.filter(invoice_id=invoice.id).first() or charging.invoice_charge(
        invoice_id=invoice.id, trigger="operator"
    )
    assert (paid.status, paid.amount_minor) == (PaymentStatus.SUCCEEDED, 121000)
    return paid


def post_decision(page: Page, request: ApprovalRequest, decision: str, reason: str) -> None:
    """What a crafted form does: post a decision on ``request`` from the page, with the page's
    own CSRF token, whether or not the page offers it; the browser follows the answer."""
    with page.expect_navigation():
        page.evaluate(
            """([action, decision, reason]) => {
                const form = document.createElement("form");
                form.method = "post";
                form.action = action;
                const fields = {
                    csrfmiddlewaretoken: document.querySelector("[name=csrfmiddlewaretoken]").value,
                    decision, reason,
                };
                for (const [name, value] of Object.entries(fields)) {
                    const input = document.createElement("input");
                    input.type = "hidden"; input.name = name; input.value = value;
                    form.appendChild(input);
                }
                document.body.appendChild(form);
                form.submit();
            }""",
            [f"/admin/finance/approvals/{request.pk}/decide/", decision, reason],
        )


def test_a_refund_above_the_four_eyes_amount_is_approved_by_a_second_finance_user(
    new_page: Callable[[], Page], payment: Payment
) -> None:
    threshold = invoicing_services.four_eyes_threshold_minor("EUR")
    assert threshold < 60000 <= payment.amount_minor  # 600.00 EUR: above the amount, within the payment
    requester = new_operator("finance", email="anna.finance@ops.test")
    approver = new_operator("finance", email="ben.finance@ops.test")

    # Anna asks for the refund on the payment's page.
    anna = new_page()
    admin_login(anna, requester, next_url=f"/admin/payments/payment/{payment.pk}/change/")
    anna.locator(".object-tools").get_by_role("link", name="Refund…").click()
    anna.get_by_label("Amount").fill("600.00")
    anna.get_by_label("Reason (the customer's)").fill(REASON)
    anna.get_by_label("Internal note (staff only)").fill("Agreed with the account manager")
    anna.get_by_role("button", name="Refund").click()
    request = ApprovalRequest.objects.get(payment_id=payment.id)
    expect(anna.locator(".messagelist")).to_contain_text(
        f"A refund of 600.00 EUR is above the four-eyes threshold: request {request.public_id} awaits"
    )
    pending = anna.locator("#four-eyes-requests tr", has_text=request.public_id)
    expect(pending).to_contain_text("Pending")
    expect(pending).to_contain_text(requester.email)
    assert anna.evaluate("document.documentElement.scrollWidth") <= VIEWPORT["width"]  # the table fits
    assert not Refund.objects.filter(payment_id=payment.id).exists()  # nothing refunded yet

    # Her own request: the requests page offers her no decision, and the server refuses one.
    anna.goto("/admin/finance/approvals/")
    own = anna.locator(f"tr#{request.public_id}")
    expect(own).to_contain_text("Your request: another finance user decides.")
    expect(own.get_by_role("button", name="Approve")).to_have_count(0)
    post_decision(anna, request, "approve", "Looks fine to me")
    expect(anna.locator(".messagelist")).to_contain_text("Nobody approves or rejects their own request")
    request.refresh_from_db()
    assert request.status == "pending" and not Refund.objects.filter(payment_id=payment.id).exists()

    # Ben, signed in in a browser of his own, approves it with a reason.
    ben = new_page()
    admin_login(ben, approver, next_url="/admin/finance/approvals/")
    row = ben.locator(f"tr#{request.public_id}")
    expect(row).to_contain_text("600.00 EUR")
    expect(row).to_contain_text(REASON)
    row.get_by_placeholder("Reason").fill(APPROVAL)
    row.get_by_role("button", name="Approve").click()
    expect(ben.locator(".messagelist")).to_contain_text(
        f"Request {request.public_id} (Refund to the card of 600.00 EUR) approved and carried out"
    )
    ben.goto("/admin/finance/approvals/?status=all")
    done = ben.locator(f"tr#{request.public_id}")
    expect(done).to_contain_text(approver.email)
    expect(done).to_contain_text(APPROVAL)
    # The requests' table fits the window: long reasons and names wrap in their cells.
    assert ben.evaluate("document.documentElement.scrollWidth") <= VIEWPORT["width"]
    screenshot(ben, "four-eyes-approved")

    refund = Refund.objects.get(payment_id=payment.id)  # once
    request.refresh_from_db()
    assert (refund.id, refund.amount_minor, refund.status) == (request.execution_id, 60000, RefundStatus.SUCCEEDED)
    assert (request.status, request.requested_by, request.reason) == ("executed", requester.email, REASON)
    assert (request.decided_by, request.decision_reason) == (approver.email, APPROVAL)


def test_finance_reads_the_receivables_ageing_per_currency_and_the_accounts_behind_a_bucket(
    page: Page, make_customer: Callable[..., Customer], make_account: Callable[..., BillingAccount]
) -> None:
    books = open_books(make_customer, make_account)
    admin_login(page, new_operator("finance"), next_url="/admin/finance/")

    ageing = page.locator("#ageing")
    for currency in ("EUR", "GBP", "USD"):
        row = ageing.locator(f"tr#ageing-{currency}")
        owed = books.owed[currency]
        for key, _label, _low, _high in AGEING_BUCKETS:
            amount, invoices = owed.get(key, (0, 0))
            cell = row.locator(f"td.bucket-{key}")
            expect(cell).to_contain_text(money.display(amount, currency, grouped=True))
            if invoices:
                expect(cell).to_contain_text(f"{invoices} invoice")
        total = sum(amount for amount, _count in owed.values())
        expect(row.locator("td").last).to_contain_text(money.display(total, currency, grouped=True))
    screenshot(page, "finance-ageing")

    ageing.locator("tr#ageing-EUR td.bucket-90_plus").get_by_role("link").click()  # who owes the oldest euros
    expect(page.locator("h1")).to_contain_text("Receivables EUR, 90+ days")
    behind = page.locator("#content-main table")
    expect(behind).to_contain_text("Hooli SAS")
    expect(behind).to_contain_text(books.accounts["Hooli SAS"].public_id)
    expect(behind).not_to_contain_text("Globex GmbH")  # owes euros, none of them that old
