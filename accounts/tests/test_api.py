"""The public API as a customer uses it: signup, keys, billing accounts, members, close,
history; errors are problem+json naming the field; tenancy answers 404."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from rest_framework.test import APIClient

from accounts import services
from accounts.models import AccountState, ApiKey, BillingAccount, BillingAccountTransition, Membership, Scope, User
from billing_site.common import ids
from conftest import Customer, client_with_key

pytestmark = pytest.mark.django_db

VALID_ACCOUNT = {
    "name": "Acme Cloud BV",
    "email": "billing@acme.test",
    "kind": "business",
    "country": "NL",
    "currency": "EUR",
    "tax_id": "NL 0044.95.445.B01",
    "address": {"line1": "Herengracht 1", "city": "Amsterdam", "postal_code": "1015 BA"},
}


def problem(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.content
    assert response["Content-Type"] == "application/problem+json"
    body = response.json()
    assert body["status"] == status
    assert body["code"] == code
    assert {"type", "title", "detail"} <= body.keys()
    return body


def fields(body: dict[str, Any]) -> set[str]:
    return {e["field"] for e in body.get("errors", [])}


def url(account: BillingAccount | str, suffix: str = "") -> str:
    public = account if isinstance(account, str) else account.public_id
    return f"/api/v1/billing-accounts/{public}{suffix}"


# --- Signup and keys


def test_signup_returns_a_key_that_works_once_shown() -> None:
    response = APIClient().post(
        "/api/v1/users", {"email": "New@Example.test", "password": "correct-horse-battery-staple"}, format="json"
    )
    assert response.status_code == 201
    body = response.json()
    assert set(body) == {"id", "email", "api_key"}
    assert body["id"].startswith("usr_") and body["email"] == "new@example.test"
    key = ApiKey.objects.get(user__email="new@example.test")
    assert body["api_key"] not in (key.prefix, key.secret_hash)  # only a hash is stored
    assert client_with_key(body["api_key"]).get("/api/v1/billing-accounts").status_code == 200


def test_signup_email_is_unique_case_insensitively(customer: Customer) -> None:
    response = APIClient().post(
        "/api/v1/users", {"email": customer.user.email.upper(), "password": "another-long-passphrase"}, format="json"
    )
    assert fields(problem(response, 409, "email_taken")) == {"email"}


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"email": "a@example.test", "password": "123"}, "password"),
        ({"email": "a@example.test", "password": "password"}, "password"),
        ({"email": "not-an-email", "password": "correct-horse-battery-staple"}, "email"),
        ({"password": "correct-horse-battery-staple"}, "email"),
        ({"email": "a@example.test", "password": "correct-horse-battery-staple", "is_staff": True}, "is_staff"),
    ],
)
def test_signup_rejects_bad_input_naming_the_field(payload: dict[str, Any], field: str) -> None:
    body = problem(APIClient().post("/api/v1/users", payload, format="json"), 400, "invalid")
    assert field in fields(body)


@pytest.mark.parametrize(
    ("header", "code"),
    [
        (None, "not_authenticated"),
        ("Bearer bku_wrongwrongwrongwrongwrongwrongwrongwrongwrongwrong", "authentication_failed"),
        ("Bearer nonsense", "authentication_failed"),
        ("Basic dXNlcjpwYXNz", "authentication_failed"),
        ("Bearer", "authentication_failed"),
    ],
)
def test_missing_or_wrong_key_is_401(header: str | None, code: str) -> None:
    client = APIClient()
    if header:
        client.credentials(HTTP_AUTHORIZATION=header)
    response = client.get("/api/v1/billing-accounts")
    problem(response, 401, code)
    assert response["WWW-Authenticate"].startswith("Bearer")


def test_a_tampered_secret_with_a_real_prefix_is_401(customer: Customer) -> None:
    tampered = customer.key[:-4] + ("AAAA" if not customer.key.endswith("AAAA") else "BBBB")
    problem(client_with_key(tampered).get("/api/v1/billing-accounts"), 401, "authentication_failed")


def test_key_lifecycle_create_list_use_revoke(customer: Customer) -> None:
    created = customer.client.post("/api/v1/api-keys", {"name": "ci"}, format="json")
    assert created.status_code == 201
    new = created.json()
    assert new["id"].startswith("key_") and new["name"] == "ci" and new["api_key"].startswith("bku_")

    listed = customer.client.get("/api/v1/api-keys").json()["results"]
    assert {k["name"] for k in listed} == {"default", "ci"}
    assert all("api_key" not in k and "secret_hash" not in k for k in listed)

    ci = client_with_key(new["api_key"])
    assert ci.get("/api/v1/billing-accounts").status_code == 200
    assert ApiKey.objects.get(id=ids.decode("key", new["id"])).last_used_at is not None

    assert customer.client.delete(f"/api/v1/api-keys/{new['id']}").status_code == 204
    problem(ci.get("/api/v1/billing-accounts"), 401, "authentication_failed")
    assert customer.client.get("/api/v1/billing-accounts").status_code == 200  # the other key still works


def test_cannot_revoke_someone_elses_key(customer: Customer, make_customer: Callable[..., Customer]) -> None:
    other = make_customer()
    other_key = ApiKey.objects.get(user=other.user)
    problem(customer.client.delete(f"/api/v1/api-keys/{other_key.public_id}"), 404, "not_found")
    assert ApiKey.objects.get(id=other_key.id).revoked_at is None


def test_key_create_rejects_unknown_fields(customer: Customer) -> None:
    body = problem(
        customer.client.post("/api/v1/api-keys", {"name": "x", "scopes": ["usage:write"]}, format="json"),
        400,
        "invalid",
    )
    assert fields(body) == {"scopes"}


# --- Billing accounts


def test_create_billing_account(customer: Customer) -> None:
    response = customer.client.post("/api/v1/billing-accounts", VALID_ACCOUNT, format="json")
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["id"].startswith("acc_") and body["state"] == "pending"
    assert body["tax_id"] == "NL004495445B01"  # validated and stored compact
    assert body["address"] == {**VALID_ACCOUNT["address"], "line2": "", "region": ""}
    assert body["credit_limit"] == "0.00"  # EUR: the currency's places, not the column's
    account = BillingAccount.objects.get(id=ids.decode("acc", body["id"]))
    assert Membership.objects.get(account=account).role == "owner"
    assert customer.client.get(url(body["id"])).json() == body


@pytest.mark.parametrize(
    ("change", "field", "code"),
    [
        ({"country": "XX"}, "country", "invalid_country"),
        ({"country": "Netherlands"}, "country", "invalid_country"),
        ({"country": "nl"}, "country", "invalid_country"),  # exactly as the schema's enum: upper case
        ({"country": " NL"}, "country", "invalid_country"),
        ({"currency": "BTC"}, "currency", "unsupported_currency"),
        ({"currency": "eur"}, "currency", "unsupported_currency"),
        ({"tax_id": "NL004495446B01"}, "tax_id", "invalid_tax_id"),  # bad checksum
        ({"tax_id": "DE136695976"}, "tax_id", "invalid_tax_id"),  # valid, but not Dutch
        ({"phone": "12"}, "phone", "invalid_phone"),
        ({"phone": "call me"}, "phone", "invalid_phone"),
        ({"phone": "+31 20 123"}, "phone", "invalid_phone"),  # too short for a Dutch number
        ({"kind": "company"}, "kind", "invalid_choice"),
        ({"address": {"line1": "x"}}, "address.city", "required"),
        ({"email": "nope"}, "email", "invalid"),
        ({"state": "active"}, "state", "read_only"),
        ({"credit_limit": "1000000"}, "credit_limit", "read_only"),
        ({"id": "acc_0000000000001"}, "id", "read_only"),
        ({"owner": "someone"}, "owner", "unknown_field"),
        ({"address": {**VALID_ACCOUNT["address"], "floor": "3"}}, "address.floor", "unknown_field"),
    ],
)
def test_create_rejects_bad_input_naming_the_field(customer: Customer, change: dict, field: str, code: str) -> None:
    response = customer.client.post("/api/v1/billing-accounts", {**VALID_ACCOUNT, **change}, format="json")
    body = problem(response, 400, "invalid")
    assert {(e["field"], e["code"]) for e in body["errors"]} >= {(field, code)}, body
    assert not BillingAccount.objects.exists()  # nothing half-written


def test_non_eu_tax_ids_use_the_country_format(customer: Customer) -> None:
    ok = {**VALID_ACCOUNT, "country": "GB", "currency": "GBP", "tax_id": "GB 980 7806 84"}
    assert customer.client.post("/api/v1/billing-accounts", ok, format="json").json()["tax_id"] == "980780684"
    bad = {**ok, "tax_id": "GB980780685"}
    assert "tax_id" in fields(
        problem(customer.client.post("/api/v1/billing-accounts", bad, format="json"), 400, "invalid")
    )


def test_patch_updates_profile_only(customer: Customer, account: BillingAccount) -> None:
    response = customer.client.patch(url(account), {"name": "Renamed", "address": {"city": "Utrecht"}}, format="json")
    assert response.status_code == 200, response.content
    account.refresh_from_db()
    assert (account.name, account.address_city, account.address_line1) == ("Renamed", "Utrecht", "Herengracht 1")


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"state": "active"}, "state"),
        ({"currency": "USD"}, "currency"),
        ({"credit_limit": "10"}, "credit_limit"),
        ({"color": "red"}, "color"),
    ],
)
def test_patch_rejects_protected_fields(customer: Customer, account: BillingAccount, change: dict, field: str) -> None:
    body = problem(customer.client.patch(url(account), {"name": "X", **change}, format="json"), 400, "invalid")
    assert fields(body) == {field}
    account.refresh_from_db()
    assert (account.name, account.state, account.currency) != ("X", "active", "USD")
    assert account.name != "X"


def test_patch_country_revalidates_the_stored_tax_id(customer: Customer, make_account: Callable) -> None:
    account = make_account(customer.user, tax_id="NL004495445B01")
    body = problem(customer.client.patch(url(account), {"country": "DE"}, format="json"), 400, "invalid")
    assert fields(body) == {"tax_id"}


def test_close_by_owner_writes_history(customer: Customer, make_account: Callable) -> None:
    account = make_account(customer.user, state=AccountState.ACTIVE)
    response = customer.client.post(url(account, "/close"), {"reason": "moving on"}, format="json")
    assert response.status_code == 200 and response.json()["state"] == "closed"
    history = customer.client.get(url(account, "/history")).json()["results"]
    assert history == [
        {
            "transition": "close",
            "from_state": "active",
            "to_state": "closed",
            "actor": {"kind": "user", "name": customer.user.email},
            "reason": "moving on",
            "created_at": history[0]["created_at"],
        }
    ]


def test_close_needs_a_reason_and_a_closable_state(customer: Customer, make_account: Callable) -> None:
    account = make_account(customer.user, state=AccountState.BLOCKED)
    assert fields(problem(customer.client.post(url(account, "/close"), {}, format="json"), 400, "invalid")) == {
        "reason"
    }
    problem(customer.client.post(url(account, "/close"), {"reason": "bye"}, format="json"), 409, "invalid_transition")
    assert not BillingAccountTransition.objects.exists()


def test_history_shows_operators_as_support(customer: Customer, make_account: Callable) -> None:
    from billing_site.common.actors import Actor

    account = make_account(customer.user)
    services.billing_account_transition(
        account_id=account.id, transition="activate", actor=Actor.operator(customer.user.id, "staff@internal")
    )
    (entry,) = customer.client.get(url(account, "/history")).json()["results"]
    assert entry["actor"] == {"kind": "operator", "name": "support"}


# --- Members and roles


def test_owner_adds_and_removes_members(customer: Customer, account: BillingAccount, make_customer: Callable) -> None:
    viewer = make_customer()
    response = customer.client.post(
        url(account, "/members"), {"email": viewer.user.email, "role": "viewer"}, format="json"
    )
    assert response.status_code == 201
    assert response.json()["user_id"] == viewer.user.public_id
    assert viewer.client.get(url(account)).status_code == 200
    roles = {m["email"]: m["role"] for m in customer.client.get(url(account, "/members")).json()["results"]}
    assert roles == {customer.user.email: "owner", viewer.user.email: "viewer"}
    problem(
        customer.client.post(url(account, "/members"), {"email": viewer.user.email, "role": "admin"}, format="json"),
        409,
        "already_member",
    )

    assert customer.client.delete(url(account, f"/members/{viewer.user.public_id}")).status_code == 204
    problem(viewer.client.get(url(account)), 404, "not_found")


def test_member_errors(customer: Customer, account: BillingAccount) -> None:
    body = problem(
        customer.client.post(
            url(account, "/members"), {"email": "ghost@example.test", "role": "viewer"}, format="json"
        ),
        400,
        "unknown_user",
    )
    assert fields(body) == {"email"}
    body = problem(
        customer.client.post(url(account, "/members"), {"email": customer.user.email, "role": "owner"}, format="json"),
        400,
        "invalid",
    )
    assert fields(body) == {"role"}
    problem(customer.client.delete(url(account, f"/members/{customer.user.public_id}")), 409, "owner_cannot_be_removed")


@pytest.mark.parametrize(
    ("role", "method", "suffix", "payload", "status"),
    [
        ("viewer", "patch", "", {"name": "X"}, 403),
        ("viewer", "post", "/close", {"reason": "x"}, 403),
        ("viewer", "post", "/members", {"email": "x@example.test", "role": "viewer"}, 403),
        ("admin", "patch", "", {"name": "X"}, 200),
        ("admin", "post", "/close", {"reason": "x"}, 403),
        ("admin", "post", "/members", {"email": "x@example.test", "role": "viewer"}, 403),
        ("viewer", "get", "", None, 200),
        ("viewer", "get", "/history", None, 200),
        ("viewer", "get", "/members", None, 200),
    ],
)
def test_roles(
    customer: Customer,
    account: BillingAccount,
    make_customer: Callable,
    role: str,
    method: str,
    suffix: str,
    payload: Any,
    status: int,
) -> None:
    member = make_customer()
    services.member_add(account_id=account.id, email=member.user.email, role=role)
    response = getattr(member.client, method)(url(account, suffix), payload, format="json")
    assert response.status_code == status, response.content
    if status == 403:
        problem(response, 403, "permission_denied")


def test_viewer_cannot_remove_members(customer: Customer, account: BillingAccount, make_customer: Callable) -> None:
    viewer = make_customer()
    services.member_add(account_id=account.id, email=viewer.user.email, role="viewer")
    problem(viewer.client.delete(url(account, f"/members/{customer.user.public_id}")), 403, "permission_denied")


# --- Tenancy: someone else's account is indistinguishable from a missing one


TENANT_ENDPOINTS = [
    ("get", "", None),
    ("patch", "", {"name": "Mine now"}),
    ("post", "/close", {"reason": "x"}),
    ("get", "/history", None),
    ("get", "/members", None),
    ("post", "/members", {"email": "x@example.test", "role": "viewer"}),
    ("delete", "/members/usr_0000000000001", None),
]


@pytest.mark.parametrize(("method", "suffix", "payload"), TENANT_ENDPOINTS)
def test_another_tenants_account_is_404(
    customer: Customer, make_customer: Callable, make_account: Callable, method: str, suffix: str, payload: Any
) -> None:
    stranger = make_customer()
    theirs = make_account(stranger.user, state=AccountState.ACTIVE)
    response = getattr(customer.client, method)(url(theirs, suffix), payload, format="json")
    problem(response, 404, "not_found")
    missing = getattr(customer.client, method)(url("acc_0000000000001", suffix), payload, format="json")
    assert missing.json() == response.json()  # no way to tell "exists" from "not yours"
    theirs.refresh_from_db()
    assert (theirs.name, theirs.state) != ("Mine now", "closed")
    assert theirs.name != "Mine now" and theirs.state == AccountState.ACTIVE


def test_list_shows_only_the_callers_accounts(
    customer: Customer, make_customer: Callable, make_account: Callable
) -> None:
    mine = make_account(customer.user)
    make_account(make_customer().user)
    assert [a["id"] for a in customer.client.get("/api/v1/billing-accounts").json()["results"]] == [mine.public_id]


@pytest.mark.parametrize("bad_id", ["acc_", "acc_XYZ", "123", "usr_0000000000001", "acc_0000000000000"])
def test_malformed_ids_are_404(customer: Customer, bad_id: str) -> None:
    problem(customer.client.get(f"/api/v1/billing-accounts/{bad_id}"), 404, "not_found")


def test_cursor_pagination(customer: Customer, make_account: Callable) -> None:
    for _ in range(5):
        make_account(customer.user)
    seen: list[str] = []
    page = customer.client.get("/api/v1/billing-accounts?page_size=2").json()
    while True:
        seen += [a["id"] for a in page["results"]]
        if not page["next"]:
            break
        page = customer.client.get(page["next"]).json()
    assert len(seen) == len(set(seen)) == 5
    body = problem(customer.client.get("/api/v1/billing-accounts?cursor=garbage"), 400, "invalid")
    assert fields(body) == {"cursor"}


# --- Service keys


def test_service_keys_read_accounts_only_with_the_scope(account: BillingAccount) -> None:
    reader = client_with_key(
        services.service_key_create(name="costs", scopes=[Scope.ACCOUNTS_READ], created_by_id=None).raw
    )
    writer = client_with_key(
        services.service_key_create(name="meter", scopes=[Scope.USAGE_WRITE], created_by_id=None).raw
    )
    assert reader.get(url(account)).json()["id"] == account.public_id
    problem(writer.get(url(account)), 404, "not_found")
    problem(reader.patch(url(account), {"name": "X"}, format="json"), 403, "permission_denied")
    problem(reader.post("/api/v1/billing-accounts", VALID_ACCOUNT, format="json"), 403, "permission_denied")
    problem(reader.get("/api/v1/api-keys"), 403, "permission_denied")


def test_malformed_json_is_a_clean_400(customer: Customer) -> None:
    response = customer.client.post("/api/v1/billing-accounts", "{not json", content_type="application/json")
    problem(response, 400, "malformed_request")


def test_unknown_api_path_is_problem_json(customer: Customer) -> None:
    problem(customer.client.get("/api/v1/nothing-here"), 404, "not_found")


def test_a_member_may_leave_but_not_remove_others(
    customer: Customer, account: BillingAccount, make_customer: Callable
) -> None:
    admin, viewer = make_customer(), make_customer()
    services.member_add(account_id=account.id, email=admin.user.email, role="admin")
    services.member_add(account_id=account.id, email=viewer.user.email, role="viewer")
    problem(viewer.client.delete(url(account, f"/members/{admin.user.public_id}")), 403, "permission_denied")
    assert viewer.client.delete(url(account, f"/members/{viewer.user.public_id}")).status_code == 204
    problem(viewer.client.get(url(account)), 404, "not_found")
    problem(customer.client.delete(url(account, f"/members/{customer.user.public_id}")), 409, "owner_cannot_be_removed")


def test_signup_is_rate_limited_per_client(monkeypatch: pytest.MonkeyPatch) -> None:
    from django.core.cache import cache

    from accounts.api import SignupThrottle

    cache.clear()
    monkeypatch.setattr(SignupThrottle, "THROTTLE_RATES", {"signup": "2/hour"})  # SIGNUP_RATE=2/hour
    client = APIClient()
    for n in range(2):
        payload = {"email": f"n{n}@example.test", "password": "correct-horse-battery-staple"}
        assert client.post("/api/v1/users", payload, format="json").status_code == 201
    response = client.post("/api/v1/users", {"email": "n3@example.test", "password": "x" * 20}, format="json")
    problem(response, 429, "throttled")
    assert int(response["Retry-After"]) > 0
    assert not User.objects.filter(email="n3@example.test").exists()
    cache.clear()


@pytest.mark.parametrize("page_size", ["²", "0", "501", "-1", "1.5", "١٢"])
def test_odd_page_sizes_are_400(customer: Customer, page_size: str) -> None:
    body = problem(customer.client.get("/api/v1/billing-accounts", {"page_size": page_size}), 400, "invalid")
    assert fields(body) == {"page_size"}


@pytest.mark.parametrize("position", ["garbage", "2024-13-45", ""])
def test_forged_cursors_are_400(customer: Customer, account: BillingAccount, position: str) -> None:
    import base64
    from urllib.parse import urlencode

    forged = base64.b64encode(urlencode({"p": position, "o": "1"}).encode()).decode()
    body = problem(customer.client.get("/api/v1/billing-accounts", {"cursor": forged}), 400, "invalid")
    assert fields(body) == {"cursor"}


@pytest.mark.parametrize(
    "key", ["bku_\x00abcdefghijkmnopqrstvwxyz0123456789abcdef", "bku_ABCDEFGHIJKLmnopqrstvwxyz0123456789"]
)
def test_odd_keys_are_401_not_500(key: str) -> None:
    problem(client_with_key(key).get("/api/v1/billing-accounts"), 401, "authentication_failed")


def test_signup_throttle_ignores_client_sent_forwarded_for(monkeypatch: pytest.MonkeyPatch) -> None:
    from django.core.cache import cache

    from accounts.api import SignupThrottle

    cache.clear()
    monkeypatch.setattr(SignupThrottle, "THROTTLE_RATES", {"signup": "2/hour"})
    statuses = [
        APIClient()
        .post(
            "/api/v1/users",
            {"email": f"spoof{n}@example.test", "password": "correct-horse-battery-staple"},
            format="json",
            HTTP_X_FORWARDED_FOR=f"10.0.0.{n}",
        )
        .status_code
        for n in range(4)
    ]
    assert statuses == [201, 201, 429, 429]
    cache.clear()


def test_a_phone_number_is_stored_in_e164_read_in_the_accounts_country(customer: Customer) -> None:
    response = customer.client.post(
        "/api/v1/billing-accounts", {**VALID_ACCOUNT, "phone": "020 123 4567"}, format="json"
    )
    assert response.status_code == 201, response.content
    assert response.json()["phone"] == "+31201234567"
    changed = customer.client.patch(
        f"/api/v1/billing-accounts/{response.json()['id']}", {"phone": "+1 (650) 253-0000"}, format="json"
    )
    assert changed.status_code == 200, changed.content
    assert changed.json()["phone"] == "+16502530000"


def test_tax_id_and_country_are_rechecked_together_in_the_service(customer: Customer, make_account: Callable) -> None:
    from billing_site.common.errors import ApplicationError

    account = make_account(customer.user, tax_id="NL004495445B01")
    with pytest.raises(ApplicationError) as err:
        services.billing_account_update(account_id=account.id, changes={"country": "DE"})
    assert (err.value.code, err.value.errors[0]["field"]) == ("invalid_tax_id", "tax_id")
    account.refresh_from_db()
    assert account.country == "NL"


def test_customers_see_public_reasons_for_our_transitions(customer: Customer, make_account: Callable) -> None:
    from billing_site.common.actors import Actor

    account = make_account(customer.user, state=AccountState.ACTIVE)
    services.billing_account_transition(
        account_id=account.id, transition="block", actor=Actor.system("antifraud.rules"), reason="9 cards in 1 hour"
    )
    (entry,) = customer.client.get(url(account, "/history")).json()["results"]
    assert entry["actor"] == {"kind": "system", "name": "billing"}
    assert entry["reason"] == "Account under review. Contact support."
    assert "cards" not in str(entry)
