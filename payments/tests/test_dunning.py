"""Dunning on a moving clock: the policy's retries, emails, suspension, the customer paying
the debt with a new card and the account reactivated, and the write-off of a debt nobody pays.
Beat is played by hand: each day the run, then the outbox drained (what its periodic task
does), tasks running inline as a worker would run them."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

import pytest
import time_machine
from django.core import mail
from django.core.management import call_command

from accounts.models import AccountState, BillingAccount
from billing_site.outbox import services as outbox
from billing_site.outbox.models import OutboxMessage
from conftest import Customer, in_threads
from invoicing import ledger
from invoicing.models import Invoice, InvoiceStatus, LedgerEntry, LedgerSource

# The price catalog (rated usage needs its SKUs).
from payments import dunning, services
from payments.models import (
    DunningAction,
    DunningCase,
    DunningCaseStatus,
    DunningPolicy,
    Payment,
    PaymentProfile,
    PaymentStatus,
    PaymentTrigger,
)
from payments.tests.helpers import FINANCE, NOW, bind, issue_invoice

pytestmark = pytest.mark.clock(NOW)


@pytest.fixture
def acct(catalog: None, customer: Customer, make_account: Callable[..., BillingAccount]) -> BillingAccount:
    return make_account(customer.user, currency="EUR", country="NL", email="ops@debtor.test")


def settle() -> int:
    """Drain the outbox until nothing is left (a task delivered may queue more)."""
    total = 0
    while sent := outbox.drain():
        total += sent
    return total


def day(clock: time_machine.Traveller, moment: dt.datetime) -> dict[str, int]:
    """Move the clock to ``moment``, run dunning as beat would, deliver what it queued."""
    clock.move_to(moment)
    report = dunning.dunning_run()
    settle()
    return report


def subjects(to: str) -> list[str]:
    return [m.subject for m in mail.outbox if to in m.to]


def charges(invoice: Invoice) -> list[Payment]:
    return list(Payment.objects.filter(invoice_id=invoice.id).order_by("attempt"))


@pytest.mark.django_db
def test_the_dunning_ladder_from_decline_to_suspension_to_a_new_card_and_reactivation(
    customer: Customer, acct: BillingAccount, clock: time_machine.Traveller
) -> None:
    invoice = issue_invoice(acct)
    assert bind(customer.client, acct, "pm_card_chargeCustomerFail").status_code == 201
    settle()  # the post-issue charge (and the new card's): declined, retryable
    acct.refresh_from_db()
    assert acct.state == AccountState.ACTIVE
    assert all(p.status == PaymentStatus.FAILED and p.retryable for p in charges(invoice))
    first_attempts = len(charges(invoice))
    case = DunningCase.objects.get(invoice_id=invoice.id)
    assert (case.status, case.retryable, case.retries_done) == (DunningCaseStatus.OPEN, True, 0)
    assert any(s.startswith("Payment failed for invoice") for s in subjects("ops@debtor.test"))
    assert invoice.due_at is not None
    due = invoice.due_at

    # Nothing is due on the day of the failure.
    assert day(clock, NOW + dt.timedelta(hours=2))["retried"] == 0

    # Retries 1, 3 and 5 days after the first failure, each declined again and emailed.
    for number, days in enumerate([1, 3, 5], start=1):
        mail.outbox.clear()
        report = day(clock, case.first_failure_at + dt.timedelta(days=days, minutes=5))
        assert report["retried"] == 1, (number, report)
        attempts = charges(invoice)
        assert len(attempts) == first_attempts + number
        assert attempts[-1].trigger == PaymentTrigger.DUNNING and attempts[-1].status == PaymentStatus.FAILED
        assert DunningCase.objects.get(id=case.id).retries_done == number
        assert subjects("ops@debtor.test") == [f"Payment failed for invoice {invoice.number}"]
        # The same day's run again does nothing.
        again = day(clock, case.first_failure_at + dt.timedelta(days=days, hours=3))
        assert again["retried"] == 0 and len(charges(invoice)) == first_attempts + number
    # No fourth retry.
    assert day(clock, case.first_failure_at + dt.timedelta(days=6))["retried"] == 0

    # A warning two days before the suspension; then the suspension, N days after the due date.
    mail.outbox.clear()
    assert day(clock, due + dt.timedelta(days=5, hours=1))["warned"] == 1
    assert subjects("ops@debtor.test")[0].startswith("Your account will be suspended on")
    acct.refresh_from_db()
    assert acct.state == AccountState.ACTIVE
    mail.outbox.clear()
    assert day(clock, due + dt.timedelta(days=7, hours=1))["suspended"] == 1
    acct.refresh_from_db()
    assert acct.state == AccountState.SUSPENDED
    assert subjects("ops@debtor.test") == [f"Your account is suspended: invoice {invoice.number} is unpaid"]
    state = customer.client.get(f"/api/v1/billing-accounts/{acct.public_id}/dunning").json()
    assert state["state"] == "suspended"
    assert state["invoices"][0]["invoice"] == invoice.public_id
    assert state["invoices"][0]["retries_done"] == 3
    assert day(clock, due + dt.timedelta(days=7, hours=5))["suspended"] == 0  # once

    # The customer binds a new card and makes it the default: the debt is charged to it at
    # once, and the account is active again without waiting for the next run.
    clock.move_to(due + dt.timedelta(days=8))
    card = bind(customer.client, acct, "pm_card_visa")
    assert card.status_code == 201 and not card.json()["default"]
    settle()
    invoice.refresh_from_db()
    assert invoice.status == InvoiceStatus.ISSUED  # a card bound is not yet the one charged
    made_default = customer.client.post(
        f"/api/v1/billing-accounts/{acct.public_id}/payment-methods/{card.json()['id']}/default"
    )
    assert made_default.status_code == 200, made_default.content
    settle()
    invoice.refresh_from_db()
    assert invoice.status == InvoiceStatus.PAID
    paid = [p for p in charges(invoice) if p.status == PaymentStatus.SUCCEEDED]
    assert len(paid) == 1 and paid[0].trigger == PaymentTrigger.NEW_CARD
    acct.refresh_from_db()
    assert acct.state == AccountState.ACTIVE
    assert DunningCase.objects.get(id=case.id).status == DunningCaseStatus.RESOLVED
    # A state machine moved through the one transition helper: audited, never assigned.
    assert [(t.from_state, t.to_state, t.actor_name) for t in case.transitions.all()] == [
        ("open", "resolved", "dunning")
    ]
    with pytest.raises(AttributeError):
        case.status = DunningCaseStatus.OPEN
    assert customer.client.get(f"/api/v1/billing-accounts/{acct.public_id}/dunning").json()["state"] == "none"
    # Later runs leave it alone: no write-off of a paid invoice.
    report = day(clock, due + dt.timedelta(days=61))
    assert report["written_off"] == 0 and report["suspended"] == 0
    acct.refresh_from_db()
    assert acct.state == AccountState.ACTIVE
    assert ledger.check() == []


@pytest.mark.django_db
def test_a_hard_decline_is_not_retried_and_the_debt_is_written_off(
    customer: Customer, acct: BillingAccount, clock: time_machine.Traveller
) -> None:
    invoice = issue_invoice(acct)
    bind(customer.client, acct, "pm_card_visa_chargeDeclinedLostCard")
    settle()
    attempts = len(charges(invoice))
    assert attempts >= 1 and not any(p.retryable for p in charges(invoice))
    case = DunningCase.objects.get(invoice_id=invoice.id)
    assert not case.retryable
    assert invoice.due_at is not None
    due = invoice.due_at
    for days in (1, 3, 5):
        assert day(clock, case.first_failure_at + dt.timedelta(days=days, minutes=5))["retried"] == 0
    assert len(charges(invoice)) == attempts  # hard declines are not retried
    assert day(clock, due + dt.timedelta(days=7, hours=1))["suspended"] == 1
    acct.refresh_from_db()
    assert acct.state == AccountState.SUSPENDED
    assert day(clock, due + dt.timedelta(days=59))["written_off"] == 0

    mail.outbox.clear()
    assert day(clock, due + dt.timedelta(days=60, hours=1))["written_off"] == 1
    invoice.refresh_from_db()
    assert invoice.status == InvoiceStatus.UNCOLLECTIBLE
    assert invoice.written_off_minor == 12100
    assert LedgerEntry.objects.filter(source_type=LedgerSource.WRITE_OFF, source_id=invoice.id).count() == 1
    assert DunningCase.objects.get(id=case.id).status == DunningCaseStatus.WRITTEN_OFF
    assert [(t.from_state, t.to_state) for t in case.transitions.all()] == [("open", "written_off")]
    assert subjects("ops@debtor.test") == [f"Invoice {invoice.number} has been written off"]
    acct.refresh_from_db()
    assert acct.state == AccountState.SUSPENDED  # a written-off debt keeps the account suspended
    assert day(clock, due + dt.timedelta(days=61))["written_off"] == 0
    assert DunningAction.objects.filter(case=case, action="write_off").count() == 1
    assert customer.client.get(f"/api/v1/billing-accounts/{acct.public_id}/dunning").json()["state"] == "written_off"
    assert ledger.check() == []


@pytest.mark.django_db
def test_an_overdue_invoice_without_a_card_is_chased_and_a_paused_account_is_left_alone(
    customer: Customer, acct: BillingAccount, clock: time_machine.Traveller
) -> None:
    invoice = issue_invoice(acct)
    settle()  # the post-issue charge finds no card: the case records it
    case = DunningCase.objects.get(invoice_id=invoice.id)
    assert case.last_decline_code == "no_payment_method"
    case.delete()  # as if the invoice had never been charged (e.g. issued before payments existed)
    assert invoice.due_at is not None
    report = day(clock, invoice.due_at + dt.timedelta(hours=1))
    assert report["opened"] == 1
    case = DunningCase.objects.get(invoice_id=invoice.id)
    assert case.last_decline_code == "overdue"

    services.dunning_pause(account_id=acct.id, paused=True, reason="customer disputes the invoice", actor=FINANCE)
    assert PaymentProfile.objects.get(account_id=acct.id).dunning_paused
    report = day(clock, invoice.due_at + dt.timedelta(days=8))
    assert report["paused_skipped"] == 1 and report["suspended"] == 0
    acct.refresh_from_db()
    assert acct.state != AccountState.SUSPENDED
    assert customer.client.get(f"/api/v1/billing-accounts/{acct.public_id}/dunning").json()["state"] == "paused"


@pytest.mark.django_db
def test_a_currency_policy_overrides_the_default(
    customer: Customer, acct: BillingAccount, clock: time_machine.Traveller
) -> None:
    DunningPolicy.objects.create(name="EUR: patient", currency="EUR", retry_days=[2], suspend_after_days=20)
    invoice = issue_invoice(acct)
    bind(customer.client, acct, "pm_card_chargeCustomerFail")
    settle()
    case = DunningCase.objects.get(invoice_id=invoice.id)
    assert day(clock, case.first_failure_at + dt.timedelta(days=1, hours=1))["retried"] == 0
    assert day(clock, case.first_failure_at + dt.timedelta(days=2, hours=1))["retried"] == 1
    assert day(clock, case.first_failure_at + dt.timedelta(days=4, hours=1))["retried"] == 0
    assert invoice.due_at is not None
    assert day(clock, invoice.due_at + dt.timedelta(days=8))["suspended"] == 0
    assert day(clock, invoice.due_at + dt.timedelta(days=20, hours=1))["suspended"] == 1


@pytest.mark.django_db(transaction=True)
def test_two_runs_at_once_do_each_step_once(
    customer: Customer, acct: BillingAccount, clock: time_machine.Traveller
) -> None:
    invoice = issue_invoice(acct)
    bind(customer.client, acct, "pm_card_chargeCustomerFail")
    settle()
    case = DunningCase.objects.get(invoice_id=invoice.id)
    assert invoice.due_at is not None
    # A day on which a retry and the suspension are both due.
    clock.move_to(invoice.due_at + dt.timedelta(days=7, hours=1))
    before = OutboxMessage.objects.count()
    reports = in_threads(2, lambda _: dunning.dunning_run())
    assert not [r for r in reports if isinstance(r, Exception)], reports
    assert sum(r["retried"] for r in reports) == 1
    assert sum(r["suspended"] for r in reports) == 1
    # Retries 1 to 3 were all due (the runs of those days missed): one charge, as retry 3.
    assert sorted(DunningAction.objects.filter(case=case).values_list("action", flat=True)) == ["retry:3", "suspend"]
    # One charge task, one suspension task, one email: queued once between them.
    queued = OutboxMessage.objects.order_by("id")[before:]
    names = [m.name for m in queued]
    for name in ("payments.account_suspend", "payments.charge_invoice", "payments/email/account_suspended"):
        assert names.count(name) == 1, names
    settle()
    acct.refresh_from_db()
    assert acct.state == AccountState.SUSPENDED
    call_command("run_dunning")  # the command, the same day: nothing more to do
    assert DunningAction.objects.filter(case=case).count() == 2
    assert DunningCase.objects.get(id=case.id).retries_done == 3
    assert ledger.check() == []


@pytest.mark.django_db
def test_a_blocked_account_is_neither_charged_nor_chased(
    customer: Customer, acct: BillingAccount, clock: time_machine.Traveller
) -> None:
    from accounts import services as account_services
    from billing_site.common.actors import Actor

    invoice = issue_invoice(acct)
    bind(customer.client, acct, "pm_card_chargeCustomerFail")
    settle()
    attempts = len(charges(invoice))
    account_services.billing_account_transition(
        account_id=acct.id, transition="block", actor=Actor.operator(customer.user.id, "fraud@x.test"), reason="fraud"
    )
    response = customer.client.post(f"/api/v1/billing-accounts/{acct.public_id}/invoices/{invoice.public_id}/pay")
    assert response.status_code == 409 and response.json()["code"] == "account_blocked"
    case = DunningCase.objects.get(invoice_id=invoice.id)
    report = day(clock, case.first_failure_at + dt.timedelta(days=1, hours=1))
    assert report["blocked_skipped"] == 1 and report["retried"] == 0
    assert invoice.due_at is not None
    report = day(clock, invoice.due_at + dt.timedelta(days=61))
    assert report["suspended"] == 0 and report["written_off"] == 0
    assert len(charges(invoice)) == attempts
