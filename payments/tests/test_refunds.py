"""Refunds: partial and of the rest at Stripe (localstripe), each with its credit note and its
ledger entry and listed in the API; never more than was paid, even asked for at once; an
answer lost and a worker lost, settled by the reconciler; refunds made in the Stripe dashboard
learnt from ``charge.refunded`` and ours never counted twice. Every money test ends with the
ledger check clean."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

import pytest
import time_machine
from django.test import override_settings

from accounts.models import BillingAccount
from billing_site.common import ids
from billing_site.common.actors import Actor
from billing_site.common.errors import ApplicationError, Conflict
from conftest import Customer, in_threads
from invoicing import ledger
from invoicing.models import CreditNote, Invoice, InvoiceStatus, LedgerEntry, LedgerSource

# The VAT rates again after a committing test's flush (autouse).
# The price catalog (rated usage needs its SKUs).
from payments import charging, gateways, refunds, webhooks
from payments.gateways.base import RefundRequest
from payments.models import Payment, PaymentStatus, Refund, RefundStatus, SandboxObject, WebhookEvent, WebhookStatus
from payments.tests.helpers import FINANCE, NOW, bind, issue_invoice
from payments.tests.stripe_flows import ls_charge, post_event, stripe_event
from payments.tests.stripe_harness import LocalStripe

Payer = tuple[Customer, BillingAccount]


pytestmark = pytest.mark.clock(NOW)


@pytest.fixture
def payer(
    catalog: None,
    customer: Customer,
    make_account: Callable[..., BillingAccount],
) -> Payer:
    return customer, make_account(customer.user, currency="EUR", country="NL")


def paid(payer: Payer) -> tuple[Invoice, Payment]:
    """Last month's invoice (121.00 EUR) paid with a visa card through the account's gateway."""
    customer, account = payer
    assert bind(customer.client, account).status_code == 201
    invoice = issue_invoice(account)
    payment = charging.invoice_charge(invoice_id=invoice.id, trigger="operator")
    assert payment.status == PaymentStatus.SUCCEEDED
    return invoice, payment


def deliver_and_process(event: dict[str, Any]) -> WebhookEvent:
    """Post a signed event and run the task the outbox queued (tests in one transaction never
    commit, so the outbox's after-commit delivery does not run by itself)."""
    assert post_event(event).status_code == 200
    stored = WebhookEvent.objects.get(event_id=event["id"])
    webhooks.webhook_event_process(stored.id)
    stored.refresh_from_db()
    return stored


def refund_entries(refund: Refund) -> int:
    return LedgerEntry.objects.filter(source_type=LedgerSource.REFUND, memo__contains=refund.public_id).count()


@pytest.mark.django_db
def test_a_partial_refund_and_then_the_rest_at_stripe(
    stripe: LocalStripe, payer: Payer, clock: time_machine.Traveller
) -> None:
    customer, account = payer
    invoice, payment = paid(payer)
    first = refunds.refund_issue(payment_id=payment.id, amount_minor=2100, reason="Outage credit", actor=FINANCE)
    assert first.status == RefundStatus.SUCCEEDED and first.gateway_refund_id and first.credit_note_id
    charge = ls_charge(stripe, payment.gateway_charge_id)
    assert charge["amount_refunded"] == 2100
    at_stripe = {r["id"]: r for r in charge["refunds"]["data"]}
    assert at_stripe[first.gateway_refund_id]["amount"] == 2100
    assert at_stripe[first.gateway_refund_id]["metadata"]["refund_id"] == first.public_id
    note = CreditNote.objects.get(id=first.credit_note_id)
    assert (note.invoice_id, note.total_minor) == (invoice.id, 2100)
    assert refund_entries(first) == 1
    # The rest of it, an hour later.
    clock.move_to(NOW + dt.timedelta(hours=1))
    rest = refunds.refund_issue(payment_id=payment.id, amount_minor=10000, reason="Account closed", actor=FINANCE)
    assert rest.status == RefundStatus.SUCCEEDED
    assert ls_charge(stripe, payment.gateway_charge_id)["amount_refunded"] == 12100
    payment.refresh_from_db()
    invoice.refresh_from_db()
    assert payment.amount_refunded_minor == 12100 and invoice.amount_refunded_minor == 12100
    assert sum(CreditNote.objects.filter(invoice=invoice).values_list("total_minor", flat=True)) == 12100
    assert invoice.status == InvoiceStatus.PAID  # refunded in full, the invoice stays what it was
    # Nothing is left: one more cent is refused, and nothing reaches the gateway.
    with pytest.raises(Conflict) as refused:
        refunds.refund_issue(payment_id=payment.id, amount_minor=1, reason="once more", actor=FINANCE)
    assert refused.value.code == "refund_too_large"
    assert Refund.objects.filter(payment=payment).count() == 2
    assert len(ls_charge(stripe, payment.gateway_charge_id)["refunds"]["data"]) == 2
    # The customer sees both, newest first, with their credit notes.
    listed = customer.client.get(f"/api/v1/billing-accounts/{account.public_id}/refunds").json()
    listed = listed["results"] if isinstance(listed, dict) else listed
    assert [(r["id"], r["amount"], r["status"], r["reason"], r["payment"]) for r in listed] == [
        (rest.public_id, "100.00", "succeeded", "Account closed", payment.public_id),
        (first.public_id, "21.00", "succeeded", "Outage credit", payment.public_id),
    ]
    notes = [ids.encode("crn", r.credit_note_id) for r in (rest, first) if r.credit_note_id]
    assert [r["credit_note"] for r in listed] == notes
    assert ledger.check() == []


@pytest.mark.django_db
def test_a_refund_asks_for_a_reason_a_positive_amount_and_a_succeeded_payment(
    payer: Payer, make_account: Callable[..., BillingAccount]
) -> None:
    customer, _ = payer
    _, payment = paid(payer)
    for amount, reason, code in [(100, "  ", "reason_required"), (0, "why", "invalid"), (-5, "why", "invalid")]:
        with pytest.raises(ApplicationError) as refused:
            refunds.refund_create(payment_id=payment.id, amount_minor=amount, reason=reason, actor=FINANCE)
        assert refused.value.code == code
    with pytest.raises(Conflict) as too_much:
        refunds.refund_create(payment_id=payment.id, amount_minor=12101, reason="why", actor=FINANCE)
    assert too_much.value.code == "refund_too_large"
    # A declined payment took nothing: nothing to refund.
    other = make_account(customer.user, currency="EUR", country="NL")
    assert bind(customer.client, other, "pm_card_chargeCustomerFail").status_code == 201
    declined = charging.invoice_charge(invoice_id=issue_invoice(other).id, trigger="operator")
    assert declined.status == PaymentStatus.FAILED
    with pytest.raises(Conflict) as not_paid:
        refunds.refund_create(payment_id=declined.id, amount_minor=100, reason="why", actor=FINANCE)
    assert not_paid.value.code == "not_refundable"
    assert not Refund.objects.exists()
    assert ledger.check() == []


@pytest.mark.django_db(transaction=True)
def test_refunds_asked_for_at_once_never_exceed_what_was_paid(
    payer: Payer,
) -> None:
    customer, account = payer
    assert bind(customer.client, account).status_code == 201
    invoice = issue_invoice(account)  # paid on the sandbox by the post-issue charge
    payment = Payment.objects.get(invoice_id=invoice.id, status=PaymentStatus.SUCCEEDED)

    def ask(_: int) -> str:
        try:
            return str(
                refunds.refund_issue(payment_id=payment.id, amount_minor=5000, reason="at once", actor=FINANCE).status
            )
        except Conflict as exc:
            return exc.code

    outcomes = in_threads(10, ask)
    assert sorted(outcomes) == ["refund_too_large"] * 8 + ["succeeded"] * 2, outcomes
    payment.refresh_from_db()
    assert payment.amount_refunded_minor == 10000
    at_gateway = [row.data["amount"] for row in SandboxObject.objects.filter(kind="refund")]
    assert sorted(at_gateway) == [5000, 5000]
    # What is left can still be refunded, and no more.
    assert refunds.refund_issue(payment_id=payment.id, amount_minor=2100, reason="rest", actor=FINANCE).status == (
        RefundStatus.SUCCEEDED
    )
    invoice.refresh_from_db()
    assert invoice.amount_refunded_minor == 12100
    assert ledger.check() == []


@pytest.mark.django_db
def test_a_lost_refund_answer_leaves_it_unknown_until_the_reconciler_settles_it(payer: Payer) -> None:
    invoice, payment = paid(payer)
    with override_settings(SANDBOX_FAILURE_RATE=1.0):
        gateways.reset()
        # Half the calls fail before doing anything (failed, nothing moved), half after (unknown).
        for _ in range(20):
            refund = refunds.refund_issue(payment_id=payment.id, amount_minor=100, reason="lost", actor=FINANCE)
            if refund.status == RefundStatus.UNKNOWN:
                break
            assert refund.status == RefundStatus.FAILED and refund.failure_reason.startswith("gateway_unavailable")
    assert refund.status == RefundStatus.UNKNOWN and refund.gateway_refund_id is None
    # While unknown it counts as refunded: what is left excludes it.
    with pytest.raises(Conflict):
        refunds.refund_create(payment_id=payment.id, amount_minor=12100, reason="all", actor=FINANCE)
    gateways.reset()
    counts = refunds.refunds_reconcile()
    assert (counts["succeeded"], counts["failed"]) == (1, 0)
    refund.refresh_from_db()
    payment.refresh_from_db()
    assert refund.status == RefundStatus.SUCCEEDED and refund.credit_note_id
    assert payment.amount_refunded_minor == 100
    assert CreditNote.objects.filter(invoice=invoice).count() == 1
    assert refunds.refunds_reconcile()["checked"] == 0  # nothing left to settle
    assert ledger.check() == []


@pytest.mark.django_db
def test_a_refund_never_sent_is_failed_and_a_pending_one_is_sent_by_the_reconciler(
    payer: Payer, clock: time_machine.Traveller
) -> None:
    _, payment = paid(payer)
    lost = refunds.refund_create(payment_id=payment.id, amount_minor=500, reason="worker died", actor=FINANCE)
    assert refunds._claim(lost.id) is not None  # claimed; the worker died before calling the gateway
    waiting = refunds.refund_create(payment_id=payment.id, amount_minor=700, reason="never sent", actor=FINANCE)
    # Too recent to judge: left alone.
    assert refunds.refunds_reconcile()["checked"] == 0
    clock.move_to(NOW + dt.timedelta(minutes=10))
    counts = refunds.refunds_reconcile()
    assert (counts["sent"], counts["failed"]) == (1, 1)
    lost.refresh_from_db()
    waiting.refresh_from_db()
    assert lost.status == RefundStatus.FAILED and "not_sent" in lost.failure_reason
    assert waiting.status == RefundStatus.SUCCEEDED
    payment.refresh_from_db()
    assert payment.amount_refunded_minor == 700
    assert ledger.check() == []


@pytest.mark.django_db
def test_refunds_made_in_the_stripe_dashboard_are_recorded_once_from_charge_refunded(
    stripe: LocalStripe, payer: Payer
) -> None:
    invoice, payment = paid(payer)
    stripe_gateway = gateways.gateway("stripe")

    def dashboard_refund(amount: int) -> str:
        return stripe_gateway.refund(
            RefundRequest(
                intent_id=payment.gateway_intent_id or "",
                amount_minor=amount,
                currency="EUR",
                idempotency_key=f"dashboard-{amount}",
                metadata={},
            )
        ).refund_id

    dashboard = dashboard_refund(3000)
    event = stripe_event("charge.refunded", ls_charge(stripe, payment.gateway_charge_id))
    stored = deliver_and_process(event)
    assert (stored.status, stored.account_id) == (WebhookStatus.PROCESSED, payment.account_id)
    recorded = Refund.objects.get(payment=payment)
    assert (recorded.amount_minor, recorded.status, recorded.gateway_refund_id) == (3000, "succeeded", dashboard)
    assert recorded.credit_note_id and "outside our admin" in recorded.requested_by
    # The same news again, under another event id: nothing new.
    assert deliver_and_process(stripe_event("charge.refunded", event["data"]["object"])).status == "processed"
    assert Refund.objects.filter(payment=payment).count() == 1
    # A charge without its refunds listed (recent API versions leave them out): the gateway's
    # total, re-read, says what is unexplained; recorded once, keyed by that total.
    dashboard_refund(1000)
    bare = {k: v for k, v in ls_charge(stripe, payment.gateway_charge_id).items() if k != "refunds"}
    for _ in range(2):
        deliver_and_process(stripe_event("charge.refunded", bare))
    assert sorted(Refund.objects.filter(payment=payment).values_list("amount_minor", flat=True)) == [1000, 3000]
    # Ours, made from the admin, is in the next event: matched, not counted twice.
    ours = refunds.refund_issue(payment_id=payment.id, amount_minor=600, reason="goodwill", actor=FINANCE)
    deliver_and_process(stripe_event("charge.refunded", ls_charge(stripe, payment.gateway_charge_id)))
    assert Refund.objects.filter(payment=payment).count() == 3
    payment.refresh_from_db()
    invoice.refresh_from_db()
    assert payment.amount_refunded_minor == 4600 == ls_charge(stripe, payment.gateway_charge_id)["amount_refunded"]
    assert invoice.amount_refunded_minor == 4600
    assert CreditNote.objects.filter(invoice=invoice).count() == 3
    assert ours.status == RefundStatus.SUCCEEDED
    assert ledger.check() == []


@pytest.mark.django_db
def test_charge_refunded_settles_a_refund_of_ours_whose_worker_died_after_the_call(
    stripe: LocalStripe, payer: Payer
) -> None:
    _, payment = paid(payer)
    refund = refunds.refund_create(payment_id=payment.id, amount_minor=2500, reason="worker died", actor=FINANCE)
    claimed = refunds._claim(refund.id)
    assert claimed is not None
    # The call went out as refund_execute makes it; the worker died before recording it.
    gateways.gateway("stripe").refund(
        RefundRequest(
            intent_id=payment.gateway_intent_id or "",
            amount_minor=2500,
            currency="EUR",
            idempotency_key=refund.idempotency_key,
            metadata={"refund_id": refund.public_id},
        )
    )
    deliver_and_process(stripe_event("charge.refunded", ls_charge(stripe, payment.gateway_charge_id)))
    refund.refresh_from_db()
    assert refund.status == RefundStatus.SUCCEEDED and refund.gateway_refund_id and refund.credit_note_id
    assert Refund.objects.filter(payment=payment).count() == 1  # not taken for a dashboard refund
    payment.refresh_from_db()
    assert payment.amount_refunded_minor == 2500
    assert ledger.check() == []


@pytest.mark.django_db
def test_a_refund_is_a_state_machine_audited_at_each_step(stripe: LocalStripe, payer: Payer) -> None:
    _, payment = paid(payer)
    operator = Actor.operator(4712, "finance.lead@provider.test")
    refund = refunds.refund_issue(payment_id=payment.id, amount_minor=2100, reason="Outage credit", actor=operator)
    assert refund.status == RefundStatus.SUCCEEDED
    history = [(t.from_state, t.to_state, t.actor_name) for t in refund.transitions.all()]
    assert history == [("pending", "processing", "payments"), ("processing", "succeeded", "payments.gateway")]
    with pytest.raises(AttributeError):  # protected: only a transition moves it
        refund.status = RefundStatus.FAILED
    # The helper refuses a move its state does not allow, and writes nothing.
    from django.db import transaction

    from billing_site.common.transitions import transition_locked

    with pytest.raises(Conflict) as refused, transaction.atomic():
        transition_locked(Refund, refund.id, "send", actor=operator, reason="again")
    assert refused.value.code == "invalid_transition"
    assert refund.transitions.count() == 2
