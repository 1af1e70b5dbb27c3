"""An account's lifecycle against what it owes (issue 19): closing an account that owes money
is refused with what is owed until the debt is paid, credited or written off; staff reactivate
a debt-suspended account only with an explicit override and a reason, the customer reads what
really happened, and dunning agrees with the account. The debt is invoicing's
(``invoicing.selectors.account_outstanding``), read by accounts through
``ACCOUNTS_DEBT_READERS``; the dunning case is payments'."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest
import time_machine

from accounts import services as account_services
from accounts.models import AccountState, BillingAccount, BillingAccountTransition
from billing_site.common.actors import Actor, ActorKind
from billing_site.common.errors import ApplicationError
from billing_site.outbox import services as outbox
from conftest import Customer, operator
from invoicing import services as invoicing_services
from invoicing.models import Invoice
from payments import dunning
from payments.models import DunningAction, DunningCase
from payments.tests.helpers import NOW, bind, issue_invoice
from tests.pages import form_of

pytestmark = [pytest.mark.clock(NOW), pytest.mark.django_db]

FINANCE = Actor.system("tests")


def settle() -> None:
    """Deliver what the outbox holds (what the drain does every 15 s)."""
    while outbox.drain():
        pass


def transition_url(account: BillingAccount, name: str) -> str:
    return f"/admin/accounts/billingaccount/{account.pk}/transition/{name}/"


# --- 1. Closing an account that owes money


@pytest.fixture
def nl_account(catalog: None, customer: Customer, make_account: Callable[..., BillingAccount]) -> BillingAccount:
    return make_account(customer.user, currency="EUR", country="NL", state=AccountState.ACTIVE)


def test_closing_through_the_api_is_refused_with_what_is_owed_until_it_is_paid(
    customer: Customer, nl_account: BillingAccount
) -> None:
    invoice = issue_invoice(nl_account, "83")  # 83.00 + 21 % VAT = 100.43 EUR
    url = f"/api/v1/billing-accounts/{nl_account.public_id}/close"

    refused = customer.client.post(url, {"reason": "moving on"}, format="json")

    assert refused.status_code == 409, refused.content
    body = refused.json()
    assert body["code"] == "outstanding_balance"
    assert "100.43 EUR" in body["detail"]
    assert [(e["field"], e["currency"], e["amount"]) for e in body["errors"]] == [("outstanding.EUR", "EUR", "100.43")]
    nl_account.refresh_from_db()
    assert nl_account.state == AccountState.ACTIVE
    assert not BillingAccountTransition.objects.filter(account=nl_account, transition="close").exists()

    invoicing_services.invoice_record_payment(
        invoice_id=invoice.id, amount_minor=10043, currency="EUR", reference="bank transfer 7"
    )
    closed = customer.client.post(url, {"reason": "moving on"}, format="json")
    assert closed.status_code == 200, closed.content
    assert closed.json()["state"] == AccountState.CLOSED


def test_a_debt_credited_or_written_off_no_longer_stands_in_the_way_of_closing(
    customer: Customer, catalog: None, make_account: Callable[..., BillingAccount]
) -> None:
    credited = make_account(customer.user, currency="EUR", country="NL", state=AccountState.ACTIVE)
    written_off = make_account(customer.user, currency="EUR", country="NL", state=AccountState.ACTIVE)
    invoicing_services.invoice_void(invoice_id=issue_invoice(credited, "83").id, reason="goodwill", actor=FINANCE)
    invoicing_services.invoice_write_off(
        invoice_id=issue_invoice(written_off, "83").id, actor=FINANCE, reason="uncollectible"
    )
    for account in (credited, written_off):
        response = customer.client.post(
            f"/api/v1/billing-accounts/{account.public_id}/close", {"reason": "done"}, format="json"
        )
        assert response.status_code == 200, response.content


@pytest.fixture
def hooli(catalog: None, customer: Customer, make_account: Callable[..., BillingAccount]) -> BillingAccount:
    """A US business account owing 728.94 USD (no VAT on an export)."""
    account = make_account(customer.user, name="Hooli", currency="USD", country="US", state=AccountState.ACTIVE)
    invoice = issue_invoice(account, "728.94")
    assert (invoice.currency, invoice.amount_outstanding_minor) == ("USD", 72894)
    return account


def test_closing_from_the_admin_shows_the_debt_and_is_refused(hooli: BillingAccount) -> None:
    _, support = operator(["support"])

    page = support.get(transition_url(hooli, "close"))
    assert page.status_code == 200
    assert b"728.94 USD" in page.content  # the debt, before anyone presses the button

    response = support.post(transition_url(hooli, "close"), {**form_of(page.content).fields, "reason": "asked to"})
    assert response.status_code == 200
    assert b"728.94 USD" in response.content and b"outstanding" in response.content
    hooli.refresh_from_db()
    assert hooli.state == AccountState.ACTIVE
    assert Invoice.objects.get(account_id=hooli.id).amount_outstanding_minor == 72894


# --- 2. Reactivating a debt-suspended account


def suspend_for_debt(customer: Customer, account: BillingAccount, clock: time_machine.Traveller) -> None:
    """The card is a hard decline; a week after the due date dunning suspends the account."""
    assert bind(customer.client, account, "pm_card_visa_chargeDeclinedLostCard").status_code == 201
    settle()
    invoice = Invoice.objects.get(account_id=account.id)
    assert invoice.due_at is not None
    clock.move_to(invoice.due_at + dt.timedelta(days=7, hours=1))
    assert dunning.dunning_run()["suspended"] == 1
    settle()
    account.refresh_from_db()
    assert account.state == AccountState.SUSPENDED
    assert dunning_of(customer, account)["state"] == "suspended"


def dunning_of(customer: Customer, account: BillingAccount) -> dict[str, Any]:
    response = customer.client.get(f"/api/v1/billing-accounts/{account.public_id}/dunning")
    assert response.status_code == 200, response.content
    return response.json()


def history_of(customer: Customer, account: BillingAccount) -> list[dict[str, Any]]:
    response = customer.client.get(f"/api/v1/billing-accounts/{account.public_id}/history")
    assert response.status_code == 200, response.content
    return response.json()["results"]


def test_staff_reactivate_a_debt_suspended_account_only_with_an_override_and_a_reason(
    customer: Customer, hooli: BillingAccount, clock: time_machine.Traveller
) -> None:
    suspend_for_debt(customer, hooli, clock)
    user, support = operator(["support"])
    url = transition_url(hooli, "reactivate")

    page = support.get(url)
    assert page.status_code == 200
    assert b"728.94 USD" in page.content  # the debt is on the page
    form = form_of(page.content)
    assert "override_debt" in form.names and "override_debt" not in form.fields  # a checkbox, unticked

    # As rendered, with a reason but no override: refused, nothing changes.
    refused = support.post(url, {**form.fields, "reason": "customer promised to pay"})
    assert refused.status_code == 200
    assert b"728.94 USD" in refused.content and b"override" in refused.content
    hooli.refresh_from_db()
    assert hooli.state == AccountState.SUSPENDED
    # The override without a reason: refused too.
    refused = support.post(url, {**form.fields, "override_debt": "on", "reason": " "})
    assert refused.status_code == 200 and b"reason is required" in refused.content
    hooli.refresh_from_db()
    assert hooli.state == AccountState.SUSPENDED

    done = support.post(url, {**form.fields, "override_debt": "on", "reason": "CFO promised payment by Friday"})
    assert done.status_code == 302
    settle()
    hooli.refresh_from_db()
    assert hooli.state == AccountState.ACTIVE
    row = BillingAccountTransition.objects.filter(account=hooli).first()
    assert row is not None
    assert (row.transition, row.actor_user_id) == ("reactivate", user.id)
    assert "CFO promised payment by Friday" in row.reason

    # What the customer reads is what happened: support reactivated it, nothing was settled.
    latest = history_of(customer, hooli)[0]
    assert latest["transition"] == "reactivate"
    assert "settled" not in latest["reason"].lower()
    assert latest["reason"] == "Reactivated by support."
    # The debt is still owed, and dunning agrees with the account: no longer "suspended".
    assert Invoice.objects.get(account_id=hooli.id).amount_outstanding_minor == 72894
    state = dunning_of(customer, hooli)
    assert state["state"] != "suspended"
    assert state["invoices"][0]["amount_outstanding"] == "728.94"
    case = DunningCase.objects.get(account_id=hooli.id)
    assert not case.suspended_account
    assert DunningAction.objects.filter(case=case, action="reactivated_by_staff").exists()  # the case says so
    # The next dunning run does not suspend it again for the same invoice.
    clock.shift(dt.timedelta(days=1))
    assert dunning.dunning_run()["suspended"] == 0
    settle()
    hooli.refresh_from_db()
    assert hooli.state == AccountState.ACTIVE


def test_reactivating_with_nothing_owed_needs_no_override(customer: Customer, nl_account: BillingAccount) -> None:
    account_services.billing_account_transition(
        account_id=nl_account.id, transition="suspend", actor=FINANCE, reason="dunning: unpaid"
    )
    _, support = operator(["support"])
    page = support.get(transition_url(nl_account, "reactivate"))
    assert "override_debt" not in form_of(page.content).names
    done = support.post(transition_url(nl_account, "reactivate"), {**form_of(page.content).fields, "reason": ""})
    assert done.status_code == 302
    nl_account.refresh_from_db()
    assert nl_account.state == AccountState.ACTIVE


def test_the_service_refuses_a_staff_reactivation_over_debt_without_the_override(hooli: BillingAccount) -> None:
    account_services.billing_account_transition(
        account_id=hooli.id, transition="suspend", actor=FINANCE, reason="dunning: unpaid"
    )
    staff = Actor(kind=ActorKind.OPERATOR, name="ops@example.test")  # e.g. a management command
    with pytest.raises(ApplicationError) as err:
        account_services.billing_account_transition(
            account_id=hooli.id, transition="reactivate", actor=staff, reason="asked nicely"
        )
    assert (err.value.status, err.value.code) == (409, "outstanding_balance")
    assert [(e["currency"], e["amount"]) for e in err.value.errors] == [("USD", "728.94")]
    hooli.refresh_from_db()
    assert hooli.state == AccountState.SUSPENDED


@pytest.mark.django_db(transaction=True)
def test_a_credit_grant_racing_the_account_s_close_waits_for_it_and_is_refused(nl_account: BillingAccount) -> None:
    """The grant's "not closed" check and its insert hold the account's row, so a close in
    flight is waited for (before: the grant read the account as active while the close was
    uncommitted, and a closed account kept a grant)."""
    import threading

    import psycopg
    from django.db import connection

    from conftest import database_url
    from invoicing.models import CreditGrant

    closing = psycopg.connect(database_url().replace("postgres://", "postgresql://", 1))
    closing.execute("UPDATE accounts_billingaccount SET state = 'closed' WHERE id = %s", [nl_account.id])  # uncommitted
    refused: list[str] = []

    def grant() -> None:
        try:
            invoicing_services.credit_grant_create(
                account_id=nl_account.id,
                kind="promotional",
                amount=Decimal(5),
                currency="EUR",
                reason="x",
                actor=FINANCE,
            )
        except ApplicationError as exc:
            refused.append(exc.code)
        finally:
            connection.close()

    granting = threading.Thread(target=grant)
    try:
        granting.start()
        granting.join(timeout=1.0)
        assert granting.is_alive()  # waiting for the close, not deciding without it
        closing.commit()
    finally:
        closing.close()  # never left holding the row for the next test's reset
        granting.join(timeout=30)
    assert refused == ["account_closed"] and not CreditGrant.objects.filter(account_id=nl_account.id).exists()
