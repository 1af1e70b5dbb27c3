"""The charge run (``payments.charge_run``): many invoices at once with the guarantees of the
single-invoice path. Each card ends as ``charging.invoice_charge`` would leave it; a run racing
single charges of the same invoices charges each once; a run killed mid-way leaves payments
the reconciler resolves, and charging again then charges nothing twice. Every test ends with
the ledger check clean.

The run calls the gateway from threads with their own connections, so these tests commit
(``transactional_db``)."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import signal
import subprocess
from collections.abc import Callable

import pytest
from django.db import connections
from django.test import override_settings

from accounts.models import BillingAccount
from billing_site.common.errors import Conflict
from conftest import ROOT, Customer, database_url, in_threads, manage_py, wait_for
from invoicing import ledger
from invoicing.models import Invoice, InvoicePayment, InvoiceStatus

# The price catalog (rated usage needs its SKUs).
from payments import charge_run, charging, gateways, services
from payments.gateways.base import OutcomeUnknown
from payments.models import DunningCase, Payment, PaymentMethod, PaymentStatus, PaymentTransition, SandboxObject
from payments.tests.helpers import NOW, issue_invoice

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.clock(NOW)]


def card_without_charge(account: BillingAccount, card: str) -> None:
    """A default card for ``account``, made as a binding makes it (the customer and the card at
    the sandbox through the gateway, our row as the binding writes it) but without the binding
    service's "new card: charge what is outstanding" trigger, which would charge the invoices
    these tests want the run to charge."""
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
    catalog: None,
    customer: Customer,
    make_account: Callable[..., BillingAccount],
) -> Callable[..., list[Invoice]]:
    """``invoices_with_cards(cards)``: an account per card (None: no card) with its October
    invoice issued (its post-issue charge found no card: dunning knows), then the card."""

    def make(cards: list[str | None]) -> list[Invoice]:
        invoices = []
        for card in cards:
            account = make_account(customer.user, currency="EUR", country="NL")
            invoice = issue_invoice(account, "100")
            assert not Payment.objects.filter(invoice_id=invoice.id).exists()
            if card is not None:
                card_without_charge(account, card)
            invoices.append(invoice)
        return invoices

    return make


def charges_at_gateway(invoice: Invoice) -> int:
    """Succeeded PaymentIntents the sandbox holds for this invoice (what the card was charged)."""
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
    visa, declined, authentication, lost, no_card, paid = invoices_with_cards(
        [
            "pm_card_visa",
            "pm_card_chargeCustomerFail",
            "pm_card_authenticationRequired",
            "pm_card_visa_chargeDeclinedLostCard",
            None,
            "pm_card_mastercard",
        ]
    )
    assert charging.invoice_charge(invoice_id=paid.id, trigger="customer").status == PaymentStatus.SUCCEEDED
    ids = [i.id for i in (visa, declined, authentication, lost, no_card, paid)]

    report = charge_run.invoices_charge(invoice_ids=ids, trigger="after_issue", threads=3, batch_size=4, claim_size=2)

    assert (report.invoices, report.created, report.claimed, report.nothing_due) == (6, 4, 4, 1)
    assert report.single_path == 1 and report.not_recorded == 0
    assert report.outcomes == {"succeeded": 1, "failed": 2, "requires_action": 1, "no_payment_method": 1}
    # Paid, with the same audit trail as the single path: created, sent, succeeded.
    payment = Payment.objects.get(invoice_id=visa.id)
    assert (payment.status, payment.attempt, payment.trigger) == ("succeeded", 1, "after_issue")
    assert payment.gateway_intent_id and payment.gateway_charge_id and payment.sent_at and payment.completed_at
    trail = list(PaymentTransition.objects.filter(payment=payment).values_list("from_state", "to_state"))
    assert trail == [("", "pending"), ("pending", "processing"), ("processing", "succeeded")]
    assert payment.calls.get().outcome == "succeeded"
    visa.refresh_from_db()
    assert visa.status == InvoiceStatus.PAID and charges_at_gateway(visa) == 1
    # A retryable decline opens dunning; a lost card is a hard decline, told neutrally.
    failed = Payment.objects.get(invoice_id=declined.id)
    assert (failed.status, failed.decline_code, failed.retryable) == ("failed", "card_declined", True)
    assert DunningCase.objects.get(invoice_id=declined.id).retryable
    hard = Payment.objects.get(invoice_id=lost.id)
    assert (hard.status, hard.decline_code, hard.retryable) == ("failed", "lost_card", False)
    assert "lost" not in hard.decline_message.lower()
    # Authentication: the client secret is kept for the customer.
    waiting = Payment.objects.get(invoice_id=authentication.id)
    assert waiting.status == "requires_action" and waiting.client_secret and waiting.next_action_url
    # No card: recorded for dunning, no payment row.
    assert not Payment.objects.filter(invoice_id=no_card.id).exists()
    assert DunningCase.objects.get(invoice_id=no_card.id).last_decline_code == "no_payment_method"
    # The invoice paid before the run was left alone.
    assert Payment.objects.filter(invoice_id=paid.id).count() == 1
    assert ledger.check() == []

    # Run again: what is paid is not charged; the declined and the abandoned authentication
    # get a new attempt (the old intent canceled first, as the single path does).
    again = charge_run.invoices_charge(invoice_ids=ids, trigger="dunning", threads=2)
    assert (again.created, again.nothing_due) == (3, 2)
    assert Payment.objects.filter(invoice_id=authentication.id, status=PaymentStatus.CANCELED).count() == 1
    assert Payment.objects.get(invoice_id=visa.id).attempt == 1
    assert charges_at_gateway(visa) == 1
    assert ledger.check() == []


def test_an_active_or_unknown_payment_keeps_the_run_off_its_invoice(
    invoices_with_cards: Callable[..., list[Invoice]],
) -> None:
    pending, unknown = invoices_with_cards(["pm_card_visa", "pm_card_visa"])
    charging.payment_create(invoice_id=pending.id, trigger="customer")
    lost_answer = charging.payment_create(invoice_id=unknown.id, trigger="customer").payment
    charging._claim(lost_answer.id)
    charging.payment_record_outcome(payment_id=lost_answer.id, result=OutcomeUnknown("lost"))
    assert Payment.objects.get(id=lost_answer.id).status == PaymentStatus.UNKNOWN

    report = charge_run.invoices_charge(invoice_ids=[pending.id, unknown.id], trigger="after_issue", threads=2)

    assert (report.created, report.taken, report.claimed) == (0, 2, 0)
    assert Payment.objects.filter(invoice_id__in=[pending.id, unknown.id]).count() == 2
    assert not SandboxObject.objects.filter(kind="payment_intent").exists()


@override_settings(SANDBOX_LATENCY_MS=25)
def test_a_run_racing_single_charges_of_the_same_invoices_charges_each_once(
    invoices_with_cards: Callable[..., list[Invoice]],
) -> None:
    invoices = invoices_with_cards(["pm_card_visa"] * 16)
    ids = [i.id for i in invoices]
    gateways.reset()

    def work(n: int) -> object:
        if n == 0:  # the run, from the first invoice on
            return charge_run.invoices_charge(invoice_ids=ids, threads=3, batch_size=4, claim_size=2)
        for invoice_id in reversed(ids[n - 1 :: 3]):  # three payers, from the last invoices on
            with contextlib.suppress(Conflict):  # nothing due: the run (or another payer) charged it
                charging.invoice_charge(invoice_id=invoice_id, trigger="customer")
        return None

    results = in_threads(4, work)
    assert not [r for r in results if isinstance(r, Exception)], results
    connections.close_all()
    assert_each_paid_once(invoices)
    triggers = set(Payment.objects.filter(status=PaymentStatus.SUCCEEDED).values_list("trigger", flat=True))
    assert triggers == {"after_issue", "customer"}  # both sides charged some


def test_a_run_killed_mid_way_leaves_payments_the_reconciler_resolves(
    invoices_with_cards: Callable[..., list[Invoice]],
) -> None:
    invoices = invoices_with_cards(["pm_card_visa"] * 10)
    ids = [i.id for i in invoices]
    # A child process runs the charge with a slow gateway and answers recorded only every
    # minute, and is killed once some charges went through: some payments are then charged
    # but unrecorded, some out at the gateway, some pending, some invoices untouched.
    env = {
        **os.environ,
        "DATABASE_URL": database_url(),
        "DJANGO_SETTINGS_MODULE": "billing_site.settings.test",
        "SANDBOX_LATENCY_MS": "300",
    }
    code = (
        "from payments import charge_run; "
        f"charge_run.invoices_charge(invoice_ids={ids}, threads=2, batch_size=6, claim_size=2, "
        "outcome_batch=1000, record_every=600)"
    )
    child = subprocess.Popen([*manage_py("shell", "-c", code)], cwd=ROOT, env=env)
    try:
        assert wait_for(lambda: SandboxObject.objects.filter(kind="payment_intent").count() >= 3, 60)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    connections.close_all()
    statuses = set(Payment.objects.values_list("status", flat=True))
    assert statuses <= {PaymentStatus.PENDING, PaymentStatus.PROCESSING}
    assert PaymentStatus.PROCESSING in statuses
    charged = {
        invoice.id
        for invoice in invoices
        for row in SandboxObject.objects.filter(kind="payment_intent")
        if row.data["metadata"]["invoice_id"] == invoice.public_id
    }
    assert charged and not Invoice.objects.filter(id__in=charged, status=InvoiceStatus.PAID).exists()

    # Restarted: a new run charges only the invoices the killed one never reached; the
    # others have an active payment (pending or processing) and are left alone.
    untouched = set(ids) - set(Payment.objects.values_list("invoice_id", flat=True))
    again = charge_run.invoices_charge(invoice_ids=ids, threads=2)
    assert (again.created, again.taken) == (len(untouched), 10 - len(untouched))
    assert not Payment.objects.filter(invoice_id__in=charged).exclude(status=PaymentStatus.PROCESSING).exists()
    # The reconciler, once they are stale: charged ones are recorded, pending ones sent,
    # those that never reached the gateway fail as not sent (retryable).
    counts = charging.payments_reconcile(now=NOW + dt.timedelta(minutes=10))
    assert counts["resolved"] == len(charged)
    for invoice_id in charged:
        assert Payment.objects.get(invoice_id=invoice_id).status == PaymentStatus.SUCCEEDED
    assert not Payment.objects.filter(status__in=[PaymentStatus.PENDING, PaymentStatus.PROCESSING]).exists()
    # The dunning retry charges what is left, once.
    charge_run.invoices_charge(invoice_ids=ids, trigger="dunning", threads=2)
    assert_each_paid_once(invoices)
