"""Charging through the real ``stripe`` SDK against localstripe over HTTP, with a fault proxy
in between: whatever the network does to the charge request (a 500, the answer dropped after
the charge succeeded, a stall past the client's timeout, a reset before or after the gateway
processed it), the payment ends with exactly one charge at the gateway, and the reconciler
resolves what the live call could not tell."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator

import pytest

from accounts.models import BillingAccount
from conftest import Customer
from invoicing import ledger
from invoicing.models import Invoice, InvoicePayment, InvoiceStatus
from payments import charging, gateways
from payments.gateways.base import ChargeStatus
from payments.models import Payment, PaymentProfile, PaymentStatus
from payments.tests.helpers import NOW, bind, issue_invoice, pay
from payments.tests.stripe_flows import on_stripe
from payments.tests.stripe_harness import FaultyStripe

pytestmark = pytest.mark.clock(NOW, tick=True)


@pytest.fixture
def acct(catalog: None, customer: Customer, make_account: Callable[..., BillingAccount]) -> BillingAccount:
    return make_account(customer.user, currency="EUR", country="NL")


@pytest.fixture
def faulty(fault_proxy: FaultyStripe) -> Iterator[FaultyStripe]:
    with on_stripe(fault_proxy.proxy.url, timeout=1.5):
        yield fault_proxy


def charges_at_gateway(faulty: FaultyStripe, account: BillingAccount) -> list[str]:
    """The succeeded PaymentIntents localstripe holds for the account's customer."""
    customer_id = PaymentProfile.objects.get(account_id=account.id).gateway_customer_id
    since = dt.datetime.now(dt.UTC) - dt.timedelta(days=1)
    return [
        intent.intent_id
        for intent in faulty.gateway.payment_intents_for_customer(customer_id=customer_id, created_since=since)
        if intent.status == ChargeStatus.SUCCEEDED
    ]


def _ready(customer: Customer, account: BillingAccount) -> Invoice:
    assert bind(customer.client, account).status_code == 201
    invoice = issue_invoice(account)
    assert PaymentProfile.objects.get(account_id=account.id).gateway == "stripe"
    return invoice


@pytest.mark.django_db
def test_a_clean_charge_through_stripe(customer: Customer, acct: BillingAccount, faulty: FaultyStripe) -> None:
    invoice = _ready(customer, acct)
    body = pay(customer.client, acct, invoice).json()
    assert body["status"] == "succeeded", body
    invoice.refresh_from_db()
    assert invoice.status == InvoiceStatus.PAID
    assert len(charges_at_gateway(faulty, acct)) == 1
    # Our payment id travels in the intent's metadata.
    payment = Payment.objects.get(invoice_id=invoice.id)
    intent = faulty.gateway.payment_intent_retrieve(payment.gateway_intent_id or "")
    assert intent.metadata["payment_id"] == payment.public_id
    assert ledger.check() == []


@pytest.mark.django_db
@pytest.mark.parametrize("fault", ["drop_after", "stall", "reset_after"])
def test_the_answer_lost_after_the_charge_succeeded_is_resolved_by_the_reconciler(
    customer: Customer, acct: BillingAccount, faulty: FaultyStripe, fault: str
) -> None:
    invoice = _ready(customer, acct)
    faulty.proxy.inject(fault, times=1)
    body = pay(customer.client, acct, invoice).json()
    assert body["status"] == "unknown", body
    assert len(charges_at_gateway(faulty, acct)) == 1  # the gateway did charge
    # Nothing charges the invoice again while the payment is unknown.
    again = pay(customer.client, acct, invoice)
    assert again.status_code == 200 and again.json()["id"] == body["id"]
    counts = charging.payments_reconcile()
    assert counts["resolved"] == 1, counts
    payment = Payment.objects.get(invoice_id=invoice.id)
    assert payment.status == PaymentStatus.SUCCEEDED and payment.gateway_intent_id
    invoice.refresh_from_db()
    assert invoice.status == InvoiceStatus.PAID
    assert InvoicePayment.objects.filter(invoice=invoice).count() == 1
    assert len(charges_at_gateway(faulty, acct)) == 1
    assert ledger.check() == []


@pytest.mark.django_db
@pytest.mark.parametrize("fault", ["500", "reset"])
def test_a_request_that_never_charged_is_found_not_sent_and_the_retry_charges_once(
    customer: Customer, acct: BillingAccount, faulty: FaultyStripe, fault: str
) -> None:
    invoice = _ready(customer, acct)
    faulty.proxy.inject(fault, times=1)
    body = pay(customer.client, acct, invoice).json()
    assert body["status"] == "unknown", body  # a 500 or a reset may have charged: we cannot tell
    assert charges_at_gateway(faulty, acct) == []
    # Recent: the reconciler does not give up on it yet (the request might still be in flight).
    assert charging.payments_reconcile()["still_unknown"] == 1
    # Later: no intent carries our payment id, so it was not sent; a retry charges once.
    later = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=10)
    assert charging.payments_reconcile(now=later)["not_sent"] == 1
    assert Payment.objects.get(invoice_id=invoice.id).status == PaymentStatus.FAILED
    retried = pay(customer.client, acct, invoice).json()
    assert retried["status"] == "succeeded" and retried["attempt"] == 2
    assert len(charges_at_gateway(faulty, acct)) == 1
    assert ledger.check() == []


@pytest.mark.django_db
def test_a_decline_at_charge_time_on_stripe(customer: Customer, acct: BillingAccount, faulty: FaultyStripe) -> None:
    invoice = issue_invoice(acct)
    assert bind(customer.client, acct, "pm_card_chargeCustomerFail").status_code == 201
    body = pay(customer.client, acct, invoice).json()
    assert body["status"] == "failed" and body["decline_code"]
    assert charges_at_gateway(faulty, acct) == []


@pytest.mark.django_db
def test_a_card_declined_at_binding_on_stripe(customer: Customer, acct: BillingAccount, faulty: FaultyStripe) -> None:
    response = bind(customer.client, acct, "pm_card_chargeDeclined")
    assert response.status_code == 402 and response.json()["code"] == "card_declined"


_ = gateways
