"""The OpenAPI schema is valid, and schema and server agree: schemathesis drives every
operation with generated requests (as a signed-up customer with a real account) and checks
for 5xx, undocumented status codes, content types and response bodies off the schema, that
schema-valid requests are accepted and schema-invalid ones refused. The rules the server
enforces are in the schema (country and currency enums, password length, unknown fields
refused, the strings DRF refuses, repeated query parameters), and tested here one by one."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from django.conf import settings as django_settings
from django.contrib.auth import password_validation
from django.core import signals
from django.core.exceptions import ValidationError
from django.core.management import call_command
from django.core.wsgi import get_wsgi_application
from django.db import close_old_connections
from django.test import Client
from django_countries.data import COUNTRIES
from hypothesis import HealthCheck, settings
from schemathesis.core.parameters import ParameterLocation

from accounts import services, validation
from accounts.models import BillingAccount, Membership, User
from accounts.tests.factories import BillingAccountFactory
from billing_site.common import ids
from conftest import Customer

IN_CI = bool(os.environ.get("CI"))
schema = schemathesis.openapi.from_wsgi("/api/schema/?format=json", get_wsgi_application())


def test_schema_is_valid_with_no_warnings(tmp_path: object) -> None:
    call_command("spectacular", "--validate", "--fail-on-warn", "--file", "/dev/null")


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return json.loads(Client().get("/api/schema/?format=json").content)


def _component(document: dict[str, Any], name: str) -> dict[str, Any]:
    component: dict[str, Any] = document["components"]["schemas"][name]
    return component


def test_every_request_body_refuses_unknown_fields(document: dict[str, Any]) -> None:
    bodies = {
        name: schema
        for name, schema in document["components"]["schemas"].items()
        if name.endswith("Request") and schema.get("type") == "object"
    }
    assert {"SignupRequest", "BillingAccountRequest", "AddressRequest", "UsageEventBatchRequest"} <= set(bodies)
    assert {name for name, schema in bodies.items() if schema.get("additionalProperties") is not False} == set()
    # An address inside a PATCH is partial too.
    patched = _component(document, "PatchedBillingAccountUpdateRequest")
    assert patched["properties"]["address"] == {"$ref": "#/components/schemas/PatchedAddressRequest"}
    assert "required" not in _component(document, "PatchedAddressRequest")


def test_countries_currencies_and_passwords_are_documented(document: dict[str, Any]) -> None:
    assert _component(document, "CountryEnum")["enum"] == sorted(COUNTRIES)
    assert _component(document, "CurrencyEnum")["enum"] == django_settings.BILLING_CURRENCIES
    password = _component(document, "SignupRequest")["properties"]["password"]
    assert password["minLength"] == 8
    assert re.search(password["pattern"], "correct-horse") and not re.search(password["pattern"], "12345678")
    name = _component(document, "BillingAccountRequest")["properties"]["name"]
    for refused in [" \t", "\x1f\x85", "a\x00b"]:  # what DRF's CharField trims or refuses
        assert not re.search(name["pattern"], refused)
    assert re.search(name["pattern"], " Acme ")


@pytest.mark.parametrize("country", ["nl", " NL", "XX", "Netherlands"])
def test_a_country_off_the_enum_is_refused(customer: Customer, account: BillingAccount, country: str) -> None:
    response = customer.client.patch(
        f"/api/v1/billing-accounts/{account.public_id}", {"country": country}, format="json"
    )
    assert response.status_code == 400
    assert [(e["field"], e["code"]) for e in response.json()["errors"]] == [("country", "invalid_country")]


@pytest.mark.parametrize(
    "query",
    ["page_size=1&page_size=2", "cursor=a&cursor=b", "page_size=5&page_size=5"],
)
def test_a_query_parameter_given_twice_is_refused(customer: Customer, query: str) -> None:
    response = customer.client.get(f"/api/v1/billing-accounts?{query}")
    assert response.status_code == 400
    name = query.partition("=")[0]
    assert [(e["field"], e["code"]) for e in response.json()["errors"]] == [(name, "repeated")]


@pytest.mark.parametrize("group_by", ["sku, resource", " sku", "sku,", ",sku", "sku,,resource", "label:"])
def test_group_by_is_exactly_the_documented_list(customer: Customer, account: BillingAccount, group_by: str) -> None:
    response = customer.client.get(
        f"/api/v1/billing-accounts/{account.public_id}/costs",
        {"start": "2026-10-01", "end": "2026-10-02", "group_by": group_by},
    )
    assert response.status_code == 400, response.content
    assert [e["field"] for e in response.json()["errors"]] == ["group_by"]


def test_a_partial_address_in_a_patch_changes_only_that_line(customer: Customer, account: BillingAccount) -> None:
    before = customer.client.get(f"/api/v1/billing-accounts/{account.public_id}").json()["address"]
    response = customer.client.patch(
        f"/api/v1/billing-accounts/{account.public_id}", {"address": {"city": "Utrecht"}}, format="json"
    )
    assert response.status_code == 200, response.content
    assert response.json()["address"] == {**before, "city": "Utrecht"}


@pytest.fixture
def keep_test_connection() -> Iterator[None]:
    """Schemathesis calls the WSGI app directly: keep Django from closing the test's
    connection (and its transaction) at the end of each request, as its test client does."""
    signals.request_started.disconnect(close_old_connections)
    signals.request_finished.disconnect(close_old_connections)
    yield
    signals.request_started.connect(close_old_connections)
    signals.request_finished.connect(close_old_connections)


@pytest.fixture
def caller(db: None, keep_test_connection: None) -> dict[str, str]:
    user, issued = services.user_signup(email="fuzz@example.test", password="correct-horse-battery-staple")
    services.user_signup(email="teammate@example.test", password="correct-horse-battery-staple")
    account = BillingAccountFactory(country="NL")
    Membership.objects.create(account=account, user=user, role="owner")
    producer = services.service_key_create(name="fuzz", scopes=["usage:write"], created_by_id=None)
    return {
        "key": issued.raw,
        "producer_key": producer.raw,
        "account_id": account.public_id,
        "country": "NL",
        "teammate": "teammate@example.test",
    }


_SEMANTIC_PASSWORD_RULES = [
    v for v in password_validation.get_default_password_validators() if not hasattr(v, "min_length")
]


def _supply_what_the_schema_cannot_say(case: schemathesis.Case, caller: dict[str, str]) -> None:
    """A schema-valid request the server may still refuse, for a reason no JSON Schema can
    state; each is documented in the operation's description. For positive cases only, put a
    value that passes in its place (as a client would: it knows its ids and its teammates):

    - opaque cursors: only a ``next``/``previous`` link's cursor is one;
    - a member to add must have signed up (``unknown_user``);
    - VAT numbers carry a checksum (``invalid_tax_id``) and belong to the account's country
      (a PATCH of the country alone re-validates the stored one);
    - a phone number must be one libphonenumber finds valid (``invalid_phone``);
    - a password must not be common or close to the email (Django's validators; the schema
      states the length and "not only digits");
    - a cost range: ``end`` after ``start``, at most the granularity's span, years 2000-9998.
    """
    if case.query:
        case.query.pop("cursor", None)
    body = case.body if isinstance(case.body, dict) else {}
    if case.path.endswith("/members") and case.method == "POST" and isinstance(body.get("email"), str):
        body["email"] = caller["teammate"]
    if case.method == "PATCH" and case.path.endswith("/billing-accounts/{account_id}") and "country" in body:
        # A new country re-validates the stored VAT number unless the request replaces it.
        stored = BillingAccount.objects.filter(id=ids.decode("acc", caller["account_id"])).values_list(
            "country", "tax_id"
        )
        for _, tax_id in stored:
            body.setdefault("tax_id", tax_id)
    if isinstance(body.get("tax_id"), str) and body["tax_id"]:
        country = (
            body.get("country")
            or BillingAccount.objects.filter(id=ids.decode("acc", caller["account_id"]))
            .values_list("country", flat=True)
            .first()
            or caller["country"]
        )
        try:
            validation.normalize_tax_id(str(country), body["tax_id"])
        except ValueError:
            body["tax_id"] = ""
    if isinstance(body.get("phone"), str) and body["phone"]:
        try:
            validation.normalize_phone(str(body.get("country") or caller["country"]), body["phone"])
        except ValueError:
            body["phone"] = ""
    if case.path == "/api/v1/users" and isinstance(body.get("password"), str):
        try:
            password_validation.validate_password(
                body["password"], User(email=str(body.get("email", ""))), _SEMANTIC_PASSWORD_RULES
            )
        except ValidationError:
            body["password"] = "correct-horse-battery-staple"
    if case.path.endswith("/costs") and case.query and {"start", "end"} <= set(case.query):
        start = dt.date.fromisoformat(str(case.query["start"]))
        start = start.replace(year=min(max(start.year, 2000), 9997))
        if case.query.get("granularity") == "hour":  # hours of months past the retention are dropped
            from django.utils import timezone

            from metering.selectors import hourly_kept_from

            start = max(start, hourly_kept_from(timezone.now()).date())
        case.query["start"] = start.isoformat()
        case.query["end"] = (start + dt.timedelta(days=1)).isoformat()


@pytest.mark.django_db
@schema.parametrize()
# A few examples per operation: 10 in a local make test (random, so new runs explore; the suite's
# 5-minute budget), 20 in CI, fixed there so that a landing is never decided by luck.
@settings(max_examples=20 if IN_CI else 10, deadline=None, suppress_health_check=list(HealthCheck), derandomize=IN_CI)
def test_api_conforms_to_its_schema(case: schemathesis.Case, caller: dict[str, str]) -> None:
    """Every check on, over every operation: no 5xx; documented statuses, content types,
    headers and bodies; schema-valid requests accepted (``positive_data_acceptance``) and
    schema-invalid ones refused with a 4xx (``negative_data_rejection``)."""
    positive_path = case.meta is None or not case.meta.is_negative_at(ParameterLocation.PATH)
    if positive_path and case.path_parameters and "account_id" in case.path_parameters:
        case.path_parameters["account_id"] = caller["account_id"]  # reach past the 404
    if case.meta is None or case.meta.generation.mode.is_positive:
        _supply_what_the_schema_cannot_say(case, caller)
    excluded = []
    key = caller["key"]
    if case.path.startswith("/api/v1/usage/"):
        key = caller["producer_key"]
        # By contract, events that break the documented event schema are rejected one by one
        # inside a 200 (good events in the batch still go in), not with a 4xx for the batch; the
        # lead owns that endpoint (its quantity grammar is being changed).
        excluded.append(schemathesis.checks.negative_data_rejection)
    case.call_and_validate(headers={"Authorization": f"Bearer {key}"}, excluded_checks=excluded)
