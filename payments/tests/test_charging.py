"""Charging invoices on the sandbox gateway: card binding through the API, charges, declines
hard and retryable, authentication, answers lost and reconciled, twenty payers at once, a
worker killed mid-charge. Every money test ends with the ledger check clean."""

from __future__ import annotations

import datetime as dt
import sys
from collections.abc import Callable

import pytest
import time_machine
from django.core import mail
from django.db import connections
from django.test import override_settings

from accounts.models import AccountState, BillingAccount
from billing_site.outbox.models import OutboxMessage
from conftest import Customer, in_threads, killed_child, wait_for
from invoicing import ledger
from invoicing import services as invoicing_services
from invoicing.models import Invoice, InvoicePayment, InvoiceStatus

# The price catalog (rated usage needs its SKUs).
from payments import charging, gateways
from payments.models import (
    BindingAttempt,
    BindingStatus,
    DunningCase,
    Payment,
    PaymentMethod,
    PaymentStatus,
    SandboxObject,
)
from payments.tests.helpers import FINANCE, NOW, bind, issue_invoice, pay

pytestmark = pytest.mark.clock(NOW)


@pytest.fixture
def acct(catalog: None, customer: Customer, make_account: Callable[..., BillingAccount]) -> BillingAccount:
    return make_account(customer.user, currency="EUR", country="NL")


def charges_at_gateway(invoice: Invoice) -> int:
    """Succeeded PaymentIntents the sandbox holds for this invoice (what the card was charged)."""
    return sum(
        1
        for row in SandboxObject.objects.filter(kind="payment_intent")
        if row.data["metadata"].get("invoice_id") == invoice.public_id and row.data["status"] == "succeeded"
    )


@pytest.mark.django_db
def test_a_card_bound_through_the_api_becomes_the_default_and_activates_the_account(
    customer: Customer, acct: BillingAccount, django_capture_on_commit_callbacks: Callable[..., object]
) -> None:
    setup = customer.client.post(f"/api/v1/billing-accounts/{acct.public_id}/payment-methods/setup")
    assert setup.status_code == 201
    body = setup.json()
    assert body["gateway"] == "sandbox" and body["setup_intent_id"].startswith("seti_")
    assert body["client_secret"] and body["publishable_key"]
    with django_capture_on_commit_callbacks(execute=True):  # type: ignore[operator]
        done = customer.client.post(
            f"/api/v1/billing-accounts/{acct.public_id}/payment-methods",
            {"setup_intent_id": body["setup_intent_id"], "test_payment_method": "pm_card_visa"},
            format="json",
        )
    assert done.status_code == 201, done.content
    card = done.json()
    assert (card["brand"], card["last4"], card["default"]) == ("visa", "4242", True)
    assert "fingerprint" not in card
    acct.refresh_from_db()
    assert acct.state == AccountState.ACTIVE  # the first binding activated it (antifraud: allow)
    listed = customer.client.get(f"/api/v1/billing-accounts/{acct.public_id}/payment-methods").json()
    assert [c["id"] for c in listed] == [card["id"]]
    assert all("fingerprint" not in c for c in listed)
    # Completing the same binding again converges on the same card.
    again = customer.client.post(
        f"/api/v1/billing-accounts/{acct.public_id}/payment-methods",
        {"setup_intent_id": body["setup_intent_id"]},
        format="json",
    )
    assert again.status_code == 201 and again.json()["id"] == card["id"]
    assert PaymentMethod.objects.filter(account_id=acct.id).count() == 1


@pytest.mark.django_db
def test_a_card_declined_at_binding_is_refused_with_402_and_nothing_bound(
    customer: Customer, acct: BillingAccount
) -> None:
    response = bind(customer.client, acct, "pm_card_chargeDeclined")
    assert response.status_code == 402
    assert response.json()["code"] == "card_declined"
    assert not PaymentMethod.objects.filter(account_id=acct.id).exists()
    assert BindingAttempt.objects.get(account_id=acct.id).status == BindingStatus.FAILED
    acct.refresh_from_db()
    assert acct.state == AccountState.PENDING


@pytest.mark.django_db
def test_someone_elses_setup_intent_is_404(
    customer: Customer,
    acct: BillingAccount,
    make_customer: Callable[..., Customer],
    make_account: Callable[..., BillingAccount],
) -> None:
    other = make_customer()
    theirs = make_account(other.user, currency="EUR", country="NL")
    setup = other.client.post(f"/api/v1/billing-accounts/{theirs.public_id}/payment-methods/setup").json()
    response = customer.client.post(
        f"/api/v1/billing-accounts/{acct.public_id}/payment-methods",
        {"setup_intent_id": setup["setup_intent_id"], "test_payment_method": "pm_card_visa"},
        format="json",
    )
    assert response.status_code == 404
    assert not PaymentMethod.objects.exists()


@pytest.mark.django_db
def test_paying_an_invoice_charges_it_once_and_marks_it_paid(customer: Customer, acct: BillingAccount) -> None:
    invoice = issue_invoice(acct, "100")
    assert bind(customer.client, acct).status_code == 201
    response = pay(customer.client, acct, invoice)
    assert response.status_code == 201, response.content
    body = response.json()
    assert (body["status"], body["amount"], body["currency"], body["attempt"]) == ("succeeded", "121.00", "EUR", 1)
    invoice.refresh_from_db()
    assert invoice.status == InvoiceStatus.PAID and invoice.amount_paid_minor == 12100
    again = pay(customer.client, acct, invoice)
    assert again.status_code == 409 and again.json()["code"] == "nothing_due"
    assert charges_at_gateway(invoice) == 1
    listed = customer.client.get(f"/api/v1/billing-accounts/{acct.public_id}/payments").json()["results"]
    assert [p["id"] for p in listed] == [body["id"]]
    detail = customer.client.get(f"/api/v1/billing-accounts/{acct.public_id}/payments/{body['id']}").json()
    assert detail["invoice"] == invoice.public_id and detail["client_secret"] is None
    assert ledger.check() == []


@pytest.mark.django_db
def test_a_retryable_decline_fails_the_payment_opens_dunning_and_emails(
    customer: Customer, acct: BillingAccount
) -> None:
    invoice = issue_invoice(acct)
    bind(customer.client, acct, "pm_card_chargeCustomerFail")
    body = pay(customer.client, acct, invoice).json()
    assert (body["status"], body["decline_code"]) == ("failed", "card_declined")
    assert body["message"] == "Your card was declined."
    payment = Payment.objects.get(id=charging.ids.decode("pay", body["id"]))
    assert payment.retryable
    case = DunningCase.objects.get(invoice_id=invoice.id)
    assert case.retryable and case.last_decline_code == "card_declined"
    assert OutboxMessage.objects.filter(kind="email", account_id=acct.id).exists()
    invoice.refresh_from_db()
    assert invoice.status == InvoiceStatus.ISSUED
    # The customer may try again: a new attempt.
    second = pay(customer.client, acct, invoice).json()
    assert second["attempt"] == 2 and second["status"] == "failed"
    assert ledger.check() == []


@pytest.mark.django_db
def test_a_lost_card_is_a_hard_decline_told_neutrally(customer: Customer, acct: BillingAccount) -> None:
    invoice = issue_invoice(acct)
    bind(customer.client, acct, "pm_card_visa_chargeDeclinedLostCard")
    body = pay(customer.client, acct, invoice).json()
    assert (body["status"], body["decline_code"]) == ("failed", "lost_card")
    assert "lost" not in body["message"].lower()
    assert not Payment.objects.get(invoice_id=invoice.id).retryable
    assert not DunningCase.objects.get(invoice_id=invoice.id).retryable


@pytest.mark.django_db
def test_authentication_required_gives_the_client_secret_and_a_new_attempt_can_follow(
    customer: Customer, acct: BillingAccount
) -> None:
    invoice = issue_invoice(acct)
    bind(customer.client, acct, "pm_card_authenticationRequired")
    first = pay(customer.client, acct, invoice).json()
    assert first["status"] == "requires_action"
    assert first["client_secret"] and first["next_action_url"]
    # Paying again at once returns the payment under way: no new intent, none canceled.
    again = pay(customer.client, acct, invoice)
    assert again.status_code == 200 and again.json()["id"] == first["id"]
    # Abandoned: the customer pays again later. The old intent is canceled first, so a late
    # authentication of it could not charge a second time.
    with time_machine.travel(NOW + dt.timedelta(minutes=31), tick=False):
        second = pay(customer.client, acct, invoice).json()
    assert second["attempt"] == 2 and second["status"] == "requires_action"
    assert Payment.objects.get(id=charging.ids.decode("pay", first["id"])).status == PaymentStatus.CANCELED
    # The customer authenticates the second one; the gateway reports success.
    sandbox = gateways.gateway("sandbox")
    payment = Payment.objects.get(id=charging.ids.decode("pay", second["id"]))
    result = sandbox.authenticate(payment.gateway_intent_id)  # type: ignore[attr-defined]
    charging.payment_record_outcome(payment_id=payment.id, result=result)
    invoice.refresh_from_db()
    assert invoice.status == InvoiceStatus.PAID
    assert charges_at_gateway(invoice) == 1
    assert ledger.check() == []


@pytest.mark.django_db
def test_a_burst_of_pay_calls_makes_one_intent_and_is_throttled(customer: Customer, acct: BillingAccount) -> None:
    """The probe's burst: 25 calls in a second on an invoice whose card needs authentication."""
    from django.core.cache import cache

    cache.clear()
    invoice = issue_invoice(acct)
    bind(customer.client, acct, "pm_card_authenticationRequired")
    with override_settings(PAYMENTS_PAY_RATE_INVOICE="10/hour", PAYMENTS_PAY_RATE_USER="100/hour"):
        responses = [pay(customer.client, acct, invoice) for _ in range(25)]
    statuses = [r.status_code for r in responses]
    assert statuses == [201] + [200] * 9 + [429] * 15, statuses
    assert {r.json()["id"] for r in responses[:10]} == {responses[0].json()["id"]}
    assert responses[-1].json()["code"] == "throttled" and responses[-1]["Retry-After"]
    intents = SandboxObject.objects.filter(kind="payment_intent")
    assert [row.data["status"] for row in intents] == ["requires_action"]  # one, never canceled
    assert Payment.objects.filter(invoice_id=invoice.id).count() == 1


@pytest.mark.django_db
def test_pay_is_throttled_per_invoice_and_per_user_counting_only_callers_allowed_on_the_account(
    customer: Customer,
    acct: BillingAccount,
    make_customer: Callable[..., Customer],
    make_account: Callable[..., BillingAccount],
) -> None:
    from django.core.cache import cache

    cache.clear()
    invoice = issue_invoice(acct)
    other_acct = make_account(customer.user, currency="EUR", country="NL")
    other = issue_invoice(other_acct)
    bind(customer.client, acct, "pm_card_chargeCustomerFail")  # every attempt is a new decline
    bind(customer.client, other_acct, "pm_card_chargeCustomerFail")
    stranger = make_customer()
    with override_settings(PAYMENTS_PAY_RATE_INVOICE="3/hour", PAYMENTS_PAY_RATE_USER="5/hour"):
        # A stranger's calls are 404s and use up nothing of the owner's.
        assert [pay(stranger.client, acct, invoice).status_code for _ in range(5)] == [404] * 5
        first = [pay(customer.client, acct, invoice) for _ in range(4)]
        assert [r.status_code for r in first] == [201, 201, 201, 429]
        assert first[-1].json()["code"] == "throttled"
        # Per user: two more calls on another invoice, then 429.
        second = [pay(customer.client, other_acct, other).status_code for _ in range(3)]
        assert second == [201, 201, 429]
    assert Payment.objects.filter(invoice_id=invoice.id).count() == 3
    assert SandboxObject.objects.filter(kind="payment_intent").count() == 5


@pytest.mark.django_db
def test_no_card_is_409_no_payment_method(customer: Customer, acct: BillingAccount) -> None:
    invoice = issue_invoice(acct)
    response = pay(customer.client, acct, invoice)
    assert response.status_code == 409 and response.json()["code"] == "no_payment_method"
    assert not Payment.objects.exists()


@pytest.mark.django_db
@override_settings(SANDBOX_FAILURE_RATE=1.0, SANDBOX_FAILURE_MODE="lost")
def test_a_lost_answer_leaves_the_payment_unknown_blocks_new_charges_and_the_reconciler_resolves_it(
    customer: Customer, acct: BillingAccount
) -> None:
    invoice = issue_invoice(acct)
    gateways.reset()
    with override_settings(SANDBOX_FAILURE_RATE=0.0):
        gateways.reset()
        bind(customer.client, acct)
    gateways.reset()
    body = pay(customer.client, acct, invoice).json()  # charged, then the answer is lost
    assert body["status"] == "unknown"
    unknown = Payment.objects.get(id=charging.ids.decode("pay", body["id"]))
    # While it is unknown, nothing charges the invoice again: the pay call returns it.
    again = pay(customer.client, acct, invoice)
    assert again.status_code == 200 and again.json()["id"] == body["id"]
    with override_settings(SANDBOX_FAILURE_RATE=0.0):
        gateways.reset()
        counts = charging.payments_reconcile()
    assert counts["resolved"] == 1
    unknown.refresh_from_db()
    assert unknown.status == PaymentStatus.SUCCEEDED and unknown.gateway_intent_id
    invoice.refresh_from_db()
    assert invoice.status == InvoiceStatus.PAID
    assert charges_at_gateway(invoice) == 1
    assert InvoicePayment.objects.filter(invoice=invoice).count() == 1
    assert ledger.check() == []


@pytest.mark.django_db
def test_an_unreachable_gateway_is_our_failure_the_payment_is_sent_again_minutes_later(
    customer: Customer, acct: BillingAccount
) -> None:
    invoice = issue_invoice(acct)
    bind(customer.client, acct)
    mail.outbox.clear()
    with override_settings(SANDBOX_FAILURE_RATE=1.0, SANDBOX_FAILURE_MODE="unavailable"):
        gateways.reset()
        body = pay(customer.client, acct, invoice).json()
        # Never sent: not a decline. It waits to be sent again (nothing else charges the invoice).
        assert (body["status"], body["decline_code"]) == ("pending", ""), body
        assert pay(customer.client, acct, invoice).json()["id"] == body["id"]
        # Still down a minute later: sent again, still nothing; the next try waits longer.
        first = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=1, seconds=5)
        assert charging.payments_reconcile(now=first)["sent"] == 1
        assert charging.payments_reconcile(now=first + dt.timedelta(seconds=30))["sent"] == 0
    gateways.reset()
    later = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=4)
    assert charging.payments_reconcile(now=later)["sent"] == 1
    payment = Payment.objects.get(invoice_id=invoice.id)
    assert (payment.public_id, payment.attempt, payment.status) == (body["id"], 1, PaymentStatus.SUCCEEDED)
    assert payment.calls.filter(operation="charge").count() == 3
    invoice.refresh_from_db()
    assert invoice.status == InvoiceStatus.PAID and charges_at_gateway(invoice) == 1
    assert not DunningCase.objects.filter(invoice_id=invoice.id).exists()
    assert not OutboxMessage.objects.filter(kind="email", name__contains="payment_failed").exists()
    assert ledger.check() == []


@pytest.mark.django_db
@pytest.mark.parametrize("settled_by", ["void", "write_off"])
def test_a_payment_waiting_to_be_sent_again_is_canceled_not_sent_once_nothing_is_due(
    customer: Customer, acct: BillingAccount, settled_by: str
) -> None:
    invoice = issue_invoice(acct)
    bind(customer.client, acct)
    with override_settings(SANDBOX_FAILURE_RATE=1.0, SANDBOX_FAILURE_MODE="unavailable"):
        gateways.reset()
        body = pay(customer.client, acct, invoice).json()
    gateways.reset()
    assert body["status"] == "pending", body
    # While it waits, finance settles the invoice another way: nothing is owed any more.
    if settled_by == "void":
        invoicing_services.invoice_void(invoice_id=invoice.id, reason="billed twice", actor=FINANCE)
    else:
        invoicing_services.invoice_write_off(invoice_id=invoice.id, reason="bankrupt", actor=FINANCE)
    later = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=4)
    charging.payments_reconcile(now=later)

    payment = Payment.objects.get(invoice_id=invoice.id)
    assert payment.status == PaymentStatus.CANCELED
    assert payment.transitions.last().reason.startswith("nothing due"), payment.transitions.last().reason  # type: ignore[union-attr]
    assert payment.calls.filter(operation="charge").count() == 1  # the first, unreachable, call only
    assert charges_at_gateway(invoice) == 0
    assert not InvoicePayment.objects.filter(invoice=invoice).exists()  # no money kept as credit
    assert not DunningCase.objects.filter(invoice_id=invoice.id).exists()
    assert charging.payments_reconcile(now=later + dt.timedelta(hours=2))["sent"] == 0
    assert ledger.check() == []


@pytest.mark.django_db(transaction=True)
def test_twenty_concurrent_pay_requests_charge_once(
    customer: Customer,
    acct: BillingAccount,
    no_worker: None,
) -> None:
    invoice = issue_invoice(acct)
    bind(customer.client, acct)
    assert not Payment.objects.filter(invoice_id=invoice.id).exists()  # the queued charges wait
    assert invoice.status == InvoiceStatus.ISSUED

    def attempt(_: int) -> int:
        return pay(customer.client, acct, invoice).status_code

    statuses = in_threads(20, attempt)
    assert all(s in (200, 201, 409) for s in statuses), statuses
    assert statuses.count(201) >= 1
    assert Payment.objects.filter(invoice_id=invoice.id, status=PaymentStatus.SUCCEEDED).count() == 1
    assert charges_at_gateway(invoice) == 1
    invoice.refresh_from_db()
    assert invoice.status == InvoiceStatus.PAID and invoice.amount_paid_minor == invoice.total_minor
    assert ledger.check() == []


@pytest.mark.django_db(transaction=True)
def test_a_worker_killed_mid_charge_does_not_charge_twice_after_restart(
    customer: Customer,
    acct: BillingAccount,
    no_worker: None,
) -> None:
    invoice = issue_invoice(acct)
    bind(customer.client, acct)
    start = charging.payment_create(invoice_id=invoice.id, trigger="operator")
    payment = start.payment
    # A child process sends it with a slow gateway and is killed while the call is out.
    code = (  # on the test's clock, as conftest's manage_py does
        f"import time_machine; time_machine.travel({dt.datetime.now(dt.UTC).isoformat()!r}, tick=False).start(); "
        "import django; django.setup(); from payments import charging; "
        f"charging.payment_execute(payment_id={payment.id})"
    )
    with killed_child([sys.executable, "-c", code], SANDBOX_LATENCY_MS="20000"):
        assert wait_for(lambda: Payment.objects.get(id=payment.id).status == PaymentStatus.PROCESSING, 60)
    assert Payment.objects.get(id=payment.id).status == PaymentStatus.PROCESSING
    # Restarted: once the payment is stale (minutes), the reconciler asks the gateway, finds
    # nothing (the killed call never reached the card) and sends the same payment again, with
    # the same idempotency key: charged once, never counted as a decline, no dunning.
    later = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=6)
    counts = charging.payments_reconcile(now=later)
    assert (counts["not_sent"], counts["sent"]) == (1, 1), counts
    payment.refresh_from_db()
    assert (payment.status, payment.attempt) == (PaymentStatus.SUCCEEDED, 1)
    assert Payment.objects.filter(invoice_id=invoice.id).count() == 1
    assert not DunningCase.objects.filter(invoice_id=invoice.id).exists()
    invoice.refresh_from_db()
    assert invoice.status == InvoiceStatus.PAID
    assert charges_at_gateway(invoice) == 1
    assert ledger.check() == []


@pytest.mark.django_db
def test_tenancy_and_roles_on_every_payments_endpoint(
    customer: Customer, acct: BillingAccount, make_customer: Callable[..., Customer]
) -> None:
    invoice = issue_invoice(acct)
    bind(customer.client, acct)
    paid = pay(customer.client, acct, invoice).json()
    card = PaymentMethod.objects.get(account_id=acct.id)
    base = f"/api/v1/billing-accounts/{acct.public_id}"
    stranger = make_customer()
    for method, path in [
        ("post", f"{base}/payment-methods/setup"),
        ("get", f"{base}/payment-methods"),
        ("post", f"{base}/payment-methods"),
        ("post", f"{base}/payment-methods/{card.public_id}/default"),
        ("delete", f"{base}/payment-methods/{card.public_id}"),
        ("post", f"{base}/invoices/{invoice.public_id}/pay"),
        ("get", f"{base}/payments"),
        ("get", f"{base}/payments/{paid['id']}"),
        ("get", f"{base}/refunds"),
        ("get", f"{base}/dunning"),
    ]:
        response = getattr(stranger.client, method)(path, {}, format="json")
        assert response.status_code == 404, (method, path, response.status_code)
    # A viewer reads and cannot write.
    viewer = make_customer()
    from accounts.models import Membership

    Membership.objects.create(account=acct, user=viewer.user, role="viewer")
    assert viewer.client.get(f"{base}/payments").status_code == 200
    assert viewer.client.get(f"{base}/payment-methods").status_code == 200
    assert viewer.client.get(f"{base}/dunning").status_code == 200
    for method, path in [
        ("post", f"{base}/payment-methods/setup"),
        ("post", f"{base}/payment-methods/{card.public_id}/default"),
        ("delete", f"{base}/payment-methods/{card.public_id}"),
        ("post", f"{base}/invoices/{invoice.public_id}/pay"),
    ]:
        assert getattr(viewer.client, method)(path).status_code == 403, path
    # Anonymous: 401.
    from rest_framework.test import APIClient

    assert APIClient().get(f"{base}/payments").status_code == 401


@pytest.mark.django_db
def test_the_default_card_cannot_be_removed_while_invoices_are_unpaid_unless_another_is_set(
    customer: Customer, acct: BillingAccount
) -> None:
    invoice = issue_invoice(acct)
    first = bind(customer.client, acct, "pm_card_chargeCustomerFail").json()
    base = f"/api/v1/billing-accounts/{acct.public_id}"
    pay(customer.client, acct, invoice)
    refused = customer.client.delete(f"{base}/payment-methods/{first['id']}")
    assert refused.status_code == 409 and refused.json()["code"] == "default_card_required"
    second = bind(customer.client, acct, "pm_card_mastercard").json()
    assert second["default"] is False
    made = customer.client.post(f"{base}/payment-methods/{second['id']}/default")
    assert made.status_code == 200 and made.json()["default"] is True
    assert customer.client.delete(f"{base}/payment-methods/{first['id']}").status_code == 204
    assert [c["id"] for c in customer.client.get(f"{base}/payment-methods").json()] == [second["id"]]


@pytest.mark.django_db
def test_binding_is_rate_limited_per_account(customer: Customer, acct: BillingAccount) -> None:
    with override_settings(PAYMENTS_BINDING_RATE_ACCOUNT="3/hour"):
        codes = [
            customer.client.post(f"/api/v1/billing-accounts/{acct.public_id}/payment-methods/setup").status_code
            for _ in range(5)
        ]
    assert codes == [201, 201, 201, 429, 429]


_ = (Invoice, wait_for)


@pytest.mark.django_db
def test_a_charge_racing_a_credit_note_keeps_the_excess_as_customer_credit(
    customer: Customer, acct: BillingAccount, no_worker: None
) -> None:
    from invoicing import selectors as invoicing_selectors
    from invoicing import services as invoicing_services
    from payments.tests.helpers import FINANCE

    invoice = issue_invoice(acct, "100")  # 121.00 EUR
    bind(customer.client, acct)
    start = charging.payment_create(invoice_id=invoice.id, trigger="customer")
    assert start.payment.amount_minor == 12100  # the intent row, committed before the call
    # Meanwhile finance credits 20.00 net (24.20 gross) on the invoice.
    invoicing_services.credit_note_issue(
        invoice_id=invoice.id,
        lines=[invoicing_services.CreditNoteLineIn(description="Goodwill", amount_minor=2000)],
        reason="outage",
        actor=FINANCE,
    )
    payment = charging.payment_execute(payment_id=start.payment.id)  # the card is charged 121.00
    assert payment.status == PaymentStatus.SUCCEEDED
    invoice.refresh_from_db()
    assert invoice.status == InvoiceStatus.PAID
    assert invoice.amount_paid_minor == 12100 - 2420  # what was still owed
    received = InvoicePayment.objects.get(invoice=invoice)
    assert (received.received_minor, received.amount_minor) == (12100, 9680)
    # The 24.20 paid beyond it is the customer's credit, spendable on the next invoice.
    assert invoicing_selectors.balance(account_id=acct.id)["EUR"]["credits_available"] == 2420
    assert ledger.check() == []


@pytest.mark.django_db(transaction=True)
@override_settings(SANDBOX_LATENCY_MS=150)
@pytest.mark.parametrize("delay", [0.0, 0.05, 0.12, 0.3])
def test_a_new_default_card_racing_pay_is_charged_once_whatever_the_interleaving(
    customer: Customer, catalog: None, make_account: Callable[..., BillingAccount], delay: float
) -> None:
    """The customer pays while making a new card the default: the payment may start on the old,
    declining card (then it fails). Once the new default is set and nothing is in flight, what
    is outstanding has been charged to the new card, once. ``delay``: how long after the pay
    call the default changes (while the old card's call is out, or before it starts)."""
    import time

    from billing_site.celery import app

    gateways.reset()
    account = make_account(customer.user, currency="EUR", country="NL")
    app.conf.task_always_eager = False  # set up without the charges a binding queues
    try:
        invoice = issue_invoice(account)
        assert bind(customer.client, account, "pm_card_chargeCustomerFail").status_code == 201
        new = bind(customer.client, account, "pm_card_visa").json()
        assert new["default"] is False
    finally:
        app.conf.task_always_eager = True
    base = f"/api/v1/billing-accounts/{account.public_id}"

    def work(n: int) -> int:
        if n == 0:
            return int(pay(customer.client, account, invoice).status_code)
        time.sleep(delay)
        return int(customer.client.post(f"{base}/payment-methods/{new['id']}/default").status_code)

    statuses = in_threads(2, work)
    assert statuses[1] == 200 and statuses[0] in (200, 201, 409), statuses
    connections.close_all()
    assert not Payment.objects.filter(invoice_id=invoice.id, status__in=["pending", "processing", "unknown"]).exists()
    invoice.refresh_from_db()
    assert invoice.status == InvoiceStatus.PAID, list(Payment.objects.values_list("status", "trigger"))
    card = PaymentMethod.objects.get(id=charging.ids.decode("pmt", new["id"]))
    on_new_card = Payment.objects.filter(invoice_id=invoice.id, payment_method=card)
    assert [p.status for p in on_new_card] == [PaymentStatus.SUCCEEDED]
    assert charges_at_gateway(invoice) == 1
    assert ledger.check() == []
