"""Input that used to answer 500 or HTML: JSON nested a thousand deep (a ``RecursionError`` in
the parser) is a 400 ``malformed_request``; a body over ``DATA_UPLOAD_MAX_MEMORY_SIZE`` is a 413
``payload_too_large``; both as problem+json, on every JSON endpoint including usage ingestion."""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.conf import settings as django_settings
from rest_framework.test import APIClient

from accounts.models import BillingAccount
from billing_site.common.errors import PROBLEM_CONTENT_TYPE
from conftest import Customer


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def _problem(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.content[:300]
    assert response["Content-Type"] == PROBLEM_CONTENT_TYPE
    body: dict[str, Any] = json.loads(response.content)
    assert (body["status"], body["code"]) == (status, code)
    return body


@pytest.mark.parametrize("depth", [1_000, 100_000])
@pytest.mark.parametrize("debug", [False, True], ids=["debug-off", "debug-on"])
def test_deeply_nested_json_is_a_400_on_the_drf_endpoints(
    depth: int, debug: bool, customer: Customer, account: BillingAccount, settings: Any
) -> None:
    settings.DEBUG = debug
    client = APIClient(raise_request_exception=False)
    signup = client.post("/api/v1/users", f'{{"email": {_nested(depth)}}}', content_type="application/json")
    assert "nested too deeply" in _problem(signup, 400, "malformed_request")["detail"]
    for method, url, body in [
        ("patch", f"/api/v1/billing-accounts/{account.public_id}", f'{{"name": {_nested(depth)}}}'),
        ("post", "/api/v1/billing-accounts", _nested(depth)),
        ("post", "/api/v1/api-keys", f'{{"name": "k", "x": {_nested(depth)}}}'),
        ("post", f"/api/v1/billing-accounts/{account.public_id}/members", _nested(depth)),
    ]:
        customer.client.raise_request_exception = False
        response = getattr(customer.client, method)(url, body, content_type="application/json")
        _problem(response, 400, "malformed_request")
    account.refresh_from_db()
    assert account.name != ""  # untouched


@pytest.mark.parametrize("depth", [1_000, 100_000])
def test_deeply_nested_json_is_a_400_at_usage_ingestion(depth: int, producer: APIClient) -> None:
    producer.raise_request_exception = False
    for body in [
        f'{{"events": [{{"id": "e1", "labels": {_nested(depth)}}}]}}',
        f'{{"events": [{_nested(depth)}]}}',
    ]:
        _problem(producer.post("/api/v1/usage/events", body, content_type="application/json"), 400, "malformed_request")


def test_a_shallow_body_still_parses(customer: Customer, account: BillingAccount) -> None:
    response = customer.client.patch(
        f"/api/v1/billing-accounts/{account.public_id}", {"name": "Renamed"}, format="json"
    )
    assert response.status_code == 200, response.content
    assert response.json()["name"] == "Renamed"


@pytest.mark.parametrize("debug", [False, True], ids=["debug-off", "debug-on"])
def test_a_body_over_the_upload_limit_is_a_problem_413(
    debug: bool, customer: Customer, account: BillingAccount, settings: Any
) -> None:
    settings.DEBUG = debug
    limit = django_settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    oversized = json.dumps({"name": "x" * (limit + 1)})
    client = APIClient(raise_request_exception=False)
    body = _problem(client.post("/api/v1/users", oversized, content_type="application/json"), 413, "payload_too_large")
    assert str(limit) in body["detail"]
    customer.client.raise_request_exception = False
    for method, url in [
        ("patch", f"/api/v1/billing-accounts/{account.public_id}"),
        ("post", "/api/v1/billing-accounts"),
        ("post", "/api/v1/api-keys"),
    ]:
        response = getattr(customer.client, method)(url, oversized, content_type="application/json")
        _problem(response, 413, "payload_too_large")


def test_usage_ingestion_keeps_its_own_larger_limit(producer: APIClient) -> None:
    """Batches may be up to 10 MB, more than Django's 2.5 MB: a 3 MB batch is read and judged
    event by event, not refused for its size."""
    filler = "x" * 200
    events = [
        {
            "id": f"e{i}",
            "account_id": "acc_0k3x9m2q7t1vb",
            "time": "2026-01-01T00:00:00Z",
            "type": "usage",
            "sku": "nope",
            "quantity": "1",
            "labels": {"pad": filler},
        }
        for i in range(10_000)
    ]
    body = json.dumps({"events": events})
    assert len(body) > django_settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    response = producer.post("/api/v1/usage/events", body, content_type="application/json")
    assert response.status_code == 200, response.content[:300]
    assert len(response.json()["rejected"]) == 10_000
