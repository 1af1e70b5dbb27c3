"""Disputes (chargebacks) learnt from Stripe's signed ``charge.dispute.*`` events (localstripe
has no disputes: the tests send the events Stripe would): one opened then won, another opened
then lost, each with its ledger entries once, the payment's disputed amount, the fraud team's
flag, and replays that change nothing. Every test ends with the ledger check clean."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest

from accounts.models import BillingAccount
from billing_site.common import ids
from billing_site.common.errors import Conflict
from conftest import Customer
from invoicing import ledger
from invoicing.models import LedgerEntry, LedgerSource

# The price catalog (rated usage needs its SKUs).
from payments import charging, refunds, selectors, webhooks
from payments.models import Dispute, DisputeStatus, Payment, PaymentStatus, WebhookEvent, WebhookStatus
from payments.tests.helpers import FINANCE, NOW, bind, issue_invoice
from payments.tests.stripe_flows import post_event, stripe_event
from payments.tests.stripe_harness import LocalStripe

DISPUTE_SOURCES = [LedgerSource.DISPUTE_OPENED, LedgerSource.DISPUTE_WON, LedgerSource.DISPUTE_LOST]


pytestmark = pytest.mark.clock(NOW)


@pytest.fixture
def paid_payment(
    stripe: LocalStripe,
    catalog: None,
    make_customer: Callable[..., Customer],
    make_account: Callable[..., BillingAccount],
) -> Callable[[], Payment]:
    """A new account's last month's invoice (121.00 EUR) paid at Stripe with a visa card."""

    def make() -> Payment:
        customer = make_customer()
        account = make_account(customer.user, currency="EUR", country="NL")
        assert bind(customer.client, account).status_code == 201
        payment = charging.invoice_charge(invoice_id=issue_invoice(account).id, trigger="operator")
        assert payment.status == PaymentStatus.SUCCEEDED and payment.gateway_charge_id
        return payment

    return make


def dispute_object(
    payment: Payment, dispute_id: str, *, amount: int = 12100, status: str = "needs_response"
) -> dict[str, Any]:
    """A Stripe Dispute as its events carry it."""
    return {
        "id": dispute_id,
        "object": "dispute",
        "amount": amount,
        "currency": "eur",
        "charge": payment.gateway_charge_id,
        "payment_intent": payment.gateway_intent_id,
        "reason": "fraudulent",
        "status": status,
        "is_charge_refundable": False,
    }


def deliver(event_type: str, obj: dict[str, Any]) -> WebhookEvent:
    """A signed event posted, then the task the outbox queued run (tests in one transaction
    never commit, so the outbox's after-commit delivery does not run by itself)."""
    event = stripe_event(event_type, obj)
    assert post_event(event).status_code == 200
    stored = WebhookEvent.objects.get(event_id=event["id"])
    webhooks.webhook_event_process(stored.id)
    stored.refresh_from_db()
    return stored


def stages(dispute: Dispute) -> list[tuple[str, int]]:
    """The ledger entries of a dispute: (stage, amount on the disputes account)."""
    found = []
    for entry in LedgerEntry.objects.filter(source_id=dispute.id, source_type__in=DISPUTE_SOURCES).order_by("id"):
        disputes_line = entry.lines.get(ledger_account=ledger.DISPUTES)
        found.append((entry.source_type, disputes_line.amount_minor))
    return found


@pytest.mark.django_db
def test_a_dispute_opened_then_won_posts_the_withdrawal_and_its_reversal_once(
    paid_payment: Callable[[], Payment], caplog: pytest.LogCaptureFixture
) -> None:
    payment = paid_payment()
    opened = dispute_object(payment, "dp_won")
    with caplog.at_level(logging.WARNING, logger="payments.refunds"):
        event = deliver("charge.dispute.created", opened)
    assert (event.status, event.account_id) == (WebhookStatus.PROCESSED, payment.account_id)
    dispute = Dispute.objects.get(gateway_dispute_id="dp_won")
    assert (dispute.status, dispute.amount_minor, dispute.currency, dispute.reason, dispute.payment_id) == (
        DisputeStatus.OPEN,
        12100,
        "EUR",
        "fraudulent",
        payment.id,
    )
    payment.refresh_from_db()
    assert payment.amount_disputed_minor == 12100
    assert stages(dispute) == [(LedgerSource.DISPUTE_OPENED, 12100)]
    # The fraud team's flag: a warning naming the account, and the row antifraud reads.
    flagged = [r for r in caplog.records if r.getMessage() == "dispute.opened"]
    assert len(flagged) == 1 and flagged[0].levelno == logging.WARNING
    assert flagged[0].__dict__["account_id"] == ids.encode("acc", dispute.account_id)
    facts = selectors.disputes_for_accounts([payment.account_id])
    assert [(f.dispute_id, f.status, f.amount_minor) for f in facts] == [(dispute.id, "open", 12100)]
    # While the money is with the bank, it cannot be refunded as well.
    with pytest.raises(Conflict) as refused:
        refunds.refund_create(payment_id=payment.id, amount_minor=100, reason="also", actor=FINANCE)
    assert refused.value.code == "refund_too_large"
    # Replays (a new event id with the same dispute) change nothing.
    assert deliver("charge.dispute.created", opened).status == WebhookStatus.PROCESSED
    assert Dispute.objects.count() == 1 and stages(dispute) == [(LedgerSource.DISPUTE_OPENED, 12100)]
    # Won: the funds come back.
    won = deliver("charge.dispute.closed", {**opened, "status": "won"})
    assert won.status == WebhookStatus.PROCESSED
    dispute.refresh_from_db()
    payment.refresh_from_db()
    assert dispute.status == DisputeStatus.WON and dispute.closed_at is not None
    assert payment.amount_disputed_minor == 0
    assert stages(dispute) == [(LedgerSource.DISPUTE_OPENED, 12100), (LedgerSource.DISPUTE_WON, -12100)]
    for replay in ("charge.dispute.closed", "charge.dispute.created"):
        deliver(replay, {**opened, "status": "won"})
    assert len(stages(dispute)) == 2 and Dispute.objects.get().status == DisputeStatus.WON
    assert [f.status for f in selectors.disputes_for_accounts([payment.account_id])] == ["won"]
    assert ledger.check() == []


@pytest.mark.django_db
def test_a_dispute_opened_then_lost_posts_the_loss_and_stays_lost(paid_payment: Callable[[], Payment]) -> None:
    payment = paid_payment()
    opened = dispute_object(payment, "dp_lost", amount=5000)
    assert deliver("charge.dispute.created", opened).status == WebhookStatus.PROCESSED
    dispute = Dispute.objects.get(gateway_dispute_id="dp_lost")
    # A partial dispute leaves the rest of the payment refundable.
    refund = refunds.refund_issue(payment_id=payment.id, amount_minor=7100, reason="the rest", actor=FINANCE)
    assert refund.status == "succeeded"
    with pytest.raises(Conflict):
        refunds.refund_create(payment_id=payment.id, amount_minor=1, reason="more", actor=FINANCE)
    lost = deliver("charge.dispute.closed", {**opened, "status": "lost"})
    assert lost.status == WebhookStatus.PROCESSED
    dispute.refresh_from_db()
    payment.refresh_from_db()
    assert dispute.status == DisputeStatus.LOST and payment.amount_disputed_minor == 5000  # the money is gone
    assert stages(dispute) == [(LedgerSource.DISPUTE_OPENED, 5000), (LedgerSource.DISPUTE_LOST, -5000)]
    # Replays, and a late contradicting close, change nothing.
    deliver("charge.dispute.closed", {**opened, "status": "lost"})
    deliver("charge.dispute.closed", {**opened, "status": "won"})
    deliver("charge.dispute.created", opened)
    dispute.refresh_from_db()
    assert dispute.status == DisputeStatus.LOST and len(stages(dispute)) == 2
    assert ledger.check() == []


@pytest.mark.django_db
def test_a_close_learnt_before_the_opening_posts_both_and_the_opening_changes_nothing(
    paid_payment: Callable[[], Payment],
) -> None:
    payment = paid_payment()
    opened = dispute_object(payment, "dp_late")
    assert deliver("charge.dispute.closed", {**opened, "status": "lost"}).status == WebhookStatus.PROCESSED
    dispute = Dispute.objects.get(gateway_dispute_id="dp_late")
    assert dispute.status == DisputeStatus.LOST
    assert deliver("charge.dispute.created", opened).status == WebhookStatus.PROCESSED
    dispute.refresh_from_db()
    assert dispute.status == DisputeStatus.LOST
    assert stages(dispute) == [(LedgerSource.DISPUTE_OPENED, 12100), (LedgerSource.DISPUTE_LOST, -12100)]
    assert ledger.check() == []


@pytest.mark.django_db
def test_a_dispute_on_a_charge_we_do_not_know_is_ignored_and_the_functions_are_idempotent(
    paid_payment: Callable[[], Payment],
) -> None:
    payment = paid_payment()
    stranger = {**dispute_object(payment, "dp_stranger"), "charge": "ch_not_ours", "payment_intent": "pi_not_ours"}
    ignored = deliver("charge.dispute.created", stranger)
    assert ignored.status == WebhookStatus.IGNORED and "no payment of ours" in ignored.error
    assert not Dispute.objects.exists()
    # Called directly (by charge id), twice: one row, one entry.
    for _ in range(2):
        dispute = refunds.dispute_opened(
            gateway="stripe",
            gateway_dispute_id="dp_direct",
            gateway_intent_or_charge_id=payment.gateway_charge_id,
            amount_minor=1000,
            currency="eur",
            reason="duplicate",
        )
    assert dispute is not None and Dispute.objects.count() == 1
    for _ in range(2):
        refunds.dispute_closed(gateway="stripe", gateway_dispute_id="dp_direct", status="won")
    dispute.refresh_from_db()
    assert dispute.status == DisputeStatus.WON
    assert stages(dispute) == [(LedgerSource.DISPUTE_OPENED, 1000), (LedgerSource.DISPUTE_WON, -1000)]
    assert refunds.dispute_closed(gateway="stripe", gateway_dispute_id="dp_unknown", status="lost") is None
    assert ledger.check() == []
