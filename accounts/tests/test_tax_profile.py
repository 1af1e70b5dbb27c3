"""The fields that decide an invoice's tax and where it goes (country, tax id, kind, address,
billing email) are finance's in the admin: support cannot change them, whatever it posts
(issue 19: support changed a customer's country NL → US, which changes the VAT treatment, and
its email). Every change of an account's profile is audited, before and after."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from accounts.models import BillingAccount, BillingAccountProfileChange
from conftest import Customer, operator
from tests.pages import form_of

pytestmark = pytest.mark.django_db


def change_url(account: BillingAccount) -> str:
    return f"/admin/accounts/billingaccount/{account.public_id}/change/"


@pytest.fixture
def nl_account(customer: Customer, make_account: Callable[..., BillingAccount]) -> BillingAccount:
    return make_account(customer.user, name="Acme", country="NL", tax_id="NL004495445B01", email="ap@acme.test")


def test_support_cannot_change_the_country_or_email_whatever_it_posts(nl_account: BillingAccount) -> None:
    _, support = operator(["support"])
    page = support.get(change_url(nl_account))
    form = form_of(page.content)
    for field in ("country", "tax_id", "email", "kind", "address_line1", "address_postal_code"):
        assert field not in form.names, field  # shown, not editable
    assert "name" in form.fields and "phone" in form.names

    # A hand-made post with the fields anyway: they are not taken.
    posted = {
        **form.fields,
        "name": "Acme Holding",
        "country": "US",
        "tax_id": "",
        "email": "attacker@evil.test",
        "address_line1": "1 Main St",
    }
    response = support.post(change_url(nl_account), posted)
    assert response.status_code == 302, response.content[:2000]
    nl_account.refresh_from_db()
    assert (nl_account.name, str(nl_account.country), nl_account.tax_id, nl_account.email) == (
        "Acme Holding",
        "NL",
        "NL004495445B01",
        "ap@acme.test",
    )
    assert nl_account.address_line1 == "Herengracht 1"
    (change,) = BillingAccountProfileChange.objects.filter(account=nl_account)
    assert change.changes == {"name": {"before": "Acme", "after": "Acme Holding"}}


def test_finance_changes_the_country_and_the_change_is_audited_before_and_after(nl_account: BillingAccount) -> None:
    user, finance = operator(["finance"])
    form = form_of(finance.get(change_url(nl_account)).content)
    assert {"country", "tax_id", "email"} <= form.names
    response = finance.post(
        change_url(nl_account),
        {**form.fields, "country": "US", "tax_id": "", "email": "billing@acme.test", "address_region": "NY"},
    )
    assert response.status_code == 302, response.content[:2000]
    nl_account.refresh_from_db()
    assert (str(nl_account.country), nl_account.email) == ("US", "billing@acme.test")

    (change,) = BillingAccountProfileChange.objects.filter(account=nl_account)
    assert change.changes == {
        "country": {"before": "NL", "after": "US"},
        "tax_id": {"before": "NL004495445B01", "after": ""},
        "email": {"before": "ap@acme.test", "after": "billing@acme.test"},
        "address_region": {"before": "", "after": "NY"},
    }
    assert (change.actor_kind, change.actor_user_id) == ("operator", user.id)
    page = finance.get(change_url(nl_account)).content.decode()
    assert "Profile changes" in page and "ap@acme.test" in page  # the audit, on the account's page


def test_a_customer_s_own_change_through_the_api_is_audited_too(customer: Customer, nl_account: BillingAccount) -> None:
    response = customer.client.patch(
        f"/api/v1/billing-accounts/{nl_account.public_id}", {"country": "BE", "tax_id": ""}, format="json"
    )
    assert response.status_code == 200, response.content
    (change,) = BillingAccountProfileChange.objects.filter(account=nl_account)
    assert change.changes == {
        "country": {"before": "NL", "after": "BE"},
        "tax_id": {"before": "NL004495445B01", "after": ""},
    }
    assert (change.actor_kind, change.actor_user_id) == ("user", customer.user.id)
