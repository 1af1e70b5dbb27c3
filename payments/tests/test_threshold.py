"""Threshold billing: an account whose unbilled usage plus unpaid invoices pass its credit
limit is invoiced early for the usage so far (a threshold invoice in the same series), charged
at once, and suspended at once if that charge fails; the month's invoice then bills only the
rest, to the cent. Usage is written where the rollup writes it (daily rows and the month's
spend); the credit check is the task the rollup queues; tasks run inline as a worker would."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from decimal import Decimal

import pytest
import time_machine
from django.core import mail

from accounts.models import AccountState, BillingAccount
from billing_site.common.actors import Actor
from billing_site.outbox import services as outbox
from conftest import Customer
from invoicing import ledger, selectors
from invoicing import services as invoicing_services
from invoicing.models import Invoice, InvoiceKind, InvoiceStatus, InvoiceTransition
from invoicing.periods import Period
from invoicing.tests.factories import rated

# The price catalog (rated usage needs its SKUs).
from payments.models import DunningCase, Payment, PaymentStatus
from payments.tests.helpers import bind

NOW = dt.datetime(2026, 11, 10, 12, 0, tzinfo=dt.UTC)
NOVEMBER = Period(dt.date(2026, 11, 1))
FINANCE = Actor.system("tests")


pytestmark = pytest.mark.clock(NOW)


def settle() -> None:
    while outbox.drain():
        pass


def check() -> invoicing_services.ThresholdReport:
    """The credit check as the rollup's drain queues it, then what it queued delivered."""
    report = invoicing_services.threshold_billing_run(render_pdfs=False)
    settle()
    return report


@pytest.fixture
def acct(catalog: None, customer: Customer, make_account: Callable[..., BillingAccount]) -> BillingAccount:
    account = make_account(
        customer.user, currency="EUR", country="NL", email="ops@limited.test", credit_limit=Decimal("100.0000")
    )
    return account


def activated(customer: Customer, account: BillingAccount, card: str) -> BillingAccount:
    assert bind(customer.client, account, card).status_code == 201
    settle()
    account.refresh_from_db()
    assert account.state == AccountState.ACTIVE
    return account


@pytest.mark.django_db
def test_an_early_invoice_at_the_limit_then_the_month_bills_only_the_rest_to_the_cent(
    customer: Customer, acct: BillingAccount, clock: time_machine.Traveller
) -> None:
    activated(customer, acct, "pm_card_visa")
    rated(acct.id, "2026-11-02", "compute.vcpu", "6400.32", "80.004")
    # 80.004 of a 100.00 limit: nothing happens.
    report = check()
    assert (report.over_limit, report.issued) == (0, [])
    [exposure] = selectors.credit_exposures(over_limit_only=False, account_ids=[acct.id])
    assert (exposure.unbilled, exposure.unpaid, exposure.credit_limit) == (
        Decimal("80.004"),
        Decimal("0.00"),
        Decimal("100.0000"),
    )

    # 30.333333 more: 110.337333 > 100.00. A threshold invoice for all of it, charged at once.
    rated(acct.id, "2026-11-09", "compute.vcpu", "2426.67", "30.333333")
    report = check()
    assert report.over_limit == 1 and len(report.issued) == 1
    early = Invoice.objects.get(id=report.issued[0])
    assert early.kind == InvoiceKind.THRESHOLD
    assert (early.period_start, early.period_end) == (dt.date(2026, 11, 1), dt.date(2026, 11, 11))
    # round(110.337333) = 110.34; VAT 21 % of 110.34 = 23.1714 → 23.17; 133.51 in all.
    assert (early.subtotal_minor, early.tax_minor, early.total_minor) == (11034, 2317, 13351)
    assert early.number and early.issued_at == NOW and early.due_at == NOW and early.payment_terms_days == 0
    assert [(line.sku, line.amount_minor) for line in early.lines.all()] == [("compute.vcpu", 11034)]
    assert InvoiceTransition.objects.filter(invoice=early, reason="credit limit reached").exists()
    assert early.status == InvoiceStatus.PAID and early.amount_paid_minor == 13351
    [payment] = Payment.objects.filter(invoice_id=early.id)
    assert payment.status == PaymentStatus.SUCCEEDED
    acct.refresh_from_db()
    assert acct.state == AccountState.ACTIVE
    # Nothing left over the limit: the next checks issue nothing.
    assert check().issued == []

    # More usage later in the month, under the limit: billed by the month's own invoice, which
    # bills only what the early one did not: round(160.460733) - 110.34 = 50.12.
    rated(acct.id, "2026-11-20", "compute.vcpu", "4009.87", "50.1234")
    clock.move_to(dt.datetime(2026, 12, 2, 9, 0, tzinfo=dt.UTC))
    invoicing_services.period_close(
        period=NOVEMBER, actor=FINANCE, account_ids=[acct.id], run_rollup=False, render_pdfs=False
    )
    month = Invoice.objects.get(account_id=acct.id, period_start=NOVEMBER.start, kind=InvoiceKind.PERIOD)
    assert month.period_end == dt.date(2026, 12, 1)
    # 21 % of 50.12 = 10.5252 → 10.53.
    assert (month.subtotal_minor, month.tax_minor, month.total_minor) == (5012, 1053, 6065)
    [line] = month.lines.all()
    assert (line.quantity, line.rated_amount, line.amount_minor) == (Decimal("4009.87"), Decimal("50.1234"), 5012)
    # Both in the one series, the early one first; together the month's usage rounded once.
    assert month.number > early.number
    assert early.subtotal_minor + month.subtotal_minor == 16046
    # A second close changes nothing; the books balance.
    again = invoicing_services.period_close(
        period=NOVEMBER, actor=FINANCE, account_ids=[acct.id], run_rollup=False, render_pdfs=False
    )
    assert again.issued == 0 and again.already_issued == 1
    assert ledger.check() == []


@pytest.mark.django_db
def test_a_failed_early_charge_suspends_at_once_and_paying_it_reactivates(
    customer: Customer, acct: BillingAccount, clock: time_machine.Traveller
) -> None:
    activated(customer, acct, "pm_card_chargeCustomerFail")
    rated(acct.id, "2026-11-09", "gpu.a100", "20", "150.00")
    mail.outbox.clear()
    report = check()
    [early_id] = report.issued
    early = Invoice.objects.get(id=early_id)
    assert (early.kind, early.status, early.total_minor) == (InvoiceKind.THRESHOLD, InvoiceStatus.ISSUED, 18150)
    assert Payment.objects.get(invoice_id=early.id).status == PaymentStatus.FAILED
    acct.refresh_from_db()
    # Suspended on the spot, not after the dunning policy's days.
    assert acct.state == AccountState.SUSPENDED
    case = DunningCase.objects.get(invoice_id=early.id)
    assert case.suspended_account
    subjects = [m.subject for m in mail.outbox if "ops@limited.test" in m.to]
    assert f"Your account is suspended: invoice {early.number} is unpaid" in subjects

    # Still over the limit with the threshold invoice owing: no second threshold invoice.
    rated(acct.id, "2026-11-10", "gpu.a100", "1", "7.50")
    report = check()
    assert (report.over_limit, report.waiting, report.issued) == (0, 0, [])  # suspended: not checked
    assert Invoice.objects.filter(account_id=acct.id, kind=InvoiceKind.THRESHOLD).count() == 1

    # A working card made the default: the debt is charged at once and the account is back.
    card = bind(customer.client, acct, "pm_card_visa")
    assert card.status_code == 201
    made_default = customer.client.post(
        f"/api/v1/billing-accounts/{acct.public_id}/payment-methods/{card.json()['id']}/default"
    )
    assert made_default.status_code == 200, made_default.content
    settle()
    early.refresh_from_db()
    acct.refresh_from_db()
    assert early.status == InvoiceStatus.PAID
    assert acct.state == AccountState.ACTIVE
    # Active again and 7.50 of usage is under the limit: nothing more until it is passed.
    assert check().issued == []
    assert ledger.check() == []


@pytest.mark.django_db
def test_an_account_waiting_on_its_early_charge_gets_no_second_one(
    customer: Customer, acct: BillingAccount, clock: time_machine.Traveller
) -> None:
    activated(customer, acct, "pm_card_visa")
    rated(acct.id, "2026-11-09", "gpu.a100", "20", "150.00")
    # Issued, its charge not delivered yet (the outbox not drained).
    first = invoicing_services.threshold_billing_run(render_pdfs=False)
    assert len(first.issued) == 1
    rated(acct.id, "2026-11-10", "gpu.a100", "20", "150.00")
    second = invoicing_services.threshold_billing_run(render_pdfs=False)
    assert (second.over_limit, second.waiting, second.issued) == (1, 1, [])
    settle()  # the first charge goes through
    assert Invoice.objects.get(id=first.issued[0]).status == InvoiceStatus.PAID
    third = check()  # the 150.00 after it is still over the limit on its own: charged early too
    assert len(third.issued) == 1
    assert Invoice.objects.get(id=third.issued[0]).subtotal_minor == 15000


@pytest.mark.django_db
def test_no_limit_set_or_an_account_not_active_is_not_checked(
    customer: Customer,
    make_account: Callable[..., BillingAccount],
    catalog: None,
) -> None:
    unlimited = make_account(customer.user, state=AccountState.ACTIVE)  # credit limit 0: none set
    pending = make_account(customer.user, credit_limit=Decimal(10))
    for account in (unlimited, pending):
        rated(account.id, "2026-11-09", "gpu.a100", "20", "150.00")
    assert check().over_limit == 0
    assert not Invoice.objects.filter(kind=InvoiceKind.THRESHOLD).exists()


@pytest.mark.django_db
def test_unpaid_invoices_count_against_the_limit(
    customer: Customer, acct: BillingAccount, clock: time_machine.Traveller
) -> None:
    activated(customer, acct, "pm_card_chargeCustomerFail")
    # October's invoice, 96.80 unpaid (80.00 + 21 % VAT) after its declined charge.
    clock.move_to(dt.datetime(2026, 11, 2, 9, 0, tzinfo=dt.UTC))
    rated(acct.id, "2026-10-05", "compute.vcpu", "6400", "80.00")
    invoicing_services.period_close(
        period=Period(dt.date(2026, 10, 1)), actor=FINANCE, account_ids=[acct.id], run_rollup=False, render_pdfs=False
    )
    settle()
    clock.move_to(NOW)
    acct.refresh_from_db()
    assert acct.state == AccountState.ACTIVE  # the dunning policy's days have not run out
    rated(acct.id, "2026-11-09", "compute.vcpu", "400", "5.00")
    [exposure] = selectors.credit_exposures(account_ids=[acct.id])
    assert (exposure.unbilled, exposure.unpaid) == (Decimal("5.00"), Decimal("96.80"))
    report = check()
    # 5.00 of usage + 96.80 owed > 100.00: the usage is invoiced early, its charge fails too.
    assert len(report.issued) == 1
    assert Invoice.objects.get(id=report.issued[0]).subtotal_minor == 500
    acct.refresh_from_db()
    assert acct.state == AccountState.SUSPENDED
