"""Credit limits as data: a new account gets its policy's limit (never over an analyst's), and
limits grow after invoices paid on time, once per step, up to the policy's maximum."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from decimal import Decimal

import pytest
from django.utils import timezone

from accounts import services as account_services
from accounts.models import BillingAccount
from antifraud import credit_limits, services
from antifraud.models import AccountRisk, CreditLimitPolicy
from antifraud.tests.test_checkpoints import NL_IP, open_account
from antifraud.tests.test_review import decide, settle, staff
from billing_site.outbox import services as outbox
from conftest import Customer
from invoicing.models import Invoice

# The price catalog (rated usage needs its SKUs).

NOW = dt.datetime(2026, 11, 3, 9, 0, tzinfo=dt.UTC)


def paid_invoices(account: BillingAccount, *, on_time: int, late: int = 0) -> None:
    """Invoices of past months, paid by their due date or after it."""
    rows = []
    for i in range(on_time + late):
        start = dt.date(2025, 1 + i % 12, 1).replace(year=2025 - i // 12)
        issued = dt.datetime.combine(start, dt.time(), tzinfo=dt.UTC) + dt.timedelta(days=32)
        due = issued + dt.timedelta(days=14)
        rows.append(
            Invoice(
                account_id=account.id,
                period_start=start,
                period_end=start + dt.timedelta(days=31),
                status="paid",
                currency="EUR",
                number=f"T-{account.id}-{i}",
                issued_at=issued,
                due_at=due,
                paid_at=due - dt.timedelta(days=1) if i < on_time else due + dt.timedelta(days=3),
            )
        )
    Invoice.objects.bulk_create(rows)


@pytest.mark.django_db
def test_a_new_account_gets_its_policys_limit_but_never_over_an_analysts(customer: Customer) -> None:
    account = open_account(customer, NL_IP)
    settle(account)
    assert account.credit_limit == Decimal("500")
    account_services.billing_account_update(account_id=account.id, changes={}, credit_limit=Decimal("2000"))
    assert credit_limits.credit_limit_initial(account_id=account.id) == Decimal("2000")  # left as it was
    account.refresh_from_db()
    assert account.credit_limit == Decimal("2000")


@pytest.mark.django_db
def test_a_more_specific_policy_wins() -> None:
    CreditLimitPolicy.objects.create(
        name="German businesses",
        currency="EUR",
        account_kind="business",
        country="DE",
        initial_limit=Decimal("5000"),
        max_limit=Decimal("100000"),
    )
    assert credit_limits.credit_policy_for(currency="EUR", kind="business", country="DE").name == "German businesses"
    assert credit_limits.credit_policy_for(currency="EUR", kind="business", country="NL").name == "New accounts (EUR)"
    assert credit_limits.credit_policy_for(currency="CHF", kind="business", country="CH") is None


@pytest.mark.django_db
def test_limits_rise_after_every_three_invoices_paid_on_time_once_each_up_to_the_maximum(customer: Customer) -> None:
    account = open_account(customer, NL_IP)
    while outbox.drain():
        pass
    paid_invoices(account, on_time=2, late=2)
    assert credit_limits.credit_limits_review() == {"accounts": 1, "raised": 0}  # two on time: not yet
    Invoice.objects.filter(account_id=account.id).delete()
    paid_invoices(account, on_time=3, late=1)
    assert credit_limits.credit_limits_review()["raised"] == 1
    account.refresh_from_db()
    assert account.credit_limit == Decimal("750")
    assert credit_limits.credit_limits_review()["raised"] == 0  # the same count raises once
    account.refresh_from_db()
    assert account.credit_limit == Decimal("750")
    # Near the maximum: capped.
    CreditLimitPolicy.objects.filter(currency="EUR").update(max_limit=Decimal("800"))
    Invoice.objects.filter(account_id=account.id).delete()
    paid_invoices(account, on_time=6)
    assert credit_limits.credit_limits_review()["raised"] == 1
    account.refresh_from_db()
    assert account.credit_limit == Decimal("800")


@pytest.mark.django_db
def test_an_active_account_in_review_spends_under_a_cap_until_approved(
    customer: Customer,
    make_account: Callable[..., BillingAccount],
    catalog: None,
) -> None:
    from invoicing import services as invoicing_services
    from invoicing.models import InvoiceKind
    from invoicing.tests.factories import rated

    account = make_account(customer.user, state="active", credit_limit=Decimal("2000"))
    month = timezone.now().date().replace(day=1).isoformat()
    rated(account.id, month, "gpu.a100", "10", "400.00")
    assert invoicing_services.threshold_billing_run(render_pdfs=False).over_limit == 0  # 400 of 2,000
    # A dispute raises it for review: it stays active, its limit down to the new-account limit.
    risk = disputed(account, reference="pay_d1", amount_minor=10000)
    assert (account.state, account.credit_limit) == ("active", Decimal("500"))
    assert (risk.status, risk.spending_cap, risk.capped_from) == ("review", Decimal("500"), Decimal("2000"))
    # Past the cap: the usage so far is invoiced and charged early (threshold billing).
    assert invoicing_services.threshold_billing_run(render_pdfs=False).over_limit == 0  # 400 of 500
    rated(account.id, month, "gpu.a100", "10", "200.00")
    report = invoicing_services.threshold_billing_run(render_pdfs=False)
    assert report.over_limit == 1 and len(report.issued) == 1
    assert Invoice.objects.get(id=report.issued[0]).kind == InvoiceKind.THRESHOLD
    # No raise while capped; a second review leaves the cap as it is.
    paid_invoices(account, on_time=3)
    assert credit_limits.credit_limits_review()["raised"] == 0
    assert credit_limits.spending_cap(account_id=account.id) is None
    # The analyst sees the cap on the account's page, and approves: the limit it had comes back.
    fraud = staff("fraud")
    page = fraud.get(f"/admin/antifraud/accountrisk/{account.id}/change/").content.decode()
    assert "Spending under a review cap: credit limit 500.00 EUR (it was 2000.00 EUR" in page
    assert decide(fraud, account, "approve", "known customer") == 302
    risk.refresh_from_db()
    assert account.credit_limit == Decimal("2000")
    assert (risk.status, risk.spending_cap, risk.capped_from) == ("approved", None, None)


@pytest.mark.django_db
def test_a_pending_account_in_review_gets_no_cap(
    customer: Customer, make_account: Callable[..., BillingAccount]
) -> None:
    account = make_account(customer.user, credit_limit=Decimal("2000"))  # pending
    services.payment_outcome_record(account_id=account.id, kind="dispute", reference="pay_d2", code="fraudulent")
    settle(account)
    assert account.credit_limit == Decimal("2000")
    assert AccountRisk.objects.get(account_id=account.id).spending_cap is None


@pytest.mark.django_db
def test_a_review_cap_is_never_set_below_what_the_account_has_already_spent(
    customer: Customer, make_account: Callable[..., BillingAccount], catalog: None
) -> None:
    """Issue 19: Globex was put in review and its limit cut to 500 EUR while it had already
    spent 550.51 EUR. The cap is held at what it spent (rounded up to the cent): no further
    credit until an analyst decides, nothing invoiced at once for a cap it never had, and the
    analyst is told."""
    from invoicing import services as invoicing_services
    from invoicing.tests.factories import rated

    account = make_account(customer.user, state="active", credit_limit=Decimal("2000"))
    month = timezone.now().date().replace(day=1).isoformat()
    rated(account.id, month, "gpu.a100", "10", "550.514518531333")
    risk = disputed(account, reference="pay_d3", amount_minor=100)
    assert account.credit_limit == Decimal("550.52")
    assert (risk.spending_cap, risk.capped_from) == (Decimal("550.52"), Decimal("2000"))
    assert invoicing_services.threshold_billing_run(render_pdfs=False).over_limit == 0
    page = staff("fraud").get(f"/admin/antifraud/accountrisk/{account.id}/change/").content.decode()
    assert "Held at what the account had already spent" in page
    rated(account.id, month, "gpu.a100", "1", "1.00")  # any more usage: invoiced and charged early
    assert len(invoicing_services.threshold_billing_run(render_pdfs=False).issued) == 1


def disputed(account: BillingAccount, *, reference: str, amount_minor: int) -> AccountRisk:
    """A fraudulent dispute of ``amount_minor`` EUR cents on an active ``account``: raised for
    review, the decision delivered; its risk record as it now is."""
    outcome = services.payment_outcome_record(
        account_id=account.id,
        kind="dispute",
        reference=reference,
        code="fraudulent",
        amount_minor=amount_minor,
        currency="EUR",
    )
    assert outcome is not None and outcome.decision == "review"
    settle(account)
    return AccountRisk.objects.get(account_id=account.id)
