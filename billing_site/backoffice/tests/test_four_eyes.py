"""Four-eyes: refunds, credit grants and write-offs above ``FOUR_EYES_THRESHOLDS`` become
requests that a second finance user approves (carried out once, both names and reasons kept)
or rejects; below the threshold they run at once; nobody approves their own request; support
cannot decide. Driven through the admin as staff would, with the sandbox gateway."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from django.db import IntegrityError, transaction
from django.test import override_settings

from accounts.models import BillingAccount
from billing_site.common import ids
from billing_site.common.actors import Actor
from billing_site.common.errors import Conflict
from conftest import Customer, in_threads, operator
from invoicing import services as invoicing_services
from invoicing.models import ApprovalRequest, CreditGrant, Invoice, InvoiceStatus
from payments import charging
from payments import services as payments_services
from payments.models import Payment, PaymentStatus, Refund, RefundStatus
from payments.tests.helpers import NOW, bind, issue_invoice

pytestmark = pytest.mark.clock(NOW)


@pytest.fixture(autouse=True)
def _threshold() -> Iterator[None]:
    """50.00 EUR: the invoices here (121.00 EUR) are above it; JPY and others: the default."""
    with override_settings(FOUR_EYES_THRESHOLDS={"EUR": "50.00"}, FOUR_EYES_DEFAULT_THRESHOLD="500"):
        yield


@pytest.fixture
def paid(catalog: None, customer: Customer, make_account: Callable[..., BillingAccount]) -> tuple[Invoice, Payment]:
    """October's invoice (121.00 EUR) paid with a card through the sandbox gateway."""
    account = make_account(customer.user, currency="EUR", country="NL")
    assert bind(customer.client, account).status_code == 201
    invoice = issue_invoice(account)
    # Charged by the post-issue task when the close committed (a transactional test), else here.
    payment = Payment.objects.filter(invoice_id=invoice.id).first() or charging.invoice_charge(
        invoice_id=invoice.id, trigger="operator"
    )
    assert payment.status == PaymentStatus.SUCCEEDED
    return invoice, payment


def refund_url(payment: Payment) -> str:
    return f"/admin/payments/payment/{payment.pk}/refund/"


def decide(client: object, request: ApprovalRequest, decision: str, reason: str) -> object:
    return client.post(  # type: ignore[attr-defined]
        f"/admin/finance/approvals/{request.pk}/decide/", {"decision": decision, "reason": reason}, follow=True
    )


def test_threshold_per_currency_with_a_default() -> None:
    assert invoicing_services.four_eyes_threshold_minor("EUR") == 5000
    assert invoicing_services.four_eyes_threshold_minor("JPY") == 500  # the default, 500, in yen
    assert invoicing_services.four_eyes_threshold_minor("BHD") == 500000
    staff = Actor.operator(1, "a@ops.test")
    assert not invoicing_services.approval_needed(amount_minor=5000, currency="EUR", actor=staff)  # at it: alone
    assert invoicing_services.approval_needed(amount_minor=5001, currency="EUR", actor=staff)
    assert not invoicing_services.approval_needed(amount_minor=10**9, currency="EUR", actor=Actor.system("dunning"))


def test_a_refund_below_the_threshold_runs_at_once(paid: tuple[Invoice, Payment]) -> None:
    _invoice, payment = paid
    _user, finance = operator(["finance"])
    response = finance.post(refund_url(payment), {"amount": "50.00", "reason": "Outage credit"})
    assert response.status_code == 302
    refund = Refund.objects.get()
    assert (refund.amount_minor, refund.status) == (5000, RefundStatus.SUCCEEDED)
    assert not ApprovalRequest.objects.exists()


def test_a_refund_above_the_threshold_is_approved_by_a_second_finance_user_and_runs_once(
    paid: tuple[Invoice, Payment],
) -> None:
    invoice, payment = paid
    requester, finance = operator(["finance"])
    response = finance.post(refund_url(payment), {"amount": "50.01", "reason": "Outage credit", "internal_note": "T-1"})
    assert response.status_code == 302
    assert not Refund.objects.exists()  # nothing refunded yet: a request
    request = ApprovalRequest.objects.get()
    assert (request.kind, request.status, request.amount_minor, request.payment_id) == (
        "refund",
        "pending",
        5001,
        payment.id,
    )
    assert (request.requested_by, request.reason) == (requester.email, "Outage credit")
    # Shown on the payment's and the invoice's pages.
    assert request.public_id in finance.get(f"/admin/payments/payment/{payment.pk}/change/").content.decode()
    assert request.public_id in finance.get(f"/admin/invoicing/invoice/{invoice.pk}/change/").content.decode()

    # The requester may not approve: not offered on the page, refused by the server.
    listing = finance.get("/admin/finance/approvals/").content.decode()
    assert request.public_id in listing and "Your request: another finance user decides." in listing
    refused = decide(finance, request, "approve", "looks fine").content.decode()  # type: ignore[attr-defined]
    assert "Nobody approves or rejects their own request" in refused
    request.refresh_from_db()
    assert request.status == "pending" and not Refund.objects.exists()

    approver, second = operator(["finance", "read-only"])  # a second finance user
    assert decide(second, request, "approve", "").status_code == 200  # type: ignore[attr-defined]
    request.refresh_from_db()
    assert request.status == "pending"  # no reason: nothing decided
    page = decide(second, request, "approve", "Checked the outage ticket").content.decode()  # type: ignore[attr-defined]
    assert f"Request {request.public_id} (Refund to the card of" in page and "approved and carried out" in page
    again = decide(second, request, "approve", "double click").content.decode()  # type: ignore[attr-defined]
    assert "was already" in again

    request.refresh_from_db()
    refund = Refund.objects.get()
    assert (refund.id, refund.amount_minor, refund.status) == (request.execution_id, 5001, RefundStatus.SUCCEEDED)
    assert refund.requested_by == requester.email and approver.email in refund.internal_note
    assert (request.status, request.decided_by, request.decision_reason) == (
        "executed",
        approver.email,
        "Checked the outage ticket",
    )
    assert (request.requested_by, request.reason) == (requester.email, "Outage credit")
    assert request.result == f"{refund.public_id} succeeded"
    # Carried out again (a crash between the claim and the result): nothing more happens.
    payments_services.approval_execute(request_id=request.id)
    assert Refund.objects.count() == 1


@pytest.mark.django_db(transaction=True)
def test_two_approvers_at_once_carry_it_out_once(paid: tuple[Invoice, Payment]) -> None:
    _invoice, payment = paid
    requester = Actor.operator(1001, "asks@ops.test")
    request = payments_services.refund_submit(
        payment_id=payment.id, amount_minor=6000, reason="Outage", actor=requester
    )
    assert isinstance(request, ApprovalRequest)

    def approve(i: int) -> str:
        done = payments_services.approval_approve(
            request_id=request.id, actor=Actor.operator(2000 + i, f"approver{i}@ops.test"), reason="ok"
        )
        return str(done.status)

    results = in_threads(4, approve)
    assert sorted(str(r) if isinstance(r, str) else r.code for r in results) == [  # type: ignore[union-attr]
        "already_decided",
        "already_decided",
        "already_decided",
        "executed",
    ]
    assert Refund.objects.count() == 1 and Refund.objects.get().amount_minor == 6000


def test_the_database_refuses_an_approver_who_is_the_requester(paid: tuple[Invoice, Payment]) -> None:
    _invoice, payment = paid
    requester = Actor.operator(1001, "asks@ops.test")
    request = payments_services.refund_submit(
        payment_id=payment.id, amount_minor=6000, reason="Outage", actor=requester
    )
    with pytest.raises(Conflict) as refused:
        payments_services.approval_approve(request_id=request.id, actor=requester, reason="mine")
    assert refused.value.code == "self_approval"
    with pytest.raises(IntegrityError), transaction.atomic():
        ApprovalRequest.objects.filter(id=request.id).update(
            status="approved", decided_by_id=1001, decided_by="asks@ops.test", decided_at=NOW
        )


def test_a_rejection_is_recorded_with_both_names_and_does_nothing(paid: tuple[Invoice, Payment]) -> None:
    _invoice, payment = paid
    requester, finance = operator(["finance"])
    finance.post(refund_url(payment), {"amount": "100.00", "reason": "Goodwill"})
    request = ApprovalRequest.objects.get()
    approver, second = operator(["finance", "read-only"])
    page = decide(second, request, "reject", "No outage on record").content.decode()  # type: ignore[attr-defined]
    assert f"Request {request.public_id} (Refund to the card of 100.00 EUR) rejected." in page
    request.refresh_from_db()
    assert (request.status, request.requested_by, request.reason) == ("rejected", requester.email, "Goodwill")
    assert (request.decided_by, request.decision_reason) == (approver.email, "No outage on record")
    assert not Refund.objects.exists()
    assert "No outage on record" in second.get("/admin/finance/approvals/", {"status": "rejected"}).content.decode()


@pytest.mark.parametrize("groups", [["support"], ["fraud"]])
def test_support_and_fraud_cannot_decide(paid: tuple[Invoice, Payment], groups: list[str]) -> None:
    _invoice, payment = paid
    _requester, finance = operator(["finance"])
    finance.post(refund_url(payment), {"amount": "100.00", "reason": "Goodwill"})
    request = ApprovalRequest.objects.get()
    _user, other = operator(groups)
    response = other.post(f"/admin/finance/approvals/{request.pk}/decide/", {"decision": "approve", "reason": "ok"})
    assert response.status_code == 403
    request.refresh_from_db()
    assert request.status == "pending" and not Refund.objects.exists()


def test_credit_grants_above_the_threshold_wait_for_approval(
    customer: Customer, make_account: Callable[..., BillingAccount]
) -> None:
    account = make_account(customer.user, currency="EUR", country="NL")
    requester, finance = operator(["finance"])
    form = {"account": account.public_id, "kind": "promotional", "currency": "EUR", "reason": "Launch"}
    small = finance.post("/admin/invoicing/creditgrant/add/", {**form, "amount": "50.00"}, follow=True)
    assert "was added successfully" in small.content.decode()
    assert CreditGrant.objects.get().amount_minor == 5000
    large = finance.post("/admin/invoicing/creditgrant/add/", {**form, "amount": "75.00"}, follow=True)
    assert "awaits a second finance user" in large.content.decode()
    assert CreditGrant.objects.count() == 1
    request = ApprovalRequest.objects.get(kind="credit_grant")
    approver, second = operator(["finance", "read-only"])
    decide(second, request, "approve", "Agreed with sales")
    request.refresh_from_db()
    grant = CreditGrant.objects.get(id=request.execution_id)
    assert (grant.amount_minor, grant.kind, grant.granted_by) == (7500, "promotional", requester.email)
    assert approver.email in grant.reason and request.status == "executed"
    payments_services.approval_execute(request_id=request.id)
    assert CreditGrant.objects.count() == 2


def test_write_offs_above_the_threshold_wait_for_approval(
    catalog: None, customer: Customer, make_account: Callable[..., BillingAccount]
) -> None:
    small = issue_invoice(make_account(customer.user, currency="EUR", country="NL"), amount="10")  # 12.10 EUR
    large = issue_invoice(make_account(customer.user, currency="EUR", country="NL"), amount="100")  # 121.00 EUR
    _requester, finance = operator(["finance"])
    finance.post(f"/admin/invoicing/invoice/{small.pk}/action/write_off/", {"reason": "Bankrupt"})
    small.refresh_from_db()
    assert small.status == InvoiceStatus.UNCOLLECTIBLE
    page = finance.post(f"/admin/invoicing/invoice/{large.pk}/action/write_off/", {"reason": "Bankrupt"}, follow=True)
    assert "awaits a second finance user" in page.content.decode()
    large.refresh_from_db()
    assert large.status == InvoiceStatus.ISSUED
    request = ApprovalRequest.objects.get()
    assert (request.kind, request.invoice_id, request.amount_minor) == ("write_off", large.id, 12100)
    _approver, second = operator(["finance", "read-only"])
    decide(second, request, "approve", "Court letter received")
    large.refresh_from_db()
    request.refresh_from_db()
    assert (large.status, large.written_off_minor, request.status) == (InvoiceStatus.UNCOLLECTIBLE, 12100, "executed")
    assert request.public_id in finance.get(f"/admin/invoicing/invoice/{large.pk}/change/").content.decode()
    assert ids.encode("acc", large.account_id) in second.get("/admin/finance/approvals/?status=all").content.decode()
