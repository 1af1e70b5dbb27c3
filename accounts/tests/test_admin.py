"""Support staff drive the lifecycle from the admin; every write goes through services."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from django.test import Client

from accounts import services
from accounts.models import AccountState, ApiKey, BillingAccount, BillingAccountTransition
from conftest import operator, staff_login

pytestmark = pytest.mark.django_db


def change_url(account: BillingAccount) -> str:
    return f"/admin/accounts/billingaccount/{account.public_id}/change/"


def transition_url(account: BillingAccount, name: str) -> str:
    return f"/admin/accounts/billingaccount/{account.public_id}/transition/{name}/"


def test_changelist_filters_and_searches_by_public_id(customer: object, make_account: Callable) -> None:
    _, client = operator(["support"])
    account = make_account(customer.user, name="Findable BV", tax_id="NL004495445B01")  # type: ignore[attr-defined]
    other = make_account(customer.user, name="Other BV")  # type: ignore[attr-defined]
    page = client.get("/admin/accounts/billingaccount/", {"q": account.public_id})
    assert page.status_code == 200
    assert b"Findable BV" in page.content and b"Other BV" not in page.content
    assert b"Findable BV" in client.get("/admin/accounts/billingaccount/", {"q": "NL004495445B01"}).content
    filtered = client.get("/admin/accounts/billingaccount/", {"state__exact": "pending", "country": "NL"})
    assert filtered.status_code == 200 and other.name.encode() in filtered.content


def test_detail_offers_only_allowed_and_permitted_transitions(customer: object, make_account: Callable) -> None:
    account = make_account(customer.user, state=AccountState.ACTIVE)  # type: ignore[attr-defined]
    _, support = operator(["support"])
    page = support.get(change_url(account)).content.decode()
    assert transition_url(account, "suspend") in page and transition_url(account, "close") in page
    assert transition_url(account, "activate") not in page  # not allowed from active
    assert transition_url(account, "block") not in page  # support may not block
    _, fraud = operator(["fraud"])
    page = fraud.get(change_url(account)).content.decode()
    assert transition_url(account, "block") in page and transition_url(account, "suspend") not in page


def test_transition_asks_for_a_reason_and_records_the_operator(customer: object, make_account: Callable) -> None:
    account = make_account(customer.user, state=AccountState.ACTIVE)  # type: ignore[attr-defined]
    user, client = operator(["support"])
    assert client.get(transition_url(account, "suspend")).status_code == 200
    page = client.post(transition_url(account, "suspend"), {"reason": ""})
    assert page.status_code == 200 and b"reason is required" in page.content
    account.refresh_from_db()
    assert account.state == AccountState.ACTIVE

    response = client.post(transition_url(account, "suspend"), {"reason": "chargeback"})
    assert response.status_code == 302
    account.refresh_from_db()
    assert account.state == AccountState.SUSPENDED
    row = BillingAccountTransition.objects.get(account=account)
    assert (row.actor_kind, row.actor_user_id, row.reason) == ("operator", user.id, "chargeback")
    assert b"chargeback" in client.get(change_url(account)).content  # history inline


def test_transition_without_permission_is_forbidden(customer: object, make_account: Callable) -> None:
    account = make_account(customer.user, state=AccountState.ACTIVE)  # type: ignore[attr-defined]
    _, finance = operator(["finance"])
    assert finance.post(transition_url(account, "suspend"), {"reason": "x"}).status_code == 403
    _, support = operator(["support"])
    assert support.post(transition_url(account, "block"), {"reason": "x"}).status_code == 403
    account.refresh_from_db()
    assert account.state == AccountState.ACTIVE


def test_fraud_unblocks_to_a_chosen_state(customer: object, make_account: Callable) -> None:
    account = make_account(customer.user, state=AccountState.BLOCKED)  # type: ignore[attr-defined]
    _, fraud = operator(["fraud"])
    fraud.post(transition_url(account, "unblock"), {"reason": "false positive", "to_state": "pending"})
    account.refresh_from_db()
    assert account.state == AccountState.PENDING


def test_fraud_edits_the_credit_limit_through_the_service(customer: object, make_account: Callable) -> None:
    account = make_account(customer.user)  # type: ignore[attr-defined]
    _, fraud = operator(["fraud"])
    form = fraud.get(change_url(account)).context["adminform"].form
    data = {k: ("" if v is None else v) for k, v in form.initial.items() if k in form.fields}
    data.update(
        {
            "credit_limit": "2500.00",
            "country": "NL",
            "transitions-TOTAL_FORMS": "0",
            "transitions-INITIAL_FORMS": "0",
            "memberships-TOTAL_FORMS": "0",
            "memberships-INITIAL_FORMS": "0",
            "profile_changes-TOTAL_FORMS": "0",
            "profile_changes-INITIAL_FORMS": "0",
        }
    )
    response = fraud.post(change_url(account), data)
    assert response.status_code == 302, response.content[:2000]
    account.refresh_from_db()
    assert str(account.credit_limit) == "2500.0000"


def test_api_keys_are_revoked_never_shown(customer: object) -> None:
    _, support = operator(["support"])
    key = ApiKey.objects.get(user=customer.user)  # type: ignore[attr-defined]
    page = support.get(f"/admin/accounts/apikey/{key.pk}/change/")
    assert page.status_code == 200 and key.secret_hash.encode() not in page.content
    support.post("/admin/accounts/apikey/", {"action": "revoke", "_selected_action": [key.pk]})
    key.refresh_from_db()
    assert key.revoked_at is not None


def test_operator_creates_a_service_key_in_the_admin() -> None:
    admin = services.operator_create(email="root@ops.test", password="pw-long-enough", groups=[], superuser=True)
    client = staff_login(Client(), admin)
    page = client.post("/admin/accounts/apikey/add/", {"name": "metering", "scopes": ["usage:write"]})
    assert page.status_code == 200
    issued = page.context["issued"]
    assert issued.raw.encode() in page.content
    key = ApiKey.objects.get(name="metering")
    assert key.scopes == ["usage:write"] and key.user is None and key.created_by == admin


def test_only_fraud_sets_credit_limits_and_closed_accounts_are_read_only(
    customer: object, make_account: Callable
) -> None:
    account = make_account(customer.user)  # type: ignore[attr-defined]
    for group in ("support", "finance"):
        _, client = operator([group])
        form = client.get(change_url(account)).context["adminform"].form
        assert "credit_limit" not in form.fields, group  # shown read-only
    _, fraud = operator(["fraud"])
    form = fraud.get(change_url(account)).context["adminform"].form
    assert "credit_limit" in form.fields
    assert not set(form.fields) & {"name", "phone", "tax_id"}  # the profile is not fraud's
    closed = make_account(customer.user, state=AccountState.CLOSED)  # type: ignore[attr-defined]
    _, finance = operator(["finance"])
    form = finance.get(change_url(closed)).context["adminform"].form
    assert not set(form.fields) & {"credit_limit", "name", "tax_id"}


def test_inline_rows_and_messages_name_people_and_public_ids(customer: object, make_account: Callable) -> None:
    account = make_account(customer.user, name="Acme BV", state=AccountState.ACTIVE)  # type: ignore[attr-defined]
    user = customer.user  # type: ignore[attr-defined]
    _, support = operator(["support"])
    response = support.post(transition_url(account, "suspend"), {"reason": "unpaid"}, follow=True)
    page = response.content.decode()
    # The flash message: who, by name and public id, and what happened, as a sentence.
    assert f"Acme BV ({account.public_id}) suspended." in page
    assert "suspend done" not in page
    # Inline rows of the account's form: the member by email, the history row by public id,
    # never the integers.
    page = support.get(change_url(account)).content.decode()
    assert f"{user.email}: owner of Acme BV ({account.public_id})" in page
    assert f"{account.public_id}: suspend (active → suspended)" in page
    assert f"{user.id} owner of {account.id}" not in page and f"{account.id}: active" not in page
    assert (
        f"Reactivate Acme BV ({account.public_id})"
        in support.get(transition_url(account, "reactivate")).content.decode()
    )


def test_unblock_message_says_where_the_account_went(customer: object, make_account: Callable) -> None:
    account = make_account(customer.user, name="Blocked Ltd", state=AccountState.BLOCKED)  # type: ignore[attr-defined]
    _, fraud = operator(["fraud"])
    page = fraud.post(
        transition_url(account, "unblock"), {"reason": "false positive", "to_state": "active"}, follow=True
    ).content.decode()
    assert f"Blocked Ltd ({account.public_id}) unblocked, back to active." in page


def test_country_filter_lists_only_countries_in_use(customer: object, make_account: Callable) -> None:
    make_account(customer.user, country="NL")  # type: ignore[attr-defined]
    make_account(customer.user, country="DE")  # type: ignore[attr-defined]
    _, support = operator(["support"])
    page = support.get("/admin/accounts/billingaccount/").content.decode()
    assert "Netherlands (NL)" in page and "Germany (DE)" in page
    assert "?country=NL" in page and "?country=DE" in page
    assert "?country=FR" not in page and "Afghanistan" not in page  # not all 249
    filtered = support.get("/admin/accounts/billingaccount/", {"country": "DE"})
    assert filtered.status_code == 200 and len(filtered.context["cl"].result_list) == 1


def _credit_limit_post(client: Client, account: BillingAccount, value: str) -> Any:
    form = client.get(change_url(account)).context["adminform"].form
    data = {k: ("" if v is None else v) for k, v in form.initial.items() if k in form.fields}
    data.update(
        {
            "credit_limit": value,
            "country": str(account.country),
            "transitions-TOTAL_FORMS": "0",
            "transitions-INITIAL_FORMS": "0",
            "memberships-TOTAL_FORMS": "0",
            "memberships-INITIAL_FORMS": "0",
            "profile_changes-TOTAL_FORMS": "0",
            "profile_changes-INITIAL_FORMS": "0",
        }
    )
    return client.post(change_url(account), data)


def test_credit_limit_has_exactly_the_currency_places_in_admin_and_api(
    customer: object, make_account: Callable
) -> None:
    eur = make_account(customer.user, currency="EUR")  # type: ignore[attr-defined]
    jpy = make_account(customer.user, currency="JPY", country="JP")  # type: ignore[attr-defined]
    _, fraud = operator(["fraud"])
    assert 'name="credit_limit" value="0.00"' in fraud.get(change_url(eur)).content.decode()
    assert 'name="credit_limit" value="0"' in fraud.get(change_url(jpy)).content.decode()

    refused = {
        (eur, "100.505"): "Credit limit: EUR amounts have at most 2 decimal places",
        (eur, "100.500"): "Credit limit: EUR amounts have at most 2 decimal places",
        (eur, "1e3"): "Credit limit: enter an amount in plain decimal notation",
        (eur, "1 000"): "Credit limit: enter an amount in plain decimal notation",
        (eur, "1,000.00"): "Credit limit: enter an amount in plain decimal notation",
        (eur, "١٢٣"): "Credit limit: enter an amount in plain decimal notation",
        (eur, "-5"): "Credit limit: the amount must be zero or more",
        (jpy, "100.5"): "Credit limit: JPY amounts have no decimal places",
    }
    for (account, value), message in refused.items():
        page = _credit_limit_post(fraud, account, value)
        assert page.status_code == 200, value
        assert message in page.content.decode(), value
        account.refresh_from_db()
        assert account.credit_limit == 0, value

    assert _credit_limit_post(fraud, eur, "2500.5").status_code == 302
    saved = fraud.get(change_url(eur)).content.decode()  # the admin's message names the account
    assert f"{eur.name} ({eur.public_id})</a>” was changed successfully." in saved
    assert _credit_limit_post(fraud, jpy, "300000").status_code == 302
    assert customer.client.get(f"/api/v1/billing-accounts/{eur.public_id}").json()["credit_limit"] == "2500.50"  # type: ignore[attr-defined]
    assert customer.client.get(f"/api/v1/billing-accounts/{jpy.public_id}").json()["credit_limit"] == "300000"  # type: ignore[attr-defined]
    _, support = operator(["support"])
    assert "2500.50 EUR" in support.get(change_url(eur)).content.decode()  # read-only, same places


def test_view_site_leads_to_the_api_docs() -> None:
    _, support = operator(["support"])
    page = support.get("/admin/").content.decode()
    assert '<a href="/api/docs/">View site</a>' in page
    assert support.get("/api/docs/").status_code == 200


def test_a_phone_number_in_the_admin_is_checked_and_stored_in_e164(customer: object, make_account: Callable) -> None:
    account = make_account(customer.user)  # type: ignore[attr-defined]
    _, support = operator(["support"])
    form = support.get(change_url(account)).context["adminform"].form
    data = {k: ("" if v is None else v) for k, v in form.initial.items() if k in form.fields}
    data.update(
        {
            "country": "NL",
            "transitions-TOTAL_FORMS": "0",
            "transitions-INITIAL_FORMS": "0",
            "memberships-TOTAL_FORMS": "0",
            "memberships-INITIAL_FORMS": "0",
            "profile_changes-TOTAL_FORMS": "0",
            "profile_changes-INITIAL_FORMS": "0",
        }
    )
    refused = support.post(change_url(account), {**data, "phone": "12"})
    assert refused.status_code == 200 and "is not a valid phone number" in refused.content.decode()
    saved = support.post(change_url(account), {**data, "phone": "020 123 4567"})
    assert saved.status_code == 302, saved.content[:2000]
    account.refresh_from_db()
    assert account.phone == "+31201234567"
