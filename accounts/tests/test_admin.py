"""Support staff drive the lifecycle from the admin; every write goes through services."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from django.test import Client

from accounts import services
from accounts.models import AccountState, ApiKey, BillingAccount, BillingAccountTransition, User

pytestmark = pytest.mark.django_db


def operator(groups: list[str]) -> tuple[User, Client]:
    user = services.operator_create(
        email=f"{'-'.join(groups) or 'none'}@ops.test", password="pw-long-enough", groups=groups
    )
    client = Client()
    client.force_login(user)
    return user, client


def change_url(account: BillingAccount) -> str:
    return f"/admin/accounts/billingaccount/{account.pk}/change/"


def transition_url(account: BillingAccount, name: str) -> str:
    return f"/admin/accounts/billingaccount/{account.pk}/transition/{name}/"


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


def test_finance_edits_the_credit_limit_through_the_service(customer: object, make_account: Callable) -> None:
    account = make_account(customer.user)  # type: ignore[attr-defined]
    _, finance = operator(["finance"])
    form = finance.get(change_url(account)).context["adminform"].form
    data = {k: ("" if v is None else v) for k, v in form.initial.items() if k in form.fields}
    data.update(
        {
            "credit_limit": "2500.00",
            "country": "NL",
            "transitions-TOTAL_FORMS": "0",
            "transitions-INITIAL_FORMS": "0",
            "memberships-TOTAL_FORMS": "0",
            "memberships-INITIAL_FORMS": "0",
        }
    )
    response = finance.post(change_url(account), data)
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
    client = Client()
    client.force_login(admin)
    page = client.post("/admin/accounts/apikey/add/", {"name": "metering", "scopes": ["usage:write"]})
    assert page.status_code == 200
    issued = page.context["issued"]
    assert issued.raw.encode() in page.content
    key = ApiKey.objects.get(name="metering")
    assert key.scopes == ["usage:write"] and key.user is None and key.created_by == admin


def test_only_finance_sets_credit_limits_and_closed_accounts_are_read_only(
    customer: object, make_account: Callable
) -> None:
    account = make_account(customer.user)  # type: ignore[attr-defined]
    _, support = operator(["support"])
    form = support.get(change_url(account)).context["adminform"].form
    assert "credit_limit" not in form.fields  # shown read-only
    closed = make_account(customer.user, state=AccountState.CLOSED)  # type: ignore[attr-defined]
    _, finance = operator(["finance"])
    form = finance.get(change_url(closed)).context["adminform"].form
    assert not set(form.fields) & {"credit_limit", "name", "tax_id"}
