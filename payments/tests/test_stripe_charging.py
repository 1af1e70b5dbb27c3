"""Charging through the real ``stripe`` SDK against localstripe over HTTP, with a fault proxy
in between: whatever the network does to the charge request (a 500, the answer dropped after
the charge succeeded, a stall past the client's timeout, a reset before or after the gateway
processed it), the payment ends with exactly one charge at the gateway, and the reconciler
resolves what the live call could not tell."""

from __future__ import annotations

import datetime as dt
import sys
from collections.abc import Callable, Iterator

import pytest

from accounts.models import BillingAccount
from billing_site.outbox.models import OutboxMessage
from conftest import Customer, killed_child, wait_for
from invoicing import ledger
from invoicing.models import Invoice, InvoicePayment, InvoiceStatus
from payments import charging, gateways
from payments.gateways.base import ChargeStatus
from payments.models import DunningCase, Payment, PaymentProfile, PaymentStatus
from payments.tests.helpers import NOW, bind, issue_invoice, pay
from payments.tests.stripe_flows import on_stripe
from payments.tests.stripe_harness import LOCALSTRIPE_KEY, FaultyStripe

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


def charge_requests(faulty: FaultyStripe) -> list[str]:
    """The idempotency keys of the PaymentIntent creations that reached the proxy, in order."""
    return [r.idempotency_key for r in faulty.proxy.requests if r.method == "POST" and r.path == "/v1/payment_intents"]


@pytest.mark.django_db
@pytest.mark.parametrize("fault", ["500", "reset"])
def test_a_request_that_never_reached_the_gateway_is_sent_again_with_its_key_and_charges_once(
    customer: Customer, acct: BillingAccount, faulty: FaultyStripe, fault: str
) -> None:
    invoice = _ready(customer, acct)
    faulty.proxy.inject(fault, times=1)
    body = pay(customer.client, acct, invoice).json()
    assert body["status"] == "unknown", body  # a 500 or a reset may have charged: we cannot tell
    assert charges_at_gateway(faulty, acct) == []
    # Recent: the reconciler does not give up on it yet (the request might still be in flight).
    assert charging.payments_reconcile()["still_unknown"] == 1
    # Minutes later: no intent carries our payment id, so it never reached the gateway. It is
    # our failure, not the customer's: the same payment is sent again at once, with the same
    # idempotency key, and charges once. No decline, no dunning, no email.
    later = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=6)
    counts = charging.payments_reconcile(now=later)
    assert (counts["not_sent"], counts["sent"]) == (1, 1), counts
    payment = Payment.objects.get(invoice_id=invoice.id)
    assert (payment.public_id, payment.attempt, payment.status) == (body["id"], 1, PaymentStatus.SUCCEEDED)
    assert charge_requests(faulty) == [payment.idempotency_key] * 2
    invoice.refresh_from_db()
    assert invoice.status == InvoiceStatus.PAID and invoice.amount_paid_minor == 12100
    assert len(charges_at_gateway(faulty, acct)) == 1
    assert not DunningCase.objects.filter(invoice_id=invoice.id).exists()
    assert not OutboxMessage.objects.filter(kind="email", name__contains="payment_failed").exists()
    assert ledger.check() == []


@pytest.mark.django_db
def test_the_reconciler_asks_for_the_customers_intents_not_the_whole_account(
    customer: Customer, acct: BillingAccount, faulty: FaultyStripe
) -> None:
    invoice = _ready(customer, acct)
    faulty.proxy.inject("reset", times=1)
    assert pay(customer.client, acct, invoice).json()["status"] == "unknown"
    customer_id = PaymentProfile.objects.get(account_id=acct.id).gateway_customer_id
    # The gateway answers the look-up with the customer's intents (none): the list carries the
    # customer and the time since when, one page, never a walk through the whole account.
    empty = {"object": "list", "data": [], "has_more": False, "url": "/v1/payment_intents"}
    faulty.proxy.inject("respond", status=200, body=empty)
    later = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=6)
    assert charging.payments_reconcile(now=later)["not_sent"] == 1
    lists = [r.path for r in faulty.proxy.requests if r.method == "GET" and r.path.startswith("/v1/payment_intents?")]
    assert len(lists) == 1, lists
    assert f"customer={customer_id}" in lists[0] and "created" in lists[0]
    invoice.refresh_from_db()
    assert invoice.status == InvoiceStatus.PAID and len(charges_at_gateway(faulty, acct)) == 1


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("fault", ["hold", "stall"])
def test_a_worker_killed_with_its_request_out_is_charged_once_within_minutes(
    customer: Customer, acct: BillingAccount, faulty: FaultyStripe, no_worker: None, fault: str
) -> None:
    """``hold``: the worker dies before its request reached the gateway (the proxy never forwards
    it): the reconciler finds nothing and sends the same payment again. ``stall``: it dies after
    the gateway charged: the reconciler finds the charge and records it. One charge either way."""
    invoice = _ready(customer, acct)
    payment = charging.payment_create(invoice_id=invoice.id, trigger="after_issue").payment
    faulty.proxy.inject(fault, times=1)
    code = (
        f"import time_machine; time_machine.travel({dt.datetime.now(dt.UTC).isoformat()!r}, tick=True).start(); "
        "import django; django.setup(); from payments import charging; "
        f"charging.payment_execute(payment_id={payment.id})"
    )
    stripe = {"STRIPE_API_BASE": faulty.proxy.url, "STRIPE_SECRET_KEY": LOCALSTRIPE_KEY, "STRIPE_TIMEOUT_SECONDS": "30"}
    with killed_child([sys.executable, "-c", code], **stripe):
        assert wait_for(lambda: len(charge_requests(faulty)) == 1, 60)
        if fault == "stall":
            assert wait_for(lambda: len(charges_at_gateway(faulty, acct)) == 1, 30)
    assert Payment.objects.get(id=payment.id).status == PaymentStatus.PROCESSING
    later = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=6)
    counts = charging.payments_reconcile(now=later)
    assert counts["resolved" if fault == "stall" else "not_sent"] == 1, counts
    payment.refresh_from_db()
    assert (payment.status, payment.attempt) == (PaymentStatus.SUCCEEDED, 1)
    invoice.refresh_from_db()
    assert invoice.status == InvoiceStatus.PAID
    assert len(charges_at_gateway(faulty, acct)) == 1
    assert InvoicePayment.objects.filter(invoice=invoice).count() == 1
    assert not DunningCase.objects.filter(invoice_id=invoice.id).exists()
    assert charging.payments_reconcile(now=later + dt.timedelta(minutes=10))["checked"] == 0
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
