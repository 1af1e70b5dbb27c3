"""Why an account changed state is recorded with the transition (debt, fraud, staff with a
reason, the customer …), and what staff and customers read comes from it (issue 19: support
suspended Acme for "leaked credential"; the customer read "Suspended for an unpaid balance."
and the admin showed "Suspended (unpaid debt)")."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from django.test import Client

from accounts import services
from accounts.models import AccountState, BillingAccount, BillingAccountTransition
from billing_site.common.actors import Actor, ActorKind
from conftest import Customer, staff_login

pytestmark = pytest.mark.django_db

DUNNING = Actor.system("dunning")


def support() -> Client:
    user = services.operator_create(email="support@ops.test", password="pw-long-enough", groups=["support"])
    return staff_login(Client(), user)


def history(customer: Customer, account: BillingAccount) -> list[dict[str, Any]]:
    response = customer.client.get(f"/api/v1/billing-accounts/{account.public_id}/history")
    assert response.status_code == 200, response.content
    return list(response.json()["results"])


@pytest.fixture
def acme(customer: Customer, make_account: Callable[..., BillingAccount]) -> BillingAccount:
    return make_account(customer.user, name="Acme", state=AccountState.ACTIVE)


def test_a_suspension_by_support_reads_as_support_s_not_as_a_debt(customer: Customer, acme: BillingAccount) -> None:
    staff = support()
    response = staff.post(
        f"/admin/accounts/billingaccount/{acme.public_id}/transition/suspend/", {"reason": "leaked credential"}
    )
    assert response.status_code == 302

    row = BillingAccountTransition.objects.get(account=acme)
    assert (row.transition, row.cause, row.reason) == ("suspend", "staff", "leaked credential")
    entry = history(customer, acme)[0]
    assert "unpaid" not in entry["reason"].lower()
    assert entry["reason"] == "Suspended by support. Contact support for details."

    page = staff.get(f"/admin/accounts/billingaccount/{acme.public_id}/change/").content.decode()
    assert "unpaid debt" not in page
    assert "Suspended (by staff: leaked credential)" in page
    listing = staff.get("/admin/accounts/billingaccount/").content.decode()
    assert "unpaid debt" not in listing and "Suspended (by staff)" in listing


def test_a_suspension_for_debt_reads_as_a_debt_and_its_settlement_as_settled(
    customer: Customer, acme: BillingAccount
) -> None:
    services.billing_account_transition(
        account_id=acme.id, transition="suspend", actor=DUNNING, reason="dunning: invoice unpaid", cause="debt"
    )
    staff = support()
    assert (
        "Suspended (unpaid debt)"
        in staff.get(f"/admin/accounts/billingaccount/{acme.public_id}/change/").content.decode()
    )
    assert history(customer, acme)[0]["reason"] == "Suspended for an unpaid balance."

    services.billing_account_transition(
        account_id=acme.id, transition="reactivate", actor=DUNNING, reason="debt settled", cause="debt_settled"
    )
    assert history(customer, acme)[0]["reason"] == "Balance settled; reactivated."
    acme.refresh_from_db()
    assert (acme.state, acme.state_cause) == (AccountState.ACTIVE, "debt_settled")


def test_a_system_transition_without_a_cause_gets_the_one_its_kind_always_has(acme: BillingAccount) -> None:
    """payments suspends for debt and reactivates when it is settled; antifraud blocks for fraud."""
    services.billing_account_transition(account_id=acme.id, transition="suspend", actor=DUNNING, reason="x")
    services.billing_account_transition(account_id=acme.id, transition="block", actor=DUNNING, reason="y")
    causes = list(BillingAccountTransition.objects.filter(account=acme).order_by("id").values_list("cause", flat=True))
    assert causes == ["debt", "fraud"]


def test_settling_a_debt_does_not_lift_a_suspension_that_was_not_for_debt(acme: BillingAccount) -> None:
    services.billing_account_transition(
        account_id=acme.id,
        transition="suspend",
        actor=Actor(kind=ActorKind.OPERATOR, name="s@ops.test"),
        reason="leaked credential",
    )
    with pytest.raises(services.ApplicationError) as err:
        services.billing_account_transition(
            account_id=acme.id, transition="reactivate", actor=DUNNING, reason="debt settled", cause="debt_settled"
        )
    assert (err.value.status, err.value.code) == (409, "invalid_transition")
    acme.refresh_from_db()
    assert acme.state == AccountState.SUSPENDED


def test_an_unknown_cause_is_refused(acme: BillingAccount) -> None:
    with pytest.raises(services.ApplicationError) as err:
        services.billing_account_transition(
            account_id=acme.id, transition="suspend", actor=DUNNING, reason="x", cause="vibes"
        )
    assert (err.value.status, err.value.code, err.value.errors[0]["field"]) == (400, "invalid", "cause")
