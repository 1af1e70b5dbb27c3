"""The payments API's requests (issue 19): every endpoint refuses a malformed body and fields it
does not know (400 with a code naming the field), and only callers allowed on an account spend
its card-binding budget."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from django.test import override_settings

from accounts.models import BillingAccount
from conftest import Customer
from payments.models import BindingAttempt, Payment, PaymentMethod
from payments.tests.helpers import NOW, bind, issue_invoice

pytestmark = [pytest.mark.django_db, pytest.mark.clock(NOW)]


@pytest.fixture
def acct(catalog: None, customer: Customer, make_account: Callable[..., BillingAccount]) -> BillingAccount:
    return make_account(customer.user, currency="EUR", country="NL")


def problem(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.content
    body: dict[str, Any] = response.json()
    assert body["code"] == code, body
    return body


def fields(body: dict[str, Any]) -> dict[str, str]:
    return {e["field"]: e["code"] for e in body.get("errors", [])}


def post_raw(customer: Customer, url: str, body: str) -> Any:
    return customer.client.generic("POST", url, body, content_type="application/json")


def test_malformed_json_and_unknown_fields_are_refused_on_every_payments_post(
    customer: Customer, acct: BillingAccount
) -> None:
    assert bind(customer.client, acct).status_code == 201
    card = PaymentMethod.objects.get(account_id=acct.id)
    invoice = issue_invoice(acct)
    base = f"/api/v1/billing-accounts/{acct.public_id}"
    posts = {
        "setup": f"{base}/payment-methods/setup",
        "complete": f"{base}/payment-methods",
        "default": f"{base}/payment-methods/{card.public_id}/default",
        "pay": f"{base}/invoices/{invoice.public_id}/pay",
    }
    attempts, payments = BindingAttempt.objects.count(), Payment.objects.count()
    for name, url in posts.items():
        problem(post_raw(customer, url, "{bad"), 400, "malformed_request")
        refused = problem(
            post_raw(customer, url, '{"payment_method": "pmt_x", "setup_intent_id": "seti_1"}'), 400, "invalid"
        )
        assert fields(refused).get("payment_method") == "unknown_field", (name, refused)
        problem(post_raw(customer, url, "[1, 2]"), 400, "invalid")
    problem(
        customer.client.generic(
            "DELETE", f"{base}/payment-methods/{card.public_id}", "{bad", content_type="application/json"
        ),
        400,
        "malformed_request",
    )
    # Nothing was started: no binding, no charge, the card still there and still the default.
    assert (BindingAttempt.objects.count(), Payment.objects.count()) == (attempts, payments)
    card.refresh_from_db()
    assert card.is_default and card.detached_at is None
    # No body, or an empty object, is what these endpoints take.
    assert customer.client.post(posts["setup"]).status_code == 201
    assert customer.client.post(posts["setup"], {}, format="json").status_code == 201
    assert customer.client.post(posts["pay"], {}, format="json").status_code in (200, 201)


@override_settings(PAYMENTS_BINDING_RATE_ACCOUNT="10/hour")
def test_a_stranger_cannot_spend_an_owner_s_binding_budget(
    customer: Customer, acct: BillingAccount, make_customer: Callable[..., Customer]
) -> None:
    stranger = make_customer()
    url = f"/api/v1/billing-accounts/{acct.public_id}/payment-methods/setup"
    for _ in range(12):
        problem(stranger.client.post(url), 404, "not_found")
        problem(
            stranger.client.post(
                f"/api/v1/billing-accounts/{acct.public_id}/payment-methods",
                {"setup_intent_id": "seti_x"},
                format="json",
            ),
            404,
            "not_found",
        )
    assert customer.client.post(url).status_code == 201  # the owner's budget is whole
    # The owner's own attempts count: ten an hour, then 429.
    for _ in range(9):
        assert customer.client.post(url).status_code == 201
    problem(customer.client.post(url), 429, "throttled")
