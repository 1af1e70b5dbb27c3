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
from billing_site.common.errors import ApplicationError, Conflict
from conftest import Customer, in_threads
from invoicing import ledger
from invoicing.models import LedgerEntry, LedgerSource

# The price catalog (rated usage needs its SKUs).
from payments import charging, disputes, refunds, selectors, webhooks
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
    with caplog.at_level(logging.WARNING, logger="payments.disputes"):
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
        dispute = disputes.dispute_opened(
            gateway="stripe",
            gateway_dispute_id="dp_direct",
            charge_id=payment.gateway_charge_id,
            amount_minor=1000,
            currency="eur",
            reason="duplicate",
        )
    assert dispute is not None and Dispute.objects.count() == 1
    for _ in range(2):
        disputes.dispute_closed(gateway="stripe", gateway_dispute_id="dp_direct", status="won")
    dispute.refresh_from_db()
    assert dispute.status == DisputeStatus.WON
    assert stages(dispute) == [(LedgerSource.DISPUTE_OPENED, 1000), (LedgerSource.DISPUTE_WON, -1000)]
    assert disputes.dispute_closed(gateway="stripe", gateway_dispute_id="dp_unknown", status="lost") is None
    assert ledger.check() == []


# --- Never more than was captured (issue 19: two disputes, or a dispute after a refund, of one payment)


@pytest.fixture
def paid_10043(
    stripe: LocalStripe,
    catalog: None,
    make_customer: Callable[..., Customer],
    make_account: Callable[..., BillingAccount],
) -> Payment:
    """An invoice of 83.00 EUR + 21 % VAT = 100.43 EUR, paid at Stripe with a visa card."""
    customer = make_customer()
    account = make_account(customer.user, currency="EUR", country="NL")
    assert bind(customer.client, account).status_code == 201
    invoice = issue_invoice(account, amount="83")
    payment = Payment.objects.filter(invoice_id=invoice.id, status=PaymentStatus.SUCCEEDED).first()
    if payment is None:  # in a test's transaction the post-issue charge waits for a commit
        payment = charging.invoice_charge(invoice_id=invoice.id, trigger="operator")
    assert (payment.status, payment.amount_minor) == (PaymentStatus.SUCCEEDED, 10043)
    return payment


def dispute_entries(payment: Payment) -> int:
    return LedgerEntry.objects.filter(source_type=LedgerSource.DISPUTE_OPENED, account_id=payment.account_id).count()


@pytest.mark.django_db
def test_a_second_dispute_of_the_same_charge_is_stored_failed_and_posts_nothing(paid_10043: Payment) -> None:
    payment = paid_10043
    first = deliver("charge.dispute.created", dispute_object(payment, "dp_first", amount=10043))
    assert first.status == WebhookStatus.PROCESSED
    second = deliver("charge.dispute.created", dispute_object(payment, "dp_second", amount=10043))
    assert second.status == WebhookStatus.FAILED
    assert "dispute_exceeds_payment" in second.error and "100.43" in second.error
    payment.refresh_from_db()
    assert payment.amount_disputed_minor == 10043
    assert list(Dispute.objects.values_list("gateway_dispute_id", flat=True)) == ["dp_first"]
    assert dispute_entries(payment) == 1
    # Re-run by finance: still refused, still nothing posted.
    assert webhooks.webhook_event_rerun(second.id) == WebhookStatus.FAILED
    assert dispute_entries(payment) == 1
    assert ledger.check() == []


@pytest.mark.django_db
def test_a_dispute_after_a_refund_may_take_only_what_the_refund_left(paid_10043: Payment) -> None:
    payment = paid_10043
    refund = refunds.refund_issue(payment_id=payment.id, amount_minor=9943, reason="goodwill", actor=FINANCE)
    assert refund.status == "succeeded"
    refused = deliver("charge.dispute.created", dispute_object(payment, "dp_after_refund", amount=10043))
    assert refused.status == WebhookStatus.FAILED and "dispute_exceeds_payment" in refused.error
    assert not Dispute.objects.exists() and dispute_entries(payment) == 0
    # What the refund left (1.00) can be disputed.
    rest = deliver("charge.dispute.created", dispute_object(payment, "dp_rest", amount=100))
    assert rest.status == WebhookStatus.PROCESSED
    payment.refresh_from_db()
    assert (payment.amount_refunded_minor, payment.amount_disputed_minor) == (9943, 100)
    assert ledger.check() == []


@pytest.mark.django_db
def test_a_dispute_naming_a_charge_and_an_intent_of_different_payments_is_refused(
    paid_payment: Callable[[], Payment],
) -> None:
    one, other = paid_payment(), paid_payment()
    mixed = {**dispute_object(one, "dp_mixed"), "payment_intent": other.gateway_intent_id}
    event = deliver("charge.dispute.created", mixed)
    assert event.status == WebhookStatus.FAILED and "charge_intent_mismatch" in event.error
    assert not Dispute.objects.exists()
    for payment in (one, other):
        payment.refresh_from_db()
        assert payment.amount_disputed_minor == 0
    assert ledger.check() == []


@pytest.mark.django_db(transaction=True)
def test_two_disputes_of_one_charge_at_once_leave_one(paid_10043: Payment) -> None:
    """Two workers, two dispute ids, one charge: the payment's row lock serialises them."""
    payment = paid_10043

    def open_one(i: int) -> str:
        try:
            disputes_open(payment, f"dp_{i}")
        except ApplicationError as exc:
            return exc.code
        return "opened"

    outcomes = in_threads(2, open_one)
    assert sorted(outcomes) == ["dispute_exceeds_payment", "opened"]
    payment.refresh_from_db()
    assert payment.amount_disputed_minor == 10043 and Dispute.objects.count() == 1
    assert ledger.check() == []


def disputes_open(payment: Payment, dispute_id: str) -> Dispute | None:
    return disputes.dispute_opened(
        gateway="stripe",
        gateway_dispute_id=dispute_id,
        charge_id=payment.gateway_charge_id,
        intent_id=payment.gateway_intent_id or "",
        amount_minor=payment.amount_minor,
        currency="eur",
        reason="fraudulent",
    )


@pytest.mark.django_db
def test_ledger_check_reports_a_payment_disputed_beyond_what_was_captured(paid_10043: Payment) -> None:
    """Old data, from before the rule: a second open dispute of the whole payment, written raw."""
    from django.db import connection

    from invoicing import services as invoicing_services

    payment = paid_10043
    assert deliver("charge.dispute.created", dispute_object(payment, "dp_old_1", amount=10043)).status == "processed"
    assert ledger.check() == []
    old = Dispute(
        account_id=payment.account_id,
        payment=payment,
        gateway="stripe",
        gateway_dispute_id="dp_old_2",
        amount_minor=10043,
        currency="EUR",
        reason="fraudulent",
    )
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO payments_dispute (id, account_id, payment_id, gateway, gateway_dispute_id, amount_minor,"
            " currency, reason, status, opened_at) VALUES (%s, %s, %s, 'stripe', 'dp_old_2', 10043, 'EUR',"
            " 'fraudulent', 'open', now())",
            [old.id, payment.account_id, payment.id],
        )
        invoicing_services.dispute_post(
            dispute_id=old.id,
            account_id=payment.account_id,
            currency="EUR",
            amount_minor=10043,
            stage="opened",
            memo="old data",
        )
    problems = ledger.check()
    assert any(payment.public_id in p and "20086" in p and "10043" in p for p in problems), (
        problems
    )  # per payment: refunded + disputed against captured
    assert any(f"account {payment.account_id} EUR" in p and "gateway clearing" in p for p in problems), (
        problems
    )  # from the ledger alone: more given back than received


@pytest.mark.django_db
def test_a_dispute_is_a_state_machine_audited_at_each_step(paid_payment: Callable[[], Payment]) -> None:
    payment = paid_payment()
    deliver("charge.dispute.created", dispute_object(payment, "dp_fsm", amount=1000))
    dispute = Dispute.objects.get(gateway_dispute_id="dp_fsm")
    with pytest.raises(AttributeError):  # protected: only a transition moves it
        dispute.status = DisputeStatus.WON
    deliver("charge.dispute.closed", dispute_object(payment, "dp_fsm", amount=1000, status="lost"))
    history = [(t.from_state, t.to_state, t.actor_kind, t.actor_name) for t in dispute.transitions.all()]
    assert history == [
        ("", "open", "system", "payments.gateway"),
        ("open", "lost", "system", "payments.gateway"),
    ]
    # A contradicting close is no transition: the loss stands, nothing more is audited.
    deliver("charge.dispute.closed", dispute_object(payment, "dp_fsm", amount=1000, status="won"))
    assert dispute.transitions.count() == 2
    assert ledger.check() == []


@pytest.mark.django_db
def test_the_database_holds_every_payment_within_what_was_captured(paid_10043: Payment) -> None:
    """On a database with no payment over-disputed from before the rule (every new install) the
    check is validated (migration 0009), so it holds for every row, and a raw write past it fails."""
    from django.db import IntegrityError, connection, transaction

    with connection.cursor() as cursor:
        cursor.execute("SELECT convalidated FROM pg_constraint WHERE conname = 'payments_payment_within_captured'")
        assert cursor.fetchone() == (True,)
        with pytest.raises(IntegrityError, match="payments_payment_within_captured"), transaction.atomic():
            cursor.execute(
                "UPDATE payments_payment SET amount_disputed_minor = amount_minor + 1 WHERE id = %s", [paid_10043.id]
            )


@pytest.mark.django_db
def test_a_database_with_payments_over_disputed_before_the_rule_migrates_and_keeps_the_check_not_valid(
    paid_10043: Payment, caplog: pytest.LogCaptureFixture
) -> None:
    import importlib
    from types import SimpleNamespace

    from django.db import connection

    migration = importlib.import_module("payments.migrations.0009_validate_within_captured")
    with connection.cursor() as cursor:  # the database as 0003 left it, with a payment from before the rule
        cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")  # the fixture's deferred checks, before ALTER TABLE
        cursor.execute("ALTER TABLE payments_payment DROP CONSTRAINT payments_payment_within_captured")
        cursor.execute(
            "UPDATE payments_payment SET amount_disputed_minor = amount_minor + 1 WHERE id = %s", [paid_10043.id]
        )
        cursor.execute(
            f"ALTER TABLE payments_payment ADD CONSTRAINT payments_payment_within_captured CHECK ({migration.CHECK}) "
            "NOT VALID"
        )
        with caplog.at_level(logging.WARNING, logger="payments.migrations"):
            migration.validate(None, SimpleNamespace(connection=connection))
        cursor.execute("SELECT convalidated FROM pg_constraint WHERE conname = 'payments_payment_within_captured'")
        assert cursor.fetchone() == (False,)
    assert [(r.message, r.payments) for r in caplog.records] == [("payments.within_captured_not_validated", 1)]  # type: ignore[attr-defined]
