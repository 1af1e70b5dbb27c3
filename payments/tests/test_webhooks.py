"""Inbound Stripe webhooks on localstripe: signatures refused with nothing written, events
stored once however often they come, processed by the outbox's task, and every handled type
delivered 1 to 5 times, shuffled and concurrently, ending exactly where in-order delivery ends.
Events are signed as Stripe signs them (localstripe emits only a few types itself; its own
signed ``payment_intent.succeeded`` reaches a live server in one test)."""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import time_machine
from django.apps import apps
from django.db import connections
from django.test import Client, override_settings

from accounts.models import BillingAccount
from billing_site.outbox import services as outbox
from billing_site.outbox.models import OutboxMessage
from conftest import Customer, in_threads, wait_for
from invoicing import ledger
from invoicing.models import Invoice, InvoicePayment, InvoiceStatus, LedgerEntry, LedgerSource

# The VAT rates again after a committing test's flush (autouse).
# The price catalog (rated usage needs its SKUs).
from payments import charging, gateways, refunds, services, webhooks
from payments.gateways.base import RefundRequest
from payments.models import (
    BindingAttempt,
    Dispute,
    DunningCase,
    Payment,
    PaymentMethod,
    PaymentStatus,
    Refund,
    RefundStatus,
    WebhookEvent,
    WebhookStatus,
)
from payments.tests.helpers import FINANCE, NOW, bind, issue_invoice
from payments.tests.stripe_flows import (
    WEBHOOK_SECRET,
    deliver_in_order,
    deliver_shuffled,
    ls_charge,
    ls_get,
    ls_intent_of,
    ls_post,
    on_stripe,
    post_event,
    post_signed,
    stripe_event,
)
from payments.tests.stripe_harness import FaultProxy, LocalStripe

Payer = tuple[Customer, BillingAccount]


pytestmark = pytest.mark.clock(NOW)


@pytest.fixture
def proxy(localstripe: LocalStripe, stripe_gateway: object) -> Iterator[FaultProxy]:
    """The same behind a fault proxy (its next requests can be made to fail)."""
    with FaultProxy(localstripe.url, stall_seconds=20) as fault_proxy, on_stripe(fault_proxy.url, timeout=30):
        yield fault_proxy


@pytest.fixture
def make_payer(
    catalog: None,
    make_customer: Callable[..., Customer],
    make_account: Callable[..., BillingAccount],
) -> Callable[[], Payer]:
    def make() -> Payer:
        customer = make_customer()
        return customer, make_account(customer.user, currency="EUR", country="NL")

    return make


def row_counts() -> dict[str, int]:
    """Rows of every table of ours (payments, the outbox, invoicing, accounts)."""
    return {
        model._meta.label: model._default_manager.count()
        for model in apps.get_models()
        if model._meta.app_label in ("payments", "outbox", "invoicing", "accounts")
    }


def paid_invoice(payer: Payer) -> tuple[Invoice, Payment]:
    """A card bound, then last month's invoice issued: the post-issue charge pays it (the
    outbox runs after each commit in these tests)."""
    customer, account = payer
    assert bind(customer.client, account).status_code == 201
    invoice = issue_invoice(account)
    payment = Payment.objects.get(invoice_id=invoice.id)
    assert payment.status == PaymentStatus.SUCCEEDED and payment.gateway_intent_id
    return invoice, payment


def lost_charge(payer: Payer, fault_proxy: FaultProxy) -> tuple[Invoice, Payment]:
    """Last month's invoice charged to the account's default card with the answer dropped
    after localstripe processed the charge: our payment is ``unknown``, with no intent id."""
    fault_proxy.inject("drop_after")
    invoice = issue_invoice(payer[1])
    payment = Payment.objects.get(invoice_id=invoice.id)
    assert payment.status == PaymentStatus.UNKNOWN and payment.gateway_intent_id is None
    return invoice, payment


def payment_state(invoice: Invoice, payment: Payment) -> tuple[Any, ...]:
    """What the customer and finance see of a payment, whichever account it is."""
    payment.refresh_from_db()
    invoice.refresh_from_db()
    case = DunningCase.objects.filter(invoice_id=invoice.id).first()
    return (
        payment.status,
        payment.decline_code,
        payment.retryable,
        bool(payment.gateway_intent_id),
        bool(payment.client_secret),
        Payment.objects.filter(invoice_id=invoice.id).count(),
        invoice.status,
        invoice.amount_paid_minor,
        InvoicePayment.objects.filter(invoice=invoice).count(),
        case.status if case else None,
    )


def events_processed(events: list[dict[str, Any]]) -> list[tuple[str, str]]:
    rows = {row.event_id: row for row in WebhookEvent.objects.filter(event_id__in=[e["id"] for e in events])}
    return [(rows[e["id"]].type, rows[e["id"]].status) for e in events]


# --- Receiving


@pytest.mark.django_db
@override_settings(STRIPE_WEBHOOK_SECRET=WEBHOOK_SECRET)
def test_a_bad_signature_a_wrong_secret_or_an_old_timestamp_is_400_and_writes_nothing() -> None:
    event = stripe_event("payment_intent.succeeded", {"id": "pi_123", "object": "payment_intent", "metadata": {}})
    body = json.dumps(event).encode()
    now = int(time.time())
    before = row_counts()
    refused: dict[str, Any] = {
        "no header": Client().post("/webhooks/stripe", data=body, content_type="application/json"),
        "garbage header": Client().post(
            "/webhooks/stripe", data=body, content_type="application/json", HTTP_STRIPE_SIGNATURE="t=1,v1=00ff"
        ),
        "wrong secret": post_signed(body, secret="whsec_someone_elses_endpoint"),
        "six minutes old": post_signed(body, timestamp=now - 360),
        "just past five minutes": post_signed(body, timestamp=now - 301),
        "body altered": Client().post(
            "/webhooks/stripe",
            data=body.replace(b"pi_123", b"pi_999"),
            content_type="application/json",
            HTTP_STRIPE_SIGNATURE=post_header(body, now),
        ),
        "signed, not an event": post_signed(b"[1, 2, 3]"),
    }
    for case, response in refused.items():
        assert response.status_code == 400, case
        assert response.json()["code"] in ("invalid_signature", "missing_signature", "invalid_event"), case
    assert refused["no header"].json()["code"] == "missing_signature"
    assert row_counts() == before  # nothing stored, nothing queued, anywhere
    with override_settings(STRIPE_WEBHOOK_SECRET=""):  # an endpoint with no secret verifies nothing
        assert post_signed(body, secret="").status_code == 400
    assert Client().get("/webhooks/stripe").status_code == 405
    # Inside the tolerance it is accepted.
    accepted = post_signed(body, timestamp=now - 290)
    assert accepted.status_code == 200 and accepted.json() == {"received": True, "duplicate": False}
    assert WebhookEvent.objects.get().event_id == event["id"]


def post_header(body: bytes, timestamp: int) -> str:
    from payments.tests.stripe_harness import sign_stripe_payload

    return sign_stripe_payload(body, WEBHOOK_SECRET, timestamp)


@pytest.mark.django_db
@override_settings(STRIPE_WEBHOOK_SECRET=WEBHOOK_SECRET)
def test_a_valid_event_is_stored_once_however_often_it_is_delivered_and_processed_by_the_outbox_task() -> None:
    event = stripe_event("customer.created", {"id": "cus_123", "object": "customer"})
    responses = [post_event(event) for _ in range(5)]
    assert [r.status_code for r in responses] == [200] * 5
    assert [r.json()["duplicate"] for r in responses] == [False, True, True, True, True]
    stored = WebhookEvent.objects.get()
    assert (stored.gateway, stored.event_id, stored.type) == ("stripe", event["id"], "customer.created")
    assert stored.payload["data"]["object"]["id"] == "cus_123"
    # Answered at once: nothing was processed in the request, one task is queued in the outbox.
    assert stored.status == WebhookStatus.PENDING and stored.attempts == 0
    queued = OutboxMessage.objects.get(name="payments.process_webhook_event")
    assert queued.payload == {"event_id": stored.id} and queued.dedupe_key == f"webhook:{stored.id}"
    assert outbox.drain() == 1
    stored.refresh_from_db()
    assert (stored.status, stored.attempts, stored.error) == (WebhookStatus.IGNORED, 1, "type not handled")
    # Processing it again (a redelivered task) does nothing.
    assert webhooks.webhook_event_process(stored.id) == WebhookStatus.IGNORED
    stored.refresh_from_db()
    assert stored.attempts == 1


@pytest.mark.django_db
@override_settings(STRIPE_WEBHOOK_SECRET=WEBHOOK_SECRET)
def test_an_event_whose_worker_died_is_processed_by_the_periodic_sweep(clock: time_machine.Traveller) -> None:
    assert post_event(stripe_event("customer.updated", {"id": "cus_1", "object": "customer"})).status_code == 200
    stored = WebhookEvent.objects.get()  # its task never ran (in this test nothing runs after commit)
    assert webhooks.webhook_events_process_stale() == {}  # too recent: its task may be running
    clock.move_to(NOW + dt.timedelta(minutes=10))
    assert webhooks.webhook_events_process_stale() == {WebhookStatus.IGNORED: 1}
    stored.refresh_from_db()
    assert (stored.status, stored.attempts) == (WebhookStatus.IGNORED, 1)
    assert webhooks.webhook_events_process_stale() == {}


@pytest.mark.django_db
def test_an_intent_we_do_not_know_is_ignored_with_a_note(stripe: LocalStripe) -> None:
    event = stripe_event("payment_intent.succeeded", {"id": "pi_not_ours", "object": "payment_intent", "metadata": {}})
    assert post_event(event).status_code == 200
    stored = WebhookEvent.objects.get()
    assert webhooks.webhook_event_process(stored.id) == WebhookStatus.IGNORED
    stored.refresh_from_db()
    assert "no payment of ours" in stored.error


@pytest.mark.django_db
def test_a_processing_error_fails_the_event_and_the_admins_rerun_processes_it(
    proxy: FaultProxy, localstripe: LocalStripe, make_payer: Callable[[], Payer]
) -> None:
    customer, account = make_payer()
    assert bind(customer.client, account).status_code == 201
    invoice = issue_invoice(account)  # (the post-issue charge is queued, and not run in this test)
    proxy.inject("drop_after")
    payment = charging.invoice_charge(invoice_id=invoice.id, trigger="operator")
    assert payment.status == PaymentStatus.UNKNOWN
    event = stripe_event("payment_intent.succeeded", ls_intent_of(localstripe, payment))
    assert post_event(event).status_code == 200
    stored = WebhookEvent.objects.get()
    # Stripe answers 500 to the re-read: processing fails, saying why (no secret in it).
    proxy.inject("500", times=None)
    assert webhooks.webhook_event_process(stored.id) == WebhookStatus.FAILED
    stored.refresh_from_db()
    assert stored.status == WebhookStatus.FAILED and stored.attempts == 1
    assert stored.error.startswith("OutcomeUnknown") and "sk_test" not in stored.error
    assert payment_state(invoice, payment)[0] == PaymentStatus.UNKNOWN
    proxy.clear()
    assert webhooks.webhook_event_rerun(stored.id) == WebhookStatus.PROCESSED
    stored.refresh_from_db()
    assert (stored.status, stored.attempts, stored.error, stored.account_id) == (
        WebhookStatus.PROCESSED,
        2,
        "",
        account.id,
    )
    payment.refresh_from_db()
    assert payment.status == PaymentStatus.SUCCEEDED and payment.gateway_intent_id == event["data"]["object"]["id"]
    invoice.refresh_from_db()
    assert invoice.status == InvoiceStatus.PAID
    assert InvoicePayment.objects.filter(invoice=invoice).count() == 1
    assert ledger.check() == []


@pytest.mark.django_db(transaction=True)
def test_a_webhook_arriving_before_the_charge_call_returned_settles_the_payment_by_its_metadata(
    proxy: FaultProxy,
    localstripe: LocalStripe,
    make_payer: Callable[[], Payer],
) -> None:
    customer, account = make_payer()
    assert bind(customer.client, account).status_code == 201
    proxy.inject("stall")  # localstripe charges; its answer is held back
    issued: dict[str, Invoice] = {}

    def issue() -> None:
        try:
            issued["invoice"] = issue_invoice(account)  # the post-issue charge runs after the commit
        finally:
            connections.close_all()

    worker = threading.Thread(target=issue)
    worker.start()
    try:
        assert wait_for(
            lambda: Payment.objects.filter(account_id=account.id, status=PaymentStatus.PROCESSING).exists(), 60
        )
        payment = Payment.objects.get(account_id=account.id)
        assert payment.gateway_intent_id is None  # the call has not returned
        assert wait_for(lambda: any(r.fault == "stall" for r in proxy.requests), 30)
        event = stripe_event("payment_intent.succeeded", ls_intent_of(localstripe, payment))
        assert post_event(event).status_code == 200  # processed at once (the outbox runs inline here)
        payment.refresh_from_db()
        assert payment.status == PaymentStatus.SUCCEEDED
        assert payment.gateway_intent_id == event["data"]["object"]["id"]
    finally:
        proxy.close()  # the held answer is dropped: the charge call ends "unknown"
        worker.join(60)
    assert not worker.is_alive()
    invoice = issued["invoice"]
    state = payment_state(invoice, payment)
    assert state[0] == PaymentStatus.SUCCEEDED  # the late "unknown" changed nothing
    assert state[6:9] == (InvoiceStatus.PAID, invoice.total_minor, 1)
    assert WebhookEvent.objects.get().account_id == account.id
    assert ledger.check() == []


@pytest.mark.django_db(transaction=True)
def test_localstripes_own_signed_webhook_reaches_the_endpoint_and_settles_a_lost_charge(
    live_server: Any,
    proxy: FaultProxy,
    localstripe: LocalStripe,
    make_payer: Callable[[], Payer],
    clock: time_machine.Traveller,
) -> None:
    customer, account = payer = make_payer()
    assert bind(customer.client, account).status_code == 201
    hook = "/_config/webhooks/billing-tests"
    ls_post(localstripe, hook, {"url": f"{live_server.url}/webhooks/stripe", "secret": WEBHOOK_SECRET})
    try:
        invoice, payment = lost_charge(payer, proxy)
        # localstripe signs with its own clock (a second later): ours agrees with it from here.
        clock.move_to(dt.datetime.fromtimestamp(ls_intent_of(localstripe, payment)["created"], dt.UTC))
        assert wait_for(lambda: Payment.objects.get(id=payment.id).status == PaymentStatus.SUCCEEDED, 60)
    finally:  # localstripe keeps its webhooks across tests: point this one at nothing it emits
        ls_post(
            localstripe,
            hook,
            {"url": f"{live_server.url}/webhooks/stripe", "secret": WEBHOOK_SECRET, "events": ["test.never"]},
        )
    payment.refresh_from_db()
    # localstripe may emit more than one event about the intent (a test's earlier objects too):
    # each of ours is processed, and one is about this payment's intent.
    events = WebhookEvent.objects.filter(type="payment_intent.succeeded")
    ours = [e for e in events if e.payload["data"]["object"]["id"] == payment.gateway_intent_id]
    assert ours and all(e.status == WebhookStatus.PROCESSED for e in ours)
    assert {e.account_id for e in ours} == {account.id}
    assert payment_state(invoice, payment)[6:9] == (InvoiceStatus.PAID, invoice.total_minor, 1)
    assert ledger.check() == []


# --- Each type, in order and shuffled: the same end


@pytest.mark.django_db(transaction=True)
def test_setup_intent_succeeded_and_the_api_converge_on_one_card_in_any_order(
    stripe: LocalStripe,
    make_payer: Callable[[], Payer],
) -> None:
    def binding(shuffled: bool) -> tuple[Any, ...]:
        customer, account = make_payer()
        base = f"/api/v1/billing-accounts/{account.public_id}/payment-methods"
        setup = customer.client.post(f"{base}/setup").json()
        # The customer's browser confirms the card with Stripe.
        gateways.gateway("stripe").setup_intent_confirm_test(
            intent_id=setup["setup_intent_id"], test_payment_method="pm_card_visa"
        )
        events = [
            stripe_event("setup_intent.succeeded", ls_get(stripe, f"/v1/setup_intents/{setup['setup_intent_id']}"))
        ]

        def complete() -> int:
            return int(
                customer.client.post(base, {"setup_intent_id": setup["setup_intent_id"]}, format="json").status_code
            )

        if shuffled:
            racers: list[Callable[[], Any]] = [complete, lambda: deliver_shuffled(events, seed=7)]
            raced = in_threads(2, lambda i: racers[i]())
            assert raced[0] == 201 and not isinstance(raced[1], Exception), raced
        else:
            deliver_in_order(events)
            assert complete() == 201
        assert events_processed(events) == [("setup_intent.succeeded", WebhookStatus.PROCESSED)]
        account.refresh_from_db()
        cards = PaymentMethod.objects.filter(account_id=account.id)
        return (
            [(c.brand, c.last4, c.is_default, c.detached_at) for c in cards],
            BindingAttempt.objects.get(account_id=account.id).status,
            account.state,
        )

    in_order = binding(shuffled=False)
    assert in_order == ([("visa", "4242", True, None)], "succeeded", "active")
    assert binding(shuffled=True) == in_order


@pytest.mark.django_db(transaction=True)
def test_payment_intent_succeeded_in_any_order_settles_a_lost_charge_once(
    proxy: FaultProxy,
    localstripe: LocalStripe,
    make_payer: Callable[[], Payer],
) -> None:
    def run(shuffled: bool) -> tuple[Any, ...]:
        customer, account = payer = make_payer()
        assert bind(customer.client, account).status_code == 201
        invoice, payment = lost_charge(payer, proxy)
        events = [
            stripe_event("payment_intent.created", ls_intent_of(localstripe, payment)),
            stripe_event("payment_intent.succeeded", ls_intent_of(localstripe, payment)),
        ]
        deliver_shuffled(events, seed=11) if shuffled else deliver_in_order(events)
        assert [s for _, s in events_processed(events)] == [WebhookStatus.IGNORED, WebhookStatus.PROCESSED]
        return payment_state(invoice, payment)

    in_order = run(shuffled=False)
    assert in_order[0] == PaymentStatus.SUCCEEDED and in_order[6:9] == (InvoiceStatus.PAID, 12100, 1)
    assert run(shuffled=True) == in_order
    assert ledger.check() == []


@pytest.mark.django_db(transaction=True)
def test_payment_intent_payment_failed_in_any_order_fails_a_lost_charge_once(
    proxy: FaultProxy,
    localstripe: LocalStripe,
    make_payer: Callable[[], Payer],
) -> None:
    def run(shuffled: bool) -> tuple[Any, ...]:
        customer, account = payer = make_payer()
        assert bind(customer.client, account, "pm_card_chargeCustomerFail").status_code == 201
        invoice, payment = lost_charge(payer, proxy)
        events = [stripe_event("payment_intent.payment_failed", ls_intent_of(localstripe, payment))]
        deliver_shuffled(events, seed=13) if shuffled else deliver_in_order(events)
        assert events_processed(events) == [("payment_intent.payment_failed", WebhookStatus.PROCESSED)]
        return payment_state(invoice, payment)

    in_order = run(shuffled=False)
    assert in_order[:3] == (PaymentStatus.FAILED, "card_declined", True)
    assert in_order[6:] == (InvoiceStatus.ISSUED, 0, 0, "open")  # dunning chases it
    assert run(shuffled=True) == in_order
    assert ledger.check() == []


def three_d_secure_card(localstripe: LocalStripe, account: BillingAccount) -> None:
    """Make a card that asks for 3-D Secure on every charge the account's default. localstripe
    asks for it at binding too (a SetupIntent can never succeed with it), so the card is
    attached at localstripe and recorded here as bound, the way the binding would record it."""
    from payments.models import PaymentProfile

    profile = PaymentProfile.objects.get(account_id=account.id)
    method = ls_post(
        localstripe,
        "/v1/payment_methods",
        {"type": "card", "card": {"number": "4000002760003184", "exp_month": 12, "exp_year": 2031, "cvc": "123"}},
    )
    ls_post(localstripe, f"/v1/payment_methods/{method['id']}/attach", {"customer": profile.gateway_customer_id})
    card = PaymentMethod.objects.create(
        account_id=account.id,
        gateway="stripe",
        gateway_payment_method_id=method["id"],
        brand="visa",
        last4="3184",
        exp_month=12,
        exp_year=2031,
        fingerprint="3ds-test-card",
    )
    services.payment_method_set_default(account_id=account.id, payment_method_id=card.id)


@pytest.mark.django_db(transaction=True)
def test_payment_intent_requires_action_then_succeeded_in_any_order_ends_succeeded(
    proxy: FaultProxy,
    localstripe: LocalStripe,
    make_payer: Callable[[], Payer],
) -> None:
    def run(shuffled: bool) -> tuple[Any, ...]:
        customer, account = payer = make_payer()
        assert bind(customer.client, account).status_code == 201
        three_d_secure_card(localstripe, account)
        invoice, payment = lost_charge(payer, proxy)
        waiting = ls_intent_of(localstripe, payment)
        assert waiting["status"] == "requires_action"
        events = [stripe_event("payment_intent.requires_action", waiting)]
        if not shuffled:
            deliver_in_order(events)
            payment.refresh_from_db()
            assert payment.status == PaymentStatus.REQUIRES_ACTION and payment.client_secret
        # The customer authenticates in the browser.
        ls_post(
            localstripe,
            f"/v1/payment_intents/{waiting['id']}/_authenticate",
            {"client_secret": waiting["client_secret"], "success": True},
        )
        events.append(stripe_event("payment_intent.succeeded", ls_intent_of(localstripe, payment)))
        deliver_shuffled(events, seed=17) if shuffled else deliver_in_order(events[1:])
        assert [s for _, s in events_processed(events)] == [WebhookStatus.PROCESSED] * 2
        return payment_state(invoice, payment)

    in_order = run(shuffled=False)
    assert in_order[0] == PaymentStatus.SUCCEEDED and in_order[6:9] == (InvoiceStatus.PAID, 12100, 1)
    assert run(shuffled=True) == in_order
    assert ledger.check() == []


@pytest.mark.django_db(transaction=True)
def test_charge_refunded_in_any_order_records_dashboard_refunds_once_and_ours_not_twice(
    stripe: LocalStripe,
    make_payer: Callable[[], Payer],
) -> None:
    def run(shuffled: bool) -> tuple[Any, ...]:
        invoice, payment = paid_invoice(make_payer())
        ours = refunds.refund_issue(payment_id=payment.id, amount_minor=1000, reason="goodwill", actor=FINANCE)
        assert ours.status == RefundStatus.SUCCEEDED
        events = []
        for n, amount in enumerate([500, 700]):
            # Refunded in the Stripe dashboard: no refund of ours behind it.
            gateways.gateway("stripe").refund(
                RefundRequest(
                    intent_id=payment.gateway_intent_id or "",
                    amount_minor=amount,
                    currency="EUR",
                    idempotency_key=f"dashboard-{payment.id}-{n}",
                    metadata={},
                )
            )
            events.append(stripe_event("charge.refunded", ls_charge(stripe, payment.gateway_charge_id)))
            if not shuffled:
                deliver_in_order(events[-1:])
        if shuffled:
            deliver_shuffled(events, seed=19)
        assert [s for _, s in events_processed(events)] == [WebhookStatus.PROCESSED] * 2
        payment.refresh_from_db()
        invoice.refresh_from_db()
        rows = Refund.objects.filter(payment=payment).order_by("amount_minor")
        return (
            [(r.amount_minor, r.status, r.requested_by == FINANCE.name, bool(r.credit_note_id)) for r in rows],
            len({r.gateway_refund_id for r in rows}),
            payment.amount_refunded_minor,
            invoice.amount_refunded_minor,
            invoice.status,
        )

    in_order = run(shuffled=False)
    assert in_order == (
        [(500, "succeeded", False, True), (700, "succeeded", False, True), (1000, "succeeded", True, True)],
        3,
        2200,
        2200,
        InvoiceStatus.PAID,
    )
    assert run(shuffled=True) == in_order
    assert ledger.check() == []


@pytest.mark.django_db(transaction=True)
def test_charge_dispute_created_and_closed_in_any_order_post_each_stage_once(
    stripe: LocalStripe,
    make_payer: Callable[[], Payer],
) -> None:
    def run(shuffled: bool, n: int) -> tuple[Any, ...]:
        _, payment = paid_invoice(make_payer())
        dispute = {
            "id": f"dp_webhooks_{n}",
            "object": "dispute",
            "amount": 12100,
            "currency": "eur",
            "charge": payment.gateway_charge_id,
            "payment_intent": payment.gateway_intent_id,
            "reason": "fraudulent",
            "status": "needs_response",
        }
        events = [
            stripe_event("charge.dispute.created", dispute),
            stripe_event("charge.dispute.closed", {**dispute, "status": "won"}),
        ]
        deliver_shuffled(events, seed=23) if shuffled else deliver_in_order(events)
        assert [s for _, s in events_processed(events)] == [WebhookStatus.PROCESSED] * 2
        row = Dispute.objects.get(payment=payment)
        payment.refresh_from_db()
        stages = sorted(
            LedgerEntry.objects.filter(
                source_id=row.id,
                source_type__in=[LedgerSource.DISPUTE_OPENED, LedgerSource.DISPUTE_WON, LedgerSource.DISPUTE_LOST],
            ).values_list("source_type", flat=True)
        )
        return (row.status, row.amount_minor, row.reason, payment.amount_disputed_minor, stages)

    in_order = run(shuffled=False, n=1)
    assert in_order == ("won", 12100, "fraudulent", 0, [LedgerSource.DISPUTE_OPENED, LedgerSource.DISPUTE_WON])
    assert run(shuffled=True, n=2) == in_order
    assert ledger.check() == []


@pytest.mark.django_db(transaction=True)
def test_payment_method_detached_in_any_order_removes_the_card_once(
    stripe: LocalStripe,
    make_payer: Callable[[], Payer],
) -> None:
    def run(shuffled: bool) -> tuple[Any, ...]:
        customer, account = make_payer()
        assert bind(customer.client, account).status_code == 201
        card = PaymentMethod.objects.get(account_id=account.id)
        # Removed in the Stripe dashboard.
        gateways.gateway("stripe").payment_method_detach(card.gateway_payment_method_id)
        events = [
            stripe_event(
                "payment_method.detached", ls_get(stripe, f"/v1/payment_methods/{card.gateway_payment_method_id}")
            )
        ]
        deliver_shuffled(events, seed=29) if shuffled else deliver_in_order(events)
        assert events_processed(events) == [("payment_method.detached", WebhookStatus.PROCESSED)]
        card.refresh_from_db()
        listed = customer.client.get(f"/api/v1/billing-accounts/{account.public_id}/payment-methods").json()
        return (card.detached_at is not None, card.is_default, listed)

    in_order = run(shuffled=False)
    assert in_order == (True, False, [])
    assert run(shuffled=True) == in_order


@pytest.mark.django_db
@override_settings(STRIPE_WEBHOOK_SECRET=WEBHOOK_SECRET)
def test_signed_but_malformed_bodies_are_400_with_a_reason_and_store_nothing() -> None:
    """Issue 19: a prober with the secret's signature (or Stripe on a bad day) sent bodies that
    answered an HTML 500, or were stored: each is a JSON 400 naming what is wrong."""
    good = stripe_event("payment_intent.succeeded", {"id": "pi_123", "object": "payment_intent", "metadata": {}})
    deep = b'{"a": ' * 3000 + b'"x"' + b"}" * 3000
    bodies: dict[str, bytes] = {
        "NUL in id": json.dumps({**good, "id": "evt_\u0000x"}).encode(),
        "NUL in type": json.dumps({**good, "type": "payment_intent.succeeded\u0000"}).encode(),
        "NUL in the object's id": json.dumps({**good, "data": {"object": {"id": "pi_\u0000"}}}).encode(),
        "data a string": json.dumps({**good, "data": "s"}).encode(),
        "data a list": json.dumps({**good, "data": [1]}).encode(),
        "object a list": json.dumps({**good, "data": {"object": [1]}}).encode(),
        "3,000 levels": b'{"id": "evt_1", "type": "x.y", "data": {"object": {"id": "pi_1", "x": ' + deep + b"}}}",
        "nested arrays": b'{"id": "evt_1", "type": "x.y", "data": {"object": {"id": "a", "b": '
        + b"[" * 3000
        + b"]" * 3000
        + b"}}}",
        "a lone surrogate": json.dumps({**good, "id": "evt_\ud800"}).encode(),
        "a lone surrogate deep inside": json.dumps(
            {**good, "data": {"object": {"id": "pi_1", "n": "\udfff"}}}
        ).encode(),
        "id a number": json.dumps({**good, "id": 12345}).encode(),
        "type a list": json.dumps({**good, "type": ["payment_intent.succeeded"]}).encode(),
        "id empty": json.dumps({**good, "id": ""}).encode(),
        "id too long": json.dumps({**good, "id": "evt_" + "x" * 200}).encode(),
        "object id a number": json.dumps({**good, "data": {"object": {"id": 7}}}).encode(),
        "not UTF-8": json.dumps(good).encode().replace(b"pi_123", b"pi_\xff\xfe"),
    }
    before = row_counts()
    for case, body in bodies.items():
        response = post_signed(body)
        assert response.status_code == 400, (case, response.content[:200])
        assert response["Content-Type"].startswith("application/json"), case
        answer = response.json()
        assert answer["code"] == "invalid_event" and answer["detail"], (case, answer)
    assert row_counts() == before  # nothing stored, nothing queued
    assert post_signed(json.dumps(good).encode()).status_code == 200


@pytest.mark.django_db
@override_settings(STRIPE_WEBHOOK_SECRET=WEBHOOK_SECRET)
def test_a_timestamp_outside_the_tolerance_is_refused_both_ways() -> None:
    event = stripe_event("customer.created", {"id": "cus_9", "object": "customer"})
    body = json.dumps(event).encode()
    now = int(time.time())
    before = row_counts()
    for timestamp in (now + 100_000, now + 301, now - 301):
        response = post_signed(body, timestamp=timestamp)
        assert (response.status_code, response.json()["code"]) == (400, "invalid_signature"), timestamp
    assert row_counts() == before
    # A clock a little ahead of ours is fine.
    assert post_signed(body, timestamp=now + 290).status_code == 200
