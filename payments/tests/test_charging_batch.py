"""Many invoices at once on the production path (``charging.invoices_charge``, the task
``payments.charge_invoices`` a period close's outbox message runs): each card ends as the
single path leaves it, with the same rules (a blocked account is not charged, one active
payment per invoice, idempotency keys); racing single charges charges each once; a process
killed mid-way leaves payments the reconciler sends or resolves. Every test ends with the
ledger check clean. The calls run in threads with their own connections, so these tests commit."""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
from collections.abc import Callable

import pytest
from django.db import connections
from django.test import override_settings

from accounts.models import AccountState, BillingAccount
from billing_site.common.errors import Conflict
from billing_site.outbox import services as outbox
from billing_site.outbox.models import OutboxMessage
from conftest import Customer, in_threads, killed_child, manage_py, wait_for
from invoicing import ledger
from invoicing.models import Invoice, InvoicePayment, InvoiceStatus, InvoiceTransition
from payments import charging, gateways, services
from payments.gateways.base import OutcomeUnknown
from payments.models import DunningCase, Payment, PaymentMethod, PaymentStatus, PaymentTransition, SandboxObject
from payments.tests.helpers import NOW, issue_invoice

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.clock(NOW)]


def card_without_charge(account: BillingAccount, card: str) -> None:
    """A default card made as a binding makes it, without the binding's "charge what is
    outstanding" trigger (these tests want the batch to charge)."""
    profile, gateway = services.customer_ensure(account_id=account.id)
    setup = gateway.setup_intent_create(
        customer_id=profile.gateway_customer_id, metadata={}, idempotency_key=f"seti-{account.public_id}"
    )
    done = gateway.setup_intent_confirm_test(intent_id=setup.id, test_payment_method=card)
    facts = gateway.payment_method_retrieve(done.payment_method_id).card
    PaymentMethod.objects.create(
        account_id=account.id,
        gateway=profile.gateway,
        gateway_payment_method_id=done.payment_method_id,
        setup_intent_id=setup.id,
        brand=facts.brand,
        last4=facts.last4,
        exp_month=facts.exp_month,
        exp_year=facts.exp_year,
        fingerprint=facts.fingerprint,
        issuer_country=facts.country,
        funding=facts.funding,
        is_default=True,
    )


@pytest.fixture
def invoices_with_cards(
    catalog: None, customer: Customer, make_account: Callable[..., BillingAccount], no_worker: None
) -> Callable[..., list[Invoice]]:
    """``invoices_with_cards(cards)``: an account per card (None: no card) with its October
    invoice issued (its post-issue charge queued, and not run), then the card."""

    def make(cards: list[str | None]) -> list[Invoice]:
        invoices = []
        for card in cards:
            account = make_account(customer.user, currency="EUR", country="NL")
            invoice = issue_invoice(account, "100")
            if card is not None:
                card_without_charge(account, card)
            invoices.append(invoice)
        assert not Payment.objects.exists()
        return invoices

    return make


def charges_at_gateway(invoice: Invoice) -> int:
    return sum(
        1
        for row in SandboxObject.objects.filter(kind="payment_intent")
        if row.data["metadata"].get("invoice_id") == invoice.public_id and row.data["status"] == "succeeded"
    )


def assert_each_paid_once(invoices: list[Invoice]) -> None:
    for invoice in invoices:
        invoice.refresh_from_db()
        assert invoice.status == InvoiceStatus.PAID, invoice.number
        assert invoice.amount_paid_minor == invoice.total_minor
        assert charges_at_gateway(invoice) == 1, invoice.number
        assert Payment.objects.filter(invoice_id=invoice.id, status=PaymentStatus.SUCCEEDED).count() == 1
        assert InvoicePayment.objects.filter(invoice=invoice).count() == 1
    assert ledger.check() == []


def test_each_card_ends_as_the_single_path_leaves_it(invoices_with_cards: Callable[..., list[Invoice]]) -> None:
    visa, declined, authentication, lost, no_card, paid, blocked = invoices_with_cards(
        [
            "pm_card_visa",
            "pm_card_chargeCustomerFail",
            "pm_card_authenticationRequired",
            "pm_card_visa_chargeDeclinedLostCard",
            None,
            "pm_card_mastercard",
            "pm_card_visa",
        ]
    )
    assert charging.invoice_charge(invoice_id=paid.id, trigger="customer").status == PaymentStatus.SUCCEEDED
    BillingAccount.objects.filter(id=blocked.account_id).update(state=AccountState.BLOCKED)
    ids = [i.id for i in (visa, declined, authentication, lost, no_card, paid, blocked)]

    counts = charging.invoices_charge(invoice_ids=ids, trigger="after_issue", threads=3, chunk_size=4, claim_size=2)

    assert counts == {
        "succeeded": 1,
        "failed": 2,
        "requires_action": 1,
        "no_payment_method": 1,
        "nothing_due": 1,
        "account_blocked": 1,
    }
    # Paid, with the same audit trail as the single path: created, sent, succeeded.
    payment = Payment.objects.get(invoice_id=visa.id)
    assert (payment.status, payment.attempt, payment.trigger) == ("succeeded", 1, "after_issue")
    assert payment.idempotency_key == payment.public_id
    assert payment.gateway_intent_id and payment.gateway_charge_id and payment.sent_at and payment.completed_at
    trail = list(PaymentTransition.objects.filter(payment=payment).values_list("from_state", "to_state"))
    assert trail == [("", "pending"), ("pending", "processing"), ("processing", "succeeded")]
    assert payment.calls.get().outcome == "succeeded"
    failed = Payment.objects.get(invoice_id=declined.id)
    assert (failed.status, failed.decline_code, failed.retryable) == ("failed", "card_declined", True)
    assert DunningCase.objects.get(invoice_id=declined.id).retryable
    hard = Payment.objects.get(invoice_id=lost.id)
    assert (hard.status, hard.decline_code, hard.retryable) == ("failed", "lost_card", False)
    waiting = Payment.objects.get(invoice_id=authentication.id)
    assert waiting.status == "requires_action" and waiting.client_secret and waiting.next_action_url
    assert not Payment.objects.filter(invoice_id=no_card.id).exists()
    assert DunningCase.objects.get(invoice_id=no_card.id).last_decline_code == "no_payment_method"
    assert Payment.objects.filter(invoice_id=paid.id).count() == 1
    assert not Payment.objects.filter(invoice_id=blocked.id).exists()  # blocked (fraud): never charged
    assert ledger.check() == []

    # Again: what is paid is not charged; the declined and the abandoned authentication get a
    # new attempt (the old intent canceled first, as the single path does).
    again = charging.invoices_charge(invoice_ids=ids, trigger="dunning", threads=2)
    assert again["nothing_due"] == 2 and again["failed"] == 2 and again["requires_action"] == 1
    assert Payment.objects.filter(invoice_id=authentication.id, status=PaymentStatus.CANCELED).count() == 1
    assert Payment.objects.get(invoice_id=visa.id).attempt == 1 and charges_at_gateway(visa) == 1
    assert ledger.check() == []


def test_the_invoices_a_chunk_pays_are_audited_each_and_logged_once_with_every_id(
    invoices_with_cards: Callable[..., list[Invoice]], caplog: pytest.LogCaptureFixture
) -> None:
    invoices = invoices_with_cards(["pm_card_visa", "pm_card_mastercard", "pm_card_visa"])
    with caplog.at_level(logging.INFO):
        counts = charging.invoices_charge(invoice_ids=[i.id for i in invoices], trigger="after_issue", threads=2)
    assert counts == {"succeeded": 3}
    assert_each_paid_once(invoices)
    for invoice in invoices:  # the same audit row as the single path's issued -> paid
        payment = Payment.objects.get(invoice_id=invoice.id)
        trail = list(
            InvoiceTransition.objects.filter(invoice=invoice)
            .order_by("id")
            .values_list("from_state", "to_state", "reason")
        )
        assert trail[-1] == ("issued", "paid", f"payment {payment.public_id}")
    [paid] = [r for r in caplog.records if r.getMessage() == "invoicing.invoice_transitions"]
    [applied] = [r for r in caplog.records if r.getMessage() == "invoicing.payments_applied"]
    numbers = {i.public_id: i.number for i in invoices}
    assert sorted(paid.invoice_ids) == sorted(numbers)  # type: ignore[attr-defined]
    assert [numbers[i] for i in paid.invoice_ids] == paid.numbers  # type: ignore[attr-defined]  # one order
    assert (paid.count, paid.transition, paid.to) == (3, "mark_paid", "paid")  # type: ignore[attr-defined]
    assert sorted(applied.invoice_ids) == sorted(numbers) and applied.invoices_paid == [True] * 3  # type: ignore[attr-defined]
    assert not [
        r for r in caplog.records if r.getMessage() in ("invoicing.invoice_transition", "invoicing.payment_applied")
    ]


def test_an_active_or_unknown_payment_keeps_the_batch_off_its_invoice(
    invoices_with_cards: Callable[..., list[Invoice]],
) -> None:
    processing, unknown = invoices_with_cards(["pm_card_visa", "pm_card_visa"])
    out = charging.payment_create(invoice_id=processing.id, trigger="customer").payment
    charging._claim(out.id)
    lost_answer = charging.payment_create(invoice_id=unknown.id, trigger="customer").payment
    charging._claim(lost_answer.id)
    charging.payment_record_outcome(payment_id=lost_answer.id, result=OutcomeUnknown("lost"))

    counts = charging.invoices_charge(invoice_ids=[processing.id, unknown.id], threads=2)

    assert counts == {"under_way": 2}
    assert Payment.objects.count() == 2
    assert not SandboxObject.objects.filter(kind="payment_intent").exists()


@override_settings(SANDBOX_LATENCY_MS=25)
def test_a_batch_racing_single_charges_of_the_same_invoices_charges_each_once(
    invoices_with_cards: Callable[..., list[Invoice]],
) -> None:
    invoices = invoices_with_cards(["pm_card_visa"] * 16)
    ids = [i.id for i in invoices]
    gateways.reset()

    def work(n: int) -> object:
        if n == 0:
            return charging.invoices_charge(invoice_ids=ids, threads=3, chunk_size=4, claim_size=2)
        for invoice_id in reversed(ids[n - 1 :: 3]):  # three payers, from the last invoices on
            with contextlib.suppress(Conflict):  # nothing due: the batch (or another payer) charged it
                charging.invoice_charge(invoice_id=invoice_id, trigger="customer")
        return None

    results = in_threads(4, work)
    assert not [r for r in results if isinstance(r, Exception)], results
    connections.close_all()
    assert_each_paid_once(invoices)


def test_a_period_closes_charges_go_through_the_outbox_as_one_task_per_chunk(
    invoices_with_cards: Callable[..., list[Invoice]],
) -> None:
    """What production runs: the close writes one ``payments.charge_invoices`` message per chunk
    (here delivered to no worker); the drain delivers it, the task charges the chunk."""
    from billing_site.celery import app

    invoices = invoices_with_cards([None, None, None])
    for invoice in invoices:  # the cards arrive after the close, whose prompt delivery went nowhere
        card_without_charge(BillingAccount.objects.get(id=invoice.account_id), "pm_card_visa")
    messages = OutboxMessage.objects.filter(name="payments.charge_invoices").order_by("id")
    assert [m.payload for m in messages] == [{"invoice_ids": [i.id], "trigger": "after_issue"} for i in invoices]
    OutboxMessage.objects.filter(name="payments.charge_invoices").update(delivered_at=None)  # lost in the broker
    app.conf.task_always_eager = True
    assert outbox.drain() >= 3
    assert_each_paid_once(invoices)


def test_a_batch_killed_mid_way_leaves_payments_the_reconciler_sends_or_resolves(
    invoices_with_cards: Callable[..., list[Invoice]],
) -> None:
    invoices = invoices_with_cards(["pm_card_visa"] * 10)
    ids = [i.id for i in invoices]
    code = f"from payments import charging; charging.invoices_charge(invoice_ids={ids}, threads=2, claim_size=4)"
    with killed_child(manage_py("shell", "-c", code), SANDBOX_LATENCY_MS="300"):
        assert wait_for(lambda: SandboxObject.objects.filter(kind="payment_intent").count() >= 3, 60)
    # Intent first for the whole chunk: every invoice has its payment, pending or out.
    assert Payment.objects.count() == 10
    assert set(Payment.objects.values_list("status", flat=True)) <= {"pending", "processing", "succeeded"}
    # Minutes later the reconciler records what was charged and sends what was not, once each.
    counts = charging.payments_reconcile(now=NOW + dt.timedelta(minutes=10))
    assert counts["checked"] >= 1, counts
    assert not Payment.objects.exclude(status=PaymentStatus.SUCCEEDED).exists()
    assert_each_paid_once(invoices)
